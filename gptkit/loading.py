"""
Where a model comes from: the one place that turns a name into (model, tokenizer), and checks the
model against the tokenizer and the context a run asks for.

    model, tok, meta = load_model("out/dolly", device="cuda")    # sample, serve, eval, export, bench
    model, tok, ckpt = init_model(cfg, rt)                       # train.py, finetune.py, dpo.py

A model comes from one of four sources (model_source tells which):
    scratch       a new GPT of cfg's n_layer, n_head, n_embd, block_size; the data's tokenizer
    resume        <out_dir>/ckpt.pt with its optimizer, data position and RNG (init_model only)
    checkpoint    a gptkit run directory or ckpt.pt: its weights and the tokenizer it carries
    hf            a Hugging Face GPT-2 folder or a hub name (gpt2, gpt2-xl, ...): weights via gptkit/hf.py;
                  GPT-2's tokenizer, or the trained one a gptkit export carries
The tokenizer always travels with the model: load_model returns the model's, init_model the data's
after checking that the model was made with the same one. meta is what the model's file tells
besides its weights: the checkpoint dict, or for a Hugging Face model hf_run_info's {"kind", ...}.
"""

import dataclasses
import json
import os

from model import GPT, GPTConfig
from gptkit.checkpoint import CKPT_NAME, CheckpointError, load_checkpoint, resolve_path, saved_step, saved_summary
from gptkit.configurator import ConfigError
from gptkit.hf import hf_run_info, is_hf_folder, is_hub_name, load_hf_gpt2
from gptkit.lock import hold_folder
from gptkit.lora import (LoRASettings, apply_lora, base_fingerprint, count_parameters, load_trainable_state,
                         merge_adapters, settings_of)
from gptkit.quantize import quantize_model
from gptkit.system import print0
from gptkit.tokenizer import check_same_tokenizer, checkpoint_tokenizer, data_tokenizer, load_tokenizer


def model_source(spec):
    """"scratch", "resume", "checkpoint", "hf" or None (none of them) for an init_from / ckpt value."""
    if spec in ("scratch", "resume"):
        return spec
    if os.path.isfile(spec) or os.path.isfile(os.path.join(spec, CKPT_NAME)):
        return "checkpoint"
    if is_hf_folder(spec) or is_hub_name(spec):
        return "hf"
    return None


def ckpt_arg_problems(ckpt, example="out/fineweb_124m", hf=True):
    """The config check of a script's --ckpt option -> a list of problems (empty when it is usable).
    hf: a Hugging Face GPT-2 folder or hub name (gpt2, ...) is usable too (load_model reads it)."""
    also = ", a Hugging Face GPT-2 folder or a hub name such as gpt2" if hf else ""
    if not ckpt:
        return [f"ckpt is empty: give a run directory (--ckpt={example}) or a ckpt.pt file{also}"]
    if is_hf_folder(ckpt) or is_hub_name(ckpt):
        return [] if hf else [f"ckpt={ckpt!r} is a Hugging Face model, not a gptkit run: give a run directory "
                              "or a ckpt.pt file"]
    if not os.path.exists(ckpt):
        return [f"ckpt={ckpt!r} does not exist: give a run directory or a ckpt.pt file{also}"]
    if os.path.isdir(ckpt) and not os.path.isfile(os.path.join(ckpt, CKPT_NAME)):
        return [f"ckpt={ckpt!r} is a folder without {CKPT_NAME} (a run that has not saved yet, or not a run "
                f"directory): give a run directory holding {CKPT_NAME}, or a .pt file"]
    return []


def model_summary(spec):
    """What the model at spec was trained as, read without loading weights: {"kind": "chat" | "base",
    "config": its run's settings} from ckpt.json beside a gptkit checkpoint or a Hugging Face folder's
    run info; {"kind": "base"} when it cannot be told."""
    folder = os.path.dirname(spec) if os.path.isfile(spec) else spec
    try:
        with open(os.path.join(folder, "ckpt.json"), encoding="utf-8") as f:
            summary = json.load(f)
        if isinstance(summary, dict):
            return {"kind": summary.get("kind", "base"), "config": summary.get("config") or {}}
    except (OSError, ValueError):
        pass
    return hf_run_info(folder) if is_hf_folder(folder) else {"kind": "base"}


