import asyncio

import pytest
import torch

from gptkit.checkpoint import save_checkpoint
from gptkit.engine import Engine, Job
from gptkit.generate import (apply_repetition_penalty, check_sampling_args, generate, generate_samples,
                             candidate_probs, draw, make_generator, sample_next, top_k_filter, top_p_filter)
from gptkit.loading import load_model
from gptkit.tokenizer import MIN_VOCAB_SIZE, load_tokenizer
from model import GPT, GPTConfig


def lively_model(block_size=64, dropout=0.0, seed=0, vocab_size=50304):
    """A tiny random GPT with large weights: GPT-2's small init makes a random model repeat one
    token forever, which would make cache-vs-no-cache comparisons too easy to pass."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=block_size, dropout=dropout,
                          vocab_size=vocab_size), verbose=False)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5)
    return model.eval()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny matmuls: on a shared 2-core machine a second OpenMP thread mostly waits (10x slower)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return lively_model()


PROMPT = [464, 3290, 286, 1204, 318]  # "The meaning of life is"


def test_greedy_with_cache_equals_without(model):
    cached = list(generate(model, PROMPT, 45, temperature=0))
    uncached = list(generate(model, PROMPT, 45, temperature=0, use_cache=False))
    assert len(cached) == 45
    assert len(set(cached)) > 20, "the model should produce varied tokens, or the comparison proves little"
    assert cached == uncached


def test_greedy_with_penalty_cache_equals_without(model):
    kwargs = dict(temperature=0, repetition_penalty=1.3)
    assert list(generate(model, PROMPT, 40, **kwargs)) == list(generate(model, PROMPT, 40, use_cache=False, **kwargs))


def test_batched_samples_match_single_greedy(model):
    single = list(generate(model, PROMPT, 30, temperature=0))
    samples = generate_samples(model, PROMPT, 3, 30, temperature=0)
    assert samples == [single] * 3


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [0.0, -1.0, 7.0, 6.0, 6.5]])
    kept = torch.isfinite(top_k_filter(logits, 2))
    assert kept.tolist() == [[False, True, False, True, False], [False, False, True, False, True]]
    out = top_k_filter(logits, 2)
    assert out[0, 1] == 5.0 and out[0, 3] == 4.0  # kept logits are unchanged
    assert torch.equal(top_k_filter(logits, 0), logits)
    assert torch.equal(top_k_filter(logits, 5), logits)
    ties = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert torch.isfinite(top_k_filter(ties, 2)).sum() == 2  # never more than k, even with ties


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    logits = probs.log()

    def kept(p):
        return torch.isfinite(top_p_filter(logits, p)).squeeze(0).tolist()

    assert kept(0.3) == [False, True, False, False]   # 0.5 alone reaches 0.3
    assert kept(0.7) == [False, True, False, True]    # 0.5 + 0.3
    assert kept(0.9) == [True, True, False, True]     # 0.5 + 0.3 + 0.15
    assert kept(0.99) == [True, True, True, True]
    assert kept(1.0) == [True, True, True, True]
    assert kept(0.01) == [False, True, False, False]  # the most likely token always stays


def test_candidates_are_the_distribution_of_top_k_then_top_p():
    """candidate_probs samples among the k survivors (top-p ranks only those): put back in their places
    among all V tokens, the same distribution as filtering all V; without top_k, all V are candidates."""
    torch.manual_seed(0)
    logits = torch.randn(8, 50304) * 3
    for top_k, top_p in [(50, 0.9), (50, 0.3), (1, 0.5), (200, 0.99), (50, 1.0), (0, 0.9), (0, 1.0)]:
        full = torch.softmax(top_p_filter(top_k_filter(logits / 0.8, top_k), top_p), dim=-1)
        probs, ids = candidate_probs(logits, 0.8, top_k, top_p)
        assert probs.shape == (8, top_k or 50304) and (ids is None) == (top_k == 0)
        placed = probs if ids is None else torch.zeros_like(full).scatter_(1, ids, probs)
        # a softmax over the k candidates sums in another order than one over all V: up to 2 float32 ulps
        torch.testing.assert_close(placed, full, rtol=0, atol=2e-7)


def test_draws_follow_the_candidate_distribution():
    """draw() maps a candidate back to its token id, with each token's frequency its probability."""
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -9.0]]).repeat(20000, 1)
    tokens = draw(*candidate_probs(logits, 1.0, top_k=3), generator=torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == {1, 2, 3}  # the top 3 only, as token ids, not candidate indices
    expected = torch.softmax(torch.tensor([3.0, 1.0, 2.0]), dim=0)
    counts = torch.bincount(tokens, minlength=5)[[1, 2, 3]].float() / len(tokens)
    torch.testing.assert_close(counts, expected, atol=0.015, rtol=0)  # 20,000 draws: within ~4 standard errors


def test_repetition_penalty_math():
    logits = torch.tensor([[2.0, -1.0, 3.0, 0.5, 4.0]])
    previous = torch.tensor([[0, 1, 1, 4]])
    out = apply_repetition_penalty(logits, previous, 2.0)
    assert out.tolist() == [[1.0, -2.0, 3.0, 0.5, 2.0]]  # positive / 2, negative * 2, unseen unchanged
    out = apply_repetition_penalty(logits, previous, 2.0, exempt=(4,))
    assert out.tolist() == [[1.0, -2.0, 3.0, 0.5, 4.0]]  # a stop token is never penalised
    assert torch.equal(apply_repetition_penalty(logits, previous, 1.0), logits)


def test_temperature_zero_is_argmax_and_sampling_is_seeded():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(0))
    previous = torch.zeros(4, 1, dtype=torch.long)
    assert torch.equal(sample_next(logits, previous, temperature=0), logits.argmax(-1))
    a = sample_next(logits, previous, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = sample_next(logits, previous, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    # top_k=1 leaves a single candidate: sampling must return the argmax
    c = sample_next(logits, previous, temperature=1.5, top_k=1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(c, logits.argmax(-1))


def test_same_seed_same_tokens(model):
    kwargs = dict(temperature=1.0, top_k=100, top_p=0.9)
    a = list(generate(model, PROMPT, 30, generator=make_generator(model, 11), **kwargs))
    b = list(generate(model, PROMPT, 30, generator=make_generator(model, 11), **kwargs))
    c = list(generate(model, PROMPT, 30, generator=make_generator(model, 12), **kwargs))
    assert a == b
    assert a != c
    s1 = generate_samples(model, PROMPT, 3, 20, generator=make_generator(model, 5))
    s2 = generate_samples(model, PROMPT, 3, 20, generator=make_generator(model, 5))
    assert s1 == s2 and s1[0] != s1[1]  # reproducible, and the samples are independent


def test_stops_at_stop_tokens(model):
    free = list(generate(model, PROMPT, 40, temperature=0))
    stop = free[6]
    cut = free.index(stop)
    stopped = list(generate(model, PROMPT, 40, temperature=0, stop_tokens=(stop,)))
    assert stopped == free[:cut]  # ends right before the stop token, which is not yielded
    assert list(generate(model, PROMPT, 40, temperature=0, stop_tokens=(stop,), use_cache=False)) == free[:cut]
    assert generate_samples(model, PROMPT, 2, 40, temperature=0, stop_tokens=(stop,)) == [free[:cut]] * 2


def test_stops_when_the_stop_token_always_wins():
    model = lively_model()

    def end_wins(module, inputs, logits):  # patch the logits so that <|end|> (50260) is the argmax
        logits = logits.clone()
        logits[..., 50260] = 1e4
        return logits

    model.lm_head.register_forward_hook(end_wins)
    assert list(generate(model, PROMPT, 20, temperature=0)) == [50260] * 20  # without the stop token
    assert list(generate(model, PROMPT, 20, temperature=0.7, stop_tokens=(50260,))) == []
    assert list(generate(model, PROMPT, 20, temperature=0.7, stop_tokens=(50260,), use_cache=False)) == []


def test_context_limit(model):
    block = model.config.block_size
    prompt = list(range(100, 100 + block - 4))
    assert len(list(generate(model, prompt, 100, temperature=0))) == 4
    assert len(list(generate(model, prompt, 100, temperature=0, use_cache=False))) == 4
    with pytest.raises(ValueError, match="no room"):
        list(generate(model, list(range(block)), 5))
    with pytest.raises(ValueError, match="top_p"):
        list(generate(model, PROMPT, 5, top_p=0))


def test_train_mode_and_grad_mode_are_left_alone():
    model = lively_model(dropout=0.5).train()
    a = list(generate(model, PROMPT, 10, temperature=0))
    b = list(generate(model, PROMPT, 10, temperature=0))
    assert a == b  # dropout off while generating
    assert model.training  # and the training loop gets its model back in train mode
    for _ in generate(model, PROMPT, 3, temperature=0):
        assert torch.is_grad_enabled()  # no_grad is not held across yields


def test_output_layer_runs_on_the_sampled_position_only():
    model = lively_model()
    rows = []  # positions per call of the 50,304-wide output layer, the bulk of a decode step's work
    model.lm_head.register_forward_hook(lambda module, inputs, logits: rows.append(inputs[0].size(1)))
    for use_cache in (True, False):
        rows.clear()
        assert len(list(generate(model, PROMPT, 6, temperature=0, use_cache=use_cache))) == 6
        assert rows == [1] * 6, f"use_cache={use_cache}: prefill and every step need the last position only"


def test_greedy_equals_argmax_of_full_logits(model):
    # the tokens of a plain loop over the full (B, T, V) logits, as generation ran before last_only
    seq, expected = torch.tensor([PROMPT]), []
    with torch.no_grad():
        for _ in range(30):
            logits, _ = model(seq)
            expected.append(int(logits[0, -1].argmax()))
            seq = torch.cat([seq, torch.tensor([[expected[-1]]])], dim=1)
    assert list(generate(model, PROMPT, 30, temperature=0, use_cache=False)) == expected
    assert list(generate(model, PROMPT, 30, temperature=0)) == expected


def test_sampling_settings_refuse_nan():
    nan = float("nan")
    assert check_sampling_args(0.8, 50, 0.9, 1.1) == []
    assert any(p.startswith("temperature=nan") for p in check_sampling_args(nan, 50, 0.9, 1.1))
    assert any(p.startswith("repetition_penalty=nan") for p in check_sampling_args(0.8, 50, 0.9, nan))


# ---------------------------------------------------------------------------------------------- settings and edges

def reference_repetition_penalty(logits, previous_ids, penalty):
    """The CTRL rule written as a plain loop over each row's distinct previous tokens."""
    out = logits.clone()
    for row in range(logits.size(0)):
        for token in set(previous_ids[row].tolist()):
            value = logits[row, token].item()
            out[row, token] = value / penalty if value > 0 else value * penalty
    return out


@pytest.mark.parametrize("penalty", [0.5, 0.9, 1.3, 2.0])
def test_repetition_penalty_matches_a_plain_reference(penalty):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 300, generator=gen) * 4
    logits[0, 7] = 0.0  # a zero logit stays zero either way
    previous = torch.randint(0, 300, (3, 40), generator=gen)
    previous[0, 0] = 7
    expected = reference_repetition_penalty(logits, previous, penalty)
    # the same rule; a last-bit difference between Python's float and torch's fp32 division is allowed
    assert torch.allclose(apply_repetition_penalty(logits, previous, penalty), expected, rtol=1e-6, atol=0)
    seen = previous[1].unique()
    if penalty > 1:  # every seen token loses ground, whatever its sign
        assert (expected[1, seen] <= logits[1, seen]).all()
    else:  # below 1 the rule favours seen tokens
        assert (expected[1, seen] >= logits[1, seen]).all()


def test_greedy_ignores_top_k_and_top_p_but_not_the_penalty(model):
    greedy = list(generate(model, PROMPT, 30, temperature=0))
    for top_k, top_p in [(1, 1.0), (5, 0.01), (0, 0.5), (10 ** 9, 1.0)]:
        assert list(generate(model, PROMPT, 30, temperature=0, top_k=top_k, top_p=top_p)) == greedy
    # the penalty still applies at temperature 0: greedy over penalised logits, as a plain loop does it
    seq, expected = list(PROMPT), []
    with torch.no_grad():
        for _ in range(30):
            logits, _ = model(torch.tensor([seq]))
            penalised = reference_repetition_penalty(logits[:, -1], torch.tensor([seq]), 1.5)
            expected.append(int(penalised.argmax()))
            seq.append(expected[-1])
    penalised_run = list(generate(model, PROMPT, 30, temperature=0, top_k=3, top_p=0.2, repetition_penalty=1.5))
    assert penalised_run == expected and penalised_run != greedy


def test_top_k_beyond_the_vocabulary_and_top_p_one_change_nothing(model):
    kwargs = dict(temperature=1.0)
    plain = list(generate(model, PROMPT, 30, top_k=0, top_p=1.0, generator=make_generator(model, 3), **kwargs))
    huge_k = list(generate(model, PROMPT, 30, top_k=10 ** 6, top_p=1.0, generator=make_generator(model, 3), **kwargs))
    assert plain == huge_k and len(set(plain)) > 10
    # a tiny top_p keeps only the most likely token: sampling becomes greedy
    tiny_p = list(generate(model, PROMPT, 30, top_p=1e-6, generator=make_generator(model, 3), **kwargs))
    assert tiny_p == list(generate(model, PROMPT, 30, temperature=0))


@pytest.mark.slow
def test_samples_with_the_cache_equal_samples_without(model):
    kwargs = dict(temperature=1.0, top_k=200, top_p=0.95, repetition_penalty=1.2)
    cached = generate_samples(model, PROMPT, 3, 40, generator=make_generator(model, 9), **kwargs)
    uncached = generate_samples(model, PROMPT, 3, 40, generator=make_generator(model, 9), use_cache=False, **kwargs)
    assert cached == uncached
    assert len({tuple(s) for s in cached}) == 3 and all(len(s) == 40 for s in cached)


def test_max_new_tokens_beyond_the_context(model):
    block = model.config.block_size
    # prompt + answer fill the context exactly, with or without the cache, one sample or several
    assert len(list(generate(model, PROMPT, 10 * block, temperature=0))) == block - len(PROMPT)
    assert len(list(generate(model, PROMPT, 10 * block, temperature=0, use_cache=False))) == block - len(PROMPT)
    samples = generate_samples(model, PROMPT, 2, 10 * block, temperature=1.0, generator=make_generator(model, 1))
    assert [len(s) for s in samples] == [block - len(PROMPT)] * 2
    full = list(generate(model, PROMPT, 10 * block, temperature=0))
    assert full == list(generate(model, PROMPT, 10 * block, temperature=0, use_cache=False))


def padding_wins(model, n_vocab):
    """Make the ids from n_vocab up (the padding of the model's vocabulary) the model's favourites: any
    of them in an answer means generation used another bound than the model's own tokenizer's."""
    def hook(module, inputs, logits):
        logits = logits.clone()
        logits[..., n_vocab:] = 1e4
        return logits
    model.lm_head.register_forward_hook(hook)
    return model


def test_unused_vocabulary_slots_are_never_sampled():
    """Ids 50261..50303 pad the vocabulary to 50304: no text, no training. A model that prefers one
    (here forced by a hook) gets its best real token instead: an unused id would print nothing."""
    n_vocab = load_tokenizer("gpt2").n_vocab  # the model's tokenizer says where its padding starts
    model = lively_model()
    free = list(generate(model, PROMPT, 20, temperature=0, n_vocab=n_vocab))
    padding_wins(model, MIN_VOCAB_SIZE)
    assert list(generate(model, PROMPT, 20, temperature=0, n_vocab=n_vocab)) == free
    assert list(generate(model, PROMPT, 20, temperature=0, use_cache=False, n_vocab=n_vocab)) == free
    sampled = generate_samples(model, PROMPT, 4, 20, temperature=2.0, top_k=0, top_p=1.0,
                               generator=make_generator(model, 0), n_vocab=n_vocab)
    assert all(token < MIN_VOCAB_SIZE for s in sampled for token in s)


# ---------------------------------------------------------------------------------------------- two tokenizers

def engine_answer(engine, ids, n):
    """One greedy answer of n tokens from an Engine (serve.py's worker) -> its streamed text."""
    async def ask():
        job = engine.submit(Job(ids, max_tokens=n, stop_tokens=(), temperature=0))
        return "".join([event[2] async for event in job.events() if event[0] == "text"])
    return ask()


def save_run(folder, model, tok):
    save_checkpoint(str(folder), {"model": model.state_dict(), "model_config": model.config.to_dict(), "config": {},
                                  "kind": "base", "step": 0, "tokenizer": tok.to_string()})
    return str(folder)


def test_two_models_with_different_tokenizers_in_one_process(trained, tmp_path):
    """GPT-2's tokenizer (50,261 ids, model rows 50,304) and a trained one (512 ids, model rows 576)
    in one process, generating interleaved: each model only ever makes ids below its own tokenizer's
    n_vocab (its padding is forced to win, so a wrong bound shows at once), its answers are the ones
    it gives alone, and its text is its own tokenizer's decoding. Saved and loaded back with
    load_model, each comes with its own tokenizer."""
    gpt2, own = load_tokenizer("gpt2"), trained[1]
    assert own.n_vocab == 512 and own.hash != gpt2.hash
    models = {"gpt2": padding_wins(lively_model(), gpt2.n_vocab),
              "own": padding_wins(lively_model(vocab_size=576, seed=1), own.n_vocab)}
    toks = {"gpt2": gpt2, "own": own}
    prompts = {"gpt2": [gpt2.eot] + gpt2.encode("The river"), "own": [own.eot] + own.encode("The river")}

    def answer(name, model=None, tok=None, temperature=1.0):
        """name's answer (sampled: every id may come up) from its model and tokenizer, or the ones given."""
        model, tok = model or models[name], tok or toks[name]
        return generate(model, prompts[name], 24, temperature=temperature, top_k=0, top_p=1.0, n_vocab=tok.n_vocab,
                        generator=make_generator(model, 3))

    alone = {name: list(answer(name)) for name in models}
    turns = list(zip(answer("gpt2"), answer("own")))  # one token of each in turn
    side_by_side = {"gpt2": [a for a, _ in turns], "own": [b for _, b in turns]}
    assert side_by_side == alone and all(len(ids) == 24 for ids in alone.values())
    assert max(alone["own"]) < own.n_vocab and max(alone["gpt2"]) < gpt2.n_vocab
    assert max(alone["gpt2"]) >= own.n_vocab  # GPT-2's model is not held to the other's 512 ids

    # serve.py's way: one Engine per model, both answering at once, each decoding with its own tokenizer
    engines = {name: Engine(models[name], toks[name]) for name in models}
    try:
        greedy = {name: list(answer(name, temperature=0)) for name in models}

        async def both():
            return await asyncio.gather(*(engine_answer(engines[name], prompts[name], 24) for name in models))
        texts = dict(zip(models, asyncio.run(both())))
    finally:
        for engine in engines.values():
            engine.close()
    assert texts == {name: toks[name].decode(greedy[name]) for name in models}
    assert texts["own"] != gpt2.decode(greedy["own"])  # the same ids mean other text in GPT-2's tokenizer

    for name in models:
        model, tok, meta = load_model(save_run(tmp_path / name, models[name], toks[name]), verbose=False)
        assert tok.hash == toks[name].hash and meta["kind"] == "base"
        assert list(answer(name, padding_wins(model, tok.n_vocab), tok)) == alone[name]


def test_generation_holds_the_weights_in_the_compute_dtype(monkeypatch, tmp_path):
    """dtype=auto for sample.py and serve.py (inference=True): bf16 on a CPU with bf16 instructions,
    fp32 on other CPUs, for training (bf16 autocast of fp32 weights is slow on a CPU) and with
    --quantize=fp16 (whose matmuls compute in fp32 whatever they are given);
    load_model(dtype=) holds the weights in it, and generation runs on them."""
    from gptkit import system
    assert system.cpu_computes_bf16() in (True, False)  # this machine's CPU, asked for real
    monkeypatch.setattr(system, "cpu_computes_bf16", lambda: True)
    assert system.pick_dtype("auto", "cpu", inference=True)[0] == "bfloat16"
    assert system.pick_dtype("auto", "cpu")[0] == "float32"
    assert system.pick_dtype("float32", "cpu", inference=True)[0] == "float32"
    assert system.pick_dtype("auto", "cpu", inference=True, quantize="int8")[0] == "bfloat16"
    assert system.pick_dtype("auto", "cpu", inference=True, quantize="fp16") == (
        "float32", "--quantize=fp16 computes in fp32: bf16 activations would add rounding, not speed")
    assert system.pick_dtype("bfloat16", "cpu", inference=True, quantize="fp16")[0] == "bfloat16"  # as asked
    monkeypatch.setattr(system, "cpu_computes_bf16", lambda: False)
    assert system.pick_dtype("auto", "cpu", inference=True)[0] == "float32"
    weights = {dtype: system.Runtime("cpu", "cpu", dtype).weights_dtype for dtype in ("float32", "bfloat16", "float16")}
    assert weights == {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float32}  # fp16: autocast

    model = lively_model()
    save_checkpoint(str(tmp_path), {"model": model.state_dict(), "model_config": model.config.to_dict(),
                                    "config": {}, "kind": "base", "step": 0})
    loaded, tok, _ = load_model(str(tmp_path), dtype=torch.bfloat16, verbose=False)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert len(list(generate(loaded, [tok.eot], 5, temperature=0, n_vocab=tok.n_vocab))) == 5
