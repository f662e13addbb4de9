"""
The one training loop, shared by train.py (pretraining) and finetune.py (instruction finetuning).
The two differ only in how the model is built and which batch source they hand to train().
"""

from dataclasses import dataclass

from gptkit.configurator import BaseConfig


@dataclass
class TrainConfig(BaseConfig):
    # data and run
    data_dir: str = "data/fineweb_edu"  # prepared shards (prepare_fineweb.py / prepare_instruct.py)
    out_dir: str = "out/fineweb_124m"   # checkpoints, log.jsonl, config.json land here
    init_from: str = "scratch"          # scratch | resume | path of a gptkit checkpoint or a Hugging Face GPT-2 folder | gpt2* hub name
    # model (ignored when starting from a checkpoint, except dropout)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = 50304
    bias: bool = False
    dropout: float = 0.0
    # batch: tokens per optimizer step; accumulation = total_batch_tokens / (micro_batch_size * block_size * world_size)
    total_batch_tokens: int = 524288    # 2**19, about 0.5M tokens per step, as GPT-3 small
    micro_batch_size: int = 16          # sequences per forward pass per GPU: the memory knob
    max_steps: int = 19073              # 19073 * 2**19 = 10B tokens, one epoch of FineWeb-Edu sample-10BT
    # optimizer
    optimizer: str = "adamw"            # adamw | muon (Muon on hidden matrices, AdamW on the rest)
    learning_rate: float = 6e-4
    min_lr: float = 6e-5                # end of the decay
    warmup_steps: int = 700
    lr_schedule: str = "cosine"         # cosine | wsd (warmup, stable, then linear decay over decay_fraction)
    decay_fraction: float = 0.2         # wsd: share of the steps spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    muon_learning_rate: float = 0.02    # Muon's own scale: its updates are orthogonalised, not Adam-sized
    grad_clip: float = 1.0              # clip the global gradient norm; 0 disables
    activation_checkpointing: bool = False  # recompute blocks in backward: less memory, ~30% more compute
    max_bad_steps: int = 5              # stop after this many non-finite losses in a row
    data_mode: str = "random"           # random windows across all shards, or sequential
    # evaluation, logging, checkpoints
    eval_interval: int = 250
    eval_tokens: int = 10485760         # fixed val budget (modded-nanogpt uses 10M tokens)
    log_interval: int = 10
    ckpt_interval: int = 1000
    hellaswag_interval: int = 0         # 0: off
    hellaswag_data: str = ""            # HellaSwag JSONL; empty downloads the official val file
    hellaswag_limit: int = 0            # 0: all items
    sample_tokens: int = 48             # length of the samples printed at each eval; 0: none
    wandb_log: bool = False
    wandb_project: str = "gptkit"
    wandb_run_name: str = ""

    def validate(self):
        problems = super().validate()
        if self.n_embd % self.n_head:
            problems.append(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.optimizer not in ("adamw", "muon"):
            problems.append(f"optimizer={self.optimizer!r}: use adamw or muon")
        if self.lr_schedule not in ("cosine", "wsd"):
            problems.append(f"lr_schedule={self.lr_schedule!r}: use cosine or wsd")
        if self.data_mode not in ("random", "sequential"):
            problems.append(f"data_mode={self.data_mode!r}: use random or sequential")
        tokens_per_micro_batch = self.micro_batch_size * self.block_size
        if self.micro_batch_size < 1 or self.block_size < 1:
            problems.append("micro_batch_size and block_size must be positive")
        elif self.total_batch_tokens % tokens_per_micro_batch:
            problems.append(f"total_batch_tokens={self.total_batch_tokens} is not a multiple of "
                            f"micro_batch_size*block_size={tokens_per_micro_batch}")
        if self.max_steps < 1:
            problems.append(f"max_steps={self.max_steps} must be at least 1")
        if self.warmup_steps < 0 or self.warmup_steps > self.max_steps:
            problems.append(f"warmup_steps={self.warmup_steps} must be between 0 and max_steps={self.max_steps}")
        if self.min_lr > self.learning_rate:
            problems.append(f"min_lr={self.min_lr} is above learning_rate={self.learning_rate}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout={self.dropout} must be in [0, 1)")
        for key in ("eval_interval", "log_interval", "ckpt_interval"):
            if getattr(self, key) < 1:
                problems.append(f"{key}={getattr(self, key)} must be at least 1")
        return problems
