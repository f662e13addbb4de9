"""
Sampling from a GPT: KV-cache prefill and decode, temperature / top-k / top-p / repetition
penalty, stop tokens, the context limit. Used by sample.py, serve.py (gptkit/engine.py) and the
training loop's samples.

    from gptkit.generate import generate, make_generator
    model, tok, meta = load_model("out/dolly")             # gptkit/loading.py: a model and its tokenizer
    gen = make_generator(model, seed=1337)                  # same seed, same tokens
    for token in generate(model, ids, 100, temperature=0.8, top_k=50, stop_tokens=[tok.end, tok.eot], generator=gen,
                          n_vocab=tok.n_vocab):             # the padding ids above the tokenizer's are never made
        ...                                                  # ints, one at a time, as they are made

The context limit: prompt + answer never pass model.config.block_size. Generation stops when the
sequence fills the context, with or without the KV cache. (Sliding the window instead would be
possible without a cache, but then the two paths would disagree on long answers, and a chat that
runs out of room is better served by dropping old turns, which sample.py does.)

Stop tokens end generation and are not yielded: the caller gets the answer only. The unused
vocabulary slots (ids from the tokenizer's n_vocab up: GPT-2's 50261..50303) are never sampled:
they have no text and were never trained, so a sampled one would print nothing and steer the rest
of the answer. Only the caller knows the model's tokenizer, so it passes n_vocab=tokenizer.n_vocab;
without it (n_vocab=None) every row of the model's output may be sampled.

Each forward call runs under torch.no_grad() and, on CUDA, bf16 autocast (fp16 where the GPU has
no bf16). The grad mode and autocast are entered around each model call, not across a `yield`, so
the caller's code between tokens runs in whatever mode the caller chose.
"""

import contextlib

import torch
import torch.nn.functional as F


def make_generator(model_or_device, seed):
    """A torch.Generator on the model's device, seeded: sampling with it is reproducible."""
    device = model_or_device
    if isinstance(model_or_device, torch.nn.Module):
        device = next(model_or_device.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def default_autocast(device):
    """bf16 autocast on CUDA (fp16 on GPUs without bf16); full precision elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return lambda: torch.autocast(device_type="cuda", dtype=dtype)
    return contextlib.nullcontext


# ----------------------------------------------------------------------------------------------
# Logit filters. Each takes logits (B, V) in float32 and returns new logits (B, V); a token that
# may not be sampled gets -inf.

def apply_repetition_penalty(logits, previous_ids, penalty, exempt=()):
    """Make tokens already in previous_ids (B, T) less likely (CTRL, Keskar et al. 2019): a positive
    logit is divided by penalty, a negative one multiplied, so the token always loses ground.
    Tokens in `exempt` (the stop tokens) are left alone: in a chat history <|end|> closes every
    turn, and penalising it would keep the model from ever ending its answer."""
    if penalty == 1.0:
        return logits
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen.scatter_(1, previous_ids, True)  # (B, V): token appeared at least once; counts do not matter
    if exempt:
        seen[:, list(exempt)] = False
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits, k):
    """Keep exactly the k largest logits of each row (k <= 0 or k >= V: keep all)."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    # scatter the top-k indices rather than compare with the k-th value: ties cannot let in more than k
    _, idx = torch.topk(logits, k, dim=-1)
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, idx, True)
    return logits.masked_fill(~keep, float("-inf"))


def top_p_filter(logits, p):
    """Nucleus sampling (Holtzman et al. 2019): keep the smallest set of most likely tokens whose
    probabilities add up to at least p; the most likely token is always kept (p >= 1: keep all)."""
    if p >= 1.0:
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
    sorted_probs = F.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # probability of the tokens ranked above
    keep_sorted = mass_before < p  # the first token has 0 before it, so it always stays
    keep = torch.zeros_like(keep_sorted).scatter_(1, sorted_idx, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


def candidate_probs(logits, temperature, top_k=0, top_p=1.0):
    """logits (B, V) in float32, temperature > 0 -> (probs (B, n), ids (B, n) or None): the distribution
    to sample from over each row's n candidates. With top_k, the candidates are the k most likely
    tokens, most likely first (ids: their token ids), and top-p ranks those only; a draw from 50
    candidates instead of 50,304 is what makes sampling cheap beside a decode step. Without top_k,
    every token is a candidate (ids None: a candidate's index is its token id)."""
    logits = logits / temperature
    if 0 < top_k < logits.size(-1):
        values, ids = torch.topk(logits, top_k, dim=-1)  # (B, k): the same k that top_k_filter keeps
        return F.softmax(top_p_filter(values, top_p), dim=-1), ids
    return F.softmax(top_p_filter(logits, top_p), dim=-1), None


def draw(probs, ids, generator=None):
    """One token per row from candidate_probs' (probs, ids) -> token ids (B,)."""
    choice = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1): a candidate's index
    return (choice if ids is None else ids.gather(1, choice)).squeeze(1)


def sample_next(logits, previous_ids, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                exempt=(), generator=None):
    """logits (B, V) of the last position -> next token ids (B,). temperature 0 is greedy."""
    logits = logits.float()  # sampling maths in fp32 even when the model ran in bf16
    logits = apply_repetition_penalty(logits, previous_ids, repetition_penalty, exempt)
    if temperature == 0:
        return torch.argmax(logits, dim=-1)  # greedy: top-k / top-p cannot change the argmax
    return draw(*candidate_probs(logits, temperature, top_k, top_p), generator=generator)


