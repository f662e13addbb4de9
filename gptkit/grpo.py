"""
Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath) on rewards a program checks, for
rl.py. The training loop is gptkit/trainer.py's: rl.py hands it a RolloutLoader (the batch source)
and a GRPOLoss, as dpo.py hands it a PairLoader and a DPOLoss.

A step: prompts_per_step prompts, group_size answers to each, sampled from the current policy
through gptkit/engine.py (one continuous batch with the KV cache, each prompt prefilled once for its
group). Each answer gets a reward (gptkit/rewards.py); its advantage is its reward against its own
group's, A = (r - mean(r_group)) / (std(r_group) + 1e-4) (scale_rewards=group; batch: the std of the
step; none: no division, Dr. GRPO). Every token of an answer, its closing <|end|> included, carries
its answer's advantage in the clipped objective (PPO's, on the sampling distribution at the
sampling temperature):
    ratio = exp(logp - logp_old)      loss per token = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A)
                                      (+ beta * ratio * KL(policy || reference) with beta > 0: the k3
                                      estimator, weighted by the ratio so that its gradient is the KL's)
logp_old is the policy that sampled: with num_iterations=1 (one optimizer step per batch of samples,
the default) it is logp itself, detached, so ratio = 1 and the gradient is -A * grad logp; with
num_iterations=N each batch of samples is trained on for N steps and logp_old is computed once,
when it is sampled. The token losses are averaged as loss_type says:
    dapo     over every answer token of the step (token-level normalisation; trl's default)
    grpo     over each answer's tokens, then over the answers (the paper's)
    dr_grpo  each answer's sum divided by max_new_tokens, then over the answers (Dr. GRPO)
These are trl's GRPOTrainer formulas, figures and defaults (tests/test_rl.py compares the advantages
and the loss with GRPOTrainer's on the same prompts, answers and model).

The reference (the starting model) gives the KL to the start, logged every step whether or not beta
uses it: with LoRA it is the policy with its adapters off (gptkit/lora.py), without it a frozen copy
(a resumed run is given it again, loaded from the starting model's path, which its checkpoint keeps).
"""

import copy

import numpy as np
import torch
import torch.distributed as dist

from gptkit.configurator import ConfigError
from gptkit.engine import Engine, Job, answer_all
from gptkit.lora import adapters_disabled, settings_of
from gptkit.losses import token_logps
from gptkit.records import BadRecord, InstructDataError, read_records, stable_fraction
from gptkit.rewards import check_reward

PROMPT_KEYS = ("prompt", "question")  # the prompt's field: a prompt+answer JSONL's, or GSM8K's
LOSS_TYPES = ("dapo", "grpo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")


# ----------------------------------------------------------------------------- prompts

class Task:
    """One prompt: the user's text, the record it came from (a reward's third argument) and its ids,
    rendered in the chat format up to the assistant's turn."""

    def __init__(self, prompt, row, ids):
        self.prompt, self.row, self.ids = prompt, row, ids


def read_tasks(source, split, tokenizer, system, max_prompt_tokens):
    """A source's records -> (tasks, prompts dropped as too long). Records hold a text field "prompt"
    or "question" (GSM8K's) and whatever their rewards read (GSM8K's "answer")."""
    tasks, too_long = [], 0
    head = [{"role": "system", "content": system}] if system else []
    for index, record in read_records(source, split):
        if isinstance(record, BadRecord) or not isinstance(record, dict):
            raise InstructDataError(f"{source}: record {index} is {record if isinstance(record, BadRecord) else 'not a JSON object'}")
        key = next((k for k in PROMPT_KEYS if isinstance(record.get(k), str) and record[k].strip()), None)
        if key is None:
            raise InstructDataError(f"{source}: record {index} has no prompt: give each record a text field "
                                    "\"prompt\" (or GSM8K's \"question\"), and the fields its reward reads (\"answer\")")
        prompt = record[key].strip()
        ids = tokenizer.render_prompt(head + [{"role": "user", "content": prompt}])
        if len(ids) > max_prompt_tokens:
            too_long += 1
            continue
        tasks.append(Task(prompt, record, ids))
    return tasks, too_long


