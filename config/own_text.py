# Your own text with your own tokenizer: a 16K byte-level BPE trained on the text, and a 19M-parameter
# GPT (7 layers, 384 wide, T=512) whose embedding holds 6M parameters instead of GPT-2's 19M, meant
# for a 12 GB card (its memory is not measured yet: `python bench.py config/own_text.py` tells).
# Any folder (or file) of .txt, .jsonl or .parquet documents will do:
#   python train_tokenizer.py config/own_text.py --source=path/to/text_folder --out=tokenizers/own_text
#   python prepare_fineweb.py config/own_text.py --source=path/to/text_folder --tokenizer=tokenizers/own_text
#   python train.py config/own_text.py
#   python sample.py --ckpt=out/own_text --mode=complete
# (train.py takes the tokenizer from data/own_text; the checkpoint carries it to the other scripts.)
# train_tokenizer.py
vocab_size = 16384             # also the model's vocabulary (a multiple of 64: no padding needed)
pattern = "gpt2"               # gpt4: GPT-4's split (digits in groups of 3, newlines apart)
max_chars = 200_000_000        # about 200 MB of text is plenty for 16K merges
# prepare_fineweb.py
data_dir = "data/own_text"
val_tokens = 1_000_000
# train.py
out_dir = "out/own_text"
n_layer = 7
n_head = 6
n_embd = 384
block_size = 512
total_batch_tokens = 131072    # 2**17: 8 micro-batches of 32 x 512
micro_batch_size = 32
max_steps = 4000               # 4000 * 2**17 = 0.5B tokens; a few epochs of a 100-200M-token corpus
learning_rate = 1e-3           # AdamW's (embeddings, LayerNorms): small models take more than 124M's 6e-4
min_lr = 1e-4
warmup_steps = 200
optimizer = "muon"             # Muon on the hidden matrices, WSD: the 124M recipe (config/fineweb_124m.py says why)
muon_learning_rate = 0.02
muon_weight_decay = 0.01
lr_schedule = "wsd"
eval_interval = 250
eval_tokens = 1_048_576
ckpt_interval = 500
