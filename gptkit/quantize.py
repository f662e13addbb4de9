"""
Weight-only int8 for decoding (sample.py, serve.py, eval.py, bench.py --mode=decode: --quantize=int8).

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
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

QUANTIZE = ("none", "int8")


def quantize_problems(value):
    if value not in QUANTIZE:
        return [f"quantize={value!r}: use none (the weights as loaded) or int8 (weight-only int8, per channel)"]
    return []


class Int8Linear(nn.Module):
    """A Linear with int8 weights (out, in) and an fp scale per output channel. `weight` dequantizes
    (for the few paths that need the matrix itself, such as the loss); forward never does on a CPU."""

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


_KERNEL = {}


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


def quantize_model(model, quantize):
    """Replace every Linear of model's blocks and its output head by an Int8Linear, in place (quantize
    "int8"); "none" leaves it as it is. -> model. For inference only: nothing here trains."""
    if quantize == "none":
        return model
    if quantize_problems(quantize):
        raise ValueError(quantize_problems(quantize)[0])
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child))
    return model


def precision_line(rt, quantize, weights=None):
    """'dtype bfloat16 (why); weights int8 (why)': what the generation scripts print at the start.
    weights: the dtype the other weights are held in (None: rt.weights_dtype, as sample.py and serve.py)."""
    held = str(weights or rt.weights_dtype).removeprefix("torch.")
    if quantize == "int8":
        return (f"dtype {rt.dtype} ({rt.dtype_reason}); weights int8 (weight-only int8, a scale per channel: "
                f"a quarter of fp32's bytes to read per token; embeddings and norms {held})")
    hint = "; --quantize=int8 reads a quarter of fp32's bytes per token" if rt.device_type == "cpu" else ""
    return f"dtype {rt.dtype} ({rt.dtype_reason}); weights {held} (as held for this dtype{hint})"
