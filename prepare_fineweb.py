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

import json
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from gptkit.configurator import BaseConfig, UserError, configure, print_config
from gptkit.data import PREPARE_STATE, list_shards, shard_path, text_vocab, write_shard
from gptkit.documents import make_pool, resolve_num_proc, tokenize_stream
from gptkit.files import atomic_write, remove_temporaries
from gptkit.lock import hold_folder, release_folder
from gptkit.sources import is_local, local_files, open_records, parquet_text_bytes, source_problems
from gptkit.system import print0, run_main
from gptkit.tokenizer import load_tokenizer, record_tokenizer, tokenizer_problems

HUB_SUBSET_TOKENS = {"sample-10BT": 10e9, "sample-100BT": 100e9, "sample-350BT": 350e9, "default": 1.3e12}
BYTES_PER_TOKEN = 4.0  # GPT-2 BPE on English prose: 3.3 (old English) to 4.7 (web text); only for estimates
VAL_OVERSAMPLE = 2.0   # see choose_val_split
VAL_MAX_SHARE = 0.1    # val never takes more than this share of the (estimated) source
MAX_NO_TEXT_SHARE = 0.01  # more records than this without a 'text' field: the source is not what it seems


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
        problems = super().validate() + tokenizer_problems(self.tokenizer)
        if self.shard_tokens < 1:
            problems.append(f"shard_tokens={self.shard_tokens}: must be at least 1 (100_000_000 is usual)")
        for key in ("max_tokens", "num_proc"):
            if getattr(self, key) < 0:
                problems.append(f"{key}={getattr(self, key)}: must be 0 or more")
        if self.val_tokens < 1:
            problems.append(f"val_tokens={self.val_tokens}: train.py evaluates on a val split, so it needs one "
                            "(10_485_760 is usual; a small source gets at most 10% of its tokens)")
        return problems + source_problems(self.source)


def estimate_source_tokens(cfg):
    """A rough token count of the whole source, for the progress bar and the val probability."""
    if not is_local(cfg.source):
        return HUB_SUBSET_TOKENS.get(cfg.subset)
    builder, files = local_files(cfg.source)
    if builder == "parquet":
        return parquet_text_bytes(files) / BYTES_PER_TOKEN
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
    """Fills shard_tokens-sized buffers of tok's ids for one split and writes each as it fills."""

    def __init__(self, data_dir, split, shard_tokens, tok, state, partial):
        self.data_dir, self.split = data_dir, split
        self.eot, self.n_vocab = tok.eot, text_vocab(tok)
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
            shard = self.buffer[:self.fill]
            write_shard(shard_path(self.data_dir, self.split, self.shards), shard,
                        n_docs=int(np.count_nonzero(shard == self.eot)), n_vocab=self.n_vocab)
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


def recorded_settings(cfg, tok):
    """What a preparation is checked against when it resumes: the settings that decide its shards."""
    settings = {k: getattr(cfg, k) for k in ("source", "subset", "shard_tokens", "val_tokens", "max_tokens")}
    if tok.hash != "gpt2":  # folders prepared before tokenizers were recorded still resume
        settings["tokenizer"] = tok.hash
    return settings


