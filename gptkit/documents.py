"""
Documents -> tokens: the normalisation every reader of documents shares (prepare_fineweb.py,
train_tokenizer.py) and the parallel tokenizer that prepare_fineweb.py runs (bench.py times it).
The tokenizer is always given; the pool's worker processes get their copy once, when they start.

    tok = load_tokenizer("gpt2")
    arrays = tokenize_documents(texts, tok, num_proc=0)   # <|endoftext|> + ids per text, on all cores
    pool = make_pool(4, tok)                              # made before any reader starts threads
    for chunk in tokenize_stream(records, tok, pool=pool):   # records: (id, text) -> [(split hash, ids)]
        ...
    normalize_text(text), split_hash(record_id, text)    # CRLF -> LF, no BOM; the stable train/val hash
"""

import collections
import ctypes
import hashlib
import multiprocessing
import os
import signal
import sys

import numpy as np

from gptkit.tokenizer import tokenizer_from_string


def normalize_line_ends(text):
    """CRLF and lone CR -> LF."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def normalize_text(text):
    """CRLF and lone CR -> LF, a leading byte-order mark dropped; "" for a document with no text."""
    text = normalize_line_ends(text)
    if text.startswith("\ufeff"):
        text = text[1:]
    return text if text.strip() else ""


def split_hash(record_id, text):
    """A stable number in [0, 1) for a document: from its id when it has one, else its text. The same
    document lands in the same split in every run, on every machine (Python's hash() is salted)."""
    key = f"id:{record_id}" if record_id is not None else f"text:{text}"
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def tokenize_records(records, tok):
    """[(id, raw text)] -> [(split hash, uint16 tokens)]: <|endoftext|> then the normalised text's ids;
    an empty document gives an empty array, a text of None (a record without one) a hash of None too."""
    out = []
    for record_id, text in records:
        if text is None:  # a record without text: counted by the caller, never silently an empty document
            out.append((None, np.empty(0, dtype=np.uint16)))
            continue
        text = normalize_text(text)
        if not text:
            out.append((1.0, np.empty(0, dtype=np.uint16)))
            continue
        encoded = tok.encode(text)  # encode(): dataset text never becomes a control token
        ids = np.empty(len(encoded) + 1, dtype=np.uint16)
        ids[0], ids[1:] = tok.eot, encoded
        out.append((split_hash(record_id, text), ids))
    return out


def resolve_num_proc(num_proc):
    if num_proc > 0:
        return num_proc
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


# Per-worker state: set once in each pool process by _init_worker; the main process never reads it.
_worker_tokenizer = None


def _init_worker(parent_pid, tokenizer_text):
    """A tokenizer worker: Ctrl-C is the parent's to handle (it terminates the pool), so no traceback from
    every worker; and the worker dies with its parent, however the parent dies (kill -9 included), instead
    of living on and printing BrokenPipeError tracebacks."""
    global _worker_tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the line above
        os._exit(1)
    # rebuilt from its text, which any start method can send (a spawned worker starts without the parent's)
    _worker_tokenizer = tokenizer_from_string(tokenizer_text)


def _tokenize_in_worker(records):
    """What a pool worker runs for one chunk: tokenize_records with the tokenizer _init_worker gave it."""
    return tokenize_records(records, _worker_tokenizer)


def make_pool(num_proc, tok):
    """A process pool for tokenize_stream, tokenizing with tok. Made before any reader starts threads,
    it can fork (fast: the children inherit the imports); where fork is missing, spawn."""
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    return context.Pool(num_proc, initializer=_init_worker, initargs=(os.getpid(), tok.to_string()))


def _chunks(records, size):
    """An iterable -> lists of `size` of its items (the last one shorter), read as they are needed."""
    chunk = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def tokenize_stream(records, tok, num_proc=0, chunk_docs=256, pool=None):
    """Tokenize an iterable of (id, text) with tok in chunks on num_proc processes (0: all cores; or on
    pool, which make_pool(n, tok) made with the same tok). Yields one list of (split hash, tokens) per
    chunk, in input order. At most 2 chunks per process are in flight, so memory stays bounded however
    fast the input arrives."""
    num_proc = pool._processes if pool is not None else resolve_num_proc(num_proc)
    if num_proc == 1 and pool is None:
        for chunk in _chunks(records, chunk_docs):
            yield tokenize_records(chunk, tok)
        return
    own_pool = pool is None
    pool = pool or make_pool(num_proc, tok)
    try:
        pending = collections.deque()
        for chunk in _chunks(records, chunk_docs):
            pending.append(pool.apply_async(_tokenize_in_worker, (chunk,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
    finally:
        if own_pool:
            pool.terminate()


def tokenize_documents(texts, tok, num_proc=0):
    """Texts -> list of uint16 arrays (<|endoftext|> + ids of the normalised text; empty for an
    empty document), tokenized with tok on num_proc processes. What prepare_fineweb.py does per document."""
    records = ((None, text) for text in texts)
    return [tokens for chunk in tokenize_stream(records, tok, num_proc) for _, tokens in chunk]
