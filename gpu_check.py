"""
Every GPU figure gptkit reports, in one run that fits a short GPU loan (about 9 minutes on an H100).

    python prepare_fineweb.py --data_dir=data/gpu_check --max_tokens=12000000 --val_tokens=524288   # once, with the internet
    python gpu_check.py --data_dir=data/gpu_check          # on the GPU: results in out/gpu_check/results.json
    python gpu_check.py --dry_run=True --data_dir=...       # on a CPU: every step with tiny shapes, in a minute
    python gpu_check.py --only=serve,lora_memory            # some steps only

The steps run in order of value, each a subprocess of the project's own scripts (bench.py, train.py,
serve.py, bench_serve.py) in its own time box, and each result is written to results.json (and the
commands' output to log.txt) as soon as it is known, so a loan that ends early still leaves the
first figures. A step that no longer fits the budget, or whose packages are missing, is recorded
as skipped with the reason:
    train_124m    bench.py 124M train tokens/s, compiled, at micro-batch 64 (the default) and 128
    train_712m    bench.py 712M at micro-batch 16 (the default) and 32
    recipe        train.py 124M, the default recipe (Muon + WSD) and nanoGPT's (AdamW 6e-4, cosine),
                  equal steps and tokens on --data_dir, final val loss of each
    serve         serve.py (random 124M weights) under bench_serve.py with 1, 8 and 16 clients
    lora_memory   bench.py 712M LoRA (rank 16) peak memory at micro-batch 1 and 8, activation checkpointing
    int8_decode   bench.py --mode=decode 124M, one row, with and without --quantize=int8
--dry_run=True runs the same commands with tiny shapes on the CPU (appended overrides), so that a
loan's first minute is never spent on a bug in this script.
"""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

import torch

from gptkit.checkpoint import save_checkpoint
from gptkit.configurator import BaseConfig, configure
from gptkit.files import atomic_write
from gptkit.system import run_main
from model import GPT, GPTConfig

STEPS = ("train_124m", "train_712m", "recipe", "serve", "lora_memory", "int8_decode")
ROOT = os.path.dirname(os.path.abspath(__file__))
# --dry_run: appended to bench.py's and train.py's commands (later flags win), so each runs as written
# but in seconds on a CPU
TINY = ["--device=cpu", "--compile=False", "--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=64"]
TINY_BENCH = TINY + ["--steps=1", "--warmup=0"]
NANOGPT_RECIPE = ["--optimizer=adamw", "--lr_schedule=cosine", "--learning_rate=6e-4", "--min_lr=6e-5",
                  "--weight_decay=0.1"]


@dataclass
class GPUCheckConfig(BaseConfig):
    data_dir: str = "data/gpu_check"    # prepared shards for the recipe step (prepare_fineweb.py); missing: that step is skipped
    out_dir: str = "out/gpu_check"      # results.json and log.txt, rewritten as each result is known
    work_dir: str = ""                  # the recipe's runs and the serve checkpoint; empty: out_dir/work
    budget_s: int = 540                 # the whole check's wall-clock limit: a step that no longer fits is skipped
    only: str = ""                      # comma-separated step names to run; empty: all, in order
    recipe_steps: int = 300             # optimizer steps of each recipe run (x 65,536 tokens: 19.7M tokens)
    dry_run: bool = False               # tiny shapes on the CPU: checks every step's commands in seconds

    def validate(self):
        problems = super().validate()
        unknown = [s for s in self.steps() if s not in STEPS]
        if unknown:
            problems.append(f"only: unknown steps {unknown}; use some of {','.join(STEPS)}")
        if self.budget_s < 1 or self.recipe_steps < 2:
            problems.append("budget_s must be positive and recipe_steps at least 2")
        return problems

    def steps(self):
        return [s.strip() for s in self.only.split(",") if s.strip()] if self.only else list(STEPS)


