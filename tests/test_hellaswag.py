import json
import os
import random
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import eval_hellaswag
from conftest import shared_data
from gptkit import hellaswag
from gptkit.checkpoint import save_checkpoint
from gptkit.configurator import ConfigError, UserError, load_config
from gptkit.hf import export_hf
from gptkit.hellaswag import (HellaSwagFormatError, evaluate_hellaswag, load_items, pick_endings, render_item,
                              score_rows)
from gptkit.system import Runtime
from gptkit.tokenizer import EOT, load_tokenizer
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT2 = load_tokenizer("gpt2")  # the test models' tokenizer (their checkpoints carry none)
CPU = Runtime(device="cpu", device_type="cpu", dtype="float32")
WORDS = ("the a man woman dog cat walks runs into house garden river boat ball kitchen table slowly "
         "then picks up puts down looks at smiles talks to camera shows how paint wall").split()


def _random_text(rng, n_words):
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def _write_jsonl(path, items):
    with open(path, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
    return str(path)


def _word_token_ids(tokenizer):
    """Ids of tokens that are a space and 3+ ASCII letters: a run of them decodes to text that
    encodes back to exactly the same ids, so a generated ending survives the round trip."""
    ids = []
    for i in range(50257):
        b = tokenizer.token_bytes(i)
        if len(b) >= 4 and b[:1] == b" " and b[1:].isalpha() and b[1:].isascii():
            ids.append(i)
    return torch.tensor(ids)


@torch.no_grad()
def _greedy_ending(model, tokenizer, ctx, allowed, n_tokens):
    ids = [EOT] + tokenizer.encode(ctx)  # the same start the scorer uses
    allowed_mask = torch.full((model.config.vocab_size,), float("-inf"))
    allowed_mask[allowed] = 0.0
    generated = []
    for _ in range(n_tokens):
        logits, _ = model(torch.tensor([ids + generated]))
        generated.append(int((logits[0, -1] + allowed_mask).argmax()))
    text = tokenizer.decode(generated)
    assert tokenizer.encode(text) == generated, "test setup: generated ending does not re-encode to itself"
    return text[1:]  # the scorer puts the space back: " " + ending


def test_greedy_ending_wins(tmp_path, tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config, verbose=False)
    # Larger weights than GPT-2's init: at init a tiny model repeats one token whatever the context;
    # with these its greedy choices depend on the context and win by clear margins.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.1)
    tokenizer = GPT2
    allowed = _word_token_ids(tokenizer)
    rng = random.Random(0)
    items = []
    for i in range(8):
        ctx = _random_text(rng, 8).capitalize() + "."
        endings = [_random_text(rng, 5) + "." for _ in range(4)]  # distractors: random words
        label = i % 4
        endings[label] = _greedy_ending(model, tokenizer, ctx, allowed, 5)
        items.append({"ctx": ctx, "endings": endings, "label": label})
    model.train()  # evaluate_hellaswag must switch to eval mode and back
    results = evaluate_hellaswag(model, GPT2, _write_jsonl(tmp_path / "greedy.jsonl", items), CPU, batch_size=3)
    assert results == {"acc": 1.0, "acc_norm": 1.0, "acc_per_token": 1.0, "count": 8}
    assert model.training
    # Same items with the labels moved off the greedy ending: now every item is wrong.
    for item in items:
        item["label"] = (item["label"] + 1) % 4
    results = evaluate_hellaswag(model, GPT2, _write_jsonl(tmp_path / "wrong.jsonl", items), CPU, batch_size=8)
    assert results["acc"] == results["acc_norm"] == results["acc_per_token"] == 0.0


def test_pick_endings_acc_and_acc_norm_differ():
    # Ending 0: short and likely in total; ending 1: long, less likely in total, more likely per character.
    sum_logprobs = torch.tensor([[-10.0, -12.0, -30.0, -40.0]])
    num_tokens = torch.tensor([[2.0, 8.0, 6.0, 8.0]])
    num_chars = torch.tensor([[10.0, 40.0, 30.0, 40.0]])
    picks = pick_endings(sum_logprobs, num_tokens, num_chars)
    assert picks["acc"].tolist() == [0]        # -10 is the highest sum
    assert picks["acc_norm"].tolist() == [1]   # -12/40 = -0.3 beats -10/10 = -1.0
    assert picks["acc_per_token"].tolist() == [1]  # -1.5 per token beats -5.0


class UniformModel(nn.Module):
    """A stand-in for GPT whose every next-token distribution is uniform: an ending's summed
    log-prob is then -n_tokens * log(V), so only the ending's length decides."""

    def __init__(self, block_size=64, vocab_size=50304):
        super().__init__()
        self.config = GPTConfig(block_size=block_size, vocab_size=vocab_size)
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, idx, targets=None):
        return torch.zeros(*idx.shape, self.config.vocab_size) + self.dummy, None


