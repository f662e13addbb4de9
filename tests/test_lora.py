"""LoRA (gptkit/lora.py): peft as the oracle for the adapted logits and the exported adapter folder,
the trainable parameters and what the optimizer holds, adapters off = the base (DPO's reference),
the checkpoint (adapters only, naming the base), exact resume, loading without flags, and quality:
LoRA against full finetuning, and the DPO preference rule learned with LoRA."""

import copy
import json
import os
import random
import re
import subprocess
import sys
import time

import numpy as np
import openai
import pytest
import torch

import eval as eval_script
import eval_hellaswag
from conftest import ROOT, shared_data
from test_generate import one_thread  # noqa: F401 (autouse: tiny models train and decode on one thread; two
                                      # threads under a loaded 2-core machine took the 5-minute limit once)
from gptkit.chat import chat_prompt_ids, resolve_system, stop_tokens_of
from gptkit.checkpoint import CheckpointError, save_checkpoint
from gptkit.configurator import ConfigError, load_config
from gptkit.generate import generate
from gptkit.harness import run_harness
from gptkit.hellaswag import evaluate_hellaswag, pick_endings, render_item, score_rows
from gptkit.hf import HFError, export_hf, export_peft_adapter
from gptkit.loading import load_model
from gptkit.losses import LM_LOSS
from gptkit.lora import (LoRASettings, adapters_disabled, apply_lora, base_fingerprint, count_parameters,
                         lora_modules, merge_adapters, trainable_state_dict)
from gptkit.optim import configure_optimizers, train_step
from gptkit.preference import load_or_compute_reference, reference_logps
from gptkit.sft import val_questions
from gptkit.system import setup_runtime
from gptkit.tokenizer import load_tokenizer
from gptkit.train_config import DPOConfig, FinetuneConfig
from model import GPT, GPTConfig
from prepare_instruct import InstructConfig, prepare
from test_dpo import rule_data, rule_following, run_dpo  # noqa: F401 (rule_data: a fixture used here)
from test_eval import data_dir  # noqa: F401 (a fixture used here: ARC-Easy items in the local layout)
from test_finetune import by_step, finetuned, run_finetune  # noqa: F401 (finetuned: a fixture used here)
from test_generate import lively_model
from test_hellaswag import CPU, _random_text, _write_jsonl
from test_serve import free_port, health
from test_train import losses, read_log


def tiny_gpt(seed=0, bias=False, vocab_size=50304):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=vocab_size, bias=bias),
               verbose=False)


def adapted(model, seed=1, **settings):
    """model with adapters whose B is random (B = 0 would make every comparison with the base trivial)."""
    apply_lora(model, LoRASettings(**{"rank": 4, "alpha": 8.0, **settings}))
    torch.manual_seed(seed)
    for module in lora_modules(model):
        torch.nn.init.normal_(module.lora_B.weight, std=0.1)
    return model.eval()


def logits(model, idx):
    with torch.no_grad():
        return model(idx)[0]


# ------------------------------------------------------------------------------------------------
# The module: parameters, the optimizer, adapters off, merging


@pytest.mark.parametrize("targets, train_norms", [(["attn", "mlp"], False), (["attn"], False), (["mlp"], True)])
def test_only_the_adapters_train_and_only_they_reach_the_optimizer(targets, train_norms):
    model = tiny_gpt()
    C, L, r = 64, 2, 4
    apply_lora(model, LoRASettings(rank=r, targets=targets, train_norms=train_norms))
    per_layer = {"attn": r * (C + 3 * C) + r * (C + C), "mlp": r * (C + 4 * C) + r * (4 * C + C)}
    expected = L * sum(per_layer[t] for t in targets) + ((2 * L + 1) * C if train_norms else 0)  # LN gains (no biases)
    trainable, total = count_parameters(model)
    assert trainable == expected and total == tiny_gpt().num_params() + L * sum(per_layer[t] for t in targets)
    cfg = load_config(FinetuneConfig, ["--init_from=x", "--weight_decay=0.1"])
    in_optimizer = [p for opt in configure_optimizers(model, cfg, "cpu") for g in opt.param_groups for p in g["params"]]
    assert sum(p.numel() for p in in_optimizer) == expected
    assert {id(p) for p in in_optimizer} == {id(p) for p in model.parameters() if p.requires_grad}
    assert set(trainable_state_dict(model)) == {n for n, p in model.named_parameters() if p.requires_grad}