def start_or_resume(cfg, settings):
    """The progress of data_dir's preparation, or a new one -> (state, train tail, val tail): the tails
    are the tokens placed but not yet in a shard."""
    state_path = os.path.join(cfg.data_dir, PREPARE_STATE)
    if os.path.exists(state_path):
        state, train_partial, val_partial = load_state(state_path)
        if state["settings"] != settings:
            differ = ", ".join(f"{k}={state['settings'].get(k)!r} there, {settings.get(k)!r} now"
                               for k in sorted(set(state["settings"]) | set(settings))
                               if state["settings"].get(k) != settings.get(k))
            raise UserError(f"{cfg.data_dir} holds a preparation with other settings ({differ}); "
                            f"use another data_dir, or delete {cfg.data_dir} to start over")
        if not state["done"]:
            print0(f"resuming after {state['records']:,} documents "
                   f"({state['train']['tokens'] + state['val']['tokens']:,} tokens)")
        return state, train_partial, val_partial
    if any(name.endswith(".bin") for name in os.listdir(cfg.data_dir)):
        raise UserError(f"{cfg.data_dir} holds shards that this script did not start (no {PREPARE_STATE}); "
                         "use an empty data_dir")
    empty = {"shards": 0, "tokens": 0, "docs": 0, "partial": 0}
    p_val, val_limit = choose_val_split(cfg)
    state = {"settings": settings, "val_probability": p_val, "val_limit": val_limit, "records": 0,
             "train": dict(empty), "val": dict(empty), "done": False}
    nothing = np.empty(0, dtype=np.uint16)
    return state, nothing, nothing