def test_acc_and_acc_norm_differ_end_to_end(tmp_path):
    tokenizer = GPT2
    endings = ["go", "disproportionately international", "a b c", "x y z w"]
    n_tokens = [len(tokenizer.encode(" " + e)) for e in endings]
    chars_per_token = [len(e) / n for e, n in zip(endings, n_tokens)]
    # The test's premise: ending 0 has the fewest tokens, ending 1 the most characters per token.
    assert n_tokens[0] < min(n_tokens[1:]) and chars_per_token[1] == max(chars_per_token) > chars_per_token[0]
    # acc picks the fewest tokens (0); acc_norm the most characters per token (1); per token all
    # tie at -log(V) and argmax takes the first (0).
    items = [{"ctx": "She said", "endings": endings, "label": 1}, {"ctx": "He said", "endings": endings, "label": 0}]
    results = evaluate_hellaswag(UniformModel(), GPT2, _write_jsonl(tmp_path / "u.jsonl", items), CPU)
    assert results == {"acc": 0.5, "acc_norm": 0.5, "acc_per_token": 0.5, "count": 2}
    items[1]["label"] = 1
    results = evaluate_hellaswag(UniformModel(), GPT2, _write_jsonl(tmp_path / "u.jsonl", items), CPU)
    assert results["acc"] == 0.0 and results["acc_norm"] == 1.0


def test_score_rows_matches_one_row_at_a_time(tiny_config):
    torch.manual_seed(1)
    model = GPT(tiny_config, verbose=False).eval()
    tokenizer = GPT2
    item = {"ctx": "A man walks into the kitchen and", "endings": ["picks up a cup.", "paints the wall slowly.",
                                                               "runs.", "talks to the camera about boats."]}
    rows = render_item(item, tiny_config.block_size, tokenizer)
    batched, counts = score_rows(model, rows, CPU, tokenizer.eot)
    for r, (ids, n_scored) in enumerate(rows):
        # Reference: log-softmax over the full sequence, summed over the ending's positions.
        logits, _ = model(torch.tensor([ids[:-1]]))
        logprobs = torch.log_softmax(logits[0], dim=-1)
        expected = sum(logprobs[t - 1, ids[t]].item() for t in range(len(ids) - n_scored, len(ids)))
        assert batched[r].item() == pytest.approx(expected, abs=1e-4)
        assert counts[r].item() == len(tokenizer.encode(" " + item["endings"][r]))


def test_long_context_is_cut_from_the_left(tmp_path):
    tokenizer = GPT2
    ctx = " ".join(f"word{i}" for i in range(200))
    item = {"ctx": ctx, "endings": ["one.", "two three.", "four five six.", "seven."], "label": 0}
    rows = render_item(item, 16, tokenizer)
    for (ids, n_scored), ending in zip(rows, item["endings"]):
        assert len(ids) == 17  # block_size + 1: the model reads 16 and predicts 16
        ending_ids = tokenizer.encode(" " + ending)
        assert ids[-len(ending_ids):] == ending_ids and n_scored == len(ending_ids)
        assert ids[:-len(ending_ids)] == tokenizer.encode(ctx)[-(17 - len(ending_ids)):]  # context's last tokens
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16), verbose=False)
    results = evaluate_hellaswag(model, GPT2, _write_jsonl(tmp_path / "long.jsonl", [item]), CPU)
    assert results["count"] == 1


