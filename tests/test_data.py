"""Shard format and the pretraining loader (gptkit/data.py), on small synthetic shards."""

import numpy as np
import pytest
import torch

from gptkit.data import (HEADER_INTS, MAGIC, VERSION, PretrainLoader, ShardError, list_shards, load_shard,
                         val_batches, write_shard)

T = 16


def make_shards(data_dir, split, sizes, start=0):
    """Shards whose token at global position p is p (mod 50000): every window says where it came from."""
    for i, size in enumerate(sizes):
        write_shard(data_dir / f"{split}_{i:06d}.bin", (np.arange(start, start + size) % 50000).astype(np.uint16))
        start += size
    return start


@pytest.fixture
def data_dir(tmp_path):
    end = make_shards(tmp_path, "train", [3000, 500, 8000])
    make_shards(tmp_path, "val", [2000, 1000], start=end)
    return tmp_path


def test_write_and_load_roundtrip(tmp_path):
    tokens = np.array([50256, 1, 2, 50256, 3, 50256], dtype=np.uint16)
    path = tmp_path / "train_000000.bin"
    write_shard(path, tokens, n_docs=3)
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    assert list(header[:5]) == [MAGIC, VERSION, 6, 50257, 3]
    assert path.stat().st_size == 4 * HEADER_INTS + 2 * 6
    loaded = load_shard(path)
    assert isinstance(loaded, np.memmap) and loaded.dtype == np.uint16
    assert np.array_equal(loaded, tokens)
    assert not list(tmp_path.glob("*.tmp*"))  # the temporary file was renamed away


def test_llmc_shard_loads_as_is(tmp_path):
    # llm.c / modded-nanogpt write magic, version, count and leave the other 253 slots zero
    tokens = np.random.default_rng(0).integers(0, 50257, size=3000).astype(np.uint16)
    header = np.zeros(256, dtype=np.int32)
    header[:3] = [20240520, 1, tokens.size]
    (tmp_path / "train_000000.bin").write_bytes(header.tobytes() + tokens.tobytes())
    assert np.array_equal(load_shard(tmp_path / "train_000000.bin"), tokens)
    x, y = PretrainLoader(tmp_path, "train", 4, T, mode="sequential").next_batch()
    assert np.array_equal(x[0].numpy(), tokens[:T]) and np.array_equal(y[0].numpy(), tokens[1:T + 1])


@pytest.mark.parametrize("names", [
    ["fineweb_val_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin"],  # llm.c, modded-nanogpt
    ["edu_fineweb_val_000000.bin", "edu_fineweb_train_000001.bin", "edu_fineweb_train_000002.bin"],
    ["tiny_shakespeare_val.bin", "tiny_shakespeare_train.bin"],  # llm.c's small datasets: one shard per split
])
def test_llmc_folders_load_under_their_own_file_names(tmp_path, names):
    rng = np.random.default_rng(0)
    shards = {}
    for name in names:
        tokens = rng.integers(0, 50257, size=1000).astype(np.uint16)
        header = np.zeros(256, dtype=np.int32)
        header[:3] = [20240520, 1, tokens.size]
        (tmp_path / name).write_bytes(header.tobytes() + tokens.tobytes())
        shards[name] = tokens
    (tmp_path / "train_notes.txt.bin.bak").write_text("not a shard")
    train = [n for n in names if "_train" in n]
    assert list_shards(tmp_path, "train") == [str(tmp_path / n) for n in train]
    x, _ = PretrainLoader(tmp_path, "train", 4, T, mode="sequential").next_batch()
    assert np.array_equal(x[0].numpy(), shards[train[0]][:T])
    (x, _), = val_batches(tmp_path, 4, T, eval_tokens=4 * T)
    assert np.array_equal(x[0].numpy(), shards[names[0]][:T])


def corrupt(path, slot=None, value=None, truncate=0, token=None):
    data = bytearray(path.read_bytes())
    if slot is not None:
        data[4 * slot:4 * slot + 4] = np.int32(value).tobytes()
    if token is not None:
        data[1024 + 2 * 100:1024 + 2 * 101] = np.uint16(token).tobytes()
    path.write_bytes(bytes(data[:len(data) - truncate]))


