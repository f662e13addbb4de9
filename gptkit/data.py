"""
Pretraining token shards and the batch loader that reads them.

A shard is <dir>/{train,val}_NNNNNN.bin: a header of 256 int32 followed by uint16 token ids.
The header follows llm.c, so shards made by llm.c or modded-nanogpt tooling load as they are:
    header[0] = 20240520  magic
    header[1] = 1         version (uint16 tokens)
    header[2] = number of tokens
    header[3] = vocabulary the ids come from: 50257 (GPT-2), a trained tokenizer's n_vocab; 0 in llm.c shards
    header[4] = number of documents (each begins with <|endoftext|>); 0 when unknown

    write_shard("data/x/train_000000.bin", tokens)   # n_vocab=tok.n_vocab for a trained tokenizer
    loader = PretrainLoader("data/x", "train", batch_size=16, block_size=1024, rank=0, world_size=1)
    x, y = loader.next_batch()                      # int64 (B, T); y is x shifted left by one
    state = loader.state_dict(); loader.load_state_dict(state)   # exact resume
    batches = val_batches("data/x", 16, 1024, eval_tokens=10_485_760)

Documents -> tokens (what prepare_fineweb.py writes into shards) is gptkit/documents.py's.
"""

import glob
import json
import os
import re
import shlex

import numpy as np
import torch

from gptkit.files import atomic_write
from gptkit.configurator import UserError
from gptkit.tokenizer import GPT2_VOCAB, MAX_VOCAB

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAGIC = 20240520
VERSION = 1
PREPARE_STATE = "prepare_state.bin"  # prepare_fineweb.py's progress, beside the shards it writes


class ShardError(UserError, ValueError):
    """A missing, truncated or corrupt shard; the message names the file and what to do."""


def shard_path(data_dir, split, index):
    return os.path.join(data_dir, f"{split}_{index:06d}.bin")


def write_shard(path, tokens, n_docs=0, n_vocab=GPT2_VOCAB):
    """Write tokens (ids < n_vocab: GPT-2's text ids by default) as a shard, atomically."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"write_shard({path}): tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= n_vocab):
        raise ValueError(f"write_shard({path}): token ids must lie in [0, {n_vocab}), "
                         f"got {int(tokens.min())}..{int(tokens.max())}")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[0], header[1], header[2], header[3], header[4] = MAGIC, VERSION, tokens.size, n_vocab, n_docs
    atomic_write(path, lambda f: f.writelines([header.tobytes(), tokens.astype(np.uint16, copy=False).tobytes()]))


def prepare_hint(data_dir):
    """The prepare_fineweb.py command that makes data_dir: with the settings its preparation recorded,
    or, for a folder prepared some other way (or not yet), a generic one."""
    try:
        settings = (read_prepare_state(data_dir) or {}).get("settings")
    except ShardError:
        settings = None
    if not settings:
        return f"python prepare_fineweb.py --source=YOUR_TEXTS --data_dir={data_dir}"
    # a trained tokenizer is recorded by its hash: the hint asks for its file
    args = [f"--{key}={'YOUR_TOKENIZER' if key == 'tokenizer' else value}" for key, value in settings.items()]
    return "python prepare_fineweb.py " + shlex.join(args + [f"--data_dir={data_dir}"])


def text_vocab(tok):
    """The vocabulary a tokenizer's shards are written for: GPT-2's 50257 (its chat tokens lie above,
    never in pretraining text), or a trained tokenizer's n_vocab (its chat tokens are ids 1-4)."""
    return GPT2_VOCAB if tok.hash == "gpt2" else tok.n_vocab


def redo_advice(path):
    """What to do about a bad shard: a single shard cannot be rebuilt, its whole folder is prepared again."""
    data_dir = os.path.dirname(path) or "."
    return f"prepare the data again: delete (or move) {data_dir} and run `{prepare_hint(data_dir)}`"