def kv_cache_dtype(device, autocast):
    """The dtype to keep keys and values in: the compute dtype (bf16 under autocast: half the memory,
    no casts), or None for the weights' own."""
    with autocast():
        return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def check_sampling_args(temperature, top_k, top_p, repetition_penalty):
    """Problems with the sampling settings, as messages that say what to use (empty if fine)."""
    problems = []
    if not temperature >= 0:  # written so that nan fails too
        problems.append(f"temperature={temperature}: use 0 (greedy) or a positive number such as 0.8")
    if not top_k >= 0:
        problems.append(f"top_k={top_k}: use 0 (off) or a positive number such as 50")
    if not 0 < top_p <= 1:
        problems.append(f"top_p={top_p}: use a number in (0, 1], 1 is off")
    if not repetition_penalty > 0:
        problems.append(f"repetition_penalty={repetition_penalty}: use 1.0 (off) or a bit more, such as 1.1")
    return problems


# ----------------------------------------------------------------------------------------------
# Decoding

def generate_batch(model, ids, num_samples, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
                   repetition_penalty=1.0, stop_tokens=(), generator=None, use_cache=True, autocast=None,
                   n_vocab=None):
    """num_samples independent continuations of one prompt `ids` (list of ints), run as one batch.
    Yields a tensor (num_samples,) of new token ids per step, and a bool tensor (num_samples,) that
    is True where that row had already finished before this step (ignore those ids). Ends when every
    row has produced a stop token, max_new_tokens were made, or the context is full.
    n_vocab: the model's tokenizer's n_vocab; ids from it up (padding) are never sampled. None: all ids."""
    problems = check_sampling_args(temperature, top_k, top_p, repetition_penalty)
    if problems:
        raise ValueError("; ".join(problems))
    block_size = model.config.block_size
    if len(ids) == 0:
        raise ValueError("empty prompt: give at least one token (for example the tokenizer's <|endoftext|>, "
                         "tokenizer.eot)")
    if len(ids) >= block_size:
        raise ValueError(f"the prompt has {len(ids)} tokens, which leaves no room in the model's context of "
                         f"{block_size}: shorten it (keep its last {block_size - 1} tokens at most)")
    steps = min(max_new_tokens, block_size - len(ids))  # prompt + answer stay within the context
    if steps <= 0:
        return
    device = next(model.parameters()).device
    autocast = autocast or default_autocast(device)
    stop = torch.tensor(sorted(set(int(t) for t in stop_tokens)), dtype=torch.long, device=device)
    seq = torch.tensor(ids, dtype=torch.long, device=device).unsqueeze(0).repeat(num_samples, 1)  # (B, T)
    finished = torch.zeros(num_samples, dtype=torch.bool, device=device)
    exempt = stop.tolist()

    cache = None
    if use_cache:
        cache = model.new_kv_cache(num_samples, max_len=len(ids) + steps, dtype=kv_cache_dtype(device, autocast))

    def last_logits(idx):
        # eval mode for the call (no dropout), then back: the training loop samples mid-training
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), autocast():
                # last_only: the output layer runs on the sampled position only, not on all T
                logits, _ = model(idx, kv_cache=cache, last_only=True)  # (B, 1, V)
        finally:
            model.train(was_training)
        logits = logits[:, -1, :]  # (B, V)
        if n_vocab is not None:
            logits[:, n_vocab:] = float("-inf")  # the padding slots: no text, never a target
        return logits

    logits = last_logits(seq)  # prefill: the whole prompt in one call
    for step in range(steps):
        next_ids = sample_next(logits, seq, temperature, top_k, top_p, repetition_penalty,
                               exempt=exempt, generator=generator)  # (B,)
        was_finished = finished.clone()
        finished |= torch.isin(next_ids, stop)
        yield next_ids, was_finished
        if bool(finished.all()) or step == steps - 1:
            return  # the last token needs no forward pass
        seq = torch.cat([seq, next_ids.unsqueeze(1)], dim=1)
        logits = last_logits(next_ids.unsqueeze(1) if cache is not None else seq)


def generate(model, ids, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
             stop_tokens=(), generator=None, use_cache=True, autocast=None, n_vocab=None):
    """Continue one prompt `ids` (list of ints); yields the new token ids (ints) one at a time. A stop
    token ends generation and is not yielded. autocast: a context-manager factory such as
    Runtime.autocast; by default bf16 on CUDA, full precision elsewhere. n_vocab: the model's
    tokenizer's (tokenizer.n_vocab), so that no padding id is sampled; None: every id the model has."""
    for next_ids, _ in generate_batch(model, ids, 1, max_new_tokens, temperature, top_k, top_p,
                                      repetition_penalty, stop_tokens, generator, use_cache, autocast, n_vocab):
        token = int(next_ids[0])
        if token in stop_tokens:
            return
        yield token


def generate_samples(model, ids, num_samples, max_new_tokens, stop_tokens=(), **kwargs):
    """num_samples independent answers to one prompt, batched -> list of lists of ints, each cut
    before its first stop token. kwargs: generate_batch's (pass n_vocab=tokenizer.n_vocab)."""
    samples = [[] for _ in range(num_samples)]
    done = [False] * num_samples
    for next_ids, _ in generate_batch(model, ids, num_samples, max_new_tokens, stop_tokens=stop_tokens, **kwargs):
        for row, token in enumerate(next_ids.tolist()):
            if done[row]:
                continue
            if token in stop_tokens:
                done[row] = True
            else:
                samples[row].append(token)
    return samples
