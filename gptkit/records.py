"""
Records of instruction, preference and task data: local .json / .jsonl files or Hugging Face hub
datasets, read the same way by prepare_instruct.py (chat conversations, preference pairs) and rl.py
(prompts with the answers a reward checks), and the stable hash that splits them into train and val.

    for index, record in read_records("data.jsonl"): ...     # or a hub name: its train split
"""

import hashlib
import json
import os

from gptkit.configurator import UserError


class InstructDataError(UserError, ValueError):
    """An unreadable source, or a bad record when on_bad_record=error; the message names the file and record."""


class BadRecord(Exception):
    """One record that cannot become a training example; the message is the reason, counted by it."""


def read_local_records(path):
    """Yield (index, record or BadRecord) from a local .json or .jsonl file. Bytes that are not UTF-8
    are kept as lone surrogates while parsing, so the one record holding them can be told apart."""
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="surrogateescape")
    text = text.removeprefix("\ufeff")  # a byte-order mark some editors write
    stripped = text.lstrip(" \t\r\n")
    if path.endswith(".json") and stripped.startswith(("[", "{")):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as e:
            if not (stripped.startswith("{") and e.msg == "Extra data"):
                raise BadRecord(f"not valid JSON ({e.msg} at line {e.lineno})")
            data = None  # several objects: one record per line after all
        if data is not None:
            if not isinstance(data, list):
                raise BadRecord("the file holds a JSON object, not a list of records: write [record, record, ...] "
                                "or one record per line")
            yield from enumerate(data)
            return
    # lines end at "\n" only: splitlines() would also cut at U+2028, U+0085, ..., which JSON strings may hold raw
    for index, line in enumerate(text.split("\n")):
        if not line.strip():
            continue
        try:
            yield index, json.loads(line)
        except json.JSONDecodeError as e:
            yield index, BadRecord(f"line {index + 1} is not valid JSON ({e.msg})")


HUB_SPLITS = {"HuggingFaceH4/ultrafeedback_binarized": "train_prefs"}  # hub datasets without a "train" split
HUB_CONFIGS = {"openai/gsm8k": "main", "gsm8k": "main"}  # hub datasets that need a config name


def read_hub_records(name, split=None):
    """Yield (index, record) of a hub dataset's split (default: train, or the one HUB_SPLITS names)."""
    import datasets  # heavy and optional: only a hub source needs it, local files prepare without it
    split = split or HUB_SPLITS.get(name, "train")
    try:
        config = (HUB_CONFIGS[name],) if name in HUB_CONFIGS else ()
        return enumerate(datasets.load_dataset(name, *config, split=split))
    except Exception as e:
        raise InstructDataError(f"source {name!r} is no local file, and loading its {split} split from the Hugging "
                                f"Face hub failed ({type(e).__name__}: {e}); check the name or the path") from e


def read_records(name, split=None):
    """A local file's records, or a hub dataset's split, as a list of (index, record or BadRecord).
    A file that cannot be read as a whole raises InstructDataError: skipped, a source would vanish."""
    try:
        return list(read_local_records(name) if os.path.exists(name) else read_hub_records(name, split))
    except BadRecord as e:
        raise InstructDataError(f"{name}: {e}") from None


def stable_fraction(*parts):
    """A number in [0, 1) from the text: the same on every machine and Python version."""
    digest = hashlib.sha1("\x00".join(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


