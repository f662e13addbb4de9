"""
Instruction finetuning: start from a pretrained checkpoint and train it, with the same loop as
train.py, on chat conversations prepared by prepare_instruct.py. Loss falls only on the assistant's
tokens and the <|end|> closing each answer, weighted by token count across the whole optimizer step.

    python prepare_instruct.py config/dolly.py                 # once: data/dolly
    python finetune.py config/dolly.py                         # one GPU
    torchrun --standalone --nproc_per_node=8 finetune.py config/dolly.py
    python finetune.py config/dolly.py --init_from=resume      # continue an interrupted run
    python finetune.py config/tiny_chat.py                     # on a CPU, after config/tiny_cpu.py (see its header)
    python finetune.py config/dolly.py --lora_rank=16 --learning_rate=3e-4 --activation_checkpointing=True   # LoRA
    python sample.py --ckpt=out/dolly                          # then chat with it

Before and after training it prints the model's greedy answers to the first few val questions
(held out from training, asked with the data's system prompt), each with the answer the data
gives, so the change is visible. The checkpoint is marked kind="chat", so sample.py opens it in
chat mode, and keeps the data's system prompt (config "system"), which sample.py starts chats with.

With --lora_rank=R only low-rank adapters of the block matrices train (gptkit/lora.py; --lora_alpha,
--lora_dropout, --lora_targets=attn,mlp, --lora_train_norms, --lora_base_dtype=bfloat16); the base
stays frozen, so a 712M model finetunes on a 12 GB card (docs/benchmarks.md). Adapters want a
higher learning rate than full finetuning (about 5-10x). The checkpoint holds the adapters and
names its base; sample.py, serve.py and export_hf.py load it like any other.

SIGTERM or Ctrl-C save a checkpoint and exit with status 143 (SIGTERM) or 130 (Ctrl-C), as train.py.
"""

from gptkit.configurator import configure
from gptkit.loading import init_model
from gptkit.sft import SFTDataError, SFTLoader, print_answers, read_meta, sft_val_batches, val_questions
from gptkit.system import cleanup_distributed, exit_if_stopped, print0, run_main, setup_runtime
from gptkit.train_config import FinetuneConfig
from gptkit.trainer import train


def main():
    cfg = configure(FinetuneConfig)
    meta = read_meta(cfg.data_dir)  # before the model loads: a missing dataset fails fast
    if not meta.get("splits", {}).get("val", {}).get("conversations"):
        raise SFTDataError(f"{cfg.data_dir} has no val conversations (prepared with val_fraction=0?), and "
                           "finetuning evaluates on them: run prepare_instruct.py again with val_fraction=0.05")
    if cfg.system == "auto":  # the model is trained on this prompt: chat with it the same way
        cfg.system = meta.get("system", "")
    rt = setup_runtime(cfg.device, cfg.dtype, cfg.seed)
    model, tokenizer, ckpt = init_model(cfg, rt)  # also refuses a block_size past the model's context
    train_loader = SFTLoader(cfg.data_dir, "train", cfg.micro_batch_size, cfg.block_size, rank=rt.rank,
                             world_size=rt.world_size, seed=cfg.seed, mode=cfg.data_mode, device=rt.device)

    def get_val_batches():
        return sft_val_batches(cfg.data_dir, cfg.micro_batch_size, cfg.block_size, cfg.eval_tokens,
                               rank=rt.rank, world_size=rt.world_size, device=rt.device)

    steps_per_epoch = train_loader.rows_per_epoch() * cfg.block_size / cfg.total_batch_tokens
    print0(f"{meta['splits']['train']['conversations']:,} train conversations in "
           f"{train_loader.rows_per_epoch():,} packed rows of {cfg.block_size}: {steps_per_epoch:.1f} steps per "
           f"epoch, so max_steps={cfg.max_steps} is {cfg.max_steps / steps_per_epoch:.1f} epochs")
    questions = val_questions(cfg.data_dir, cfg.questions, cfg.block_size)
    if ckpt is None:  # a resumed run's model is already part-finetuned: its "before" was printed when it began
        print_answers(model, tokenizer, rt, questions, cfg.answer_tokens, "answers before finetuning")
    result = train(cfg, rt, model, tokenizer, train_loader, get_val_batches, kind="chat", ckpt=ckpt,
                   sample_prompts=[ids for ids, _ in questions] if cfg.sample_tokens else [])
    exit_if_stopped(result)  # 143 after SIGTERM: a scheduler requeues the run
    print_answers(model, tokenizer, rt, questions, cfg.answer_tokens, "answers after finetuning")
    print0(f"done: step {result['step']}, best val loss {result['best_val_loss']:.4f}; "
           f"chat with it: python sample.py --ckpt={cfg.out_dir}")
    cleanup_distributed()


if __name__ == "__main__":
    # a bad setting, dataset or checkpoint: one `error:` line, exit code 2; a second Ctrl-C stops at once
    run_main(main, on_interrupt="stopped at once, without saving: the last checkpoint (if any) is intact; --init_from=resume goes on from it")
