"""
Reinforcement learning on rewards a program checks (GRPO): start from a chat model (finetune.py's)
and make it better at a task whose answers can be verified, such as GSM8K's final numbers. The
same loop as train.py, finetune.py and dpo.py (gptkit/trainer.py); the batch source is a
RolloutLoader, which samples answers through the serving engine, and the loss a GRPOLoss
(gptkit/grpo.py, which holds the formulas; gptkit/rewards.py the reward functions).

    python rl.py config/rl_gsm8k.py --init_from=out/dolly        # GSM8K's train split -> out/rl_gsm8k
    torchrun --standalone --nproc_per_node=8 rl.py config/rl_gsm8k.py
    python rl.py config/rl_gsm8k.py --init_from=resume           # continue an interrupted run
    python rl.py config/rl_gsm8k.py --lora_rank=16 --learning_rate=1e-4   # LoRA: the reference is the adapters off
    python rl.py --data=my_tasks.jsonl --val_data= --reward=exact_match --init_from=out/mine
    python rl.py config/rl_gsm8k.py --reward=my_rewards:score    # your own reward: (prompt, completion, row) -> float
    python rl.py config/rl_gsm8k.py --beta=0.04 --loss_type=grpo # a KL term; the paper's per-answer average
    python plot_log.py --out_dir=out/rl_gsm8k                    # reward and pass@1 over the run

The toy task, end to end on a CPU in a few minutes (docs/benchmarks.md):
    python prepare_toy_task.py                                   # data/reverse: letters to write backwards
    python train_tokenizer.py --source=data/reverse/text.txt --vocab_size=261 --out=data/reverse/tokenizer
    python prepare_instruct.py config/reverse_sft.py --tokenizer=data/reverse/tokenizer && python finetune.py config/reverse_sft.py
    python rl.py config/reverse_rl.py

Each step: prompts_per_step prompts from data, group_size answers to each, sampled at temperature
from the current policy; rewards; group-relative advantages; one optimizer step on GRPO's clipped
objective. Each log line carries trl's figures: reward, reward_std, frac_reward_zero_std,
completions/mean_length, completions/clipped_ratio (answers cut at max_new_tokens), kl (to the
starting model, per token) and clip_ratio. Each eval answers val_prompts held-out prompts greedily:
pass@1 (the share whose reward reaches pass_reward), val_reward, val_mean_length; with
--eval_tasks=gsm8k the harness scores GSM8K too. Before and after training it prints greedy answers
to the first held-out prompts, each with the data's answer.
"""

from gptkit.checkpoint import trained_system_prompt
from gptkit.configurator import ConfigError, UserError, configure
from gptkit.grpo import GRPOLoss, Reference, RolloutLoader, Sampler, engine_rows, train_val_tasks, val_share
from gptkit.loading import init_model, load_model, model_kind, model_summary
from gptkit.lora import settings_of
from gptkit.rewards import load_reward
from gptkit.sft import print_answers
from gptkit.system import cleanup_distributed, exit_if_stopped, print0, run_main, setup_runtime
from gptkit.train_config import RLConfig
from gptkit.trainer import train


def resumed_start(cfg, source, rt):
    """A resumed run's starting model, the reference of kl (and of the loss with beta > 0), loaded again
    from source -> the model, or None (beta 0: kl is then measured from the resumed weights)."""
    try:
        if source:
            return load_model(source, device=rt.device, verbose=False)[0]
        why = "its checkpoint names none (saved before rl.py kept it)"
    except (UserError, OSError) as e:
        why = str(e)
    if cfg.beta > 0:  # the loss itself needs the start: a silent stand-in would change what is trained
        raise ConfigError(f"init_from=resume with beta={cfg.beta} needs the starting model as the KL's reference, "
                          f"and it did not load: {why}. Put it back where the run started from ({source}), or "
                          "resume with --beta=0")
    print0(f"note: the starting model did not load ({why}); kl is measured from the resumed weights")
    return None


def reference_of(cfg, ckpt, model, rt):
    """The run's Reference: a new run's is its starting weights; a resumed run's is loaded again from
    where its checkpoint says the run started, except with LoRA (the adapters off: nothing to load)."""
    if cfg.init_from != "resume":
        return Reference(model, cfg.init_from)
    source = ckpt["loader"].get("reference")
    return Reference(model, source, None if settings_of(model) else resumed_start(cfg, source, rt))


def main():
    cfg = configure(RLConfig)
    rewards = [(spec, load_reward(spec)) for spec in cfg.reward]  # a bad name or module fails before the model loads
    start = cfg.out_dir if cfg.init_from == "resume" else cfg.init_from
    if cfg.system == "auto":  # ask the model as it was finetuned
        cfg.system = trained_system_prompt(model_summary(start))
    if cfg.init_from != "resume" and model_kind(cfg.init_from) != "chat":
        print0(f"warning: {cfg.init_from} is a base model (pretrained, not finetuned on chats): rl.py asks it in the "
               "chat format and expects a chat model; run finetune.py first and start from its out_dir")
    rt = setup_runtime(cfg.device, cfg.dtype, cfg.seed)
    model, tokenizer, ckpt = init_model(cfg, rt)  # also refuses a block_size past the model's context
    train_tasks, val_tasks, counts = train_val_tasks(cfg, tokenizer, cfg.system)
    print0(counts)
    val = val_share(val_tasks, cfg.val_prompts, rt.rank, rt.world_size)
    rows = engine_rows(cfg, rt.world_size)
    context = max(len(t.ids) for t in train_tasks + val_tasks) + cfg.max_new_tokens
    sampler = Sampler(model, tokenizer, rt, rewards, rows, context,
                      max_queue=max(cfg.prompts_per_step * cfg.group_size // rt.world_size, len(val), 1))
    loss_fn = GRPOLoss(cfg.loss_type, cfg.epsilon, cfg.epsilon_high, cfg.beta, cfg.temperature, cfg.max_new_tokens,
                       sampler, cfg.pass_reward)
    loader = RolloutLoader(sampler, reference_of(cfg, ckpt, model, rt), train_tasks, loss_fn, cfg, rt)
    questions = [(t.ids, tokenizer.encode(str(t.row.get("answer", "")))) for t in val_tasks[:cfg.questions]]
    print_answers(model, tokenizer, rt, questions, cfg.answer_tokens, "answers before RL")
    try:
        result = train(cfg, rt, model, tokenizer, loader, lambda: val, loss_fn=loss_fn, kind="chat", ckpt=ckpt,
                       sample_prompts=[])
    finally:
        sampler.close()
    exit_if_stopped(result)  # 143 after SIGTERM: a scheduler requeues the run
    print_answers(model, tokenizer, rt, questions, cfg.answer_tokens, "answers after RL")
    print0(f"done: step {result['step']}, best held-out pass@1 {1 - result['best_val_loss']:.3f}; "
           f"chat with it: python sample.py --ckpt={cfg.out_dir}")
    cleanup_distributed()


if __name__ == "__main__":
    # a bad setting, dataset, reward or checkpoint: one `error:` line, exit code 2; a second Ctrl-C stops at once
    run_main(main, on_interrupt="stopped at once, without saving: the last checkpoint (if any) is intact; --init_from=resume goes on from it")
