"""
LoRA (Hu et al. 2021, "Low-Rank Adaptation"): finetune a GPT by training a small low-rank update of
each chosen matrix while the base weights stay frozen, so that weights, gradients and AdamW state
of a 712M model fit a 12 GB card (docs/benchmarks.md).

    settings = LoRASettings(rank=16, alpha=32, dropout=0.05, targets=["attn", "mlp"])
    apply_lora(model, settings)               # in place: adapters added, everything else frozen
    with adapters_disabled(model): ...        # the base model again (DPO's reference)
    merge_adapters(model)                     # a plain GPT: each W + (alpha/r) B A folded in

Each adapted nn.Linear (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj) becomes a LoRALinear:
    y = x W^T + b + (alpha / r) * B A dropout(x)        A: (r, in), B: (out, r)
A starts as nn.Linear's weights do (kaiming uniform), B at zero, so at step 0 the model is its base
exactly. These are peft's LoRA formulas, initialisation and names (lora_A.weight, lora_B.weight), so
an adapter exports as a peft adapter folder unchanged (gptkit/hf.py); tests/test_lora.py checks
the logits against peft on the exported base. A short module here rather than peft itself: peft
would wrap the GPT in a PeftModel with other state-dict keys (base_model.model...base_layer.weight)
and hooks of its own, where wrapping four Linears keeps model.py, the checkpoint keys of the base and
the training loop as they are.

A LoRA run's checkpoint holds only what trained (the adapters, and the biases and LayerNorms when
train_norms) and names its base with a fingerprint of the base's weights (gptkit/loading.py rebuilds
the model from it).
"""

import contextlib
import hashlib
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

TARGETS = {"attn": ("attn.c_attn", "attn.c_proj"), "mlp": ("mlp.c_fc", "mlp.c_proj")}  # what each target adapts
BASE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class LoRASettings:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["attn", "mlp"])
    train_norms: bool = False    # also train every bias and LayerNorm
    base_dtype: str = "float32"  # bfloat16: the frozen block matrices held in bf16 (training only)
    base: str = ""               # where the base model comes from (a checkpoint, a Hugging Face folder or hub name)
    base_fingerprint: str = ""   # base_fingerprint() of the base's weights, to notice a base that changed

    @property
    def scale(self):
        return self.alpha / self.rank

    def module_names(self):
        """The suffixes of the adapted Linears' names, such as "attn.c_attn"."""
        return [name for target in self.targets for name in TARGETS[target]]

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**d)


class LoRALinear(nn.Module):
    """An nn.Linear with a low-rank adapter beside it (the formula in the module docstring). weight and
    bias are the wrapped Linear's own Parameters under their names, so the base's state dict still
    loads; lora_A, lora_B are fp32 whatever the base's dtype (AdamW's state stays fp32)."""

    def __init__(self, linear, rank, alpha, dropout):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        device = linear.weight.device
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # peft's and nn.Linear's init
        nn.init.zeros_(self.lora_B.weight)  # B = 0: the adapted model starts as the base
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.scale = alpha / rank
        self.adapter_enabled = True

    def delta_weight(self):
        """(alpha / r) B A: what the adapter adds to weight, (out, in) fp32."""
        return self.scale * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if not self.adapter_enabled:
            return y
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scale


def lora_modules(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def settings_of(model):
    """The LoRASettings of a model apply_lora adapted, or None for a plain model."""
    return getattr(model, "lora", None)


def base_fingerprint(model):
    """A short hash of a model's weights (names, shapes and every 997th value of each tensor, as
    stored): training changes every value, so a base trained further, or another one, hashes
    differently; sampling keeps it fast for a 712M model."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        sample = tensor.detach().flatten()[::997].float().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def apply_lora(model, settings):
    """Add adapters to model's blocks in place, as settings say, and freeze the rest -> model.
    model.lora is settings from then on (the checkpoint stores it)."""
    assert settings_of(model) is None, "the model already has adapters: merge_adapters first"
    for p in model.parameters():
        p.requires_grad_(False)
    if settings.train_norms:  # biases and LayerNorm gains: 0.1% of a 712M's parameters
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.requires_grad_(True)
    names = settings.module_names()
    for block in model.transformer.h:
        for name in names:
            parent_name, child_name = name.split(".")
            parent = getattr(block, parent_name)
            setattr(parent, child_name, LoRALinear(getattr(parent, child_name), settings.rank, settings.alpha,
                                                    settings.dropout))
    if settings.base_dtype != "float32":
        # the frozen matrices of the blocks: most of the weights; embeddings and norms stay fp32, so
        # the residual stream does too (autocast runs the matmuls in bf16 either way)
        for name, p in model.transformer.h.named_parameters():
            if p.dim() == 2 and not p.requires_grad:
                p.data = p.data.to(BASE_DTYPES[settings.base_dtype])
    model.lora = settings
    return model


def trainable_state_dict(model):
    """What a LoRA run trained, the part of the state dict its checkpoint holds: {name: tensor}."""
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in trained}


def load_trainable_state(model, state):
    """Load trainable_state_dict's tensors into a model apply_lora adapted -> a list of problems
    (names missing or unexpected; empty when it loaded)."""
    expected = set(trainable_state_dict(model))
    problems = [f"missing {sorted(expected - set(state))[:3]}"] if expected - set(state) else []
    problems += [f"unexpected {sorted(set(state) - expected)[:3]}"] if set(state) - expected else []
    if problems:
        return problems
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes: another rank, or another base
        return [str(e).splitlines()[-1].strip()]
    return []


@contextlib.contextmanager
def adapters_disabled(model):
    """Within it, model computes its base: every adapter off (a plain model is left as it is)."""
    modules = lora_modules(model)
    for m in modules:
        m.adapter_enabled = False
    try:
        yield model
    finally:
        for m in modules:
            m.adapter_enabled = True


@torch.no_grad()
def merge_adapters(model):
    """Fold every adapter into its weight (W + (alpha/r) B A, in fp32) -> model, a plain GPT again
    whose parameters all train, as a model loaded from a full checkpoint."""
    for block in model.transformer.h:
        for parent in (block.attn, block.mlp):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, LoRALinear):
                    linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                       device=child.weight.device, dtype=torch.float32)
                    linear.weight.copy_(child.weight.float() + child.delta_weight())
                    if child.bias is not None:
                        linear.bias.copy_(child.bias.float())
                    setattr(parent, child_name, linear)
    for p in model.parameters():
        p.requires_grad_(True)
    model.lora = None
    return model


def count_parameters(model):
    """-> (trainable, all) parameter counts (tied weights once)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
