"""
HellaSwag accuracy of a checkpoint (base or chat; both are scored on plain text).

    python eval_hellaswag.py --ckpt=out/fineweb_124m                      # downloads the official val file once
    python eval_hellaswag.py --ckpt=gpt2                                  # OpenAI's GPT-2 124M, to compare
    python eval_hellaswag.py --ckpt=out/fineweb_124m --data=hellaswag_val.jsonl --limit=500   # a quick look
    python eval_hellaswag.py --ckpt=out/fineweb_124m --device=cpu --batch_size=4              # on a laptop
    torchrun --standalone --nproc_per_node=8 eval_hellaswag.py --ckpt=out/fineweb_124m        # items split over 8 GPUs

Prints three accuracies (see gptkit/hellaswag.py): acc (summed log-prob), acc_norm (per character,
as lm-evaluation-harness) and acc_per_token (as build-nanogpt). Chance is 0.25. OpenAI's GPT-2 124M
scores about 0.295 by the per-token rule (build-nanogpt calls it acc_norm) and 0.311 acc_norm in
lm-evaluation-harness; --ckpt=gpt2 scores it exactly as your model. The downloaded file is kept
in $GPTKIT_CACHE/hellaswag (default ~/.cache/gptkit/hellaswag).
"""

import os
import time
from dataclasses import dataclass

import torch

from gptkit.configurator import BaseConfig, configure
from gptkit.hellaswag import evaluate_hellaswag
from gptkit.loading import ckpt_arg_problems, load_model
from gptkit.system import cleanup_distributed, print0, run_main, setup_runtime


@dataclass
class EvalConfig(BaseConfig):
    ckpt: str = "out/fineweb_124m"  # a run directory or checkpoint file, or a Hugging Face GPT-2 (gpt2)
    data: str = ""                  # HellaSwag JSONL; empty downloads the official val file (needs the internet once)
    limit: int = 0                  # score only the first N items (0: all 10,042 of the val file)
    batch_size: int = 8             # items per forward call, 4 rows each: lower it if memory runs out

    def validate(self):
        problems = super().validate()
        problems += ckpt_arg_problems(self.ckpt)
        if self.data and not os.path.isfile(self.data):
            problems.append(f"data={self.data!r} is not a file: give a HellaSwag JSONL, or leave it empty to download")
        if self.limit < 0:
            problems.append(f"limit={self.limit} must be 0 (all items) or more")
        if self.batch_size < 1:
            problems.append(f"batch_size={self.batch_size} must be at least 1")
        return problems


def main():
    cfg = configure(EvalConfig)
    rt = setup_runtime(cfg.device, cfg.dtype, cfg.seed)
    model, tokenizer, meta = load_model(cfg.ckpt, device=rt.device, verbose=rt.master)
    step = f", step {meta['step']}" if "step" in meta else ""  # a Hugging Face model has no step
    print0(f"checkpoint: {cfg.ckpt} ({meta.get('kind', 'base')}{step})")
    if cfg.compile:
        model = torch.compile(model, dynamic=True)  # dynamic: every batch has its own length
    t0 = time.time()
    # the model's own tokenizer (its checkpoint's): the text is scored in the ids it was trained on
    results = evaluate_hellaswag(model, tokenizer, cfg.data, rt, limit=cfg.limit, batch_size=cfg.batch_size,
                                 progress=True)
    elapsed = time.time() - t0
    print0(f"HellaSwag: {results['count']} items in {elapsed:.1f} s")
    print0(f"  acc           {results['acc']:.4f}  (highest summed log-prob of the ending)")
    print0(f"  acc_norm      {results['acc_norm']:.4f}  (log-prob per character, as lm-evaluation-harness)")
    print0(f"  acc_per_token {results['acc_per_token']:.4f}  (mean log-prob per token, as build-nanogpt)")
    cleanup_distributed()


if __name__ == "__main__":
    run_main(main)  # a bad checkpoint or data file: one `error:` line, exit code 2
