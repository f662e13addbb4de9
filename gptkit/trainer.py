"""
The one training loop, shared by train.py (pretraining) and finetune.py (instruction finetuning).
The two differ only in how the model is built and which batch source they hand to train().

    model, ckpt = init_model(cfg, rt)                  # scratch | resume | checkpoint | Hugging Face GPT-2
    train(cfg, rt, model, train_loader, get_val_batches, kind="base", ckpt=ckpt)

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

import torch

from gptkit.configurator import BaseConfig, ConfigError, UserError, config_dict, print_config
from gptkit.checkpoint import (atomic_write, remove_temporaries, restore_training_state, save_training_state,
                               truncate_log)
from gptkit.system import MetricsLogger, device_peak_flops, print0


@dataclass
class TrainConfig(BaseConfig):
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
        tokens_per_micro_batch = self.micro_batch_size * self.block_size
        if self.micro_batch_size < 1 or self.block_size < 1:
            problems.append("micro_batch_size and block_size must be positive")
        elif self.total_batch_tokens % tokens_per_micro_batch:
            problems.append(f"total_batch_tokens={self.total_batch_tokens} is not a multiple of "
                            f"micro_batch_size*block_size={tokens_per_micro_batch}")
        elif self.total_batch_tokens < 1:
            problems.append(f"total_batch_tokens={self.total_batch_tokens} must be positive (524288 is usual)")
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
    The data's tokenizer becomes the process's; a model made with another one is refused."""
    from model import GPT, GPTConfig
    from gptkit.checkpoint import CKPT_NAME, build_model, load_checkpoint, saved_step
    from gptkit.hf import hf_run_info, is_hf_folder, is_hub_name, load_hf_gpt2
    from gptkit.tokenizer import check_same_tokenizer, checkpoint_tokenizer, use_tokenizer
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
# One optimizer step

def train_step(model, optimizers, micro_batches, cfg, rt, scaler, forward_model=None):
    """Forward and backward every micro-batch, then one optimizer step -> (loss, grad_norm, finite).

    model is the raw module (its parameters are stepped); forward_model the one that runs the
    forward pass (compiled and/or DDP-wrapped; model itself when None). The loss is weighted by
    tokens over the whole step: each micro-batch contributes the sum of its token losses divided by
    the number of valid targets (y != -1) in all micro-batches of all ranks. For pretraining that is
    the plain mean; for finetuning, where rows hold different numbers of answer tokens, it gives
    every token the same weight. loss, grad_norm and finite come back as device tensors: if the loss
    or the gradient is not finite, the update is skipped and finite is False. With AdamW in bf16 or
    fp32 the skip happens on the device (fused AdamW's found_inf), so the step never waits for the
    GPU and the host can queue the next step's work while this one runs; Muon and fp16's grad
    scaler need the answer on the host (one sync per step)."""
    import torch.distributed as dist
    forward_model = forward_model if forward_model is not None else model
    is_ddp = isinstance(forward_model, torch.nn.parallel.DistributedDataParallel)
    counts = [(y != -1).sum() for _, y in micro_batches]
    global_count = torch.stack(counts).sum().float()
    if is_ddp:
        dist.all_reduce(global_count)
    global_count = global_count.clamp(min=1.0)
    # DDP averages gradients over ranks; scaling by world_size turns that average into the global sum
    grad_scale = rt.world_size if is_ddp else 1
    step_loss = torch.zeros((), device=global_count.device)
    for i, (x, y) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        # gradients are all-reduced once, in the backward of the last micro-batch
        sync = forward_model.no_sync() if is_ddp and not last else contextlib.nullcontext()
        with sync:
            with rt.autocast():
                _, mean_loss = forward_model(x, y)
            # the model averages over this micro-batch's valid targets: turn it back into their sum
            # (where: a micro-batch without targets has a NaN mean and adds nothing, gradient included)
            loss_sum = torch.where(counts[i] > 0, mean_loss * counts[i], torch.zeros_like(mean_loss))
            loss = loss_sum / global_count
            scaler.scale(loss * grad_scale).backward()
        step_loss += loss.detach()
    if is_ddp:
        dist.all_reduce(step_loss)  # each rank holds its share of the global mean
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
# The loop

