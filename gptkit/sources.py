"""
Where documents come from: a hub dataset streamed with `datasets`, or local .parquet / .jsonl / .txt
files (a file, or a folder of one kind). prepare_fineweb.py and train_tokenizer.py read their
documents here; quickstart.py tells paths from hub names with it.

    for record_id, text in open_records("HuggingFaceFW/fineweb-edu", "sample-10BT"):   # or a local path
        ...                                  # record_id: the record's id or None; text: raw, or None
    is_local("my_texts/")                    # a path (True) or a hub name (False)?
    problems = source_problems(cfg.source)   # a config check: a path that does not exist
    builder, files = local_files("my_texts/")   # "parquet" | "json" | "text", the sorted files

Parquet and jsonl go through the same streaming code path; records need a `text` column, and an
`id` column, when present, is passed on (prepare_fineweb.py splits by it). A .txt file is one text,
read in blocks (any size fits in memory) and cut at paragraph breaks into documents of about 16K
characters (text_pieces), so that a folder of a few books still gets a val split.
"""

import codecs
import json
import os

import pyarrow.parquet as pq

from gptkit.configurator import UserError
from gptkit.documents import normalize_line_ends

LOCAL_KINDS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}
TXT_PIECE_CHARS = 16_000  # .txt files are cut into documents of about this size (about 4K tokens)


def is_local(source):
    """A path on this machine, or a hub name? Existing paths and things that look like paths are local."""
    return (os.path.exists(source) or source.startswith((".", "/", "~")) or source.endswith(("/", os.sep))
            or os.path.splitext(source)[1].lower() in LOCAL_KINDS)


def source_problems(source, key="source"):
    """The config check of a script's source key -> a list of problems (empty when usable): a path that
    does not exist would otherwise be taken for a hub name, and fail minutes later."""
    if is_local(source) and not os.path.exists(source):
        return [f"{key}={source!r} does not exist: give an existing parquet/jsonl/txt file or folder, or a hub "
                "dataset name such as HuggingFaceFW/fineweb-edu"]
    return []


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


def open_records(source, subset=""):
    """-> iterator of (id or None, text), in the source's order: .txt files read here in blocks, the
    rest through datasets' streaming mode. subset: the hub dataset's config (ignored for local files)."""
    if not is_local(source):
        try:
            records = _stream(source, name=subset or None)
        except Exception as e:  # no network, a misspelt name or subset
            raise UserError(f"could not open {source!r} (subset {subset!r}) on the Hugging Face hub "
                             f"({type(e).__name__}: {e}). Check the name, the subset and the network, or prepare "
                             "local files: --source=path/to/folder of parquet, jsonl or txt files") from e
        return _dataset_records(source, records)
    builder, files = local_files(source)
    if builder == "text":
        return _txt_records(files)
    return _dataset_records(source, _stream(builder, data_files=files), builder, files)


def _stream(*args, **kwargs):
    """datasets.load_dataset's train split, streamed: nothing is downloaded whole first."""
    from datasets import load_dataset  # a heavy import (over a second) that only the datasets paths need
    return load_dataset(*args, split="train", streaming=True, **kwargs)


def _txt_records(files):
    for path in files:
        for piece in txt_pieces(path):
            yield None, piece


def _dataset_records(source, ds, builder=None, files=()):
    """A streamed dataset's records -> (id or None, text); a failure names the file and the fix."""
    try:
        for number, record in enumerate(ds):
            text = record.get("text")
            if "text" not in record or not isinstance(text, (str, type(None))):
                raise UserError(f"record {number} of {source} has no 'text' string (fields: "
                                 f"{ {k: type(v).__name__ for k, v in record.items()} }); give a source whose "
                                 "documents are strings in a 'text' column")
            yield record.get("id"), text  # None: this record has no text (other records gave the column)
    except UserError:
        raise
    except Exception as e:  # datasets names neither the file nor the fix: find them
        found = unreadable_file(builder, files) if builder else None
        where, why = found or (source, f"{type(e).__name__}: {str(e)[:300]}")
        raise UserError(f"reading {where} failed: {why}. Fix or remove it, then run the same command "
                         "again: it goes on from the last shard written") from e


def unreadable_file(builder, files):
    """-> (path, reason) for the first local file that cannot be read, or None. Called only after the
    reader failed, so reading every file again costs nothing in a normal run."""
    for path in files:
        try:
            if builder == "parquet":
                pq.ParquetFile(path).read(columns=["text"])
            elif path.endswith(".json"):
                with open(path, "rb") as f:
                    json.loads(f.read().decode("utf-8"))
            else:
                problem = _bad_json_line(path)
                if problem:
                    return path, problem
        except UnicodeDecodeError as e:
            return path, (f"it is not UTF-8 text (byte {e.start}); convert it, for example with "
                          "iconv -f cp1252 -t utf-8")
        except Exception as e:
            return path, f"the file is truncated or not valid {builder} ({type(e).__name__}: {str(e)[:200]})"
    return None


def _bad_json_line(path):
    """What is wrong with a .jsonl file's first line that is not JSON, or None."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    json.loads(line)
                except ValueError as e:
                    return f"line {number} is not valid JSON ({e})"
    return None


def parquet_text_bytes(files):
    """The uncompressed size of the text column of parquet files, from their footers only."""
    text_bytes = 0
    for path in files:
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
    return text_bytes


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
