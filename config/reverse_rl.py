# rl.py on the toy task (prepare_toy_task.py), from config/reverse_sft.py's model: the reward is an
# exact match of the letters written backwards; pass@1 on 200 held-out prompts is measured at the
# start and every 25 steps. docs/benchmarks.md has the run's figures and plot.
#   python rl.py config/reverse_rl.py
#   python plot_log.py --out_dir=out/reverse_rl
data = "data/reverse/rl_train.jsonl"
val_data = "data/reverse/rl_val.jsonl"
val_prompts = 200
reward = ["exact_match"]
init_from = "out/reverse_sft"
out_dir = "out/reverse_rl"
device = "cpu"
block_size = 64
max_new_tokens = 16
temperature = 0.7          # the start samples a right answer about 1 time in 20 (it copies more often than it reverses)
prompts_per_step = 16
group_size = 8
micro_batch_size = 32
rollout_batch = 128
max_steps = 150
learning_rate = 1e-4
min_lr = 1e-4
warmup_steps = 2
eval_interval = 25
ckpt_interval = 150
questions = 3
answer_tokens = 16