def train_val_tasks(cfg, tokenizer, system):
    """-> (train tasks, val tasks, a line saying where they came from). val: cfg.val_data (a hub
    dataset's test split, or a whole local file), else a stable-hash share of cfg.data."""
    room = cfg.block_size - cfg.max_new_tokens  # a prompt and its answer fit one row
    train, dropped = read_tasks(cfg.data, None, tokenizer, system, room)
    if cfg.val_data:
        val, val_dropped = read_tasks(cfg.val_data, "test", tokenizer, system, room)
        dropped += val_dropped
    else:
        held = [stable_fraction(t.prompt) < cfg.val_fraction for t in train]
        val = [t for t, h in zip(train, held) if h]
        train = [t for t, h in zip(train, held) if not h]
    if not train or not val:
        raise InstructDataError(f"{cfg.data}: {len(train)} train and {len(val)} val prompts fit block_size="
                                f"{cfg.block_size} with max_new_tokens={cfg.max_new_tokens}: rl.py needs both (more "
                                "data, a val_data, a larger val_fraction, or a smaller max_new_tokens)")
    note = f" ({dropped} prompts longer than block_size - max_new_tokens = {room} tokens left out)" if dropped else ""
    return train, val, f"{len(train):,} train prompts, {len(val):,} val prompts{note}"


# ----------------------------------------------------------------------------- sampling and rewards

class Sampler:
    """The policy's answers, through one Engine that lives as long as the run, and their rewards.
    rewards: [(name, function)], summed. rows: the engine's batch (its KV cache holds rows x context)."""

    def __init__(self, model, tokenizer, rt, rewards, rows, context, max_queue):
        self.model, self.tokenizer, self.rewards = model, tokenizer, rewards
        self.engine = Engine(model, tokenizer, autocast=rt.autocast, max_batch=rows, max_queue=max_queue,
                             context=context, thread=False)  # answer_all runs it in the training thread
        model.train()  # the engine sets eval mode; each answers() call sets it and puts it back

    def answers(self, tasks, n, max_tokens, seed, temperature=1.0, top_k=0, top_p=1.0):
        """n answers (engine Answers: text, ids, finish_reason) to each task -> a list per task. Answer i
        of task j samples with seed + n * j + i, so a run's samples repeat with its seed."""
        stop = (self.tokenizer.end, self.tokenizer.eot)
        jobs = [Job(task.ids, max_tokens, stop, temperature=temperature, top_k=top_k, top_p=top_p, n=n,
                    seed=seed + n * j) for j, task in enumerate(tasks)]
        was_training = self.model.training
        self.model.eval()
        try:
            return answer_all(self.engine, jobs, answers=True)
        finally:
            self.model.train(was_training)

    def reward(self, task, completion):
        return sum(check_reward(name, fn, task.prompt, completion, task.row) for name, fn in self.rewards)

    def close(self):
        self.engine.close()


def group_advantages(rewards, scale="group", batch_std=None):
    """rewards (P, G): G answers to each of P prompts -> advantages (P, G), trl's formula: the reward
    less its group's mean, over the std (unbiased) of its group, of the whole batch (batch_std: of
    every process's rewards, when given), or not at all."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if scale == "none":
        return centred
    std = rewards.std(dim=1, keepdim=True) if scale == "group" else (rewards.std() if batch_std is None else batch_std)
    return centred / (std + 1e-4)


def answer_rows(tasks, answers, device):
    """Prompt + answer of each (task, Answer) -> (x, y) (N, L) int64, right-padded: y is the answer's
    next token where x is the prompt's last token or an answer token, -1 elsewhere."""
    seqs = [(task.ids, answer.ids) for task, answer in zip(tasks, answers)]
    length = max(len(p) + len(a) for p, a in seqs) - 1
    x = torch.zeros(len(seqs), length, dtype=torch.long)
    y = torch.full((len(seqs), length), -1, dtype=torch.long)
    for row, (prompt, answer) in enumerate(seqs):
        seq = torch.tensor(prompt + answer, dtype=torch.long)
        x[row, :len(seq) - 1] = seq[:-1]
        y[row, len(prompt) - 1:len(seq) - 1] = seq[len(prompt):]
    return x.to(device), y.to(device)


