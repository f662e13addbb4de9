"""
Curves of one or more runs from their <out_dir>/log.jsonl, on one figure: train and val loss,
learning rate, and the benchmarks where logged (HellaSwag; each eval_tasks task's headline metric,
logged as eval/TASK/METRIC), all against tokens trained, so that runs with different batch sizes
line up. Used by plot_log.py and by export_hf.py's model card.

    runs = [read_run("out/a"), read_run("out/b")]   # Run: name, tokens_per_step, records
    fig = draw_runs(runs, smoothing=0.9)            # a matplotlib Figure
    save_figure(fig, "compare.png", svg=True)       # -> ["compare.png", "compare.svg"]
    read_eval_results("out/a")                      # eval.py's eval_results.json there: {task: {metric: value, ...}}
"""

import json
import math
import os
from dataclasses import dataclass

from gptkit.configurator import ConfigError

HELLASWAG_KEY = "hellaswag_acc_norm"  # what the training loop logs at each HellaSwag eval
RL_PANELS = [("reward", "mean reward\n(train samples)"), ("pass@1", "held-out\npass@1")]  # rl.py logs them
# the training loop logs each eval_tasks score as eval/TASK/METRIC (wandb groups the eval/ keys in one section)
EVAL_TASKS_PREFIX = "eval/"
# a task's headline metric, the first of these it has: the harness's own (gsm8k's strict match before
# its flexible one), then the centered accuracy of the centered_mean entry
MAIN_METRICS = ("acc_norm", "acc", "exact_match_strict-match", "exact_match", "centered_acc")
EVAL_RESULTS_FILE = "eval_results.json"  # eval.py's results beside the run: {"tasks": {name: {metric: value, ...}}}


@dataclass
class Run:
    name: str             # the legend's name for it
    out_dir: str          # the run directory
    tokens_per_step: int  # total_batch_tokens: turns a logged step into tokens trained
    records: list         # the log's records (dicts with "step")


def read_log(path):
    """log.jsonl -> list of records (dicts); lines that are not complete JSON objects are skipped."""
    if not os.path.exists(path):
        raise ConfigError(f"no log at {path}: give the out_dir of a run started with train.py or finetune.py")
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line the running trainer is still writing
            if isinstance(record, dict) and "step" in record:
                records.append(record)
    return records


