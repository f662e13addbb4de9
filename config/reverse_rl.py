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
temperature = 0.7          # T=1 samples of this small model are right 1 time in 20; at 0.7, 1 in 10: a group more often holds one
prompts_per_step = 16
group_size = 8
micro_batch_size = 32
rollout_batch = 128
max_steps = 150
learning_rate = 5e-5
min_lr = 5e-5
warmup_steps = 2
eval_interval = 25
ckpt_interval = 150
questions = 3
answer_tokens = 16