def model_kind(spec):
    """"chat" or "base": what the model at spec was trained as ("base" when it cannot be told)."""
    return model_summary(spec)["kind"]


def build_model(ckpt, path="checkpoint", verbose=True, **overrides):
    """GPT from a checkpoint dict; overrides change config fields that do not alter shapes (dropout)."""
    unknown = sorted(set(ckpt["model_config"]) - {f.name for f in dataclasses.fields(GPTConfig)})
    if unknown:  # a newer or forked gptkit's model
        raise CheckpointError(f"{path}: its model config has fields this gptkit's model does not know ({', '.join(unknown)}): "
                              "it was made by another version of gptkit; use that version, or a checkpoint made by this one")
    if ckpt.get("lora"):
        return lora_model(ckpt, path, verbose, **overrides)
    model_config = GPTConfig(**{**ckpt["model_config"], **overrides})
    model = GPT(model_config, verbose=verbose)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the model config stored with them: {e}") from e
    return model


def lora_model(ckpt, path, verbose=True, base_dtype=None, **overrides):
    """The model of a LoRA run's checkpoint: its base (loaded, checked against the fingerprint the run
    recorded) with the run's adapters, unmerged. base_dtype: the settings' (resume), or float32 when
    None (sample, serve, eval, export: the stored base weights as they are)."""
    settings = LoRASettings.from_dict(ckpt["lora"])
    settings.base_dtype = base_dtype or "float32"
    source = model_source(settings.base)
    if source not in ("checkpoint", "hf"):
        # the run holds only its adapters: without the base there is no model, so say where it must be
        raise CheckpointError(f"{path} is a LoRA run: it holds only its adapters and needs its base model at "
                              f"{settings.base}, which is not there any more: put the base back at that path (a "
                              f"copy, or a link to where it went: ln -s NEW_PATH {settings.base}); its weights are "
                              "checked against the ones the adapters were trained on")
    overrides = {"dropout": ckpt["model_config"]["dropout"], **overrides}
    model, _, _ = _load(settings.base, source, verbose, **overrides)
    if base_fingerprint(model) != settings.base_fingerprint:
        raise CheckpointError(f"{path} is a LoRA run whose adapters were trained on {settings.base}, but that model "
                              "has changed since (its weights differ): restore the base the run started from, or "
                              "train the adapters again on the model there now")
    differ = {k: v for k, v in ckpt["model_config"].items() if k != "dropout" and model.config.to_dict().get(k) != v}
    if differ:
        raise CheckpointError(f"{path}: its base {settings.base} has another shape than the run ({differ})")
    apply_lora(model, settings)
    problems = load_trainable_state(model, ckpt["model"])
    if problems:
        raise CheckpointError(f"{path}: the adapters do not fit its base {settings.base} ({'; '.join(problems)}): "
                              "the checkpoint was made by another version of gptkit, or is damaged")
    return model


def check_vocabulary(model, tok, where):
    """Every id the tokenizer can produce must have an embedding row."""
    if model.config.vocab_size < tok.n_vocab:
        raise CheckpointError(f"{where}: the model has {model.config.vocab_size} token embeddings but the "
                              f"tokenizer needs {tok.n_vocab} ({tok.name}: text tokens plus the chat tokens); "
                              "this model was not made for that tokenizer")