class Check:
    """The run's clock, its results file and its log: each command and result is recorded at once."""

    def __init__(self, cfg):
        self.cfg, self.start = cfg, time.monotonic()
        self.work = cfg.work_dir or os.path.join(cfg.out_dir, "work")
        os.makedirs(self.work, exist_ok=True)
        self.log_path = os.path.join(cfg.out_dir, "log.txt")
        open(self.log_path, "w").close()
        self.results = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "dry_run": cfg.dry_run,
                        "budget_s": cfg.budget_s, "torch": torch.__version__, "cuda": torch.version.cuda,
                        "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not cfg.dry_run
                        else "cpu", "steps": {}}
        self.save()

    def left(self):
        return self.cfg.budget_s - (time.monotonic() - self.start)

    def save(self):
        data = json.dumps(self.results, indent=2).encode()
        atomic_write(os.path.join(self.cfg.out_dir, "results.json"), lambda f: f.write(data))

    def record(self, step, **fields):
        self.results["steps"].setdefault(step, {}).update(fields)
        self.save()

    def log(self, text):
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(text)

    def command(self, script, *args, box, tiny=()):
        """Run `python script args` (then the flags `tiny` under --dry_run) for at most box seconds (and
        what the budget has left); -> its output. Raises TimeoutError or RuntimeError (with its tail)."""
        cmd = [sys.executable, script, *args] + (list(tiny) if self.cfg.dry_run else [])
        timeout = min(box, self.left())
        if timeout < 5:
            raise TimeoutError("no time left in the budget")
        self.log(f"\n$ {' '.join(cmd[1:])}   (at most {timeout:.0f} s)\n")
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torch.compile's workers too
            out, _ = proc.communicate()
            self.log(out)
            raise TimeoutError(f"{script} ran past its {timeout:.0f} s box")
        self.log(out)
        if proc.returncode:
            raise RuntimeError(f"{script} exited {proc.returncode}: {out.strip()[-600:]}")
        return out


def json_lines(out):
    """The JSON objects a script printed (bench.py --json, bench_serve.py --json), among its other lines."""
    found = []
    for line in out.splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except ValueError:
                pass
    return found


