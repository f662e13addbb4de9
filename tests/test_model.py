import dataclasses
import math
import os

import pytest
import torch

import model as model_module
from model import GPT, ChunkedCrossEntropy, GPTConfig
from torch.nn import functional as F

from conftest import ROOT


@pytest.mark.slow
def test_shapes_and_initial_loss(tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config)
    idx = torch.randint(0, 50257, (4, 32))
    targets = torch.randint(0, 50257, (4, 32))
    logits, loss = model(idx)
    assert logits.shape == (4, 32, 50304) and loss is None
    none, loss = model(idx, targets)  # the loss is computed without materialising the logits
    assert none is None
    torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, 50304), targets.view(-1)))
    # A fresh model predicts about uniformly over the vocabulary.
    assert abs(loss.item() - math.log(50304)) < 0.1
    with torch.no_grad():  # evaluation: the same value, no gradient work
        torch.testing.assert_close(model(idx, targets)[1], loss.detach())


def test_ignore_index():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16))
    idx = torch.randint(0, 50257, (2, 16))
    targets = idx.clone()
    targets[:, :8] = -1
    _, loss_masked = model(idx, targets)
    logits, _ = model(idx)
    expected = torch.nn.functional.cross_entropy(logits[:, 8:].reshape(-1, 50304), idx[:, 8:].reshape(-1))
    torch.testing.assert_close(loss_masked, expected)


def test_causality(tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config).eval()
    idx = torch.randint(0, 50257, (1, 40))
    logits, _ = model(idx)
    for t in (0, 10, 38):
        changed = idx.clone()
        changed[0, t + 1:] = torch.randint(0, 50257, (40 - t - 1,))
        logits2, _ = model(changed)
        torch.testing.assert_close(logits[0, :t + 1], logits2[0, :t + 1], rtol=0, atol=1e-5)
        if t < 38:
            assert not torch.allclose(logits[0, t + 1:], logits2[0, t + 1:])


def test_kv_cache_matches_full_forward(tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config).eval()
    idx = torch.randint(0, 50257, (2, 30))
    full, _ = model(idx)
    cache = model.new_kv_cache(batch_size=2)
    with torch.no_grad():
        prefill, _ = model(idx[:, :12], kv_cache=cache)       # prompt in one go
        steps = [model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(12, 20)]  # one token at a time
        chunk, _ = model(idx[:, 20:], kv_cache=cache)          # a chunk after the cache start
    cached = torch.cat([prefill] + steps + [chunk], dim=1)
    torch.testing.assert_close(cached, full.detach(), rtol=0, atol=1e-5)
    assert cache.pos.tolist() == [30, 30]


def test_rows_of_different_lengths_decode_in_one_batch_as_they_would_alone(tiny_config):
    """Three sequences of 5, 17 and 11 tokens, each prefilled into its own row (chunked, the longest
    in two), then decoded together for 6 tokens: each row's logits are the ones it gets alone,
    within 1e-5. Not bitwise: on CPU fp32 the matmul sums in an order that depends on how many rows
    it multiplies (a 1-row and an 8-row Linear differ by ~1e-6), which no masking can change."""
    torch.manual_seed(0)
    model = GPT(tiny_config, verbose=False).eval()
    lengths, new = [5, 17, 11], 6
    seqs = [torch.randint(0, 50257, (1, n + new)) for n in lengths]
    cache = model.new_kv_cache(batch_size=4)  # one row more than needed: it stays empty
    with torch.no_grad():
        alone = [model(s)[0][:, -new:] for s in seqs]  # (1, new, V) each: no cache at all
        for row, (s, n) in enumerate(zip(seqs, lengths)):
            one = cache.rows(row, row + 1)
            for start in range(0, n, 10):  # a chunked prefill: the second chunk starts at 10
                model(s[:, start:min(n, start + 10)], kv_cache=one)
        assert cache.pos.tolist() == lengths + [0]
        batch = cache.rows(0, 3)
        together = [model(torch.cat([s[:, n + t:n + t + 1] for s, n in zip(seqs, lengths)]), kv_cache=batch)[0]
                    for t in range(new)]  # (3, 1, V) per step
    assert cache.pos.tolist() == [n + new for n in lengths] + [0]
    together = torch.cat(together, dim=1)  # (3, new, V)
    for row in range(3):
        torch.testing.assert_close(together[row:row + 1], alone[row], rtol=0, atol=1e-5)

    # a row copied into another (a finished row's memory reused) goes on as the original would
    cache.copy_row(3, cache, 1)
    with torch.no_grad():
        nxt = torch.randint(0, 50257, (1, 1))
        original, _ = model(nxt, kv_cache=cache.rows(1, 2))
        copy, _ = model(nxt, kv_cache=cache.rows(3, 4))
    assert cache.pos[3] == cache.pos[1] and torch.equal(copy, original)


