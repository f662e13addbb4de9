"""LoRA (gptkit/lora.py): peft as the oracle for the adapted logits and the exported adapter folder,
the trainable parameters and what the optimizer holds, adapters off = the base (DPO's reference),
the checkpoint (adapters only, naming the base), exact resume, loading without flags, and quality:
LoRA against full finetuning, and the DPO preference rule learned with LoRA."""

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, shared_data
from gptkit.configurator import ConfigError, load_config
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
from test_dpo import rule_data, rule_following, run_dpo  # noqa: F401 (rule_data: a fixture used here)
from test_finetune import by_step, finetuned, run_finetune  # noqa: F401 (finetuned: a fixture used here)
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
    and LoRA rank 16 on attn+mlp (lr 1e-2: adapters want more), the same 150 batches of 8 x 32 bytes;
    val loss on the book's held-out end. Measured: start 2.651, full 2.347, LoRA 2.443 (+4.1%)."""
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
    train_for(lora, train, learning_rate=1e-2)
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
