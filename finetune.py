"""
Instruction finetuning: start from a pretrained checkpoint and train it, with the same loop as
train.py, on chat conversations prepared by prepare_instruct.py. Loss falls only on the assistant's
tokens and the <|end|> closing each answer, weighted by token count across the whole optimizer step.

    python prepare_instruct.py config/dolly.py                 # once: data/dolly
    python finetune.py config/dolly.py                         # one GPU
    torchrun --standalone --nproc_per_node=8 finetune.py config/dolly.py
    python finetune.py config/dolly.py --init_from=resume      # continue an interrupted run
    python finetune.py config/tiny_chat.py                     # on a CPU, after config/tiny_cpu.py (see its header)
    python sample.py --ckpt=out/dolly                          # then chat with it

Before and after training it prints the model's greedy answers to the first few val questions
(held out from training, asked with the data's system prompt), each with the answer the data
gives, so the change is visible. The checkpoint is marked kind="chat", so sample.py opens it in
chat mode, and keeps the data's system prompt (config "system"), which sample.py starts chats with.

SIGTERM or Ctrl-C save a checkpoint and exit with status 143 (SIGTERM) or 130 (Ctrl-C), as train.py.
"""

from dataclasses import dataclass

from gptkit.configurator import ConfigError, configure
from gptkit.trainer import TrainConfig

@dataclass
class FinetuneConfig(TrainConfig):
    data_dir: str = "data/dolly"          # made by prepare_instruct.py
    out_dir: str = "out/dolly"
    init_from: str = "out/fineweb_124m"   # the pretrained run (or resume, a .pt file, a Hugging Face GPT-2 folder)
    dropout: float = 0.1                  # raised from pretraining's 0: a small dataset is easy to memorise
    total_batch_tokens: int = 32768       # 32 rows of 1024: many small steps, the data is small
    micro_batch_size: int = 16
    max_steps: int = 350                  # ~3 epochs of Dolly-15k (printed at the start: adjust to your data)
    learning_rate: float = 6e-5           # ~10x below pretraining: adapt the model, do not overwrite it
    min_lr: float = 6e-6
    warmup_steps: int = 20
    weight_decay: float = 0.0
    eval_interval: int = 50
    eval_tokens: int = 262144             # val conversations scored at each eval (all of them when fewer)
    ckpt_interval: int = 100
    data_mode: str = "random"             # random: conversations in a new order each epoch; sequential: file order
    # the system prompt chats with the model start with: kept in the checkpoint, sample.py's default
    system: str = "auto"                  # auto: the one prepare_instruct.py gave the data ("" for none)
    # answers to the first val questions, printed before and after finetuning
    questions: int = 4                    # how many val questions are asked
    answer_tokens: int = 64               # length limit of the before/after answers; 0: skip them

    def validate(self):
        problems = super().validate()
        if self.init_from == "scratch":
            problems.append("init_from=scratch: finetuning starts from a pretrained model; give its run directory "
                            "(--init_from=out/fineweb_124m), a .pt file, a Hugging Face GPT-2 folder, or resume")
        if self.answer_tokens < 0:
            problems.append(f"answer_tokens={self.answer_tokens} must be 0 or more")
        if self.questions < 0:
            problems.append(f"questions={self.questions} must be 0 or more")
        return problems


def print_answers(model, rt, questions, max_new_tokens, title):
    """Greedy answers (deterministic, so before and after compare) to held-out val questions, each
    with the answer its data gives: a question the model trained on would show what it memorised."""
    from gptkit.generate import generate  # lazily: only this step needs it
    from gptkit.system import print0
    from gptkit.tokenizer import get_tokenizer
    if not rt.master or max_new_tokens == 0 or not questions:
        return
    tokenizer = get_tokenizer()
    was_training = model.training
    model.eval()
    print0(f"--- {title}")
    for ids, reference in questions:
        # the text of the last user turn (the prompt ends in its <|end|> and <|assistant|>)
        user = tokenizer.user
        last_user = len(ids) - 1 - ids[::-1].index(user) if user in ids else len(ids) - 2
        question = tokenizer.decode(ids[last_user + 1:-2])
        answer = generate(model, ids, max_new_tokens, temperature=0.0, stop_tokens=(tokenizer.end, tokenizer.eot),
                          autocast=rt.autocast)
        cut = "..." if len(reference) > max_new_tokens else ""
        print0(f"Q: {question}\nA: {tokenizer.decode(list(answer)).strip()}\n"
               f"(data: {tokenizer.decode(reference[:max_new_tokens]).strip()}{cut})")
    model.train(was_training)


def main():
    from gptkit.sft import SFTDataError, SFTLoader, read_meta, sft_val_batches, val_questions
    from gptkit.system import cleanup_distributed, exit_if_stopped, print0, setup_runtime
    from gptkit.trainer import init_model, train

    cfg = configure(FinetuneConfig)
    meta = read_meta(cfg.data_dir)  # before the model loads: a missing dataset fails fast
    if not meta.get("splits", {}).get("val", {}).get("conversations"):
        raise SFTDataError(f"{cfg.data_dir} has no val conversations (prepared with val_fraction=0?), and "
                           "finetuning evaluates on them: run prepare_instruct.py again with val_fraction=0.05")
    if cfg.system == "auto":  # the model is trained on this prompt: chat with it the same way
        cfg.system = meta.get("system", "")
    rt = setup_runtime(cfg.device, cfg.dtype, cfg.seed)
    model, ckpt = init_model(cfg, rt)
    if cfg.block_size > model.config.block_size:
        raise ConfigError(f"block_size={cfg.block_size} is longer than the model's context of "
                          f"{model.config.block_size}: use --block_size={model.config.block_size} (and prepare "
                          "the data with the same block_size)")
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
    print_answers(model, rt, questions, cfg.answer_tokens, "answers before finetuning")
    result = train(cfg, rt, model, train_loader, get_val_batches, kind="chat", ckpt=ckpt,
                   sample_prompts=[ids for ids, _ in questions] if cfg.sample_tokens else [])
    exit_if_stopped(result)  # 143 after SIGTERM: a scheduler requeues the run
    print_answers(model, rt, questions, cfg.answer_tokens, "answers after finetuning")
    print0(f"done: step {result['step']}, best val loss {result['best_val_loss']:.4f}; "
           f"chat with it: python sample.py --ckpt={cfg.out_dir}")
    cleanup_distributed()


if __name__ == "__main__":
    from gptkit.system import run_main
    # a bad setting, dataset or checkpoint: one `error:` line, exit code 2; a second Ctrl-C stops at once
    run_main(main, on_interrupt="stopped at once, without saving: the last checkpoint (if any) is intact; --init_from=resume goes on from it")
