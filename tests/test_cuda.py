"""Checks that need a CUDA GPU; they skip themselves elsewhere. Run on a GPU machine with
    python -m pytest -q tests/test_cuda.py
(speed and memory figures are bench.py's job; these check correctness of the GPU-only paths)."""
import json
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F

from conftest import ROOT
from model import GPT, CausalSelfAttention, ChunkedCrossEntropy, GPTConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BF16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def head_inputs(n, c=768, v=50304, dtype=torch.float32):
    torch.manual_seed(0)
    x = torch.randn(n, c, device="cuda", dtype=dtype, requires_grad=True)
    w = (0.02 * torch.randn(v, c, device="cuda", dtype=dtype)).requires_grad_()
    t = torch.randint(0, 50257, (n,), device="cuda")
    t[: n // 4] = -1
    return x, w, t


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_loss_matches_plain_under_autocast(dtype):
    if dtype is torch.bfloat16 and not BF16:
        pytest.skip("no bf16 on this GPU")
    x, w, t = head_inputs(10_000)  # 3 chunks, the last one ragged
    results = []
    for loss_fn in (lambda: ChunkedCrossEntropy.apply(x, w, t),
                    lambda: F.cross_entropy((x @ w.t()).float(), t, ignore_index=-1)):
        with torch.autocast("cuda", dtype=dtype):
            loss = loss_fn()
        results.append((loss.detach(), *torch.autograd.grad(loss * 1024.0, (x, w))))  # 1024: a loss scale
    (loss, *grads), (plain_loss, *plain_grads) = results
    torch.testing.assert_close(loss, plain_loss, rtol=1e-3, atol=1e-3)
    for ours, plain in zip(grads, plain_grads):
        # both round their matmul outputs to 16 bits, at different points: compare as a whole
        assert torch.isfinite(ours).all()
        assert (ours - plain).float().norm() / plain.float().norm() < 1e-2


def peak_memory_of(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def test_chunked_loss_needs_far_less_memory():
    x, w, t = head_inputs(16_384)  # a 124M micro-batch of 16 x 1024

    def step(loss_fn):
        with torch.autocast("cuda", dtype=torch.bfloat16 if BF16 else torch.float16):
            loss = loss_fn()
        loss.backward()
        x.grad = w.grad = None

    plain = peak_memory_of(lambda: step(lambda: F.cross_entropy((x @ w.t()).float(), t, ignore_index=-1)))
    chunked = peak_memory_of(lambda: step(lambda: ChunkedCrossEntropy.apply(x, w, t)))
    # plain holds 16,384 x 50,304 logits in bf16 and fp32 and their gradient: several GB
    assert chunked < plain / 2, (chunked / 2**30, plain / 2**30)


def test_padded_heads_compute_the_same_attention(monkeypatch):
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=4, n_embd=216, block_size=128)  # head size 54, as the 712M
    model = GPT(cfg, verbose=False).cuda().eval()
    idx = torch.randint(0, 50257, (2, 128), device="cuda")
    with torch.no_grad():
        padded, _ = model(idx)
        monkeypatch.setattr(CausalSelfAttention, "pad_heads", False)
        plain, _ = model(idx)
    torch.testing.assert_close(padded, plain, rtol=1e-4, atol=1e-4)


def test_compiled_training_step_matches_eager():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=128, block_size=128), verbose=False).cuda().train()
    compiled = torch.compile(model)
    idx = torch.randint(0, 50257, (4, 128), device="cuda")
    grads = []
    for m in (compiled, model):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16 if BF16 else torch.float16):
            _, loss = m(idx, idx)
        loss.backward()
        grads.append((loss.detach().float(), [p.grad.float() for p in model.parameters()]))
    (loss_c, grads_c), (loss_e, grads_e) = grads
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-2, atol=1e-2)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-3)


def test_bench_runs_on_the_gpu_and_names_its_attention_kernel():
    proc = subprocess.run([sys.executable, "bench.py", "config/tiny_cpu.py", "--device=cuda", "--steps=2",
                           "--warmup=1", "--json=True"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tokens_per_sec"] > 0 and result["peak_memory_gb"] > 0
    assert result["attention_kernels"] not in ("", "none matched", "math (CPU)")


@pytest.mark.skipif(not BF16, reason="needs a GPU with bf16")
def test_bf16_weights_batched_rows_are_their_solo_selves_within_bf16_rounding(tiny_config):
    # serve.py on a GPU holds the weights in bf16: a batched row's logits stay within 0.02 of its solo ones
    from test_model import check_bf16_batched_rows
    check_bf16_batched_rows(tiny_config, "cuda")
