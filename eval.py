"""
Standard benchmarks of a checkpoint through lm-evaluation-harness (no export step): the harness's
own tasks, prompts and metrics, answered by gptkit's model (gptkit/harness.py).

    python eval.py --ckpt=out/dolly --tasks=hellaswag,arc_easy,arc_challenge,piqa,winogrande,mmlu
    python eval.py --ckpt=out/dolly --tasks=gsm8k --limit=100             # generative, chat format, exact match
    python eval.py --ckpt=out/fineweb_124m --tasks=arc_easy --device=cpu   # on a laptop
    python eval.py --ckpt=gpt2 --tasks=arc_easy,hellaswag                  # OpenAI's GPT-2 124M, to compare
    python eval.py --tasks=arc_easy,gsm8k --download_to=data/evals         # where the hub can be reached: save the data
    python eval.py --ckpt=out/dolly --tasks=arc_easy,gsm8k --data_dir=data/evals   # offline, from those files

One GPU or the CPU (one process). Prints the harness's table and writes its results to
<run dir>/eval_results.json (one entry per task, the latest run of each; --out= for elsewhere),
with --log_samples=True also every item's prompt, answers and score beside it. A chat model is
scored in its chat format (system prompt it was finetuned with, few-shot examples as earlier
turns); --chat=False scores it on plain text as a base model. centered_acc, in the spirit of
nanochat's CORE: (acc - chance) / (1 - chance) per multiple-choice task, chance from each item's
number of choices, and their unweighted mean (gptkit/harness.py, centered_accuracy).
"""

import json
import os
import time
from dataclasses import dataclass

import torch
from lm_eval.utils import make_table

from gptkit.checkpoint import trained_system_prompt
from gptkit.configurator import BaseConfig, UserError, configure
from gptkit.files import atomic_write
from gptkit.harness import centered_accuracy, run_harness, save_task_data, summarize
from gptkit.loading import ckpt_arg_problems, load_model
from gptkit.plot import EVAL_RESULTS_FILE
from gptkit.quantize import precision_line, quantize_problems
from gptkit.system import print0, run_main, setup_runtime


@dataclass
class EvalHarnessConfig(BaseConfig):
    ckpt: str = "out/fineweb_124m"  # a run directory or checkpoint file, or a Hugging Face GPT-2 (gpt2, a folder)
    tasks: str = "hellaswag,arc_easy,arc_challenge,piqa,winogrande,mmlu"  # harness names, comma-separated (`lm-eval ls tasks`)
    data_dir: str = ""       # local copies of the datasets: DATA_DIR/<dataset_path>/<dataset_name>/<split>.jsonl (README)
    download_to: str = ""    # save the tasks' datasets into this folder in data_dir's layout (needs the hub), then stop
    limit: int = 0           # score only the first N items of each task (0: all)
    num_fewshot: int = -1    # examples before each question (-1: each task's own number)
    batch_size: int = 8      # log-likelihood rows per forward call, and answers generated together (gsm8k...): lower it if memory runs out
    max_gen_toks: int = 0    # new tokens per generated answer (0: each task's own, else 256)
    chat: str = "auto"       # auto: a chat model in its chat format, a base model on plain text; True or False to choose
    out: str = ""            # results JSON; empty: eval_results.json in the run directory
    log_samples: bool = False  # also write every item (prompt, answers, score) to <out>.samples.json
    quantize: str = "none"   # int8 or fp16: score the model that sample.py / serve.py --quantize=int8 or fp16 run

    def validate(self):
        problems = super().validate() + quantize_problems(self.quantize)
        if not self.download_to:
            problems += ckpt_arg_problems(self.ckpt)
        if not [name for name in self.tasks.split(",") if name.strip()]:
            problems.append("tasks is empty: give harness task names, e.g. --tasks=arc_easy,hellaswag")
        if self.data_dir and not os.path.isdir(self.data_dir):
            problems.append(f"data_dir={self.data_dir!r} is not a folder: give the folder of the local dataset copies")
        if self.chat not in ("auto", "True", "False"):
            problems.append(f"chat={self.chat!r}: use auto, True or False")
        for key in ("limit", "batch_size", "max_gen_toks"):
            if getattr(self, key) < (1 if key == "batch_size" else 0):
                problems.append(f"{key}={getattr(self, key)} must be {'at least 1' if key == 'batch_size' else '0 or more'}")
        if self.num_fewshot < -1:
            problems.append(f"num_fewshot={self.num_fewshot}: use -1 (each task's own) or 0 or more")
        return problems


