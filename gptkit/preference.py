"""
Direct Preference Optimization (Rafailov et al. 2023): the loss, the pair batches and the frozen
reference, for dpo.py. The training loop is gptkit/trainer.py's; dpo.py hands it a PairLoader and a
DPOLoss, as finetune.py hands it an SFTLoader and LM_LOSS.

Data: prepare_instruct.py writes preference pairs in the SFT format of gptkit/sft.py with meta
"pairs": true: conversation 2i is pair i's chosen answer, 2i+1 its rejected one, each rendered
in full (prompt + answer) with the loss mask on the answer's tokens and its closing <|end|>.

For pair i with prompt x, chosen y_w, rejected y_l, policy pi and reference ref, logp is the summed
log-probability of the answer tokens (the masked ones) given the prompt:
    chosen_logratio   = logp_pi(y_w|x) - logp_ref(y_w|x)        rewards/chosen   = beta * chosen_logratio
    rejected_logratio = logp_pi(y_l|x) - logp_ref(y_l|x)        rewards/rejected = beta * rejected_logratio
    d = chosen_logratio - rejected_logratio
    sigmoid: -(1 - eps) * logsigmoid(beta * d) - eps * logsigmoid(-beta * d)   (eps = label_smoothing: cDPO)
    ipo:     (d' - 1 / (2 beta))^2, d' the logratios divided by their answers' token counts (as trl)
    + rpo_alpha * the mean NLL of the chosen answers' tokens (an SFT term that keeps them likely)
These are trl's DPOTrainer figures (tests/test_dpo.py compares them on the same model and pairs).

The reference is the starting model, frozen. Its log-probs do not change during training, so they
are computed once at the start (reference_logps: one forward pass over the pairs, split over the
processes) and saved in <out_dir>/reference_logps.npz, which a resume reads: the reference model
is never in memory while training, and each step runs the policy only (docs/benchmarks.md). With
LoRA (--lora_rank) the reference is the policy with its adapters off (gptkit/lora.py's
adapters_disabled): the starting model, computed the same way.
"""

import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from gptkit.configurator import ConfigError
from gptkit.data import check_loader_args
from gptkit.files import atomic_write
from gptkit.lora import adapters_disabled
from gptkit.losses import token_logps
from gptkit.sft import SFTDataError, read_meta, read_sft_split
from gptkit.system import print0

REFERENCE_NAME = "reference_logps.npz"
FIGURES = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected"]  # logged as trl's DPOTrainer names them


# ----------------------------------------------------------------------------- pairs

def read_pairs(data_dir, split):
    """-> (ids, mask, offsets, n_pairs) of a preference split; refuses SFT data and empty splits."""
    meta = read_meta(data_dir)
    if not meta.get("pairs"):
        raise SFTDataError(f"{data_dir} holds instruction data, not preference pairs: prepare pairs (sources with "
                           "prompt/chosen/rejected) with prepare_instruct.py config/dpo.py into another data_dir")
    ids, mask, offsets = read_sft_split(data_dir, split)
    n_pairs = (len(offsets) - 1) // 2
    if n_pairs == 0:
        raise SFTDataError(f"the {split} split of {data_dir} holds no preference pairs: add data, or (val) "
                           "re-run prepare_instruct.py with a larger val_fraction")
    return ids, mask, offsets, n_pairs


def pair_rows(ids, mask, offsets, pairs, device):
    """Pairs (indices) -> (x, y): (2B, L) int64, chosen rows first, then rejected rows, in the order of
    pairs; y = -1 off the answers and on padding. L is the longest sequence of the batch less one:
    padding to the batch, not to block_size (a causal model's log-probs ignore what follows them)."""
    convs = [2 * p for p in pairs] + [2 * p + 1 for p in pairs]
    length = max(int(offsets[c + 1] - offsets[c]) for c in convs) - 1
    x = np.zeros((len(convs), length), dtype=np.int64)  # padding: any id the vocabulary has, never scored
    y = np.full((len(convs), length), -1, dtype=np.int64)
    for row, c in enumerate(convs):
        a, b = int(offsets[c]), int(offsets[c + 1])
        seq = ids[a:b].astype(np.int64)
        x[row, :b - a - 1] = seq[:-1]
        y[row, :b - a - 1] = np.where(mask[a + 1:b] == 1, seq[1:], -1)
    return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)


def _check_fits(offsets, block_size, data_dir):
    longest = int(np.diff(offsets).max())
    if longest > block_size + 1:
        raise SFTDataError(f"{data_dir} holds an answer of {longest} tokens with its prompt, longer than "
                           f"block_size+1={block_size + 1}: re-run prepare_instruct.py with --block_size={block_size}")


