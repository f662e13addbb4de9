# Instruction finetuning on Alpaca (yahma/alpaca-cleaned: Stanford Alpaca's 52k with fixes,
# CC BY-NC 4.0) from the 124M pretrained by config/fineweb_124m.py:
#   python prepare_instruct.py config/alpaca.py
#   python finetune.py config/alpaca.py
#   python sample.py --ckpt=out/alpaca
# Other Alpaca-style sources work the same: "tatsu-lab/alpaca" (the original), or a local JSON list
# such as instruction-data.json of rasbt/LLMs-from-scratch, ch07 (1,100 records: a quick smoke run).
# ~52k short conversations, ~8M tokens: ~125 steps of 64k tokens per epoch, 375 steps ~3 epochs.
# For the 712M (config/fineweb_712m.py): init_from = "out/fineweb_712m", out_dir = "out/alpaca_712m",
#   learning_rate = 3e-5, min_lr = 3e-6, micro_batch_size = 8 (2 with activation_checkpointing = True
#   on a 12 GB RTX 3080 Ti).
sources = ["yahma/alpaca-cleaned"]
data_dir = "data/alpaca"
val_fraction = 0.02         # 2% of 52k is ~1k conversations: plenty for a steady val loss
block_size = 1024
overlong = "drop"
on_bad_record = "skip"

out_dir = "out/alpaca"
init_from = "out/fineweb_124m"
dropout = 0.1
total_batch_tokens = 65536  # 64 rows of 1024
micro_batch_size = 16       # 8 on a 12 GB RTX 3080 Ti
max_steps = 375
learning_rate = 6e-5
min_lr = 6e-6
warmup_steps = 20
weight_decay = 0.0
eval_interval = 50
eval_tokens = 262144
ckpt_interval = 100
hellaswag_interval = 0
