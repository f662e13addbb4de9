"""
Checkpoints: <out_dir>/ckpt.pt plus a human-readable <out_dir>/ckpt.json.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts:
    model            state dict of the unwrapped, uncompiled model; of a LoRA run, only what trained
    lora             a LoRA run's settings (gptkit/lora.py's LoRASettings), naming its base and its fingerprint
    model_config     GPTConfig fields
    config           the resolved run config
    kind             "base" (pretrained) or "chat" (finetuned with the chat format)
    tokenizer        "gpt2" or the trained tokenizer's tokenizer.json text (absent in old checkpoints: gpt2)
    step, tokens_seen, best_val_loss
    optimizer, scaler, loader, rng   (for an exact resume; absent in exported weights)
Saving is atomic (temporary file, fsync, rename), so a crash or kill during a save leaves the
previous checkpoint intact. Loading uses torch.load(weights_only=True): a checkpoint cannot run code. Turning a checkpoint
into a model is gptkit/loading.py's job. The training loop writes and reads the whole state with save_training_state / restore_training_state.
"""

import json
import os
import pickle
import random

import numpy as np
import torch
import torch.distributed as dist

from gptkit.configurator import ConfigError, UserError, config_dict
from gptkit.files import atomic_write
from gptkit.lora import settings_of, trainable_state_dict
from gptkit.system import print0

CKPT_NAME = "ckpt.pt"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def resolve_path(path):
    """A run directory or a checkpoint file -> the checkpoint file."""
    if os.path.isdir(path):
        path = os.path.join(path, CKPT_NAME)
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}: give a run directory holding {CKPT_NAME} "
                              "(such as out/fineweb_124m) or the path of a .pt file")
    return path


def save_checkpoint(out_dir, state, summary=None):
    """Write state to <out_dir>/ckpt.pt atomically, and a JSON summary beside it."""
    path = os.path.join(out_dir, CKPT_NAME)
    atomic_write(path, lambda f: torch.save(state, f))
    summary = dict(summary or {})
    summary.update({k: state[k] for k in ("kind", "step", "tokens_seen", "best_val_loss", "model_config", "lora")
                    if k in state})
    summary["config"] = state.get("config")
    atomic_write(os.path.join(out_dir, "ckpt.json"),
                 lambda f: f.write(json.dumps(summary, indent=2, default=str).encode()))
    return path


def saved_summary(out_dir):
    """<out_dir>/ckpt.json (kind, step, ...) for messages, or {} when it cannot be read."""
    try:
        with open(os.path.join(out_dir, "ckpt.json"), encoding="utf-8") as f:
            summary = json.load(f)
        return summary if isinstance(summary, dict) else {}
    except (OSError, ValueError):
        return {}


def saved_step(out_dir):
    """", step N" from <out_dir>/ckpt.json for messages, or "" when it cannot be read."""
    try:
        return f", step {int(saved_summary(out_dir)['step']):,}"
    except (KeyError, ValueError, TypeError):
        return ""


def load_checkpoint(path, map_location="cpu"):
    path = resolve_path(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # torch's own message suggests weights_only=False: never here
        raise CheckpointError(
            f"cannot read checkpoint {path}: it is corrupt, or not a gptkit checkpoint (it holds something other "
            "than tensors and plain values). gptkit loads checkpoints with weights_only=True, so it never runs "
            "code a file may carry; give the ckpt.pt of a gptkit run, or an earlier copy of it.") from e
    except Exception as e:
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is truncated or corrupt, or not a gptkit "
            f"checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            "Use an earlier copy of it, or another checkpoint.") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise CheckpointError(f"{path} is not a gptkit checkpoint (no 'model' and 'model_config' entries)")
    return ckpt


def trained_system_prompt(ckpt):
    """The system prompt a chat model was finetuned with (finetune.py keeps the data's in the run
    config; a chat export's comes back the same way), "" for any other model."""
    return (ckpt.get("config") or {}).get("system", "") if ckpt.get("kind") == "chat" else ""


def rng_state():
    """Every random number generator the training loop touches, in a weights_only-safe form."""
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[0]],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    python = state["python"]
    random.setstate((python[-1], tuple(python[:-1]), None))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# ----------------------------------------------------------------------------------------------
# The whole training state, for an exact resume (the training loop saves and restores it)


