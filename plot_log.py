"""
Plot runs from their <out_dir>/log.jsonl: train and val loss, learning rate, and HellaSwag and the
eval_tasks scores (one panel per task, its headline metric) where logged, against tokens trained,
so runs with different batch sizes line up. Several runs share one figure, each named by its folder.
Works on finished runs and on ones still running (a half-written last line is skipped); steps
skipped for a non-finite loss are marked with red lines.

    python plot_log.py --out_dir=out/fineweb_124m              # writes out/fineweb_124m/loss.png
    python plot_log.py config/fineweb_124m.py                   # the same, out_dir from the recipe
    python plot_log.py --out_dir=out/run_a,out/run_b --out=compare.png --smoothing=0.8 --svg
    python plot_log.py --out_dir=out/dolly --out=dolly_loss.pdf    # any format matplotlib writes; no extension: .png
"""

import os
from dataclasses import dataclass, field

from gptkit.configurator import BaseConfig, configure
from gptkit.plot import plot_runs
from gptkit.system import print0, run_main


@dataclass
class PlotConfig(BaseConfig):
    out_dir: list[str] = field(default_factory=lambda: ["out/fineweb_124m"])  # run directories holding log.jsonl; several: a,b
    out: str = ""             # image to write (png, pdf, svg...; no extension: png); empty: <out_dir>/loss.png for one run, compare.png for several
    smoothing: float = 0.0    # train-loss moving-average weight in [0, 1): 0.9 smooths a noisy curve (the raw one stays, faint)
    svg: bool = False         # also write the figure as .svg beside the image (sharp at any size, for web pages)

    def validate(self):
        problems = super().validate()
        if not self.out_dir:
            problems.append("out_dir is empty: give one or more run directories, such as --out_dir=out/a,out/b")
        if not 0 <= self.smoothing < 1:
            problems.append(f"smoothing={self.smoothing} must be in [0, 1): 0 is off, 0.9 is strong")
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
    from matplotlib.backend_bases import FigureCanvasBase  # matplotlib takes seconds to import: only when checking --out
    return set(FigureCanvasBase.get_supported_filetypes())


def plot_log(out_dirs, out="", smoothing=0.0, svg=False):
    """Write the figure of the runs in out_dirs (one folder or a list) -> the paths written."""
    out_dirs = [out_dirs] if isinstance(out_dirs, str) else out_dirs
    default = os.path.join(out_dirs[0], "loss.png") if len(out_dirs) == 1 else "compare.png"
    return plot_runs(out_dirs, out or default, smoothing, svg)


if __name__ == "__main__":
    cfg = configure(PlotConfig)
    paths = run_main(plot_log, cfg.out_dir, cfg.out, cfg.smoothing, cfg.svg)  # no log yet: one `error:` line, exit code 2
    print0(f"wrote {', '.join(paths)}")
