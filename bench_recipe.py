"""
The recipe sweep: which optimizer, schedule, learning rate and batch size reach nanoGPT's val loss
with the fewest tokens, measured on a small proxy GPT (GPT-2's architecture, 4 layers, 256 wide,
T=256, a 4,096-token BPE trained on the text) beside nanoGPT's own train.py in the same run.

    git clone https://github.com/karpathy/nanoGPT .ref/nanoGPT        # the reference (git-ignored)
    python bench_recipe.py --source=path/to/text_folder                # every run not yet in the results
    python bench_recipe.py --report_only=True                          # table and plot from the results

One JSON line per finished run lands in --results as soon as it finishes; a rerun skips the runs
already there, so a stopped sweep goes on where it stopped. The stages run in order and later ones
build on the best point so far (mean over seeds of the final val loss):
    reference  nanoGPT's train.py (its recipe: AdamW 6e-4, cosine to 6e-5) and gptkit's default
    lr         AdamW peak learning rates, doubled from 6e-4 while a doubling helps
    muon       Muon on the hidden matrices: its weight decay, then its learning rate (up while it helps)
    schedule   WSD instead of cosine for the best point so far
    tokens     the best point with 70% and 50% of the tokens: does it reach nanoGPT's loss with fewer?
    batch      the best point with half and double the batch, same tokens
    confirm    nanoGPT's train.py and gptkit's default recipe (DEFAULT below: what the configs use) at
               100%, 70% and 50% of the tokens, on its own: run it with a larger --tokens and its own
               --results to check that the default's lead holds on a longer run
Every final checkpoint, nanoGPT's included, is scored by one function on the same fixed val tokens.
Train loss curves of the headline runs go to --plot (plot_log.py's comparison figure).
"""

import json
import os
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from model import GPT, GPTConfig
from gptkit.configurator import BaseConfig, UserError, configure
from gptkit.data import list_shards, load_shard, val_batches
from gptkit.loading import load_model
from gptkit.losses import evaluate_loss
from gptkit.plot import plot_runs
from gptkit.system import print0, run_main, setup_runtime

STAGES = ("reference", "lr", "muon", "schedule", "tokens", "batch", "confirm")
# The configs' default recipe at the proxy's scale: the sweep's winner (Muon with its default rate and
# decay on the hidden matrices, WSD), AdamW for embeddings and LayerNorms at the proxy's best AdamW rate.
DEFAULT = dict(optimizer="muon", muon_learning_rate=0.02, muon_weight_decay=0.01, learning_rate=1.2e-3,
               min_lr=1.2e-4, lr_schedule="wsd")