def test_a_cache_in_another_dtype_takes_rows_of_different_lengths(tiny_config):
    """Keys and values held in a dtype other than the activations' (a bf16 cache for an fp32 model; an
    fp32 cache under bf16 autocast is the same case) are rounded into the cache whether the rows have
    one length (a slice) or several (indexed writes): each batched row decodes as it does alone."""
    torch.manual_seed(0)
    model = GPT(tiny_config, verbose=False).eval()
    lengths, new = [5, 17, 11], 4
    seqs = [torch.randint(0, 50257, (1, n + new)) for n in lengths]
    with torch.no_grad():
        alone = []
        for s, n in zip(seqs, lengths):
            one = model.new_kv_cache(batch_size=1, dtype=torch.bfloat16)
            model(s[:, :n], kv_cache=one)
            alone.append(torch.cat([model(s[:, n + t:n + t + 1], kv_cache=one)[0] for t in range(new)], dim=1))
        cache = model.new_kv_cache(batch_size=3, dtype=torch.bfloat16)
        for row, (s, n) in enumerate(zip(seqs, lengths)):
            model(s[:, :n], kv_cache=cache.rows(row, row + 1))
        together = torch.cat([model(torch.cat([s[:, n + t:n + t + 1] for s, n in zip(seqs, lengths)]), kv_cache=cache)[0]
                              for t in range(new)], dim=1)  # (3, new, V)
    assert together.dtype == torch.float32 and cache.k.dtype == torch.bfloat16
    for row in range(3):
        torch.testing.assert_close(together[row:row + 1], alone[row], rtol=0, atol=1e-5)


def test_in_bf16_a_batched_row_is_its_solo_self_within_bf16_rounding(tiny_config):
    """sample.py and serve.py hold the weights in bf16 where that is the compute dtype (a CPU with bf16
    instructions, a GPU). There a 1-row and a 3-row matmul round differently, so a batched row's logits
    are not bitwise its solo ones: they agree within 0.02 (a few bf16 steps at this logit scale; seen:
    under 0.004), no further than bf16 itself is from fp32. At temperature 0 a batched answer can then
    differ from its solo answer where two tokens are that close; fp32 is exact (the test above).
    tests/test_cuda.py runs the same check on a GPU."""
    check_bf16_batched_rows(tiny_config, "cpu")


def check_bf16_batched_rows(config, device):
    torch.manual_seed(0)
    model32 = GPT(config, verbose=False).eval().to(device)
    model = GPT(config, verbose=False).eval()
    model.load_state_dict(model32.state_dict())
    model.to(device, torch.bfloat16)
    lengths, new = [5, 17, 11], 6
    seqs = [torch.randint(0, 50257, (1, n + new), device=device) for n in lengths]
    with torch.no_grad():
        full32 = [model32(s)[0][:, -new:] for s in seqs]
        alone = []
        for s, n in zip(seqs, lengths):
            one = model.new_kv_cache(batch_size=1)
            model(s[:, :n], kv_cache=one)
            alone.append(torch.cat([model(s[:, n + t:n + t + 1], kv_cache=one)[0] for t in range(new)], dim=1))
        cache = model.new_kv_cache(batch_size=3)
        assert cache.k.dtype == torch.bfloat16  # the cache keeps the weights' dtype
        for row, (s, n) in enumerate(zip(seqs, lengths)):
            model(s[:, :n], kv_cache=cache.rows(row, row + 1))
        together = torch.cat([model(torch.cat([s[:, n + t:n + t + 1] for s, n in zip(seqs, lengths)]), kv_cache=cache)[0]
                              for t in range(new)], dim=1)  # (3, new, V)
    assert together.dtype == torch.bfloat16
    for row in range(3):
        bf16_error = (alone[row].float() - full32[row]).abs().max()
        assert 0 < bf16_error < 0.02  # bf16 really ran, and is close to fp32
        torch.testing.assert_close(together[row:row + 1].float(), alone[row].float(), rtol=0, atol=0.02)


