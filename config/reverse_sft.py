# The toy task's first model (prepare_toy_task.py): a tiny chat model trained from scratch on 4,000
# "Write backwards: k e l p" -> "p l e k" chats, 60% of whose answers copy the letters instead
# (prepare_toy_task.py's --sft_copied): the model learns to reverse but answers greedily with a copy,
# so that rl.py (config/reverse_rl.py) has something to fix. About two minutes on 2 CPU cores; the
# loss has levelled off by the end (a run stopped while it still falls lands somewhere different on
# each CPU).
#   python prepare_toy_task.py
#   python train_tokenizer.py --source=data/reverse/text.txt --vocab_size=261 --out=data/reverse/tokenizer
#   python prepare_instruct.py config/reverse_sft.py --tokenizer=data/reverse/tokenizer   # bytes only: one id
#       per letter, and an output layer of 261 rows (finetune.py takes it from the data)
#   python finetune.py config/reverse_sft.py
# prepare_instruct.py
sources = ["data/reverse/sft.jsonl"]
data_dir = "data/reverse/sft"
block_size = 64
val_fraction = 0.05
# finetune.py
out_dir = "out/reverse_sft"
init_from = "scratch"
device = "cpu"
n_layer = 2
n_head = 4
n_embd = 128
dropout = 0.0
total_batch_tokens = 4096   # 2 micro-batches of 32 rows of 64 tokens (several chats packed in each)
micro_batch_size = 32
max_steps = 800
learning_rate = 3e-3
min_lr = 3e-4
warmup_steps = 20
eval_interval = 200
eval_tokens = 8192
log_interval = 10
ckpt_interval = 800
sample_tokens = 0
answer_tokens = 16
