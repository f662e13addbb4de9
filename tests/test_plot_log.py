"""plot_log.py: what it writes, and a clear error instead of a traceback or a blank plot."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from gptkit.configurator import ConfigError, load_config
from plot_log import PlotConfig, plot_log, read_log, series


def write_log(folder, records):
    with open(folder / "log.jsonl", "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


RECORDS = [{"step": 0, "val_loss": 10.8}, {"step": 5, "loss": 9.5, "lr": 1e-3}, {"step": 10, "loss": 8.1, "lr": 2e-3}]


def test_out_without_extension_reports_the_file_written(tmp_path):
    write_log(tmp_path, RECORDS)
    path = plot_log(str(tmp_path), str(tmp_path / "curves"))
    assert path == str(tmp_path / "curves.png") and os.path.getsize(path) > 0
    assert not os.path.exists(tmp_path / "curves")
    assert plot_log(str(tmp_path), str(tmp_path / "dot.")) == str(tmp_path / "dot.png")


def test_out_that_cannot_be_written_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(PlotConfig, [f"--out={tmp_path / 'missing' / 'loss.png'}"])
    with pytest.raises(ConfigError, match=r"cannot write \.xyz"):
        load_config(PlotConfig, [f"--out={tmp_path / 'loss.xyz'}"])
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(PlotConfig, [f"--out={tmp_path}"])
    assert load_config(PlotConfig, [f"--out={tmp_path / 'loss.pdf'}"]).out.endswith("loss.pdf")


def test_empty_log_is_an_error_not_a_blank_plot(tmp_path):
    write_log(tmp_path, [])
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "plot_log.py"), f"--out_dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no loss" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "loss.png")


def test_a_running_log_with_a_half_written_line_and_nonfinite_losses(tmp_path):
    records = RECORDS + [{"step": 11, "loss": float("nan"), "skipped_step": True}, {"step": 12, "loss": float("inf")},
                         {"step": 15, "loss": 7.9, "lr": 1e-3}]
    write_log(tmp_path, records)
    with open(tmp_path / "log.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 20, "loss": 7.')  # the trainer is writing this line right now
    assert series(read_log(str(tmp_path / "log.jsonl")), "loss") == ([5, 10, 15], [9.5, 8.1, 7.9])
    assert series(read_log(str(tmp_path / "log.jsonl")), "val_loss") == ([0], [10.8])
    assert os.path.getsize(plot_log(str(tmp_path))) > 10_000


def test_out_dir_from_a_recipe():
    # python plot_log.py config/dolly.py: the recipe's other keys belong to other scripts
    for recipe in ("dolly", "tiny_cpu"):
        assert load_config(PlotConfig, [os.path.join(ROOT, "config", f"{recipe}.py")]).out_dir == f"out/{recipe}"


def legend_of_saved_figure(monkeypatch, out_dir):
    """Plot out_dir's log and return the labels of the loss panel's legend."""
    from matplotlib.figure import Figure
    saved = []
    savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (saved.append(self), savefig(self, *a, **k))[1])
    plot_log(str(out_dir))
    return [text.get_text() for text in saved[0].axes[0].get_legend().get_texts()]


def test_a_log_with_val_loss_only_shows_no_empty_train_curve(tmp_path, monkeypatch):
    # an eval-only log (train loss not logged yet): the legend named a train loss that was not drawn
    write_log(tmp_path, [{"step": 0, "val_loss": 10.8}, {"step": 50, "val_loss": 9.1}])
    assert legend_of_saved_figure(monkeypatch, tmp_path) == ["val loss"]


def test_skipped_steps_are_marked(tmp_path, monkeypatch):
    # the trainer logs {"step": s, "skipped_step": true} for a step whose loss was not finite
    write_log(tmp_path, RECORDS + [{"step": 11, "skipped_step": True, "bad_steps_in_row": 1},
                                   {"step": 12, "skipped_step": True, "bad_steps_in_row": 2},
                                   {"step": 15, "loss": 7.9, "lr": 1e-3}])
    assert legend_of_saved_figure(monkeypatch, tmp_path) == ["train loss", "val loss", "skipped steps (2)"]