@pytest.mark.parametrize("damage, words", [
    (dict(slot=0, value=12345), "magic"),
    (dict(slot=1, value=2), "version"),
    (dict(truncate=3), "truncated"),
    (dict(slot=2, value=10), "truncated"),
    (dict(token=50300), "vocabulary"),
])
def test_bad_shards_rejected_with_file_named(tmp_path, damage, words):
    path = tmp_path / "train_000000.bin"
    write_shard(path, np.arange(2000, dtype=np.uint16))
    corrupt(path, **damage)
    with pytest.raises(ShardError) as e:
        load_shard(path)
    assert str(path) in str(e.value) and words in str(e.value)
    with pytest.raises(ShardError, match="train_000000.bin"):  # the loader refuses it too
        loader = PretrainLoader(tmp_path, "train", 8, 256, mode="sequential")
        loader.next_batch()


def test_write_shard_refuses_ids_outside_gpt2(tmp_path):
    with pytest.raises(ValueError, match="token ids"):
        write_shard(tmp_path / "train_000000.bin", np.array([1, 50257]))


def test_no_shards_names_the_prepare_command(tmp_path):
    for where in (tmp_path, tmp_path / "missing"):
        with pytest.raises(ShardError, match="prepare_fineweb.py"):
            list_shards(where, "train")
        with pytest.raises(ShardError, match="prepare_fineweb.py"):
            PretrainLoader(where, "train", 2, T)


def test_batches_are_shifted_windows(data_dir):
    for mode in ("random", "sequential"):
        x, y = PretrainLoader(data_dir, "train", 8, T, mode=mode).next_batch()
        assert x.shape == y.shape == (8, T) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert torch.equal(y[:, -1], x[:, -1] + 1)  # consecutive positions in one shard (no shard crossing)


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_deterministic_and_exact_resume(data_dir, mode):
    a = PretrainLoader(data_dir, "train", 4, T, seed=7, mode=mode)
    first = [a.next_batch() for _ in range(3)]
    state = a.state_dict()
    rest = [a.next_batch() for _ in range(4)]
    # the state survives a weights_only checkpoint round trip
    path = data_dir / "state.pt"
    torch.save({"loader": state}, path)
    state = torch.load(path, weights_only=True)["loader"]
    b = PretrainLoader(data_dir, "train", 4, T, seed=7, mode=mode)
    b.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(rest, [b.next_batch() for _ in range(4)]):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    again = PretrainLoader(data_dir, "train", 4, T, seed=7, mode=mode)
    assert all(torch.equal(x1, again.next_batch()[0]) for x1, _ in first)
    if mode == "random":
        other = PretrainLoader(data_dir, "train", 4, T, seed=8, mode=mode)
        assert not torch.equal(other.next_batch()[0], first[0][0])


def test_sequential_ranks_disjoint_and_cover_in_order(data_dir):
    seen = []
    for rank in range(2):
        loader = PretrainLoader(data_dir, "train", 4, T, rank=rank, world_size=2, mode="sequential")
        seen.append(torch.cat([loader.next_batch()[0] for _ in range(5)])[:, 0].tolist())
    assert not set(seen[0]) & set(seen[1])
    merged = sorted(seen[0] + seen[1])
    assert merged == [i * T for i in range(40)]  # the first 40 windows of shard 0, each taken once
    assert seen[0][:3] == [0, 2 * T, 4 * T]


def test_random_ranks_differ_and_cover_all_shards_uniformly(data_dir):
    r0 = PretrainLoader(data_dir, "train", 64, T, rank=0, world_size=2)
    r1 = PretrainLoader(data_dir, "train", 64, T, rank=1, world_size=2)
    starts0 = torch.cat([r0.next_batch()[0][:, 0] for _ in range(20)])
    starts1 = torch.cat([r1.next_batch()[0][:, 0] for _ in range(20)])
    # independent draws: a rank repeats another's window only by chance (1 in ~11k per row)
    assert (starts0 == starts1).float().mean() < 0.01
    # the shards hold 3000, 500 and 8000 tokens: each is drawn in proportion to its windows
    counts = np.histogram(starts0.numpy(), bins=[0, 3000, 3500, 11500])[0] / len(starts0)
    expected = np.array([3000 - T, 500 - T, 8000 - T]) / (11500 - 3 * T)
    assert np.abs(counts - expected).max() < 0.05, counts