def _load(spec, source, verbose, merge_lora=True, **overrides):
    """A checkpoint or Hugging Face model -> (model on the CPU, its tokenizer, meta). merge_lora: a LoRA
    run's adapters folded into its weights (a plain GPT), else kept apart (export_hf.py's adapter folder)."""
    if source == "hf":
        model, meta = load_hf_gpt2(spec, verbose=verbose, **overrides), hf_run_info(spec)
    else:
        meta = load_checkpoint(spec)
        model = build_model(meta, resolve_path(spec), verbose=verbose, **overrides)
    if merge_lora and settings_of(model):
        merge_adapters(model)
    tok = checkpoint_tokenizer(meta)
    check_vocabulary(model, tok, spec)
    return model, tok, meta


def load_model(path, device="cpu", dtype=None, verbose=True, merge_lora=True, quantize="none", **overrides):
    """-> (model in eval mode on device, its tokenizer, meta), for sample, serve, eval, export and bench.
    path: a run directory or checkpoint file, or a Hugging Face GPT-2 folder or hub name (gpt2,
    gpt2-xl, ...: to compare with OpenAI's models, or use an export). A LoRA run loads like any other:
    its base with the adapters merged in, since inference never needs them apart and a merged Linear is
    one matmul instead of three (sample, serve and the evals run at the base's speed); merge_lora=False
    keeps them apart (export_hf.py's adapter folder; gptkit/lora.py). dtype: the weights' (None: as
    stored); sample.py and serve.py hold them in bf16 when they compute in bf16 (Runtime.weights_dtype),
    since decoding reads every weight for each token: bf16 weights are read in half the time, and
    autocast need not cast them at every call. quantize="int8": the matmul weights in int8 (a quarter
    of fp32's bytes; gptkit/quantize.py), "fp16" (a CPU's fbgemm fp16 GEMM), rounded from the weights
    as stored, before dtype applies."""
    source = model_source(path)
    if source not in ("checkpoint", "hf"):
        resolve_path(path)  # raises the message that says what to give
    model, tok, meta = _load(path, source, verbose, merge_lora=merge_lora, **overrides)
    quantize_model(model, quantize, device)
    model.to(device=device, dtype=dtype)
    model.eval()
    return model, tok, meta


def run_tokenizer(cfg):
    """The tokenizer of cfg.data_dir (prepare_*.py recorded it there; none recorded: GPT-2), checked
    against cfg.tokenizer when that is given."""
    tok = data_tokenizer(cfg.data_dir) if os.path.isdir(cfg.data_dir) else load_tokenizer(cfg.tokenizer or "gpt2")
    if cfg.tokenizer and load_tokenizer(cfg.tokenizer).hash != tok.hash:
        raise ConfigError(f"tokenizer={cfg.tokenizer} ({load_tokenizer(cfg.tokenizer).hash}), but {cfg.data_dir} was "
                          f"prepared with tokenizer {tok.name}: leave tokenizer out (the data's is used), or "
                          "prepare the data again with this one")
    return tok


def model_vocab_size(cfg, tok):
    """The model's embedding rows: vocab_size when set (at least the tokenizer's), else the tokenizer's."""
    if cfg.vocab_size and cfg.vocab_size < tok.n_vocab:
        raise ConfigError(f"vocab_size={cfg.vocab_size} is smaller than the {tok.n_vocab} ids of tokenizer "
                          f"{tok.name}: leave it 0 (the tokenizer's, padded to {tok.vocab_size})")
    return cfg.vocab_size or tok.vocab_size


def scratch_model(cfg, vocab_size, dropout=None, verbose=True):
    """A new GPT of cfg's shape (n_layer, n_head, n_embd, block_size, bias) on the CPU; dropout: cfg's
    unless given (bench.py times decoding without it)."""
    return GPT(GPTConfig(block_size=cfg.block_size, vocab_size=vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                         n_embd=cfg.n_embd, bias=cfg.bias, dropout=cfg.dropout if dropout is None else dropout),
               verbose=verbose)


def base_spec(spec, source):
    """How a LoRA run names its base: the absolute path of a checkpoint file or folder, a hub name as it is."""
    if source == "checkpoint":
        return os.path.abspath(resolve_path(spec))
    return os.path.abspath(spec) if os.path.exists(spec) else spec


