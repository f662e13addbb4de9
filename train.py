"""
Pretrain a GPT on token shards (made by prepare_fineweb.py). The loop itself is gptkit/trainer.py.

One GPU (or CPU / Apple GPU; the device is picked automatically):
    python train.py config/fineweb_124m.py
    python train.py config/fineweb_124m.py --micro_batch_size=8 --compile=True
A first try on a laptop CPU, a few minutes (prepare some text into data/tiny first):
    python prepare_fineweb.py --source=path/to/text_folder --data_dir=data/tiny
    python train.py config/tiny_cpu.py
Continue a stopped run exactly where it stopped (same config, same out_dir):
    python train.py config/fineweb_124m.py --init_from=resume
Eight GPUs on one machine (tokens per step stay the same; accumulation shrinks):
    torchrun --standalone --nproc_per_node=8 train.py config/fineweb_124m.py
Two machines with 8 GPUs each (run on both; node_rank 0 on the machine at master_addr):
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=10.0.0.1 --master_port=29500 \\
        train.py config/fineweb_124m.py
    torchrun --nnodes=2 --node_rank=1 --nproc_per_node=8 --master_addr=10.0.0.1 --master_port=29500 \\
        train.py config/fineweb_124m.py
Plot the losses of a run, finished or running:
    python plot_log.py --out_dir=out/fineweb_124m

SIGTERM or Ctrl-C finish the current step, save a checkpoint and exit with status 143 (SIGTERM) or 130
(Ctrl-C), not 0, so a job scheduler can tell the run stopped early and requeue it; resume with
--init_from=resume. A bad setting, data folder or checkpoint, a full disk, or out_dir in use by
another run: one `error:` line, status 2.
Logs go to <out_dir>/log.jsonl (and wandb with --wandb_log=True; WANDB_MODE=offline works).
"""

import os

from gptkit.configurator import ConfigError, configure
from gptkit.data import PretrainLoader, ShardError, list_shards, val_batches
from gptkit.loading import init_model
from gptkit.lock import running_holder
from gptkit.losses import grad_accum_steps
from gptkit.system import cleanup_distributed, exit_if_stopped, print0, run_main, setup_runtime
from gptkit.train_config import TrainConfig
from gptkit.trainer import train


def check_config(cfg, rt):
    """Cross-field checks that need the runtime (world size) or the disk; all problems at once."""
    problems = []
    try:
        grad_accum_steps(cfg, rt.world_size)
    except ConfigError as e:
        problems.append(str(e))
    for split in ("train", "val"):
        try:
            list_shards(cfg.data_dir, split)
        except ShardError as e:
            problems.append(str(e))
    if cfg.init_from == "resume" and not os.path.exists(os.path.join(cfg.out_dir, "ckpt.pt")):
        running = running_holder(cfg.out_dir)
        if running:  # a run that has not saved yet: say that, not "check out_dir"
            problems.append(f"init_from=resume, but {cfg.out_dir} holds no ckpt.pt yet: it is in use by {running}; "
                            "resume once that run has saved a checkpoint or stopped")
        else:
            problems.append(f"init_from=resume, but {cfg.out_dir} holds no ckpt.pt: check out_dir, or use "
                            "init_from=scratch")
    if cfg.hellaswag_interval > 0 and cfg.hellaswag_data and not os.path.exists(cfg.hellaswag_data):
        problems.append(f"hellaswag_data={cfg.hellaswag_data} does not exist: give a HellaSwag JSONL file, or leave "
                        "it empty to download the official val file")
    if problems:  # a missing data_dir is one problem, not one per split
        raise ConfigError.of(problems)


def main():
    cfg = configure(TrainConfig)
    rt = setup_runtime(cfg.device, cfg.dtype, cfg.seed)
    check_config(cfg, rt)
    model, tokenizer, ckpt = init_model(cfg, rt)
    train_loader = PretrainLoader(cfg.data_dir, "train", cfg.micro_batch_size, cfg.block_size, rank=rt.rank,
                                  world_size=rt.world_size, seed=cfg.seed, mode=cfg.data_mode, device=rt.device)
    print0(f"train data: {train_loader.total_tokens:,} tokens in {cfg.data_dir}")

    def get_val_batches():
        return val_batches(cfg.data_dir, cfg.micro_batch_size, cfg.block_size, cfg.eval_tokens,
                           rank=rt.rank, world_size=rt.world_size, device=rt.device)

    summary = train(cfg, rt, model, tokenizer, train_loader, get_val_batches, kind="base", ckpt=ckpt)
    exit_if_stopped(summary)  # 143 after SIGTERM: a scheduler requeues the run
    print0(f"done: step {summary['step']}, best val loss {summary['best_val_loss']:.4f}, checkpoint in {cfg.out_dir}")
    cleanup_distributed()


if __name__ == "__main__":
    # a bad setting, shard or checkpoint: one `error:` line, exit code 2; a second Ctrl-C stops at once
    run_main(main, on_interrupt="stopped at once, without saving: the last checkpoint (if any) is intact; --init_from=resume goes on from it")
