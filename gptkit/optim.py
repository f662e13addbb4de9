"""
Optimizers, the learning-rate schedule and one optimizer step: what the training loop (gptkit/trainer.py)
runs each step, as plain functions, so bench.py times exactly the step the loop runs.

    optimizers = configure_optimizers(model, cfg, rt.device_type)
    set_lr(optimizers, lr_multiplier(step, cfg))
    loss, grad_norm, finite = train_step(model, optimizers, micro_batches, cfg, rt, scaler, forward_model, loss_fn)
"""

import contextlib
import math

import torch
import torch.distributed as dist

from gptkit.losses import LM_LOSS


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
        optimizers.append(torch.optim.Muon(hidden, lr=cfg.muon_learning_rate, weight_decay=cfg.muon_weight_decay))
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
