"""
Preference tuning with DPO: start from a chat model (finetune.py's) and move it toward the preferred
answer of each pair, against the frozen starting model as the reference. The same loop as train.py
and finetune.py (gptkit/trainer.py); the batch source is a PairLoader and the loss a DPOLoss
(gptkit/preference.py, which holds the formulas).

    python prepare_instruct.py config/dpo.py                   # once: UltraFeedback pairs -> data/dpo
    python dpo.py config/dpo.py                                # out/dolly -> out/dpo, one GPU
    torchrun --standalone --nproc_per_node=8 dpo.py config/dpo.py
    python dpo.py config/dpo.py --init_from=resume             # continue an interrupted run
    python dpo.py config/dpo.py --loss_type=ipo --beta=0.5     # IPO; --label_smoothing=0.1: cDPO; --rpo_alpha=1: + SFT term
    python sample.py --ckpt=out/dpo                            # then chat with it

At the start the reference log-probs of every pair are computed once with the starting model and
saved in <out_dir>/reference_logps.npz (a resume reads them). Each log line and eval carries trl's
figures: loss, rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen,
logps/rejected (val_... at each eval, on held-out pairs). Before and after training it prints greedy
answers to the first val prompts, each with the data's preferred answer.
"""

from dataclasses import dataclass

from gptkit.configurator import ConfigError, configure
from finetune import FinetuneConfig, print_answers


@dataclass
class DPOConfig(FinetuneConfig):
    data_dir: str = "data/dpo"            # preference pairs made by prepare_instruct.py
    out_dir: str = "out/dpo"
    init_from: str = "out/dolly"          # the chat model to tune; also the frozen reference
    dropout: float = 0.0                  # off: dropout would make the policy's log-probs noisy against the reference's
    total_batch_pairs: int = 64           # pairs per optimizer step (each pair is two sequences)
    micro_batch_size: int = 4             # pairs per forward pass per GPU: the memory knob (README table)
    max_steps: int = 900                  # ~1 epoch of UltraFeedback's 61k train pairs at 64 per step
    learning_rate: float = 1e-6           # DPO moves a chat model little: ~50x below SFT
    min_lr: float = 1e-7
    warmup_steps: int = 90                # ~10% of the steps
    eval_interval: int = 100
    eval_tokens: int = 524288             # val pairs scored at each eval (chosen + rejected tokens; all when fewer)
    ckpt_interval: int = 300
    sample_tokens: int = 0                # the before/after answers show the change; no samples at each eval
    beta: float = 0.1                     # how far from the reference the policy may move (larger: closer)
    loss_type: str = "sigmoid"            # sigmoid (DPO) | ipo (squared loss on length-normalised log ratios)
    label_smoothing: float = 0.0          # sigmoid only: the share of pairs assumed mislabelled (conservative DPO)
    rpo_alpha: float = 0.0                # weight of an SFT term on the chosen answers (RPO); 0: off

    def batch_problems(self):
        if self.total_batch_pairs < 1 or self.total_batch_pairs % self.micro_batch_size:
            return [f"total_batch_pairs={self.total_batch_pairs} must be a positive multiple of "
                    f"micro_batch_size={self.micro_batch_size}"]
        return []

    def validate(self):
        problems = super().validate()
        if self.beta <= 0:
            problems.append(f"beta={self.beta} must be positive (0.1 is usual)")
        if self.loss_type not in ("sigmoid", "ipo"):
            problems.append(f"loss_type={self.loss_type!r}: use sigmoid or ipo")
        if not 0 <= self.label_smoothing < 0.5:
            problems.append(f"label_smoothing={self.label_smoothing} must be in [0, 0.5)")
        if self.label_smoothing and self.loss_type != "sigmoid":
            problems.append("label_smoothing applies to loss_type=sigmoid only")
        if self.rpo_alpha < 0:
            problems.append(f"rpo_alpha={self.rpo_alpha} must be 0 (off) or more")
        return problems


def main():
    from gptkit.preference import (DPOLoss, PairLoader, load_or_compute_reference, read_pairs, starting_kind,
                                   val_pair_batches)
    from gptkit.sft import read_meta, val_questions
    from gptkit.system import cleanup_distributed, exit_if_stopped, print0, setup_runtime
    from gptkit.trainer import init_model, train

    cfg = configure(DPOConfig)
    meta = read_meta(cfg.data_dir)  # before the model loads: missing or empty data fails fast
    n_train, n_val = (read_pairs(cfg.data_dir, split)[3] for split in ("train", "val"))
    if cfg.system == "auto":  # the model is tuned on this prompt: chat with it the same way
        cfg.system = meta.get("system", "")
    if cfg.init_from != "resume" and starting_kind(cfg.init_from) != "chat":
        print0(f"warning: {cfg.init_from} is a base model (pretrained, not finetuned on chats): DPO expects a chat "
               "model to start from; run finetune.py first and start from its out_dir")
    rt = setup_runtime(cfg.device, cfg.dtype, cfg.seed)
    model, ckpt = init_model(cfg, rt)
    if cfg.block_size > model.config.block_size:
        raise ConfigError(f"block_size={cfg.block_size} is longer than the model's context of "
                          f"{model.config.block_size}: use --block_size={model.config.block_size}")
    reference = load_or_compute_reference(model, cfg, rt, resuming=ckpt is not None)
    train_loader = PairLoader(cfg.data_dir, "train", cfg.micro_batch_size, cfg.block_size, reference["train"],
                              rank=rt.rank, world_size=rt.world_size, seed=cfg.seed, mode=cfg.data_mode,
                              device=rt.device)

    def get_val_batches():
        return val_pair_batches(cfg.data_dir, cfg.micro_batch_size, cfg.eval_tokens, reference["val"],
                                rank=rt.rank, world_size=rt.world_size, device=rt.device)

    print0(f"{n_train:,} train pairs, {n_val:,} val pairs: max_steps={cfg.max_steps} is "
           f"{cfg.max_steps * cfg.total_batch_pairs / n_train:.1f} epochs")
    questions = val_questions(cfg.data_dir, 2 * cfg.questions, cfg.block_size)[::2]  # the chosen side of each pair
    print_answers(model, rt, questions, cfg.answer_tokens, "answers before preference tuning")
    loss_fn = DPOLoss(cfg.beta, cfg.loss_type, cfg.label_smoothing, cfg.rpo_alpha)
    result = train(cfg, rt, model, train_loader, get_val_batches, loss_fn=loss_fn, kind="chat", ckpt=ckpt,
                   sample_prompts=[ids for ids, _ in questions] if cfg.sample_tokens else [])
    exit_if_stopped(result)  # 143 after SIGTERM: a scheduler requeues the run
    print_answers(model, rt, questions, cfg.answer_tokens, "answers after preference tuning")
    print0(f"done: step {result['step']}, best val loss {result['best_val_loss']:.4f}; "
           f"chat with it: python sample.py --ckpt={cfg.out_dir}")
    cleanup_distributed()


if __name__ == "__main__":
    from gptkit.system import run_main
    # a bad setting, dataset or checkpoint: one `error:` line, exit code 2; a second Ctrl-C stops at once
    run_main(main, on_interrupt="stopped at once, without saving: the last checkpoint (if any) is intact; --init_from=resume goes on from it")