def add_adapters(model, cfg, rt, source):
    """Turn the starting model into a LoRA run's (gptkit/lora.py): adapters of cfg's settings, the base frozen."""
    if cfg.lora_base_dtype != "float32" and rt.dtype == "float32":
        raise ConfigError(f"lora_base_dtype={cfg.lora_base_dtype} needs mixed precision, but this run computes in "
                          "float32 (dtype=auto on a CPU): give --dtype=bfloat16, or leave lora_base_dtype=float32")
    settings = LoRASettings(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                            targets=cfg.lora_targets_list(), train_norms=cfg.lora_train_norms,
                            base_dtype=cfg.lora_base_dtype, base=base_spec(cfg.init_from, source),
                            base_fingerprint=base_fingerprint(model))
    apply_lora(model, settings)
    trainable, total = count_parameters(model)
    print0(f"LoRA: rank {settings.rank} on {', '.join(settings.module_names())}: {trainable:,} of {total:,} "
           f"parameters train ({100 * trainable / total:.2f}%); the base {settings.base} is frozen")


def lora_settings_ignored(cfg, ckpt):
    """The LoRA keys of cfg that differ from a resumed checkpoint's, as "key=value (checkpoint: ...)" text."""
    saved = ckpt.get("lora") or {}
    if not getattr(cfg, "lora_rank", 0):  # not asked for: nothing to ignore (a LoRA run resumes as one)
        return ""
    ours = {"lora_rank": cfg.lora_rank}
    theirs = {"lora_rank": saved.get("rank", 0)}
    if saved:
        for key in ("alpha", "dropout", "train_norms", "base_dtype"):
            ours[f"lora_{key}"], theirs[f"lora_{key}"] = getattr(cfg, f"lora_{key}"), saved[key]
        ours["lora_targets"], theirs["lora_targets"] = cfg.lora_targets_list(), saved["targets"]
    return ", ".join(f"{k}={ours[k]} (checkpoint: {theirs[k]})" for k in ours if ours[k] != theirs[k])


# settings a resumed run may change without changing what it computes, or that only name the resume
RESUME_FREE = {"init_from", "stop_step", "device", "compile", "out_dir", "wandb_log", "wandb_project",
               "wandb_run_name", "log_interval", "ckpt_interval", "num_proc", "questions", "answer_tokens"}


def changed_settings(cfg, saved, skip=()):
    """'max_steps=100 (the run: 30), ...' for cfg's settings that differ from a run's saved config."""
    return ", ".join(f"{k}={getattr(cfg, k)!r} (the run: {v!r})" for k, v in saved.items()
                     if k not in RESUME_FREE and k not in skip and hasattr(cfg, k) and getattr(cfg, k) != v)


