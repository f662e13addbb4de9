# Finetune the tiny CPU model of config/tiny_cpu.py into a (very small) chat model. Any
# Alpaca-style JSON, Dolly JSONL or chat JSONL works as the source:
#   python prepare_instruct.py config/tiny_chat.py --sources=path/to/instruction-data.json
#   python finetune.py config/tiny_chat.py
#   python sample.py --ckpt=out/tiny_chat
# A 7M-parameter model learns the shape of an answer (and to stop), not much of its content.
sources = ["databricks/databricks-dolly-15k"]
data_dir = "data/tiny_chat"
block_size = 256           # the tiny model's context
overlong = "truncate"
val_fraction = 0.05
out_dir = "out/tiny_chat"
init_from = "out/tiny_cpu"
device = "cpu"
dropout = 0.0
total_batch_tokens = 8192  # 2 micro-batches of 16 x 256
micro_batch_size = 16
max_steps = 40
learning_rate = 1e-3
min_lr = 1e-4
warmup_steps = 5
eval_interval = 20
eval_tokens = 32768
log_interval = 5
ckpt_interval = 40
sample_tokens = 0
answer_tokens = 32
