import pytest

from gptkit.tokenizer import (ASSISTANT, END, EOT, SPECIAL_TOKENS, SYSTEM, USER, StreamDecoder,
                              load_tokenizer)


def test_gpt2_encoding():
    tok = load_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.decode([15496, 995]) == "Hello world"


def test_special_tokens_in_padded_slots():
    assert sorted(SPECIAL_TOKENS.values()) == [50257, 50258, 50259, 50260]
    assert all(50257 <= i < 50304 for i in SPECIAL_TOKENS.values())


def test_user_text_never_becomes_a_control_token():
    tok = load_tokenizer("gpt2")
    for text in ["<|assistant|>", "hi <|end|> there <|system|><|user|>", "<|endoftext|>"]:
        ids = tok.encode(text)
        assert not set(ids) & (set(SPECIAL_TOKENS.values()) | {EOT})
        assert tok.decode(ids) == text
    ids, mask = tok.render_conversation([{"role": "user", "content": "say <|assistant|> please"}])
    assert ids.count(ASSISTANT) == 0


def test_render_conversation_and_mask():
    tok = load_tokenizer("gpt2")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    ]
    ids, mask = tok.render_conversation(messages)
    assert len(ids) == len(mask)
    expected = ([EOT, SYSTEM] + tok.encode("Be brief.") + [END] + [USER] + tok.encode("Hi") + [END]
                + [ASSISTANT] + tok.encode("Hello!") + [END] + [USER] + tok.encode("Bye") + [END]
                + [ASSISTANT] + tok.encode("Goodbye.") + [END])
    assert ids == expected
    learned = [i for i, m in zip(ids, mask) if m]
    assert learned == tok.encode("Hello!") + [END] + tok.encode("Goodbye.") + [END]
    prompt = tok.render_prompt(messages[:2])
    assert prompt[-1] == ASSISTANT and prompt[:-1] == ids[:len(prompt) - 1]


def test_render_rejects_bad_roles():
    tok = load_tokenizer("gpt2")
    with pytest.raises(ValueError, match="role"):
        tok.render_conversation([{"role": "bot", "content": "x"}])