class Reference:
    """The starting model's log-probs: the policy with its adapters off (LoRA), or a frozen copy of the
    starting weights. source: where those came from (init_from), kept in the run's checkpoint. start:
    the starting model loaded again (a resumed run, whose policy has moved on: rl.py loads it from
    source); None: the policy as it is now."""

    def __init__(self, model, source, start=None):
        self.source, self.copy = source, None
        if settings_of(model):
            return
        shape = lambda m: {k: v for k, v in m.config.to_dict().items() if k != "dropout"}  # noqa: E731 (eval: no dropout)
        if start is not None and shape(start) != shape(model):
            raise ConfigError(f"{source} is not the model this run started from (another shape): give the run's "
                              "own starting model")
        self.copy = copy.deepcopy(start if start is not None else model).eval().requires_grad_(False)

    @torch.no_grad()
    def logps(self, policy, x, y, rt, temperature):
        if self.copy is not None:
            with rt.autocast():
                return token_logps(self.copy, x, y, temperature)
        with adapters_disabled(policy), rt.autocast():
            return token_logps(policy, x, y, temperature)


# ----------------------------------------------------------------------------- the batches

class RolloutLoader:
    """The train loop's batch source: at the first micro-batch of each round, this rank's share of
    prompts_per_step prompts (the next in a seeded shuffle, a new one each epoch) is answered
    group_size times and scored; the round is then handed out as micro-batches of micro_batch_size
    answers, num_iterations times over. A micro-batch is (x, y, advantages, reference logps, old logps
    or None, figures): figures are the round's own (mean reward, answer length, ...), each spread over
    its micro-batches in proportion to their loss units, so the step's mean of them is the round's."""

    def __init__(self, sampler, reference, tasks, loss, cfg, rt):
        self.sampler, self.reference, self.tasks, self.loss, self.cfg, self.rt = sampler, reference, tasks, loss, cfg, rt
        self.per_rank = cfg.prompts_per_step // rt.world_size
        self.epoch, self.position, self.round = 0, 0, 0
        self.batches, self.handed = [], 0  # the round's micro-batches, and how many were handed out

    def _next_tasks(self):
        """This rank's prompts of the next round: each rank takes its own slice of the same shuffle."""
        out = []
        need = self.cfg.prompts_per_step
        while len(out) < need:
            order = np.random.default_rng((self.cfg.seed, self.epoch)).permutation(len(self.tasks))
            take = order[self.position:self.position + need - len(out)]
            out += [self.tasks[i] for i in take]
            self.position += len(take)
            if self.position >= len(self.tasks):
                self.epoch, self.position = self.epoch + 1, 0
        return out[self.rt.rank * self.per_rank:(self.rt.rank + 1) * self.per_rank]

    def next_batch(self):
        if self.handed == len(self.batches) * self.cfg.num_iterations:
            self.batches, self.handed = self._new_round(), 0
        batch = self.batches[self.handed % len(self.batches)]
        self.handed += 1
        return batch

    def _new_round(self):
        cfg, rt, G = self.cfg, self.rt, self.cfg.group_size
        tasks = self._next_tasks()
        seed = cfg.seed * 1_000_003 + self.round * 10_007 + rt.rank * 101  # a round's samples repeat with the seed
        groups = self.sampler.answers(tasks, G, cfg.max_new_tokens, seed, cfg.temperature, cfg.top_k, cfg.top_p)
        self.round += 1
        flat_tasks = [t for t in tasks for _ in range(G)]
        answers = [a for group in groups for a in group]
        rewards = torch.tensor([self.sampler.reward(t, a.text) for t, a in zip(flat_tasks, answers)],
                               dtype=torch.float32).view(len(tasks), G)
        advantages = self._advantages(rewards).flatten()
        lengths = torch.tensor([len(a.ids) for a in answers], dtype=torch.float32)
        figures = {"reward": rewards.mean(), "reward_std": rewards.std(dim=1).mean(),
                   "frac_reward_zero_std": (rewards.std(dim=1) == 0).float().mean(),
                   "completions/mean_length": lengths.mean(),
                   "completions/clipped_ratio": torch.tensor([a.finish_reason == "length" for a in answers]).float().mean()}
        batches = []
        was_training = self.sampler.model.training
        self.sampler.model.eval()  # the reference and old log-probs without dropout
        try:
            for start in range(0, len(answers), cfg.micro_batch_size):
                stop = start + cfg.micro_batch_size
                x, y = answer_rows(flat_tasks[start:stop], answers[start:stop], rt.device)
                ref = self.reference.logps(self.sampler.model, x, y, rt, cfg.temperature)
                old = None
                if cfg.num_iterations > 1:  # the sampling policy, fixed for the round's later steps
                    with torch.no_grad(), rt.autocast():
                        old = token_logps(self.sampler.model, x, y, cfg.temperature)
                batches.append([x, y, advantages[start:stop].to(rt.device), ref, old, None])
        finally:
            self.sampler.model.train(was_training)
        units = [float(self.loss.count(b)) for b in batches]
        for batch, n in zip(batches, units):
            batch[5] = {k: (v * n).to(rt.device) for k, v in figures.items()}
        return [tuple(b) for b in batches]

    def _advantages(self, rewards):
        if self.cfg.scale_rewards != "batch" or not self.rt.ddp:
            return group_advantages(rewards, self.cfg.scale_rewards)
        # the std of the whole step, every rank's rewards: gathered (they are few numbers)
        gathered = [torch.zeros_like(rewards) for _ in range(self.rt.world_size)]
        dist.all_gather(gathered, rewards.to(self.rt.device) if self.rt.device_type == "cuda" else rewards)
        return group_advantages(rewards, "batch", batch_std=torch.cat([g.cpu() for g in gathered]).std())

    def state_dict(self):
        # a resume samples the next round afresh (a round part-used with num_iterations > 1 is sampled again)
        return {"epoch": self.epoch, "position": self.position, "round": self.round,
                "tasks": len(self.tasks), "prompts_per_step": self.cfg.prompts_per_step,
                "reference": self.reference.source}

    def load_state_dict(self, state):
        if state.get("tasks") != len(self.tasks) or state.get("prompts_per_step") != self.cfg.prompts_per_step:
            raise ConfigError(f"the run was saved with {state.get('tasks')} train prompts and prompts_per_step="
                              f"{state.get('prompts_per_step')}; now there are {len(self.tasks)} and "
                              f"{self.cfg.prompts_per_step}: resume with the same data and settings")
        self.epoch, self.position, self.round = state["epoch"], state["position"], state["round"]
        self.batches, self.handed = [], 0


