"""
The one training loop, shared by train.py (pretraining), finetune.py (instruction finetuning) and
dpo.py (preference tuning). They differ only in how the model is built, the batch source and the
loss they hand to train(): LM_LOSS (next-token cross-entropy) or gptkit/preference.py's DPOLoss.

    model, tok, ckpt = init_model(cfg, rt)             # gptkit/loading.py: scratch | resume | checkpoint | HF
    train(cfg, rt, model, tok, train_loader, get_val_batches, loss_fn=LM_LOSS, kind="base", ckpt=ckpt)

train() reads top to bottom: set up (optimizers, resume, run folder), then per step: batches ->
train_step (gptkit/optim.py) -> StepLog (log lines, skipped steps) -> Evaluation when due (val
figures, HellaSwag, the eval_tasks through gptkit/harness.py) -> StopSignals / checkpoint. The loss
(gptkit/losses.py) says what a batch costs; the loop never asks what kind of training it runs.
"""

import json
import os
import signal
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from gptkit.checkpoint import restore_training_state, save_training_state, trained_system_prompt, truncate_log
from gptkit.configurator import ConfigError, UserError, config_dict, print_config
from gptkit.files import atomic_write, remove_temporaries
from gptkit.generate import generate, make_generator
from gptkit.hellaswag import download_val, evaluate_hellaswag, load_items
from gptkit.losses import LM_LOSS
from gptkit.optim import configure_optimizers, lr_multiplier, set_lr, train_step
from gptkit.plot import EVAL_TASKS_PREFIX, HELLASWAG_KEY, eval_task_key, main_task_keys
from gptkit.system import MetricsLogger, device_peak_flops, print0


class NonFiniteLossError(UserError, RuntimeError):
    """The loss or gradient stayed NaN/inf for max_bad_steps steps in a row; the message says what to do."""


# ----------------------------------------------------------------------------------------------
# Evaluation and samples (always on the raw model: a compiled or DDP-wrapped one is never needed)

DEFAULT_PROMPTS = ["The meaning of life is", "Once upon a time,", "In a surprising discovery, scientists"]


def default_sample_prompts(tokenizer):
    """Base-model prompts: <|endoftext|> (a document starts) followed by some ordinary text."""
    return [[tokenizer.eot] + tokenizer.encode(text) for text in DEFAULT_PROMPTS]


def sample_texts(model, tokenizer, rt, prompts, max_new_tokens, seed):
    """One continuation per prompt (list of ids), decoded; the same seed at every eval so samples
    are comparable across training, and a private generator so training's RNG is untouched."""
    generator = make_generator(model, seed)
    texts = []
    for ids in prompts:
        new = list(generate(model, ids, max_new_tokens, temperature=1.0, top_k=50, stop_tokens=(tokenizer.eot, tokenizer.end),
                            generator=generator, autocast=rt.autocast, n_vocab=tokenizer.n_vocab))
        shown = ids[1:] if ids and ids[0] == tokenizer.eot else ids
        texts.append(tokenizer.decode(shown) + tokenizer.decode(new))
    return texts


# ----------------------------------------------------------------------------------------------
# The loop's pieces: each does one job and reads on its own; train() below puts them in order

def hellaswag_file(cfg):
    """The HellaSwag file, fetched and checked now, not hours into the run; None when it is off."""
    if cfg.hellaswag_interval <= 0:
        return None
    try:
        path = cfg.hellaswag_data or download_val()
        load_items(path, cfg.hellaswag_limit)
    except (UserError, OSError) as e:
        raise ConfigError(f"{e} (or turn HellaSwag off: --hellaswag_interval=0)") from e
    return path


