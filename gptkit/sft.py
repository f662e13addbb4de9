"""
SFT data: rendered chat conversations with loss masks, as written by prepare_instruct.py and read
by finetune.py (and, as preference pairs, by dpo.py).

On disk, per split (train, val) in <data_dir>:
    {split}_ids.bin       uint16 token ids of all conversations, one after another
    {split}_mask.bin      uint8, 1 where the token is an assistant token or the <|end|> closing one
    {split}_offsets.npy   int64, n_conversations + 1 entries: conversation i is ids[offsets[i]:offsets[i+1]]
    meta.json             format version, tokenizer, block_size, counts per split, the prepare summary;
                          "pairs": true for preference data (conversations 2i and 2i+1 are pair i's
                          chosen and rejected answers, read by gptkit/preference.py)
    tokenizer.json        a trained tokenizer's copy (none for GPT-2); meta.json holds its hash
A run writes every file in full under a temporary name first, then removes meta.json, renames the
files into place and writes meta.json last: killed mid-way, the folder keeps the data of the run before,
or (in the moment of the renames) has no meta.json and is refused. The reader also checks the files
against the counts in meta.json, so a damaged folder is refused, not misread.

The loader packs whole conversations into rows of block_size + 1 tokens and yields
x = row[:-1], y = row[1:], with y = -1 where the target is not an assistant token (or is padding):

    loader = SFTLoader("data/dolly", "train", batch_size=16, block_size=1024, rank=0, world_size=1, seed=1337)
    x, y = loader.next_batch()                  # (B, T) int64 each
    val_batches = sft_val_batches("data/dolly", batch_size=16, block_size=1024, eval_tokens=1_000_000)

finetune.py and dpo.py show the change training makes on held-out questions:

    questions = val_questions("data/dolly", n=4, block_size=1024)   # [(prompt ids, reference ids)]
    print_answers(model, tokenizer, rt, questions, max_new_tokens=64, title="answers before finetuning")

A data folder holds the ids of one tokenizer, so the functions that read one folder take their
control tokens (the <|endoftext|> padding, the <|end|> closing an answer) from data_tokenizer(data_dir):
the tokenizer that made those ids, never a tokenizer the caller might mix up with it.
"""

import json
import os

import numpy as np
import torch

from gptkit.configurator import UserError
from gptkit.data import check_loader_args
from gptkit.files import atomic_write_files
from gptkit.generate import generate
from gptkit.system import print0
from gptkit.tokenizer import TOKENIZER_FILE, data_tokenizer

FORMAT_VERSION = 1
TOKENIZER_NAME = "gpt2+chat"  # GPT-2 BPE plus <|system|> <|user|> <|assistant|> <|end|> at 50257..50260
META_NAME = "meta.json"


class SFTDataError(UserError, RuntimeError):
    """SFT data that cannot be used; the message names the folder and what to do."""


# ----------------------------------------------------------------------------- writing

