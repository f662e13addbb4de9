# Preference tuning (DPO) of the Dolly chat model (config/dolly.py) on UltraFeedback binarized
# (HuggingFaceH4/ultrafeedback_binarized, split train_prefs, MIT); one recipe for both steps:
#   python prepare_instruct.py config/dpo.py
#   python dpo.py config/dpo.py
#   python sample.py --ckpt=out/dpo
# About 61k pairs; overlong = "truncate" cuts the longest to the context of 1024 (prepare prints how many).
# Memory per GPU (computed, docs/benchmarks.md): 124M micro_batch_size = 4 on 12 GB,
# 16 on 40 GB, 32 on 80 GB; 712M 1 on 12 GB (optimizer = "muon", activation_checkpointing = True), 4 on 40 GB, 8 on 80 GB.
sources = ["HuggingFaceH4/ultrafeedback_binarized"]   # or local JSONL: prompt/chosen/rejected, HH-RLHF, ...
data_dir = "data/dpo"
val_fraction = 0.02
block_size = 1024
overlong = "truncate"       # UltraFeedback has long answers: keep the pairs, cut as prepare_instruct.py documents
on_bad_record = "skip"

out_dir = "out/dpo"
init_from = "out/dolly"
total_batch_pairs = 64
micro_batch_size = 4
max_steps = 900             # ~1 epoch
learning_rate = 1e-6
min_lr = 1e-7
warmup_steps = 90
eval_interval = 100
eval_tokens = 524288
ckpt_interval = 300
beta = 0.1
loss_type = "sigmoid"
