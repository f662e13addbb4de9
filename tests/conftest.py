import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
sys.path.insert(0, ROOT)

# Offline tokenizer: tiktoken reads the GPT-2 files from this cache instead of downloading them.
_cache = os.path.join(SHARED_DATA, "tiktoken_cache")
if os.path.isdir(_cache) and "TIKTOKEN_CACHE_DIR" not in os.environ:
    os.environ["TIKTOKEN_CACHE_DIR"] = _cache

os.environ.setdefault("WANDB_MODE", "offline")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: an end-to-end run (a script as a subprocess, training, a browser); "
                                       "`-m \"not slow\"` is the fast tier")


def shared_data(*parts):
    """Path of a file in ../shared/data; skips the test when that folder is absent."""
    path = os.path.join(SHARED_DATA, *parts)
    if not os.path.exists(path):
        pytest.skip(f"shared data not present: {path}")
    return path


def shakespeare_shards(path, chars):
    """Train/val shards (val: the last tenth) of the first `chars` characters of tiny Shakespeare,
    written directly, GPT-2's tokens (no prepare run) -> path as a str."""
    import numpy as np
    from gptkit.data import write_shard
    from gptkit.tokenizer import EOT, load_tokenizer
    with open(shared_data("pretrain", "tinyshakespeare", "input.txt"), encoding="utf-8") as f:
        ids = np.array([EOT] + load_tokenizer("gpt2").encode(f.read()[:chars]), dtype=np.uint16)
    cut = len(ids) * 9 // 10
    write_shard(str(path / "train_000000.bin"), ids[:cut])
    write_shard(str(path / "val_000000.bin"), ids[cut:])
    return str(path)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(folder, Tokenizer) of a byte-level BPE of 512 ids that train_tokenizer.py trained on a book."""
    import train_tokenizer
    from gptkit.configurator import load_config
    from gptkit.tokenizer import load_tokenizer
    out = tmp_path_factory.mktemp("tok512")
    train_tokenizer.main(load_config(train_tokenizer.TokenizerConfig, [
        f"--source={shared_data('pretrain', 'gutenberg', 'clocasto-HaikuGenerator', 'pg11.txt')}",
        "--vocab_size=512", f"--out={out}"]))
    return str(out), load_tokenizer(str(out))


@pytest.fixture
def tiny_config():
    from model import GPTConfig
    return GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=50304, bias=False, dropout=0.0)


class Killed(BaseException):
    """A kill: the code under test stops on the spot (its cleanup still runs, as a kill leaves temporary files)."""


def kill_before_each_rename(monkeypatch, run, read, reset):
    """reset() then run(), killed before its 1st os.replace, then before its 2nd, ... until a run gets
    through -> [read() after each attempt]; the last is after the run that finished."""
    real_replace, outcomes = os.replace, []
    for kill_at in range(1, 100):
        reset()
        renames = []

        def replace(src, dst):
            renames.append(dst)
            if len(renames) == kill_at:
                raise Killed
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", replace)
        try:
            run()
            finished = True
        except Killed:
            finished = False
        monkeypatch.setattr(os, "replace", real_replace)
        outcomes.append(read())
        if finished:
            return outcomes
    raise AssertionError("the run never finished")
