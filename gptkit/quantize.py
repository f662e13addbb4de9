"""
Weights for decoding (sample.py, serve.py, eval.py, bench.py --mode=decode): --quantize=int8 (weight-only
int8) or, on a CPU, --quantize=fp16 (fp16 weights through fbgemm's fp16 GEMM).

    model, tokenizer, meta = load_model(path, device=rt.device, dtype=rt.weights_dtype, quantize="int8")
    print(precision_line(rt, "int8"))     # dtype and quantize, each with the reason it was chosen

Why: decoding one token reads every weight once, so on a CPU its speed is the speed of reading the
weights. int8 weights are a quarter of fp32's bytes (half of bf16's). Every Linear of the blocks and
the output head (a third of the 124M's weights) becomes an Int8Linear: weights rounded to int8 with
one scale per output channel (symmetric, max |w| / 127), the activations left as they are (weight-
only: nothing is quantized per token). The token and position embeddings stay as loaded: a lookup
reads one row, not the matrix. The head's weight is tied to the token embedding's, so the int8 copy
is made beside it.

The matmul: PyTorch's own int8 weight-only kernel (torch.ops.aten._weight_int8pack_mm: int8 weights
times bf16/fp16/fp32 activations, the per-channel scale applied on the output) where the device has it;
on a CPU its activations go in as bf16 (its fast path; the sum is fp32's, the output the model's
dtype). Where the kernel is missing the weights are widened to the activations' dtype at each call,
which saves memory, not time. docs/benchmarks.md has the figures and the quality cost.

fp16 (CPU only): every Linear of the blocks and the head becomes an Fp16Linear, its weights rounded to
fp16 (half of fp32's bytes) and packed for fbgemm's fp16 GEMM (torch.ops.quantized.linear_dynamic_fp16,
x86 CPUs with AVX2): the activations and the sums stay fp32, nothing is quantized per token, so a row's
answer never depends on the others in its batch. On a CPU without bf16 instructions it is the fastest
of the three, at one row and more: aten's int8 kernel widens its weights with bf16 arithmetic those
CPUs emulate, so 8 rows cost it 3x one row, fbgemm's fp16 kernel 2x (docs/benchmarks.md). On a GPU the
weights are bf16 or fp16 already (--dtype): fp16 is refused there.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptkit.configurator import ConfigError

QUANTIZE = ("none", "int8", "fp16")


def quantize_problems(value):
    if value not in QUANTIZE:
        return [f"quantize={value!r}: use none (the weights as loaded), int8 (weight-only int8, per channel) "
                "or fp16 (fp16 matmul weights on a CPU, the fastest where it has no bf16 instructions)"]
    return []


class Int8Linear(nn.Module):
    """A Linear with int8 weights (out, in) and an fp scale per output channel. `weight` dequantizes
    (for the few paths that need the matrix itself, such as the loss); forward never does on a CPU."""

    quantized = True  # GPT.num_params counts its matrix, which is not a parameter here

    def __init__(self, linear):
        super().__init__()
        w = linear.weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,): one per output channel
        self.register_buffer("qweight", torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(linear.weight.dtype))
        # the bias stays a (frozen) parameter: counted as the model's, cast with its dtype
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @property
    def weight(self):
        return self.qweight.to(self.scales.dtype) * self.scales[:, None]

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, in)
        if int8_kernel(x2.device):
            # On a CPU the kernel is fast with bf16 activations only (fp32 ones take a slow path;
            # docs/benchmarks.md). Its scales and output are in the activations' dtype: the scales go
            # in as ones and are applied after, in the model's dtype, so a bf16 sum is rounded once.
            act = torch.bfloat16 if x2.device.type == "cpu" else x2.dtype
            ones = torch.ones(self.out_features, dtype=act, device=x2.device)
            y = torch.ops.aten._weight_int8pack_mm(x2.to(act).contiguous(), self.qweight, ones)
            y = y.to(x.dtype) * self.scales.to(x.dtype)
        else:  # no int8 kernel on this device: widen the weights (less memory, not faster)
            y = F.linear(x2, self.qweight.to(x2.dtype)) * self.scales.to(x2.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"


class Fp16Linear(nn.Module):
    """A Linear whose weights are rounded to fp16 and packed for fbgemm's fp16 GEMM (CPU only): fp32
    activations in, fp32 sums, the output in the activations' dtype. `weight` unpacks (fp32 of the fp16
    values: the loss path reads it); the packed matrix is not a tensor, so .to() cannot move it."""

    quantized = True  # GPT.num_params counts its matrix, which is not a parameter here

    def __init__(self, linear):
        super().__init__()
        self.packed = torch.ops.quantized.linear_prepack_fp16(linear.weight.detach().float().cpu(), None)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @property
    def weight(self):
        return torch.ops.quantized.linear_unpack_fp16(self.packed)[0]

    def forward(self, x):
        if x.device.type != "cpu":
            raise RuntimeError(f"Fp16Linear runs on a CPU only (fbgemm's fp16 GEMM); got {x.device} activations")
        shape = x.shape
        y = torch.ops.quantized.linear_dynamic_fp16(x.reshape(-1, shape[-1]).float().contiguous(), self.packed)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, fp16 (fbgemm)"


def fp16_kernel():
    """True where fbgemm's fp16 GEMM runs (PyTorch's x86 builds, on CPUs with AVX2; asked once)."""
    if "fp16" not in _KERNEL:
        try:
            packed = torch.ops.quantized.linear_prepack_fp16(torch.ones(8, 32), None)
            torch.ops.quantized.linear_dynamic_fp16(torch.ones(1, 32), packed)
            _KERNEL["fp16"] = True
        except (RuntimeError, NotImplementedError, AttributeError):
            _KERNEL["fp16"] = False
    return _KERNEL["fp16"]


_KERNEL = {}  # what the probes found: int8_kernel's per device type, fp16_kernel's under "fp16"


def int8_kernel(device):
    """True where torch.ops.aten._weight_int8pack_mm runs on device (asked once per device type)."""
    if device.type not in _KERNEL:
        try:
            x = torch.ones(1, 32, device=device)
            torch.ops.aten._weight_int8pack_mm(x, torch.ones(8, 32, dtype=torch.int8, device=device),
                                               torch.ones(8, device=device))
            _KERNEL[device.type] = True
        except (RuntimeError, NotImplementedError):
            _KERNEL[device.type] = False
    return _KERNEL[device.type]


def quantize_model(model, quantize, device="cpu"):
    """Replace every Linear of model's blocks and its output head by an Int8Linear (quantize "int8") or
    an Fp16Linear ("fp16"), in place; "none" leaves it as it is. device: where the model will run (fp16
    is for a CPU with fbgemm, and says what to do elsewhere). -> model. For inference only."""
    if quantize == "none":
        return model
    if quantize_problems(quantize):
        raise ConfigError(quantize_problems(quantize)[0])
    if quantize == "fp16":
        if torch.device(device).type != "cpu":
            raise ConfigError(f"quantize=fp16 is fbgemm's CPU kernel, and this model runs on {device}: leave "
                              "quantize out (the weights are held in the run's dtype there) or use int8")
        if not fp16_kernel():
            raise ConfigError("quantize=fp16 needs fbgemm's fp16 GEMM, which this CPU or PyTorch build lacks "
                              f"(engines: {', '.join(torch.backends.quantized.supported_engines)}): use int8 or none")
    layer = Int8Linear if quantize == "int8" else Fp16Linear
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, layer(child))
    return model


# what the start-up line suggests on a CPU with fbgemm, by the dtype the weights are held in (bf16: a CPU
# with bf16 instructions; figures in docs/benchmarks.md)
FASTER_ON_CPU = {
    "float32": "; --quantize=fp16 decodes about 2x faster than fp32, int8 with the smallest matmul weights",
    "bfloat16": "; --quantize=fp16 or int8 decodes one answer about 2x faster than bf16, int8 with the smallest "
                "matmul weights",
}


def precision_line(rt, quantize, weights=None):
    """'dtype bfloat16 (why); weights int8 (why)': what the generation scripts print at the start.
    weights: the dtype the other weights are held in (None: rt.weights_dtype, as sample.py and serve.py)."""
    held = str(weights or rt.weights_dtype).removeprefix("torch.")
    if quantize == "int8":
        return (f"dtype {rt.dtype} ({rt.dtype_reason}); weights int8 (weight-only int8, a scale per channel: "
                f"a quarter of fp32's bytes to read per token; embeddings and norms {held})")
    if quantize == "fp16":
        return (f"dtype {rt.dtype} ({rt.dtype_reason}); weights fp16 (fbgemm's fp16 GEMM, fp32 sums: half of "
                f"fp32's bytes to read per token, the fastest on the CPUs measured; embeddings and norms {held})")
    hint = ""
    if rt.device_type == "cpu":
        hint = FASTER_ON_CPU.get(rt.dtype, "") if fp16_kernel() else "; --quantize=int8 reads a quarter of fp32's bytes per token"
    return f"dtype {rt.dtype} ({rt.dtype_reason}); weights {held} (as held for this dtype{hint})"
