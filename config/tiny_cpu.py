# A first run on a laptop CPU: a 7M-parameter GPT (4 layers, 4 heads, 128 wide, T=256) trained on
# a few MB of local text for 100 steps of 8192 tokens. Measured ~1,850 tokens/s on 2 CPU cores, so
# about 8 minutes; a laptop with more cores takes a few. The val loss falls from about 10.8
# (uniform over 50k tokens) and the samples turn from noise into English-looking word salad.
# Any folder of .txt files will do, e.g. some Project Gutenberg books:
#   python prepare_fineweb.py config/tiny_cpu.py --source=path/to/text_folder
#   python train.py config/tiny_cpu.py
#   python plot_log.py config/tiny_cpu.py
# prepare_fineweb.py: small val split and a cap, so preparing a big folder stays quick
data_dir = "data/tiny"
val_tokens = 65536
max_tokens = 5_000_000
# train.py
out_dir = "out/tiny_cpu"
device = "cpu"
n_layer = 4
n_head = 4
n_embd = 128
block_size = 256
dropout = 0.0
total_batch_tokens = 8192      # 2 micro-batches of 16 x 256
micro_batch_size = 16
max_steps = 100
learning_rate = 2e-3           # AdamW's (embeddings, LayerNorms): small models take more than 124M's 6e-4
min_lr = 2e-4
warmup_steps = 10
optimizer = "muon"             # Muon on the hidden matrices, WSD: the 124M recipe (config/fineweb_124m.py says why)
muon_learning_rate = 0.02
muon_weight_decay = 0.01
lr_schedule = "wsd"
eval_interval = 25
eval_tokens = 65536            # 16 batches: a few seconds per eval
log_interval = 5
ckpt_interval = 50
sample_tokens = 32