def test_right_padded_rows_prefill_together_as_they_would_alone(tiny_config):
    """Prompts of 5, 17 and 11 tokens in one call, right-padded to 17 with `lengths`: each row's
    last_only logits are its last real position's, each row's cache holds its own length, and the
    next tokens (decoded together) see the prompt and never the padding."""
    torch.manual_seed(0)
    model = GPT(tiny_config, verbose=False).eval()
    lengths, new = [5, 17, 11], 3
    seqs = [torch.randint(0, 50257, (1, n + new)) for n in lengths]
    padded = torch.full((3, 17), 50256)
    for row, (s, n) in enumerate(zip(seqs, lengths)):
        padded[row, :n] = s[0, :n]
    cache = model.new_kv_cache(batch_size=3)
    with torch.no_grad():
        alone = [model(s)[0] for s in seqs]  # (1, n + new, V) each: no cache at all
        first, _ = model(padded, kv_cache=cache, last_only=True, lengths=torch.tensor(lengths))  # (3, 1, V)
        assert cache.pos.tolist() == lengths
        steps = [model(torch.cat([s[:, n + t:n + t + 1] for s, n in zip(seqs, lengths)]), kv_cache=cache)[0]
                 for t in range(new)]  # (3, 1, V) per step
    for row, n in enumerate(lengths):
        torch.testing.assert_close(first[row], alone[row][0, n - 1:n], rtol=0, atol=1e-5)
        for t in range(new):
            torch.testing.assert_close(steps[t][row], alone[row][0, n + t:n + t + 1], rtol=0, atol=1e-5)


def test_last_only_is_the_last_position_of_the_full_logits(tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config).eval()
    idx = torch.randint(0, 50257, (2, 30))
    with torch.no_grad():
        full, _ = model(idx)
        last, _ = model(idx, last_only=True)
        cache = model.new_kv_cache(batch_size=2)
        prefill, _ = model(idx[:, :29], kv_cache=cache, last_only=True)
        step, _ = model(idx[:, 29:], kv_cache=cache, last_only=True)
    assert last.shape == prefill.shape == step.shape == (2, 1, 50304)
    # the same sums; one row through the matmul instead of T may round the last bit differently
    torch.testing.assert_close(last, full[:, -1:], rtol=0, atol=1e-6)
    torch.testing.assert_close(prefill, full[:, 28:29], rtol=0, atol=1e-5)
    torch.testing.assert_close(step, full[:, -1:], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="not both"):
        model(idx, idx, last_only=True)


def test_context_limit(tiny_config):
    model = GPT(tiny_config)
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, tiny_config.block_size + 1, dtype=torch.long))


def test_a_full_kv_cache_says_so(tiny_config):
    model = GPT(tiny_config, verbose=False).eval()
    cache = model.new_kv_cache(batch_size=1, max_len=10)  # shorter than the model's context
    with torch.no_grad():
        model(torch.zeros(1, 8, dtype=torch.long), kv_cache=cache)
        with pytest.raises(ValueError, match=r"KV cache holds 10 positions.*max_len"):
            model(torch.zeros(1, 4, dtype=torch.long), kv_cache=cache)
        assert cache.pos.tolist() == [8]  # nothing written: the cache is still usable
        model(torch.zeros(1, 2, dtype=torch.long), kv_cache=cache)
    assert cache.pos.tolist() == [10]


@pytest.mark.slow
@pytest.mark.parametrize("n_layer,n_head,n_embd,expected", [
    (12, 12, 768, 124_373_760),
    (32, 24, 1296, 711_577_872),
])
def test_parameter_counts(n_layer, n_head, n_embd, expected):
    config = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=1024, vocab_size=50304, bias=False)
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = GPT(config, verbose=False)
    assert model.num_params() == expected


def test_tied_embeddings_and_init(tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config)
    assert model.lm_head.weight is model.transformer.wte.weight
    proj_std = model.transformer.h[0].mlp.c_proj.weight.std().item()
    fc_std = model.transformer.h[0].mlp.c_fc.weight.std().item()
    assert abs(fc_std - 0.02) < 0.002
    assert abs(proj_std - 0.02 / math.sqrt(2 * tiny_config.n_layer)) < 0.002


def test_param_groups_decay_only_matrices(tiny_config):
    model = GPT(tiny_config)
    decay, no_decay = model.param_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == model.num_params()


def test_activation_checkpointing_recomputes_blocks_with_the_same_gradients(tiny_config):
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(tiny_config, dropout=0.1), verbose=False)
    idx = torch.randint(0, 50257, (2, 32))
    runs = []
    model.transformer.h[0].register_forward_pre_hook(lambda *args: runs.append(1))  # a recomputation may stop early
    results = []
    for checkpointing in (False, True):
        model.activation_checkpointing = checkpointing
        model.zero_grad()
        runs.clear()
        torch.manual_seed(1)  # the same dropout masks; the recomputation must replay them too
        _, loss = model(idx, idx)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()], len(runs)))
    (loss_a, grads_a, runs_a), (loss_b, grads_b, runs_b) = results
    assert (runs_a, runs_b) == (1, 2)  # the block ran again in backward instead of keeping its activations
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_flops_per_token():
    config = GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024)
    with torch.device("meta"):
        model = GPT(config, verbose=False)
    n = 124_373_760 - 1024 * 768
    assert model.flops_per_token() == 6 * n + 12 * 12 * 768 * 1024


