"""
Plot a run's train/val loss and learning rate from its <out_dir>/log.jsonl, as a PNG.
Works on a finished run and on one still running (a half-written last line is skipped); steps
skipped for a non-finite loss are marked with red lines.

    python plot_log.py --out_dir=out/fineweb_124m              # writes out/fineweb_124m/loss.png
    python plot_log.py config/fineweb_124m.py                   # the same, out_dir from the recipe
    python plot_log.py --out_dir=out/dolly --out=dolly_loss.png
    python plot_log.py --out_dir=out/dolly --out=dolly_loss.pdf    # any format matplotlib writes; no extension: .png
"""

import json
import os
from dataclasses import dataclass

from gptkit.configurator import BaseConfig, ConfigError, configure
from gptkit.system import print0, run_main


@dataclass
class PlotConfig(BaseConfig):
    out_dir: str = "out/fineweb_124m"  # the run directory holding log.jsonl
    out: str = ""                      # image to write (png, pdf, svg...; no extension: png); empty: <out_dir>/loss.png

    def validate(self):
        problems = super().validate()
        if self.out:
            folder = os.path.dirname(self.out) or "."
            extension = os.path.splitext(self.out)[1].lower().lstrip(".")
            if os.path.isdir(self.out):
                problems.append(f"out={self.out!r} is a folder: give a file name such as "
                                f"{os.path.join(self.out, 'loss.png')}")
            elif not os.path.isdir(folder):
                problems.append(f"out={self.out!r}: the folder {folder} does not exist; create it first")
            formats = image_formats()
            if extension and extension not in formats:
                problems.append(f"out={self.out!r}: matplotlib cannot write .{extension} files; end the name "
                                f"in one of {', '.join('.' + f for f in sorted(formats))}")
        return problems


def image_formats():
    """File extensions matplotlib can save a figure as (png, pdf, svg, ...)."""
    from matplotlib.backend_bases import FigureCanvasBase
    return set(FigureCanvasBase.get_supported_filetypes())


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
              if isinstance(r.get(key), (int, float)) and r[key] == r[key] and abs(r[key]) != float("inf")]
    return [p[0] for p in points], [p[1] for p in points]


def plot_log(out_dir, out=""):
    """Write the loss / learning-rate figure of the run in out_dir -> the PNG's path."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed (servers, ssh, tests)
    import matplotlib.pyplot as plt
    log_path = os.path.join(out_dir, "log.jsonl")
    records = read_log(log_path)
    if not (series(records, "loss")[0] or series(records, "val_loss")[0]):
        raise ConfigError(f"no loss in {log_path} yet, so nothing to plot: run it again once the run has "
                          "logged a train or val loss (every log_interval / eval_interval steps)")
    out = out or os.path.join(out_dir, "loss.png")
    if not os.path.splitext(out)[1].strip("."):
        out = out.rstrip(".") + ".png"  # what savefig writes anyway; said here, the path returned is the real one
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, height_ratios=[3, 1])
    steps, loss = series(records, "loss")
    if loss:  # an eval-only log has none: no empty curve in the legend
        ax_loss.plot(steps, loss, label="train loss", linewidth=1)
    steps, val_loss = series(records, "val_loss")
    if val_loss:
        ax_loss.plot(steps, val_loss, "o-", label="val loss", markersize=3)
        ax_loss.set_title(f"{os.path.basename(os.path.normpath(out_dir))}: best val loss {min(val_loss):.4f}")
    # steps whose loss was not finite were skipped (no update): a gap in the curve, so say where
    skipped = [r["step"] for r in records if r.get("skipped_step")]
    for i, step in enumerate(skipped):
        ax_loss.axvline(step, color="tab:red", alpha=0.4, linewidth=0.8,
                        label=f"skipped steps ({len(skipped)})" if i == 0 else None)
    ax_loss.set_ylabel("loss (nats per token)")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    steps, lr = series(records, "lr")
    ax_lr.plot(steps, lr, color="tab:green", linewidth=1)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


if __name__ == "__main__":
    cfg = configure(PlotConfig)
    print0(f"wrote {run_main(plot_log, cfg.out_dir, cfg.out)}")  # no log yet: one `error:` line, exit code 2
