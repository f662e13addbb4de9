"""
Instruction data -> rendered chat conversations with loss masks (the SFT format of gptkit/sft.py).

    python prepare_instruct.py config/dolly.py                   # databricks/databricks-dolly-15k from the hub
    python prepare_instruct.py config/alpaca.py
    python prepare_instruct.py --sources=path/to/instruction-data.json --data_dir=data/mine
    python prepare_instruct.py --sources='["databricks/databricks-dolly-15k", "my_chats.jsonl*2"]'
    python prepare_instruct.py config/dolly.py --tokenizer=tokenizers/mytext   # your own tokenizer (kept in data_dir)

A source is a hub dataset name or a local .json (a list of records, or one record per line) or
.jsonl file. Its schema is told from the fields of its records:
    dolly     instruction, context (optional), response       the context goes into the user turn
    alpaca    instruction, input (optional), output           Stanford Alpaca, alpaca-cleaned, ...
    messages  messages: [{role: system|user|assistant, content}, ...]
Mixing: "NAME*W" weights a source: W=2 repeats each of its conversations twice in train, W=0.5
keeps a fixed half of them (chosen by a seeded hash); val gets each kept conversation once.
Exact duplicates are removed (the first copy that its source's weight keeps wins), conversations
that do not fit a row of block_size+1 tokens are dropped or truncated (overlong=...), and train/val is decided per
conversation by a stable hash of its text, so it never changes between runs. Bad records (a missing
field, an empty response, invalid UTF-8, a line that is not JSON) are skipped and counted, or stop
the run with the file and record index (on_bad_record=error). A file that cannot be read as a whole
(not JSON, a JSON object instead of a list) always stops the run: skipping it would drop a source.
"""

import collections
import hashlib
import json
import math
import os
from dataclasses import dataclass, field

from gptkit.configurator import BaseConfig, UserError, configure, print_config


@dataclass
class InstructConfig(BaseConfig):
    sources: list[str] = field(default_factory=lambda: ["databricks/databricks-dolly-15k"])  # hub names or local files, NAME*WEIGHT to mix
    data_dir: str = "data/dolly"      # output folder
    val_fraction: float = 0.05        # share of conversations held out for val loss (finetune.py needs some; 0: none)
    block_size: int = 1024            # the model's context: a conversation must fit block_size+1 tokens
    overlong: str = "drop"            # drop | truncate conversations longer than that
    on_bad_record: str = "skip"       # skip (and count) | error (stop, naming file and record); unreadable files always stop
    system: str = ""                  # system prompt for conversations that bring none ("" for none)
    tokenizer: str = "gpt2"           # gpt2, or the folder of a tokenizer train_tokenizer.py made

    def validate(self):
        problems = super().validate()
        if not self.sources:
            problems.append("sources is empty: give hub dataset names or local .json/.jsonl files")
        for spec in self.sources:
            try:
                name, _ = parse_source(spec)
            except ValueError as e:
                problems.append(str(e))
                continue
            if os.path.isdir(name):
                problems.append(f"source {name} is a folder: name its .json or .jsonl files, as in "
                                f"--sources='[\"{name}/a.jsonl\", \"{name}/b.json\"]'")
            elif name.endswith((".json", ".jsonl")) and not os.path.exists(name):
                problems.append(f"source {name}: no such file")
        from gptkit.tokenizer import tokenizer_problems
        problems += tokenizer_problems(self.tokenizer)
        if not 0.0 <= self.val_fraction < 1.0:
            problems.append(f"val_fraction={self.val_fraction} must be in [0, 1)")
        if self.block_size < 8:
            problems.append(f"block_size={self.block_size} is too small for a conversation")
        if self.overlong not in ("drop", "truncate"):
            problems.append(f"overlong={self.overlong!r}: use drop or truncate")
        if self.on_bad_record not in ("skip", "error"):
            problems.append(f"on_bad_record={self.on_bad_record!r}: use skip or error")
        return problems


class InstructDataError(UserError, ValueError):
    """An unreadable source, or a bad record when on_bad_record=error; the message names the file and record."""