def init_model(cfg, rt):
    """-> (model on rt.device, the data's tokenizer, checkpoint dict to resume from or None).

    cfg.init_from: scratch, resume, a gptkit checkpoint (its weights, fresh training; cfg.dropout
    applies) or a Hugging Face GPT-2 (model_source). First it makes this process out_dir's one
    writer (rank 0; gptkit/lock.py): a second run on it stops there. A model made with another
    tokenizer than the data's is refused, and so is a block_size longer than the model's context:
    cfg.block_size is the length of the rows the run trains on, at most the model's block_size.
    cfg.lora_rank > 0 (finetune.py, dpo.py): the starting model gets adapters and is frozen (add_adapters);
    a LoRA run resumes as one, its base loaded again from where its checkpoint names it."""
    if rt.master:  # before anything in out_dir is read: a second process on it stops here, naming the first
        hold_folder(cfg.out_dir)
    tok = run_tokenizer(cfg) if cfg.data_dir else None  # rl.py has no data folder: the model's tokenizer
    source, own = model_source(cfg.init_from), os.path.join(cfg.out_dir, CKPT_NAME)
    if source != "resume" and os.path.exists(own):
        # a new run here would replace the log at once and the checkpoint at its first save
        # a pretraining run is resumed by train.py only: say so, or finetune.py's user is sent to a refusal
        by = " (with train.py: it is a pretraining run)" if saved_summary(cfg.out_dir).get("kind") == "base" else ""
        raise ConfigError(f"{cfg.out_dir} already holds a run ({own}{saved_step(cfg.out_dir)}), which a new run "
                          f"with init_from={cfg.init_from} would overwrite: continue it with --init_from=resume{by}, "
                          f"start from its model with --init_from={cfg.out_dir} and a new --out_dir, or give a new "
                          f"--out_dir (delete {cfg.out_dir} to start over there)")
    ckpt = None
    if source == "scratch":
        if tok is None:
            raise ConfigError("init_from=scratch needs a tokenizer: start from a trained model (--init_from=RUN)")
        model = scratch_model(cfg, model_vocab_size(cfg, tok), verbose=rt.master)
    elif source == "resume":
        if not os.path.exists(own):
            raise ConfigError(f"init_from=resume, but there is no checkpoint at {own}: check out_dir, or start "
                              "a new run (init_from=scratch to pretrain, or the path of a run or .pt file to start from)")
        ckpt = load_checkpoint(own)
        tok = check_same_tokenizer(tok, cfg.data_dir, checkpoint_tokenizer(ckpt), own)
        # the run's own model config, dropout included; a LoRA run's adapters on its base, in the run's base_dtype
        model = (lora_model(ckpt, own, rt.master, base_dtype=ckpt["lora"]["base_dtype"]) if ckpt.get("lora")
                 else build_model(ckpt, own, verbose=rt.master))
        ignored = lora_settings_ignored(cfg, ckpt)
        if ignored:
            print0(f"note: resuming with the checkpoint's LoRA settings; ignoring {ignored}")
        # block_size is the run's row length, not ignored; the model's shape comes from the checkpoint,
        # so only a shape the command asked for (a file or flag; not a default) is worth a word
        given = getattr(cfg, "given", None)
        differ = [f"{k}={getattr(cfg, k)} (checkpoint: {v})" for k, v in ckpt["model_config"].items()
                  if k != "block_size" and hasattr(cfg, k) and getattr(cfg, k) != v and (given is None or k in given)
                  and not (k == "vocab_size" and cfg.vocab_size == 0)]
        if differ:
            print0("note: resuming with the checkpoint's model config; ignoring " + ", ".join(differ))
        changed = changed_settings(cfg, ckpt.get("config") or {}, skip=set(ckpt["model_config"]) - {"block_size"})
        if changed:
            print0(f"note: resuming with this command's settings where they differ from the run's: {changed} "
                   "(give the run's values to go on exactly as it would have)")
    elif source in ("checkpoint", "hf"):
        model, model_tok, _ = _load(cfg.init_from, source, rt.master, dropout=cfg.dropout)
        tok = check_same_tokenizer(tok, cfg.data_dir, model_tok, cfg.init_from)
        if getattr(cfg, "lora_rank", 0):  # FinetuneConfig's key; train.py's TrainConfig has none
            add_adapters(model, cfg, rt, source)
    else:
        raise ConfigError(f"init_from={cfg.init_from!r} is none of: scratch, resume, a gptkit checkpoint (a .pt file "
                          f"or a run directory holding {CKPT_NAME}), a Hugging Face GPT-2 folder (with config.json), "
                          "or a hub name such as gpt2 / gpt2-medium")
    check_vocabulary(model, tok, cfg.init_from)
    if source != "scratch":  # the config printed and saved with the run names the model it trains, not defaults
        for key in ("n_layer", "n_head", "n_embd", "bias"):
            setattr(cfg, key, getattr(model.config, key))
    if cfg.block_size > model.config.block_size:
        raise ConfigError(f"block_size={cfg.block_size} is longer than the model's context of "
                          f"{model.config.block_size}: use --block_size={model.config.block_size} or less (and "
                          "prepare chat data with the same block_size)")
    model.to(rt.device)
    return model, tok, ckpt
