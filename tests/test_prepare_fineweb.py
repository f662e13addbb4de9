"""prepare_fineweb.py end to end on small FineWeb-shaped local files (parquet, jsonl, txt folder)."""

import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import tracemalloc
import zipfile
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, shared_data
from gptkit.configurator import ConfigError, UserError, load_config
from gptkit.data import MAGIC, PREPARE_STATE, VERSION, ShardError, list_shards, load_shard, read_header, write_shard
from gptkit.documents import normalize_text, split_hash
from gptkit.sources import TXT_PIECE_CHARS, open_records, text_pieces, txt_pieces
from gptkit.tokenizer import EOT, load_tokenizer
from prepare_fineweb import PrepareConfig, prepare


def zip_texts(name, limit):
    with zipfile.ZipFile(shared_data("pretrain", "nltk", name)) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".txt") and "README" not in n)[:limit]
        return [z.read(n).decode("utf-8", "replace") for n in names]


def text_head(parts, n_bytes):
    """The first n_bytes of a shared text file, cut at a line end, decoded as is (BOM and CRLF kept)."""
    with open(shared_data("pretrain", *parts), "rb") as f:
        data = f.read(n_bytes)
    return data[:data.rindex(b"\n") + 1].decode("utf-8")


def fineweb_records():
    """FineWeb-shaped records: paragraphs of the inaugural addresses plus awkward documents."""
    texts, seen = [], set()
    for speech in zip_texts("inaugural.zip", 60):
        for paragraph in speech.split("\n\n"):
            if paragraph.strip() and paragraph not in seen:
                seen.add(paragraph)
                texts.append(paragraph)
    texts[5:5] = ["", "   \n ", "a lone\rcarriage return", "\ufeffa byte-order mark", "windows\r\nlines\r\n",
                  "user text <|endoftext|> <|assistant|> stays text"]
    texts.insert(40, text_head(("gutenberg", "clocasto-HaikuGenerator", "pg11.txt"), 20000))  # CRLF
    texts.insert(80, text_head(("gutenberg", "karpathy-char-rnn-warpeace", "warpeace_input.txt"), 20000))  # BOM
    return [{"text": t, "id": f"<urn:uuid:{i:08d}>"} for i, t in enumerate(texts)]


def write_parquet(path, records):
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=300)


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def run_prepare(source, data_dir, **settings):
    args = [f"--source={source}", f"--data_dir={data_dir}"] + [f"--{k}={v}" for k, v in settings.items()]
    return prepare(load_config(PrepareConfig, args))


def read_split(data_dir, split):
    """Decode a split's shards back into documents (text after each <|endoftext|>)."""
    tokens = np.concatenate([np.asarray(load_shard(p)) for p in list_shards(data_dir, split)])
    starts = np.flatnonzero(tokens == EOT)
    assert starts.size and starts[0] == 0, "every split starts with <|endoftext|>"
    tok = load_tokenizer("gpt2")
    return [tok.decode(doc[1:]) for doc in np.split(tokens, starts[1:])]


def check_headers(data_dir, shard_tokens):
    for split in ("train", "val"):
        paths = list_shards(data_dir, split)  # both splits have shards: a missing one is an error here
        for i, path in enumerate(paths):
            header = read_header(path)
            tokens = load_shard(path)
            assert (header[0], header[1], header[2]) == (MAGIC, VERSION, tokens.size)
            assert header[4] == np.count_nonzero(tokens == EOT)
            if i < len(paths) - 1:
                assert tokens.size == shard_tokens  # only the last shard of a split is shorter