def train(cfg, rt, model, train_loader, get_val_batches, kind="base", ckpt=None, sample_prompts=None):
    """Train model (raw, on rt.device) until cfg.max_steps -> a summary dict.

    train_loader: next_batch() -> (x, y) with y = -1 where no loss is wanted, plus state_dict() and
    load_state_dict(). get_val_batches(): the fixed list of val (x, y) of this rank, called once at
    the first eval. kind: "base" or "chat", stored in checkpoints. ckpt: a checkpoint to resume
    from (init_model's second result). sample_prompts: lists of ids to continue at each eval
    (default: a few text prompts). Raises NonFiniteLossError after max_bad_steps bad steps in a row."""
    from tqdm import tqdm
    if cfg.block_size > model.config.block_size:
        raise ConfigError(f"block_size={cfg.block_size} is longer than the model's context of "
                          f"{model.config.block_size}: use --block_size={model.config.block_size} or less")
    grad_accum = grad_accum_steps(cfg, rt.world_size)
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

    hellaswag_path = None
    if cfg.hellaswag_interval > 0:  # fetch and check the file now, not hours into the run
        from gptkit.hellaswag import download_val, load_items
        try:
            hellaswag_path = cfg.hellaswag_data or download_val()
            load_items(hellaswag_path, cfg.hellaswag_limit)
        except (UserError, OSError) as e:
            raise ConfigError(f"{e} (or turn HellaSwag off: --hellaswag_interval=0)") from e

    # the module that runs training's forward pass; evaluation and sampling use the raw model
    forward_model = model
    if cfg.compile:
        forward_model = torch.compile(model)
    if rt.ddp:
        from torch.nn.parallel import DistributedDataParallel
        forward_model = DistributedDataParallel(
            forward_model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None)

    if rt.master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        # left by a save a kill cut short: a checkpoint's can be gigabytes
        remove_temporaries(cfg.out_dir, r"ckpt\.pt|ckpt\.json|config\.json|log\.jsonl")
        # a resume writes it again: a full disk or a kill here keeps the old one whole
        atomic_write(os.path.join(cfg.out_dir, "config.json"),
                     lambda f: f.write(json.dumps(config_dict(cfg), indent=2).encode("utf-8")))
        print_config(cfg)
        if ckpt is not None:
            truncate_log(cfg.out_dir, step)
    logger = MetricsLogger(cfg.out_dir, enabled=rt.master, wandb_log=cfg.wandb_log, wandb_project=cfg.wandb_project,
                           wandb_run_name=cfg.wandb_run_name or None, config=config_dict(cfg), resume=ckpt is not None)
    print0(f"{cfg.total_batch_tokens:,} tokens per step = {cfg.micro_batch_size} sequences x {cfg.block_size} tokens"
           f" x {grad_accum} accumulation steps x {rt.world_size} process(es)")
    peak_flops = device_peak_flops(torch.cuda.get_device_name(rt.device)) if rt.device_type == "cuda" else None
    flops_per_token = model.flops_per_token()
    val_batches = None
    prompts = sample_prompts if sample_prompts is not None else (default_sample_prompts() if cfg.sample_tokens else [])

    # SIGTERM (a scheduler's time limit, `kill`) or Ctrl-C: finish the step, save, exit cleanly.
    # A second Ctrl-C stops at once.
    signals_seen = []

    def on_signal(signum, frame):
        if signals_seen and signum == signal.SIGINT:
            raise KeyboardInterrupt
        signals_seen.append(signum)
        print0(f"\n{signal.Signals(signum).name} received: finishing this step, saving a checkpoint, then exiting")

    def run_eval():
        nonlocal val_batches, best_val_loss
        if val_batches is None:
            val_batches = get_val_batches()
        metrics = {"val_loss": evaluate_loss(model, val_batches, rt)}
        best_val_loss = min(best_val_loss, metrics["val_loss"])
        if cfg.hellaswag_interval > 0 and step > 0 and (step % cfg.hellaswag_interval == 0 or step == cfg.max_steps):
            from gptkit.hellaswag import evaluate_hellaswag
            result = evaluate_hellaswag(model, hellaswag_path, rt, limit=cfg.hellaswag_limit)
            metrics.update({f"hellaswag_{k}": v for k, v in result.items()})
        texts = []
        if rt.master and prompts and step > 0:
            texts = sample_texts(model, rt, prompts, cfg.sample_tokens, cfg.seed)
            metrics["samples"] = "\n---\n".join(texts)
        logger.log(step, **metrics)
        say(f"step {step}: val_loss {metrics['val_loss']:.4f}"
            + (f" | hellaswag acc_norm {metrics['hellaswag_acc_norm']:.4f}" if "hellaswag_acc_norm" in metrics else ""))
        for text in texts:
            say(f"  sample: {text!r}")

    previous_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    bar = tqdm(total=cfg.max_steps, initial=step, unit="step", dynamic_ncols=True, disable=not rt.master)

    def say(line):  # print above the progress bar, on rank 0 only (tqdm.write prints even when disabled)
        if rt.master:
            bar.write(line)

    stop_group = None
    if rt.ddp:
        import torch.distributed as dist
        # the per-step stop flag is all-reduced between the processes' CPUs (gloo): reading the
        # result of an all-reduce on the GPU would make every step wait for the GPU
        stop_group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    bad_in_row, skipped_steps = log_state.get("bad_in_row", 0), log_state.get("skipped_steps", 0)
    # Steps whose `finite` flag the host has not read yet: reading it waits for the GPU, so it is read
    # in one go where the loop needs it anyway (log and checkpoint time). A skipped step changed
    # nothing on the device, so deciding about it a few steps late loses nothing.
    unread = []  # (step, finite, loss, grad_norm)
    # the loss summed over the good steps since the last log line (a resume restores the sum, so the
    # first line after it averages the same steps as an uninterrupted run's)
    interval_loss = torch.tensor(float(log_state.get("loss_sum", 0.0)), device=rt.device)
    interval_good_steps, interval_tokens = log_state.get("good_steps", 0), 0

    def read_finite_flags():
        nonlocal bad_in_row, skipped_steps, interval_good_steps
        flags = torch.stack([finite for _, finite, _, _ in unread]).tolist() if unread else []
        for (at_step, _, loss, grad_norm), ok in zip(unread, flags):
            if ok:
                bad_in_row = 0
                interval_good_steps += 1
                continue
            bad_in_row += 1
            skipped_steps += 1
            logger.log(at_step, skipped_step=True, bad_steps_in_row=bad_in_row)
            say(f"step {at_step}: non-finite loss or gradient (loss {loss.item()}, grad norm "
                f"{grad_norm.item()}): update skipped ({bad_in_row} in a row)")
            if bad_in_row >= cfg.max_bad_steps:
                raise NonFiniteLossError(
                    f"loss became non-finite {bad_in_row} steps in a row at step {at_step}; lower learning_rate "
                    f"(now {cfg.learning_rate}), raise warmup_steps, or set grad_clip=1.0, then resume. The "
                    f"last good checkpoint in {cfg.out_dir} is intact (not overwritten).")
        unread.clear()
    try:
        if ckpt is None:
            run_eval()  # the baseline the val curve starts from
        interval_start = time.time()
        while step < cfg.max_steps:
            # ---- one optimizer step
            set_lr(optimizers, lr_multiplier(step, cfg))
            micro_batches = [train_loader.next_batch() for _ in range(grad_accum)]
            loss, grad_norm, finite = train_step(model, optimizers, micro_batches, cfg, rt, scaler, forward_model)
            step += 1
            tokens_seen += cfg.total_batch_tokens
            interval_tokens += cfg.total_batch_tokens
            bar.update(1)
            unread.append((step, finite, loss, grad_norm))
            interval_loss += torch.where(finite, loss, 0.0)

            # ---- log: the only regular host sync (with AdamW in bf16/fp32)
            if step % cfg.log_interval == 0 or step == cfg.max_steps:
                rt.synchronize()
                read_finite_flags()
                tokens_per_sec = interval_tokens / max(time.time() - interval_start, 1e-9)
                mean_loss = (interval_loss / interval_good_steps).item() if interval_good_steps else float("nan")
                metrics = {"loss": mean_loss,
                           "lr": optimizers[0].param_groups[0]["lr"], "grad_norm": grad_norm.item(),
                           "tokens_per_sec": tokens_per_sec, "tokens_seen": tokens_seen}
                if peak_flops:
                    metrics["mfu"] = flops_per_token * tokens_per_sec / (peak_flops * rt.world_size)
                if rt.device_type == "cuda":
                    metrics["memory_gb"] = torch.cuda.max_memory_allocated(rt.device) / 1e9
                if skipped_steps:
                    metrics["skipped_steps"] = skipped_steps
                logger.log(step, **metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
                say(f"step {step}/{cfg.max_steps} | loss {metrics['loss']:.4f} | lr {metrics['lr']:.2e} | "
                          f"grad_norm {metrics['grad_norm']:.3f} | {tokens_per_sec:,.0f} tok/s"
                          + (f" | mfu {100 * metrics['mfu']:.1f}%" if "mfu" in metrics else "")
                          + (f" | mem {metrics['memory_gb']:.1f} GB" if "memory_gb" in metrics else ""))
                interval_loss.zero_()
                interval_good_steps, interval_tokens, interval_start = 0, 0, time.time()

            # ---- evaluate, then checkpoint (so the checkpoint holds this eval's best_val_loss)
            pause = time.time()
            if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                run_eval()
            stop = bool(signals_seen) or step == cfg.stop_step
            if rt.ddp:  # every rank must leave at the same step, or the others wait in all-reduce forever
                flag = torch.tensor([float(stop)])
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=stop_group)
                stop = bool(flag.item() > 0)
            save_due = step % cfg.ckpt_interval == 0 or step == cfg.max_steps or stop
            if save_due:
                read_finite_flags()
            # never during a run of skipped steps: the last checkpoint is the last good state
            if save_due and (bad_in_row == 0 or stop):
                log_state = {"loss_sum": interval_loss.item(), "good_steps": interval_good_steps,
                             "skipped_steps": skipped_steps, "bad_in_row": bad_in_row}
                save_training_state(cfg, rt, model, optimizers, scaler, train_loader, kind, step, tokens_seen,
                                    best_val_loss, log_state)
            interval_start += time.time() - pause  # evals and saves stay out of tokens/s
            if stop and step < cfg.max_steps:
                why = signal.Signals(signals_seen[0]).name if signals_seen else f"stop_step={cfg.stop_step}"
                say(f"stopped at step {step} ({why}); checkpoint saved in {cfg.out_dir}; "
                          "continue with --init_from=resume")
                break
    finally:
        bar.close()
        logger.close()
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
    return {"step": step, "best_val_loss": best_val_loss, "tokens_seen": tokens_seen, "skipped_steps": skipped_steps}
