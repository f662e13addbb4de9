"""
Training-speed benchmark of a config on the current device, with synthetic tokens.

    python bench.py config/fineweb_124m.py                      # tokens/s, MFU, peak memory
    python bench.py config/fineweb_712m.py --micro_batch_size=16 --compile=True
    python bench.py config/fineweb_124m.py --json=True          # one JSON line, for scripts
    python bench.py config/tiny_cpu.py --device=cpu --steps=3   # runs on a CPU too
    python bench.py config/fineweb_712m.py --lora_rank=16 --optimizer=adamw --micro_batch_size=1   # a LoRA finetune's step
    python bench.py config/fineweb_124m.py --mode=decode        # generation tokens/s, with and without KV cache
    python bench.py config/fineweb_124m.py --mode=decode --device=cpu --steps=3 --warmup=1   # the same on a CPU
    python bench.py config/fineweb_124m.py --mode=decode --decode_rows=8   # 8 sequences in one batch, as serve.py's
    python bench.py config/fineweb_124m.py --mode=decode --quantize=int8   # weight-only int8, as --quantize=int8 decodes (or fp16: a CPU's)
    python bench.py config/fineweb_124m.py --mode=decode --device=cpu --gguf_type=q8_0   # and llama.cpp on its GGUF, beside
    python bench.py --mode=tokenize --text=path/to/text_folder --num_proc=4   # prepare_fineweb's tokenizer
    python bench.py --mode=tokenize --text=path/to/text_folder --num_proc=1 --tokenizer=tokenizers/mytext

Each timed step is a full optimizer step (total_batch_tokens tokens with gradient accumulation).
`warmup` steps run first and are not timed (compilation, allocator warm-up, cuDNN autotuning);
the figure reported is the median of the timed steps. MFU is model FLOPs per token (6N + attention,
see model.flops_per_token) times tokens/s over the device's dense bf16 peak; for a device not in
the table no MFU is reported rather than a wrong one.
"""

import contextlib
import glob
import json
import os
import statistics
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm

from gptkit.configurator import ConfigError, UserError, config_dict, configure
from gptkit.documents import resolve_num_proc, tokenize_documents
from gptkit.generate import generate, generate_samples
from gptkit.gguf_export import export_gguf, gguf_type_problems
from gptkit.loading import add_adapters, model_vocab_size, run_tokenizer, scratch_model
from gptkit.losses import grad_accum_steps
from gptkit.optim import configure_optimizers, train_step
from gptkit.quantize import quantize_model, quantize_problems
from gptkit.system import device_peak_flops, print0, run_main, setup_runtime
from gptkit.train_config import LoRAConfig, TrainConfig
from gptkit.tokenizer import load_tokenizer
from model import CausalSelfAttention


def significant(x, digits=3):
    """x rounded to a few significant digits: a small input's figures stay readable, never 0.0."""
    return float(f"{x:.{digits}g}")


def mfu(flops_per_token, tokens_per_sec, peak_flops):
    """Model FLOPs utilisation: the share of the device's peak the model's useful arithmetic reaches."""
    if not peak_flops:
        return None
    return flops_per_token * tokens_per_sec / peak_flops


