"""
Where and how the scripts run: device, precision, DDP, seeding, rank-0 printing, metric logging,
and one `error:` line for a user's mistake (run_main).

    rt = setup_runtime(cfg.device, cfg.dtype, cfg.seed)   # prints the device and dtype it chose and why
    with rt.autocast():
        logits, loss = model(x, y)
"""

import contextlib
import errno
import json
import os
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from gptkit.configurator import ConfigError, UserError


def print0(*args, **kwargs):
    """print on rank 0 only, so that 8 processes do not print everything 8 times."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


@dataclass
class Runtime:
    device: str          # "cuda:0", "cpu", "mps"
    device_type: str     # "cuda", "cpu", "mps"
    dtype: str           # "float32", "bfloat16", "float16": the compute dtype of autocast
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    dtype_reason: str = ""  # why pick_dtype chose dtype, for the scripts that print it

    @property
    def ddp(self):
        return self.world_size > 1

    @property
    def master(self):
        return self.rank == 0

    @property
    def ptdtype(self):
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.dtype]

    @property
    def weights_dtype(self):
        """What sample.py and serve.py hold the weights in: bf16 when computing in bf16 (half the bytes
        to read per token, and fp32's range, so nothing overflows), else fp32 under autocast (fp16's
        range is too small for a residual stream trained in fp32 or bf16)."""
        return torch.bfloat16 if self.dtype == "bfloat16" else torch.float32

    @property
    def needs_grad_scaler(self):
        return self.dtype == "float16"  # fp16 gradients underflow without loss scaling; bf16 has fp32's range

    def autocast(self):
        if self.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.ptdtype)

    def synchronize(self):
        if self.device_type == "cuda":
            torch.cuda.synchronize()
        elif self.device_type == "mps":
            torch.mps.synchronize()


# Peak throughput, for MFU (model FLOPs utilisation)

# Dense bf16 tensor-core peaks in FLOP/s, with fp32 accumulation (what PyTorch's bf16 matmuls use;
# GeForce cards run that at half their fp16-accumulate rate). Matched as a substring of
# torch.cuda.get_device_name(), first match wins, so the more specific names come first.
PEAK_FLOPS = [
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),        # SXM
    ("A100", 312e12),
    ("L40S", 362e12),
    ("RTX 6000 Ada", 364e12),
    ("RTX A6000", 155e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("RTX 3080 Ti", 68e12),
    ("RTX 3080", 59.5e12),
    ("V100", 125e12),        # no bf16: its fp16 peak
    ("T4", 65e12),           # no bf16: its fp16 peak
]


def device_peak_flops(device_name):
    """Peak FLOP/s of a GPU by its name, or None when it is not in PEAK_FLOPS (then no MFU is reported)."""
    if not device_name:
        return None
    for key, flops in PEAK_FLOPS:
        if key.lower() in device_name.lower():
            return flops
    return None


def pick_device(device="auto", local_rank=0):
    """-> (device, reason)."""
    if device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device={device} asked for, but PyTorch sees no CUDA GPU "
                              "(is this a CPU-only torch build?); use --device=cpu or --device=auto")
        if device == "mps" and not torch.backends.mps.is_available():
            raise ConfigError("device=mps asked for, but MPS is not available; use --device=cpu")
        if device == "cuda":
            device = f"cuda:{local_rank}"
        return device, "as configured"
    if torch.cuda.is_available():
        return f"cuda:{local_rank}", f"CUDA GPU found: {torch.cuda.get_device_name(local_rank)}"
    if torch.backends.mps.is_available():
        return "mps", "Apple GPU (MPS) found, no CUDA"
    return "cpu", "no CUDA or MPS GPU found"


def cpu_computes_bf16():
    """True on CPUs with bf16 instructions (AVX512-BF16 or AMX: Zen 4, Sapphire Rapids and newer), where
    PyTorch's bf16 matmuls run at about twice the speed of fp32's; elsewhere they are emulated, and slow."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own probes (private names)
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def pick_dtype(dtype, device_type, inference=False, quantize="none"):
    """-> (dtype name, reason). Mixed precision only where it pays and is safe. inference: for sample.py,
    serve.py and bench.py's decode, which hold the weights in this dtype (gptkit/loading.py) rather than
    autocast them; quantize: their --quantize, which on a CPU can settle the dtype."""
    if dtype != "auto":
        if dtype == "bfloat16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("dtype=bfloat16 asked for, but this GPU does not support it; "
                              "use --dtype=float16 (with loss scaling) or --dtype=auto")
        return dtype, "as configured"
    if device_type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "the GPU supports bf16 (fp32's range, no loss scaling needed)"
        return "float16", "the GPU has no bf16; fp16 with a gradient scaler"
    if device_type == "mps":
        return "float16", "MPS: fp16 autocast"
    if inference and quantize == "fp16":
        # fbgemm's fp16 GEMM takes fp32 activations and sums in fp32: bf16 ones are widened at every
        # matmul, at the same speed (docs/benchmarks.md), and would only round the rest of the model
        return "float32", "--quantize=fp16 computes in fp32: bf16 activations would add rounding, not speed"
    if inference and cpu_computes_bf16():
        # decoding reads every weight for each token: bf16 weights are half the bytes, and this CPU
        # multiplies them natively (124M: 2x the tokens/s of fp32, docs/benchmarks.md)
        return "bfloat16", "CPU with bf16 instructions: weights in bf16 decode 2x faster; --dtype=float32 for full precision"
    return "float32", "CPU: bf16 autocast is slow on most processors"