class PairLoader:
    """Endless stream of micro-batches (x, y, ref) of batch_size pairs: x, y as pair_rows, ref (2B,) the
    reference log-probs of those rows. Each epoch visits the pairs in a new order (seed, epoch); global
    pair g goes to rank g % world_size. state_dict() is the position: a resume gets the same batches."""

    def __init__(self, data_dir, split, batch_size, block_size, reference, rank=0, world_size=1, seed=1337,
                 mode="random", device="cpu"):
        check_loader_args(mode, rank, world_size)
        self.ids, self.mask, self.offsets, self.n_pairs = read_pairs(data_dir, split)
        _check_fits(self.offsets, block_size, data_dir)
        self.reference = torch.as_tensor(reference, dtype=torch.float32)  # (n_pairs, 2)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.mode, self.device = seed, mode, device
        self.epoch, self.pos = 0, 0  # next global pair: position pos of epoch's order
        self.exact_resume = True

    def _order(self, epoch):
        if self.mode == "random":
            return np.random.default_rng([self.seed, epoch]).permutation(self.n_pairs)
        return np.arange(self.n_pairs)

    def next_batch(self):
        mine = []
        order = self._order(self.epoch)
        for g in range(self.batch_size * self.world_size):
            if g % self.world_size == self.rank:
                mine.append(int(order[self.pos]))
            self.pos += 1
            if self.pos == self.n_pairs:
                self.epoch, self.pos = self.epoch + 1, 0
                order = self._order(self.epoch)
        return batch_of(self.ids, self.mask, self.offsets, mine, self.reference, self.device)

    def _identity(self):
        return {"mode": self.mode, "seed": self.seed, "world_size": self.world_size, "pairs": self.n_pairs}

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos, **self._identity()}

    def load_state_dict(self, state):
        self.exact_resume = all(state.get(key) == value for key, value in self._identity().items())
        self.epoch, self.pos = int(state["epoch"]), min(int(state["pos"]), self.n_pairs - 1)


def batch_of(ids, mask, offsets, pairs, reference, device):
    x, y = pair_rows(ids, mask, offsets, pairs, device)
    ref = torch.cat([reference[pairs, 0], reference[pairs, 1]]).to(device)
    return x, y, ref


def val_pair_batches(data_dir, batch_size, eval_tokens, reference, rank=0, world_size=1, device="cpu"):
    """The fixed val micro-batches of this rank: the first val pairs (file order) up to eval_tokens
    tokens (at least one pair), global pair g to rank g % world_size."""
    ids, mask, offsets, n_pairs = read_pairs(data_dir, "val")
    sizes = offsets[2:2 * n_pairs + 1:2] - offsets[0:2 * n_pairs:2]  # chosen + rejected tokens per pair
    n = max(1, int(np.searchsorted(np.cumsum(sizes), eval_tokens, side="right")))
    mine = list(range(rank, n, world_size))
    return [batch_of(ids, mask, offsets, mine[i:i + batch_size], torch.as_tensor(reference, dtype=torch.float32),
                     device) for i in range(0, len(mine), batch_size)]


# ----------------------------------------------------------------------------- log-probs and the reference

def _sum_dtype(rt):
    return torch.float32 if rt.device_type == "mps" else torch.float64  # MPS has no float64


def sequence_logps(model, x, y):
    """-> (summed log-prob of each row's targets (y != -1), their count), both (N,)."""
    return token_logps(model, x, y).sum(1), (y != -1).sum(1)


@torch.no_grad()
def reference_logps(model, data_dir, split, batch_size, rt):
    """Summed answer log-probs of the model as it is now, for every pair of the split -> (n_pairs, 2)
    float32 numpy (chosen, rejected). Each process scores pairs rank::world_size; one all-reduce joins them."""
    ids, mask, offsets, n_pairs = read_pairs(data_dir, split)
    was_training = model.training
    model.eval()
    out = torch.zeros(n_pairs, 2, dtype=_sum_dtype(rt), device=rt.device)
    mine = list(range(rt.rank, n_pairs, rt.world_size))
    for i in range(0, len(mine), batch_size):
        pairs = mine[i:i + batch_size]
        x, y = pair_rows(ids, mask, offsets, pairs, rt.device)
        with rt.autocast():
            logps, _ = sequence_logps(model, x, y)
        out[pairs] = logps.to(out.dtype).view(2, -1).t()
    if rt.ddp:
        dist.all_reduce(out)
    model.train(was_training)
    return out.float().cpu().numpy()