def score_tasks(model, tokenizer, rt, cfg, kind, limit):
    """The eval_tasks' scores through lm-evaluation-harness -> {eval/TASK/METRIC: value}, the same on every
    rank. A chat model is scored as it is used: its chat format, with the system prompt it trains on.
    The harness hands its results back on (local) rank 0 only, so under torchrun rank 0 scores and
    broadcasts the scores, or that it failed, while the other ranks wait (within the process group's
    timeout: keep an eval of eval_tasks_limit items shorter than that)."""
    scores, failure = None, None
    if rt.master:
        from gptkit.harness import evaluate_tasks  # lm-evaluation-harness takes seconds to import: runs that use it
        system_prompt = trained_system_prompt({"kind": kind, "config": config_dict(cfg)})
        try:
            results = evaluate_tasks(model, tokenizer, cfg.eval_tasks, rt, limit=limit, data_dir=cfg.eval_tasks_data,
                                     chat=kind == "chat", system_prompt=system_prompt,
                                     max_gen_toks=cfg.eval_tasks_max_gen_toks,
                                     num_fewshot=None if cfg.eval_tasks_num_fewshot < 0 else cfg.eval_tasks_num_fewshot)
        except Exception as e:
            if not rt.ddp:
                raise
            failure = e  # said to the other ranks first, so that none waits for scores that never come
        else:
            scores = {eval_task_key(task, metric): value for task, values in results.items()
                      for metric, value in values.items()}
    if rt.ddp:
        box = [scores, None if failure is None else f"{type(failure).__name__}: {failure}"]
        dist.broadcast_object_list(box, src=0)
        if failure is not None:
            raise failure
        scores, said = box
        if said is not None:
            raise RuntimeError(f"rank 0 could not score the eval_tasks ({said})")
    return scores


def check_eval_tasks(model, tokenizer, rt, cfg, kind):
    """Score the first item of each eval_task now, so that an unknown name, a missing or short local file
    or an answer longer than the context fails before the first step, not at the first eval hours later."""
    if not cfg.eval_tasks:
        return
    try:
        score_tasks(model, tokenizer, rt, cfg, kind, limit=1)
    except Exception as e:  # whatever the harness raises on the trial item is the user's to fix: one line
        reason = str(e) if isinstance(e, UserError) else (
            f"scoring the first item of each task failed ({type(e).__name__}: {e}): check the tasks' local files "
            "(every split a task reads; a few-shot split with at least as many items as its shots, or fewer "
            "shots: --eval_tasks_num_fewshot)")
        raise ConfigError(f"eval_tasks={','.join(cfg.eval_tasks)}: {reason}. Here the data folder is "
                          "--eval_tasks_data=DATA_DIR and the answer length --eval_tasks_max_gen_toks=N; "
                          "or turn the tasks off: --eval_tasks=") from e


def wrap_for_training(model, cfg, rt):
    """The module that runs training's forward pass (compiled and/or DDP); evaluation and sampling use the raw model."""
    forward_model = model
    if cfg.compile:
        forward_model = torch.compile(model)
    if rt.ddp:
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


class Evaluation:
    """What an eval does: val figures (loss_fn.evaluate), HellaSwag and the eval_tasks when due, samples
    -> logged and printed. What it needs is bound once; the fixed val batches are made at the first eval
    and kept."""

    def __init__(self, model, tokenizer, rt, cfg, loss_fn, get_val_batches, hellaswag_path, prompts, logger, say,
                 kind="base"):
        self.model, self.tokenizer, self.rt, self.cfg, self.loss_fn = model, tokenizer, rt, cfg, loss_fn
        self.get_val_batches, self.val_batches = get_val_batches, None
        self.hellaswag_path, self.prompts, self.logger, self.say = hellaswag_path, prompts, logger, say
        self.kind = kind  # a chat model's eval_tasks are scored in its chat format

    def due(self, step):
        return step % self.cfg.eval_interval == 0 or step == self.cfg.max_steps

    def __call__(self, step):
        """-> the val figures of the model at this step."""
        cfg, rt = self.cfg, self.rt
        if self.val_batches is None:
            self.val_batches = self.get_val_batches()
        metrics = self.loss_fn.evaluate(self.model, self.val_batches, rt)
        if self.hellaswag_path and step > 0 and (step % cfg.hellaswag_interval == 0 or step == cfg.max_steps):
            result = evaluate_hellaswag(self.model, self.tokenizer, self.hellaswag_path, rt, limit=cfg.hellaswag_limit)
            metrics.update({f"hellaswag_{k}": v for k, v in result.items()})
        if cfg.eval_tasks and step > 0 and (step == cfg.max_steps or (
                cfg.eval_tasks_interval and step % cfg.eval_tasks_interval == 0)):
            metrics.update(score_tasks(self.model, self.tokenizer, rt, cfg, self.kind, cfg.eval_tasks_limit or None))
        texts = []
        if rt.master and self.prompts and step > 0:
            texts = sample_texts(self.model, self.tokenizer, rt, self.prompts, cfg.sample_tokens, cfg.seed)
        self.logger.log(step, **metrics, **({"samples": "\n---\n".join(texts)} if texts else {}))
        # one figure per benchmark on the console; log.jsonl and wandb get them all
        headline = set(main_task_keys(metrics).values())
        shown = {k: v for k, v in metrics.items() if k == HELLASWAG_KEY or k in headline
                 or not k.startswith(("hellaswag_", EVAL_TASKS_PREFIX))}
        self.say(f"step {step}: " + " | ".join(f"{k} {v:.4f}" for k, v in shown.items()))
        for text in texts:
            self.say(f"  sample: {text!r}")
        return metrics


