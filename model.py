"""
The GPT language model: GPT-2's architecture in one file.

Pre-LayerNorm transformer blocks, GELU MLP (tanh approximation, as GPT-2), learned position
embeddings, input and output embeddings tied, optional biases and dropout, attention through
PyTorch's fused scaled_dot_product_attention. Parameter names follow GPT-2
(wte wpe h.N.ln_1 attn.c_attn attn.c_proj ln_2 mlp.c_fc mlp.c_proj ln_f lm_head), so weights map
one-to-one onto Hugging Face's GPT2LMHeadModel.

Nothing about devices, DDP, torch.compile or logging lives here: the model is plain nn.Module.

    from model import GPT, GPTConfig
    model = GPT(GPTConfig(n_layer=12, n_head=12, n_embd=768))
    _, loss = model(idx, targets)                # idx, targets: (B, T) int64; targets -1 = no loss
    logits, _ = model(idx)                       # (B, T, V)
    logits, _ = model(idx, last_only=True)       # (B, 1, V): the last position's, all generation needs
"""

import math
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
from torch.nn import functional as F


LOSS_CHUNK_ROWS = 4096  # tokens per chunk of ChunkedCrossEntropy: 4096 x 50304 fp32 logits = 824 MB


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (x @ weight.T) against targets (-1: ignored); with_grad=False for evaluation.

    The plain way writes the (N, V) logits (N = B*T tokens, V = 50304), keeps them in bf16 and fp32
    for the backward and then writes their gradient: at N = 16K that is about 8 GB, more than the
    rest of the 124M's activations. Here each chunk of rows computes its logits, log-sum-exp and
    softmax gradient, then at once its share of the input gradient and the weight gradient; only
    those two (N x C and V x C) are kept for the backward. The same matmuls run (one forward, two
    backward), so the FLOPs are unchanged. Numerically it is F.cross_entropy on fp32 logits."""

    @staticmethod
    def forward(ctx, x, weight, targets, with_grad=True):
        n_valid = (targets != -1).sum()
        loss_sum = torch.zeros((), dtype=torch.float32, device=x.device)
        if with_grad:
            grad_x = torch.empty_like(x)
            # kept transposed (C x V): x.T @ dlogits reads dlogits in the layout it was written in
            grad_w_t = torch.zeros(weight.size(1), weight.size(0), dtype=torch.float32, device=x.device)
        columns = torch.arange(weight.size(0), device=x.device)
        for start in range(0, x.size(0), LOSS_CHUNK_ROWS):
            xc, tc = x[start:start + LOSS_CHUNK_ROWS], targets[start:start + LOSS_CHUNK_ROWS]
            valid = (tc != -1).unsqueeze(1)
            logits = (xc @ weight.t()).float()  # under autocast a bf16 matmul; the softmax in fp32
            lse = torch.logsumexp(logits, dim=1, keepdim=True)  # fp32: in bf16 it loses precision over 50k logits
            # d(sum of losses)/d(logits) = softmax - one_hot, written two ways for speed (same values):
            if torch.compiler.is_compiling():
                # out of place, a compare instead of gather/scatter: inductor fuses the loss and the
                # gradient into one pass over the logits (H100: output layer + loss 24% less time)
                is_target = columns == tc.unsqueeze(1)  # all False in rows with target -1
                loss_sum += torch.where(is_target, lse - logits, 0.0).sum()
                dlogits = (logits - lse).exp() - is_target.float() if with_grad else None
            else:
                # eager: in place in the logits' memory, no second (rows x V) buffer (2x faster on CPU)
                safe_t = tc.clamp(min=0).unsqueeze(1)
                loss_sum += torch.where(valid, lse - logits.gather(1, safe_t), 0.0).sum()
                dlogits = logits.sub_(lse).exp_().scatter_add_(1, safe_t, torch.full_like(lse, -1.0)) if with_grad else None
            if not with_grad:  # evaluation
                continue
            # Masked rows are zeroed through xc and the output rows (N x C), not the (N x V) logits.
            # The 1/n_valid comes after the matmuls, so that in fp16 these O(1) values do not underflow.
            dlogits = dlogits.to(weight.dtype)
            grad_x[start:start + LOSS_CHUNK_ROWS] = (dlogits @ weight) * valid
            grad_w_t += (xc * valid).to(weight.dtype).t() @ dlogits
        if with_grad:
            scale = 1.0 / n_valid.clamp(min=1).float()  # no targets at all: zero gradient, not NaN
            ctx.save_for_backward(grad_x * scale, grad_w_t.t() * scale)
            ctx.weight_dtype = weight.dtype
        return loss_sum / n_valid  # NaN without any target, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_loss, (grad_w * grad_loss).to(ctx.weight_dtype), None, None


@dataclass
class GPTConfig:
    block_size: int = 1024    # context length T
    vocab_size: int = 50304   # GPT-2's 50257 padded to a multiple of 64 (faster matmuls); chat tokens live in the padding
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0      # 0 for pretraining; people raise it for finetuning
    bias: bool = False        # biases in Linear and LayerNorm: GPT-2 had them, without is a bit better and faster

    def to_dict(self):
        return asdict(self)


class KVCache:
    """Keys and values of every layer for incremental decoding, preallocated to max_len positions.

    Each row is its own sequence, of its own length: pos (B,) is how many positions row b holds.
    A forward call appends its T new tokens to every row at that row's own positions
    pos[b] .. pos[b]+T-1, and each new token attends to the filled positions of its own row up to
    itself (an explicit boolean mask when the rows' lengths differ), so prompts of different lengths
    decode in one batch: a server's requests that joined at different times. rows(i, j) is a view of
    rows i..j-1 (writing to it writes this cache): a joining request is prefilled into its row alone,
    and copy_row moves a sequence into a free row, so a finished row's memory serves the next one.
    When all rows have one length (one prompt, or num_samples copies of it) attention runs exactly
    as it did with a single position for the whole batch."""

    def __init__(self, config, batch_size, max_len, device, dtype, k=None, v=None, pos=None):
        head_size = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, max_len, head_size)
        self.config = config
        self.k = torch.zeros(shape, device=device, dtype=dtype) if k is None else k  # (L, B, nh, max_len, hs)
        self.v = torch.zeros(shape, device=device, dtype=dtype) if v is None else v  # (L, B, nh, max_len, hs)
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=device) if pos is None else pos  # (B,)
        self.max_len = max_len
        self.step = None  # where the forward call in progress writes, and what it sees (begin)

    def reset(self):
        self.pos.zero_()

    def rows(self, start, stop):
        """Rows start..stop-1 as a cache of their own; a view, so what it stores lands in this one."""
        return KVCache(self.config, stop - start, self.max_len, None, None, self.k[:, start:stop],
                       self.v[:, start:stop], self.pos[start:stop])

    def copy_row(self, dst, source, src):
        """Row dst becomes a copy of row src of `source` (this cache or another of the same shape)."""
        n = int(source.pos[src])
        self.k[:, dst, :, :n] = source.k[:, src, :, :n]
        self.v[:, dst, :, :n] = source.v[:, src, :, :n]
        self.pos[dst] = n

    def begin(self, T):
        """Before a forward call of T tokens per row: the token positions (B, T) and, for attention,
        the number of keys to read and the mask (None: one length for all rows, see attend)."""
        lo, hi = int(self.pos.min()), int(self.pos.max())  # one sync per call, not per layer
        positions = self.pos[:, None] + torch.arange(T, device=self.pos.device)  # (B, T)
        mask = None
        if lo != hi:
            keys = torch.arange(hi + T, device=self.pos.device)  # (n_keys,)
            mask = (keys[None, None, :] <= positions[:, :, None]).unsqueeze(1)  # (B, 1, T, n_keys): own row, causal
        self.step = (lo if lo == hi else None, positions, hi + T, mask)
        return positions

    def store(self, layer, k, v):
        """k, v (B, nh, T, hs) of the call in progress -> keys and values to attend to, (B, nh, n_keys, hs) each,
        with its mask (B, 1, T, n_keys) and is_causal for SDPA."""
        start, positions, n_keys, mask = self.step
        T = k.size(2)
        if start is not None:  # one length for all rows: a slice, and the single-sequence masks
            self.k[layer, :, :, start:start + T] = k
            self.v[layer, :, :, start:start + T] = v
            # SDPA's is_causal aligns the mask top-left, which is wrong when queries start at `start`:
            # a single new token sees everything, a chunk needs an explicit mask
            if start == 0:
                mask, is_causal = None, True
            else:
                is_causal = False
                if T > 1:
                    mask = torch.ones(T, start + T, dtype=torch.bool, device=k.device).tril(diagonal=start)
        else:  # rows of different lengths: each writes at its own positions, the mask keeps rows apart
            rows = torch.arange(k.size(0), device=k.device)[:, None]  # (B, 1)
            self.k[layer, rows, :, positions] = k.transpose(1, 2).to(self.k.dtype)  # indexed (B, T, nh, hs)
            self.v[layer, rows, :, positions] = v.transpose(1, 2).to(self.v.dtype)
            is_causal = False
        return self.k[layer, :, :, :n_keys], self.v[layer, :, :, :n_keys], mask, is_causal

    def end(self, grown):
        """After the call: every row grew by T tokens, or by its own count (a (B,) tensor: right-padded rows)."""
        self.pos += grown
        self.step = None


class CausalSelfAttention(nn.Module):
    pad_heads = True  # on CUDA, pad odd head sizes to a multiple of 8 (see forward); bench.py can turn it off

    def __init__(self, config, layer_idx):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, kv_cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        mask, is_causal = None, True
        if kv_cache is not None:
            k, v, mask, is_causal = kv_cache.store(self.layer_idx, k, v)  # (B, nh, n_keys, hs): this row's past too
            k, v = k.to(q.dtype), v.to(q.dtype)
        head_size = C // self.n_head
        pad = (-head_size) % 8 if (q.is_cuda and self.pad_heads) else 0
        if pad:
            # The fused kernels (flash, cuDNN) want head sizes that are multiples of 8; the 712M
            # model's is 54. Zero columns change neither q.k nor the kept columns of the output,
            # so padding to 56 and slicing back computes exactly the same attention, just faster.
            q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           scale=1.0 / math.sqrt(head_size))
        if pad:
            y = y[..., :head_size]
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU; keeps weights interchangeable with it
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None):
        x = x + self.attn(self.ln_1(x), kv_cache)  # pre-LN: normalise the branch input, keep the residual clean
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):

    def __init__(self, config, verbose=True):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Tied embeddings: the output projection is the token embedding (GPT-2; saves V*C parameters).
        self.transformer.wte.weight = self.lm_head.weight
        # Recompute each block in the backward pass instead of storing its activations: less
        # memory for a small card, about a third more compute. Set by the training script.
        self.activation_checkpointing = False
        self.init_weights()
        if verbose:
            print(f"GPT: {self.num_params():,} parameters "
                  f"({config.n_layer} layers, {config.n_head} heads, {config.n_embd} wide, T={config.block_size})")

    def init_weights(self):
        """GPT-2 initialisation, all of it here:

        | parameters                       | init                              |
        |----------------------------------|-----------------------------------|
        | wte (= lm_head), wpe             | normal(0, 0.02)                   |
        | c_attn, c_fc weights             | normal(0, 0.02)                   |
        | attn.c_proj, mlp.c_proj weights  | normal(0, 0.02 / sqrt(2*n_layer)) |
        | all biases                       | 0                                 |
        | LayerNorm weight / bias          | 1 / 0                             |

        The residual projections are scaled down because each block adds two of them to the
        residual stream; without it the stream's variance grows with depth."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = residual_std if name.endswith("c_proj") else 0.02
                torch.nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    torch.nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                if module is not self.transformer.wte:  # wte is lm_head.weight, initialised above
                    torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                torch.nn.init.ones_(module.weight)
                if module.bias is not None:
                    torch.nn.init.zeros_(module.bias)

    def num_params(self, non_embedding=False):
        """Parameter count; tied weights counted once. non_embedding leaves out the position
        embeddings (the token embedding stays: it is also the output layer and does real work)."""
        n = sum(p.numel() for p in self.parameters())
        # quantized matrices (gptkit/quantize.py) are not parameters; the head's is a copy of wte, counted already
        n += sum(m.in_features * m.out_features for m in self.modules()
                 if getattr(m, "quantized", False) and m is not self.lm_head)
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx, targets=None, kv_cache=None, last_only=False, lengths=None):
        """idx (B, T) token ids -> (logits (B, T, V), None), or with targets (B, T) -> (None, loss):
        the mean loss over the positions whose target is not -1, computed without materialising
        the logits. With kv_cache, idx continues the sequence already in the cache. last_only:
        logits (B, 1, V) of the last position only, the one generation samples from. lengths (B,),
        with kv_cache: idx is right-padded, row b's first lengths[b] tokens are real (prompts of
        different lengths prefilled together); each row's cache grows by its own length (the padding
        is never attended to: it lies past the row's end, and the next tokens overwrite it), and
        last_only gives each row's last real position."""
        if last_only and targets is not None:
            raise ValueError("last_only=True is for generation, which has no targets: pass targets or "
                             "last_only, not both")
        B, T = idx.size()
        start = int(kv_cache.pos.max()) if kv_cache is not None else 0  # the longest row
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than the model's context "
                             f"of {self.config.block_size}")
        if kv_cache is not None and start + T > kv_cache.max_len:
            # caught here, before any layer writes into it, so the cache stays usable
            raise ValueError(f"the KV cache holds {kv_cache.max_len} positions and {start} are used: {T} more "
                             "do not fit; make the cache with new_kv_cache(batch_size, max_len=...) long enough "
                             "for the prompt and every token to generate")
        if kv_cache is not None:
            pos = kv_cache.begin(T)  # (B, T): each row goes on from its own length
        else:
            pos = torch.arange(T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            if self.activation_checkpointing and self.training and kv_cache is None:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, kv_cache)
        x = self.transformer.ln_f(x)
        if kv_cache is not None:
            kv_cache.end(T if lengths is None else lengths)
        if targets is not None:
            # Training and evaluation need only the loss: compute it (and its gradient) chunk by
            # chunk, never holding the (B*T, V) logits, the largest activation by far.
            weight = self.lm_head.weight
            with_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
            return None, ChunkedCrossEntropy.apply(x.view(B * T, -1), weight, targets.reshape(-1), with_grad)
        if last_only:
            # the output layer (V = 50304 wide: a third of the 124M's weights, most of a tiny
            # model's) runs on the one position that is sampled, not on all T
            last = x[:, -1:, :] if lengths is None else x[torch.arange(B, device=x.device), lengths - 1][:, None]  # (B, 1, C)
            return self.lm_head(last), None  # (B, 1, V)
        return self.lm_head(x), None  # (B, T, V)

    def param_groups(self, weight_decay):
        """AdamW groups: decay on 2-D weights (matmuls, embeddings), none on biases and LayerNorm."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    def hidden_matrices(self):
        """The 2-D weights inside the blocks: what Muon optimises (embeddings and the head stay on AdamW)."""
        return [p for p in self.transformer.h.parameters() if p.dim() == 2 and p.requires_grad]

    def flops_per_token(self):
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6 per parameter plus
        12*L*C*T for the attention scores and weighted sum. Position embeddings do no matmul work,
        so they are left out; norm gains and biases are counted though they do none either (as in
        PaLM's 6N: 0.01% of the total at 124M)."""
        cfg = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    def new_kv_cache(self, batch_size, max_len=None, dtype=None):
        p = self.transformer.wte.weight  # a parameter in every model (lm_head may hold int8, gptkit/quantize.py)
        return KVCache(self.config, batch_size, max_len or self.config.block_size, p.device, dtype or p.dtype)
