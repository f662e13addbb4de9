"""
FineWeb-Edu (or local parquet/jsonl/txt) -> token shards with a document-level train/val split.

    python prepare_fineweb.py config/fineweb_124m.py                      # stream sample-10BT from the hub
    python prepare_fineweb.py config/fineweb_124m.py --max_tokens=1e8     # a first try: stop after 100M tokens
    python prepare_fineweb.py --source=my_texts/ --data_dir=data/mine --val_tokens=1e6   # local files
    python prepare_fineweb.py --source=my_texts/ --data_dir=data/mine --tokenizer=tokenizers/mytext  # your own tokenizer

The hub dataset is read with `datasets` in streaming mode, so nothing is downloaded whole first.
`source` may instead be a local .parquet / .jsonl / .txt file or a folder of them (one kind per
folder), parquet and jsonl through the same streaming code path. Records need a `text` column; an
`id` column, when present, decides the split. A .txt file is one text, read in blocks (any size fits
in memory) and cut at paragraph breaks into documents of about 16K characters, so that a folder of a
few books still gets a val split of about val_tokens.

Each document is normalised (CRLF and lone CR -> LF, BOM dropped; empty documents skipped) and
preceded by <|endoftext|>. Documents picked by a stable hash go to val until it holds val_tokens, at
most 10% of the source; a source too small for any to be picked still gives its last one to val.
Output: <data_dir>/{train,val}_NNNNNN.bin of shard_tokens tokens each (the last one shorter), in
the format of gptkit/data.py, and with a trained tokenizer (--tokenizer=PATH, see train_tokenizer.py)
a copy of it, <data_dir>/tokenizer.json: train.py sizes the model from it.

Resumable: kill it at any moment and run the same command again; it finishes with exactly the shards
an uninterrupted run writes. On finished data it does nothing. Progress lives in
<data_dir>/prepare_state.bin (first line: JSON you can read with `head -1`).
"""

import codecs
import json
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass

import numpy as np

from gptkit.configurator import BaseConfig, UserError, configure, print_config
from gptkit.checkpoint import atomic_write, remove_temporaries
from gptkit.data import (PREPARE_STATE, list_shards, make_pool, normalize_line_ends,
                         resolve_num_proc, shard_path, text_vocab, tokenize_stream, write_shard)
from gptkit.lock import hold_folder, release_folder
from gptkit.system import print0, run_main
from gptkit.tokenizer import get_tokenizer, load_tokenizer, record_tokenizer, use_tokenizer

LOCAL_KINDS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}
HUB_SUBSET_TOKENS = {"sample-10BT": 10e9, "sample-100BT": 100e9, "sample-350BT": 350e9, "default": 1.3e12}
BYTES_PER_TOKEN = 4.0  # GPT-2 BPE on English prose: 3.3 (old English) to 4.7 (web text); only for estimates
VAL_OVERSAMPLE = 2.0   # see choose_val_split
VAL_MAX_SHARE = 0.1    # val never takes more than this share of the (estimated) source
MAX_NO_TEXT_SHARE = 0.01  # more records than this without a 'text' field: the source is not what it seems
TXT_PIECE_CHARS = 16_000  # .txt files are cut into documents of about this size (about 4K tokens)


@dataclass
class PrepareConfig(BaseConfig):
    source: str = "HuggingFaceFW/fineweb-edu"  # hub dataset name, or a local file/folder of parquet, jsonl or txt
    subset: str = "sample-10BT"                # hub config: sample-10BT, sample-100BT, sample-350BT, default
    data_dir: str = "data/fineweb_edu"         # where the shards go
    shard_tokens: int = 100_000_000            # tokens per shard (200 MB of uint16)
    val_tokens: int = 10_485_760               # about this many tokens go to val (at most 10% of the source), chosen per document
    max_tokens: int = 0                        # stop after this many tokens in all (0: the whole source)
    num_proc: int = 0                          # tokenizer processes; 0: all cores
    tokenizer: str = "gpt2"                    # gpt2, or the folder of a tokenizer train_tokenizer.py made

    def validate(self):
        problems = super().validate()
        from gptkit.tokenizer import tokenizer_problems
        problems += tokenizer_problems(self.tokenizer)
        if self.shard_tokens < 1:
            problems.append(f"shard_tokens={self.shard_tokens}: must be at least 1 (100_000_000 is usual)")
        for key in ("max_tokens", "num_proc"):
            if getattr(self, key) < 0:
                problems.append(f"{key}={getattr(self, key)}: must be 0 or more")
        if self.val_tokens < 1:
            problems.append(f"val_tokens={self.val_tokens}: train.py evaluates on a val split, so it needs one "
                            "(10_485_760 is usual; a small source gets at most 10% of its tokens)")
        if is_local(self.source) and not os.path.exists(self.source):
            problems.append(f"source={self.source!r} does not exist: give an existing parquet/jsonl/txt file "
                            "or folder, or a hub dataset name such as HuggingFaceFW/fineweb-edu")
        return problems