# ----------------------------------------------------------------------------------------------
# The loop

def train(cfg, rt, model, tokenizer, train_loader, get_val_batches, loss_fn=LM_LOSS, kind="base", ckpt=None,
          sample_prompts=None):
    """Train model (raw, on rt.device) until cfg.max_steps -> a summary dict.

    tokenizer: the model's (init_model's), carried by every checkpoint and used for the samples.
    train_loader: next_batch() -> a micro-batch for loss_fn ((x, y) with y = -1 where no loss is
    wanted, for LanguageModelLoss), plus state_dict() and load_state_dict(). get_val_batches(): the
    fixed list of val batches of this rank, called once at the first eval. loss_fn: what a batch
    costs (LM_LOSS: pretraining and SFT; dpo.py's DPOLoss). kind: "base" or "chat", stored in
    checkpoints. ckpt: a checkpoint to resume from (init_model's second result). sample_prompts:
    lists of ids to continue at each eval (default: a few text prompts). Raises NonFiniteLossError
    after max_bad_steps bad steps in a row."""
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
    check_eval_tasks(model, tokenizer, rt, cfg, kind)
    forward_model = wrap_for_training(model, cfg, rt)
    open_run_dir(cfg, rt, step if ckpt is not None else None)
    logger = MetricsLogger(cfg.out_dir, enabled=rt.master, wandb_log=cfg.wandb_log, wandb_project=cfg.wandb_project,
                           wandb_run_name=cfg.wandb_run_name or None, config=config_dict(cfg), resume=ckpt is not None)
    print0(f"{loss_fn.batch_summary(cfg, grad_accum, rt.world_size)}")
    bar = tqdm(total=cfg.max_steps, initial=step, unit="step", dynamic_ncols=True, disable=not rt.master)
    say = bar.write if rt.master else (lambda line: None)  # above the progress bar, on rank 0 only
    if sample_prompts is None:
        sample_prompts = default_sample_prompts(tokenizer) if cfg.sample_tokens else []
    evaluate = Evaluation(model, tokenizer, rt, cfg, loss_fn, get_val_batches, hellaswag_path, sample_prompts,
                          logger, say, kind)
    steps = StepLog(cfg, rt, model, logger, say, log_state)
    try:
        with StopSignals(rt) as signals:
            if ckpt is None:  # the baseline the val curve starts from
                best_val_loss = min(best_val_loss, evaluate(step)["val_loss"])
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
                if evaluate.due(step):
                    best_val_loss = min(best_val_loss, evaluate(step)["val_loss"])
                stop = signals.should_stop(step, cfg.stop_step)
                save_due = step % cfg.ckpt_interval == 0 or step == cfg.max_steps or stop
                if save_due:
                    steps.read_flags()
                # never during a run of skipped steps: the last checkpoint is the last good state
                if save_due and (steps.bad_in_row == 0 or stop):
                    save_training_state(cfg, rt, model, tokenizer, optimizers, scaler, train_loader, kind, step,
                                        tokens_seen, best_val_loss, steps.state())
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