def test_stream_decoder_never_splits_characters():
    tok = load_tokenizer("gpt2")
    text = "naïve café 日本語 🙂 done"
    ids = tok.encode(text)
    dec = StreamDecoder(tok)
    pieces = [dec.feed(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_missing_tokenizer_files_error(tmp_path):
    import subprocess
    import sys
    import os
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(tmp_path), HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
    # offline, and without the copies gptkit ships (tests/test_offline.py: with them it works)
    code = "import gptkit.tokenizer as t; t.SHIPPED_GPT2 = 'nowhere'; t.Tokenizer()"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "TIKTOKEN_CACHE_DIR" in result.stderr and "gptkit's copies in nowhere could not be read" in result.stderr


# ----------------------------------------------------------------------------- trained tokenizers
# A 512-token BPE trained once on real text (CRLF books, a BOM, non-ASCII), shared by the tests below.

import glob
import os

import numpy as np

from conftest import shared_data
from gptkit.configurator import ConfigError, UserError, load_config
from gptkit.tokenizer import CONTROL_TOKENS, TokenizerError, check_same_tokenizer, load_tokenizer, record_tokenizer


def _read(path, limit=None):
    with open(path, encoding="utf-8", newline="") as f:  # newline="": CRLF and the BOM stay as they are
        return f.read(limit) if limit else f.read()


def test_trained_layout_and_padding(trained):
    out, tok = trained
    assert (tok.eot, tok.system, tok.user, tok.assistant, tok.end) == (0, 1, 2, 3, 4)
    assert tok.n_vocab == 512 and tok.vocab_size == 512 and tok.hash.startswith("bpe-")
    assert [tok.token_bytes(5 + i) for i in range(3)] != [b""] * 3  # the 256 bytes follow the control tokens
    assert sorted(tok.token_bytes(i) for i in range(5, 261)) == [bytes([b]) for b in range(256)]
    summary = open(os.path.join(out, "summary.txt"), encoding="utf-8").read()
    assert "bytes per token" in summary and "GPT-2" in summary and "<|end|> 4" in summary
    from gptkit.tokenizer import pad_vocab
    assert (pad_vocab(300), pad_vocab(512), pad_vocab(50261)) == (320, 512, 50304)


@pytest.mark.slow
def test_every_pretrain_file_round_trips_and_matches_tokenizers_library(trained):
    """Real text with CRLF line ends, a byte-order mark and non-ASCII characters: tiktoken with the
    trained ranks gives exactly the ids of the `tokenizers` library, and decodes back to the text."""
    from tokenizers import Tokenizer as HFTokenizer
    out, tok = trained
    reference = HFTokenizer.from_file(os.path.join(out, "tokenizer.json"))
    paths = sorted(glob.glob(os.path.join(shared_data("pretrain"), "**", "*.txt"), recursive=True))
    assert len(paths) >= 15
    texts = [_read(p, 100_000) for p in paths]  # the first 100K characters of each: the suite's time budget
    assert any("\r\n" in t for t in texts) and any(t.startswith("\ufeff") for t in texts)
    assert any(max(t) > "\x7f" for t in texts)
    ids = tok.encode_batch(texts, num_threads=2)
    expected = reference.encode_batch(texts, add_special_tokens=False)
    for path, text, ours, theirs in zip(paths, texts, ids, expected):
        assert ours == theirs.ids, path
        assert tok.decode(ours) == text, path
        assert min(ours) >= len(CONTROL_TOKENS), path  # text never yields a control token


def test_trained_control_token_text_stays_text(trained):
    _, tok = trained
    for text in ["<|assistant|>", "hi <|end|> there <|system|><|user|>", "<|endoftext|>"]:
        ids = tok.encode(text)
        assert min(ids) >= len(CONTROL_TOKENS) and tok.decode(ids) == text
    ids, mask = tok.render_conversation([{"role": "user", "content": "say <|assistant|> <|end|>"},
                                         {"role": "assistant", "content": "no"}])
    assert ids.count(tok.assistant) == 1 and ids.count(tok.end) == 2 and ids[:2] == [tok.eot, tok.user]


def test_training_is_deterministic(tmp_path):
    import train_tokenizer
    source = shared_data("pretrain", "gutenberg", "clocasto-HaikuGenerator", "pg5200.txt")
    files = []
    for run, pattern in (("a", "gpt4"), ("b", "gpt4"), ("c", "gpt2")):
        cfg = load_config(train_tokenizer.TokenizerConfig, [f"--source={source}", "--vocab_size=400",
                                                            f"--pattern={pattern}", f"--out={tmp_path / run}"])
        train_tokenizer.main(cfg)
        files.append((tmp_path / run / "tokenizer.json").read_bytes())
    assert files[0] == files[1]  # same text and settings: byte-identical
    assert files[0] != files[2]  # another split pattern: another tokenizer
    tok = load_tokenizer(str(tmp_path / "a"))
    text = _read(source, 20_000)
    assert tok.decode(tok.encode(text)) == text
    assert tok.enc._pat_str == train_tokenizer.PATTERNS["gpt4"]  # the encoder splits as the trainer did
    # the folder's one writer: released when done, and a folder another process holds is refused untouched
    from gptkit.lock import LOCK_NAME, FolderBusyError
    from test_lock import holder
    assert LOCK_NAME not in os.listdir(tmp_path / "a")
    with holder(tmp_path / "a") as proc:
        with pytest.raises(FolderBusyError, match=f"process {proc.pid} on"):
            train_tokenizer.main(load_config(train_tokenizer.TokenizerConfig, [
                f"--source={source}", "--vocab_size=300", f"--out={tmp_path / 'a'}"]))
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == files[0]


def test_bad_settings_name_the_key(tmp_path):
    import train_tokenizer
    for value in (100, 70_000):
        with pytest.raises(ConfigError, match="vocab_size"):
            load_config(train_tokenizer.TokenizerConfig, ["--source=.", f"--vocab_size={value}", "--out=x"])
    with pytest.raises(ConfigError, match="pattern"):
        load_config(train_tokenizer.TokenizerConfig, ["--source=.", "--pattern=gpt3", "--out=x"])
    (tmp_path / "empty.txt").write_text(" \n\n")
    cfg = load_config(train_tokenizer.TokenizerConfig, [f"--source={tmp_path / 'empty.txt'}", f"--out={tmp_path / 'o'}"])
    with pytest.raises(UserError, match="no text"):
        train_tokenizer.main(cfg)
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me ".encode("latin-1") * 100)
    cfg = load_config(train_tokenizer.TokenizerConfig, [f"--source={tmp_path / 'latin1.txt'}", f"--out={tmp_path / 'o'}"])
    with pytest.raises(UserError, match="latin1.txt.*not UTF-8"):
        train_tokenizer.main(cfg)
    assert not (tmp_path / "o" / "tokenizer.json").exists()


def test_missing_or_corrupt_tokenizer_file_is_a_clear_error(tmp_path, trained):
    with pytest.raises(TokenizerError, match="tokenizer=.*nowhere"):
        load_tokenizer(str(tmp_path / "nowhere"))
    from prepare_fineweb import PrepareConfig
    with pytest.raises(ConfigError, match="tokenizer="):
        load_config(PrepareConfig, ["--source=.", f"--tokenizer={tmp_path / 'nowhere'}"])
    bad = tmp_path / "bad.json"
    bad.write_text(open(os.path.join(trained[0], "tokenizer.json")).read()[:5000])  # cut short
    with pytest.raises(TokenizerError, match="bad.json"):
        load_tokenizer(str(bad))
    bad.write_bytes(b"\xff\xfe not json")
    with pytest.raises(TokenizerError, match="bad.json"):
        load_tokenizer(str(bad))


def test_data_folder_records_its_tokenizer_and_refuses_another(tmp_path, trained):
    from gptkit.data import write_shard
    from gptkit.tokenizer import data_tokenizer
    _, tok = trained
    gpt2 = load_tokenizer("gpt2")
    record_tokenizer(str(tmp_path), tok)
    assert data_tokenizer(str(tmp_path)).hash == tok.hash
    record_tokenizer(str(tmp_path), tok)  # the same again: fine
    with pytest.raises(TokenizerError, match=f"{tok.hash}.*not gpt2"):
        record_tokenizer(str(tmp_path), gpt2)
    old = tmp_path / "old"  # made before tokenizers were recorded: GPT-2
    old.mkdir()
    write_shard(str(old / "train_000000.bin"), np.arange(100))
    assert data_tokenizer(str(old)).hash == "gpt2"
    with pytest.raises(TokenizerError, match=f"gpt2, not .*{tok.hash}"):
        record_tokenizer(str(old), tok)
    with pytest.raises(TokenizerError, match=f"made with tokenizer gpt2.*uses tokenizer .*{tok.hash}"):
        check_same_tokenizer(gpt2, "data/x", tok, "out/y")


def test_padding_ids_of_a_trained_tokenizer_are_never_sampled(trained):
    import torch
    from gptkit.generate import generate
    from model import GPT, GPTConfig
    _, tok = trained
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=576), verbose=False).eval()
    model.lm_head.register_forward_hook(lambda m, i, logits: logits.index_fill(-1, torch.arange(512, 576), 1e4))
    sampled = list(generate(model, [tok.eot], 10, temperature=1.0, n_vocab=tok.n_vocab))
    assert len(sampled) == 10 and max(sampled) < 512


def test_train_tokenizer_skips_jsonl_records_without_text(tmp_path):
    """A jsonl record with no "text" field reads as None: the trainer skips it instead of crashing."""
    import json
    import train_tokenizer
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"text": "The river runs to the sea."}, {"title": "no text here"}, {"text": "A second document."}]) + "\n")
    cfg = load_config(train_tokenizer.TokenizerConfig, [f"--source={tmp_path / 'docs.jsonl'}", "--vocab_size=300",
                                                        f"--out={tmp_path / 'tok'}"])
    train, held = train_tokenizer.read_corpus(cfg)
    assert set(train + held) == {"A second document.", "The river runs to the sea."}