def is_local(source):
    """A path on this machine, or a hub name? Existing paths and things that look like paths are local."""
    return (os.path.exists(source) or source.startswith((".", "/", "~")) or source.endswith(("/", os.sep))
            or os.path.splitext(source)[1].lower() in LOCAL_KINDS)


def local_files(source):
    """-> (datasets builder name, sorted list of files) for a local file or folder."""
    if os.path.isfile(source):
        paths = [source]
    else:
        paths = sorted(os.path.join(dirpath, name) for dirpath, dirnames, names in os.walk(source)
                       for name in names if not name.startswith("."))
        paths = [p for p in paths if os.path.splitext(p)[1].lower() in LOCAL_KINDS]
        if not paths:
            raise UserError(f"folder {source} holds no .parquet, .jsonl or .txt files: point source at "
                             "a folder (or file) of documents")
    kinds = {LOCAL_KINDS.get(os.path.splitext(p)[1].lower()) for p in paths}
    if None in kinds:
        raise UserError(f"cannot read {source}: use a .parquet, .jsonl or .txt file")
    if len(kinds) > 1:
        raise UserError(f"folder {source} mixes {', '.join(sorted(kinds))} files: keep one kind per folder")
    return kinds.pop(), paths


def open_records(cfg):
    """-> iterator of (id or None, text), in the source's order: .txt files read here in blocks, the
    rest through datasets' streaming mode."""
    if is_local(cfg.source):
        builder, files = local_files(cfg.source)
        if builder == "text":
            for path in files:
                for piece in txt_pieces(path):
                    yield None, piece
            return
    from datasets import load_dataset
    if is_local(cfg.source):
        ds = load_dataset(builder, data_files=files, split="train", streaming=True)
    else:
        builder, files = None, []
        try:
            ds = load_dataset(cfg.source, name=cfg.subset or None, split="train", streaming=True)
        except Exception as e:  # no network, a misspelt name or subset
            raise UserError(f"could not open {cfg.source!r} (subset {cfg.subset!r}) on the Hugging Face hub "
                             f"({type(e).__name__}: {e}). Check the name, the subset and the network, or prepare "
                             "local files: --source=path/to/folder of parquet, jsonl or txt files") from e
    try:
        for number, record in enumerate(ds):
            text = record.get("text")
            if "text" not in record or not isinstance(text, (str, type(None))):
                raise UserError(f"record {number} of {cfg.source} has no 'text' string (fields: "
                                 f"{ {k: type(v).__name__ for k, v in record.items()} }); give a source whose "
                                 "documents are strings in a 'text' column")
            yield record.get("id"), text  # None: this record has no text (other records gave the column)
    except UserError:
        raise
    except Exception as e:  # datasets names neither the file nor the fix: find them
        found = unreadable_file(builder, files) if builder else None
        where, why = found or (cfg.source, f"{type(e).__name__}: {str(e)[:300]}")
        raise UserError(f"reading {where} failed: {why}. Fix or remove it, then run the same command "
                         "again: it goes on from the last shard written") from e


def unreadable_file(builder, files):
    """-> (path, reason) for the first local file that cannot be read, or None. Called only after the
    reader failed, so reading every file again costs nothing in a normal run."""
    import pyarrow.parquet as pq
    for path in files:
        try:
            if builder == "parquet":
                pq.ParquetFile(path).read(columns=["text"])
            elif path.endswith(".json"):
                with open(path, "rb") as f:
                    json.loads(f.read().decode("utf-8"))
            else:
                with open(path, encoding="utf-8") as f:
                    for number, line in enumerate(f, 1):
                        if line.strip():
                            try:
                                json.loads(line)
                            except ValueError as e:
                                return path, f"line {number} is not valid JSON ({e})"
        except UnicodeDecodeError as e:
            return path, (f"it is not UTF-8 text (byte {e.start}); convert it, for example with "
                          "iconv -f cp1252 -t utf-8")
        except Exception as e:
            return path, f"the file is truncated or not valid {builder} ({type(e).__name__}: {str(e)[:200]})"
    return None


