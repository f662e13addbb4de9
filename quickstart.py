"""
The whole pipeline, small enough for a laptop CPU (about 7 minutes on 2 cores): stream a few
thousand FineWeb-Edu documents, pretrain a tiny GPT on 490K of their tokens, finetune it on
instruction data, and ask it one question. Each step is one of the scripts a full run uses, with
the same commands.

    python quickstart.py                                        # FineWeb-Edu and Dolly-15k from the hub
    python quickstart.py --pretrain_steps=1 --finetune_steps=1 --eval_tokens=2048 --max_tokens=100000   # a smoke test
    python quickstart.py --source=path/to/texts --instruct=path/to/instruction-data.json --data_dir=data/mine   # offline
    python quickstart.py --device=cuda                          # the same on a GPU, faster

What it runs (from the recipes config/tiny_cpu.py and config/tiny_chat.py):
    1. prepare_fineweb.py   -> data/quickstart/pretrain   token shards
    2. train.py             -> out/quickstart/base        pretrained checkpoint, log.jsonl
    3. prepare_instruct.py  -> data/quickstart/instruct   chat conversations with loss masks
    4. finetune.py          -> out/quickstart/chat        chat checkpoint
    5. sample.py            -> one answer, printed
Afterwards: `python sample.py --ckpt=out/quickstart/chat` chats with the model, and
`python plot_log.py --out_dir=out/quickstart/base` plots its loss.

Without the internet: when the Hugging Face hub cannot be reached (or HF_HUB_OFFLINE=1), it says so
in one line and uses the samples shipped in samples/ (public-domain books, 300 instruction records)
for the hub defaults; when tiktoken cannot download GPT-2's BPE files, the tokenizer uses the copies
in samples/gpt2 (one line too). The steps are the same. A dataset you name is never replaced.

It runs from any folder: data/quickstart, out/quickstart and the paths you give are relative to the
folder you run it from, and the commands it prints work when pasted there. Run again, it reuses
its prepared data and replaces its two runs in out/quickstart.
"""

import os
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

from gptkit.configurator import BaseConfig, configure
from gptkit.lock import hold_folder, release_folder
from gptkit.sources import is_local
from gptkit.system import run_main
from gptkit.tokenizer import gpt2_encoding

HERE = os.path.dirname(os.path.abspath(__file__))  # the scripts and config/ live next to this file
SAMPLES = {"source": "samples/pretrain/", "instruct": "samples/instruct/instruction-data-300.json"}  # offline data


@dataclass
class QuickstartConfig(BaseConfig):
    device: str = "cpu"                             # the tiny model is CPU-sized; cuda works too
    source: str = "HuggingFaceFW/fineweb-edu"       # hub dataset, or a local folder/file of parquet, jsonl or txt
    subset: str = "sample-10BT"                     # hub config of source (ignored for local files)
    max_tokens: int = 3_000_000                     # about 3,000 FineWeb-Edu documents
    instruct: str = "databricks/databricks-dolly-15k"  # hub name, or a local Alpaca/Dolly/chat JSON(L) file
    pretrain_steps: int = 60                        # 8,192 tokens each (config/tiny_cpu.py)
    finetune_steps: int = 24                        # 8,192 tokens each (config/tiny_chat.py)
    eval_tokens: int = 16384                        # val tokens per evaluation (at the start, middle and end)
    prompt: str = "What is the capital of France?"  # the question asked at the end
    data_dir: str = "data/quickstart"               # prepared data goes to its pretrain/ and instruct/
    out_dir: str = "out/quickstart"                 # the runs go to its base/ and chat/ (replaced each time)

    def validate(self):
        problems = super().validate()
        if self.pretrain_steps < 1 or self.finetune_steps < 1:
            problems.append("pretrain_steps and finetune_steps must be at least 1")
        # Checked now, not when their step starts minutes later. A path that does not exist would
        # be taken for a hub name; is_local is the scripts' test for "this is a path".
        for key, kind in (("source", "parquet/jsonl/txt file or folder"), ("instruct", ".json or .jsonl file")):
            path, hub_default = getattr(self, key), getattr(QuickstartConfig, key)
            if is_local(path) and not os.path.exists(path):
                problems.append(f"{key}={path!r} does not exist: give an existing {kind}, or a hub dataset "
                                f"name such as {hub_default}")
        if os.path.isdir(self.instruct):
            problems.append(f"instruct={self.instruct!r} is a folder: give one of its .json or .jsonl files")
        return problems


def repo_file(name):
    """A file of this repository as a path from the current folder, so the printed commands work as pasted."""
    return os.path.relpath(os.path.join(HERE, name))


def run(step, title, args, where):
    print(f"\n=== [{step}/5] {title}: python {shlex.join(args)}", flush=True)  # quoted: pastes as it ran
    t0 = time.time()
    result = subprocess.run([sys.executable] + args)
    if result.returncode != 0:
        sys.exit(f"quickstart: step {step} ({title}) failed with exit status {result.returncode}; "
                 f"its message is above. Fix it and run quickstart.py again.")
    print(f"=== [{step}/5] done in {time.time() - t0:.0f}s: {where}", flush=True)


