"""
The settings of the training scripts, one dataclass each: TrainConfig (train.py, and bench.py's
base), FinetuneConfig (finetune.py), DPOConfig (dpo.py) and RLConfig (rl.py), each the one before with its own
defaults and keys. Every field carries a "why" comment, which --help prints.

    cfg = configure(TrainConfig)      # python train.py config/fineweb_124m.py --max_steps=100
"""

import os
from dataclasses import dataclass, field
from typing import ClassVar

from gptkit.configurator import BaseConfig
from gptkit.lora import BASE_DTYPES, TARGETS as LORA_TARGETS
from gptkit.system import STOPPED_EXIT_HELP
from gptkit.tokenizer import tokenizer_problems


@dataclass
class TrainConfig(BaseConfig):
    help_epilog: ClassVar[str] = STOPPED_EXIT_HELP  # --help ends with it: how a stopped run exits
    # data and run
    data_dir: str = "data/fineweb_edu"  # prepared shards (prepare_fineweb.py / prepare_instruct.py)
    out_dir: str = "out/fineweb_124m"   # checkpoints, log.jsonl, config.json land here
    init_from: str = "scratch"          # scratch | resume | path of a gptkit checkpoint or a Hugging Face GPT-2 folder | gpt2* hub name
    # model (ignored when starting from a checkpoint, except dropout)
    n_layer: int = 12                   # transformer blocks
    n_head: int = 12                    # attention heads per block (n_embd / n_head is the head size)
    n_embd: int = 768                   # width of the residual stream
    block_size: int = 1024              # context length in tokens
    vocab_size: int = 0                 # 0: the tokenizer's vocabulary padded to a multiple of 64 (GPT-2: 50304, chat tokens included)
    tokenizer: str = ""                 # empty: the one data_dir was prepared with; gpt2 or a path: checked against it
    bias: bool = False                  # biases in linear layers and LayerNorms (GPT-2 has them)
    dropout: float = 0.0                # 0 for pretraining on much data; try 0.1 when finetuning on little
    # batch: tokens per optimizer step; accumulation = total_batch_tokens / (micro_batch_size * block_size * world_size)
    total_batch_tokens: int = 524288    # 2**19, about 0.5M tokens per step, as GPT-3 small
    micro_batch_size: int = 16          # sequences per forward pass per GPU: the memory knob
    max_steps: int = 19073              # 19073 * 2**19 = 10B tokens, one epoch of FineWeb-Edu sample-10BT
    # optimizer
    optimizer: str = "adamw"            # adamw | muon (Muon on hidden matrices, AdamW on the rest)
    learning_rate: float = 6e-4         # peak AdamW learning rate, reached after warmup_steps
    min_lr: float = 6e-5                # end of the decay
    warmup_steps: int = 700             # linear warmup from learning_rate / warmup_steps
    lr_schedule: str = "cosine"         # cosine | wsd (warmup, stable, then linear decay over decay_fraction)
    decay_fraction: float = 0.2         # wsd: share of the steps spent decaying
    weight_decay: float = 0.1           # on 2-D weights only (not biases or LayerNorms)
    beta1: float = 0.9                  # AdamW momentum
    beta2: float = 0.95                 # AdamW second-moment decay (0.95: steadier for LLMs than 0.999)
    muon_learning_rate: float = 0.02    # Muon's own scale: its updates are orthogonalised, not Adam-sized
    muon_weight_decay: float = 0.01     # Muon's own decay (decoupled: each step shrinks by muon_learning_rate x this,
                                        # so 0.01 x 0.02 acts over ~5K steps, near AdamW's 0.1 x 6e-4 over ~17K)
    grad_clip: float = 1.0              # clip the global gradient norm; 0 disables
    activation_checkpointing: bool = False  # recompute blocks in backward: much less memory, up to 1/3 more compute
    max_bad_steps: int = 5              # stop after this many non-finite losses in a row
    data_mode: str = "random"           # random: every window once per epoch, shuffled anew; sequential: shard order
    # evaluation, logging, checkpoints
    eval_interval: int = 250            # steps between val losses (and samples); also at the end
    eval_tokens: int = 10485760         # fixed val budget (modded-nanogpt uses 10M tokens)
    log_interval: int = 10              # steps between log lines; the only regular wait for the GPU
    ckpt_interval: int = 1000           # steps between checkpoints; also at the end and on SIGTERM/Ctrl-C
    hellaswag_interval: int = 0         # 0: off
    hellaswag_data: str = ""            # HellaSwag JSONL; empty downloads the official val file
    hellaswag_limit: int = 0            # 0: all items
    # lm-evaluation-harness tasks scored during training (gptkit/harness.py), a chat run in its chat format
    eval_tasks: list[str] = field(default_factory=list)  # harness names, e.g. arc_easy,piqa (as eval.py's --tasks); empty: off
    eval_tasks_interval: int = 0        # steps between their runs, a multiple of eval_interval; 0: only at the last step
    eval_tasks_limit: int = 0           # items per task (the first N); 0: all
    eval_tasks_num_fewshot: int = -1    # examples before each question; -1: each task's own (gsm8k: 5, from its train split)
    eval_tasks_data: str = ""           # folder of local dataset copies, eval.py's --data_dir layout; empty: the hub
    eval_tasks_max_gen_toks: int = 0    # new tokens per generated answer (gsm8k); 0: each task's own (256): must fit block_size
    sample_tokens: int = 48             # length of the samples printed at each eval; 0: none
    wandb_log: bool = False             # also log to Weights & Biases (WANDB_MODE=offline works)
    wandb_project: str = "gptkit"       # the wandb project the run goes to
    wandb_run_name: str = ""            # empty: wandb picks a name
    stop_step: int = 0                  # save and exit after this step though max_steps is further (job time limits); 0: off

    folders: ClassVar[tuple] = ("data_dir", "out_dir")  # settings that must name a folder

    def validate(self):
        problems = super().validate()
        for key in self.folders:
            if not getattr(self, key).strip():
                problems.append(f"{key} is empty: give a folder, such as --{key}={getattr(TrainConfig, key)}")
        if self.optimizer not in ("adamw", "muon"):
            problems.append(f"optimizer={self.optimizer!r}: use adamw or muon")
        if self.lr_schedule not in ("cosine", "wsd"):
            problems.append(f"lr_schedule={self.lr_schedule!r}: use cosine or wsd")
        if self.data_mode not in ("random", "sequential"):
            problems.append(f"data_mode={self.data_mode!r}: use random or sequential")
        if self.micro_batch_size < 1 or self.block_size < 1:
            problems.append("micro_batch_size and block_size must be positive")
        else:
            problems += self.batch_problems()
        if self.n_head < 1 or self.n_layer < 1 or self.n_embd < 1:
            problems.append("n_layer, n_head and n_embd must be positive")
        elif self.n_embd % self.n_head:
            problems.append(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.max_steps < 1:
            problems.append(f"max_steps={self.max_steps} must be at least 1")
        if self.warmup_steps < 0 or self.warmup_steps > self.max_steps:
            problems.append(f"warmup_steps={self.warmup_steps} must be between 0 and max_steps={self.max_steps}")
        for key in ("learning_rate", "muon_learning_rate"):
            if getattr(self, key) <= 0:
                problems.append(f"{key}={getattr(self, key)} must be positive")
        if not 0 <= self.min_lr <= self.learning_rate:
            problems.append(f"min_lr={self.min_lr} must be between 0 and learning_rate={self.learning_rate}")
        for key in ("weight_decay", "muon_weight_decay", "grad_clip"):
            if getattr(self, key) < 0:
                problems.append(f"{key}={getattr(self, key)} must be 0 (off) or more")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                problems.append(f"{key}={getattr(self, key)} must be in [0, 1)")
        if not 0 <= self.decay_fraction <= 1:
            problems.append(f"decay_fraction={self.decay_fraction} must be in [0, 1]")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout={self.dropout} must be in [0, 1)")
        for key in ("eval_interval", "log_interval", "ckpt_interval"):
            if getattr(self, key) < 1:
                problems.append(f"{key}={getattr(self, key)} must be at least 1")
        if self.tokenizer:
            problems += tokenizer_problems(self.tokenizer)
        problems += self.eval_tasks_problems()
        return problems

    def eval_tasks_problems(self):
        """The eval_tasks knobs on their own (the task names and data are checked when training starts)."""
        problems = [f"{key}={getattr(self, key)} must be 0 or more" for key in
                    ("eval_tasks_interval", "eval_tasks_limit", "eval_tasks_max_gen_toks") if getattr(self, key) < 0]
        if self.eval_tasks_num_fewshot < -1:
            problems.append(f"eval_tasks_num_fewshot={self.eval_tasks_num_fewshot}: use -1 (each task's own) or 0 or more")
        if self.eval_tasks and self.eval_tasks_data and not os.path.isdir(self.eval_tasks_data):
            problems.append(f"eval_tasks_data={self.eval_tasks_data!r} is not a folder: give the folder of the local "
                            "dataset copies (eval.py's --data_dir layout), or leave it empty to read the hub")
        # the tasks run inside an eval, which happens every eval_interval steps
        if self.eval_tasks_interval > 0 and self.eval_interval > 0 and self.eval_tasks_interval % self.eval_interval:
            problems.append(f"eval_tasks_interval={self.eval_tasks_interval} is not a multiple of eval_interval="
                            f"{self.eval_interval}: the tasks run at evals, so pick a multiple such as "
                            f"{self.eval_interval * max(1, round(self.eval_tasks_interval / self.eval_interval))}")
        return problems

    def batch_problems(self):
        """The step's size against the micro-batch (dpo.py counts pairs, not tokens, and has its own)."""
        tokens_per_micro_batch = self.micro_batch_size * self.block_size
        if self.total_batch_tokens % tokens_per_micro_batch:
            return [f"total_batch_tokens={self.total_batch_tokens} is not a multiple of "
                    f"micro_batch_size*block_size={tokens_per_micro_batch}"]
        if self.total_batch_tokens < 1:
            return [f"total_batch_tokens={self.total_batch_tokens} must be positive (524288 is usual)"]
        return []


@dataclass
class LoRAConfig:
    """The LoRA keys, shared by the scripts that train adapters (finetune.py, dpo.py) and bench.py,
    which measures their speed and memory. A mixin: its checks read TrainConfig's dtype and optimizer,
    so it is listed before TrainConfig among a config's bases (--help then shows it after TrainConfig's keys)."""
    # LoRA (gptkit/lora.py): train low-rank adapters of the block matrices, the base frozen (a 712M on a 12 GB card)
    lora_rank: int = 0                    # rank r of each adapter; 0: full finetuning (every weight trains); 16 is usual
    lora_alpha: float = 32.0              # adapters' output is scaled by alpha / r (peft's convention): 2r is usual
    lora_dropout: float = 0.05            # dropout on the adapters' input, against memorising a small dataset
    lora_targets: str = "attn,mlp"        # which matrices get adapters: attn (c_attn, attn.c_proj), mlp (c_fc, mlp.c_proj), or both
    lora_train_norms: bool = False        # also train all biases and LayerNorms (few parameters; the peft adapter export then refuses)
    lora_base_dtype: str = "float32"      # bfloat16: hold the frozen block matrices in bf16 (half their memory; needs dtype bfloat16 or float16)

    def lora_targets_list(self):
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]

    def lora_problems(self):
        if self.lora_rank == 0:
            return []
        problems = []
        if self.lora_rank < 0:
            problems.append(f"lora_rank={self.lora_rank} must be 0 (full finetuning) or positive (16 is usual)")
        if self.lora_alpha <= 0:
            problems.append(f"lora_alpha={self.lora_alpha} must be positive (twice lora_rank is usual)")
        if not 0.0 <= self.lora_dropout < 1.0:
            problems.append(f"lora_dropout={self.lora_dropout} must be in [0, 1)")
        targets = self.lora_targets_list()
        if not targets or set(targets) - set(LORA_TARGETS) or len(set(targets)) != len(targets):
            problems.append(f"lora_targets={self.lora_targets!r}: use attn, mlp or attn,mlp")
        if self.lora_base_dtype not in BASE_DTYPES:
            problems.append(f"lora_base_dtype={self.lora_base_dtype!r}: use float32 or bfloat16")
        elif self.lora_base_dtype != "float32" and self.dtype == "float32":
            problems.append(f"lora_base_dtype={self.lora_base_dtype} needs mixed precision (its matmuls run in "
                            "autocast): use --dtype=bfloat16, or leave lora_base_dtype=float32")
        if self.optimizer != "adamw":
            problems.append(f"optimizer={self.optimizer} with LoRA: the adapters train with adamw (Muon is for "
                            "full matrices); use --optimizer=adamw, or lora_rank=0")
        return problems