def load_or_compute_reference(model, cfg, rt, resuming):
    """{split: (n_pairs, 2)}: read from <out_dir>/reference_logps.npz on a resume, else computed now
    from the starting model and saved there (rank 0, atomically) before training changes it."""
    path = os.path.join(cfg.out_dir, REFERENCE_NAME)
    counts = {split: read_pairs(cfg.data_dir, split)[3] for split in ("train", "val")}
    if resuming:
        if not os.path.exists(path):
            raise ConfigError(f"init_from=resume, but {path} (the reference log-probs) is missing: start the run "
                              f"again from its starting checkpoint into a new out_dir")
        with np.load(path) as saved:
            reference = {split: saved[split] for split in counts}
        for split, n in counts.items():
            if reference[split].shape != (n, 2):
                raise ConfigError(f"{path} holds reference log-probs for {len(reference[split])} {split} pairs but "
                                  f"{cfg.data_dir} has {n}: the data changed; start a new run (new out_dir)")
        return reference
    start = time.time()
    # with LoRA the reference is the base, adapters off: the starting model (B = 0 makes them equal at
    # step 0, but this does not rest on it), and no second copy of the model
    with adapters_disabled(model):
        reference = {split: reference_logps(model, cfg.data_dir, split, cfg.micro_batch_size, rt) for split in counts}
    print0(f"reference log-probs of {counts['train']:,} train and {counts['val']:,} val pairs in "
           f"{time.time() - start:.1f}s (computed once, saved in {path})")
    if rt.master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        atomic_write(path, lambda f: np.savez(f, **reference))
    return reference


# ----------------------------------------------------------------------------- the loss

class DPOLoss:
    """The loss dpo.py hands the training loop (the interface of gptkit/losses.py's LanguageModelLoss).
    A step averages over pairs; extra figures are logged under trl's names."""

    def __init__(self, beta=0.1, loss_type="sigmoid", label_smoothing=0.0, rpo_alpha=0.0):
        self.beta, self.loss_type = beta, loss_type
        self.label_smoothing, self.rpo_alpha = label_smoothing, rpo_alpha

    def grad_accum_steps(self, cfg, world_size):
        per_pass = cfg.micro_batch_size * world_size
        if cfg.total_batch_pairs % per_pass:
            raise ConfigError(f"total_batch_pairs={cfg.total_batch_pairs} is not a multiple of micro_batch_size * "
                              f"processes = {cfg.micro_batch_size} * {world_size}: change one of them")
        return cfg.total_batch_pairs // per_pass

    def batch_summary(self, cfg, grad_accum, world_size):
        return (f"{cfg.total_batch_pairs} pairs per step = {cfg.micro_batch_size} pairs (2 sequences each) x "
                f"{grad_accum} accumulation steps x {world_size} process(es)")

    def count(self, batch):
        return torch.tensor(batch[0].size(0) // 2, device=batch[0].device)

    def pair_losses(self, logps, n_tokens, ref):
        """logps, n_tokens, ref: (2B,) chosen then rejected -> (losses (B,), {figure: (B,)})."""
        chosen, rejected = logps.float().chunk(2)
        ref_chosen, ref_rejected = ref.float().chunk(2)
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        if self.loss_type == "ipo":
            n_chosen, n_rejected = n_tokens.clamp(min=1).chunk(2)
            delta = chosen_ratio / n_chosen - rejected_ratio / n_rejected
            losses = (delta - 1 / (2 * self.beta)) ** 2
        else:
            z = self.beta * (chosen_ratio - rejected_ratio)
            losses = -(1 - self.label_smoothing) * F.logsigmoid(z) - self.label_smoothing * F.logsigmoid(-z)
        chosen_rewards, rejected_rewards = (self.beta * chosen_ratio).detach(), (self.beta * rejected_ratio).detach()
        figures = {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
                   "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
                   "rewards/margins": chosen_rewards - rejected_rewards,
                   "logps/chosen": chosen.detach(), "logps/rejected": rejected.detach()}
        return losses, figures

    def __call__(self, forward_model, batch):
        x, y, ref = batch
        logps, n_tokens = sequence_logps(forward_model, x, y)
        losses, figures = self.pair_losses(logps, n_tokens, ref)
        loss_sum = losses.sum()
        if self.rpo_alpha:
            # the chosen answers' mean token NLL over this micro-batch, as trl's "sft" loss, once per pair
            chosen_tokens = n_tokens.chunk(2)[0].sum().clamp(min=1)
            loss_sum = loss_sum + self.rpo_alpha * len(losses) * (-logps.float().chunk(2)[0].sum() / chosen_tokens)
        return loss_sum, {name: value.sum() for name, value in figures.items()}

    @torch.no_grad()
    def evaluate(self, model, batches, rt):
        """val_loss and the val_ figures over the fixed val pairs of all ranks."""
        was_training = model.training
        model.eval()
        names = ["val_loss", *(f"val_{name}" for name in FIGURES)]
        totals = torch.zeros(len(names) + 1, dtype=_sum_dtype(rt), device=rt.device)  # + the pair count
        for batch in batches:  # a rank may have none (fewer val pairs than processes)
            with rt.autocast():
                loss_sum, figures = self(model, batch)
            values = [loss_sum.float(), *(figures[f] for f in FIGURES), self.count(batch).float()]
            totals += torch.stack(values).to(totals.dtype)
        if rt.ddp:
            dist.all_reduce(totals)
        model.train(was_training)
        return {name: (value / totals[-1].clamp(min=1)).item() for name, value in zip(names, totals[:-1])}