@dataclass
class RecipeConfig(BaseConfig):
    source: str = ""                        # text folder for the proxy's data (needed until work_dir holds it)
    work_dir: str = "out/recipe_sweep"      # tokenizer, data and every run's folder
    nanogpt_dir: str = ".ref/nanoGPT"       # a checkout of karpathy/nanoGPT (train.py, model.py, configurator.py)
    results: str = "docs/recipe_sweep.jsonl"  # one line per finished run, appended
    plot: str = "docs/recipe_sweep.png"     # train loss of the headline runs
    stages: str = ",".join(STAGES)          # which stages to run
    seeds: str = "1,2"                      # seeds per point
    tokens: int = 1_048_576                 # tokens per run (the tokens stage scales it)
    batch_tokens: int = 8192                # tokens per optimizer step: 32 sequences of 256
    micro_batch_size: int = 32              # sequences per forward pass (memory only: the step stays batch_tokens)
    warmup_fraction: float = 0.04           # warmup steps / steps (gptkit's 124M recipe: 700 / 19073)
    vocab_size: int = 4096                  # of the proxy's tokenizer
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    block_size: int = 256
    eval_tokens: int = 262_144              # the fixed val tokens every final checkpoint is scored on
    report_only: bool = False               # only print the table and draw the plot

    def validate(self):
        problems = super().validate()
        unknown = [s for s in self.stages.split(",") if s not in STAGES]
        if unknown:
            problems.append(f"stages: unknown {unknown}; use some of {','.join(STAGES)}")
        for batch in (self.batch_tokens // 2, self.batch_tokens):  # the batch stage halves it
            if batch < self.block_size or batch % (micro_of(self, batch) * self.block_size):
                problems.append(f"batch_tokens={self.batch_tokens}: it and its half must be whole micro-batches "
                                f"of micro_batch_size={self.micro_batch_size} x block_size={self.block_size} "
                                "(or whole sequences, fewer than one micro-batch)")
                break
        if self.seed != BaseConfig.seed:
            problems.append("seed: the sweep runs every point with each of --seeds (such as --seeds=1,2,3)")
        return problems


def prepare_data(cfg):
    """The proxy's tokenizer and shards (gptkit's own scripts), and the same tokens as nanoGPT's train.bin/val.bin."""
    tok_dir, data_dir = os.path.join(cfg.work_dir, "tokenizer"), os.path.join(cfg.work_dir, "data")
    if not os.path.exists(os.path.join(data_dir, "nanogpt", "meta.pkl")):
        if not cfg.source:
            raise UserError(f"{data_dir} is not prepared yet: give --source=path/to/text_folder (.txt files)")
        py = sys.executable
        subprocess.run([py, "train_tokenizer.py", f"--source={cfg.source}", f"--vocab_size={cfg.vocab_size}",
                        f"--out={tok_dir}"], check=True)
        subprocess.run([py, "prepare_fineweb.py", f"--source={cfg.source}", f"--tokenizer={tok_dir}",
                        f"--data_dir={data_dir}", f"--val_tokens={cfg.eval_tokens}"], check=True)
        os.makedirs(os.path.join(data_dir, "nanogpt"), exist_ok=True)
        for split in ("train", "val"):
            tokens = np.concatenate([load_shard(p) for p in list_shards(data_dir, split)]).astype(np.uint16)
            tokens.tofile(os.path.join(data_dir, "nanogpt", f"{split}.bin"))
        with open(os.path.join(data_dir, "nanogpt", "meta.pkl"), "wb") as f:
            pickle.dump({"vocab_size": cfg.vocab_size}, f)
    return data_dir


def micro_of(cfg, batch_tokens):
    """Sequences per forward pass: micro_batch_size, or the whole step when that is smaller."""
    return min(cfg.micro_batch_size, batch_tokens // cfg.block_size)


def steps_of(cfg, point):
    return round(cfg.tokens * point.get("token_scale", 1.0) / point.get("batch_tokens", cfg.batch_tokens))


def run_logged(command, cwd, out_dir):
    """Run a training command, its output kept in <out_dir>/output.txt (the place to look when one fails)."""
    log = os.path.join(os.path.abspath(out_dir), "output.txt")
    with open(log, "w") as f:
        if subprocess.run(command, cwd=cwd, stdout=f, stderr=subprocess.STDOUT).returncode:
            raise UserError(f"a sweep run failed: see {log}")
    with open(log) as f:
        return f.read()


def run_gptkit(cfg, point, seed, data_dir, out_dir):
    steps, batch = steps_of(cfg, point), point.get("batch_tokens", cfg.batch_tokens)
    args = {"data_dir": data_dir, "out_dir": out_dir, "device": cfg.device, "dtype": cfg.dtype,
            "compile": cfg.compile, "seed": seed,
            "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd, "block_size": cfg.block_size,
            "micro_batch_size": micro_of(cfg, batch), "total_batch_tokens": batch,
            "max_steps": steps,
            "warmup_steps": max(1, round(cfg.warmup_fraction * steps)), "eval_interval": max(1, steps // 4),
            "eval_tokens": 32768, "log_interval": 2, "sample_tokens": 0, "ckpt_interval": steps,
            **point["train"]}
    run_logged([sys.executable, "train.py", *[f"--{k}={v}" for k, v in args.items()]], ".", out_dir)
    model, _, _ = load_model(out_dir, verbose=False)
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        speeds = [r["tokens_per_sec"] for r in map(json.loads, f) if "tokens_per_sec" in r]
    return model, statistics.median(speeds[1:] or speeds)


def run_nanogpt(cfg, point, seed, data_dir, out_dir):
    """nanoGPT's train.py as it is, on the same tokens; only its seed is moved (1337 + seed), from outside."""
    steps, train, rt = steps_of(cfg, point), point["train"], runtime(cfg)
    micro = micro_of(cfg, cfg.batch_tokens)
    args = {"dataset": os.path.abspath(os.path.join(data_dir, "nanogpt")), "out_dir": os.path.abspath(out_dir),
            "device": rt.device, "dtype": rt.dtype, "compile": cfg.compile,
            "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd, "block_size": cfg.block_size,
            "batch_size": micro, "gradient_accumulation_steps": cfg.batch_tokens // (micro * cfg.block_size),
            "max_iters": steps, "lr_decay_iters": steps,
            "warmup_iters": max(1, round(cfg.warmup_fraction * steps)), "learning_rate": train["learning_rate"],
            "min_lr": train["min_lr"], "eval_interval": steps, "eval_iters": 1, "log_interval": 1}
    code = ("import runpy, sys, torch; seed = torch.manual_seed; "
            f"torch.manual_seed = lambda n: seed(n + {seed}); sys.argv = {['train.py'] + [f'--{k}={v}' for k, v in args.items()]!r}; "
            "runpy.run_path('train.py', run_name='__main__')")
    output = run_logged([sys.executable, "-c", code], cfg.nanogpt_dir, out_dir)
    records = nanogpt_log(output, steps, cfg.batch_tokens)
    with open(os.path.join(out_dir, "log.jsonl"), "w") as f:  # gptkit's schema: plot_log.py draws it beside the others
        f.writelines(json.dumps(r) + "\n" for r in records)
    model = load_nanogpt(os.path.join(out_dir, "ckpt.pt"), cfg)
    return model, statistics.median(r["tokens_per_sec"] for r in records[1:] or records)


def nanogpt_log(output, steps, batch_tokens):
    """nanoGPT's `iter N: loss L, time Tms` lines -> log records; its line N is the loss of step N+1,
    and its last line is one step past the saved checkpoint, so only the first `steps` count."""
    lines = re.findall(r"iter (\d+): loss ([\d.]+), time ([\d.]+)ms", output)[:steps]
    return [{"step": int(it) + 1, "loss": float(loss), "tokens_seen": (int(it) + 1) * batch_tokens,
             "tokens_per_sec": batch_tokens / max(float(ms) / 1000, 1e-9)} for it, loss, ms in lines]


def load_nanogpt(path, cfg):
    """A nanoGPT ckpt.pt as a gptkit GPT: the two share parameter names (compile's prefix aside)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = GPT(GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                          vocab_size=cfg.vocab_size, bias=False), verbose=False)
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in state["model"].items()})
    return model


def runtime(cfg):
    return setup_runtime(cfg.device, cfg.dtype, verbose=False)


def score(model, cfg, data_dir):
    """The one scorer: mean loss over the first eval_tokens of the val split (on --device, in --dtype)."""
    rt = runtime(cfg)
    batches = val_batches(data_dir, cfg.micro_batch_size, cfg.block_size, cfg.eval_tokens, device=rt.device)
    return evaluate_loss(model.to(rt.device), batches, rt)


def read_results(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def mean_loss(results, name):
    losses = [r["val_loss"] for r in results if r["name"] == name]
    return statistics.mean(losses) if losses else float("inf")


def best(results, names):
    return min(names, key=lambda n: mean_loss(results, n))


def plan(cfg, results, points):
    """The points, stage by stage; a later stage asks for the best point of the earlier ones as they finish.
    points maps name -> point (filled as they are planned), results grows while the sweep runs."""
    def point(name, stage, runner="gptkit", **train):
        points[name] = {"name": name, "stage": stage, "runner": runner,
                        **{k: train.pop(k) for k in ("token_scale", "batch_tokens") if k in train}, "train": train}
        return points[name]

    def adamw(lr, schedule="cosine"):
        return dict(optimizer="adamw", learning_rate=lr, min_lr=lr / 10, lr_schedule=schedule)

    yield point("nanoGPT train.py", "reference", runner="nanogpt", learning_rate=6e-4, min_lr=6e-5)
    yield point("adamw lr=6e-4", "reference", **adamw(6e-4))
    adamw_names = ["adamw lr=6e-4"]
    for lr in (1.2e-3, 2.4e-3, 4.8e-3, 9.6e-3):  # doubling while the last doubling helped
        if len(adamw_names) > 2 and best(results, adamw_names) != adamw_names[-1]:
            break
        adamw_names.append(f"adamw lr={lr:g}")
        yield point(adamw_names[-1], "lr", **adamw(lr))
    lr = points[best(results, adamw_names)]["train"]["learning_rate"]

    def muon(muon_lr, wd, schedule="cosine"):
        return dict(optimizer="muon", muon_learning_rate=muon_lr, muon_weight_decay=wd, learning_rate=lr,
                    min_lr=lr / 10, lr_schedule=schedule)

    muon_names = []
    for wd in (0.1, 0.0):
        muon_names.append(f"muon lr=0.02 wd={wd:g}")
        yield point(muon_names[-1], "muon", **muon(0.02, wd))
    wd = points[best(results, muon_names)]["train"]["muon_weight_decay"]
    for muon_lr in (0.04, 0.08):  # as the AdamW rates: up while it helps
        if len(muon_names) > 2 and best(results, muon_names) != muon_names[-1]:
            break
        muon_names.append(f"muon lr={muon_lr:g} wd={wd:g}")
        yield point(muon_names[-1], "muon", **muon(muon_lr, wd))
    if best(results, muon_names) == muon_names[0 if wd else 1]:  # 0.04 did not help: try below 0.02
        muon_names.append(f"muon lr=0.01 wd={wd:g}")
        yield point(muon_names[-1], "muon", **muon(0.01, wd))
    best_cosine = best(results, adamw_names + muon_names)
    schedule_names = [f"{best_cosine} wsd"]
    yield point(schedule_names[0], "schedule", **{**points[best_cosine]["train"], "lr_schedule": "wsd"})
    top = points[best(results, adamw_names + muon_names + schedule_names)]
    for scale in (0.7, 0.5):
        yield point(f"{top['name']} x{scale:g} tokens", "tokens", token_scale=scale, **top["train"])
    for batch in (cfg.batch_tokens // 2, cfg.batch_tokens * 2):
        yield point(f"{top['name']} batch={batch}", "batch", batch_tokens=batch, **top["train"])
    yield point("nanoGPT train.py", "confirm", runner="nanogpt", learning_rate=6e-4, min_lr=6e-5)
    for scale in (0.7, 0.5, 1.0):  # the target first: nanoGPT's loss with 30% fewer tokens
        yield point(f"gptkit default x{scale:g} tokens", "confirm", token_scale=scale, **DEFAULT)


def run_point(cfg, point, seed, data_dir):
    slug = re.sub(r"[^a-z0-9.=-]+", "_", point["name"].lower())
    out_dir = os.path.join(cfg.work_dir, "runs", f"{slug}_seed{seed}")
    shutil.rmtree(out_dir, ignore_errors=True)  # a run without a result line is an unfinished one: start it again
    os.makedirs(out_dir)
    start = time.time()
    runner = run_nanogpt if point["runner"] == "nanogpt" else run_gptkit
    model, tokens_per_sec = runner(cfg, point, seed, data_dir, out_dir)
    return {**point, "seed": seed, "tokens": steps_of(cfg, point) * point.get("batch_tokens", cfg.batch_tokens),
            "val_loss": score(model, cfg, data_dir), "train_tokens_per_sec": round(tokens_per_sec),
            "wall_s": round(time.time() - start, 1), "out_dir": out_dir, "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__}


def report(cfg, results):
    """The table (markdown, for docs/benchmarks.md) and the plot of the headline runs."""
    names = list(dict.fromkeys(r["name"] for r in results))
    target = mean_loss(results, "nanoGPT train.py")
    print0("| stage | recipe | tokens | val loss (per seed) | mean | vs nanoGPT | tokens/s | wall |")
    print0("|---|---|---|---|---|---|---|---|")
    for name in names:
        runs = [r for r in results if r["name"] == name]
        losses = " / ".join(f"{r['val_loss']:.4f}" for r in runs)
        speed = statistics.mean(r["train_tokens_per_sec"] for r in runs)
        wall = statistics.mean(r.get("wall_s", 0) for r in runs)  # training and scoring, per run
        print0(f"| {runs[0]['stage']} | {name} | {runs[0]['tokens']:,} | {losses} | {mean_loss(results, name):.4f} | "
               f"{mean_loss(results, name) - target:+.4f} | {speed:,.0f} | {wall:,.0f} s |")
    full = [n for n in names if next(r for r in results if r["name"] == n)["tokens"] == steps_of(cfg, {}) * cfg.batch_tokens]
    headline = ["nanoGPT train.py", "adamw lr=6e-4"] + sorted(set(full) - {"nanoGPT train.py", "adamw lr=6e-4"},
                                                              key=lambda n: mean_loss(results, n))[:2]
    headline = list(dict.fromkeys(headline + [n for n in names if n.startswith("gptkit default")]))  # confirm: all
    dirs = [next(r["out_dir"] for r in results if r["name"] == n) for n in headline if n in names]  # each one's first seed
    if cfg.plot and all(os.path.exists(os.path.join(d, "log.jsonl")) for d in dirs):
        print0("plot:", ", ".join(plot_runs(dirs, cfg.plot, smoothing=0.8)))


def main():
    cfg = configure(RecipeConfig)
    results = read_results(cfg.results)
    if not cfg.report_only:
        if not os.path.isfile(os.path.join(cfg.nanogpt_dir, "train.py")):
            raise UserError(f"no nanoGPT in {cfg.nanogpt_dir}: git clone https://github.com/karpathy/nanoGPT {cfg.nanogpt_dir}")
        data_dir = prepare_data(cfg)
        stages, points = cfg.stages.split(","), {}
        for point in plan(cfg, results, points):
            if point["stage"] not in stages:
                continue
            for seed in map(int, cfg.seeds.split(",")):
                if any(r["name"] == point["name"] and r["seed"] == seed for r in results):
                    continue
                result = run_point(cfg, point, seed, data_dir)
                results.append(result)
                with open(cfg.results, "a") as f:  # as each run finishes: a stopped sweep loses only the run under way
                    f.write(json.dumps(result) + "\n")
                print0(f"{point['name']} seed {seed}: val loss {result['val_loss']:.4f} "
                       f"({result['train_tokens_per_sec']:,} tokens/s, {result['wall_s']:.0f} s)")
    report(cfg, results)


if __name__ == "__main__":
    run_main(main)