@pytest.mark.slow
def test_matches_huggingface_gpt2(tiny_config):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=50304, bias=True)
    model = GPT(config).eval()
    hf_config = transformers.GPT2Config(vocab_size=50304, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                        activation_function="gelu_new", resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    state = model.state_dict()
    hf_state = {}
    for k, v in state.items():
        # HF's GPT-2 uses Conv1D: the same matrices, transposed
        if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            v = v.t()
        hf_state[k] = v
    missing, unexpected = hf.load_state_dict(hf_state, strict=False)
    assert not unexpected
    assert all(".attn.bias" in k or "masked_bias" in k for k in missing), missing
    idx = torch.randint(0, 50257, (2, 40))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def plain_loss(x, weight, targets):
    return F.cross_entropy((x @ weight.t()).float(), targets, ignore_index=-1)


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("chunk_rows", [4096, 7])
def test_chunked_cross_entropy_matches_plain(monkeypatch, chunk_rows, compiled):
    monkeypatch.setattr(model_module, "LOSS_CHUNK_ROWS", chunk_rows)  # 7: many chunks, a ragged last one
    torch.manual_seed(0)
    x = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    w = (0.5 * torch.randn(300, 16, dtype=torch.float64)).requires_grad_()
    t = torch.randint(0, 300, (50,))
    t[3:20] = -1  # masked rows, some whole chunks
    loss_fn = ChunkedCrossEntropy.apply
    if compiled:  # the branch torch.compile traces (aot_eager: the same graph, without generating kernels)
        torch._dynamo.reset()
        loss_fn = torch.compile(lambda *args: ChunkedCrossEntropy.apply(*args), backend="aot_eager", fullgraph=True)
    with torch.no_grad():  # evaluation: the loss alone
        torch.testing.assert_close(loss_fn(x, w, t, False), plain_loss(x, w, t))
    for upstream in (1.0, 3.5):  # the gradient scales with the upstream one (e.g. a loss scaler)
        loss = loss_fn(x, w, t, True)
        gx, gw = torch.autograd.grad(loss * upstream, (x, w))
        ref = plain_loss(x, w, t)
        rx, rw = torch.autograd.grad(ref * upstream, (x, w))
        torch.testing.assert_close(loss, ref)
        torch.testing.assert_close(gx, rx)
        torch.testing.assert_close(gw, rw)
        assert gx[3:20].abs().max() == 0  # masked rows get no gradient


def test_chunked_cross_entropy_without_targets_is_nan_with_zero_gradient():
    x = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(20, 8, requires_grad=True)
    loss = ChunkedCrossEntropy.apply(x, w, torch.full((6,), -1))
    assert torch.isnan(loss)  # as F.cross_entropy
    # the trainer drops such a micro-batch with torch.where; no NaN may leak into the gradients
    torch.where(torch.tensor(False), loss, torch.zeros(())).backward()
    assert torch.all(x.grad == 0) and torch.all(w.grad == 0)


def test_chunked_cross_entropy_under_bf16_autocast_matches_plain():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16))
    idx = torch.randint(0, 50257, (2, 16))
    grads = []
    for chunked in (True, False):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if chunked:
                _, loss = model(idx, idx)
            else:  # the plain way: logits, then cross-entropy in fp32
                loss = F.cross_entropy(model(idx)[0].float().view(-1, 50304), idx.view(-1))
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = grads
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-2, atol=1e-2)
    for a, b in zip(grads_a, grads_b):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=5e-2, atol=2e-3)


