import json
import os
import subprocess
import sys

import pytest

from bench import device_peak_flops, mfu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_peak_table_matches_specific_names_first():
    assert device_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert device_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert device_peak_flops("NVIDIA GH200 480GB") == 989e12
    assert device_peak_flops("NVIDIA A100-SXM4-40GB") == 312e12
    assert device_peak_flops("NVIDIA GeForce RTX 3080 Ti") == 68e12
    assert device_peak_flops("Some Future GPU") is None
    assert device_peak_flops("cpu") is None and device_peak_flops("") is None


def test_mfu_arithmetic():
    # 124M: 6 * 123,587,328 + 12 * 12 * 768 * 1024 FLOPs per token
    flops_per_token = 6 * (124_373_760 - 1024 * 768) + 12 * 12 * 768 * 1024
    assert mfu(flops_per_token, 600_000, 989e12) == pytest.approx(0.5186, abs=1e-4)
    assert mfu(flops_per_token, 600_000, None) is None


def test_bench_runs_on_cpu_and_prints_json():
    cmd = [sys.executable, "bench.py", "--device=cpu", "--n_layer=2", "--n_head=2", "--n_embd=32",
           "--block_size=32", "--micro_batch_size=2", "--total_batch_tokens=128", "--steps=2", "--warmup=1",
           "--json=True"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, out.stdout  # nothing but the JSON line on stdout
    result = json.loads(lines[0])
    assert result["grad_accum"] == 2 and result["micro_batch_size"] == 2
    assert result["tokens_per_sec"] > 0 and result["mfu"] is None  # a CPU is not in the peak table
    assert result["dtype"] == "float32"
