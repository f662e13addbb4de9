"""
The one training loop, shared by train.py (pretraining), finetune.py (instruction finetuning) and
dpo.py (preference tuning). They differ only in how the model is built, the batch source and the
loss they hand to train(): LM_LOSS (next-token cross-entropy) or gptkit/preference.py's DPOLoss.

    model, ckpt = init_model(cfg, rt)                  # scratch | resume | checkpoint | Hugging Face GPT-2
    train(cfg, rt, model, train_loader, get_val_batches, loss_fn=LM_LOSS, kind="base", ckpt=ckpt)

train() reads top to bottom: set up (optimizers, resume, run folder), then per step: batches ->
train_step -> StepLog (log lines, skipped steps) -> run_eval when due -> StopSignals / checkpoint.

The pieces are plain functions, so bench.py can time exactly the step the loop runs:
    optimizers = configure_optimizers(model, cfg, rt.device_type)
    loss, grad_norm, finite = train_step(model, optimizers, micro_batches, cfg, rt, scaler, forward_model)
"""

import contextlib
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from gptkit.configurator import BaseConfig, ConfigError, UserError, config_dict, print_config
from gptkit.checkpoint import (atomic_write, remove_temporaries, restore_training_state, save_training_state,
                               truncate_log)
from gptkit.system import STOPPED_EXIT_HELP, MetricsLogger, device_peak_flops, print0