def test_starts_as_the_base_and_adapters_off_is_the_base_after_training():
    base, model = tiny_gpt(), tiny_gpt()
    apply_lora(model, LoRASettings(rank=4, alpha=8.0, dropout=0.1))
    idx = torch.randint(0, 50257, (2, 32))
    assert torch.equal(logits(model.eval(), idx), logits(base.eval(), idx))  # B = 0: the base exactly
    for module in lora_modules(model):
        torch.nn.init.normal_(module.lora_B.weight, std=0.1)  # as after training
    assert (logits(model, idx) - logits(base, idx)).abs().max() > 1e-2
    with adapters_disabled(model):
        assert torch.equal(logits(model, idx), logits(base, idx))
    assert (logits(model, idx) - logits(base, idx)).abs().max() > 1e-2  # back on after the block


def test_merged_model_computes_the_adapted_one_and_is_plain():
    model = adapted(tiny_gpt(bias=True))
    idx = torch.randint(0, 50257, (2, 32))
    before = logits(model, idx)
    merged = merge_adapters(copy.deepcopy(model))
    assert not lora_modules(merged) and set(merged.state_dict()) == set(tiny_gpt(bias=True).state_dict())
    assert (logits(merged, idx) - before).abs().max() < 1e-4


def test_bf16_base_holds_the_block_matrices_in_bf16_and_trains_in_autocast():
    model = tiny_gpt()
    apply_lora(model, LoRASettings(rank=4, base_dtype="bfloat16"))
    assert {p.dtype for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2
            and "lora_" not in n} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert model.transformer.wte.weight.dtype == torch.float32  # the residual stream stays fp32
    x = torch.randint(0, 50257, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(x, x)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_config_checks():
    def problems(*args):
        with pytest.raises(ConfigError) as e:
            load_config(FinetuneConfig, ["--init_from=x", *args])
        return str(e.value)

    assert "lora_rank=-1" in problems("--lora_rank=-1")
    assert "lora_targets='attn,emb'" in problems("--lora_rank=4", "--lora_targets=attn,emb")
    assert "lora_alpha=0" in problems("--lora_rank=4", "--lora_alpha=0")
    assert "optimizer=muon with LoRA" in problems("--lora_rank=4", "--optimizer=muon")
    assert "needs mixed precision" in problems("--lora_rank=4", "--lora_base_dtype=bfloat16", "--dtype=float32")
    assert load_config(DPOConfig, ["--lora_rank=4"]).lora_dropout == 0.0  # DPO: no dropout against the reference


# ------------------------------------------------------------------------------------------------
# peft, the oracle


@pytest.mark.slow
@pytest.mark.parametrize("targets", [["attn", "mlp"], ["attn"], ["mlp"]])
def test_peft_loads_the_exported_adapter_onto_the_exported_base_with_our_logits(tmp_path, targets):
    import peft  # the oracle: a test dependency (requirements-dev.txt), not gptkit's
    import transformers  # with it
    tok = load_tokenizer("gpt2")
    model = tiny_gpt(bias=True)
    export_hf(model, str(tmp_path / "base"), tok)
    adapted(model, targets=targets)
    with pytest.raises(HFError, match="LoRA adapters"):
        export_hf(model, str(tmp_path / "x"), tok)  # an unmerged model is not a plain GPT-2
    export_peft_adapter(model, str(tmp_path / "adapter"), tok)
    export_hf(merge_adapters(copy.deepcopy(model)), str(tmp_path / "merged"), tok)
    idx = torch.randint(0, 50257, (2, 48))
    ours = logits(model, idx)
    hf_base = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "base"))
    with_adapter = peft.PeftModel.from_pretrained(hf_base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = with_adapter(idx).logits
        merged = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "merged")).eval()(idx).logits
    assert (ours - theirs).abs().max() < 1e-4
    assert (merged - theirs).abs().max() < 1e-4
    # peft's own count of what trains with these settings is ours
    config = peft.LoraConfig(**{k: v for k, v in json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
                                .items() if k not in ("peft_type", "base_model_name_or_path", "inference_mode")})
    fresh = peft.get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "base")), config)
    assert fresh.get_nb_trainable_parameters()[0] == count_parameters(model)[0]