def series(records, key):
    """(steps, values) of the records that carry a finite number under key."""
    points = [(r["step"], r[key]) for r in records
              if isinstance(r.get(key), (int, float)) and not isinstance(r[key], bool) and math.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


def read_eval_results(run_dir):
    """eval.py's results beside the run -> {task: entry} (metrics, items, limit, num_fewshot, chat_format,
    step, date); {} when there are none or the file is not eval.py's."""
    try:
        with open(os.path.join(run_dir, EVAL_RESULTS_FILE), encoding="utf-8") as f:
            tasks = json.load(f).get("tasks")
    except (OSError, ValueError, AttributeError):
        return {}
    return {name: entry for name, entry in tasks.items() if isinstance(entry, dict)} if isinstance(tasks, dict) else {}


def eval_task_key(task, metric):
    """The log key of one eval_tasks score: eval/arc_easy/acc_norm."""
    return f"{EVAL_TASKS_PREFIX}{task}/{metric}"


def main_task_keys(keys):
    """Log keys (any; the eval/TASK/METRIC ones count) -> {task: the key of its headline metric}, tasks
    in the order first seen; a task with none of MAIN_METRICS keeps its first metric."""
    by_task = {}
    for key in keys:
        if key.startswith(EVAL_TASKS_PREFIX) and key.count("/") >= 2:
            task, metric = key[len(EVAL_TASKS_PREFIX):].split("/", 1)
            by_task.setdefault(task, []).append(metric)
    return {task: eval_task_key(task, main_metric(metrics)) for task, metrics in by_task.items()}


def main_metric(metrics):
    """The headline of a task's metric names: the first of MAIN_METRICS it has, else its first."""
    return next((m for m in MAIN_METRICS if m in metrics), list(metrics)[0])


def read_run(out_dir, name=""):
    """The run in out_dir -> Run. Tokens per step come from the run's config.json (the trainer writes
    it at the start), else from the log's own tokens_seen."""
    log_path = os.path.join(out_dir, "log.jsonl")
    records = read_log(log_path)
    if not (series(records, "loss")[0] or series(records, "val_loss")[0]):
        raise ConfigError(f"no loss in {log_path} yet, so nothing to plot: run it again once the run has "
                          "logged a train or val loss (every log_interval / eval_interval steps)")
    tokens_per_step = 0
    try:
        with open(os.path.join(out_dir, "config.json"), encoding="utf-8") as f:
            tokens_per_step = int(json.load(f)["total_batch_tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if tokens_per_step <= 0:  # not in the config, or 0 (rl.py: a step's answers vary in length): the log's mean
        steps, seen = series(records, "tokens_seen")
        if steps and steps[-1] > 0:
            tokens_per_step = round(seen[-1] / steps[-1])
    if tokens_per_step <= 0:
        raise ConfigError(f"{out_dir}: cannot tell how many tokens a step holds (no config.json with "
                          "total_batch_tokens, no tokens_seen in the log): give the folder train.py wrote")
    return Run(name or os.path.basename(os.path.normpath(out_dir)), out_dir, tokens_per_step, records)


def run_names(out_dirs):
    """Legend names: each folder's own name, or the path as given where two runs share a name."""
    names = [os.path.basename(os.path.normpath(d)) for d in out_dirs]
    return [n if names.count(n) == 1 else d for n, d in zip(names, out_dirs)]


def token_series(run, key):
    """(tokens trained, values) of key in run's log."""
    steps, values = series(run.records, key)
    return [s * run.tokens_per_step for s in steps], values


def smooth(values, weight):
    """Exponential moving average with weight in [0, 1) (0: unchanged), bias-corrected so the
    first points are not pulled towards 0."""
    out, average = [], 0.0
    for i, value in enumerate(values):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** (i + 1)))
    return out


def dot_if_alone(values):
    """A line through one point draws nothing (a run of one logged step): give it a dot."""
    return {"marker": "o", "markersize": 3} if len(values) == 1 else {}


def score_panels(runs):
    """[(log key, y label, chance or None)] of the panels under the loss and lr: HellaSwag, rl.py's reward and pass@1,
    then each eval_tasks task's headline metric, where any run logged it."""
    hellaswag = any(token_series(run, HELLASWAG_KEY)[0] for run in runs)
    panels = [(HELLASWAG_KEY, "HellaSwag acc_norm", 0.25)] if hellaswag else []
    for key, label in RL_PANELS:  # rl.py's runs: the train samples' reward, the held-out pass@1
        if any(token_series(run, key)[0] for run in runs):
            panels.append((key, label, None))
    logged = [key for run in runs for record in run.records for key in record]
    for task, key in main_task_keys(dict.fromkeys(logged)).items():
        if any(token_series(run, key)[0] for run in runs):
            panels.append((key, f"{task}\n{key.rsplit('/', 1)[1]}", None))
    return panels


def draw_runs(runs, smoothing=0.0):
    """Figure of the runs: loss (train line, val dots) over learning rate, then one panel per benchmark
    any run logged (HellaSwag, each eval_tasks task's headline metric); the x axis is tokens trained in
    every panel. One run's curves are labelled "train loss" / "val loss"; several runs' carry their names."""
    # matplotlib is imported only when a figure is drawn: it takes seconds, and the card and tests read logs without it
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed (servers, ssh, tests)
    import matplotlib.pyplot as plt  # after use("Agg"), so pyplot never looks for a display
    from matplotlib.ticker import EngFormatter  # with the rest of matplotlib, when a figure is drawn
    panels = score_panels(runs)
    ratios = [3, 1] + [1.5] * len(panels)
    fig, axes = plt.subplots(len(ratios), 1, figsize=(9, 7 + 2 * len(panels)), sharex=True, height_ratios=ratios)
    ax_loss, ax_lr = axes[0], axes[1]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        color = colors[i % len(colors)]
        prefix = f"{run.name} " if len(runs) > 1 else ""
        tokens, loss = token_series(run, "loss")
        if loss:  # an eval-only log has none: no empty curve in the legend
            if smoothing:
                ax_loss.plot(tokens, loss, color=color, alpha=0.25, linewidth=0.8)  # the raw curve, faint
                loss = smooth(loss, smoothing)
            ax_loss.plot(tokens, loss, color=color, linewidth=1.2, label=f"{prefix}train loss", **dot_if_alone(loss))
        tokens, val_loss = token_series(run, "val_loss")
        if val_loss:
            ax_loss.plot(tokens, val_loss, "o--", color=color, markersize=3, linewidth=0.8,
                         label=f"{prefix}val loss (best {min(val_loss):.3f})")
        # steps whose loss was not finite were skipped (no update): a gap in the curve, so say where
        skipped = [r["step"] * run.tokens_per_step for r in run.records if r.get("skipped_step")]
        for j, at in enumerate(skipped):
            ax_loss.axvline(at, color="tab:red", alpha=0.4, linewidth=0.8,
                            label=f"{prefix}skipped steps ({len(skipped)})" if j == 0 else None)
        tokens, lr = token_series(run, "lr")
        ax_lr.plot(tokens, lr, color=color, linewidth=1, label=run.name, **dot_if_alone(lr))
        for ax, (key, _, _) in zip(axes[2:], panels):
            tokens, score = token_series(run, key)
            if score:
                ax.plot(tokens, score, "o-", color=color, markersize=3, label=run.name)
    ax_loss.set_title(runs[0].name if len(runs) == 1 else f"{len(runs)} runs: " + ", ".join(r.name for r in runs))
    ax_loss.set_ylabel("loss (nats per token)")
    ax_loss.legend()
    ax_lr.set_ylabel("learning rate")
    for ax, (_, label, chance) in zip(axes[2:], panels):
        ax.set_ylabel(label)
        if chance is not None:
            ax.axhline(chance, color="gray", linestyle=":", linewidth=0.8)  # HellaSwag: 1 of 4 endings
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_formatter(EngFormatter())  # 500k, 1M, 10G tokens
    axes[-1].set_xlabel("tokens trained")
    fig.tight_layout()
    return fig


def save_figure(fig, out, svg=False):
    """Write fig to out (no extension: .png) and, with svg, beside it as .svg -> the paths written."""
    import matplotlib.pyplot as plt  # fig exists, so draw_runs has set the Agg backend
    if not os.path.splitext(out)[1].strip("."):
        out = out.rstrip(".") + ".png"  # what savefig writes anyway; said here, the path returned is the real one
    paths = [out] + ([os.path.splitext(out)[0] + ".svg"] if svg and not out.lower().endswith(".svg") else [])
    for path in paths:
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return paths


def plot_runs(out_dirs, out, smoothing=0.0, svg=False):
    """Read, draw and save the runs in out_dirs -> the paths written."""
    runs = [read_run(d, name) for d, name in zip(out_dirs, run_names(out_dirs))]
    return save_figure(draw_runs(runs, smoothing), out, svg)