def _split_files(split, conversations):
    """conversations: list of (ids, mask) -> ({file name: write_fn}, n_conversations, n_tokens) of the split."""
    lengths = np.array([len(ids) for ids, _ in conversations], dtype=np.int64)
    offsets = np.zeros(len(conversations) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    n_tokens = int(offsets[-1])
    ids = np.empty(n_tokens, dtype=np.uint16)
    mask = np.empty(n_tokens, dtype=np.uint8)
    for i, (conv_ids, conv_mask) in enumerate(conversations):
        if len(conv_ids) != len(conv_mask):
            raise AssertionError(f"conversation {i}: {len(conv_ids)} ids but {len(conv_mask)} mask entries")
        ids[offsets[i]:offsets[i + 1]] = conv_ids
        mask[offsets[i]:offsets[i + 1]] = conv_mask
    files = {f"{split}_ids.bin": lambda f: f.write(ids.tobytes()),
             f"{split}_mask.bin": lambda f: f.write(mask.tobytes()),
             f"{split}_offsets.npy": lambda f: np.save(f, offsets)}
    return files, len(conversations), n_tokens


def write_sft(data_dir, splits, meta, tok):
    """splits: {split: list of (ids, mask)} -> every split's files and meta.json, replacing a folder
    prepared before as one set: killed at any moment, the folder holds the old data whole, or no
    meta.json (refused: prepare again), never files of two runs. tok: the tokenizer that made the ids
    (a trained one is copied into the folder, so readers use the same). Returns {split: {conversations, tokens}}."""
    files, counts = {}, {}
    if tok.hash != "gpt2":
        files[TOKENIZER_FILE] = lambda f: f.write(tok.to_string().encode("utf-8"))
    elif os.path.exists(os.path.join(data_dir, TOKENIZER_FILE)):
        for name in (META_NAME, TOKENIZER_FILE):  # meta first: refused until the new set is whole (see above)
            if os.path.exists(os.path.join(data_dir, name)):
                os.remove(os.path.join(data_dir, name))  # the earlier data's tokenizer, not these ids'

    for split, conversations in splits.items():
        split_files, n_conv, n_tokens = _split_files(split, conversations)
        files.update(split_files)
        counts[split] = {"conversations": n_conv, "tokens": n_tokens}
    name = TOKENIZER_NAME if tok.hash == "gpt2" else tok.hash
    meta = {"format": "gptkit-sft", "version": FORMAT_VERSION, "tokenizer": name, "splits": counts, **meta}
    files[META_NAME] = lambda f: f.write(json.dumps(meta, indent=2).encode())
    atomic_write_files(data_dir, files, marker=META_NAME)
    return counts


# ----------------------------------------------------------------------------- reading

def read_meta(data_dir):
    path = os.path.join(data_dir, META_NAME)
    if not os.path.exists(path):
        raise SFTDataError(f"no SFT data in {data_dir} ({META_NAME} is missing: not prepared yet, or a prepare "
                           f"run was stopped while replacing the files): run python prepare_instruct.py "
                           f"config/dolly.py --data_dir={data_dir} (with your sources)")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (ValueError, OSError) as e:  # cut short, overwritten, not UTF-8
        raise SFTDataError(f"cannot read {path} ({type(e).__name__}: {e}): re-run prepare_instruct.py") from e
    if not isinstance(meta, dict) or meta.get("format") != "gptkit-sft" or meta.get("version") != FORMAT_VERSION:
        raise SFTDataError(f"{path} is not gptkit SFT data of version {FORMAT_VERSION}: re-run prepare_instruct.py")
    tok = data_tokenizer(data_dir)
    if meta.get("tokenizer") != (TOKENIZER_NAME if tok.hash == "gpt2" else tok.hash):
        raise SFTDataError(f"{path} was made with tokenizer {meta.get('tokenizer')!r}, but {data_dir} holds "
                           f"tokenizer {tok.name}: re-run prepare_instruct.py")
    return meta


def read_sft_split(data_dir, split):
    """-> (ids, mask, offsets) as read-only numpy arrays (ids and mask memory-mapped)."""
    meta = read_meta(data_dir)
    counts = meta.get("splits", {}).get(split)
    if counts is None:
        raise SFTDataError(f"{data_dir} has no {split} split: re-run prepare_instruct.py")
    n_conv, n_tokens = counts["conversations"], counts["tokens"]
    paths = {name: os.path.join(data_dir, f"{split}_{name}") for name in ("ids.bin", "mask.bin", "offsets.npy")}
    for path in paths.values():
        if not os.path.exists(path):
            raise SFTDataError(f"{path} is missing: re-run prepare_instruct.py for {data_dir}")
    try:
        offsets = np.load(paths["offsets.npy"], allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise SFTDataError(f"cannot read {paths['offsets.npy']} ({type(e).__name__}): the file is corrupt; "
                           "re-run prepare_instruct.py") from e
    sizes_ok = (os.path.getsize(paths["ids.bin"]) == 2 * n_tokens and os.path.getsize(paths["mask.bin"]) == n_tokens
                and offsets.shape == (n_conv + 1,) and (n_conv == 0 or int(offsets[-1]) == n_tokens))
    if not sizes_ok:
        raise SFTDataError(f"the {split} files in {data_dir} do not match {META_NAME} (an interrupted or mixed "
                           "prepare run?): re-run prepare_instruct.py")
    if n_tokens == 0:
        return np.zeros(0, np.uint16), np.zeros(0, np.uint8), offsets
    ids = np.memmap(paths["ids.bin"], dtype=np.uint16, mode="r")
    mask = np.memmap(paths["mask.bin"], dtype=np.uint8, mode="r")
    # one pass over the data (milliseconds for SFT sizes): a corrupt file fails here, not in the embedding
    n_vocab = data_tokenizer(data_dir).n_vocab
    if int(ids.max()) >= n_vocab or int(mask.max()) > 1 or (np.diff(offsets) <= 0).any():
        raise SFTDataError(f"the {split} files in {data_dir} hold token ids past {n_vocab - 1}, mask values "
                           "other than 0/1 or empty conversations: they are corrupt; re-run prepare_instruct.py")
    return ids, mask, offsets


# ----------------------------------------------------------------------------- batches

def pack_rows(lengths, order, row_len):
    """Greedy packing: walk the conversations in `order`, start a new row when the next one does not fit.
    -> list of rows, each a list of conversation indices."""
    rows, row, used = [], [], 0
    for i in order:
        n = int(lengths[i])
        if used + n > row_len and row:
            rows.append(row)
            row, used = [], 0
        row.append(int(i))
        used += n
    if row:
        rows.append(row)
    return rows


def make_row(ids, mask, offsets, conversations, block_size, pad_id):
    """Concatenate conversations into one row -> (x, y) int64 numpy arrays of length block_size.
    Padding is pad_id (the data's <|endoftext|>) with no loss; a target gets -1 unless its mask is 1."""
    row_ids = np.full(block_size + 1, pad_id, dtype=np.int64)
    row_mask = np.zeros(block_size + 1, dtype=bool)
    pos = 0
    for c in conversations:
        a, b = int(offsets[c]), int(offsets[c + 1])
        row_ids[pos:pos + b - a] = ids[a:b]
        row_mask[pos:pos + b - a] = mask[a:b] == 1
        pos += b - a
    x = row_ids[:-1].copy()
    y = np.where(row_mask[1:], row_ids[1:], -1)
    return x, y


def _to_device(rows, device):
    x = torch.from_numpy(np.stack([r[0] for r in rows]))
    y = torch.from_numpy(np.stack([r[1] for r in rows]))
    if str(device).startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def _check_fits(lengths, block_size, data_dir):
    longest = int(lengths.max()) if len(lengths) else 0
    if longest > block_size + 1:
        raise SFTDataError(f"{data_dir} holds a conversation of {longest} tokens, longer than a row of "
                           f"block_size+1={block_size + 1}: re-run prepare_instruct.py with "
                           f"--block_size={block_size}, or train with a larger block_size")


class SFTLoader:
    """Endless stream of packed rows. Each epoch packs the conversations in a new order (seed, epoch);
    global row g of the stream goes to rank g % world_size, so ranks never share a row.
    state_dict() is the position in that stream: a resumed run gets exactly the batches it would have."""

    def __init__(self, data_dir, split, batch_size, block_size, rank=0, world_size=1, seed=1337,
                 mode="random", device="cpu"):
        check_loader_args(mode, rank, world_size)
        self.ids, self.mask, self.offsets = read_sft_split(data_dir, split)
        self.pad_id = data_tokenizer(data_dir).eot  # the data's own: a row is padded in its tokenizer's ids
        self.lengths = np.diff(self.offsets)
        if len(self.lengths) == 0:
            raise SFTDataError(f"the {split} split of {data_dir} holds no conversations: add data or "
                               "lower val_fraction in prepare_instruct.py")
        _check_fits(self.lengths, block_size, data_dir)
        self.batch_size, self.block_size = batch_size, block_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.mode, self.device = seed, mode, device
        self.epoch, self.row = 0, 0  # next global row: row `row` of epoch `epoch`
        self._rows_epoch, self._rows = None, None
        self.exact_resume = True

    @property
    def total_tokens(self):
        return int(self.offsets[-1])

    def rows_per_epoch(self):
        return len(self._epoch_rows(self.epoch))

    def _epoch_rows(self, epoch):
        if self._rows_epoch != epoch:
            n = len(self.lengths)
            if self.mode == "random":
                order = np.random.default_rng([self.seed, epoch]).permutation(n)
            else:
                order = np.arange(n)
            self._rows = pack_rows(self.lengths, order, self.block_size + 1)
            self._rows_epoch = epoch
        return self._rows

    def next_batch(self):
        rows = []
        for g in range(self.batch_size * self.world_size):
            epoch_rows = self._epoch_rows(self.epoch)
            if g % self.world_size == self.rank:
                rows.append(make_row(self.ids, self.mask, self.offsets, epoch_rows[self.row], self.block_size,
                                     self.pad_id))
            self.row += 1
            if self.row == len(epoch_rows):
                self.epoch, self.row = self.epoch + 1, 0
        return _to_device(rows, self.device)

    def _identity(self):
        return {"mode": self.mode, "seed": self.seed, "block_size": self.block_size,
                "world_size": self.world_size, "total_tokens": self.total_tokens}

    def state_dict(self):
        # plain ints and strings only: it is saved inside a weights_only checkpoint
        return {"epoch": self.epoch, "row": self.row, **self._identity()}

    def load_state_dict(self, state):
        """Continue at the saved (epoch, row). The very same rows follow when seed, block size, world
        size and data are unchanged; otherwise the position is kept and exact_resume is False."""
        self.exact_resume = all(state.get(key) == value for key, value in self._identity().items())
        self.epoch, self.row = int(state["epoch"]), int(state["row"])
        if self.row >= len(self._epoch_rows(self.epoch)):  # other packing: start the next epoch
            self.epoch, self.row = self.epoch + 1, 0


def val_questions(data_dir, n, block_size):
    """The first n val conversations up to their first answer -> [(prompt ids, reference answer ids)].
    The prompt ends in <|assistant|> and holds the data's system prompt, if any: finetune.py asks
    these before and after training, questions the model never trains on, in the format it trains on.
    Prompts that leave no room for an answer in block_size are passed over."""
    ids, mask, offsets = read_sft_split(data_dir, "val")
    end = data_tokenizer(data_dir).end  # the <|end|> of the tokenizer that made these ids
    questions = []
    for a, b in zip(offsets[:-1], offsets[1:]):
        if len(questions) == n:
            break
        conv_ids, learned = ids[a:b].tolist(), mask[a:b] == 1
        start = int(np.argmax(learned))  # the first answer token (prepare keeps only conversations with one)
        stop = start + int(np.argmin(learned[start:])) if not learned[start:].all() else len(conv_ids)
        answer = conv_ids[start:stop]
        if answer and answer[-1] == end:
            answer = answer[:-1]
        if start < block_size:
            questions.append((conv_ids[:start], answer))
    return questions


def print_answers(model, tokenizer, rt, questions, max_new_tokens, title):
    """Greedy answers (deterministic, so before and after compare) to val_questions' held-out
    questions, each with the answer its data gives: a question the model trained on would show what
    it memorised. tokenizer: the model's (init_model's), which made the questions' ids. Rank 0 only."""
    if not rt.master or max_new_tokens == 0 or not questions:
        return
    was_training = model.training
    model.eval()
    print0(f"--- {title}")
    for ids, reference in questions:
        # the text of the last user turn (the prompt ends in its <|end|> and <|assistant|>)
        user = tokenizer.user
        last_user = len(ids) - 1 - ids[::-1].index(user) if user in ids else len(ids) - 2
        question = tokenizer.decode(ids[last_user + 1:-2])
        answer = generate(model, ids, max_new_tokens, temperature=0.0, stop_tokens=(tokenizer.end, tokenizer.eot),
                          autocast=rt.autocast, n_vocab=tokenizer.n_vocab)
        cut = "..." if len(reference) > max_new_tokens else ""
        print0(f"Q: {question}\nA: {tokenizer.decode(list(answer)).strip()}\n"
               f"(data: {tokenizer.decode(reference[:max_new_tokens]).strip()}{cut})")
    model.train(was_training)


def sft_val_batches(data_dir, batch_size, block_size, eval_tokens, rank=0, world_size=1, device="cpu"):
    """A fixed list of (x, y): the val conversations packed in file order, at most eval_tokens worth of
    rows, global row g going to rank g % world_size. Every rank gets the same number of full batches
    (for the all-reduce): the last batches are filled up with rows without targets, which add nothing
    to the loss, so each conversation counts once and the val loss is the same for any number of
    processes and any batch size."""
    ids, mask, offsets = read_sft_split(data_dir, "val")
    lengths = np.diff(offsets)
    if len(lengths) == 0:
        raise SFTDataError(f"the val split of {data_dir} holds no conversations: re-run prepare_instruct.py "
                           "with a larger val_fraction")
    _check_fits(lengths, block_size, data_dir)
    rows = pack_rows(lengths, np.arange(len(lengths)), block_size + 1)
    rows = rows[:max(eval_tokens // block_size, 1)]
    rows_per_step = batch_size * world_size
    n_rows = -(-len(rows) // rows_per_step) * rows_per_step
    rows += [[]] * (n_rows - len(rows))  # an empty row: <|endoftext|> padding, every target -1
    pad_id = data_tokenizer(data_dir).eot  # the data's own, as in SFTLoader
    mine = [make_row(ids, mask, offsets, r, block_size, pad_id) for r in rows[rank::world_size]]
    return [_to_device(mine[i:i + batch_size], device) for i in range(0, len(mine), batch_size)]