@pytest.mark.slow
def test_parquet_and_jsonl_round_trip_split_and_headers(tmp_path):
    records = fineweb_records()
    write_parquet(tmp_path / "fw.parquet", records)
    write_jsonl(tmp_path / "fw.jsonl", records)
    settings = dict(shard_tokens=20000, val_tokens=15000)
    state = run_prepare(tmp_path / "fw.parquet", tmp_path / "pq", num_proc=1, **settings)
    train, val = read_split(tmp_path / "pq", "train"), read_split(tmp_path / "pq", "val")

    expected = [normalize_text(r["text"]) for r in records]
    expected = [t for t in expected if t]
    assert len(expected) == len(records) - 2  # the two blank documents are dropped
    assert Counter(train + val) == Counter(expected)  # every document exactly once, normalised
    assert not set(train) & set(val)
    assert not any("\r" in d or "\ufeff" in d for d in train + val)
    assert "user text <|endoftext|> <|assistant|> stays text" in train + val
    # the split follows the stored rule: val takes hash-selected documents, in order, until full
    p = state["val_probability"]
    by_text = {normalize_text(r["text"]): r["id"] for r in records}
    assert all(split_hash(by_text[d], d) < p for d in val)
    assert [d for d in expected if d in set(val)] == val and [d for d in expected if d not in set(val)] == train
    val_tokens = state["val"]["tokens"]
    largest_doc = max(len(load_tokenizer("gpt2").encode(d)) + 1 for d in val)
    assert 15000 <= val_tokens <= 15000 + largest_doc, val_tokens
    assert 0 < p < 0.5
    check_headers(tmp_path / "pq", 20000)
    assert state["train"]["shards"] >= 3

    # the same records as jsonl, tokenized on 2 processes: the same documents (the split may differ a
    # little: the token estimate, and so the val probability, comes from the file sizes)
    state = run_prepare(tmp_path / "fw.jsonl", tmp_path / "js", num_proc=2, **settings)
    train, val = read_split(tmp_path / "js", "train"), read_split(tmp_path / "js", "val")
    assert Counter(train + val) == Counter(expected) and not set(train) & set(val)
    assert 15000 <= state["val"]["tokens"] <= 15000 + largest_doc
    check_headers(tmp_path / "js", 20000)