@dataclass
class BenchConfig(LoRAConfig, TrainConfig):
    # the benchmark (the model and batch settings above apply too)
    steps: int = 10           # timed repeats, the median is reported: optimizer steps (train), whole generations (decode)
    warmup: int = 3           # untimed steps first (torch.compile, autotuning)
    mode: str = "train"       # train | decode | tokenize
    text: str = ""            # tokenize: a folder of .txt (and .zip of .txt) files to tokenize
    num_proc: int = 0         # tokenize: processes (0: all cores)
    attention: str = "auto"   # auto | flash | cudnn | efficient | math: force one SDPA kernel, to compare
    pad_heads: bool = True    # pad head sizes that are not a multiple of 8 (712M: 54 -> 56) for the fused kernels
    json: bool = False        # print one JSON line instead of a table, with every setting under "config"
    coordinate_descent_tuning: bool = False  # inductor tunes its generated kernels' launch parameters (slower compile)
    decode_rows: int = 1      # decode: sequences decoded together, as serve.py's batch rows (tokens/s counts them all)
    no_cache: bool = True     # decode, one row: also time it without the KV cache (minutes on a CPU)
    quantize: str = "none"    # decode: int8 or fp16 matmul weights, as sample.py / serve.py --quantize=int8 or fp16
    gguf_type: str = ""       # decode: also time llama.cpp (llama-cpp-python) on the same model exported as this GGUF type

    def validate(self):
        problems = super().validate()
        if self.mode not in ("train", "decode", "tokenize"):
            problems.append(f"mode={self.mode!r}: use train, decode or tokenize")
        if self.steps < 1:
            problems.append(f"steps={self.steps}: the median needs at least 1 timed step (10 is usual)")
        if self.warmup < 0:
            problems.append(f"warmup={self.warmup}: use 0 or more untimed steps (3 is usual)")
        if self.mode == "train":
            problems += self.lora_problems()  # --lora_rank=16: a LoRA finetune's step (adapters train, the base frozen)
        elif self.lora_rank:
            problems.append(f"lora_rank={self.lora_rank} is for mode=train (a LoRA finetune's speed and memory)")
        problems += quantize_problems(self.quantize)
        if self.quantize != "none" and self.mode != "decode":
            problems.append(f"quantize={self.quantize} is for mode=decode (the generation scripts' matmul weights)")
        if self.gguf_type:
            problems += gguf_type_problems(self.gguf_type)
            if self.mode != "decode" or self.decode_rows != 1 or self.quantize != "none":
                problems.append(f"gguf_type={self.gguf_type} is for mode=decode with decode_rows=1 and no quantize "
                                "(llama.cpp's own q8_0 is the int8 to compare)")
        if self.decode_rows < 1:
            problems.append(f"decode_rows={self.decode_rows}: use 1 or more")
        if self.mode == "decode" and self.block_size < 2:
            problems.append(f"block_size={self.block_size}: mode=decode needs room for a prompt and a new token "
                            "(2 or more)")
        if self.mode == "tokenize":
            if not os.path.isdir(self.text):
                problems.append(f"text={self.text!r}: mode=tokenize needs a folder of .txt or .zip files")
            elif not text_files(self.text):
                problems.append(f"text={self.text!r}: no .txt or .zip files found in it or its subfolders; "
                                "give a folder that holds some")
        if self.attention not in ("auto", "flash", "cudnn", "efficient", "math"):
            problems.append(f"attention={self.attention!r}: use auto, flash, cudnn, efficient or math")
        on_cuda = self.device.startswith("cuda") or (self.device == "auto" and torch.cuda.is_available())
        if self.attention in ("cudnn", "efficient") and not on_cuda:
            problems.append(f"attention={self.attention}: a CUDA kernel; without a GPU use auto, flash or math")
        return problems


def sdpa_context(name):
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    return contextlib.nullcontext() if name == "auto" else sdpa_kernel(backends[name])


def bench_vocab(cfg):
    """-> (the model's vocabulary, the ids synthetic tokens are drawn below): the recipe's vocab_size,
    else the tokenizer of its data folder (GPT-2 when there is none yet), as training sizes it; the
    ids are the tokenizer's n_vocab, the ones a model trained on that data reads and writes."""
    tok = run_tokenizer(cfg)
    return model_vocab_size(cfg, tok), tok.n_vocab


