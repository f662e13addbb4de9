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
Preference pairs (for dpo.py) come in the schemas trl documents, told apart by chosen + rejected:
    prompt, chosen, rejected as strings, or as message lists (explicit prompt); the prompt's
        messages may also open chosen and rejected (UltraFeedback binarized, HuggingFaceH4/
        ultrafeedback_binarized, whose hub split train_prefs is read)
    chosen, rejected only (implicit prompt): message lists whose shared opening is the prompt, or
        Anthropic HH-RLHF transcripts "\n\nHuman: ...\n\nAssistant: ..." (parsed into turns)
    Each pair is written as two conversations (prompt + chosen, prompt + rejected), the loss mask on
    the answer only; a pair whose answers are the same is dropped and counted. Truncation
    (overlong=truncate) of a pair longer than block_size+1: the prompt loses its oldest tokens (after
    <|endoftext|>) until the longer answer fits, but keeps at least half of block_size; then both
    answers lose their ends. A source's records are all pairs or all conversations, and so is a run.
Mixing: "NAME*W" weights a source: W=2 repeats each of its conversations twice in train, W=0.5
keeps a fixed half of them (chosen by a seeded hash); val gets each kept conversation once.
Exact duplicates are removed (the first copy that its source's weight keeps wins), conversations
that do not fit a row of block_size+1 tokens are dropped or truncated (overlong=...), and train/val is decided per
conversation by a stable hash of its text, so it never changes between runs. Bad records (a missing
field, an empty response, invalid UTF-8, a line that is not JSON) are skipped and counted, or stop
the run with the file and record index (and line, in a .jsonl file) (on_bad_record=error). A file that cannot be read as a whole
(not JSON, a JSON object instead of a list) always stops the run: skipping it would drop a source.
"""

import collections
import json
import math
import os
import re
from dataclasses import dataclass, field

from gptkit.configurator import BaseConfig, configure, print_config
from gptkit.lock import hold_folder, release_folder
from gptkit.records import BadRecord, InstructDataError, read_records, stable_fraction
from gptkit.sft import write_sft
from gptkit.system import print0, run_main
from gptkit.tokenizer import load_tokenizer, tokenizer_problems


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


def parse_source(spec):
    """'name' or 'name*weight' -> (name, weight)."""
    name, star, weight = spec.rpartition("*")
    if not star:
        name = spec
    if not name:
        raise ValueError(f"source {spec!r} has no name: give a hub dataset name or a local file, as in data.jsonl*2")
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

SCHEMAS = {  # schema -> (required fields, optional fields)
    "preference": (("chosen", "rejected"), ("prompt",)),
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


def _message_list(value, key):
    """A list of {role, content} -> checked messages."""
    if not isinstance(value, list) or not value:
        raise BadRecord(f"field {key!r} is neither text nor a list of messages")
    out = []
    for m in value:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise BadRecord(f"a message in {key!r} needs role system, user or assistant")
        out.append({"role": m["role"], "content": _text(m, "content")})
    return out


HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh(text, key):
    """An Anthropic HH-RLHF transcript "\n\nHuman: ...\n\nAssistant: ..." -> messages."""
    parts = HH_TURN.split(text if text.startswith("\n\n") else "\n\n" + text)
    if len(parts) < 3 or parts[0].strip():
        raise BadRecord(f"field {key!r} is no Human/Assistant transcript")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]


def to_pair(record, system):
    """One preference record -> (prompt messages, chosen answer, rejected answer), or BadRecord."""
    if not isinstance(record, dict):
        raise BadRecord("not a JSON object")
    for key in ("chosen", "rejected"):
        if record.get(key) is None:
            raise BadRecord(f"missing field {key!r}")
    sides = {}
    for key in ("chosen", "rejected"):
        value = record[key]
        if isinstance(value, str):
            text = _text(record, key)
            sides[key] = [{"role": "assistant", "content": text}] if "prompt" in record else parse_hh(record[key], key)
        else:
            sides[key] = _message_list(value, key)
    if "prompt" in record:
        prompt = record["prompt"]
        prompt = [{"role": "user", "content": _text(record, "prompt")}] if isinstance(prompt, str) else \
            _message_list(prompt, "prompt")
        for key, messages in sides.items():  # UltraFeedback repeats the prompt in chosen and rejected
            if messages[:len(prompt)] == prompt:
                sides[key] = messages[len(prompt):]
            sides[key] = prompt + sides[key]
    chosen, rejected = sides["chosen"], sides["rejected"]
    shared = 0  # the prompt is the longest shared opening (trl's implicit prompt), cut at a turn
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    prompt = chosen[:shared]
    if chosen[shared:] != [chosen[-1]] or rejected[shared:] != [rejected[-1]]:
        raise BadRecord("chosen and rejected must differ only in their last (assistant) message")
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise BadRecord("chosen and rejected must end with an assistant message")
    if not chosen[-1]["content"] or not rejected[-1]["content"]:
        raise BadRecord("empty response")
    if not prompt or prompt[-1]["role"] == "assistant" or any(m["role"] == "system" for m in prompt[1:]):
        raise BadRecord("the prompt must be user (and system) turns ending with a user turn")
    prompt = [m for m in prompt if m["role"] != "system" or m["content"]]
    if system and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system}] + prompt
    return prompt, chosen[-1]["content"], rejected[-1]["content"]


def render_pair(tokenizer, prompt, chosen, rejected, block_size, overlong):
    """-> ([(ids, mask) of prompt + chosen, (ids, mask) of prompt + rejected], note): the mask on the
    answer only, cut by the rule in the docstring above when overlong=truncate; the pair is None when
    it is dropped; note (for the summary) says what happened to an overlong pair."""
    head = tokenizer.render_prompt(prompt)
    answers = [tokenizer.encode(text) + [tokenizer.end] for text in (chosen, rejected)]
    limit = block_size + 1
    if len(head) + max(map(len, answers)) > limit:
        if overlong == "drop":
            return None, "overlong dropped"
        keep = max(limit - max(map(len, answers)), limit // 2)  # prompt tokens kept, <|endoftext|> included
        if len(head) > keep:
            head = head[:1] + head[len(head) - keep + 1:]
        answers = [a[:limit - len(head)] for a in answers]
        if answers[0] == answers[1]:
            return None, "overlong dropped (answers identical after truncating)"
        note = "overlong truncated"
    else:
        note = None
    return [(head + a, [0] * len(head) + [1] * len(a)) for a in answers], note


# ----------------------------------------------------------------------------- the pipeline

def make_example(record, schema, cfg, tokenizer, stats):
    """A record -> (its duplicate key, [(ids, mask)]: one conversation, or a pair's two), or (key, None)
    when it is dropped and counted in stats; BadRecord / ValueError for a bad record."""
    if schema == "preference":
        prompt, chosen, rejected = to_pair(record, cfg.system)
        key = json.dumps([prompt, chosen, rejected], ensure_ascii=False)
        if chosen == rejected:
            stats["identical chosen and rejected dropped"] += 1
            return key, None
        example, note = render_pair(tokenizer, prompt, chosen, rejected, cfg.block_size, cfg.overlong)
        if note:
            stats[note] += 1
        return key, example
    messages = to_messages(record, schema, cfg.system)
    ids, mask = tokenizer.render_conversation(messages)
    key = json.dumps(messages, ensure_ascii=False)
    if len(ids) > cfg.block_size + 1:
        if cfg.overlong == "drop":
            stats["overlong dropped"] += 1
            return key, None
        ids, mask = ids[:cfg.block_size + 1], mask[:cfg.block_size + 1]
        if not any(mask):
            stats["overlong dropped (no answer left after truncating)"] += 1
            return key, None
        stats["overlong truncated"] += 1
    return key, [(ids, mask)]


def read_source(name):
    """A source's records and schema."""
    records = read_records(name)
    return records, detect_schema(records, name)


def check_kind(pairs, schema, name):
    """pairs: whether the sources before this one hold preference pairs (None: it is the first)
    -> whether this one does; a run is all pairs or all conversations."""
    is_pairs = schema == "preference"
    if pairs is not None and pairs != is_pairs:
        raise InstructDataError(f"{name} holds {'preference pairs' if is_pairs else 'conversations'}, unlike the "
                                "sources before it: prepare pairs (for dpo.py) and conversations (for finetune.py) "
                                "into separate data_dirs")
    return is_pairs


def clean_records(records, schema, name, cfg, tokenizer, stats):
    """A source's records -> [(duplicate key, example)] of those kept; a bad one is counted in stats
    and skipped, or stops the run with its record index (and line) when on_bad_record=error."""
    kept = []
    for index, record in records:
        stats["read"] += 1
        try:
            if isinstance(record, BadRecord):
                raise record
            key, example = make_example(record, schema, cfg, tokenizer, stats)
        except (BadRecord, ValueError) as e:
            if cfg.on_bad_record == "error":
                line = f"line {index + 1}; " if name.endswith(".jsonl") else ""
                raise InstructDataError(f"{name}, record {index}: {e} ({line}set on_bad_record=skip to skip "
                                        "such records)")
            stats[f"bad: {e}"] += 1
            continue
        if example:
            kept.append((key, example))
    return kept


def add_to_splits(kept, weight, cfg, seen, stats, train, val):
    """Each kept example whose key is not in seen (an earlier copy wins) goes to val once or to train
    `weight` times (whole copies + a fixed share, by seeded hash, of one more). Appends to train and val,
    adds the keys to seen, counts in stats."""
    whole, share = int(weight), weight - int(weight)
    for key, example in kept:
        copies = whole + (stable_fraction(str(cfg.seed), key) < share)
        if copies == 0:  # left out before the duplicate check: its copy in another source stays
            stats["left out by weight"] += 1
            continue
        if key in seen:
            stats["duplicates"] += 1
            continue
        seen.add(key)
        stats["kept"] += 1
        tokens = sum(len(ids) for ids, _ in example)
        if stable_fraction(key) < cfg.val_fraction:  # unseeded: the split never moves
            val.extend(example)
            stats["val"] += 1
            stats["val tokens"] += tokens
        else:
            train.extend(example * copies)
            stats["train"] += copies
            stats["train tokens"] += copies * tokens
            stats["train loss tokens"] += copies * sum(sum(mask) for _, mask in example)


def print_summary(summary, splits, pairs, data_dir):
    """Per source what was read, dropped and kept; per split what was written."""
    for spec, stats in summary.items():
        print0(f"{spec}:")
        for key, value in stats.items():
            print0(f"  {key}: {value}")
    for split, counts in splits.items():
        what = f"{counts['conversations'] // 2} pairs" if pairs else f"{counts['conversations']} conversations"
        print0(f"{split}: {what}, {counts['tokens']} tokens")
    if not splits["val"]["conversations"]:
        print0("note: no val split (val_fraction=0): finetune.py evaluates on one, so it cannot use this data")
    print0(f"wrote {data_dir}")


def prepare(cfg):
    """Read, clean, mix, split, write. Returns the summary dict (also printed and kept in meta.json)."""
    hold_folder(cfg.data_dir)  # one writer: two preparations at once would mix their files
    tokenizer = load_tokenizer(cfg.tokenizer)
    seen = set()  # conversation keys, for exact duplicates across all sources
    train, val, summary = [], [], {}  # train, val: (ids, mask) per conversation; a pair is two in a row
    pairs = None  # whether the sources hold preference pairs (all of them, or none)
    for spec in cfg.sources:
        name, weight = parse_source(spec)
        stats = summary.setdefault(spec, collections.Counter())
        stats["weight"] = weight
        records, schema = read_source(name)
        stats["schema"] = schema
        pairs = check_kind(pairs, schema, name)
        kept = clean_records(records, schema, name, cfg, tokenizer, stats)
        add_to_splits(kept, weight, cfg, seen, stats, train, val)
    if not train:
        raise InstructDataError("no training conversations left: check the sources and the summary above "
                                f"{json.dumps(summary, default=int, indent=1)}")
    if cfg.val_fraction > 0 and not val:
        raise InstructDataError(f"val_fraction={cfg.val_fraction} left no conversation for val: raise it")
    summary = {spec: dict(stats) for spec, stats in summary.items()}
    # all files as one set: a run killed over a prepared folder leaves its old data, never a mix
    splits = write_sft(cfg.data_dir, {"train": train, "val": val},
                       {"block_size": cfg.block_size, "sources": summary, "system": cfg.system, "pairs": pairs},
                       tokenizer)
    print_summary(summary, splits, pairs, cfg.data_dir)
    release_folder(cfg.data_dir)  # (on an error it is released when the process ends)
    return {"sources": summary, "splits": splits}


if __name__ == "__main__":
    cfg = configure(InstructConfig)
    print_config(cfg)
    run_main(prepare, cfg)  # a bad source: one `error:` line naming it, exit code 2
