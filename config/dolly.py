# Instruction finetuning on Dolly-15k (databricks/databricks-dolly-15k, CC BY-SA 3.0), from the 124M
# pretrained by config/fineweb_124m.py; one recipe for both steps:
#   python prepare_instruct.py config/dolly.py
#   python finetune.py config/dolly.py
#   python sample.py --ckpt=out/dolly
# About 15k conversations, ~3.5M tokens: ~110 packed steps of 32k tokens per epoch, so 350 steps is
# ~3 epochs (finetune.py prints the exact figure). More epochs overfit: watch val_loss.
# For the 712M (config/fineweb_712m.py): init_from = "out/fineweb_712m", out_dir = "out/dolly_712m",
#   learning_rate = 3e-5, min_lr = 3e-6, micro_batch_size = 8 (4 on 24 GB; 2 with
#   activation_checkpointing = True on a 12 GB RTX 3080 Ti).
# Memory per GPU for the 124M: micro_batch_size = 16 fits 24 GB; 8 on a 12 GB RTX 3080 Ti.
sources = ["databricks/databricks-dolly-15k"]   # add "my_chats.jsonl*2" etc. to mix
data_dir = "data/dolly"
val_fraction = 0.05
block_size = 1024
overlong = "drop"           # Dolly has a few very long contexts; dropping them keeps answers whole
on_bad_record = "skip"

out_dir = "out/dolly"
init_from = "out/fineweb_124m"
dropout = 0.1               # pretraining ran without; a little helps against memorising 15k examples
total_batch_tokens = 32768  # 32 rows of 1024: small batches, many updates on a small dataset
micro_batch_size = 16
max_steps = 350
learning_rate = 6e-5        # ~10x below pretraining: adapt, do not overwrite
min_lr = 6e-6
warmup_steps = 20
weight_decay = 0.0
eval_interval = 50
eval_tokens = 262144        # ~the whole val split (5% of the conversations)
ckpt_interval = 100
hellaswag_interval = 0