def read_header(path):
    """Check a shard's header and size (cheap: reads 1 KB) -> its header as an int32 array."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
    except OSError as e:
        raise ShardError(f"cannot read shard {path}: {e.strerror}")
    if len(head) < HEADER_BYTES:
        raise ShardError(f"shard {path} is {size} bytes, shorter than its {HEADER_BYTES}-byte header: "
                         f"{redo_advice(path)}")
    header = np.frombuffer(head, dtype=np.int32)
    if header[0] != MAGIC:
        raise ShardError(f"shard {path} has magic number {header[0]}, expected {MAGIC}: it is not a "
                         f"token shard of this format (llm.c layout); {redo_advice(path)}")
    if header[1] != VERSION:
        raise ShardError(f"shard {path} has version {header[1]}, expected {VERSION} (uint16 tokens; "
                         f"version 2 is llm.c's uint32 LLaMA-3 format, which this GPT-2 model cannot use); {redo_advice(path)}")
    n_tokens = int(header[2])
    expected = HEADER_BYTES + 2 * n_tokens
    if n_tokens < 0 or size != expected:
        raise ShardError(f"shard {path} is {size} bytes but its header announces {n_tokens} tokens "
                         f"({expected} bytes): the file is truncated or corrupt; {redo_advice(path)}")
    if not 0 <= header[3] <= MAX_VOCAB:
        raise ShardError(f"shard {path} was written for a vocabulary of {header[3]} tokens, more than uint16 ids "
                         f"hold; {redo_advice(path)}")
    return header.copy()


def shard_vocab(header):
    """The ids a shard may hold lie below this (llm.c's shards leave the slot 0: GPT-2)."""
    return int(header[3]) or GPT2_VOCAB


def open_shard(path, n_tokens):
    """A read-only memmap of a shard's tokens (header already checked). Cheap to make and to drop."""
    return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


def load_shard(path):
    """Fully validated memmap of a shard's uint16 tokens: header, length and every token id."""
    header = read_header(path)
    tokens, vocab = open_shard(path, int(header[2])), shard_vocab(header)
    if tokens.size and int(tokens.max()) >= vocab:
        where = int(np.argmax(tokens >= vocab))
        raise ShardError(f"shard {path} holds token id {int(tokens[where])} at position {where}, outside "
                         f"its vocabulary of {vocab}: the file is corrupt or was made with another "
                         f"tokenizer; {redo_advice(path)}")
    return tokens


def read_prepare_state(data_dir):
    """The progress prepare_fineweb.py keeps in <data_dir>/prepare_state.bin (its first line is JSON),
    or None for shards made some other way (llm.c, modded-nanogpt, by hand)."""
    path = os.path.join(data_dir, PREPARE_STATE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            return json.loads(f.readline())
    except (OSError, ValueError) as e:
        raise ShardError(f"cannot read {path} ({type(e).__name__}): {redo_advice(path)}") from e


def list_shards(data_dir, split):
    """Sorted paths of <data_dir>/<split>_NNNNNN.bin (or llm.c's names, such as fineweb_<split>_NNNNNN.bin);
    an error naming the prepare command if none.
    In a folder prepare_fineweb.py made, also checks the preparation finished and no shard is missing."""
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r}: use train or val")
    if not os.path.isdir(data_dir):
        what = "is a file, not a folder" if os.path.exists(data_dir) else "does not exist"
        raise ShardError(f"data_dir {data_dir} {what}: prepare the data first with `{prepare_hint(data_dir)}`, "
                         "or point data_dir at prepared shards")
    state = read_prepare_state(data_dir)
    if state is not None and not state.get("done"):
        raise ShardError(f"the preparation of {data_dir} is unfinished (it was stopped): run the same "
                         "prepare_fineweb.py command again, and it goes on where it stopped")
    # ours are train_000000.bin; llm.c and modded-nanogpt write fineweb_train_000001.bin and tiny_shakespeare_train.bin
    pattern = re.compile(rf"(.*_)?{split}(_\d+)?\.bin")
    paths = sorted(p for p in glob.glob(os.path.join(glob.escape(data_dir), "*.bin"))
                   if pattern.fullmatch(os.path.basename(p)))
    if state is not None:
        expected = [shard_path(data_dir, split, i) for i in range(state[split]["shards"])]
        missing = sorted(set(expected) - set(paths))
        if missing:
            raise ShardError(f"{len(missing)} of the {len(expected)} {split} shards prepared in {data_dir} are "
                             f"missing ({os.path.basename(missing[0])}, ...): {redo_advice(missing[0])}")
        if not expected:
            raise ShardError(f"{data_dir} was prepared with no {split} documents (the source is too small): "
                             "prepare it again from more data")
        paths = expected
        # shards another process wrote into the folder (or a mix of two preparations) do not add up
        tokens = sum(int(read_header(path)[2]) for path in paths)
        if tokens != state[split]["tokens"]:
            raise ShardError(f"the {split} shards of {data_dir} hold {tokens:,} tokens, not the "
                             f"{state[split]['tokens']:,} its preparation recorded: they were changed since; "
                             f"{redo_advice(paths[0])}")
    if not paths:
        raise ShardError(f"data_dir {data_dir} holds no {split}_NNNNNN.bin shards (nor llm.c's *_{split}_NNNNNN.bin): "
                         f"prepare the data first with `{prepare_hint(data_dir)}`, or point data_dir at prepared "
                         "shards")
    return paths


def _to_device(rows, device):
    """(B, T+1) uint16 numpy -> x, y int64 tensors on device; pinned, non-blocking copies on CUDA
    so the copy of this batch overlaps the GPU's work on the last one."""
    buf = torch.from_numpy(rows.astype(np.int64))
    x, y = buf[:, :-1], buf[:, 1:]
    if str(device).startswith("cuda"):
        x, y = x.pin_memory(), y.pin_memory()
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return x.contiguous().to(device), y.contiguous().to(device)


class _ShardSet:
    """The shards of one split: paths, token counts, and the windows of T+1 tokens they hold."""

    def __init__(self, data_dir, split, block_size):
        self.paths = list_shards(data_dir, split)
        headers = [read_header(p) for p in self.paths]
        self.n_tokens = np.array([int(h[2]) for h in headers], dtype=np.int64)
        self.vocab = np.array([shard_vocab(h) for h in headers], dtype=np.int64)
        self.block_size = block_size
        # a window is T+1 tokens inside one shard (inputs plus the next-token target), starting at k*T
        self.rows = np.maximum(self.n_tokens - 1, 0) // block_size
        self.cum_rows = np.cumsum(self.rows)
        if self.cum_rows[-1] == 0:
            raise ShardError(f"the {split} shards in {data_dir} hold {int(self.n_tokens.sum())} tokens in all, "
                             f"fewer than block_size+1={block_size + 1} in any one shard: prepare more data than "
                             f"`{prepare_hint(data_dir)}` gave, or lower block_size")

    def row_position(self, rows):
        """Window indices (0 = the first window of the first shard) -> (shard indices, token offsets)."""
        shard = np.searchsorted(self.cum_rows, rows, side="right")
        first = self.cum_rows[shard] - self.rows[shard]
        return shard, (rows - first) * self.block_size

    def gather(self, shard, offset):
        """Read windows of T+1 tokens -> (B, T+1) uint16. Memmaps are opened here and dropped on
        return: a long-lived memmap keeps every page it touched counted against the process."""
        T = self.block_size
        rows = np.empty((len(shard), T + 1), dtype=np.uint16)
        maps = {}
        for i, (s, o) in enumerate(zip(shard.tolist(), offset.tolist())):
            if s not in maps:
                maps[s] = open_shard(self.paths[s], int(self.n_tokens[s]))
            rows[i] = maps[s][o:o + T + 1]
        # every id is checked as it is read: a full scan of each shard up front would take minutes
        bad = rows.max(axis=1) >= self.vocab[shard]
        if bad.any():
            i = int(np.argmax(bad))
            raise ShardError(f"shard {self.paths[shard[i]]} holds token id {int(rows[i].max())} near position "
                             f"{int(offset[i])}, outside its vocabulary of {self.vocab[shard[i]]}: the file is corrupt "
                             f"or was made with another tokenizer; {redo_advice(self.paths[shard[i]])}")
        return rows


def check_loader_args(mode, rank, world_size):
    """The arguments both batch loaders (pretraining, SFT) share."""
    if mode not in ("random", "sequential"):
        raise ValueError(f"mode={mode!r}: use random or sequential")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")


class PretrainLoader:
    """Batches of (x, y) from a split's shards, in epochs: every window of T+1 tokens (stride T) is
    served once per epoch, none twice, none left out.

    mode="random": each epoch takes the windows in a new shuffled order (seeded with (seed, epoch)),
        so one long document never fills a stretch of training.
    mode="sequential": the windows in shard order, every epoch the same.
    The epoch's order is one global stream of rows: a step takes the next batch_size*world_size of
    them and rank r gets every world_size-th, so ranks never share a window. The state is the
    position (epoch, row) in that stream, the same on every rank: rank 0's saved state resumes all of
    them, and a resume with another batch size or process count goes on at the very same window.
    """

    def __init__(self, data_dir, split, batch_size, block_size, rank=0, world_size=1, seed=1337,
                 mode="random", device="cpu"):
        check_loader_args(mode, rank, world_size)
        self.shards = _ShardSet(data_dir, split, block_size)
        self.data_dir, self.split, self.mode, self.device = data_dir, split, mode, device
        self.batch_size, self.block_size = batch_size, block_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.windows = int(self.shards.cum_rows[-1])  # rows per epoch
        self.epoch, self.row = 0, 0  # the next global row: row `row` of epoch `epoch`
        self._order_epoch, self._order = None, None
        self.exact_resume = True

    @property
    def total_tokens(self):
        return int(self.shards.n_tokens.sum())

    def _epoch_order(self, epoch):
        """Row k of an epoch -> window index. Random mode keeps one permutation (4 bytes a window:
        40 MB for 10B tokens at T=1024), made again only when the epoch changes."""
        if self._order_epoch != epoch:
            order = np.arange(self.windows, dtype=np.int32 if self.windows < 2**31 else np.int64)
            np.random.default_rng([self.seed, epoch]).shuffle(order)
            self._order_epoch, self._order = epoch, order
        return self._order

    def next_batch(self):
        B, W, n = self.batch_size, self.world_size, self.windows
        rows = self.row + np.arange(B) * W + self.rank  # this rank's rows; they may run into later epochs
        epochs, rows = self.epoch + rows // n, rows % n
        if self.mode == "random":
            for epoch in np.unique(epochs).tolist():
                here = epochs == epoch
                rows[here] = self._epoch_order(epoch)[rows[here]]
        self.epoch, self.row = self.epoch + (self.row + B * W) // n, (self.row + B * W) % n
        return _to_device(self.shards.gather(*self.shards.row_position(rows)), self.device)

    def _identity(self):
        return {"mode": self.mode, "seed": self.seed, "block_size": self.block_size, "total_tokens": self.total_tokens}

    def state_dict(self):
        # plain ints and strings only: it is saved inside a weights_only checkpoint
        return {"epoch": self.epoch, "row": self.row, "windows": self.windows, "world_size": self.world_size,
                "batch_size": self.batch_size, **self._identity()}

    def load_state_dict(self, state):
        """Continue at the saved position. The very same batches follow when mode, seed, block size and
        data are unchanged (any batch size or process count); otherwise the run goes on at the same
        share of the same epoch, and exact_resume is False."""
        self.exact_resume = all(state.get(key) == value for key, value in self._identity().items())
        if "epoch" in state:
            epoch, row, windows = int(state["epoch"]), int(state["row"]), int(state["windows"])
        else:  # saved by an earlier version: a count of batches, each batch_size rows per process
            windows = int(sum(max(int(n) - 1, 0) // int(state["block_size"]) for n in self.shards.n_tokens))
            epoch, row = divmod(int(state["batches"]) * int(state["batch_size"]) * int(state["world_size"]), windows)
            self.exact_resume = self.exact_resume and state.get("mode") == "sequential"  # random drew otherwise
        self.epoch, self.row = epoch, row * self.windows // windows if windows != self.windows else row


def val_batches(data_dir, batch_size, block_size, eval_tokens, rank=0, world_size=1, device="cpu"):
    """A fixed list of (x, y): the first eval_tokens of the val split in non-overlapping windows,
    batch i going to rank i % world_size. The same windows on every call and for any batch size or
    number of processes, so val losses compare across evals and runs. When the val split is smaller
    than eval_tokens, all of it is used. Every rank gets the same number of full batches (for the
    all-reduce): rows past the last window are id 0 without targets (y = -1), which add nothing to
    the loss."""
    shards = _ShardSet(data_dir, "val", block_size)  # refuses a split without one window
    n_rows = min(max(eval_tokens // block_size, 1), int(shards.cum_rows[-1]))
    rows_per_step = batch_size * world_size
    n_batches = -(-n_rows // rows_per_step) * world_size
    batches = []
    for i in range(rank, n_batches, world_size):
        rows = np.arange(i * batch_size, min((i + 1) * batch_size, n_rows))
        # padding rows are never scored (y = -1), so any id does: 0 exists in every vocabulary
        x = torch.zeros((batch_size, block_size), dtype=torch.int64)
        y = torch.full_like(x, -1)
        if len(rows):
            x[:len(rows)], y[:len(rows)] = _to_device(shards.gather(*shards.row_position(rows)), "cpu")
        batches.append((x.to(device), y.to(device)))
    return batches