def test_val_batches_fixed_and_split_between_ranks(data_dir):
    one = val_batches(data_dir, 4, T, eval_tokens=10 * 4 * T)
    assert len(one) == 10
    assert all(torch.equal(a[0], b[0]) for a, b in zip(one, val_batches(data_dir, 4, T, eval_tokens=10 * 4 * T)))
    starts = torch.cat([x[:, 0] for x, _ in one]).tolist()
    assert starts == [11500 + i * T for i in range(40)]  # the first 40 windows of the val split, in order
    ranks = [val_batches(data_dir, 4, T, eval_tokens=10 * 4 * T, rank=r, world_size=3) for r in range(3)]
    assert [len(r) for r in ranks] == [4, 4, 4]  # the same count on every rank, for the all-reduce
    windows = [set(torch.cat([x[:, 0] for x, y in r if (y != -1).any()]).tolist()) for r in ranks]
    assert sorted(set.union(*windows)) == starts  # the 10 batches between them, none twice
    assert not (windows[0] & windows[1]) and not (windows[1] & windows[2]) and not (windows[0] & windows[2])


def scored_windows(batches):
    """First tokens of the val windows that carry targets (rows of padding have none)."""
    return [int(x[0]) for xb, yb in batches for x, y in zip(xb, yb) if (y != -1).any()]


def test_val_split_smaller_than_eval_tokens_is_used_whole(data_dir):
    val = window_starts([2000, 1000], start=11500)
    assert len(val) == 124 + 62
    # more asked for than there is: every window, though 186 is no multiple of the batch size
    assert scored_windows(val_batches(data_dir, 4, T, eval_tokens=10**9)) == val
    for world_size in (2, 3):
        ranks = [val_batches(data_dir, 4, T, eval_tokens=10**9, rank=r, world_size=world_size) for r in range(world_size)]
        assert len({len(r) for r in ranks}) == 1  # the same count on every rank, for the all-reduce
        assert sorted(w for r in ranks for w in scored_windows(r)) == val
    # a val split smaller than one batch: its 4 windows of 512 in one batch, the other rows without targets
    (x, y), = val_batches(data_dir, 64, 512, eval_tokens=10**6)
    assert x.shape == (64, 512) and scored_windows([(x, y)]) == [11500, 12012, 12524, 13500]
    tiny = data_dir / "tiny"
    tiny.mkdir()
    make_shards(tiny, "val", [16])
    with pytest.raises(ShardError, match="val"):  # not one window: prepare more val data
        val_batches(tiny, 4, T, eval_tokens=10**6)


def test_val_set_is_the_same_for_any_batch_size(data_dir):
    # eval_tokens of 10 batches of 4: as many windows whatever the micro-batch, so val losses compare across runs
    windows = scored_windows(val_batches(data_dir, 4, T, eval_tokens=10 * 4 * T))
    assert windows == window_starts([2000, 1000], start=11500)[:40]
    for batch_size in (3, 7, 64):
        assert scored_windows(val_batches(data_dir, batch_size, T, eval_tokens=10 * 4 * T)) == windows


def test_val_set_is_the_same_for_any_number_of_processes(data_dir):
    # 5 batches of val windows: 2 processes cannot split them evenly, yet they must score the same
    # windows as one process (a rank short of a batch gets one without targets)
    def val_windows(world_size):
        batches = [b for r in range(world_size)
                   for b in val_batches(data_dir, 4, T, eval_tokens=5 * 4 * T, rank=r, world_size=world_size)]
        assert len(batches) % world_size == 0  # the same count on every rank, for the all-reduce
        return sorted(int(x[0]) for xb, yb in batches for x, y in zip(xb, yb) if (y != -1).any())

    one = val_windows(1)
    assert one == [11500 + i * T for i in range(20)]
    assert val_windows(2) == one and val_windows(3) == one
    for world_size in (2, 3):
        for r in range(world_size):
            for _, y in val_batches(data_dir, 4, T, eval_tokens=5 * 4 * T, rank=r, world_size=world_size):
                assert ((y == -1).all(dim=1) | (y != -1).all(dim=1)).all()  # whole windows or none