class BadRecord(Exception):
    """One record that cannot become a training example; the message is the reason, counted by it."""


def parse_source(spec):
    """'name' or 'name*weight' -> (name, weight)."""
    name, star, weight = spec.rpartition("*")
    if not star:
        return spec, 1.0
    try:
        weight = float(weight)
    except ValueError:
        raise ValueError(f"source {spec!r}: the weight after '*' must be a number, as in data.jsonl*2")
    if weight < 0 or not math.isfinite(weight):
        raise ValueError(f"source {spec!r}: the weight must be 0 or more")
    return name, weight


# ----------------------------------------------------------------------------- reading

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


def read_hub_records(name):
    import datasets  # only here: the GPU machine may lack it
    try:
        return enumerate(datasets.load_dataset(name, split="train"))
    except Exception as e:
        raise InstructDataError(f"source {name!r} is no local file, and loading it from the Hugging Face hub failed "
                                f"({type(e).__name__}: {e}); check the name or the path") from e


SCHEMAS = {  # schema -> (required fields, optional fields)
    "messages": (("messages",), ()),
    "dolly": (("instruction", "response"), ("context",)),
    "alpaca": (("instruction", "output"), ("input",)),
}


def detect_schema(records, source):
    """The schema whose fields the records share most (a few broken records do not change it)."""
    votes = collections.Counter()
    for _, record in records[:1000]:
        if isinstance(record, dict):
            keys = set(record)
            scores = {s: len(keys & set(req + opt)) for s, (req, opt) in SCHEMAS.items()}
            best = max(scores.values())
            if best:
                votes.update(s for s, v in scores.items() if v == best)
    if not votes:
        raise InstructDataError(f"{source}: cannot tell the schema: records need instruction+response "
                                "(Dolly), instruction+output (Alpaca) or messages (chat)")
    return votes.most_common(1)[0][0]


def _text(record, key, required=True):
    value = record.get(key)
    if value is None:
        if required:
            raise BadRecord(f"missing field {key!r}")
        return ""
    if not isinstance(value, str):
        raise BadRecord(f"field {key!r} is not text")
    try:
        value.encode("utf-8")  # fails on the lone surrogates that stand for undecodable bytes
    except UnicodeEncodeError:
        raise BadRecord("invalid UTF-8")
    return value.strip()


def to_messages(record, schema, system):
    """One record of a known schema -> [{role, content}, ...], or BadRecord with the reason."""
    if not isinstance(record, dict):
        raise BadRecord("not a JSON object")
    if schema == "messages":
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRecord("missing field 'messages'")
        out = []
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise BadRecord("a message needs role system, user or assistant")
            out.append({"role": m["role"], "content": _text(m, "content")})
        if not any(m["role"] == "assistant" for m in out):
            raise BadRecord("no assistant message")
        if any(m["role"] == "assistant" and not m["content"] for m in out):
            raise BadRecord("empty response")
        if any(m["role"] == "system" for m in out[1:]):
            raise BadRecord("a system message may only come first")
    else:
        answer_key, extra_key = ("response", "context") if schema == "dolly" else ("output", "input")
        instruction, extra = _text(record, "instruction"), _text(record, extra_key, required=False)
        answer = _text(record, answer_key)
        if not instruction:
            raise BadRecord("empty instruction")
        if not answer:
            raise BadRecord("empty response")
        user = f"{instruction}\n\n{extra}" if extra else instruction
        out = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    # an empty system message is no system prompt: rendered, it would train <|system|><|end|>, a
    # prompt that finetune.py and sample.py never write for an empty system prompt
    out = [m for m in out if m["role"] != "system" or m["content"]]
    if system and out[0]["role"] != "system":
        out = [{"role": "system", "content": system}] + out
    return out