@pytest.mark.parametrize("bias", [False, True])
def test_flops_per_token_matches_counted_flops(bias):
    # Count every matmul of a forward + backward (the math attention kernel decomposes into bmm that
    # the counter sees). The estimate is 6N + 12*L*C*T with N holding the norm gains and biases too
    # (PaLM's 6N), which do no matmul: the count differs by exactly 6 per such parameter.
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    L, C, T, V = 2, 64, 32, 50304
    model = GPT(GPTConfig(n_layer=L, n_head=4, n_embd=C, block_size=T, vocab_size=V, bias=bias), verbose=False)
    x = torch.randint(0, 50257, (2, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _, loss = model(x, x)
        loss.backward()
    counted = counter.get_total_flops() / x.numel()
    by_hand = 6 * (L * 12 * C * C + V * C) + L * 12 * C * T  # qkv, proj, 2 MLP; lm_head; attention scores and sum
    assert counted == by_hand
    vector_params = sum(p.numel() for p in model.parameters() if p.dim() == 1)
    assert model.flops_per_token() == by_hand + 6 * vector_params


def test_init_follows_the_gpt2_table():
    L = 8  # residual scale 0.02 / sqrt(16) = 0.005: far from 0.02, so a wrong branch shows
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=L, n_head=4, n_embd=128, block_size=64, bias=True), verbose=False)
    assert model.lm_head.weight is model.transformer.wte.weight  # one tensor, initialised once
    residual = 0.02 / math.sqrt(2 * L)
    for name, p in model.named_parameters():
        if ".ln_" in name or name.startswith("transformer.ln_f"):
            assert torch.all(p == (1.0 if name.endswith("weight") else 0.0)), name
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
        else:
            std = residual if name.endswith("c_proj.weight") else 0.02
            assert abs(p.std().item() - std) < 0.05 * std, (name, p.std().item(), std)
            assert abs(p.mean().item()) < 0.1 * std, name


def test_dropout_only_in_training(tiny_config):
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(tiny_config, dropout=0.5), verbose=False)
    plain = GPT(tiny_config, verbose=False)
    plain.load_state_dict(model.state_dict())
    idx = torch.randint(0, 50257, (2, 32))
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model(idx)[0], plain.eval()(idx)[0], rtol=0, atol=0)
        model.train()
        assert not torch.allclose(model(idx)[0], plain(idx)[0])


@pytest.mark.parametrize("cache_dtype", [None, torch.bfloat16])
def test_kv_cache_under_bf16_autocast_matches_full_forward(tiny_config, cache_dtype):
    # generate() keeps the cache in the autocast dtype (bf16); None: the weights' dtype (fp32)
    torch.manual_seed(0)
    model = GPT(tiny_config, verbose=False).eval()
    idx = torch.randint(0, 50257, (2, 30))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full, _ = model(idx)
        cache = model.new_kv_cache(batch_size=2, dtype=cache_dtype)
        prefill, _ = model(idx[:, :12], kv_cache=cache)
        steps = [model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(12, 20)]
        chunk, _ = model(idx[:, 20:], kv_cache=cache)
    cached = torch.cat([prefill] + steps + [chunk], dim=1)
    assert cached.dtype == full.dtype == torch.bfloat16
    # the same attention; bf16 rounds the other way here and there (about 1 unit in the last place)
    torch.testing.assert_close(cached.float(), full.float(), rtol=0, atol=8e-3)
    assert torch.equal(cached.argmax(-1), full.argmax(-1))


def test_head_size_54_on_cpu_is_plain_causal_attention():
    # the 712M's head size: on CPU pad_heads changes nothing and the fused kernel computes the textbook formula
    torch.manual_seed(0)
    attn = GPT(GPTConfig(n_layer=1, n_head=3, n_embd=162, block_size=64), verbose=False).transformer.h[0].attn
    assert attn.pad_heads
    x = torch.randn(2, 40, 162)
    B, T, C = x.shape
    hs = 54
    with torch.no_grad():
        y = attn(x)
        q, k, v = (t.view(B, T, 3, hs).transpose(1, 2) for t in attn.c_attn(x).split(C, dim=2))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(hs)
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        expected = attn.c_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C))
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,millions", [("fineweb_124m", 124), ("fineweb_712m", 712)])
def test_shipped_configs_have_the_sizes_they_are_named_after(name, millions):
    from gptkit.configurator import load_config
    from gptkit.train_config import TrainConfig
    cfg = load_config(TrainConfig, [os.path.join(ROOT, "config", f"{name}.py")])
    cfg.vocab_size = cfg.vocab_size or 50304  # the default: GPT-2's tokenizer, padded
    config = GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                       n_embd=cfg.n_embd, bias=cfg.bias)
    with torch.device("meta"):
        model = GPT(config, verbose=False)
    assert round(model.num_params() / 1e6) == millions
    L, C, T, V = cfg.n_layer, cfg.n_embd, cfg.block_size, cfg.vocab_size
    assert model.num_params() == V * C + T * C + L * (12 * C * C + 2 * C) + C  # embeddings, blocks, ln_f
    # PaLM: 6 per parameter but the position embeddings, 12*L*C*T for attention
    assert model.flops_per_token() == 6 * (model.num_params() - T * C) + 12 * L * C * T