# ------------------------------------------------------------------------------------------------
# DPO: the reference is the base with the adapters off


def test_dpo_reference_is_the_base_with_adapters_off(rule_data, tmp_path):
    rt = setup_runtime("cpu", "float32", 0, verbose=False)
    data = str(rule_data / "data")
    base = load_model(str(rule_data / "start"), verbose=False)[0]
    model = adapted(copy.deepcopy(base))
    cfg = load_config(DPOConfig, [f"--data_dir={data}", f"--out_dir={tmp_path}", "--micro_batch_size=4",
                                  "--lora_rank=4"])
    reference = load_or_compute_reference(model, cfg, rt, resuming=False)
    expected = reference_logps(base, data, "train", 4, rt)
    assert np.array_equal(reference["train"], expected)
    assert not np.allclose(reference_logps(model, data, "train", 4, rt), expected, atol=1e-2)  # adapters on differ


# ------------------------------------------------------------------------------------------------
# Quality: LoRA against full finetuning on the same data and steps (in process, a small vocabulary)


def byte_batches(text, n, seed, T=32, B=8):
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - T - 1, (n, B), generator=g)
    return [(torch.stack([data[s:s + T] for s in row]), torch.stack([data[s + 1:s + T + 1] for s in row]))
            for row in starts]


def train_for(model, batches, **overrides):
    cfg = load_config(FinetuneConfig, ["--init_from=x", "--grad_clip=1.0", *[f"--{k}={v}" for k, v in overrides.items()]])
    rt = setup_runtime("cpu", "float32", 0, verbose=False)
    optimizers = configure_optimizers(model, cfg, "cpu")
    model.train()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for batch in batches:
        train_step(model, optimizers, [batch], cfg, rt, scaler, loss_fn=LM_LOSS)


def val_loss(model, batches):
    model.eval()
    with torch.no_grad():
        return sum(model(x, y)[1].item() for x, y in batches) / len(batches)


@pytest.mark.slow
def test_lora_reaches_full_finetunings_val_loss_within_5_percent():
    """Pretrain a byte-level model on Shakespeare, finetune it on Alice in Wonderland: full (lr 3e-3)
    and LoRA rank 16 on attn+mlp (lr 5e-3), the same 150 batches of 8 x 32 bytes; val loss on the
    book's held-out end. Measured on a 2-core AMD EPYC (AVX-512): start 2.649, full 2.334, LoRA 2.389 (+2.3%). At lr
    1e-2 LoRA's result moves with the CPU's arithmetic (+4.1% on one machine, +5.3% on another, and
    2e-2 is worse still); 5e-3 trains smoothly, so the margin to the 5% holds from machine to machine."""
    pretrain = open(shared_data("pretrain", "tinyshakespeare", "input.txt"), encoding="utf-8").read()[:200_000]
    finetune = open(shared_data("pretrain", "gutenberg", "clocasto-HaikuGenerator", "pg11.txt"),
                    encoding="utf-8").read()[:150_000]
    cut = int(0.8 * len(finetune))
    torch.manual_seed(0)
    base = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=256), verbose=False)
    train_for(base, byte_batches(pretrain, 400, seed=0), learning_rate=3e-3, weight_decay=0.0)
    train, val = byte_batches(finetune[:cut], 150, seed=1), byte_batches(finetune[cut:], 20, seed=2)
    start = val_loss(base, val)
    full = copy.deepcopy(base)
    train_for(full, train, learning_rate=3e-3)
    lora = apply_lora(copy.deepcopy(base), LoRASettings(rank=16, alpha=32.0, dropout=0.0))
    train_for(lora, train, learning_rate=5e-3)
    full_loss, lora_loss = val_loss(full, val), val_loss(lora, val)
    print(f"val loss: start {start:.4f}, full finetuning {full_loss:.4f}, LoRA {lora_loss:.4f}")
    assert full_loss < 0.92 * start  # finetuning did something, so the comparison means something
    assert lora_loss < 1.05 * full_loss, (start, full_loss, lora_loss)


