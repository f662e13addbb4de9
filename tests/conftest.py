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


def shared_data(*parts):
    """Path of a file in ../shared/data; skips the test when that folder is absent."""
    path = os.path.join(SHARED_DATA, *parts)
    if not os.path.exists(path):
        pytest.skip(f"shared data not present: {path}")
    return path


@pytest.fixture
def tiny_config():
    from model import GPTConfig
    return GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=50304, bias=False, dropout=0.0)