def init_distributed(device_type_hint="auto"):
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set) -> (rank, local_rank, world_size)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return 0, 0, 1
    rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    use_nccl = torch.cuda.is_available() and device_type_hint in ("auto", "cuda") or device_type_hint.startswith("cuda:")
    if use_nccl:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_nccl else "gloo")
    return rank, local_rank, world_size


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


def setup_runtime(device="auto", dtype="auto", seed=1337, verbose=True, inference=False, quantize="none"):
    """inference: dtype=auto picks the dtype to hold the weights in for decoding, given quantize (pick_dtype)."""
    rank, local_rank, world_size = init_distributed(device)
    device, device_reason = pick_device(device, local_rank)
    device_type = device.split(":")[0]
    dtype, dtype_reason = pick_dtype(dtype, device_type, inference, quantize)
    if device_type == "cuda":
        torch.cuda.set_device(device)
        # TF32 for the fp32 matmuls that remain (optimizer, fp32 runs): ~free speed on Ampere and newer
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seed_everything(seed + rank)
    rt = Runtime(device=device, device_type=device_type, dtype=dtype, rank=rank, local_rank=local_rank,
                 world_size=world_size, dtype_reason=dtype_reason)
    if verbose:
        print0(f"device: {device} ({device_reason}); dtype: {dtype} ({dtype_reason})"
               + (f"; {world_size} processes" if world_size > 1 else ""))
    return rt


def run_main(main, *args, on_interrupt=""):
    """Run a script's main(*args). A UserError (a bad setting, file or checkpoint; its message says what
    to do) or a full disk ends the process with one `error:` line and exit code 2, not a traceback that
    buries the message. Under torchrun every rank meets the same setting problem, so rank 0 says it;
    a full disk is said by the rank that met it (rank 0 writes checkpoints and logs). Ctrl-C that
    reaches here ends it with one `interrupted` line (and on_interrupt: what is kept) and exit code 130."""
    said_by_any_rank = False
    try:
        return main(*args)
    except KeyboardInterrupt:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"\ninterrupted{': ' + on_interrupt if on_interrupt else ''}", file=sys.stderr, flush=True)
        cleanup_distributed(finished=False)
        sys.exit(130)
    except UserError as e:
        message = str(e)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        said_by_any_rank = True
        again = "run the same command again (a training run: with --init_from=resume)"
        intact = ("checkpoints, shards and prepared data are only ever replaced by complete files, so the last "
                  "good ones are intact")
        if e.filename and os.path.basename(e.filename).startswith("ckpt."):
            intact = "the last checkpoint is intact"
            if not os.path.exists(e.filename):  # the run's first save: there is nothing to resume from
                intact, again = "no checkpoint had been saved yet", "run the same command again"
        message = (f"the disk is full{f' (writing {e.filename})' if e.filename else ''}; {intact}. Free some space, "
                   f"then {again}.")
    if said_by_any_rank or int(os.environ.get("RANK", "0")) == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    cleanup_distributed(finished=False)
    sys.exit(2)


STOPPED_EXIT_HELP = ("SIGTERM or Ctrl-C save a checkpoint and exit with status 128 + the signal's number (143 after "
                     "SIGTERM, 130 after Ctrl-C), not 0, so a job scheduler sees the run did not finish and can "
                     "requeue it with --init_from=resume.")


def exit_if_stopped(summary):
    """After train(): a run a signal stopped before max_steps (its checkpoint saved) leaves the process
    group and exits with status 128 + the signal's number, as a process that signal ended would
    (STOPPED_EXIT_HELP); a finished run returns."""
    if summary.get("stopped_by"):
        cleanup_distributed()
        sys.exit(128 + summary["stopped_by"])


def cleanup_distributed(finished=True):
    """Leave the process group. finished: every rank got here normally, so wait for all of them first;
    a rank that tears down while another still talks to it (rank 0 writing the last checkpoint)
    can abort in gloo's C++ threads. After an error no barrier: a rank that did not fail would hang."""
    if dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


class MetricsLogger:
    """Writes each record to <out_dir>/log.jsonl (one JSON object per line) and to wandb when
    asked. Only rank 0 writes; on other ranks every call does nothing, so callers never branch."""

    def __init__(self, out_dir, enabled=True, wandb_log=False, wandb_project="gptkit", wandb_run_name=None,
                 config=None, resume=False):
        self.enabled = enabled
        self.file = None
        self.wandb = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        self.file = open(os.path.join(out_dir, "log.jsonl"), "a" if resume else "w", encoding="utf-8")
        if wandb_log:
            try:
                import wandb  # optional: only runs that log to wandb need it
            except ImportError:
                raise ConfigError("wandb_log=True but wandb is not installed: pip install wandb")
            self.wandb = wandb.init(project=wandb_project, name=wandb_run_name, config=config,
                                    resume="allow" if resume else None)

    def log(self, step, **metrics):
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3)}
        record.update({k: (float(v) if isinstance(v, (np.floating, torch.Tensor)) else v) for k, v in metrics.items()})
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k not in ("step", "time")}, step=step)

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