# ------------------------------------------------------------------------------------------------
# End to end: finetune.py and dpo.py with --lora_rank, resume, loading and export without flags

LORA = ["--lora_rank=4", "--lora_alpha=8", "--lora_dropout=0.1"]


@pytest.mark.slow
def test_lora_finetune_resumes_exactly_and_loads_and_exports_without_flags(finetuned):
    tmp_path, common, _ = finetuned
    single, _ = run_finetune([sys.executable], common + LORA, tmp_path / "lora")
    ckpt = torch.load(tmp_path / "lora" / "ckpt.pt", weights_only=True)
    assert ckpt["lora"]["base"] == str(tmp_path / "base" / "ckpt.pt") and ckpt["lora"]["rank"] == 4
    assert all(".lora_" in k for k in ckpt["model"])  # adapters only: the base is named, not copied
    base = load_model(str(tmp_path / "base"), verbose=False)[0]
    assert ckpt["lora"]["base_fingerprint"] == base_fingerprint(base)
    # resume: the interrupted run ends with the uninterrupted one's figures, bitwise (LoRA dropout included)
    out = tmp_path / "lora_resumed"
    run_finetune([sys.executable], common + LORA + ["--stop_step=1"], out)
    resumed, _ = run_finetune([sys.executable], common + ["--init_from=resume"], out)
    for key in ("loss", "grad_norm", "lr", "val_loss"):
        assert by_step(resumed, key) == by_step(single, key), key
    # load_model: a plain GPT with the adapters merged, and the run's val loss
    model, tok, meta = load_model(str(tmp_path / "lora"), verbose=False)
    assert meta["kind"] == "chat" and not lora_modules(model)
    unmerged = load_model(str(tmp_path / "lora"), verbose=False, merge_lora=False)[0]
    idx = torch.randint(0, 50257, (2, 32))
    assert (logits(model, idx) - logits(unmerged, idx)).abs().max() < 1e-4
    assert (logits(model, idx) - logits(base, idx)).abs().max() > 1e-4  # the adapters trained
    # export_hf.py: a peft adapter folder by default, merged weights with --merge_lora
    for flags, name, marker in (([], "adapter", "adapter_config.json"), (["--merge_lora=True"], "merged", "config.json")):
        proc = subprocess.run([sys.executable, "export_hf.py", f"--ckpt={tmp_path / 'lora'}",
                               f"--out={tmp_path / name}", *flags], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert (tmp_path / name / marker).exists()
    assert not (tmp_path / "adapter" / "config.json").exists()
    # a base that changed since is refused, with what to do
    torch.save({**torch.load(tmp_path / "base" / "ckpt.pt", weights_only=True),
                "model": {k: v + 1 for k, v in base.state_dict().items()}}, tmp_path / "base" / "ckpt.pt")
    proc = subprocess.run([sys.executable, "sample.py", f"--ckpt={tmp_path / 'lora'}", "--prompt=hi"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "has changed since" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_lora_dpo_learns_the_rule_with_the_base_as_reference(rule_data):
    out = str(rule_data / "lora")
    run_dpo(f"--data_dir={rule_data / 'data'}", f"--init_from={rule_data / 'start'}", f"--out_dir={out}",
            "--micro_batch_size=4", "--total_batch_pairs=8", "--learning_rate=3e-2", "--min_lr=3e-3",
            "--warmup_steps=1", "--max_steps=8", "--log_interval=1", "--eval_interval=8", "--ckpt_interval=100",
            "--lora_rank=8", "--lora_alpha=16")
    start = load_model(str(rule_data / "start"), verbose=False)
    rt = setup_runtime("cpu", "float32", 0, verbose=False)
    with np.load(os.path.join(out, "reference_logps.npz")) as saved:  # the reference: the start, adapters off
        assert np.allclose(saved["train"], reference_logps(start[0], str(rule_data / "data"), "train", 4, rt), atol=1e-4)
    accuracy = losses(read_log(out), "val_rewards/accuracies")
    assert accuracy[0] <= 0.5 and accuracy[8] >= 0.9, accuracy
    prompts = [ids for ids, _ in val_questions(str(rule_data / "data"), 8, 64)[::2]]
    before = rule_following(*start[:2], prompts)
    after = rule_following(*load_model(out, verbose=False)[:2], prompts)
    assert before[0] == 0 and after[0] == 1, (before, after)


# ------------------------------------------------------------------------------------------------
# sample.py, serve.py, eval.py and eval_hellaswag.py on a LoRA run's directory, no flags: each answers
# (scores) as the merged model does, and not as the base does, so adapters dropped on the way would fail

SYSTEM = "Answer briefly."
QUESTION = [{"role": "user", "content": "Name a river."}]


def randomize_adapters(path, seed=0):
    """Give a run's adapters random A and large random B: one step of training leaves B about 0 (the
    base's output), and A depends on what drew random numbers before apply_lora (how the base loaded)."""
    ckpt = torch.load(path, weights_only=True)
    g = torch.Generator().manual_seed(seed)
    ckpt["model"] = {k: torch.randn(v.shape, generator=g) * (0.5 if ".lora_B." in k else 0.1)
                     for k, v in sorted(ckpt["model"].items())}
    torch.save(ckpt, path)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A tiny base (a checkpoint, and the same weights as a Hugging Face folder), chat data with a system
    prompt, and a one-step finetune.py LoRA run on each base, given the same random adapters
    -> the folder: base, hf, sft, lora (on the checkpoint), lora_hf (on the folder)."""
    tmp = tmp_path_factory.mktemp("lora_run")
    base = lively_model(block_size=128)
    save_checkpoint(str(tmp / "base"), {"model": base.state_dict(), "model_config": base.config.to_dict(),
                                        "config": {}, "kind": "base", "step": 0})
    export_hf(base, str(tmp / "hf"), load_tokenizer("gpt2"))
    prepare(load_config(InstructConfig, [f"--sources={shared_data('instruct', 'instruction-data.json')}",
                                         f"--data_dir={tmp / 'sft'}", "--block_size=64", "--val_fraction=0.05",
                                         f"--system={SYSTEM}"]))
    for name, start in (("lora", "base"), ("lora_hf", "hf")):
        run_finetune([sys.executable], [f"--data_dir={tmp / 'sft'}", f"--init_from={tmp / start}", "--device=cpu",
                                        "--block_size=64", "--micro_batch_size=4", "--total_batch_tokens=256",
                                        "--max_steps=1", "--warmup_steps=0", "--eval_interval=1", "--eval_tokens=256",
                                        "--answer_tokens=0", "--sample_tokens=0", *LORA], tmp / name)
        randomize_adapters(tmp / name / "ckpt.pt")
    return tmp


def greedy_chat_answer(model, tok, system, n=8):
    ids, _ = chat_prompt_ids(tok, system, QUESTION, n, model.config.block_size)
    return tok.decode(list(generate(model, ids, n, temperature=0, stop_tokens=stop_tokens_of(tok, "chat"),
                                    n_vocab=tok.n_vocab)))


def start_server(ckpt):
    """serve.py on ckpt, on a free port -> (Popen, url) once /health answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "serve.py", f"--ckpt={ckpt}", f"--port={port}", "--device=cpu",
                             "--dtype=float32"],  # fp32, as the merged model in this process
                            cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 180
    while True:
        try:
            health(url)
            return proc, url
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"serve.py did not start: {proc.communicate()}")
            time.sleep(0.2)


@pytest.mark.slow
def test_sample_and_serve_answer_a_lora_run_as_its_merged_model(lora_run):
    run = str(lora_run / "lora")
    merged, tok, meta = load_model(run, verbose=False, merge_lora=True)
    assert resolve_system("auto", meta) == SYSTEM  # the run's data's prompt, which both scripts start chats with
    expected = greedy_chat_answer(merged, tok, SYSTEM)
    base, base_tok, _ = load_model(str(lora_run / "base"), verbose=False)
    assert expected != greedy_chat_answer(base, base_tok, SYSTEM)  # the adapters change the answer
    proc = subprocess.run([sys.executable, "sample.py", f"--ckpt={run}", f"--prompt={QUESTION[0]['content']}",
                           "--temperature=0", "--max_new_tokens=8", "--device=cpu", "--dtype=float32"], cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == expected + "\n", proc.stderr[-2000:]
    server, url = start_server(run)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(model="lora", messages=QUESTION, temperature=0, max_tokens=8)
        assert reply.choices[0].message.content == expected
    finally:
        server.kill()
        server.communicate()


def test_a_lora_run_exports_to_gguf_as_its_merged_model(lora_run, tmp_path):
    """export_hf.py --gguf merges the adapters: llama.cpp's logits are the merged model's."""
    llama_cpp = pytest.importorskip("llama_cpp")
    out = tmp_path / "lora.gguf"
    proc = subprocess.run([sys.executable, "export_hf.py", f"--ckpt={lora_run / 'lora'}", f"--gguf={out}",
                           "--gguf_type=f32"], cwd=ROOT, env=os.environ.copy(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged, tok, _ = load_model(str(lora_run / "lora"), verbose=False, merge_lora=True)
    base, _, _ = load_model(str(lora_run / "base"), verbose=False)
    ids = tok.render_prompt([{"role": "system", "content": SYSTEM}] + QUESTION)
    with torch.no_grad():
        ours = merged(torch.tensor([ids]))[0][0, :, :tok.n_vocab].numpy()
        base_logits = base(torch.tensor([ids]))[0][0, :, :tok.n_vocab].numpy()
    llm = llama_cpp.Llama(str(out), n_ctx=128, n_threads=1, logits_all=True, verbose=False, type_k=0, type_v=0)
    try:
        llm.eval(ids)
        theirs = np.array(llm.scores[:len(ids)])
    finally:
        llm.close()
    scale = np.abs(ours).max()
    assert np.abs(theirs - ours).max() < 1e-3 * scale  # tests/test_gguf.py's f32 bound
    assert np.abs(base_logits - ours).max() > 1e-2 * scale  # the adapters are in it


def hellaswag_items_the_model_gets_right(model, tok, path, n=12):
    """n random HellaSwag items whose label is the ending model picks by summed log-prob (its acc is 1).
    Endings of one length: the pick then depends on the model's weights, not on which ending is shortest."""
    rng = random.Random(0)
    items = [{"ctx": _random_text(rng, 10), "endings": [_random_text(rng, 4) for _ in range(4)], "label": 0}
             for _ in range(n)]
    for item in items:
        sum_logprobs, num_tokens = score_rows(model, render_item(item, model.config.block_size, tok), CPU, tok.eot)
        item["label"] = int(pick_endings(sum_logprobs.view(1, 4), num_tokens.view(1, 4), torch.ones(1, 4))["acc"])
    return _write_jsonl(path, items)


def choice_logliks(samples):
    """{doc id: the log-likelihood of each choice} of the harness's logged ARC items (in memory or as JSON)."""
    return {s["doc_id"]: [float(resp[0][0]) for resp in s["resps"]] for s in samples}


@pytest.mark.slow
def test_eval_and_hellaswag_score_a_lora_run_as_its_merged_model(lora_run, data_dir, tmp_path, monkeypatch,  # noqa: F811
                                                                  capsys):
    run = str(lora_run / "lora")
    merged, tok, meta = load_model(run, verbose=False, merge_lora=True)
    base = load_model(str(lora_run / "base"), verbose=False)[0]
    # eval.py: a chat run, so chat format with its system prompt; every choice's log-likelihood is the merged model's
    monkeypatch.setattr(sys, "argv", ["eval.py", f"--ckpt={run}", "--tasks=arc_easy", f"--data_dir={data_dir}",
                                      "--device=cpu", "--num_fewshot=0", "--log_samples=True",
                                      f"--out={tmp_path / 'results.json'}"])
    eval_script.main()
    logged = choice_logliks(json.loads((tmp_path / "results.samples.json").read_text())["arc_easy"])
    kwargs = dict(chat=True, system_prompt=SYSTEM, data_dir=data_dir, num_fewshot=0, log_samples=True)
    expected = choice_logliks(run_harness(merged, tok, ["arc_easy"], CPU, **kwargs)["samples"]["arc_easy"])
    of_base = choice_logliks(run_harness(base, tok, ["arc_easy"], CPU, **kwargs)["samples"]["arc_easy"])
    assert sorted(logged) == sorted(expected) == [0, 1, 2, 3]
    for doc in expected:
        assert logged[doc] == pytest.approx(expected[doc], abs=1e-4)
        assert max(abs(a - b) for a, b in zip(logged[doc], of_base[doc])) > 0.1
    # eval_hellaswag.py: items the merged model gets all right; the base does not
    data = hellaswag_items_the_model_gets_right(merged, tok, tmp_path / "hellaswag.jsonl")
    assert evaluate_hellaswag(base, tok, data, CPU)["acc"] < 0.75
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["eval_hellaswag.py", f"--ckpt={run}", f"--data={data}", "--device=cpu"])
    eval_hellaswag.main()
    out = capsys.readouterr().out
    assert re.search(r"^  acc +1\.0000", out, re.M) and "HellaSwag: 12 items" in out, out


@pytest.mark.slow
def test_a_lora_run_on_a_hugging_face_base_loads_and_a_missing_base_is_named(lora_run):
    ckpt = torch.load(lora_run / "lora_hf" / "ckpt.pt", weights_only=True)
    assert ckpt["lora"]["base"] == str(lora_run / "hf")  # the folder, by its absolute path
    on_folder = load_model(str(lora_run / "lora_hf"), verbose=False)[0]
    on_checkpoint = load_model(str(lora_run / "lora"), verbose=False)[0]
    idx = torch.randint(0, 50257, (2, 32))
    assert (logits(on_folder, idx) - logits(on_checkpoint, idx)).abs().max() < 1e-5  # same base weights, same adapters
    assert (logits(on_folder, idx) - logits(load_model(str(lora_run / "hf"), verbose=False)[0], idx)).abs().max() > 1e-2
    # a base moved away: the error names the path the run needs and what to do
    for run, base in (("lora", lora_run / "base" / "ckpt.pt"), ("lora_hf", lora_run / "hf")):
        os.rename(base, f"{base}.moved")
        try:
            with pytest.raises(CheckpointError) as e:
                load_model(str(lora_run / run), verbose=False)
        finally:
            os.rename(f"{base}.moved", base)
        assert f"needs its base model at {base}, which is not there any more: put the base back" in str(e.value)