def attention_kernels(model, rt, cfg):
    """Names of the attention kernels that actually run in a forward+backward (from the profiler):
    the GPU kernels on CUDA, elsewhere the ATen op that SDPA dispatched to (and its backward)."""
    on_cuda = rt.device_type == "cuda"
    x = torch.randint(0, bench_vocab(cfg)[1], (1, cfg.block_size), device=rt.device)
    activity = ProfilerActivity.CUDA if on_cuda else ProfilerActivity.CPU
    with sdpa_context(cfg.attention), profile(activities=[activity]) as prof:
        with rt.autocast():
            _, loss = model(x, x)
        loss.backward()
    names = {e.key for e in prof.key_averages()}
    if on_cuda:
        found = sorted(n for n in names if any(s in n.lower() for s in
                                               ("flash", "fmha", "cudnn", "attention", "sdpa", "efficient")))
    else:
        # e.g. aten::_scaled_dot_product_flash_attention_for_cpu; aten::scaled_dot_product_attention
        # (no underscore) is only the entry point that chooses it
        found = sorted(n for n in names if n.startswith("aten::_scaled_dot_product"))
    model.zero_grad(set_to_none=True)
    return "; ".join(n[:80] for n in found[:4]) or "none matched"


def bench_train(cfg, rt):
    vocab_size, n_vocab = bench_vocab(cfg)
    model = scratch_model(cfg, vocab_size, verbose=not cfg.json).to(rt.device)  # random weights: speed does not depend on them
    model.activation_checkpointing = cfg.activation_checkpointing
    if cfg.lora_rank:
        add_adapters(model, cfg, rt, source="scratch")
    CausalSelfAttention.pad_heads = cfg.pad_heads
    kernels = attention_kernels(model, rt, cfg)
    optimizers = configure_optimizers(model, cfg, rt.device_type)
    scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.needs_grad_scaler)
    if cfg.coordinate_descent_tuning:
        import torch._inductor.config as inductor_config  # inductor loads for this option only (seconds to import)
        inductor_config.coordinate_descent_tuning = True
    forward_model = torch.compile(model) if cfg.compile else model
    grad_accum = grad_accum_steps(cfg, world_size=1)
    # Synthetic tokens: speed does not depend on the text; a few different batches avoid cache effects.
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    rows = [torch.randint(0, n_vocab, (cfg.micro_batch_size, cfg.block_size + 1), generator=gen)
            for _ in range(min(grad_accum, 4))]
    batches = [(r[:, :-1].contiguous().to(rt.device), r[:, 1:].contiguous().to(rt.device)) for r in rows]
    micro_batches = [batches[i % len(batches)] for i in range(grad_accum)]

    def step():  # exactly the training loop's step (gptkit.trainer.train_step)
        train_step(model, optimizers, micro_batches, cfg, rt, scaler, forward_model=forward_model)

    times = []
    with sdpa_context(cfg.attention):
        for i in range(cfg.warmup + cfg.steps):
            if i == cfg.warmup and rt.device_type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            rt.synchronize()
            t0 = time.perf_counter()
            step()
            rt.synchronize()
            if i >= cfg.warmup:
                times.append(time.perf_counter() - t0)
    step_time = statistics.median(times)
    tokens_per_sec = grad_accum * cfg.micro_batch_size * cfg.block_size / step_time
    device_name = torch.cuda.get_device_name(rt.device) if rt.device_type == "cuda" else rt.device_type
    return {
        "mode": "train",
        "device": device_name,
        "torch": torch.__version__,
        "params": model.num_params(),
        "tokens_per_sec": round(tokens_per_sec),
        "mfu": mfu(model.flops_per_token(), tokens_per_sec, device_peak_flops(device_name)),
        "step_time_s": round(step_time, 4),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated(rt.device) / 1e9, 2) if rt.device_type == "cuda" else None,
        "dtype": rt.dtype,
        "compile": cfg.compile,
        "attention": cfg.attention,
        "attention_kernels": kernels,
        "pad_heads": cfg.pad_heads,
        "coordinate_descent_tuning": cfg.coordinate_descent_tuning,
        "activation_checkpointing": cfg.activation_checkpointing,
        "lora_rank": cfg.lora_rank,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "micro_batch_size": cfg.micro_batch_size,
        "grad_accum": grad_accum,
        "block_size": cfg.block_size,
        "steps": cfg.steps,
    }


