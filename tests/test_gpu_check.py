"""gpu_check.py: its dry run takes every step through the real scripts on a CPU (so a GPU loan's first
minute is never spent on a bug), and its budget and package checks skip steps with a reason."""

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import ROOT, shakespeare_shards
import gpu_check
from gptkit.configurator import load_config


def results(out):
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.slow
def test_dry_run_takes_every_step_through_the_scripts(tmp_path):
    (tmp_path / "data").mkdir()
    data = shakespeare_shards(tmp_path / "data", 60_000)
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, "gpu_check.py", "--dry_run=True", f"--data_dir={data}", f"--out_dir={out}"],
                          cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = results(out)
    steps = got["steps"]
    assert list(steps) == list(gpu_check.STEPS) and got["dry_run"] and got["device"] == "cpu"
    for name in ("train_124m", "train_712m", "recipe", "serve", "lora_memory", "int8_decode"):
        assert steps[name]["status"] == "ok", (name, steps[name])
    # the two micro-batches of each speed step, measured
    for name in ("train_124m", "train_712m", "lora_memory"):
        rows = steps[name]["results"]
        assert len(rows) == 2 and all(r["tokens_per_sec"] > 0 for r in rows)
        assert rows[0]["micro_batch_size"] < rows[1]["micro_batch_size"]
    lora = steps["lora_memory"]["results"]
    assert all(r["lora_rank"] == 16 and r["activation_checkpointing"] and r["trainable_params"] < r["params"] / 10
               for r in lora)
    recipes = steps["recipe"]["results"]
    assert [r["recipe"] for r in recipes] == ["default", "nanogpt"] and recipes[0]["tokens"] == recipes[1]["tokens"]
    assert all(math.isfinite(r["final_val_loss"]) for r in recipes)
    assert recipes[0]["final_val_loss"] != recipes[1]["final_val_loss"]  # two recipes, not one run twice
    serve = steps["serve"]
    assert [r["clients"] for r in serve["results"]] == [1, 2] and all(r["tokens_per_sec"] > 0 for r in serve["results"])
    int8 = steps["int8_decode"]
    assert int8["status"] == "ok" and [r["quantize"] for r in int8["results"]] == ["none", "int8"]
    assert all(r["kv_cache_tokens_per_sec"] > 0 for r in int8["results"])
    log = (out / "log.txt").read_text()
    assert log.count("$ bench.py config") == 8 and log.count("$ train.py") == 2 and "$ bench_serve.py" in log


def test_a_spent_budget_and_missing_packages_skip_steps_with_the_reason(tmp_path, monkeypatch, capsys):
    cfg = load_config(gpu_check.GPUCheckConfig, ["--budget_s=10", f"--out_dir={tmp_path}", "--dry_run=True"])
    gpu_check.main(cfg)  # 10 s cannot hold a step: nothing runs
    steps = results(tmp_path)["steps"]
    assert list(steps) == list(gpu_check.STEPS)
    assert all(s["status"] == "skipped" and "budget" in s["reason"] for s in steps.values())
    assert "train_124m: skipped" in capsys.readouterr().out

    monkeypatch.setitem(gpu_check.NEEDS, "serve", ("fastapi", "no_such_package_gptkit"))
    gpu_check.main(load_config(gpu_check.GPUCheckConfig, [f"--out_dir={tmp_path}", "--only=serve", "--dry_run=True"]))
    serve = results(tmp_path)["steps"]["serve"]
    assert serve["status"] == "skipped" and "no_such_package_gptkit" in serve["reason"]


def test_an_unknown_step_is_one_error_line(tmp_path):
    proc = subprocess.run([sys.executable, "gpu_check.py", "--only=train_124m,bogus", f"--out_dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "bogus" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "results.json")  # refused before anything ran
