"""
The losses the training loop is handed. Pretraining and SFT share LanguageModelLoss (LM_LOSS);
dpo.py hands gptkit/preference.py's DPOLoss, which has the same five methods. A new objective is a
new class with them, passed to train(..., loss_fn=...): the loop itself never changes.

    grad_accum_steps(cfg, world_size)        micro-batches per optimizer step and process
    batch_summary(cfg, grad_accum, world_size)   the line that says what a step holds
    count(batch)                             the units a step averages over (target tokens; DPO: pairs)
    __call__(forward_model, batch)           -> (sum of the batch's unit losses, {name: sum} of extra figures)
    evaluate(model, batches, rt)             -> {"val_loss": ..., more figures}
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from gptkit.configurator import ConfigError


def grad_accum_steps(cfg, world_size):
    """Micro-batches per optimizer step on each process, so that a step holds total_batch_tokens."""
    tokens_per_pass = cfg.micro_batch_size * cfg.block_size * world_size
    if cfg.total_batch_tokens % tokens_per_pass:
        raise ConfigError(f"total_batch_tokens={cfg.total_batch_tokens} is not a multiple of micro_batch_size * "
                          f"block_size * processes = {cfg.micro_batch_size} * {cfg.block_size} * {world_size} = "
                          f"{tokens_per_pass}: change micro_batch_size or total_batch_tokens (a power of two "
                          "such as 524288 divides evenly for power-of-two batch sizes and GPU counts)")
    return cfg.total_batch_tokens // tokens_per_pass


class LanguageModelLoss:
    """Next-token cross-entropy on every target that is not -1, weighted by token over the whole step
    (batches are (x, y), y = -1 where no loss is wanted)."""

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


def token_logps(model, x, y, temperature=1.0):
    """Log-probability of each target (y != -1; 0 elsewhere) -> (N, T), for the losses that need it
    per token or per answer (DPO, GRPO; the model's chunked loss gives one mean). The logits are built
    here, in fp32 for the softmax, divided by the temperature the answers were sampled at (GRPO's)."""
    logits, _ = model(x)  # (N, T, V)
    logits = logits.float() / temperature
    return -F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1, reduction="none").view_as(y)


# Evaluation always runs on the raw model: a compiled or DDP-wrapped one is never needed

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
        dist.all_reduce(totals)
    model.train(was_training)
    return (totals[0] / totals[1].clamp(min=1)).item()