@dataclass
class TrainConfig(BaseConfig):
    help_epilog: ClassVar[str] = STOPPED_EXIT_HELP  # --help ends with it: how a stopped run exits
    # data and run
    data_dir: str = "data/fineweb_edu"  # prepared shards (prepare_fineweb.py / prepare_instruct.py)
    out_dir: str = "out/fineweb_124m"   # checkpoints, log.jsonl, config.json land here
    init_from: str = "scratch"          # scratch | resume | path of a gptkit checkpoint or a Hugging Face GPT-2 folder | gpt2* hub name
    # model (ignored when starting from a checkpoint, except dropout)
    n_layer: int = 12                   # transformer blocks
    n_head: int = 12                    # attention heads per block (n_embd / n_head is the head size)
    n_embd: int = 768                   # width of the residual stream
    block_size: int = 1024              # context length in tokens
    vocab_size: int = 0                 # 0: the tokenizer's vocabulary padded to a multiple of 64 (GPT-2: 50304, chat tokens included)
    tokenizer: str = ""                 # empty: the one data_dir was prepared with; gpt2 or a path: checked against it
    bias: bool = False                  # biases in linear layers and LayerNorms (GPT-2 has them)
    dropout: float = 0.0                # 0 for pretraining on much data; try 0.1 when finetuning on little
    # batch: tokens per optimizer step; accumulation = total_batch_tokens / (micro_batch_size * block_size * world_size)
    total_batch_tokens: int = 524288    # 2**19, about 0.5M tokens per step, as GPT-3 small
    micro_batch_size: int = 16          # sequences per forward pass per GPU: the memory knob
    max_steps: int = 19073              # 19073 * 2**19 = 10B tokens, one epoch of FineWeb-Edu sample-10BT
    # optimizer
    optimizer: str = "adamw"            # adamw | muon (Muon on hidden matrices, AdamW on the rest)
    learning_rate: float = 6e-4         # peak AdamW learning rate, reached after warmup_steps
    min_lr: float = 6e-5                # end of the decay
    warmup_steps: int = 700             # linear warmup from learning_rate / warmup_steps
    lr_schedule: str = "cosine"         # cosine | wsd (warmup, stable, then linear decay over decay_fraction)
    decay_fraction: float = 0.2         # wsd: share of the steps spent decaying
    weight_decay: float = 0.1           # on 2-D weights only (not biases or LayerNorms)
    beta1: float = 0.9                  # AdamW momentum
    beta2: float = 0.95                 # AdamW second-moment decay (0.95: steadier for LLMs than 0.999)
    muon_learning_rate: float = 0.02    # Muon's own scale: its updates are orthogonalised, not Adam-sized
    grad_clip: float = 1.0              # clip the global gradient norm; 0 disables
    activation_checkpointing: bool = False  # recompute blocks in backward: much less memory, up to 1/3 more compute
    max_bad_steps: int = 5              # stop after this many non-finite losses in a row
    data_mode: str = "random"           # random: every window once per epoch, shuffled anew; sequential: shard order
    # evaluation, logging, checkpoints
    eval_interval: int = 250            # steps between val losses (and samples); also at the end
    eval_tokens: int = 10485760         # fixed val budget (modded-nanogpt uses 10M tokens)
    log_interval: int = 10              # steps between log lines; the only regular wait for the GPU
    ckpt_interval: int = 1000           # steps between checkpoints; also at the end and on SIGTERM/Ctrl-C
    hellaswag_interval: int = 0         # 0: off
    hellaswag_data: str = ""            # HellaSwag JSONL; empty downloads the official val file
    hellaswag_limit: int = 0            # 0: all items
    sample_tokens: int = 48             # length of the samples printed at each eval; 0: none
    wandb_log: bool = False             # also log to Weights & Biases (WANDB_MODE=offline works)
    wandb_project: str = "gptkit"       # the wandb project the run goes to
    wandb_run_name: str = ""            # empty: wandb picks a name
    stop_step: int = 0                  # save and exit after this step though max_steps is further (job time limits); 0: off

    def validate(self):
        problems = super().validate()
        for key in ("data_dir", "out_dir"):
            if not getattr(self, key).strip():
                problems.append(f"{key} is empty: give a folder, such as --{key}={getattr(TrainConfig, key)}")
        if self.optimizer not in ("adamw", "muon"):
            problems.append(f"optimizer={self.optimizer!r}: use adamw or muon")
        if self.lr_schedule not in ("cosine", "wsd"):
            problems.append(f"lr_schedule={self.lr_schedule!r}: use cosine or wsd")
        if self.data_mode not in ("random", "sequential"):
            problems.append(f"data_mode={self.data_mode!r}: use random or sequential")
        if self.micro_batch_size < 1 or self.block_size < 1:
            problems.append("micro_batch_size and block_size must be positive")
        else:
            problems += self.batch_problems()
        if self.n_head < 1 or self.n_layer < 1 or self.n_embd < 1:
            problems.append("n_layer, n_head and n_embd must be positive")
        elif self.n_embd % self.n_head:
            problems.append(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.max_steps < 1:
            problems.append(f"max_steps={self.max_steps} must be at least 1")
        if self.warmup_steps < 0 or self.warmup_steps > self.max_steps:
            problems.append(f"warmup_steps={self.warmup_steps} must be between 0 and max_steps={self.max_steps}")
        for key in ("learning_rate", "muon_learning_rate"):
            if getattr(self, key) <= 0:
                problems.append(f"{key}={getattr(self, key)} must be positive")
        if not 0 <= self.min_lr <= self.learning_rate:
            problems.append(f"min_lr={self.min_lr} must be between 0 and learning_rate={self.learning_rate}")
        for key in ("weight_decay", "grad_clip"):
            if getattr(self, key) < 0:
                problems.append(f"{key}={getattr(self, key)} must be 0 (off) or more")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                problems.append(f"{key}={getattr(self, key)} must be in [0, 1)")
        if not 0 <= self.decay_fraction <= 1:
            problems.append(f"decay_fraction={self.decay_fraction} must be in [0, 1]")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout={self.dropout} must be in [0, 1)")
        for key in ("eval_interval", "log_interval", "ckpt_interval"):
            if getattr(self, key) < 1:
                problems.append(f"{key}={getattr(self, key)} must be at least 1")
        if self.tokenizer:
            from gptkit.tokenizer import tokenizer_problems
            problems += tokenizer_problems(self.tokenizer)
        return problems

    def batch_problems(self):
        """The step's size against the micro-batch (dpo.py counts pairs, not tokens, and has its own)."""
        tokens_per_micro_batch = self.micro_batch_size * self.block_size
        if self.total_batch_tokens % tokens_per_micro_batch:
            return [f"total_batch_tokens={self.total_batch_tokens} is not a multiple of "
                    f"micro_batch_size*block_size={tokens_per_micro_batch}"]
        if self.total_batch_tokens < 1:
            return [f"total_batch_tokens={self.total_batch_tokens} must be positive (524288 is usual)"]
        return []


class NonFiniteLossError(UserError, RuntimeError):
    """The loss or gradient stayed NaN/inf for max_bad_steps steps in a row; the message says what to do."""


# ----------------------------------------------------------------------------------------------
# Model, optimizer, schedule

def run_tokenizer(cfg):
    """The tokenizer of cfg.data_dir (prepare_*.py recorded it there; none recorded: GPT-2), checked
    against cfg.tokenizer when that is given."""
    from gptkit.tokenizer import data_tokenizer, load_tokenizer
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


def init_model(cfg, rt):
    """-> (model on rt.device, checkpoint dict to resume from or None).

    init_from: scratch (a new model from cfg's n_layer, n_head, ...), resume (<out_dir>/ckpt.pt with
    its optimizer, data position and RNG), the path of a gptkit checkpoint (its weights, fresh
    training; cfg.dropout applies), or a Hugging Face GPT-2 folder / a hub name starting with gpt2.
    First it makes this process out_dir's one writer (rank 0; gptkit/lock.py): a second run on it stops there.
    The data's tokenizer becomes the process's; a model made with another one is refused."""
    from model import GPT, GPTConfig
    from gptkit.checkpoint import CKPT_NAME, build_model, load_checkpoint, saved_step
    from gptkit.hf import hf_run_info, is_hf_folder, is_hub_name, load_hf_gpt2
    from gptkit.lock import hold_folder
    from gptkit.tokenizer import check_same_tokenizer, checkpoint_tokenizer, use_tokenizer
    if rt.master:  # before anything in out_dir is read: a second process on it stops here, naming the first
        hold_folder(cfg.out_dir)
    tok = use_tokenizer(run_tokenizer(cfg))
    source = cfg.init_from
    ckpt = None
    own = os.path.join(cfg.out_dir, CKPT_NAME)
    if source != "resume" and os.path.exists(own):
        # a new run here would replace the log at once and the checkpoint at its first save
        raise ConfigError(f"{cfg.out_dir} already holds a run ({own}{saved_step(cfg.out_dir)}), which a new run "
                          f"with init_from={source} would overwrite: continue it with --init_from=resume, or give "
                          f"a new --out_dir (delete {cfg.out_dir} to start over there)")
    if source == "scratch":
        model = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=model_vocab_size(cfg, tok), n_layer=cfg.n_layer,
                              n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias),
                    verbose=rt.master)
    elif source == "resume":
        path = os.path.join(cfg.out_dir, CKPT_NAME)
        if not os.path.exists(path):
            raise ConfigError(f"init_from=resume, but there is no checkpoint at {path}: check out_dir, or start "
                              "a new run (init_from=scratch to pretrain, or the path of a run or .pt file to start from)")
        ckpt = load_checkpoint(path)
        check_same_tokenizer(tok, cfg.data_dir, checkpoint_tokenizer(ckpt), path)
        model = build_model(ckpt, path, verbose=rt.master)  # the run's own model config, dropout included
        differ = [f"{k}={getattr(cfg, k)} (checkpoint: {v})" for k, v in ckpt["model_config"].items()
                  if hasattr(cfg, k) and getattr(cfg, k) != v and not (k == "vocab_size" and cfg.vocab_size == 0)]
        if differ:
            print0("note: resuming with the checkpoint's model config; ignoring " + ", ".join(differ))
    elif os.path.isfile(source) or os.path.isfile(os.path.join(source, CKPT_NAME)):
        start = load_checkpoint(source)
        check_same_tokenizer(tok, cfg.data_dir, checkpoint_tokenizer(start), source)
        model = build_model(start, source, verbose=rt.master, dropout=cfg.dropout)
    elif is_hf_folder(source) or is_hub_name(source):
        check_same_tokenizer(tok, cfg.data_dir, checkpoint_tokenizer(hf_run_info(source)), source)
        model = load_hf_gpt2(source, verbose=rt.master, dropout=cfg.dropout)
    else:
        raise ConfigError(f"init_from={source!r} is none of: scratch, resume, a gptkit checkpoint (a .pt file or "
                          f"a run directory holding {CKPT_NAME}), a Hugging Face GPT-2 folder (with config.json), "
                          "or a hub name such as gpt2 / gpt2-medium")
    model.to(rt.device)
    return model, ckpt