@dataclass
class FinetuneConfig(LoRAConfig, TrainConfig):
    data_dir: str = "data/dolly"          # made by prepare_instruct.py
    out_dir: str = "out/dolly"
    init_from: str = "out/fineweb_124m"   # the pretrained run (or resume, a .pt file, a Hugging Face GPT-2 folder)
    dropout: float = 0.1                  # raised from pretraining's 0: a small dataset is easy to memorise
    total_batch_tokens: int = 32768       # 32 rows of 1024: many small steps, the data is small
    micro_batch_size: int = 16
    max_steps: int = 350                  # ~3 epochs of Dolly-15k (printed at the start: adjust to your data)
    learning_rate: float = 6e-5           # ~10x below pretraining: adapt the model, do not overwrite it
    min_lr: float = 6e-6
    warmup_steps: int = 20
    weight_decay: float = 0.0
    eval_interval: int = 50
    eval_tokens: int = 262144             # val conversations scored at each eval (all of them when fewer)
    ckpt_interval: int = 100
    data_mode: str = "random"             # random: conversations in a new order each epoch; sequential: file order
    # the system prompt chats with the model start with: kept in the checkpoint, sample.py's default
    system: str = "auto"                  # auto: the one prepare_instruct.py gave the data ("" for none)
    # (init_from=scratch trains a chat model of n_layer/n_head/n_embd on the chat data alone: a toy task's, not language)
    # answers to the first val questions, printed before and after finetuning
    questions: int = 4                    # how many val questions are asked
    answer_tokens: int = 64               # length limit of the before/after answers; 0: skip them

    def validate(self):
        problems = super().validate()
        problems += self.lora_problems()
        if self.init_from == "scratch" and self.lora_rank:
            problems.append("init_from=scratch with lora_rank: adapters train on a pretrained model; give its run "
                            "directory (--init_from=out/fineweb_124m), or lora_rank=0")
        if self.answer_tokens < 0:
            problems.append(f"answer_tokens={self.answer_tokens} must be 0 or more")
        if self.questions < 0:
            problems.append(f"questions={self.questions} must be 0 or more")
        return problems