@pytest.mark.parametrize("line, problem", [
    ('{"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 4}', "label"),
    ('{"ctx": "A man", "endings": ["a", "b", "c"], "label": 0}', "4 texts"),
    ('{"endings": ["a", "b", "c", "d"], "label": 0}', "ctx"),
    ('{"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 0', "not valid JSON"),
    ('["A man", "a", "b", "c", "d"]', "JSON object"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, problem):
    good = json.dumps({"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": "2"})  # string label is fine
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n\n{good}\n{line}\n{good}\n", encoding="utf-8")
    with pytest.raises(HellaSwagFormatError, match=rf"bad\.jsonl, line 4: .*{re.escape(problem)}"):
        load_items(str(path))
    assert len(load_items(str(path), limit=2)) == 2  # a limit stops before the bad line
    assert load_items(str(path), limit=1)[0]["label"] == 2


def test_real_val_file_parses():
    items = load_items(shared_data("hellaswag", "hellaswag_val_derived.jsonl"))
    assert len(items) == 10042
    assert all(len(item["endings"]) == 4 and 0 <= item["label"] <= 3 for item in items)
    assert items[0]["ctx"] == "A man is sitting on a roof. he" and items[0]["label"] == 3


def test_download_failure_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTKIT_CACHE", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")
    monkeypatch.setattr(hellaswag.urllib.request, "urlopen", offline)
    with pytest.raises(UserError, match=r"could not download.*network is unreachable.*--data=PATH"):
        evaluate_hellaswag(UniformModel(), GPT2, "", CPU)
    assert os.listdir(tmp_path / "hellaswag") == []  # no half-written file left behind
    # Once the file is in the cache it is used without any download.
    cached = tmp_path / "hellaswag" / "hellaswag_val.jsonl"
    _write_jsonl(cached, [{"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 0}])
    assert evaluate_hellaswag(UniformModel(), GPT2, None, CPU)["count"] == 1


def test_eval_config_checks_paths(tmp_path):
    with pytest.raises(ConfigError, match="ckpt='nowhere' does not exist"):
        load_config(eval_hellaswag.EvalConfig, ["--ckpt=nowhere"])
    with pytest.raises(ConfigError, match="batch_size=0"):
        load_config(eval_hellaswag.EvalConfig, [f"--ckpt={tmp_path}", "--batch_size=0"])


def _run_eval(args, nproc):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc_per_node={nproc}"]
    result = subprocess.run(launcher + [os.path.join(ROOT, "eval_hellaswag.py")] + args, cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    figures = {name: float(re.search(rf"^  {name} +([0-9.]+)", out, re.M).group(1))
               for name in ("acc", "acc_norm", "acc_per_token")}
    figures["count"] = int(re.search(r"HellaSwag: (\d+) items", out).group(1))
    return figures


def _run_and_items(tmp_path, config, seed, n_items):
    """A random model saved as a run in tmp_path/run, and a JSONL of n_items random items -> (model, path)."""
    torch.manual_seed(2)
    model = GPT(config, verbose=False)
    save_checkpoint(str(tmp_path / "run"), {"model": model.state_dict(), "model_config": model.config.to_dict(),
                                             "config": {}, "kind": "base", "step": 5})
    rng = random.Random(seed)
    items = [{"ctx": _random_text(rng, 10), "endings": [_random_text(rng, rng.randint(2, 9)) for _ in range(4)],
              "label": rng.randint(0, 3)} for _ in range(n_items)]
    return model, _write_jsonl(tmp_path / "items.jsonl", items)


@pytest.mark.slow
def test_two_processes_give_the_same_counts_as_one(tmp_path, tiny_config):
    model, data = _run_and_items(tmp_path, tiny_config, seed=3, n_items=23)  # odd: the ranks get 12 and 11 items
    args = [f"--ckpt={tmp_path / 'run'}", f"--data={data}", "--device=cpu", "--batch_size=5", "--limit=21"]
    one = _run_eval(args, 1)
    two = _run_eval(args, 2)
    assert one["count"] == 21
    assert two == one
    # The in-process figures agree with the script's.
    direct = evaluate_hellaswag(model, GPT2, data, CPU, limit=21)
    assert {k: round(v, 4) for k, v in direct.items()} == one
    # A Hugging Face folder of the same model (as --ckpt=gpt2 would download) scores the same.
    export_hf(model, str(tmp_path / "hf"), GPT2)
    assert _run_eval([f"--ckpt={tmp_path / 'hf'}"] + args[1:], 1) == one


@pytest.mark.slow
def test_compiled_evaluation_scores_the_same(tmp_path, tiny_config, monkeypatch, capsys):
    """eval_hellaswag.py --compile=True on CPU (inductor; about 15 s to compile here): the model is
    compiled and scores what the eager model scores."""
    model, data = _run_and_items(tmp_path, tiny_config, seed=4, n_items=11)  # batches of 5, 5, 1: three shapes
    compiled = []
    real_compile = torch.compile

    def spy_compile(module, **kwargs):
        compiled.append(kwargs)
        return real_compile(module, **kwargs)

    monkeypatch.setattr(torch, "compile", spy_compile)
    monkeypatch.setattr(sys, "argv", ["eval_hellaswag.py", f"--ckpt={tmp_path / 'run'}", f"--data={data}",
                                      "--device=cpu", "--batch_size=5", "--compile=True"])
    try:
        eval_hellaswag.main()
    finally:
        torch._dynamo.reset()  # leave no compiled code behind for other tests
    assert compiled == [{"dynamic": True}]
    out = capsys.readouterr().out
    eager = evaluate_hellaswag(model, GPT2, data, CPU)
    assert f"HellaSwag: {eager['count']} items" in out
    for name in ("acc", "acc_norm", "acc_per_token"):
        assert re.search(rf"^  {name} +{eager[name]:.4f}", out, re.M), (name, eager, out)


# ------------------------------------------------------------------------------------------------
# evaluate_hellaswag against a plain scorer written from the documented rules, on real items

REAL_ITEMS = 60
REAL_BLOCK = 96  # shorter than a quarter of the rows (up to 150 tokens): left truncation is scored too


@torch.no_grad()
def _reference_scores(model, item, tokenizer):
    """One row at a time, no batching or padding. The ending's tokens are split off as
    lm-evaluation-harness does it: encode(ctx + " " + ending), minus the tokens of encode(ctx).
    -> per ending (row ids, summed log-prob of the ending's tokens, their count)."""
    ctx_ids = tokenizer.encode(item["ctx"])
    scored = []
    for ending in item["endings"]:
        whole = tokenizer.encode(item["ctx"] + " " + ending)
        assert whole[:len(ctx_ids)] == ctx_ids, "the context's tokens change when an ending follows"
        n = len(whole) - len(ctx_ids)
        ids = ([EOT] + whole)[-(REAL_BLOCK + 1):]  # the model reads ids[:-1], predicts ids[1:]
        logits, _ = model(torch.tensor([ids[:-1]]))
        logprobs = torch.log_softmax(logits[0].double(), dim=-1)
        total = sum(logprobs[t - 1, ids[t]].item() for t in range(len(ids) - n, len(ids)))
        scored.append((tuple(ids), total, n))
    return scored


def _reference_pick(item, scored, rule):
    """Index of the chosen ending; also the gap to the runner-up (a near-tie may round either way)."""
    if rule == "acc":
        values = [total for _, total, _ in scored]
    elif rule == "acc_norm":  # lm-evaluation-harness: log-prob / len(ending) in characters
        values = [total / len(ending) for (_, total, _), ending in zip(scored, item["endings"])]
    else:  # acc_per_token, build-nanogpt: mean log-prob of the ending's tokens
        values = [total / n for _, total, n in scored]
    best = max(range(NUM), key=lambda i: values[i])
    runner_up = max(v for i, v in enumerate(values) if i != best)
    return best, values[best] - runner_up


NUM = hellaswag.NUM_ENDINGS
RULES = ("acc", "acc_norm", "acc_per_token")


@pytest.fixture(scope="module")
def real_items_and_reference():
    items = load_items(shared_data("hellaswag", "hellaswag_val_derived.jsonl"), limit=REAL_ITEMS)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=REAL_BLOCK), verbose=False)
    with torch.no_grad():  # larger weights than GPT-2's init: scores that depend on the text, clear winners
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.1)
    model.eval()
    tokenizer = GPT2
    reference = []
    for item in items:
        scored = _reference_scores(model, item, tokenizer)
        picks = {rule: _reference_pick(item, scored, rule) for rule in RULES}
        if min(gap for _, gap in picks.values()) > 1e-3:  # leave out near-ties (float32 vs float64)
            reference.append((item, scored, {rule: pick for rule, (pick, _) in picks.items()}))
    assert len(reference) > 0.9 * len(items)
    return model, reference


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_scores_match_a_plain_reference_on_real_items(real_items_and_reference, batch_size, tmp_path, monkeypatch):
    model, reference = real_items_and_reference
    rows_seen = {}
    real_score_rows = hellaswag.score_rows

    def spy(model, rows, rt, pad_id):
        sums, counts = real_score_rows(model, rows, rt, pad_id)
        for (ids, _), total, count in zip(rows, sums.tolist(), counts.tolist()):
            rows_seen[tuple(ids)] = (total, count)
        return sums, counts

    monkeypatch.setattr(hellaswag, "score_rows", spy)
    # Label each item with the reference's acc_norm choice: acc_norm must then be 1.0 item by item,
    # and acc and acc_per_token agree with it exactly where the reference's rules do.
    items = [dict(item, label=picks["acc_norm"]) for item, _, picks in reference]
    results = evaluate_hellaswag(model, GPT2, _write_jsonl(tmp_path / "real.jsonl", items), CPU,
                                 batch_size=batch_size)
    expected = {rule: sum(picks[rule] == picks["acc_norm"] for _, _, picks in reference) / len(reference)
                for rule in RULES}
    assert results == dict(expected, count=len(reference))
    assert results["acc_norm"] == 1.0 and results["acc"] < 1.0 and results["acc_per_token"] < 1.0
    # Row by row: the same tokens (the EOT, the context, the split before the ending), the same
    # scored count and summed log-prob, whatever the batch and its padding.
    for item, scored, _ in reference:
        for ids, total, n in scored:
            assert ids in rows_seen, (item["ctx"], "row tokenized differently")
            seen_total, seen_n = rows_seen[ids]
            assert seen_n == n
            assert seen_total == pytest.approx(total, abs=2e-4)


@pytest.mark.slow
def test_rows_split_context_and_ending_as_lm_evaluation_harness():
    """Every item of the real val file: the scored tokens are the ending's tokens of the whole text
    encoded at once (how lm-evaluation-harness splits a context from its continuation), so encoding
    the context and " " + ending apart changes nothing at the boundary."""
    tokenizer = GPT2
    for item in load_items(shared_data("hellaswag", "hellaswag_val_derived.jsonl")):
        n_ctx = len(tokenizer.encode(item["ctx"]))
        for (ids, n_scored), ending in zip(render_item(item, 1024, tokenizer), item["endings"]):
            whole = tokenizer.encode(item["ctx"] + " " + ending)
            assert ids == [EOT] + whole and n_scored == len(whole) - n_ctx, (item["ctx"], ending)