def configure_optimizers(model, cfg, device_type):
    """AdamW on all parameters (decay on 2-D weights only), or with optimizer=muon: Muon on the
    hidden matrices and AdamW on the rest. Each param group remembers its base_lr, so the schedule
    is one multiplier for all of them (set_lr)."""
    # fused: one kernel for all parameters, and it can skip a step on the device (found_inf, see train_step)
    fused = True
    groups = model.param_groups(cfg.weight_decay)
    optimizers = []
    if cfg.optimizer == "muon":
        hidden = model.hidden_matrices()
        hidden_ids = {id(p) for p in hidden}
        groups = [{**g, "params": [p for p in g["params"] if id(p) not in hidden_ids]} for g in groups]
        groups = [g for g in groups if g["params"]]
        optimizers.append(torch.optim.Muon(hidden, lr=cfg.muon_learning_rate, weight_decay=cfg.weight_decay))
    optimizers.insert(0, torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                                           fused=fused))
    for opt in optimizers:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return optimizers


def lr_multiplier(step, cfg):
    """Learning-rate factor for optimizer step `step` (0-based): linear warmup over warmup_steps, then
    cosine down to min_lr/learning_rate at the last step, or (wsd) flat until the last
    decay_fraction of the steps and a straight line down to min_lr/learning_rate."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr / cfg.learning_rate
    if cfg.lr_schedule == "wsd":
        decay_start = max(cfg.warmup_steps, cfg.max_steps - int(round(cfg.decay_fraction * cfg.max_steps)))
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step + 1 - decay_start) / (cfg.max_steps - decay_start))
        return 1.0 - (1.0 - floor) * progress
    progress = min(1.0, (step + 1 - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return floor + 0.5 * (1.0 - floor) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizers, multiplier):
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * multiplier


def grad_accum_steps(cfg, world_size):
    """Micro-batches per optimizer step on each process, so that a step holds total_batch_tokens."""
    tokens_per_pass = cfg.micro_batch_size * cfg.block_size * world_size
    if cfg.total_batch_tokens % tokens_per_pass:
        raise ConfigError(f"total_batch_tokens={cfg.total_batch_tokens} is not a multiple of micro_batch_size * "
                          f"block_size * processes = {cfg.micro_batch_size} * {cfg.block_size} * {world_size} = "
                          f"{tokens_per_pass}: change micro_batch_size or total_batch_tokens (a power of two "
                          "such as 524288 divides evenly for power-of-two batch sizes and GPU counts)")
    return cfg.total_batch_tokens // tokens_per_pass


# ----------------------------------------------------------------------------------------------
# The loss handed to the loop. Pretraining and SFT share this one; dpo.py hands its own
# (gptkit/preference.py: DPOLoss), with the same five methods.

class LanguageModelLoss:
    """Next-token cross-entropy on every target that is not -1, weighted by token over the whole step.

    A loss for the loop has: grad_accum_steps(cfg, world_size) (micro-batches per step and process);
    batch_summary(cfg, grad_accum, world_size) (the line that says what a step holds); count(batch)
    (the units a step averages over: target tokens here, pairs for DPO); __call__(forward_model,
    batch) -> (sum of the batch's unit losses, {name: sum over units} of extra figures to log); and
    evaluate(model, batches, rt) -> {"val_loss": ..., more figures}."""

    def grad_accum_steps(self, cfg, world_size):
        return grad_accum_steps(cfg, world_size)

    def count(self, batch):
        return (batch[1] != -1).sum()

    def __call__(self, forward_model, batch):
        x, y = batch
        _, mean_loss = forward_model(x, y)
        count = (y != -1).sum()
        # the model averages over this micro-batch's valid targets: turn it back into their sum
        # (where: a micro-batch without targets has a NaN mean and adds nothing, gradient included)
        return torch.where(count > 0, mean_loss * count, torch.zeros_like(mean_loss)), {}

    def evaluate(self, model, batches, rt):
        return {"val_loss": evaluate_loss(model, batches, rt)}

    def batch_summary(self, cfg, grad_accum, world_size):
        return (f"{cfg.total_batch_tokens:,} tokens per step = {cfg.micro_batch_size} sequences x {cfg.block_size} "
                f"tokens x {grad_accum} accumulation steps x {world_size} process(es)")


LM_LOSS = LanguageModelLoss()


# ----------------------------------------------------------------------------------------------
# One optimizer step

def train_step(model, optimizers, micro_batches, cfg, rt, scaler, forward_model=None, loss_fn=LM_LOSS, stats=None):
    """Forward and backward every micro-batch, then one optimizer step -> (loss, grad_norm, finite).

    model is the raw module (its parameters are stepped); forward_model the one that runs the
    forward pass (compiled and/or DDP-wrapped; model itself when None). loss_fn (LanguageModelLoss
    or gptkit.preference.DPOLoss) turns a micro-batch into the sum of its unit losses; the step
    divides by the units (loss_fn.count: target tokens, or pairs) of all micro-batches of all ranks. For
    pretraining that is the plain mean; for finetuning, where rows hold different numbers of answer
    tokens, it gives every token the same weight. stats: a dict that receives the step's mean of
    each extra figure loss_fn reports (DPO's rewards). loss, grad_norm and finite come back as
    device tensors: if the loss or the gradient is not finite, the update is skipped and finite is
    False. With AdamW in bf16 or fp32 the skip happens on the device (fused AdamW's found_inf), so
    the step never waits for the GPU and the host can queue the next step's work while this one
    runs; Muon and fp16's grad scaler need the answer on the host (one sync per step)."""
    import torch.distributed as dist
    forward_model = forward_model if forward_model is not None else model
    is_ddp = isinstance(forward_model, torch.nn.parallel.DistributedDataParallel)
    global_count = torch.stack([loss_fn.count(batch) for batch in micro_batches]).sum().float()
    if is_ddp:
        dist.all_reduce(global_count)
    global_count = global_count.clamp(min=1.0)
    # DDP averages gradients over ranks; scaling by world_size turns that average into the global sum
    grad_scale = rt.world_size if is_ddp else 1
    step_loss = torch.zeros((), device=global_count.device)
    sums = {}
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        # gradients are all-reduced once, in the backward of the last micro-batch
        sync = forward_model.no_sync() if is_ddp and not last else contextlib.nullcontext()
        with sync:
            with rt.autocast():
                loss_sum, batch_stats = loss_fn(forward_model, batch)
            loss = loss_sum / global_count
            scaler.scale(loss * grad_scale).backward()
        step_loss += loss.detach()
        for name, value in batch_stats.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float()
    if is_ddp:
        dist.all_reduce(step_loss)  # each rank holds its share of the global mean
    if stats is not None and sums:
        values = torch.stack(list(sums.values()))
        if is_ddp:
            dist.all_reduce(values)
        stats.update(zip(sums, values / global_count))
    for opt in optimizers:
        scaler.unscale_(opt)  # clip and measure the true gradient, not the fp16-scaled one
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if cfg.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm(grads)
    finite = torch.isfinite(step_loss)
    if not scaler.is_enabled():  # with fp16 the scaler skips steps with inf gradients itself and lowers its scale
        finite = finite & torch.isfinite(grad_norm)
    on_host = None  # bool(finite), read only if an optimizer needs it: a host sync (the same on every rank)
    for opt in optimizers:
        if isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] and not scaler.is_enabled():
            # the fused kernel leaves parameters, moments and step count alone where found_inf is 1
            opt.grad_scale, opt.found_inf = None, (~finite).float()
            opt.step()
        else:
            on_host = bool(finite) if on_host is None else on_host
            if on_host:
                scaler.step(opt)
    scaler.update()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return step_loss, grad_norm, finite


# ----------------------------------------------------------------------------------------------
# Evaluation and samples (always on the raw model: a compiled or DDP-wrapped one is never needed)

@torch.no_grad()
def evaluate_loss(model, batches, rt):
    """Mean loss over every valid target of the fixed val batches of all ranks."""
    was_training = model.training
    model.eval()
    dtype = torch.float32 if rt.device_type == "mps" else torch.float64  # MPS has no float64
    totals = torch.zeros(2, device=rt.device, dtype=dtype)  # (sum of token losses, tokens)
    for x, y in batches:
        with rt.autocast():
            _, mean_loss = model(x, y)
        count = (y != -1).sum()
        totals[0] += torch.where(count > 0, mean_loss.to(dtype) * count, torch.zeros((), device=rt.device, dtype=dtype))
        totals[1] += count
    if rt.ddp:
        import torch.distributed as dist
        dist.all_reduce(totals)
    model.train(was_training)
    return (totals[0] / totals[1].clamp(min=1)).item()


DEFAULT_PROMPTS = ["The meaning of life is", "Once upon a time,", "In a surprising discovery, scientists"]


def default_sample_prompts():
    """Base-model prompts: <|endoftext|> (a document starts) followed by some ordinary text."""
    from gptkit.tokenizer import get_tokenizer
    tokenizer = get_tokenizer()
    return [[tokenizer.eot] + tokenizer.encode(text) for text in DEFAULT_PROMPTS]


def sample_texts(model, rt, prompts, max_new_tokens, seed):
    """One continuation per prompt (list of ids), decoded; the same seed at every eval so samples
    are comparable across training, and a private generator so training's RNG is untouched."""
    from gptkit.generate import generate, make_generator
    from gptkit.tokenizer import get_tokenizer
    tokenizer = get_tokenizer()
    generator = make_generator(model, seed)
    texts = []
    for ids in prompts:
        new = list(generate(model, ids, max_new_tokens, temperature=1.0, top_k=50,
                            stop_tokens=(tokenizer.eot, tokenizer.end), generator=generator, autocast=rt.autocast))
        shown = ids[1:] if ids and ids[0] == tokenizer.eot else ids
        texts.append(tokenizer.decode(shown) + tokenizer.decode(new))
    return texts


# ----------------------------------------------------------------------------------------------
# The loop's pieces: each does one job and reads on its own; train() below puts them in order

def hellaswag_file(cfg):
    """The HellaSwag file, fetched and checked now, not hours into the run; None when it is off."""
    if cfg.hellaswag_interval <= 0:
        return None
    from gptkit.hellaswag import download_val, load_items
    try:
        path = cfg.hellaswag_data or download_val()
        load_items(path, cfg.hellaswag_limit)
    except (UserError, OSError) as e:
        raise ConfigError(f"{e} (or turn HellaSwag off: --hellaswag_interval=0)") from e
    return path


def wrap_for_training(model, cfg, rt):
    """The module that runs training's forward pass (compiled and/or DDP); evaluation and sampling use the raw model."""
    forward_model = model
    if cfg.compile:
        forward_model = torch.compile(model)
    if rt.ddp:
        from torch.nn.parallel import DistributedDataParallel
        forward_model = DistributedDataParallel(
            forward_model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None)
    return forward_model


def open_run_dir(cfg, rt, resumed_at):
    """Rank 0 makes out_dir, writes config.json and, on a resume (resumed_at: the step), drops log lines past it."""
    if not rt.master:
        return
    os.makedirs(cfg.out_dir, exist_ok=True)
    # left by a save a kill cut short: a checkpoint's can be gigabytes
    remove_temporaries(cfg.out_dir, r"ckpt\.pt|ckpt\.json|config\.json|log\.jsonl")
    # a resume writes it again: a full disk or a kill here keeps the old one whole
    atomic_write(os.path.join(cfg.out_dir, "config.json"),
                 lambda f: f.write(json.dumps(config_dict(cfg), indent=2).encode("utf-8")))
    print_config(cfg)
    if resumed_at is not None:
        truncate_log(cfg.out_dir, resumed_at)


class StopSignals:
    """SIGTERM (a scheduler's time limit, `kill`) or Ctrl-C while training: finish the step, save, exit
    cleanly. A second Ctrl-C stops at once. Used as `with StopSignals(rt) as signals:`."""

    def __init__(self, rt):
        self.rt, self.seen, self.previous = rt, [], {}
        self.group = None
        if rt.ddp:
            import torch.distributed as dist
            # the per-step stop flag is all-reduced between the processes' CPUs (gloo): reading the
            # result of an all-reduce on the GPU would make every step wait for the GPU
            self.group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def _on_signal(self, signum, frame):
        if self.seen and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.seen.append(signum)
        print0(f"\n{signal.Signals(signum).name} received: finishing this step, saving a checkpoint, then exiting")

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def should_stop(self, step, stop_step):
        """True on every rank at once when any rank got a signal or step is stop_step."""
        stop = bool(self.seen) or step == stop_step
        if self.rt.ddp:  # every rank must leave at the same step, or the others wait in all-reduce forever
            import torch.distributed as dist
            flag = torch.tensor([float(stop)])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
            stop = bool(flag.item() > 0)
        return stop

    def reason(self, stop_step):
        return signal.Signals(self.seen[0]).name if self.seen else f"stop_step={stop_step}"


class StepLog:
    """What the loop learns step by step and reports every log interval: the mean loss (and the loss
    function's extra figures) over the good steps since the last line, tokens/s, and the steps whose
    loss or gradient was not finite (skipped; several in a row stop the run).

    A step's `finite` flag lives on the device; reading it waits for the GPU, so the flags are read in
    one go where the loop needs them anyway (log and checkpoint time). A skipped step changed nothing
    on the device, so deciding about it a few steps late loses nothing. state() holds the sums of a
    part-done interval, so the first line after a resume averages the same steps as an uninterrupted run's."""

    def __init__(self, cfg, rt, model, logger, say, saved):
        self.cfg, self.rt, self.logger, self.say = cfg, rt, logger, say
        self.bad_in_row, self.skipped_steps = saved.get("bad_in_row", 0), saved.get("skipped_steps", 0)
        self.unread = []  # (step, finite, loss, grad_norm) not yet read on the host
        sums = {"loss": saved.get("loss_sum", 0.0), **saved.get("metric_sums", {})}
        self.sums = {k: torch.tensor(float(v), device=rt.device) for k, v in sums.items()}
        self.good_steps, self.tokens, self.start = saved.get("good_steps", 0), 0, time.time()
        self.peak_flops = device_peak_flops(torch.cuda.get_device_name(rt.device)) if rt.device_type == "cuda" else None
        self.flops_per_token = model.flops_per_token()

    def add(self, step, finite, loss, grad_norm, stats, tokens):
        self.unread.append((step, finite, loss, grad_norm))
        for name, value in {"loss": loss, **stats}.items():
            total = self.sums.setdefault(name, torch.zeros((), device=self.rt.device))
            total += torch.where(finite, value, 0.0)
        self.tokens += tokens

    def read_flags(self):
        """Count the good and skipped steps among the unread; raises NonFiniteLossError after max_bad_steps in a row."""
        flags = torch.stack([finite for _, finite, _, _ in self.unread]).tolist() if self.unread else []
        for (at_step, _, loss, grad_norm), ok in zip(self.unread, flags):
            if ok:
                self.bad_in_row = 0
                self.good_steps += 1
                continue
            self.bad_in_row += 1
            self.skipped_steps += 1
            self.logger.log(at_step, skipped_step=True, bad_steps_in_row=self.bad_in_row)
            self.say(f"step {at_step}: non-finite loss or gradient (loss {loss.item()}, grad norm "
                     f"{grad_norm.item()}): update skipped ({self.bad_in_row} in a row)")
            if self.bad_in_row >= self.cfg.max_bad_steps:
                raise NonFiniteLossError(
                    f"loss became non-finite {self.bad_in_row} steps in a row at step {at_step}; lower learning_rate "
                    f"(now {self.cfg.learning_rate}), raise warmup_steps, or set grad_clip=1.0, then resume. The "
                    f"last good checkpoint in {self.cfg.out_dir} is intact (not overwritten).")
        self.unread.clear()

    def write(self, step, tokens_seen, lr, grad_norm):
        """The log line of this interval (the only regular host sync with AdamW in bf16/fp32); starts the next."""
        self.rt.synchronize()
        self.read_flags()
        tokens_per_sec = self.tokens / max(time.time() - self.start, 1e-9)
        means = {k: (v / self.good_steps).item() if self.good_steps else float("nan") for k, v in self.sums.items()}
        metrics = {"loss": means.pop("loss"), **means, "lr": lr, "grad_norm": grad_norm.item(),
                   "tokens_per_sec": tokens_per_sec, "tokens_seen": tokens_seen}
        if self.peak_flops:
            metrics["mfu"] = self.flops_per_token * tokens_per_sec / (self.peak_flops * self.rt.world_size)
        if self.rt.device_type == "cuda":
            metrics["memory_gb"] = torch.cuda.max_memory_allocated(self.rt.device) / 1e9
        if self.skipped_steps:
            metrics["skipped_steps"] = self.skipped_steps
        self.logger.log(step, **metrics)
        extra = "".join(f" | {k} {v:.4f}" for k, v in means.items())
        self.say(f"step {step}/{self.cfg.max_steps} | loss {metrics['loss']:.4f}{extra} | lr {lr:.2e} | "
                 f"grad_norm {metrics['grad_norm']:.3f} | {tokens_per_sec:,.0f} tok/s"
                 + (f" | mfu {100 * metrics['mfu']:.1f}%" if "mfu" in metrics else "")
                 + (f" | mem {metrics['memory_gb']:.1f} GB" if "memory_gb" in metrics else ""))
        for total in self.sums.values():
            total.zero_()
        self.good_steps, self.tokens, self.start = 0, 0, time.time()
        return metrics

    def state(self):
        """Plain numbers for the checkpoint (log_state)."""
        return {"loss_sum": self.sums["loss"].item(), "good_steps": self.good_steps,
                "metric_sums": {k: v.item() for k, v in self.sums.items() if k != "loss"},
                "skipped_steps": self.skipped_steps, "bad_in_row": self.bad_in_row}


def run_eval(model, rt, cfg, loss_fn, val_batches, step, hellaswag_path, prompts, logger, say):
    """Val figures (loss_fn.evaluate), HellaSwag when due, samples -> logged and printed; returns the val figures."""
    metrics = loss_fn.evaluate(model, val_batches, rt)
    if hellaswag_path and step > 0 and (step % cfg.hellaswag_interval == 0 or step == cfg.max_steps):
        from gptkit.hellaswag import evaluate_hellaswag
        result = evaluate_hellaswag(model, hellaswag_path, rt, limit=cfg.hellaswag_limit)
        metrics.update({f"hellaswag_{k}": v for k, v in result.items()})
    texts = []
    if rt.master and prompts and step > 0:
        texts = sample_texts(model, rt, prompts, cfg.sample_tokens, cfg.seed)
    logger.log(step, **metrics, **({"samples": "\n---\n".join(texts)} if texts else {}))
    shown = {k: v for k, v in metrics.items() if not k.startswith("hellaswag_") or k == "hellaswag_acc_norm"}
    say(f"step {step}: " + " | ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    for text in texts:
        say(f"  sample: {text!r}")
    return metrics


# ----------------------------------------------------------------------------------------------
# The loop

def train(cfg, rt, model, train_loader, get_val_batches, loss_fn=LM_LOSS, kind="base", ckpt=None, sample_prompts=None):
    """Train model (raw, on rt.device) until cfg.max_steps -> a summary dict.

    train_loader: next_batch() -> a micro-batch for loss_fn ((x, y) with y = -1 where no loss is
    wanted, for LanguageModelLoss), plus state_dict() and load_state_dict(). get_val_batches(): the
    fixed list of val batches of this rank, called once at the first eval. loss_fn: what a batch
    costs (LM_LOSS: pretraining and SFT; dpo.py's DPOLoss). kind: "base" or "chat", stored in
    checkpoints. ckpt: a checkpoint to resume from (init_model's second result). sample_prompts:
    lists of ids to continue at each eval (default: a few text prompts). Raises NonFiniteLossError
    after max_bad_steps bad steps in a row."""
    from tqdm import tqdm
    if cfg.block_size > model.config.block_size:
        raise ConfigError(f"block_size={cfg.block_size} is longer than the model's context of "
                          f"{model.config.block_size}: use --block_size={model.config.block_size} or less")
    grad_accum = loss_fn.grad_accum_steps(cfg, rt.world_size)
    model.activation_checkpointing = cfg.activation_checkpointing
    model.train()
    optimizers = configure_optimizers(model, cfg, rt.device_type)
    scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.needs_grad_scaler)
    step, tokens_seen, best_val_loss, log_state = 0, 0, float("inf"), {}
    if ckpt is not None:
        step, tokens_seen, best_val_loss, log_state = restore_training_state(
            ckpt, cfg, rt, optimizers, scaler, train_loader, kind)
        print0(f"resuming from step {step} ({tokens_seen:,} tokens seen) in {cfg.out_dir}")
    if step >= cfg.max_steps:
        print0(f"nothing to do: the run is at step {step} and max_steps={cfg.max_steps}; raise max_steps to go on")
        return {"step": step, "best_val_loss": best_val_loss, "tokens_seen": tokens_seen}
    hellaswag_path = hellaswag_file(cfg)
    forward_model = wrap_for_training(model, cfg, rt)
    open_run_dir(cfg, rt, step if ckpt is not None else None)
    logger = MetricsLogger(cfg.out_dir, enabled=rt.master, wandb_log=cfg.wandb_log, wandb_project=cfg.wandb_project,
                           wandb_run_name=cfg.wandb_run_name or None, config=config_dict(cfg), resume=ckpt is not None)
    print0(f"{loss_fn.batch_summary(cfg, grad_accum, rt.world_size)}")
    val_batches = None
    prompts = sample_prompts if sample_prompts is not None else (default_sample_prompts() if cfg.sample_tokens else [])
    bar = tqdm(total=cfg.max_steps, initial=step, unit="step", dynamic_ncols=True, disable=not rt.master)

    def say(line):  # print above the progress bar, on rank 0 only (tqdm.write prints even when disabled)
        if rt.master:
            bar.write(line)

    def evaluate():
        nonlocal val_batches, best_val_loss
        val_batches = val_batches if val_batches is not None else get_val_batches()
        metrics = run_eval(model, rt, cfg, loss_fn, val_batches, step, hellaswag_path, prompts, logger, say)
        best_val_loss = min(best_val_loss, metrics["val_loss"])

    steps = StepLog(cfg, rt, model, logger, say, log_state)
    try:
        with StopSignals(rt) as signals:
            if ckpt is None:
                evaluate()  # the baseline the val curve starts from
            while step < cfg.max_steps:
                set_lr(optimizers, lr_multiplier(step, cfg))
                micro_batches = [train_loader.next_batch() for _ in range(grad_accum)]
                stats = {}
                loss, grad_norm, finite = train_step(model, optimizers, micro_batches, cfg, rt, scaler, forward_model,
                                                     loss_fn=loss_fn, stats=stats)
                step += 1
                tokens = sum(batch[0].numel() for batch in micro_batches) * rt.world_size  # padding included
                tokens_seen += tokens
                bar.update(1)
                steps.add(step, finite, loss, grad_norm, stats, tokens)
                if step % cfg.log_interval == 0 or step == cfg.max_steps:
                    metrics = steps.write(step, tokens_seen, optimizers[0].param_groups[0]["lr"], grad_norm)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
                # evaluate, then checkpoint (so the checkpoint holds this eval's best_val_loss)
                pause = time.time()
                if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                    evaluate()
                stop = signals.should_stop(step, cfg.stop_step)
                save_due = step % cfg.ckpt_interval == 0 or step == cfg.max_steps or stop
                if save_due:
                    steps.read_flags()
                # never during a run of skipped steps: the last checkpoint is the last good state
                if save_due and (steps.bad_in_row == 0 or stop):
                    save_training_state(cfg, rt, model, optimizers, scaler, train_loader, kind, step, tokens_seen,
                                        best_val_loss, steps.state())
                steps.start += time.time() - pause  # evals and saves stay out of tokens/s
                if stop and step < cfg.max_steps:
                    say(f"stopped at step {step} ({signals.reason(cfg.stop_step)}); checkpoint saved in "
                        f"{cfg.out_dir}; continue with --init_from=resume")
                    break
    finally:
        bar.close()
        logger.close()
    # stopped by a signal before the end: the script exits 128 + its number, so a scheduler requeues it
    stopped_by = int(signals.seen[0]) if signals.seen and step < cfg.max_steps else 0
    return {"step": step, "best_val_loss": best_val_loss, "tokens_seen": tokens_seen,
            "skipped_steps": steps.skipped_steps, "stopped_by": stopped_by}