def bench_decode(cfg, rt):
    """Generation speed of a randomly initialised model: greedy, 64-token prompt, 128 new tokens,
    with the KV cache (one token per forward) and without (the whole sequence every token), for one
    sequence, or decode_rows of them in one batch (with the cache only). A context shorter than 192
    gets a prompt of at most half of it and as many new tokens as fit. The ids sampled stop at the
    data tokenizer's n_vocab, as for a model trained on that data."""
    vocab_size, n_vocab = bench_vocab(cfg)
    # the weights in the compute dtype, as sample.py and serve.py hold them
    model = scratch_model(cfg, vocab_size, dropout=0.0, verbose=not cfg.json)
    model = quantize_model(model, cfg.quantize, rt.device).to(rt.device, rt.weights_dtype).eval()
    prompt_tokens = min(64, cfg.block_size // 2)
    prompt = torch.randint(0, n_vocab, (prompt_tokens,), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    new_tokens = min(128, cfg.block_size - len(prompt))
    result = {"mode": "decode", "device": torch.cuda.get_device_name(rt.device) if rt.device_type == "cuda"
              else rt.device_type, "torch": torch.__version__, "dtype": rt.dtype, "quantize": cfg.quantize,
              "params": model.num_params(),
              "prompt_tokens": len(prompt), "new_tokens": new_tokens, "rows": cfg.decode_rows, "n_vocab": n_vocab}
    # several rows: with the cache only, as serve.py decodes (without it a batch recomputes every row's whole sequence)
    cache_modes = (True, False) if cfg.decode_rows == 1 and cfg.no_cache else (True,)
    # without the cache a long generation takes minutes on a CPU: show that it moves (stderr, so --json stays clean)
    bar = tqdm(total=len(cache_modes) * (cfg.warmup + cfg.steps), unit="generation", desc="decode", file=sys.stderr)
    for use_cache in cache_modes:
        bar.set_postfix_str("with KV cache" if use_cache else "without KV cache")
        times = []
        for i in range(cfg.warmup + cfg.steps):
            rt.synchronize()
            t0 = time.perf_counter()
            # under the runtime's autocast, as sample.py generates (not generate's own default)
            kwargs = dict(temperature=0, use_cache=use_cache, autocast=rt.autocast, n_vocab=n_vocab)
            if cfg.decode_rows == 1:
                n = sum(1 for _ in generate(model, prompt, new_tokens, **kwargs))
            else:
                n = sum(map(len, generate_samples(model, prompt, cfg.decode_rows, new_tokens, **kwargs)))
            rt.synchronize()
            if i >= cfg.warmup:
                times.append(time.perf_counter() - t0)
            bar.update(1)
        key = "kv_cache" if use_cache else "no_cache"
        result[f"{key}_tokens_per_sec"] = round(n / statistics.median(times), 1)
    bar.close()
    if cfg.gguf_type:
        result["llama_cpp_tokens_per_sec"] = bench_llama_cpp(cfg, model, prompt, new_tokens)
        result["gguf_type"] = cfg.gguf_type
    return result


def bench_llama_cpp(cfg, model, prompt, new_tokens):
    """llama.cpp's greedy decode of the same model, prompt and length, from a GGUF of cfg.gguf_type
    (export_hf.py --gguf's file), on as many threads as PyTorch uses -> tokens/s (median)."""
    try:
        import llama_cpp  # a test dependency (requirements-dev.txt), needed only for this comparison
    except ImportError:
        raise UserError("gguf_type needs llama-cpp-python: pip install -r requirements-dev.txt") from None
    tok = run_tokenizer(cfg)
    with tempfile.TemporaryDirectory() as folder:
        path, _ = export_gguf(model.float(), os.path.join(folder, "bench.gguf"), tok, cfg.gguf_type)
        llm = llama_cpp.Llama(path, n_ctx=cfg.block_size, n_threads=torch.get_num_threads(), verbose=False)
        try:
            times = []
            for i in range(cfg.warmup + cfg.steps):
                t0 = time.perf_counter()
                n = 0
                for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
                    n += 1
                    if n == new_tokens:
                        break
                if i >= cfg.warmup:
                    times.append(time.perf_counter() - t0)
        finally:
            llm.close()
    return round(n / statistics.median(times), 1)


def text_files(folder):
    """The .txt and .zip files in folder and its subfolders, sorted."""
    paths = glob.glob(os.path.join(folder, "**", "*"), recursive=True)
    return sorted(p for p in paths if p.endswith((".txt", ".zip")))


def read_documents(folder):
    """Every .txt in folder (and inside its .zip files), cut into documents of about 4 KB, the
    size of a typical FineWeb-Edu page."""
    texts = []
    for path in text_files(folder):
        if path.endswith(".txt"):
            with open(path, encoding="utf-8", errors="replace") as f:
                texts.append(f.read())
        elif path.endswith(".zip"):
            with zipfile.ZipFile(path) as z:
                texts += [z.read(n).decode("utf-8", "replace") for n in sorted(z.namelist()) if n.endswith(".txt")]
    documents = []
    for text in texts:
        current = ""
        for paragraph in text.split("\n\n"):
            current += paragraph + "\n\n"
            if len(current) > 4000:
                documents.append(current)
                current = ""
        if current.strip():
            documents.append(current)
    return documents


def bench_tokenize(cfg):
    """prepare_fineweb's parallel tokenizer (with --tokenizer=PATH a trained one) against a plain
    single-process tiktoken loop of the same tokenizer (GPT-2's or the trained one) on the same documents."""
    tok = load_tokenizer(cfg.tokenizer or "gpt2")
    documents = read_documents(cfg.text)
    if not documents:  # empty .txt files, or .zip files without any .txt inside
        raise ConfigError(f"text={cfg.text!r}: its .txt and .zip files hold no text to tokenize")
    megabytes = sum(len(d.encode()) for d in documents) / 1e6
    t0 = time.perf_counter()
    n_plain = sum(len(tok.enc.encode_ordinary(d)) + 1 for d in documents)  # + each document's <|endoftext|>
    plain_s = time.perf_counter() - t0
    num_proc = resolve_num_proc(cfg.num_proc)
    t0 = time.perf_counter()
    n_ours = sum(len(a) for a in tokenize_documents(documents, tok, num_proc))
    ours_s = time.perf_counter() - t0
    return {"mode": "tokenize", "tokenizer": tok.name, "documents": len(documents), "megabytes": significant(megabytes),
            "tokens": n_ours, "plain_tiktoken_mb_per_s": significant(megabytes / plain_s),
            "plain_tiktoken_tokens_per_s": round(n_plain / plain_s),
            "num_proc": num_proc, "mb_per_s": significant(megabytes / ours_s), "tokens_per_s": round(n_ours / ours_s),
            "mb_per_s_per_proc": significant(megabytes / ours_s / num_proc), "cpu_count": os.cpu_count()}


def main():
    cfg = configure(BenchConfig)
    if cfg.mode == "tokenize":
        result = bench_tokenize(cfg)
    else:
        rt = setup_runtime(cfg.device, cfg.dtype, cfg.seed, verbose=not cfg.json, inference=cfg.mode == "decode",
                           quantize=cfg.quantize)
        result = bench_train(cfg, rt) if cfg.mode == "train" else bench_decode(cfg, rt)
    if cfg.json:
        print(json.dumps({**result, "config": config_dict(cfg)}))
        return
    width = max(len(key) for key in result)
    for key, value in result.items():
        if key == "mfu":
            value = f"{value * 100:.1f}%" if value is not None else "n/a (device not in the peak table)"
        print0(f"{key:>{width}}: {value}")


if __name__ == "__main__":
    run_main(main)  # a setting that cannot run: one `error:` line, exit code 2
