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
    python dpo.py config/dpo.py --lora_rank=16 --learning_rate=1e-5   # LoRA: adapters train, the reference is them off
    python sample.py --ckpt=out/dpo                            # then chat with it

At the start the reference log-probs of every pair are computed once with the starting model and
saved in <out_dir>/reference_logps.npz (a resume reads them). Each log line and eval carries trl's
figures: loss, rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen,
logps/rejected (val_... at each eval, on held-out pairs). Before and after training it prints greedy
answers to the first val prompts, each with the data's preferred answer.

With --lora_rank=R (gptkit/lora.py) the starting model is frozen and only adapters train; the
reference is the same model with its adapters off, so there is never a second copy. A LoRA
finetune.py run as the start is merged first: its adapters become part of the frozen base.
"""

from gptkit.configurator import configure
from gptkit.loading import init_model, model_kind
from gptkit.preference import DPOLoss, PairLoader, load_or_compute_reference, read_pairs, val_pair_batches
from gptkit.sft import print_answers, read_meta, val_questions
from gptkit.system import cleanup_distributed, exit_if_stopped, print0, run_main, setup_runtime
from gptkit.train_config import DPOConfig
from gptkit.trainer import train


def main():
    cfg = configure(DPOConfig)
    meta = read_meta(cfg.data_dir)  # before the model loads: missing or empty data fails fast
    n_train, n_val = (read_pairs(cfg.data_dir, split)[3] for split in ("train", "val"))
    if cfg.system == "auto":  # the model is tuned on this prompt: chat with it the same way
        cfg.system = meta.get("system", "")
    if cfg.init_from != "resume" and model_kind(cfg.init_from) != "chat":
        print0(f"warning: {cfg.init_from} is a base model (pretrained, not finetuned on chats): DPO expects a chat "
               "model to start from; run finetune.py first and start from its out_dir")
    rt = setup_runtime(cfg.device, cfg.dtype, cfg.seed)
    model, tokenizer, ckpt = init_model(cfg, rt)  # also refuses a block_size past the model's context
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
    print_answers(model, tokenizer, rt, questions, cfg.answer_tokens, "answers before preference tuning")
    loss_fn = DPOLoss(cfg.beta, cfg.loss_type, cfg.label_smoothing, cfg.rpo_alpha)
    result = train(cfg, rt, model, tokenizer, train_loader, get_val_batches, loss_fn=loss_fn, kind="chat",
                   ckpt=ckpt, sample_prompts=[ids for ids, _ in questions] if cfg.sample_tokens else [])
    exit_if_stopped(result)  # 143 after SIGTERM: a scheduler requeues the run
    print_answers(model, tokenizer, rt, questions, cfg.answer_tokens, "answers after preference tuning")
    print0(f"done: step {result['step']}, best val loss {result['best_val_loss']:.4f}; "
           f"chat with it: python sample.py --ckpt={cfg.out_dir}")
    cleanup_distributed()


if __name__ == "__main__":
    # a bad setting, dataset or checkpoint: one `error:` line, exit code 2; a second Ctrl-C stops at once
    run_main(main, on_interrupt="stopped at once, without saving: the last checkpoint (if any) is intact; --init_from=resume goes on from it")