def _gather(obj, rt):
    """obj from every rank, as a list indexed by rank (a collective: all ranks must call it)."""
    if not rt.ddp:
        return [obj]

    objs = [None] * rt.world_size
    dist.all_gather_object(objs, obj)
    return objs


def save_training_state(cfg, rt, model, tokenizer, optimizers, scaler, train_loader, kind, step, tokens_seen,
                        best_val_loss, log_state=None):
    """Checkpoint everything an exact resume needs (rank 0 writes; all ranks must call it); tokenizer is the
    model's, which the checkpoint carries so later scripts need no flag. log_state: the
    loop's plain-number counters (the loss summed since the last log line, skipped steps), so the first
    log line after a resume is the one an uninterrupted run writes."""
    rngs = _gather(rng_state(), rt)  # each rank has its own dropout RNG
    if not rt.master:
        return
    lora = settings_of(model)
    state = {
        # the raw module: no _orig_mod. or module. prefixes; a LoRA run's only what trains (its base is named)
        "model": trainable_state_dict(model) if lora else model.state_dict(),
        **({"lora": lora.to_dict()} if lora else {}),
        "model_config": model.config.to_dict(),
        "config": config_dict(cfg),
        "kind": kind,
        "tokenizer": tokenizer.to_string(),  # a str: it loads with weights_only
        "optimizer": [opt.state_dict() for opt in optimizers],
        "scaler": scaler.state_dict(),
        "step": step,
        "tokens_seen": tokens_seen,
        "best_val_loss": best_val_loss,
        "loader": train_loader.state_dict(),
        "rng": rngs,
        "log_state": dict(log_state or {}),
    }
    save_checkpoint(cfg.out_dir, state, summary={"world_size": rt.world_size})


def restore_training_state(ckpt, cfg, rt, optimizers, scaler, train_loader, kind):
    """Load optimizer, scaler, data position and RNG from a resume checkpoint
    -> (step, tokens_seen, best_val_loss, log_state). kind is the run's ("base": train.py, "chat": finetune.py); a run of the other kind cannot be resumed."""
    script = {"base": "train.py", "chat": "finetune.py"}
    saved_kind = ckpt.get("kind", "base")
    if saved_kind != kind:
        advice = (f"to finetune its model, use --init_from={cfg.out_dir} with a new --out_dir" if kind == "chat"
                  else "resume it with finetune.py, or give train.py a new --out_dir")
        raise ConfigError(f"init_from=resume: {cfg.out_dir} holds a run of {script.get(saved_kind, saved_kind)}, "
                          f"which {script[kind]} cannot resume; {advice}")
    saved = ckpt.get("optimizer")
    if not isinstance(saved, list) or len(saved) != len(optimizers):
        raise ConfigError(f"the checkpoint in {cfg.out_dir} holds {len(saved) if isinstance(saved, list) else 0} "
                          f"optimizer state(s) but optimizer={cfg.optimizer} needs {len(optimizers)}: resume with the "
                          "optimizer the run started with, or start fresh training from its weights with "
                          f"--init_from={os.path.join(cfg.out_dir, 'ckpt.pt')} and a new out_dir")
    for opt, state in zip(optimizers, saved):
        base_lrs = [g["base_lr"] for g in opt.param_groups]
        opt.load_state_dict(state)
        for group, base_lr in zip(opt.param_groups, base_lrs):
            group["base_lr"] = base_lr  # a learning_rate changed on the command line applies from here on
    if scaler.is_enabled() and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    train_loader.load_state_dict(ckpt["loader"])
    if not getattr(train_loader, "exact_resume", True):
        print0("note: batch size, block size, process count or data changed since the checkpoint: training "
               "continues from the same place in the data, but not with the exact batches of an uninterrupted run")
    rngs = ckpt["rng"]
    set_rng_state(rngs[rt.rank % len(rngs)])
    return int(ckpt["step"]), int(ckpt["tokens_seen"]), float(ckpt["best_val_loss"]), dict(ckpt.get("log_state", {}))


def truncate_log(out_dir, last_step):
    """On resume, drop log records written after the checkpoint (a run killed past its last save
    logged steps that will now be run again)."""
    path = os.path.join(out_dir, "log.jsonl")
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except json.JSONDecodeError:
            pass  # a line cut short by a kill
    atomic_write(path, lambda f: f.write("".join(kept).encode("utf-8")))  # a kill here keeps the old log whole