# ----------------------------------------------------------------------------- the loss

class GRPOLoss:
    """GRPO's clipped objective (see the module's docstring), with the five methods of gptkit/losses.py.
    Units (count): answer tokens (dapo) or answers (grpo, dr_grpo). Extra figures, averaged like the
    loss: kl (to the reference, per token) and clip_ratio (share of tokens whose ratio is clipped);
    and the round's figures the RolloutLoader carries. evaluate: the greedy answers to the held-out
    prompts -> pass@1 (share whose reward reaches pass_reward), val_reward, val_mean_length; val_loss
    is 1 - pass@1 (the loop keeps the lowest as its best)."""

    def __init__(self, loss_type="dapo", epsilon=0.2, epsilon_high=0.2, beta=0.0, temperature=1.0,
                 max_new_tokens=256, sampler=None, pass_reward=1.0, val_prompts=0):
        if loss_type not in LOSS_TYPES:
            raise ConfigError(f"loss_type={loss_type!r}: use {', '.join(LOSS_TYPES)}")
        self.loss_type, self.epsilon, self.epsilon_high, self.beta = loss_type, epsilon, epsilon_high, beta
        self.temperature, self.max_new_tokens = temperature, max_new_tokens
        self.sampler, self.pass_reward, self.val_prompts = sampler, pass_reward, val_prompts

    def grad_accum_steps(self, cfg, world_size):
        answers = cfg.prompts_per_step * cfg.group_size
        if cfg.prompts_per_step % world_size or (answers // world_size) % cfg.micro_batch_size:
            raise ConfigError(f"prompts_per_step={cfg.prompts_per_step} x group_size={cfg.group_size} answers do not "
                              f"split into {world_size} process(es) of whole prompts and micro-batches of "
                              f"micro_batch_size={cfg.micro_batch_size}: make prompts_per_step a multiple of the "
                              "processes and each one's answers a multiple of micro_batch_size")
        return answers // world_size // cfg.micro_batch_size

    def batch_summary(self, cfg, grad_accum, world_size):
        return (f"{cfg.prompts_per_step} prompts x {cfg.group_size} answers = {cfg.prompts_per_step * cfg.group_size} "
                f"answers per step = {cfg.micro_batch_size} answers x {grad_accum} accumulation steps x "
                f"{world_size} process(es); loss_type={self.loss_type}, beta={self.beta}")

    def count(self, batch):
        y = batch[1]
        return (y != -1).sum() if self.loss_type == "dapo" else torch.tensor(y.size(0), device=y.device)

    def per_unit_sum(self, values, mask, figure=False):
        """The sum over the batch's units of values (N, L): over tokens (dapo), or of each answer's mean
        (grpo; dr_grpo's loss divides each answer's sum by max_new_tokens, its figures are means too)."""
        if self.loss_type == "dapo":
            return (values * mask).sum()
        if self.loss_type == "grpo" or figure:
            return ((values * mask).sum(1) / mask.sum(1).clamp(min=1.0)).sum()
        return (values * mask).sum() / self.max_new_tokens

    def __call__(self, forward_model, batch):
        x, y, advantages, ref, old, figures = batch
        logps = token_logps(forward_model, x, y, self.temperature)
        mask = (y != -1).float()
        old = logps.detach() if old is None else old
        ratio = torch.exp(logps - old)
        a = advantages.unsqueeze(1)  # (N, 1): every token of an answer carries its advantage
        clipped = torch.clamp(ratio, 1 - self.epsilon, 1 + self.epsilon_high)
        per_token = -torch.min(ratio * a, clipped * a)
        kl = torch.exp(ref - logps) - (ref - logps) - 1  # k3: unbiased, never negative
        if self.beta:  # weighted by the ratio, as trl (DeepSeek-V3.2): its gradient is then the reverse KL's, unbiased
            per_token = per_token + self.beta * kl * ratio
        is_clipped = ((ratio < 1 - self.epsilon) & (a < 0)) | ((ratio > 1 + self.epsilon_high) & (a > 0))
        stats = {"kl": self.per_unit_sum(kl.detach(), mask, figure=True),
                 "clip_ratio": self.per_unit_sum(is_clipped.float(), mask, figure=True)}
        return self.per_unit_sum(per_token, mask), {**stats, **(figures or {})}

    def evaluate(self, model, tasks, rt):
        """Greedy answers to this rank's held-out prompts, all ranks' figures joined."""
        answers = self.sampler.answers(tasks, 1, self.max_new_tokens, seed=0, temperature=0.0)
        rewards = [self.sampler.reward(t, a[0].text) for t, a in zip(tasks, answers)]
        totals = torch.tensor([sum(r >= self.pass_reward for r in rewards), sum(rewards),
                               sum(len(a[0].ids) for a in answers), len(tasks)], dtype=torch.float64)
        if rt.ddp:
            totals = totals.to(rt.device) if rt.device_type == "cuda" else totals
            dist.all_reduce(totals)
        passed, reward, length, n = totals.tolist()
        n = max(n, 1)
        return {"val_loss": 1 - passed / n, "pass@1": passed / n, "val_reward": reward / n,
                "val_mean_length": length / n}


def val_share(tasks, limit, rank, world_size):
    """The first `limit` held-out prompts (0: all), this rank's every world_size-th."""
    return (tasks[:limit] if limit else tasks)[rank::world_size]


def engine_rows(cfg, world_size):
    """Rows of the sampling engine: a round's answers at once, at most cfg.rollout_batch."""
    return max(1, min(cfg.rollout_batch, cfg.prompts_per_step * cfg.group_size // world_size))