def results_path(cfg):
    """Where the results go: --out, else beside the run (the run directory, or the folder of a .pt)."""
    if cfg.out:
        return cfg.out
    folder = os.path.dirname(cfg.ckpt) if os.path.isfile(cfg.ckpt) else cfg.ckpt
    if not os.path.isdir(folder):  # a hub name such as gpt2
        folder = os.path.join("out", "eval", cfg.ckpt.replace("/", "_"))
    return os.path.join(folder, EVAL_RESULTS_FILE)


def json_ready(obj):
    """The harness's output -> plain JSON (numpy numbers, tuples, callables in configs)."""
    return json.loads(json.dumps(obj, default=lambda value: value.item() if hasattr(value, "item") else str(value)))


def main():
    cfg = configure(EvalHarnessConfig)
    tasks = [name.strip() for name in cfg.tasks.split(",") if name.strip()]
    if cfg.download_to:
        for path in save_task_data(tasks, cfg.download_to):
            print0(f"wrote {path}")
        print0(f"copy {cfg.download_to} over and give --data_dir={cfg.download_to}")
        return
    rt = setup_runtime(cfg.device, cfg.dtype, cfg.seed, verbose=False)
    print0(f"device: {rt.device}; {precision_line(rt, cfg.quantize, weights='float32')}")  # fp32 under autocast
    if rt.ddp:
        raise UserError("eval.py runs in one process (one GPU or the CPU): run it with python, not torchrun")
    model, tokenizer, meta = load_model(cfg.ckpt, device=rt.device, quantize=cfg.quantize)
    kind = meta.get("kind", "base")
    chat = kind == "chat" if cfg.chat == "auto" else cfg.chat == "True"
    step = f", step {meta['step']}" if "step" in meta else ""  # a Hugging Face model has no step
    print0(f"checkpoint: {cfg.ckpt} ({kind}{step}); prompts: {'chat format' if chat else 'plain text'}")
    if cfg.compile:
        model = torch.compile(model, dynamic=True)  # dynamic: every batch has its own length
    t0 = time.time()
    output = run_harness(model, tokenizer, tasks, rt, limit=cfg.limit or None, data_dir=cfg.data_dir, chat=chat,
                         system_prompt=trained_system_prompt(meta) if chat else "", batch_size=cfg.batch_size,
                         num_fewshot=None if cfg.num_fewshot < 0 else cfg.num_fewshot, max_gen_toks=cfg.max_gen_toks,
                         progress=True, log_samples=True, seed=cfg.seed,
                         bootstrap_iters=100000)  # the harness's own default: the stderr column
    elapsed = time.time() - t0
    summary = summarize(output, tasks)
    centered, mean = centered_accuracy(output, summary)
    print0(make_table(output))
    if "groups" in output:
        print0(make_table(output, "groups"))
    for name, value in centered.items():
        print0(f"centered_acc {name:<20} {value:+.4f}")
    if mean is not None:
        print0(f"centered_acc mean ({len(centered)} multiple-choice tasks) {mean:+.4f}")
    print0(f"{len(tasks)} task(s) in {elapsed:.1f} s")

    path = results_path(cfg)
    try:
        with open(path, encoding="utf-8") as f:
            kept = json.load(f).get("tasks", {})
    except (OSError, ValueError, AttributeError):
        kept = {}  # no earlier results (or not ours): start a new file
    run = {"ckpt": cfg.ckpt, "step": meta.get("step"), "kind": kind, "chat_format": chat, "limit": cfg.limit,
           "num_fewshot": cfg.num_fewshot, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": round(elapsed, 1)}
    for name, metrics in summary.items():
        if name in centered:
            metrics = {**metrics, "centered_acc": centered[name]}
        kept[name] = {**metrics, "items": output.get("n-samples", {}).get(name, {}).get("effective"), **run}
    if mean is not None:
        kept["centered_mean"] = {"centered_acc": mean, "averages": sorted(centered), **run}
    record = {"tasks": kept, "last_run": json_ready({k: output.get(k) for k in ("results", "groups", "configs",
                                                                                 "versions", "n-shot", "n-samples")})}
    atomic_write(path, lambda f: f.write(json.dumps(record, indent=2).encode("utf-8")))
    print0(f"results: {path}")
    if cfg.log_samples:
        samples_path = os.path.splitext(path)[0] + ".samples.json"
        atomic_write(samples_path, lambda f: f.write(json.dumps(json_ready(output["samples"])).encode("utf-8")))
        print0(f"items: {samples_path}")


if __name__ == "__main__":
    run_main(main)  # a bad checkpoint, task name or data folder: one `error:` line, exit code 2