def test_txt_folder_files_cut_into_documents(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    files = {f"inaugural_{i:02d}.txt": t for i, t in enumerate(zip_texts("inaugural.zip", 7))}
    files["alice_crlf.txt"] = text_head(("gutenberg", "clocasto-HaikuGenerator", "pg11.txt"), 40000)
    files["warpeace_bom.txt"] = text_head(("gutenberg", "karpathy-char-rnn-warpeace", "warpeace_input.txt"), 40000)
    files["empty.txt"] = ""
    files["lone_cr.txt"] = "one\rtwo\r"
    for name, text in files.items():
        with open(folder / name, "w", encoding="utf-8", newline="") as f:
            f.write(text)  # newline="": the CRs reach the file as they are
    assert b"\r\n" in (folder / "alice_crlf.txt").read_bytes()
    assert (folder / "warpeace_bom.txt").read_bytes().startswith(b"\xef\xbb\xbf")
    state = run_prepare(folder, tmp_path / "out", shard_tokens=20000, val_tokens=3000, num_proc=1)
    train, val = read_split(tmp_path / "out", "train"), read_split(tmp_path / "out", "val")
    # put back in file order, the documents join into each normalised file; the two long ones are cut
    position = {}
    for name in sorted(files):
        for piece in text_pieces(normalize_text(files[name])):
            position.setdefault(piece, len(position))
    docs = sorted(train + val, key=position.__getitem__)
    # no document hashed into val (14 of them, p=0.17): the last one went there, so val is not empty
    assert state["val_probability"] < 0.2 and val == docs[-1:] and train == docs[:-1]
    assert "".join(docs) == "".join(normalize_text(files[name]) for name in sorted(files))
    assert len(docs) == 7 + 1 + 3 + 3  # speeches and lone_cr whole; 40K characters -> 16K + 16K + rest
    assert "one\ntwo\n" in docs and any(d.startswith("\"Well, Prince") for d in docs)  # BOM gone
    alice = [d for d in docs if "Alice" in d]
    assert len(alice) == 3 and alice[0].endswith("\n\n") and len(alice[0]) >= TXT_PIECE_CHARS
    check_headers(tmp_path / "out", 20000)


def test_text_pieces_cut_at_paragraphs_then_lines():
    text = "".join(f"paragraph {i} " * 40 + "\n\n" for i in range(200))
    pieces = text_pieces(text, size=1000)
    assert "".join(pieces) == text and all(p.endswith("\n\n") for p in pieces)
    assert all(1000 <= len(p) < 1000 + 500 for p in pieces[:-1])
    lines = "a line of text\n" * 1000
    assert all(p.endswith("\n") for p in text_pieces(lines, size=100))
    assert [len(p) for p in text_pieces("x" * 1000, size=100)] == [400, 400, 200]  # no line ends at all
    assert text_pieces("short", size=100) == ["short"] and text_pieces("", size=100) == []


def test_text_pieces_of_a_huge_file_take_linear_time():
    # each cut looks only as far as the longest piece: a search to the end of the text for every piece
    # made a 16 MB file without paragraph breaks take about 10 s, and a 1 GB one hours
    for text in ("a line of text\n" * 1_000_000, "words " * 2_700_000):
        started = time.perf_counter()
        pieces = text_pieces(text)
        assert time.perf_counter() - started < 2.0
        assert "".join(pieces) == text and len(pieces) >= len(text) // (4 * TXT_PIECE_CHARS)


def test_a_huge_txt_file_is_read_in_blocks(tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    paragraph = "A paragraph of a book that is far too large to read into memory in one piece.\n\n"
    with open(folder / "huge.txt", "w", encoding="utf-8") as f:
        for _ in range(40):
            f.write(paragraph * 12_500)  # 1 MB a time, 40 MB in all
    records = open_records(str(folder))
    tracemalloc.start()
    try:
        first = [text for _, text in itertools.islice(records, 3)]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        records.close()
    assert first == text_pieces(paragraph * 1000)[:3]
    assert peak < 16e6, f"reading the start of a 40 MB .txt file took {peak / 1e6:.0f} MB"


def test_txt_blocks_cut_as_the_whole_file(tmp_path):
    # line ends, a byte-order mark and multi-byte characters that fall across the block boundaries
    text = "\ufeff" + "".join(f"line {i} caf\u00e9 \u2603\r\n" + ("\r" if i % 7 == 0 else "") + ("\r\n" if i % 5 == 0 else "")
                             for i in range(3000))
    path = tmp_path / "t.txt"
    path.write_bytes(text.encode("utf-8"))
    expected = text_pieces(normalize_text(text), size=500)
    for block in (1, 7, 1000, 10**6):
        assert list(txt_pieces(path, size=500, block=block)) == expected, block
    path.write_bytes(b" \r\n\t\n")
    assert list(txt_pieces(path, size=500, block=3)) == []  # nothing but white space: no document


def test_a_few_books_still_get_a_val_split(tmp_path):
    folder = tmp_path / "books"
    folder.mkdir()
    for name in ("pg11.txt", "pg16.txt", "pg1342.txt"):
        with open(folder / name, "w", encoding="utf-8") as f:
            f.write(text_head(("gutenberg", "clocasto-HaikuGenerator", name), 400_000))
    state = run_prepare(folder, tmp_path / "out", shard_tokens=100_000, val_tokens=20_000, num_proc=1)
    assert 20_000 <= state["val"]["tokens"] <= 20_000 + TXT_PIECE_CHARS  # not a whole book, not nothing
    assert state["train"]["docs"] > 20
    # the default val_tokens (10M) is far more than these 1.2 MB: val takes at most 10% of them, not all
    state = run_prepare(folder, tmp_path / "default", shard_tokens=100_000, num_proc=1)
    total = state["train"]["tokens"] + state["val"]["tokens"]
    assert state["val_limit"] < 0.1 * total * 1.5 and state["val_limit"] <= state["val"]["tokens"]
    assert state["val"]["tokens"] <= state["val_limit"] + TXT_PIECE_CHARS and state["train"]["tokens"] > 0.8 * total


def test_max_tokens_stops_early(tmp_path):
    write_jsonl(tmp_path / "fw.jsonl", fineweb_records())
    state = run_prepare(tmp_path / "fw.jsonl", tmp_path / "out", shard_tokens=20000, val_tokens=2000,
                        max_tokens=30000, num_proc=1)
    total = state["train"]["tokens"] + state["val"]["tokens"]
    assert 30000 <= total < 30000 + 10000, total
    assert 2000 <= state["val"]["tokens"] < 2000 + 6000
    # max_tokens below one document: one document cannot fill both splits, and the fix is a larger max_tokens
    with pytest.raises(UserError, match=r"raise max_tokens \(max_tokens=10 stopped it\)"):
        run_prepare(tmp_path / "fw.jsonl", tmp_path / "tiny", val_tokens=2000, max_tokens=10, num_proc=1)


def test_bad_sources_give_clear_messages(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no .parquet, .jsonl or .txt"):
        run_prepare(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(PrepareConfig, [f"--source={tmp_path / 'nope.jsonl'}"])
    with pytest.raises(ConfigError, match="val_tokens=0: train.py evaluates on a val split"):
        load_config(PrepareConfig, ["--val_tokens=0"])
    # unreadable files are named, with the fix
    for name, content, says in (("latin.txt", "Caf\u00e9 na\u00efve\n".encode("cp1252"), r"latin\.txt failed: it is not UTF-8"),
                                ("lines.jsonl", b'{"text": "fine"}\n{"text": "cut\n', r"lines\.jsonl failed: line 2 is not valid JSON"),
                                ("number.jsonl", b'{"text": 123, "id": "a"}\n', "has no 'text' string")):
        folder = tmp_path / name.replace(".", "_")
        folder.mkdir()
        if not name.startswith("number"):  # a good file first: the bad one is named, not just the folder
            (folder / "good.txt" if name.endswith(".txt") else folder / "a.jsonl").write_text(
                "Good text.\n" if name.endswith(".txt") else '{"text": "Good text.", "id": "0"}\n')
        (folder / name).write_bytes(content)
        with pytest.raises(UserError, match=says):
            run_prepare(folder, tmp_path / f"out_{name}", num_proc=1)
    write_parquet(tmp_path / "whole.parquet", fineweb_records()[:20])
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "part.parquet").write_bytes((tmp_path / "whole.parquet").read_bytes()[:3000])
    with pytest.raises(UserError, match=r"part\.parquet.*truncated or not parquet"):
        run_prepare(tmp_path / "cut", tmp_path / "out_parquet", num_proc=1)
    # a data_dir prepared with other settings is not silently mixed
    write_jsonl(tmp_path / "fw.jsonl", fineweb_records()[:50])
    run_prepare(tmp_path / "fw.jsonl", tmp_path / "out", shard_tokens=20000, val_tokens=1000, num_proc=1)
    with pytest.raises(UserError, match=r"other settings \(shard_tokens=20000 there, 30000 now\); use another"):
        run_prepare(tmp_path / "fw.jsonl", tmp_path / "out", shard_tokens=30000, val_tokens=1000, num_proc=1)


def test_a_damaged_folder_is_refused_and_foreign_files_are_kept(tmp_path):
    write_jsonl(tmp_path / "fw.jsonl", fineweb_records())
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.tmp.txt").write_text("mine")  # ".tmp" in a name the preparation did not write
    (out / "train_000001.bin.tmp123").write_bytes(b"left by a killed run")
    state = run_prepare(tmp_path / "fw.jsonl", out, shard_tokens=5000, val_tokens=2000, num_proc=1)
    assert (out / "notes.tmp.txt").read_text() == "mine" and not (out / "train_000001.bin.tmp123").exists()
    assert state["train"]["shards"] >= 3
    os.remove(out / "train_000001.bin")
    with pytest.raises(ShardError, match=r"1 of the \d+ train shards prepared in .* are missing \(train_000001"):
        list_shards(str(out), "train")
    with pytest.raises(UserError, match="train shards prepared in .* are missing"):  # not "already complete"
        run_prepare(tmp_path / "fw.jsonl", out, shard_tokens=5000, val_tokens=2000, num_proc=1)
    (out / "train_000002.bin").write_bytes((out / "train_000002.bin").read_bytes()[:501])
    with pytest.raises(ShardError, match=r"501 bytes, shorter than its 1024-byte header: prepare the data again"):
        read_header(str(out / "train_000002.bin"))


@pytest.mark.slow
def test_killed_prep_resumes_to_identical_shards(tmp_path):
    reviews = zip_texts("movie_reviews.zip", 300)
    records = [{"text": t, "id": f"review-{i}"} for i, t in enumerate(reviews)]
    write_jsonl(tmp_path / "reviews.jsonl", records)
    settings = ["--shard_tokens=5000", "--val_tokens=20000", "--num_proc=2"]
    cmd = [sys.executable, os.path.join(ROOT, "prepare_fineweb.py"), f"--source={tmp_path / 'reviews.jsonl'}"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd + [f"--data_dir={killed}"] + settings, cwd=ROOT, env=os.environ.copy(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while not (killed / "train_000012.bin").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the prep and its tokenizer workers, with no chance to clean up
    proc.wait()
    with open(killed / PREPARE_STATE, "rb") as f:
        assert not json.loads(f.readline())["done"], "the kill came too late to test a resume"
    with pytest.raises(ShardError, match="is unfinished.*run the same prepare_fineweb.py command again"):
        list_shards(str(killed), "train")  # what train.py checks first: it never trains on part of the data

    resumed = subprocess.run(cmd + [f"--data_dir={killed}"] + settings, cwd=ROOT, env=os.environ.copy(),
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after" in resumed.stdout
    run_prepare(tmp_path / "reviews.jsonl", tmp_path / "clean", shard_tokens=5000, val_tokens=20000, num_proc=1)
    clean_files = sorted(p.name for p in (tmp_path / "clean").iterdir())
    assert clean_files == sorted(p.name for p in killed.iterdir())
    assert len(clean_files) > 40  # the kill came after shard 12: about midway
    for name in clean_files:
        assert (tmp_path / "clean" / name).read_bytes() == (killed / name).read_bytes(), name

    # on finished data it does nothing
    before = {p.name: p.stat().st_mtime_ns for p in killed.iterdir()}
    again = subprocess.run(cmd + [f"--data_dir={killed}"] + settings, cwd=ROOT, env=os.environ.copy(),
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert before == {p.name: p.stat().st_mtime_ns for p in killed.iterdir()}


@pytest.mark.slow
def test_unreachable_hub_dataset_says_what_to_do(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")  # the same failure as no network, without waiting for retries
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "prepare_fineweb.py"), "--source=gptkit-test/no-such-data",
                           f"--data_dir={tmp_path / 'out'}", "--max_tokens=1000"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "error: could not open 'gptkit-test/no-such-data'" in proc.stderr and "--source=path/to/folder" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_next_command_keeps_the_recipe(tmp_path):
    """The printed next step trains with the recipe the data was prepared with, not train.py's 124M defaults."""
    write_jsonl(tmp_path / "fw.jsonl", fineweb_records())
    cmd = [sys.executable, os.path.join(ROOT, "prepare_fineweb.py"), "config/tiny_cpu.py", f"--source={tmp_path / 'fw.jsonl'}",
           f"--data_dir={tmp_path / 'my data'}", "--val_tokens=2000", "--num_proc=1"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("next: "))
    assert shlex.split(line[len("next: "):]) == ["python", "train.py", "config/tiny_cpu.py",
                                                  f"--data_dir={tmp_path / 'my data'}"]


def test_mixed_shards_are_refused_and_hints_name_the_recorded_settings(tmp_path):
    write_jsonl(tmp_path / "fw.jsonl", fineweb_records())
    out = tmp_path / "out"
    run_prepare(tmp_path / "fw.jsonl", out, shard_tokens=5000, val_tokens=2000, num_proc=1)
    redo = (f"`python prepare_fineweb.py --source={tmp_path / 'fw.jsonl'} --subset=sample-10BT --shard_tokens=5000 "
            f"--val_tokens=2000 --max_tokens=0 --data_dir={out}`")
    # a shard another preparation wrote over one of these (the same name, other contents)
    other = np.full(1234, 11, dtype=np.uint16)
    other[0] = EOT
    write_shard(str(out / "train_000001.bin"), other)
    with pytest.raises(ShardError, match=r"the train shards of .* hold [\d,]+ tokens, not the [\d,]+ its preparation "
                                         r"recorded") as refused:
        list_shards(str(out), "train")  # what train.py checks before it trains
    assert redo in str(refused.value)  # the settings it was made with, not another recipe
    (out / "train_000000.bin").write_bytes(b"\0" * 2000)
    with pytest.raises(ShardError, match="magic number") as bad:
        read_header(str(out / "train_000000.bin"))
    assert redo in str(bad.value)
    # a folder prepare_fineweb.py did not make: a generic hint, naming no recipe
    with pytest.raises(ShardError, match=r"prepare the data first with `python prepare_fineweb.py "
                                         r"--source=YOUR_TEXTS --data_dir=\S*nothing`"):
        list_shards(str(tmp_path / "nothing"), "train")


def test_records_without_text_are_counted_and_too_many_fail(tmp_path):
    records = fineweb_records()[:300]
    for r in records[10:13]:
        del r["text"]  # three records without text among ones that have it
    write_jsonl(tmp_path / "some.jsonl", records)
    state = run_prepare(tmp_path / "some.jsonl", tmp_path / "some", shard_tokens=5000, val_tokens=2000, num_proc=1)
    assert state["records_without_text"] == 3
    for r in records[20:60]:
        r.pop("text", None)  # 40 of 300: past the 1% a source may lack
    write_jsonl(tmp_path / "many.jsonl", records)
    with pytest.raises(UserError, match=r"1\d of the first \d+ records of .*many.jsonl have no 'text'"):
        run_prepare(tmp_path / "many.jsonl", tmp_path / "many", shard_tokens=5000, val_tokens=2000, num_proc=1)


@pytest.mark.slow
def test_tokenizer_workers_die_with_a_killed_prepare(tmp_path):
    # 8 x 65 documents of 12 speeches each (380 KB): two chunks of 256, ~24M tokens that keep each
    # worker busy for seconds after the kill (5 s on a free core), far past the bound below
    texts = zip_texts("state_union.zip", 66)
    documents = ["\n\n".join(texts[(i + j) % len(texts)] for j in range(12)) for i in range(len(texts))]
    write_jsonl(tmp_path / "speeches.jsonl", [{"text": t} for _ in range(8) for t in documents])
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "prepare_fineweb.py"), f"--source={tmp_path}/speeches.jsonl",
                             f"--data_dir={tmp_path / 'out'}", "--num_proc=2"],
                            cwd=ROOT, env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    # Any process or thread read below can end between listing it and opening its /proc file:
    # every read treats a vanished one as "not there", never as an error.
    def proc_text(path, mode="r"):
        try:
            with open(path, mode) as f:
                return f.read()
        except (FileNotFoundError, ProcessLookupError):
            return None

    def cpu_seconds(pid):  # utime + stime of a process, in clock ticks (0 once it is gone)
        stat = proc_text(f"/proc/{pid}/stat")
        fields = stat.rsplit(")", 1)[1].split() if stat else [0] * 13
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def forked(pid):  # a pool worker: a fork of the prepare, with its command line
        cmdline = proc_text(f"/proc/{pid}/cmdline", "rb")
        return cmdline is not None and cmdline == proc_text(f"/proc/{proc.pid}/cmdline", "rb")

    def children(pid):  # the children of every thread of pid: a pool's workers hang off its threads
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            return []
        return [int(child) for task in tasks for child in (proc_text(f"/proc/{pid}/task/{task}/children") or "").split()]

    workers, deadline = set(), time.time() + 60
    while time.time() < deadline and proc.poll() is None:  # until both workers are busy tokenizing
        workers.update(pid for pid in children(proc.pid) if forked(pid))
        if len(workers) == 2 and all(cpu_seconds(pid) > 0.3 for pid in workers):
            break
        time.sleep(0.05)
    assert len(workers) == 2 and proc.poll() is None, "the prepare was not tokenizing on its workers"
    os.kill(proc.pid, signal.SIGKILL)  # the parent alone: its workers get no signal from us
    killed_at = time.time()
    proc.wait()

    def running(pid):  # a dead worker's zombie lingers until it is reaped: that is not running
        stat = proc_text(f"/proc/{pid}/stat")
        return stat is not None and stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")

    while any(running(pid) for pid in workers) and time.time() < killed_at + 20:
        time.sleep(0.02)
    # left alone they would finish their chunks (seconds more) and then fail writing to the dead
    # parent; killed with it they are gone at once (the bound leaves room for a loaded machine)
    assert time.time() - killed_at < 2.0, "the workers outlived their parent"
    assert "BrokenPipeError" not in proc.stderr.read()