def stable_fraction(*parts):
    """A number in [0, 1) from the text: the same on every machine and Python version."""
    digest = hashlib.sha1("\x00".join(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


# ----------------------------------------------------------------------------- the pipeline

def prepare(cfg):
    """Read, clean, mix, split, write. Returns the summary dict (also printed and kept in meta.json)."""
    from gptkit.sft import write_sft
    from gptkit.system import print0
    from gptkit.tokenizer import load_tokenizer, use_tokenizer

    tokenizer = use_tokenizer(load_tokenizer(cfg.tokenizer))
    seen = set()  # conversation keys, for exact duplicates across all sources
    train, val, summary = [], [], {}
    for spec in cfg.sources:
        name, weight = parse_source(spec)
        stats = summary.setdefault(spec, collections.Counter())
        stats["weight"] = weight
        try:
            records = list(read_local_records(name) if os.path.exists(name) else read_hub_records(name))
        except BadRecord as e:  # the whole file is unreadable: never skipped, a source would silently vanish
            raise InstructDataError(f"{name}: {e}") from None
        schema = detect_schema(records, name)
        stats["schema"] = schema
        kept = []
        for index, record in records:
            stats["read"] += 1
            try:
                if isinstance(record, BadRecord):
                    raise record
                messages = to_messages(record, schema, cfg.system)
                ids, mask = tokenizer.render_conversation(messages)
            except (BadRecord, ValueError) as e:
                if cfg.on_bad_record == "error":
                    raise InstructDataError(f"{name}, record {index}: {e} (set on_bad_record=skip to skip such records)")
                stats[f"bad: {e}"] += 1
                continue
            key = json.dumps(messages, ensure_ascii=False)
            if len(ids) > cfg.block_size + 1:
                if cfg.overlong == "drop":
                    stats["overlong dropped"] += 1
                    continue
                ids, mask = ids[:cfg.block_size + 1], mask[:cfg.block_size + 1]
                if not any(mask):
                    stats["overlong dropped (no answer left after truncating)"] += 1
                    continue
                stats["overlong truncated"] += 1
            kept.append((key, ids, mask))
        # weight = whole copies + a fixed share (by seeded hash) of one more copy
        whole, share = int(weight), weight - int(weight)
        for key, ids, mask in kept:
            copies = whole + (stable_fraction(str(cfg.seed), key) < share)
            if copies == 0:  # left out before the duplicate check: its copy in another source stays
                stats["left out by weight"] += 1
                continue
            if key in seen:
                stats["duplicates"] += 1
                continue
            seen.add(key)
            stats["kept"] += 1
            if stable_fraction(key) < cfg.val_fraction:  # unseeded: the split never moves
                val.append((ids, mask))
                stats["val"] += 1
                stats["val tokens"] += len(ids)
            else:
                train.extend([(ids, mask)] * copies)
                stats["train"] += copies
                stats["train tokens"] += copies * len(ids)
                stats["train loss tokens"] += copies * sum(mask)
    if not train:
        raise InstructDataError("no training conversations left: check the sources and the summary above "
                                f"{json.dumps(summary, default=int, indent=1)}")
    if cfg.val_fraction > 0 and not val:
        raise InstructDataError(f"val_fraction={cfg.val_fraction} left no conversation for val: raise it")
    summary = {spec: dict(stats) for spec, stats in summary.items()}
    # all files as one set: a run killed over a prepared folder leaves its old data, never a mix
    splits = write_sft(cfg.data_dir, {"train": train, "val": val},
                       {"block_size": cfg.block_size, "sources": summary, "system": cfg.system})
    for spec, stats in summary.items():
        print0(f"{spec}:")
        for key, value in stats.items():
            print0(f"  {key}: {value}")
    for split, counts in splits.items():
        print0(f"{split}: {counts['conversations']} conversations, {counts['tokens']} tokens")
    if not val:
        print0("note: no val split (val_fraction=0): finetune.py evaluates on one, so it cannot use this data")
    print0(f"wrote {cfg.data_dir}")
    return {"sources": summary, "splits": splits}


if __name__ == "__main__":
    from gptkit.system import run_main
    cfg = configure(InstructConfig)
    print_config(cfg)
    run_main(prepare, cfg)  # a bad source: one `error:` line naming it, exit code 2
