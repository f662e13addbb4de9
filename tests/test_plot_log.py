"""plot_log.py: what it writes, and a clear error instead of a traceback or a blank plot."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from gptkit.configurator import ConfigError, load_config
from gptkit.plot import draw_runs, read_log, read_run, series, smooth
from plot_log import PlotConfig, plot_log


def write_log(folder, records):
    with open(folder / "log.jsonl", "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


# as the trainer logs them: train lines carry tokens_seen (config.json, when present, says the same)
RECORDS = [{"step": 0, "val_loss": 10.8}, {"step": 5, "loss": 9.5, "lr": 1e-3, "tokens_seen": 5120},
           {"step": 10, "loss": 8.1, "lr": 2e-3, "tokens_seen": 10240}]


@pytest.mark.slow
def test_out_without_extension_reports_the_file_written(tmp_path):
    write_log(tmp_path, RECORDS)
    [path] = plot_log(str(tmp_path), str(tmp_path / "curves"))
    assert path == str(tmp_path / "curves.png") and os.path.getsize(path) > 0
    assert not os.path.exists(tmp_path / "curves")
    assert plot_log(str(tmp_path), str(tmp_path / "dot.")) == [str(tmp_path / "dot.png")]


def test_out_that_cannot_be_written_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(PlotConfig, [f"--out={tmp_path / 'missing' / 'loss.png'}"])
    with pytest.raises(ConfigError, match=r"cannot write \.xyz"):
        load_config(PlotConfig, [f"--out={tmp_path / 'loss.xyz'}"])
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(PlotConfig, [f"--out={tmp_path}"])
    assert load_config(PlotConfig, [f"--out={tmp_path / 'loss.pdf'}"]).out.endswith("loss.pdf")


@pytest.mark.slow
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
    assert os.path.getsize(plot_log(str(tmp_path))[0]) > 10_000


def test_out_dir_from_a_recipe():
    # python plot_log.py config/dolly.py: the recipe's other keys belong to other scripts
    for recipe in ("dolly", "tiny_cpu"):
        assert load_config(PlotConfig, [os.path.join(ROOT, "config", f"{recipe}.py")]).out_dir == [f"out/{recipe}"]


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
    (tmp_path / "config.json").write_text(json.dumps({"total_batch_tokens": 512}))
    assert legend_of_saved_figure(monkeypatch, tmp_path) == ["val loss (best 9.100)"]


def test_skipped_steps_are_marked(tmp_path, monkeypatch):
    # the trainer logs {"step": s, "skipped_step": true} for a step whose loss was not finite
    write_log(tmp_path, RECORDS + [{"step": 11, "skipped_step": True, "bad_steps_in_row": 1},
                                   {"step": 12, "skipped_step": True, "bad_steps_in_row": 2},
                                   {"step": 15, "loss": 7.9, "lr": 1e-3}])
    assert legend_of_saved_figure(monkeypatch, tmp_path) == ["train loss", "val loss (best 10.800)", "skipped steps (2)"]


def fake_run(folder, tokens_per_step, steps, loss_at, hellaswag=False):
    """A run folder as train.py leaves it: config.json and a log of train lines every 2 steps, val every 4."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"total_batch_tokens": tokens_per_step, "out_dir": str(folder)}))
    records = []
    for step in range(0, steps + 1, 2):
        tokens = step * tokens_per_step
        if step:
            records.append({"step": step, "loss": loss_at(tokens), "lr": 1e-3, "tokens_seen": tokens})
        if step % 4 == 0:
            records.append({"step": step, "val_loss": loss_at(tokens) + 0.1,
                            **({"hellaswag_acc_norm": 0.25 + tokens / 1e7} if hellaswag and step else {})})
    write_log(folder, records)
    return str(folder)


