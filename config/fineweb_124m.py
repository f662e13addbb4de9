# GPT-2 small (124M): 12 layers, 12 heads, 768 wide, T=1024, on FineWeb-Edu sample-10BT.
#   python prepare_fineweb.py config/fineweb_124m.py
#   python train.py config/fineweb_124m.py
#   torchrun --standalone --nproc_per_node=8 train.py config/fineweb_124m.py
# 2**19 tokens per step x 19073 steps = 10B tokens. micro_batch_size is the memory knob; the
# accumulation steps follow from it, so changing it (or the GPU count) keeps the tokens per step.
# Measured peak memory on an H100 (docs/benchmarks.md): micro-batch 8: 9.1 GB, 16: 11.9 GB,
# 32: 17.5 GB (eager), 64: 31.4 GB, 128: 60.1 GB (compiled). Speed and memory were measured with
# AdamW; Muon, the default below, keeps less state, and its Newton-Schulz steps (bf16) add under
# 1% of a step's FLOPs at 124M and 712M.
# Time for 10B tokens: H100 514K tokens/s measured (527K at 128) -> about 5.5 hours; the others
# estimated from their peak at the H100's 42% MFU: A100 ~155K tokens/s -> ~18 hours;
# RTX 3080 Ti ~34K -> ~3.5 days.
#   RTX 3080 Ti (12 GB): micro_batch_size=8
#   A100 40 GB: micro_batch_size=64 (the default)
#   A100 80 GB / H100 / GH200: micro_batch_size=128
# Windows or no Triton: --compile=False.
data_dir = "data/fineweb_edu"
subset = "sample-10BT"
out_dir = "out/fineweb_124m"
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
bias = False
dropout = 0.0
total_batch_tokens = 524288
micro_batch_size = 64
compile = True
max_steps = 19073
learning_rate = 6e-4           # AdamW's, for the embeddings and LayerNorms (GPT-2 small's rate)
min_lr = 6e-5
warmup_steps = 700
weight_decay = 0.1
# Muon on the hidden matrices and a warmup-stable-decay schedule: on a proxy GPT beside nanoGPT's own
# train.py, this recipe reached nanoGPT's val loss with half the tokens (docs/benchmarks.md, "Recipe
# sweep"; not yet measured at 124M). Muon's rate carries over from the proxy unchanged: torch's Muon
# scales each orthogonalised update by its matrix's shape. nanoGPT's recipe: --optimizer=adamw --lr_schedule=cosine
optimizer = "muon"
muon_learning_rate = 0.02
muon_weight_decay = 0.01
lr_schedule = "wsd"
decay_fraction = 0.2           # the last 20% of the steps: a straight line down to min_lr
eval_interval = 250
ckpt_interval = 1000
hellaswag_interval = 1000
# standard benchmarks beside HellaSwag (lm-evaluation-harness; the hub, or --eval_tasks_data offline):
# --eval_tasks=arc_easy,piqa --eval_tasks_interval=1000 --eval_tasks_limit=500