@dataclass
class DPOConfig(FinetuneConfig):
    data_dir: str = "data/dpo"            # preference pairs made by prepare_instruct.py
    out_dir: str = "out/dpo"
    init_from: str = "out/dolly"          # the chat model to tune; also the frozen reference
    dropout: float = 0.0                  # off: dropout would make the policy's log-probs noisy against the reference's
    lora_dropout: float = 0.0             # off, as dropout: the adapters' log-probs too are compared with the reference's
    total_batch_pairs: int = 64           # pairs per optimizer step (each pair is two sequences)
    micro_batch_size: int = 4             # pairs per forward pass per GPU: the memory knob (README table)
    max_steps: int = 900                  # ~1 epoch of UltraFeedback's 61k train pairs at 64 per step
    learning_rate: float = 1e-6           # DPO moves a chat model little: ~50x below SFT
    min_lr: float = 1e-7
    warmup_steps: int = 90                # ~10% of the steps
    eval_interval: int = 100
    eval_tokens: int = 524288             # val pairs scored at each eval (chosen + rejected tokens; all when fewer)
    ckpt_interval: int = 300
    sample_tokens: int = 0                # the before/after answers show the change; no samples at each eval
    beta: float = 0.1                     # how far from the reference the policy may move (larger: closer)
    loss_type: str = "sigmoid"            # sigmoid (DPO) | ipo (squared loss on length-normalised log ratios)
    label_smoothing: float = 0.0          # sigmoid only: the share of pairs assumed mislabelled (conservative DPO)
    rpo_alpha: float = 0.0                # weight of an SFT term on the chosen answers (RPO); 0: off

    def batch_problems(self):
        if self.total_batch_pairs < 1 or self.total_batch_pairs % self.micro_batch_size:
            return [f"total_batch_pairs={self.total_batch_pairs} must be a positive multiple of "
                    f"micro_batch_size={self.micro_batch_size}"]
        return []

    def validate(self):
        problems = super().validate()
        if self.beta <= 0:
            problems.append(f"beta={self.beta} must be positive (0.1 is usual)")
        if self.loss_type not in ("sigmoid", "ipo"):
            problems.append(f"loss_type={self.loss_type!r}: use sigmoid or ipo")
        if not 0 <= self.label_smoothing < 0.5:
            problems.append(f"label_smoothing={self.label_smoothing} must be in [0, 0.5)")
        if self.label_smoothing and self.loss_type != "sigmoid":
            problems.append("label_smoothing applies to loss_type=sigmoid only")
        if self.rpo_alpha < 0:
            problems.append(f"rpo_alpha={self.rpo_alpha} must be 0 (off) or more")
        return problems