@pytest.mark.slow
def test_runs_of_different_batch_sizes_line_up_by_tokens(tmp_path, monkeypatch):
    # the same token budget in 20 steps of 8192 and in 40 steps of 4096: the same x range, the same curve
    def loss_at(tokens):
        return 10 - tokens / 50_000

    big = fake_run(tmp_path / "batch_8k", 8192, 20, loss_at, hellaswag=True)
    small = fake_run(tmp_path / "batch_4k", 4096, 40, loss_at)
    figure = draw_runs([read_run(big), read_run(small)])
    ax_loss, ax_lr, ax_hellaswag = figure.axes
    lines = {line.get_label(): line for line in ax_loss.get_lines()}
    assert sorted(lines) == ["batch_4k train loss", "batch_4k val loss (best 6.823)",
                             "batch_8k train loss", "batch_8k val loss (best 6.823)"]
    for name, tokens_per_step, steps in (("batch_8k", 8192, 20), ("batch_4k", 4096, 40)):
        train = lines[f"{name} train loss"]
        assert list(train.get_xdata()) == [s * tokens_per_step for s in range(2, steps + 1, 2)]  # tokens, not steps
        assert list(train.get_ydata()) == [loss_at(x) for x in train.get_xdata()]
        assert max(train.get_xdata()) == 163_840
    assert ax_loss.get_legend() is not None and ax_hellaswag.get_ylabel() == "HellaSwag acc_norm"
    assert [line.get_label() for line in ax_lr.get_lines()] == ["batch_8k", "batch_4k"]
    hellaswag = [line for line in ax_hellaswag.get_lines() if line.get_label() == "batch_8k"]
    assert len(hellaswag) == 1 and list(hellaswag[0].get_xdata()) == [32768 * k for k in range(1, 6)]
    assert ax_hellaswag.get_xlabel() == "tokens trained"
    # the script's flags: a comma list of folders, PNG and SVG; a run without HellaSwag gets no such panel
    out = tmp_path / "compare.png"
    cfg = load_config(PlotConfig, [f"--out_dir={big},{small}", f"--out={out}", "--smoothing=0.5", "--svg"])
    assert cfg.out_dir == [big, small]
    assert plot_log(cfg.out_dir, cfg.out, cfg.smoothing, cfg.svg) == [str(out), str(tmp_path / "compare.svg")]
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and b"<svg" in open(tmp_path / "compare.svg", "rb").read(500)
    assert len(draw_runs([read_run(small)]).axes) == 2


def test_smoothing_keeps_the_raw_curve_and_starts_unbiased(tmp_path):
    assert smooth([4.0, 4.0, 4.0], 0.9) == pytest.approx([4.0, 4.0, 4.0])  # no pull towards 0 at the start
    assert smooth([1.0, 3.0], 0.0) == [1.0, 3.0]
    assert smooth([0.0, 10.0], 0.5)[1] == pytest.approx(10 * 0.5 / 0.75)
    run = read_run(fake_run(tmp_path / "run", 1024, 20, lambda tokens: 10 - tokens / 4096))
    lines = draw_runs([run], smoothing=0.9).axes[0].get_lines()
    raw, smoothed = lines[0], lines[1]
    assert smoothed.get_label() == "train loss" and raw.get_alpha() == 0.25
    assert list(raw.get_ydata()) == [10 - s / 4 for s in range(2, 21, 2)]
    assert list(smoothed.get_ydata()) == pytest.approx(smooth(list(raw.get_ydata()), 0.9))


def test_run_names_and_tokens_per_step_without_config(tmp_path):
    from gptkit.plot import run_names
    assert run_names(["out/a", "out/b/"]) == ["a", "b"]
    assert run_names(["x/base", "y/base", "z"]) == ["x/base", "y/base", "z"]  # same folder name: the paths
    write_log(tmp_path, RECORDS)  # no config.json: tokens per step from the log's tokens_seen
    assert read_run(str(tmp_path)).tokens_per_step == 1024
    write_log(tmp_path, [{"step": 0, "val_loss": 10.8}])
    with pytest.raises(ConfigError, match="cannot tell how many tokens a step holds"):
        read_run(str(tmp_path))
    with pytest.raises(ConfigError, match=r"smoothing=1\.0 must be in \[0, 1\)"):
        load_config(PlotConfig, ["--smoothing=1"])


def test_a_run_of_one_logged_step_is_drawn(tmp_path):
    # one train record (a 1-step run): a line through one point would draw nothing
    write_log(tmp_path, [{"step": 0, "val_loss": 10.8}, {"step": 1, "loss": 10.7, "lr": 1e-4, "tokens_seen": 512}])
    fig = draw_runs([read_run(str(tmp_path))])
    loss_panel, lr_panel = fig.axes[0], fig.axes[1]
    train = next(line for line in loss_panel.get_lines() if line.get_label() == "train loss")
    assert train.get_marker() == "o" and lr_panel.get_lines()[0].get_marker() == "o"
