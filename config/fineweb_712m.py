# A 712M GPT: 32 layers, 24 heads, 1296 wide (head size 54), T=1024, on FineWeb-Edu.
#   python prepare_fineweb.py config/fineweb_712m.py
#   python train.py config/fineweb_712m.py
# 2**19 tokens per step. Measured peak memory on an H100 (docs/benchmarks.md): micro-batch 4:
# 20.4 GB, 8: 28.0 GB (eager), 16: 41.6 GB, 32: 69.7 GB (compiled).
# (Those were measured with AdamW; Muon, the default below, keeps one buffer per hidden matrix
# instead of two, so it needs less.)
#   RTX 3080 Ti (12 GB): does not fit with AdamW (weights + gradients + its state alone are 11.4 GB).
#     With Muon: activation_checkpointing=True, micro_batch_size=2 peaks at 9.8 GB (measured).
#   A100 40 GB: micro_batch_size=8      (estimated ~28K tokens/s: ~4 days for 10B tokens)
#   A100 80 GB / H100 / GH200: micro_batch_size=16 (the default; H100: 88K tokens/s measured),
#     or 32 (92K tokens/s: ~30 hours for 10B tokens)
# Windows or no Triton: --compile=False.
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
micro_batch_size = 16
compile = True
max_steps = 19073
learning_rate = 3e-4           # AdamW's, for the embeddings and LayerNorms (half 124M's: a wider model)
min_lr = 3e-5
warmup_steps = 700
weight_decay = 0.1
# Muon on the hidden matrices, warmup-stable-decay: config/fineweb_124m.py says why. Muon's rate is
# the same at any width (torch's Muon scales each update by its matrix's shape); AdamW's is not.
# nanoGPT-style AdamW instead: --optimizer=adamw --lr_schedule=cosine
optimizer = "muon"
muon_learning_rate = 0.02
muon_weight_decay = 0.01
lr_schedule = "wsd"
decay_fraction = 0.2
eval_interval = 250
ckpt_interval = 500
hellaswag_interval = 1000