@dataclass
class RLConfig(FinetuneConfig):
    folders: ClassVar[tuple] = ("out_dir",)  # no data_dir: prompts come from data / val_data
    # prompts (gptkit/grpo.py): records with "prompt" (or GSM8K's "question") and what the reward reads ("answer")
    data: str = "openai/gsm8k"            # hub dataset (its train split) or a local .json / .jsonl file
    val_data: str = "openai/gsm8k"        # held-out prompts: a hub dataset's test split or a local file; empty: val_fraction of data
    val_fraction: float = 0.05            # share of data held out (by a stable hash of the prompt) when val_data is empty
    val_prompts: int = 200                # held-out prompts answered (greedily) at each eval for pass@1; 0: all
    data_dir: str = ""                    # unused: rl.py reads its prompts itself
    out_dir: str = "out/rl_gsm8k"
    init_from: str = "out/dolly"          # the chat model to improve (finetune.py's); also the reference for the KL
    reward: list[str] = field(default_factory=lambda: ["gsm8k"])  # summed: built-ins (gsm8k, exact_match, answer_format) or module:function
    pass_reward: float = 1.0              # a held-out answer passes (pass@1) when its reward reaches this
    # sampling: group_size answers to each prompt, through the engine (one batch, the KV cache)
    prompts_per_step: int = 16            # prompts per optimizer step
    group_size: int = 8                   # answers per prompt (trl's num_generations); advantages are relative to the group
    max_new_tokens: int = 256             # longest answer (trl's max_completion_length); prompts must leave room for it
    temperature: float = 1.0              # sampling temperature; the log-probs of the loss use it too (as trl)
    top_k: int = 0                        # 0: off
    top_p: float = 1.0                    # 1.0: off
    rollout_batch: int = 64               # rows the engine decodes at once (its KV cache: rows x (prompt + answer))
    # the objective (trl's GRPOTrainer names and defaults)
    loss_type: str = "dapo"               # dapo: mean over all answer tokens | grpo: per answer, then over answers | dr_grpo
    epsilon: float = 0.2                  # clip ratio below 1 - epsilon ...
    epsilon_high: float = 0.2             # ... and above 1 + epsilon_high (DAPO suggests 0.28)
    beta: float = 0.0                     # weight of the KL to the reference in the loss; 0: off (trl, nanochat); logged anyway
    scale_rewards: str = "group"          # divide advantages by the std of the group | batch | none (Dr. GRPO)
    num_iterations: int = 1               # optimizer steps on each batch of samples (PPO's epochs; 1: on-policy)
    micro_batch_size: int = 16            # answers per forward pass per GPU: the memory knob
    total_batch_tokens: int = 0           # unused: a step is prompts_per_step x group_size answers
    dropout: float = 0.0                  # off: dropout would make the policy's log-probs noisy against the sampler's
    lora_dropout: float = 0.0             # off, as dropout
    max_steps: int = 200
    learning_rate: float = 1e-5
    min_lr: float = 1e-6
    warmup_steps: int = 10
    weight_decay: float = 0.0
    eval_interval: int = 25
    log_interval: int = 1                 # each step is many forward passes: a line for each
    ckpt_interval: int = 50
    sample_tokens: int = 0                # the pass@1 evals and before/after answers show the change
    answer_tokens: int = 128

    def batch_problems(self):
        answers = self.prompts_per_step * self.group_size
        if self.prompts_per_step < 1 or self.group_size < 2:
            return [f"prompts_per_step={self.prompts_per_step} and group_size={self.group_size}: use at least 1 prompt "
                    "and 2 answers per prompt (advantages compare the answers of a group)"]
        if answers % self.micro_batch_size:
            return [f"prompts_per_step x group_size = {answers} answers is not a multiple of "
                    f"micro_batch_size={self.micro_batch_size}"]
        return []

    def validate(self):
        problems = super().validate()
        if not self.data.strip():
            problems.append("data is empty: give a hub dataset or a local .json / .jsonl file of prompts")
        if not self.reward:
            problems.append("reward is empty: name at least one (gsm8k, exact_match, answer_format or module:function)")
        if not 0 < self.max_new_tokens < self.block_size:
            problems.append(f"max_new_tokens={self.max_new_tokens} must be between 1 and block_size - 1 = {self.block_size - 1}")
        if self.temperature <= 0:
            problems.append(f"temperature={self.temperature} must be positive: the samples of a group must differ")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            problems.append(f"top_k={self.top_k} must be 0 or more and top_p={self.top_p} in (0, 1]")
        if self.loss_type not in ("dapo", "grpo", "dr_grpo"):
            problems.append(f"loss_type={self.loss_type!r}: use dapo, grpo or dr_grpo")
        if self.scale_rewards not in ("group", "batch", "none"):
            problems.append(f"scale_rewards={self.scale_rewards!r}: use group, batch or none")
        if self.epsilon <= 0 or self.epsilon_high <= 0 or self.epsilon >= 1:
            problems.append(f"epsilon={self.epsilon} must be in (0, 1) and epsilon_high={self.epsilon_high} positive")
        if self.beta < 0:
            problems.append(f"beta={self.beta} must be 0 (off) or more")
        for key in ("num_iterations", "rollout_batch"):
            if getattr(self, key) < 1:
                problems.append(f"{key}={getattr(self, key)} must be at least 1")
        if not 0 <= self.val_fraction < 1 or self.val_prompts < 0:
            problems.append(f"val_fraction={self.val_fraction} must be in [0, 1) and val_prompts={self.val_prompts} 0 or more")
        if self.init_from == "scratch":
            problems.append("init_from=scratch: rl.py improves a chat model; give its run (--init_from=out/dolly) or resume")
        return problems