def cut_after(text, start, size):
    """Where the piece of text that begins at start ends: after the first paragraph break past
    start + size, else after a line end, else at start + 4 x size. Looks at text[start:start + 4 x size]
    only, so cutting a huge text takes linear time and a text read in blocks is cut as the whole."""
    longest = start + 4 * size
    cut = text.find("\n\n", start + size, longest) + 2
    if not start + size < cut <= longest:
        cut = text.find("\n", start + size, longest) + 1
        if not start + size < cut <= longest:
            cut = longest
    return cut


def text_pieces(text, size=TXT_PIECE_CHARS):
    """A long text (a book) -> consecutive pieces of at least `size` characters that join back into it
    (cut_after says where). A whole book as one document would land in train or in val entirely."""
    pieces, start = [], 0
    while len(text) - start > size:
        cut = cut_after(text, start, size)
        pieces.append(text[start:cut])
        start = cut
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def txt_pieces(path, size=TXT_PIECE_CHARS, block=1 << 20):
    """A .txt file -> the text_pieces of its normalised text (a file of nothing but white space: none),
    read in blocks of `block` bytes, so that a file of any size needs a few MB of memory."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    buffer, held, offset, at_start, any_text = "", "", 0, True, False
    with open(path, "rb") as f:
        while True:
            data = f.read(block)
            try:
                text = held + decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                raise UserError(f"reading {path} failed: it is not UTF-8 text (near byte {offset + e.start}); "
                                "convert it, for example with iconv -f cp1252 -t utf-8, then run the same command "
                                "again: it goes on from the last shard written") from e
            if at_start and text:  # the first character decoded (a BOM is 3 bytes: maybe not in the first block)
                text, at_start = text.removeprefix("\ufeff"), False
            offset += len(data)
            held = "\r" if data and text.endswith("\r") else ""  # maybe the first half of a CRLF
            buffer += normalize_line_ends(text[:len(text) - len(held)])
            any_text = any_text or bool(buffer.strip())
            start = 0
            while len(buffer) - start >= 4 * size:  # enough text to cut where the whole file is cut
                cut = cut_after(buffer, start, size)
                yield buffer[start:cut]
                start = cut
            buffer = buffer[start:]
            if not data:
                break
    if any_text:
        yield from text_pieces(buffer, size)


def estimate_source_tokens(cfg):
    """A rough token count of the whole source, for the progress bar and the val probability."""
    if not is_local(cfg.source):
        return HUB_SUBSET_TOKENS.get(cfg.subset)
    builder, files = local_files(cfg.source)
    if builder == "parquet":
        import pyarrow.parquet as pq
        text_bytes = 0
        for path in files:  # the uncompressed size of the text column, from the footer only
            try:
                meta = pq.ParquetFile(path).metadata
            except Exception as e:
                raise UserError(f"cannot read {path} ({type(e).__name__}: {e}): the file is truncated or "
                                 "not parquet; download it again or remove it") from e
            for g in range(meta.num_row_groups):
                for c in range(meta.num_columns):
                    column = meta.row_group(g).column(c)
                    if column.path_in_schema == "text":
                        text_bytes += column.total_uncompressed_size
        return text_bytes / BYTES_PER_TOKEN
    return sum(os.path.getsize(p) for p in files) / BYTES_PER_TOKEN


def choose_val_split(cfg):
    """The split rule -> (p, limit): a document is a val candidate when its stable hash is below p, and
    candidates go to val until val holds limit tokens; after that every document goes to train.
    limit is val_tokens, or VAL_MAX_SHARE of the estimated source when that is less (a few books must
    not all land in val). Candidates are spread over the whole stream, not just its first documents.
    p is VAL_OVERSAMPLE times what an exact token estimate would need, so val still fills when the
    estimate is high, and the limit keeps val at limit (plus at most one document) when it is low.
    Both are stored with the progress, so a resumed run uses the same rule."""
    estimate = estimate_source_tokens(cfg)
    if cfg.max_tokens:
        estimate = min(estimate or cfg.max_tokens, cfg.max_tokens)
    if not estimate:
        return 0.01, cfg.val_tokens  # an unknown hub dataset: 1%, up to val_tokens
    limit = max(1, min(cfg.val_tokens, int(VAL_MAX_SHARE * estimate)))
    return min(1.0, VAL_OVERSAMPLE * limit / estimate), limit


class SplitWriter:
    """Fills shard_tokens-sized buffers for one split and writes each as it fills."""

    def __init__(self, data_dir, split, shard_tokens, state, partial):
        self.data_dir, self.split = data_dir, split
        self.buffer = np.empty(shard_tokens, dtype=np.uint16)
        self.fill = len(partial)
        self.buffer[:self.fill] = partial
        self.shards, self.tokens, self.docs = state["shards"], state["tokens"], state["docs"]

    def add(self, tokens):
        """Append one document (it may straddle shards); -> True when a shard was written."""
        self.tokens += len(tokens)
        self.docs += 1
        wrote = False
        while len(tokens):
            n = min(len(tokens), len(self.buffer) - self.fill)
            self.buffer[self.fill:self.fill + n] = tokens[:n]
            self.fill += n
            tokens = tokens[n:]
            if self.fill == len(self.buffer):
                self.flush()
                wrote = True
        return wrote

    def flush(self):
        if self.fill:
            shard, tok = self.buffer[:self.fill], get_tokenizer()
            write_shard(shard_path(self.data_dir, self.split, self.shards), shard,
                        n_docs=int(np.count_nonzero(shard == tok.eot)), n_vocab=text_vocab(tok))
            self.shards += 1
            self.fill = 0

    def state(self):
        return {"shards": self.shards, "tokens": self.tokens, "docs": self.docs, "partial": self.fill}


def save_state(path, state, writers):
    """One file holds the counters (JSON, first line) and the unwritten tail of each split's buffer,
    replaced atomically: a kill leaves either the old state or the new one, never a mix."""
    header = (json.dumps(state) + "\n").encode()
    atomic_write(path, lambda f: f.writelines([header] + [w.buffer[:w.fill].tobytes() for w in writers]))


def load_state(path):
    with open(path, "rb") as f:
        state = json.loads(f.readline())
        partial = np.frombuffer(f.read(), dtype=np.uint16)
    n_train = state["train"]["partial"]
    return state, partial[:n_train], partial[n_train:]


def prepare(cfg, recipes=()):
    """Write the shards of cfg -> the progress state. recipes: the config files given, for the hint at the end."""
    state_path = os.path.join(cfg.data_dir, PREPARE_STATE)
    settings = {k: getattr(cfg, k) for k in ("source", "subset", "shard_tokens", "val_tokens", "max_tokens")}
    hold_folder(cfg.data_dir)  # one writer: two preparations at once would mix their shards
    tok = use_tokenizer(load_tokenizer(cfg.tokenizer))  # loaded once here, inherited by the tokenizer workers
    if tok.hash != "gpt2":  # folders prepared before tokenizers were recorded still resume
        settings["tokenizer"] = tok.hash
    record_tokenizer(cfg.data_dir, tok)
    remove_temporaries(cfg.data_dir, rf"(train|val)_\d{{6}}\.bin|{re.escape(PREPARE_STATE)}")  # of a killed run
    if os.path.exists(state_path):
        state, train_partial, val_partial = load_state(state_path)
        if state["settings"] != settings:
            raise UserError(f"{cfg.data_dir} holds a preparation with other settings {state['settings']}; "
                             f"use another data_dir, or delete {cfg.data_dir} to start over")
        if state["done"]:
            for split in ("train", "val"):
                list_shards(cfg.data_dir, split)  # every shard still there, each the size prepared
            print0(f"{cfg.data_dir} is already complete: {state['train']['shards']} train and "
                   f"{state['val']['shards']} val shards; nothing to do")
            release_folder(cfg.data_dir)
            return state
        print0(f"resuming after {state['records']:,} documents ({state['train']['tokens'] + state['val']['tokens']:,} tokens)")
    else:
        if any(name.endswith(".bin") for name in os.listdir(cfg.data_dir)):
            raise UserError(f"{cfg.data_dir} holds shards that this script did not start (no {PREPARE_STATE}); "
                             "use an empty data_dir")
        empty = {"shards": 0, "tokens": 0, "docs": 0, "partial": 0}
        p_val, val_limit = choose_val_split(cfg)
        state = {"settings": settings, "val_probability": p_val, "val_limit": val_limit, "records": 0,
                 "train": dict(empty), "val": dict(empty), "done": False}
        train_partial = val_partial = np.empty(0, dtype=np.uint16)
    train = SplitWriter(cfg.data_dir, "train", cfg.shard_tokens, state["train"], train_partial)
    val = SplitWriter(cfg.data_dir, "val", cfg.shard_tokens, state["val"], val_partial)
    p_val, records_done = state["val_probability"], state["records"]
    val_limit = state.get("val_limit", cfg.val_tokens)  # progress saved before the limit existed: val_tokens
    print0(f"val: documents with hash < {p_val:.4g} until val holds {val_limit:,} tokens"
           + (f" ({VAL_MAX_SHARE:.0%} of the source's estimated size; val_tokens={cfg.val_tokens:,})"
              if val_limit < cfg.val_tokens else ""))

    def checkpoint():
        state.update(records=records_done, train=train.state(), val=val.state())
        save_state(state_path, state, [train, val])

    num_proc = resolve_num_proc(cfg.num_proc)
    pool = make_pool(num_proc) if num_proc > 1 else None  # before datasets starts any thread
    records = open_records(cfg)
    for _ in range(records_done):  # documents already in shards or in the saved partial buffers
        if next(records, None) is None:
            raise UserError(f"the source has fewer documents than {cfg.data_dir} already consumed: it "
                             f"changed since the preparation began; delete {cfg.data_dir} to start over")
    from tqdm import tqdm
    estimate = estimate_source_tokens(cfg)
    total = cfg.max_tokens or estimate
    done_tokens = train.tokens + val.tokens
    bar = tqdm(total=int(total) if total else None, initial=done_tokens, unit="tok", unit_scale=True,
               smoothing=0.05, disable=int(os.environ.get("RANK", 0)) != 0)
    start = time.time()
    finished = bool(cfg.max_tokens and done_tokens >= cfg.max_tokens)

    def place(split_hash, tokens, last):
        """Add one document to its split -> True when it is the last one max_tokens allows."""
        nonlocal records_done
        records_done += 1  # counted when placed: a resumed run skips exactly the placed documents
        if split_hash is None:
            count_without_text()
        if not len(tokens):
            return False  # an empty document
        tokens_after = train.tokens + val.tokens + len(tokens)
        last = last or bool(cfg.max_tokens and tokens_after >= cfg.max_tokens)
        to_val = split_hash < p_val and val.tokens < val_limit
        # a small source whose documents all hashed into train: its last document keeps val from being empty
        to_val = to_val or (last and not val.tokens and train.tokens > 0)
        if (val if to_val else train).add(tokens):
            checkpoint()  # a shard was written: record the position that goes with it
        bar.update(len(tokens))
        return last

    def count_without_text():
        """A record without text (datasets gives None where a record lacks the column others have): counted,
        reported at the end, and past MAX_NO_TEXT_SHARE of the records an error, as the source is not what
        it seems."""
        state["records_without_text"] = without = state.get("records_without_text", 0) + 1
        if without > 10 and without > MAX_NO_TEXT_SHARE * records_done:
            raise UserError(f"{without:,} of the first {records_done:,} records of {cfg.source} have no 'text' (more "
                            f"than {MAX_NO_TEXT_SHARE:.0%}): check that its documents are in a 'text' field; fix "
                            f"the source, delete {cfg.data_dir} and prepare again")

    # documents are placed one behind the reader, so the last one of the stream is known as the last
    pending = None
    try:
        for chunk in ([] if finished else tokenize_stream(records, 1, pool=pool)):
            for document in chunk:
                if pending is not None and place(*pending, last=False):
                    finished = True
                    break
                pending = document
            bar.set_postfix(docs=f"{train.docs + val.docs:,}", refresh=False)
            if finished:
                break
        if pending is not None and not finished:
            place(*pending, last=True)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    train.flush()
    val.flush()
    state["done"] = True
    checkpoint()
    elapsed = time.time() - start
    if state.get("records_without_text"):
        print0(f"note: {state['records_without_text']:,} records of {cfg.source} had no 'text' and were skipped")
    print0(f"done: train {train.tokens:,} tokens in {train.docs:,} documents ({train.shards} shards), "
           f"val {val.tokens:,} tokens in {val.docs:,} documents ({val.shards} shards), in {elapsed:.0f}s")
    for split, writer in (("train", train), ("val", val)):
        if not writer.tokens:  # train.py would refuse the folder: say so now, not at the start of training
            more = (f"raise max_tokens (max_tokens={cfg.max_tokens} stopped it)"
                    if cfg.max_tokens and train.tokens + val.tokens >= cfg.max_tokens else "prepare more documents")
            raise UserError(f"no document went to {split} ({train.docs + val.docs:,} documents in all), "
                             f"and training needs both splits: delete {cfg.data_dir} and {more}")
    # with the same recipe: without it train.py would start its 124M defaults on this data
    print0(f"next: python train.py {shlex.join(list(recipes) + [f'--data_dir={cfg.data_dir}'])}")
    release_folder(cfg.data_dir)  # (on an error it is released when the process ends)
    return state


if __name__ == "__main__":
    cfg = configure(PrepareConfig)
    print_config(cfg)
    # a bad source or data folder: one `error:` line, exit code 2
    run_main(prepare, cfg, [arg for arg in sys.argv[1:] if arg.endswith(".py") and not arg.startswith("--")],
             on_interrupt="the shards written so far are kept; run the same command again to go on")