def evals(steps, cfg):
    return [f"--eval_interval={max(1, steps // 2)}", f"--eval_tokens={cfg.eval_tokens}"]


def replace_run(run_dir):
    """train.py and finetune.py never start a new run over an old one: quickstart removes its own."""
    if os.path.exists(os.path.join(run_dir, "ckpt.pt")):
        hold_folder(run_dir)  # never under a run still going there (another quickstart): that one is named
        print(f"replacing the earlier quickstart run in {run_dir}/")
        shutil.rmtree(run_dir)
        release_folder(run_dir)


def hub_unreachable():
    """Why the Hugging Face hub cannot be reached (HF_HUB_OFFLINE set, or no answer in a few seconds),
    or "" when it can."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    try:
        urllib.request.urlopen(urllib.request.Request(os.environ.get("HF_ENDPOINT", "https://huggingface.co"),
                                                      method="HEAD"), timeout=5)
        return ""
    except Exception as e:  # an HTTP error status is an answer: only a silent hub counts as unreachable
        return "" if hasattr(e, "code") else f"{type(e).__name__}: {getattr(e, 'reason', e)}"


def use_samples_offline(cfg):
    """Without the hub, the hub datasets of the defaults become the samples shipped in samples/ (README
    there: public-domain books and 300 instruction records); the steps stay the same. Says so in one line."""
    defaults = [key for key in ("source", "instruct") if getattr(cfg, key) == getattr(QuickstartConfig, key)]
    why = hub_unreachable() if defaults else ""
    if why:
        for key in defaults:
            setattr(cfg, key, repo_file(SAMPLES[key]))
        print(f"note: the Hugging Face hub cannot be reached ({why}); using the samples shipped with gptkit: "
              + ", ".join(f"--{key}={getattr(cfg, key)}" for key in defaults), flush=True)
    # GPT-2's tokenizer files: tiktoken's download, or gptkit's copies (gpt2_encoding says which, once)
    gpt2_encoding()


def main():
    cfg = configure(QuickstartConfig)
    use_samples_offline(cfg)
    pretrain_data = os.path.join(cfg.data_dir, "pretrain")
    instruct_data = os.path.join(cfg.data_dir, "instruct")
    base_run = os.path.join(cfg.out_dir, "base")
    chat_run = os.path.join(cfg.out_dir, "chat")
    common = [f"--device={cfg.device}", f"--dtype={cfg.dtype}", f"--seed={cfg.seed}"]
    tiny_cpu, tiny_chat = repo_file("config/tiny_cpu.py"), repo_file("config/tiny_chat.py")
    run(1, "pretraining data", [repo_file("prepare_fineweb.py"), tiny_cpu, f"--source={cfg.source}",
        f"--subset={cfg.subset}", f"--max_tokens={cfg.max_tokens}", f"--data_dir={pretrain_data}"],
        f"token shards in {pretrain_data}/")
    replace_run(base_run)
    replace_run(chat_run)  # it was finetuned from the base run being replaced
    run(2, "pretraining", [repo_file("train.py"), tiny_cpu, f"--data_dir={pretrain_data}", f"--out_dir={base_run}",
        f"--max_steps={cfg.pretrain_steps}", f"--warmup_steps={cfg.pretrain_steps // 10}",
        f"--compile={cfg.compile}"] + common + evals(cfg.pretrain_steps, cfg),
        f"checkpoint {base_run}/ckpt.pt, metrics {base_run}/log.jsonl")
    run(3, "instruction data", [repo_file("prepare_instruct.py"), tiny_chat, f"--sources={cfg.instruct}",
        f"--data_dir={instruct_data}"], f"conversations in {instruct_data}/")
    run(4, "finetuning", [repo_file("finetune.py"), tiny_chat, f"--data_dir={instruct_data}", f"--init_from={base_run}",
        f"--out_dir={chat_run}", f"--max_steps={cfg.finetune_steps}", f"--warmup_steps={cfg.finetune_steps // 8}",
        f"--compile={cfg.compile}"] + common + evals(cfg.finetune_steps, cfg),
        f"chat checkpoint {chat_run}/ckpt.pt")
    sample = repo_file("sample.py")
    run(5, "one question", [sample, f"--ckpt={chat_run}", f"--prompt={cfg.prompt}", "--temperature=0",
        "--max_new_tokens=48"] + common, f"chat with it: python {shlex.join([sample, f'--ckpt={chat_run}'])}")
    print("A 7M-parameter model after a few minutes of training answers in word salad; the pieces are the\n"
          "ones the full recipes use. Next: config/fineweb_124m.py and config/dolly.py on a GPU (README).")


if __name__ == "__main__":
    run_main(main)  # a folder in use, a full disk: one `error:` line
