import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from bench import BenchConfig, attention_kernels, bench_decode, bench_tokenize, device_peak_flops, mfu
from gptkit.configurator import ConfigError, load_config
from gptkit.system import setup_runtime
from model import GPT, GPTConfig

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


@pytest.mark.slow
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
    assert "aten::_scaled_dot_product" in result["attention_kernels"]  # measured on the CPU too
    # every setting rides along, so that a row of results says how it was made
    assert result["config"] == {**result["config"], "n_layer": 2, "n_embd": 32, "total_batch_tokens": 128,
                                "optimizer": "adamw", "seed": 1337, "warmup": 1, "json": True}
    assert set(result["config"]) == {f.name for f in dataclasses.fields(BenchConfig)}


TINY = ["--device=cpu", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--micro_batch_size=2",
        "--total_batch_tokens=64"]


def test_settings_that_cannot_run_are_refused(tmp_path):
    for flag, problem in [("--steps=0", "steps=0"), ("--warmup=-1", "warmup=-1")]:
        with pytest.raises(ConfigError, match=problem):
            load_config(BenchConfig, TINY + [flag])
    with pytest.raises(ConfigError, match="without a GPU"):
        load_config(BenchConfig, TINY + ["--attention=cudnn"])
    with pytest.raises(ConfigError, match="block_size=1"):
        load_config(BenchConfig, TINY + ["--mode=decode", "--block_size=1"])
    with pytest.raises(ConfigError, match="use --optimizer=adamw"):  # a LoRA step: adapters train with AdamW
        load_config(BenchConfig, TINY + ["--lora_rank=4", "--optimizer=muon"])
    with pytest.raises(ConfigError, match="lora_rank=4 is for mode=train"):
        load_config(BenchConfig, TINY + ["--lora_rank=4", "--mode=decode"])
    (tmp_path / "notes.md").write_text("not a .txt")
    with pytest.raises(ConfigError, match="no .txt or .zip files found"):
        load_config(BenchConfig, ["--mode=tokenize", f"--text={tmp_path}"])


def test_tokenize_without_any_text_is_an_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    cfg = load_config(BenchConfig, ["--mode=tokenize", f"--text={tmp_path}"])
    with pytest.raises(ConfigError, match="no text"):
        bench_tokenize(cfg)


def test_decode_fits_the_prompt_to_a_short_context(capsys):
    cfg = load_config(BenchConfig, TINY + ["--mode=decode", "--steps=1", "--warmup=0", "--json=True"])
    result = bench_decode(cfg, setup_runtime("cpu", "float32", cfg.seed, verbose=False))
    assert result["prompt_tokens"] == 16 and result["new_tokens"] == 16
    progress = capsys.readouterr()
    assert "2/2" in progress.err and "without KV cache" in progress.err and not progress.out  # shown, on stderr
    assert result["kv_cache_tokens_per_sec"] > 0 and result["no_cache_tokens_per_sec"] > 0


@pytest.mark.slow
def test_attention_kernels_names_what_ran_on_the_cpu():
    rt = setup_runtime("cpu", "float32", 1337, verbose=False)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32), verbose=False)
    default = attention_kernels(model, rt, load_config(BenchConfig, TINY))
    forced = attention_kernels(model, rt, load_config(BenchConfig, TINY + ["--attention=math"]))
    assert "aten::_scaled_dot_product" in default and "aten::_scaled_dot_product" in forced
    assert default != forced and "math" in forced  # a forced kernel is what gets reported


def test_decode_runs_in_the_configured_dtype(monkeypatch):
    # sample.py generates under the runtime's autocast; the benchmark must measure the same thing
    seen = []
    forward = GPT.forward
    def spy(self, *args, **kwargs):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32)
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(GPT, "forward", spy)
    cfg = load_config(BenchConfig, TINY + ["--mode=decode", "--steps=1", "--warmup=0", "--dtype=bfloat16", "--no_cache=False"])
    result = bench_decode(cfg, setup_runtime("cpu", "bfloat16", cfg.seed, verbose=False))
    assert result["dtype"] == "bfloat16" and set(seen) == {torch.bfloat16}
    assert "no_cache_tokens_per_sec" not in result  # --no_cache=False: the cached decode only


def test_decode_rows_are_one_batch_and_all_counted(monkeypatch):
    """--decode_rows=3: every forward carries the 3 rows, with the weights in bf16 as sample.py holds them."""
    shapes = []
    forward = GPT.forward
    def spy(self, idx, *args, **kwargs):
        shapes.append((idx.size(0), self.lm_head.weight.dtype))
        return forward(self, idx, *args, **kwargs)
    monkeypatch.setattr(GPT, "forward", spy)
    rt = setup_runtime("cpu", "bfloat16", 1337, verbose=False)
    cfg = load_config(BenchConfig, TINY + ["--mode=decode", "--steps=1", "--warmup=0", "--decode_rows=3"])
    result = bench_decode(cfg, rt)
    assert result["rows"] == 3 and set(shapes) == {(3, torch.bfloat16)}
    assert result["kv_cache_tokens_per_sec"] > 0 and "no_cache_tokens_per_sec" not in result  # serve.py always caches
    assert "decode_rows=0" in "\n".join(BenchConfig(decode_rows=0).validate())


def test_tokenize_figures_of_a_small_input_are_not_rounded_to_zero(tmp_path):
    (tmp_path / "a.txt").write_text("A few words of text.\n\nAnd a second paragraph.\n")
    result = bench_tokenize(load_config(BenchConfig, ["--mode=tokenize", f"--text={tmp_path}", "--num_proc=1"]))
    assert result["tokens"] > 0
    for key in ("megabytes", "mb_per_s", "plain_tiktoken_mb_per_s", "mb_per_s_per_proc"):
        assert result[key] > 0, (key, result)
    from bench import read_documents
    assert result["megabytes"] == pytest.approx(sum(len(d.encode()) for d in read_documents(str(tmp_path))) / 1e6,
                                                rel=1e-2)
