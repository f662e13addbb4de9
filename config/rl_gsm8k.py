# GSM8K with rl.py (GRPO), from a chat model: the reward is the final number of the answer against
# GSM8K's "#### N"; pass@1 on 200 of its test questions at each eval, and the harness's gsm8k (5-shot,
# in the chat format) at the end. From finetune.py's 124M chat model on one GPU.
#   python finetune.py config/dolly.py            # or any chat model: --init_from=RUN
#   python rl.py config/rl_gsm8k.py
#   python plot_log.py --out_dir=out/rl_gsm8k
data = "openai/gsm8k"
val_data = "openai/gsm8k"      # its test split
val_prompts = 200
reward = ["gsm8k"]
init_from = "out/dolly"
out_dir = "out/rl_gsm8k"
block_size = 1024
max_new_tokens = 256
prompts_per_step = 16
group_size = 8
micro_batch_size = 16
max_steps = 200
learning_rate = 1e-5
min_lr = 1e-6
warmup_steps = 10
eval_interval = 25
ckpt_interval = 50
eval_tasks = ["gsm8k"]
eval_tasks_limit = 200