def window_starts(sizes, start=0, block_size=T):
    """The token windows (T+1 tokens at stride T) that shards of these sizes hold, by first token."""
    windows = []
    for size in sizes:
        windows += [start + k * block_size for k in range(max(size - 1, 0) // block_size)]
        start += size
    return windows


def global_stream(loaders, steps):
    """Run every rank's loader for `steps` batches -> window starts in global order: row i of rank r's
    batch s is global row (s * B + i) * world_size + r, as every rank draws B rows per step."""
    world_size, B = len(loaders), loaders[0].batch_size
    stream = {}
    for s in range(steps):
        for r, loader in enumerate(loaders):
            for i, start in enumerate(loader.next_batch()[0][:, 0].tolist()):
                stream[(s * B + i) * world_size + r] = start
    return [stream[g] for g in sorted(stream)]


@pytest.mark.parametrize("mode", ["random", "sequential"])
@pytest.mark.parametrize("world_size", [1, 3])
def test_every_window_once_per_epoch(tmp_path, mode, world_size):
    # a shard shorter than one window, and a window count that no step size divides: the epochs wrap mid-batch
    sizes = [300, 10, 50, 800]
    make_shards(tmp_path, "train", sizes)
    windows = window_starts(sizes)
    n = len(windows)
    assert n == 70
    loaders = [PretrainLoader(tmp_path, "train", 4, T, rank=r, world_size=world_size, seed=3, mode=mode)
               for r in range(world_size)]
    stream = global_stream(loaders, -(-3 * n // (4 * world_size)))
    epochs = [stream[e * n:(e + 1) * n] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == windows  # each window once: none twice, none left out
    if mode == "sequential":
        assert epochs[0] == windows
    else:
        assert epochs[0] != windows and epochs[1] != epochs[0]  # shuffled, and again each epoch
    # the stream is the same for any number of processes and batch size: one process, one row at a time
    alone = PretrainLoader(tmp_path, "train", 1, T, seed=3, mode=mode)
    assert stream == [int(alone.next_batch()[0][0, 0]) for _ in range(len(stream))]


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_exact_resume_after_an_epoch_wrap(data_dir, mode):
    a = PretrainLoader(data_dir, "train", 64, T, seed=7, mode=mode)  # 717 windows: epoch 1 starts in batch 12
    for _ in range(13):
        a.next_batch()
    state = a.state_dict()
    rest = [a.next_batch() for _ in range(3)]
    b = PretrainLoader(data_dir, "train", 64, T, seed=7, mode=mode)
    b.load_state_dict(state)
    assert b.exact_resume
    for (x1, y1), (x2, y2) in zip(rest, [b.next_batch() for _ in range(3)]):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_resume_with_other_batch_size_and_process_count_goes_on_at_the_same_window(data_dir, mode):
    n = len(window_starts([3000, 500, 8000]))
    reference = PretrainLoader(data_dir, "train", 1, T, seed=7, mode=mode)
    reference = [int(reference.next_batch()[0][0, 0]) for _ in range(2 * n)]
    a = PretrainLoader(data_dir, "train", 5, T, seed=7, mode=mode)
    for _ in range(150):  # 750 rows: into the second epoch
        a.next_batch()
    state = a.state_dict()
    for batch_size, world_size in [(4, 1), (3, 2), (7, 3)]:
        loaders = [PretrainLoader(data_dir, "train", batch_size, T, rank=r, world_size=world_size, seed=7, mode=mode)
                   for r in range(world_size)]
        for loader in loaders:
            loader.load_state_dict(state)
        stream = global_stream(loaders, 20)
        # neither a window again nor one left out, and still the second epoch (not a restart)
        assert stream == reference[750:750 + len(stream)], (batch_size, world_size)


def test_resume_from_a_state_saved_as_a_batch_count(data_dir):
    # loader states of earlier versions count batches; a run resumed from one goes on at the same row
    old = {"mode": "sequential", "seed": 7, "batches": 150, "batch_size": 5, "block_size": T, "world_size": 1,
           "total_tokens": 11500}
    loader = PretrainLoader(data_dir, "train", 4, T, seed=7, mode="sequential")
    loader.load_state_dict(old)
    windows = window_starts([3000, 500, 8000])
    assert loader.next_batch()[0][:, 0].tolist() == windows[750 - len(windows):750 - len(windows) + 4]


def test_resume_with_another_block_size_keeps_the_epoch(data_dir):
    a = PretrainLoader(data_dir, "train", 5, T, mode="sequential")
    for _ in range(150):  # 750 rows of 717: 4% into the second epoch
        a.next_batch()
    b = PretrainLoader(data_dir, "train", 5, 2 * T, mode="sequential")
    b.load_state_dict(a.state_dict())
    assert not b.exact_resume
    windows = window_starts([3000, 500, 8000], block_size=2 * T)
    assert len(windows) == 357
    assert b.next_batch()[0][0, 0] == windows[33 * 357 // 717]  # the same share of the second epoch