def shape(check, micro_batch):
    """-> (micro_batch, block_size) of a command: the recipes' 1024 (TINY's 64 and a smaller batch under --dry_run)."""
    return (micro_batch if micro_batch <= 8 else micro_batch // 16, 64) if check.cfg.dry_run else (micro_batch, 1024)


def bench_train(check, step, config, micro_batches, extra=(), accum=4, box=150):
    keys = ("tokens_per_sec", "mfu", "peak_memory_gb", "step_time_s", "micro_batch_size", "compile", "dtype",
            "attention_kernels", "params", "trainable_params", "lora_rank", "activation_checkpointing")
    for micro_batch in micro_batches:
        mb, block = shape(check, micro_batch)  # a few micro-batches per step: the step is as training runs it
        out = check.command("bench.py", config, f"--micro_batch_size={mb}", f"--total_batch_tokens={mb * block * accum}",
                            "--compile=True", "--json=True", "--steps=5", "--warmup=2", *extra, box=box, tiny=TINY_BENCH)
        result = json_lines(out)[-1]
        check.results["steps"][step].setdefault("results", []).append({k: result.get(k) for k in keys})
        check.save()


def step_train_124m(check):
    bench_train(check, "train_124m", "config/fineweb_124m.py", [64, 128])


def step_train_712m(check):
    bench_train(check, "train_712m", "config/fineweb_712m.py", [16, 32], box=180)


def step_recipe(check):
    cfg = check.cfg
    if not os.path.isdir(cfg.data_dir):
        raise FileNotFoundError(f"data_dir={cfg.data_dir!r} does not exist: prepare it first (python "
                                f"prepare_fineweb.py --data_dir={cfg.data_dir} --max_tokens=12000000 --val_tokens=524288)")
    steps = 2 if cfg.dry_run else cfg.recipe_steps
    mb, block = shape(check, 64)
    tokens = mb * block  # one micro-batch a step: 65,536 tokens on the GPU
    for name, recipe in (("default", []), ("nanogpt", NANOGPT_RECIPE)):
        run_dir = os.path.join(check.work, f"recipe_{name}")
        started = time.monotonic()
        check.command("train.py", "config/fineweb_124m.py", f"--data_dir={cfg.data_dir}", f"--out_dir={run_dir}",
                      f"--max_steps={steps}", f"--warmup_steps={max(1, steps // 20)}", f"--micro_batch_size={mb}",
                      f"--total_batch_tokens={tokens}", f"--eval_interval={steps}", f"--ckpt_interval={steps}",
                      "--eval_tokens=524288", "--hellaswag_interval=0", "--sample_tokens=0", "--log_interval=50",
                      *recipe, box=200, tiny=TINY)
        with open(os.path.join(run_dir, "log.jsonl"), encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
        val = [r["val_loss"] for r in records if "val_loss" in r]
        check.results["steps"]["recipe"].setdefault("results", []).append(
            {"recipe": name, "flags": " ".join(recipe) or "(config/fineweb_124m.py's)", "steps": steps,
             "tokens": steps * tokens, "final_val_loss": val[-1] if val else None,
             "seconds": round(time.monotonic() - started, 1)})
        check.save()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_serve(check):
    dims = dict(n_layer=2, n_head=2, n_embd=64, block_size=64) if check.cfg.dry_run else \
        dict(n_layer=12, n_head=12, n_embd=768, block_size=1024)
    model = GPT(GPTConfig(**dims, bias=False), verbose=False)  # random weights: speed does not depend on them
    ckpt = os.path.join(check.work, "serve_124m")
    save_checkpoint(ckpt, {"model": model.state_dict(), "model_config": model.config.to_dict(), "config": {},
                           "kind": "chat", "step": 0})
    port = free_port()
    device = ["--device=cpu"] if check.cfg.dry_run else []
    cmd = [sys.executable, "serve.py", f"--ckpt={ckpt}", f"--port={port}", *device]
    check.log(f"\n$ {' '.join(cmd[1:])}   (in the background)\n")
    log = open(os.path.join(check.work, "serve.log"), "w")
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + min(120, check.left())
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("serve.py did not start: " + open(log.name).read()[-600:])
                time.sleep(0.5)
        clients, requests, max_tokens = ("1,2", 1, 4) if check.cfg.dry_run else ("1,8,16", 2, 64)
        out = check.command("bench_serve.py", f"--url=http://127.0.0.1:{port}", f"--clients={clients}",
                            f"--requests={requests}", f"--max_tokens={max_tokens}", "--json=True", box=150)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        log.close()
        check.log(open(log.name).read()[-3000:])
    rows = json_lines(out)
    one = rows[0]["tokens_per_sec"]
    check.record("serve", results=rows, speedup_vs_one_client={r["clients"]: round(r["tokens_per_sec"] / one, 2)
                                                               for r in rows})


def step_lora_memory(check):
    bench_train(check, "lora_memory", "config/fineweb_712m.py", [1, 8], accum=1, box=120,
                extra=["--lora_rank=16", "--optimizer=adamw", "--activation_checkpointing=True", "--compile=False",
                       "--steps=2", "--warmup=1"])


def step_int8_decode(check):
    for quantize in ("none", "int8"):
        out = check.command("bench.py", "config/fineweb_124m.py", "--mode=decode", f"--quantize={quantize}",
                            "--json=True", "--steps=3", "--warmup=1", "--no_cache=False", box=90,
                            tiny=TINY_BENCH)  # the cached decode only: the uncached one is not compared
        result = json_lines(out)[-1]
        check.results["steps"]["int8_decode"].setdefault("results", []).append(
            {"quantize": quantize, **{k: result.get(k) for k in ("kv_cache_tokens_per_sec", "dtype", "device")}})
        check.save()


NEEDS = {"serve": ("fastapi", "uvicorn", "openai")}  # beyond torch: packages a GPU machine may lack


def main(cfg):
    check = Check(cfg)
    for step in cfg.steps():
        missing = [m for m in NEEDS.get(step, ()) if importlib.util.find_spec(m) is None]
        if missing:
            check.record(step, status="skipped", reason=f"missing packages: {', '.join(missing)} (pip install them)")
        elif check.left() < 20:
            check.record(step, status="skipped", reason=f"the budget of {cfg.budget_s} s was spent")
        else:
            started = time.monotonic()
            check.record(step, status="running")
            try:
                globals()[f"step_{step}"](check)
                status = {"status": "ok"}
            except TimeoutError as e:
                status = {"status": "timeout", "reason": str(e)}
            except (RuntimeError, OSError, ValueError, KeyError, IndexError) as e:
                status = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
            check.record(step, seconds=round(time.monotonic() - started, 1), **status)
        entry = check.results["steps"][step]
        print(f"{step:>12}: {entry['status']}" + (f" ({entry['reason'][:200]})" if "reason" in entry else ""), flush=True)
    print(f"results: {os.path.join(cfg.out_dir, 'results.json')} (commands' output: {check.log_path})")
    failed = [s for s, e in check.results["steps"].items() if e["status"] in ("failed", "timeout")]
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    run_main(main, configure(GPUCheckConfig))