class Preparation:
    """The unfinished part of a preparation: the source's documents after the ones already placed,
    each tokenized and placed in train or val. Its counters live in state, saved with every shard,
    so a run killed at any moment resumes to exactly the shards an uninterrupted run writes."""

    def __init__(self, cfg, tok, state, train_partial, val_partial):
        self.cfg, self.tok, self.state = cfg, tok, state
        self.state_path = os.path.join(cfg.data_dir, PREPARE_STATE)
        self.train = SplitWriter(cfg.data_dir, "train", cfg.shard_tokens, tok, state["train"], train_partial)
        self.val = SplitWriter(cfg.data_dir, "val", cfg.shard_tokens, tok, state["val"], val_partial)
        self.p_val, self.records_done = state["val_probability"], state["records"]
        self.val_limit = state.get("val_limit", cfg.val_tokens)  # progress saved before the limit existed: val_tokens
        self.bar = None

    @property
    def tokens(self):
        return self.train.tokens + self.val.tokens

    def run(self):
        """Place the remaining documents, write the last shards and mark the preparation done."""
        cfg = self.cfg
        print0(f"val: documents with hash < {self.p_val:.4g} until val holds {self.val_limit:,} tokens"
               + (f" ({VAL_MAX_SHARE:.0%} of the source's estimated size; val_tokens={cfg.val_tokens:,})"
                  if self.val_limit < cfg.val_tokens else ""))
        num_proc = resolve_num_proc(cfg.num_proc)
        pool = make_pool(num_proc, self.tok) if num_proc > 1 else None  # before datasets starts any thread
        try:
            records = self.remaining_records()
            estimate = estimate_source_tokens(cfg)
            total = cfg.max_tokens or estimate
            self.bar = tqdm(total=int(total) if total else None, initial=self.tokens, unit="tok", unit_scale=True,
                            smoothing=0.05, disable=int(os.environ.get("RANK", 0)) != 0)
            start = time.time()
            if not (cfg.max_tokens and self.tokens >= cfg.max_tokens):  # a resumed run may hold them all already
                self.place_all(tokenize_stream(records, self.tok, num_proc=1, pool=pool))
        finally:
            if self.bar is not None:
                self.bar.close()
            if pool is not None:
                pool.terminate()
        self.train.flush()
        self.val.flush()
        self.state["done"] = True
        self.checkpoint()
        self.report(time.time() - start)

    def remaining_records(self):
        """The source's records after those already placed (in shards or in the saved partial buffers)."""
        records = open_records(self.cfg.source, self.cfg.subset)
        for _ in range(self.records_done):
            if next(records, None) is None:
                raise UserError(f"the source has fewer documents than {self.cfg.data_dir} already consumed: it "
                                f"changed since the preparation began; delete {self.cfg.data_dir} to start over")
        return records

    def place_all(self, chunks):
        """Place every document of the tokenized chunks, until max_tokens. They are placed one behind
        the reader, so the last one of the stream is known as the last."""
        pending, finished = None, False
        for chunk in chunks:
            for document in chunk:
                finished = pending is not None and self.place(*pending, last=False)
                if finished:
                    break
                pending = document
            self.bar.set_postfix(docs=f"{self.train.docs + self.val.docs:,}", refresh=False)
            if finished:
                return
        if pending is not None:
            self.place(*pending, last=True)

    def place(self, split_hash, tokens, last):
        """Add one document to its split -> True when it is the last one max_tokens allows."""
        self.records_done += 1  # counted when placed: a resumed run skips exactly the placed documents
        if split_hash is None:
            self.count_without_text()
        if not len(tokens):
            return False  # an empty document
        train, val, max_tokens = self.train, self.val, self.cfg.max_tokens
        last = last or bool(max_tokens and self.tokens + len(tokens) >= max_tokens)
        to_val = split_hash < self.p_val and val.tokens < self.val_limit
        # a small source whose documents all hashed into train: its last document keeps val from being empty
        to_val = to_val or (last and not val.tokens and train.tokens > 0)
        if (val if to_val else train).add(tokens):
            self.checkpoint()  # a shard was written: record the position that goes with it
        self.bar.update(len(tokens))
        return last

    def count_without_text(self):
        """A record without text (datasets gives None where a record lacks the column others have): counted,
        reported at the end, and past MAX_NO_TEXT_SHARE of the records an error, as the source is not what
        it seems."""
        self.state["records_without_text"] = without = self.state.get("records_without_text", 0) + 1
        if without > 10 and without > MAX_NO_TEXT_SHARE * self.records_done:
            raise UserError(f"{without:,} of the first {self.records_done:,} records of {self.cfg.source} have no "
                            f"'text' (more than {MAX_NO_TEXT_SHARE:.0%}): check that its documents are in a 'text' "
                            f"field; fix the source, delete {self.cfg.data_dir} and prepare again")

    def checkpoint(self):
        self.state.update(records=self.records_done, train=self.train.state(), val=self.val.state())
        save_state(self.state_path, self.state, [self.train, self.val])

    def report(self, elapsed):
        """The summary; an error when a split got no document (train.py would refuse the folder: say so
        now, not at the start of training)."""
        cfg, train, val = self.cfg, self.train, self.val
        without = self.state.get("records_without_text")
        if without:
            print0(f"note: {without:,} records of {cfg.source} had no 'text' and were skipped")
        print0(f"done: train {train.tokens:,} tokens in {train.docs:,} documents ({train.shards} shards), "
               f"val {val.tokens:,} tokens in {val.docs:,} documents ({val.shards} shards), in {elapsed:.0f}s")
        for split, writer in (("train", train), ("val", val)):
            if not writer.tokens:
                more = (f"raise max_tokens (max_tokens={cfg.max_tokens} stopped it)"
                        if cfg.max_tokens and self.tokens >= cfg.max_tokens else "prepare more documents")
                raise UserError(f"no document went to {split} ({train.docs + val.docs:,} documents in all), "
                                f"and training needs both splits: delete {cfg.data_dir} and {more}")


def prepare(cfg, recipes=()):
    """Write the shards of cfg -> the progress state. recipes: the config files given, for the hint at the end."""
    hold_folder(cfg.data_dir)  # one writer: two preparations at once would mix their shards
    tok = load_tokenizer(cfg.tokenizer)
    record_tokenizer(cfg.data_dir, tok)
    remove_temporaries(cfg.data_dir, rf"(train|val)_\d{{6}}\.bin|{re.escape(PREPARE_STATE)}")  # of a killed run
    state, train_partial, val_partial = start_or_resume(cfg, recorded_settings(cfg, tok))
    if state["done"]:
        for split in ("train", "val"):
            list_shards(cfg.data_dir, split)  # every shard still there, each the size prepared
        print0(f"{cfg.data_dir} is already complete: {state['train']['shards']} train and "
               f"{state['val']['shards']} val shards; nothing to do")
    else:
        Preparation(cfg, tok, state, train_partial, val_partial).run()
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
