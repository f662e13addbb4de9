# A 712M GPT: 32 layers, 24 heads, 1296 wide (head size 54), T=1024, on FineWeb-Edu.
#   python prepare_fineweb.py config/fineweb_712m.py
#   python train.py config/fineweb_712m.py
# 2**19 tokens per step. Memory per GPU (bf16, see docs/benchmarks.md):
#   RTX 3080 Ti (12 GB): micro_batch_size=2 with activation_checkpointing=True (slow: days)
#   A100 40 GB: 8    A100 80 GB / H100 / GH200: 16
data_dir = "data/fineweb_edu"
subset = "sample-10BT"
out_dir = "out/fineweb_712m"
n_layer = 32
n_head = 24
n_embd = 1296
block_size = 1024
bias = False
dropout = 0.0
total_batch_tokens = 524288
micro_batch_size = 8
max_steps = 19073
learning_rate = 3e-4
min_lr = 3e-5
warmup_steps = 700
weight_decay = 0.1
eval_interval = 250
ckpt_interval = 500
hellaswag_interval = 1000
