"""
A gptkit model as one GGUF file, the format llama.cpp (llama-cli, llama-server), Ollama and LM
Studio read, written with the `gguf` package (llama.cpp's own reference writer).

    path, modelfile = export_gguf(model, "gguf/dolly.gguf", tok, gguf_type="q8_0", chat=True, system="...")

The model goes out as llama.cpp's "gpt2" architecture, which is ours: learned positions, pre-LN,
tanh GELU, one fused qkv matmul, the output layer tied to the token embeddings (llama.cpp reuses
token_embd when there is no output tensor). llama.cpp wants biases on every layer: a model trained
without them (bias=False) gets zeros, which compute the same. The padding rows of the embedding
(vocab_size past the tokenizer's n_vocab) are left out, so llama.cpp can never sample them, as
gptkit never does.

The tokenizer goes in as a byte-level BPE ("gpt2" model): the tokens as byte-level strings, the
merges in the order they were learned, and the control tokens (<|endoftext|>, <|system|>, ...)
marked CONTROL, so that text is only ever turned into one when llama.cpp is told to parse special
tokens (its chat templates do, for the template's own tokens). tokenizer.ggml.pre names the split
before BPE: "gpt-2" for GPT-2's pattern (GPT-2's tokenizer and train_tokenizer.py's default), whose
regex llama.cpp has built in. Writing the file directly, rather than through llama.cpp's converter,
means a trained tokenizer is not refused for a pre-tokenizer hash the converter does not know.

A chat model (finetune.py, dpo.py, rl.py) carries its chat template, the same Jinja as the
transformers export (gptkit/hf_tokenizer.py), so llama.cpp renders exactly gptkit's ids, and its
turn ends at <|end|> (end of generation in llama.cpp). Beside the file, an Ollama Modelfile with
the template in Ollama's syntax, the trained system prompt, the stop tokens and the model's context:

    ollama create dolly -f gguf/dolly.Modelfile && ollama run dolly

Types: f32 (exact), f16 (half the size), q8_0 (8-bit blocks of 32 with one scale: a quarter, the
usual choice for a laptop). The `gguf` package quantizes only the simple block types in Python;
for k-quants run llama.cpp's own `llama-quantize` on the f16 file (see the README).
"""

import json
import os

import gguf
import numpy as np
import torch

from gptkit.configurator import UserError
from gptkit.files import atomic_write
from gptkit.hf_tokenizer import chat_template, gpt2_vocab_and_merges
from gptkit.lora import settings_of
from gptkit.tokenizer import PATTERNS, SPECIAL_TOKENS

GGUF_TYPES = {  # --gguf_type -> (file type recorded in the header, the 2-D weights' type)
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which model.py uses
GPT2_PATTERN_PRE = "gpt-2"  # llama.cpp's pre-tokenizer with GPT-2's split regex


class GGUFError(UserError, ValueError):
    """A model or setting the GGUF export cannot write; the message says what to do."""


def gguf_type_problems(gguf_type):
    if gguf_type in GGUF_TYPES:
        return []
    return [f"gguf_type={gguf_type!r}: use {', '.join(GGUF_TYPES)} (for k-quants, run llama.cpp's llama-quantize "
            "on the f16 file)"]


def gguf_problems(model, tok, gguf_type):
    """What stops this model from going out as a GGUF of gguf_type -> a list of sentences."""
    cfg, problems = model.config, gguf_type_problems(gguf_type)
    if gguf_type == "q8_0":
        block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
        if cfg.n_embd % block:
            problems.append(f"q8_0 quantizes rows in blocks of {block} numbers and this model is n_embd={cfg.n_embd} "
                            f"wide: use --gguf_type=f16 (or f32)")
    if settings_of(model):
        problems.append("the model carries unmerged LoRA adapters: load it with merge_lora=True")
    if tok.hash != "gpt2" and tokenizer_pattern(tok) != "gpt2":
        problems.append(f"the tokenizer {tok.name} splits text with the GPT-4 pattern, which has no exact "
                        "counterpart among llama.cpp's built-in pre-tokenizers (llama-bpe differs on runs of "
                        "newlines): a GGUF would tokenize some text differently from gptkit; train the "
                        "tokenizer with --pattern=gpt2 to export it")
    return problems


def tokenizer_pattern(tok):
    """"gpt2" or "gpt4": the split pattern a trained tokenizer.json uses (train_tokenizer.py's PATTERNS)."""
    spec = json.loads(tok.to_string())
    regex = spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"]
    return next((name for name, pattern in PATTERNS.items() if pattern == regex), "other")


def gguf_vocab(tok):
    """tok -> (token strings by id, token types, merges "a b"): llama.cpp's byte-level BPE, ids as gptkit's."""
    if tok.hash == "gpt2":
        vocab, merges = gpt2_vocab_and_merges()
        vocab = {**vocab, **SPECIAL_TOKENS}
    else:
        model = json.loads(tok.to_string())["model"]
        vocab = {**model["vocab"], **tok.controls}
        # tokenizers writes merges as "a b" (older) or ["a", "b"] (0.20 and later)
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    tokens = [None] * tok.n_vocab
    for text, i in vocab.items():
        tokens[i] = text
    assert None not in tokens, "the tokenizer's ids are not 0..n_vocab-1"
    controls = set(tok.controls.values())
    types = [gguf.TokenType.CONTROL if i in controls else gguf.TokenType.NORMAL for i in range(tok.n_vocab)]
    return tokens, types, merges


def gguf_tensors(model, n_vocab):
    """The model's weights in llama.cpp's gpt2 names -> {name: float32 array}, PyTorch's (out, in)
    layout, which is ggml's (in, out). Biases the model lacks are zeros; embeddings cut to n_vocab."""
    cfg = model.config
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}

    def get(name, size):
        return sd[name] if name in sd else torch.zeros(size)

    out = {"token_embd.weight": sd["transformer.wte.weight"][:n_vocab],
           "position_embd.weight": sd["transformer.wpe.weight"],
           "output_norm.weight": sd["transformer.ln_f.weight"],
           "output_norm.bias": get("transformer.ln_f.bias", cfg.n_embd)}
    if not torch.equal(sd["lm_head.weight"], sd["transformer.wte.weight"]):  # untied: llama.cpp reads its own
        out["output.weight"] = sd["lm_head.weight"][:n_vocab]
    parts = {"attn_norm": ("ln_1", cfg.n_embd), "attn_qkv": ("attn.c_attn", 3 * cfg.n_embd),
             "attn_output": ("attn.c_proj", cfg.n_embd), "ffn_norm": ("ln_2", cfg.n_embd),
             "ffn_up": ("mlp.c_fc", 4 * cfg.n_embd), "ffn_down": ("mlp.c_proj", cfg.n_embd)}
    for i in range(cfg.n_layer):
        for ours, (theirs, width) in parts.items():
            out[f"blk.{i}.{ours}.weight"] = sd[f"transformer.h.{i}.{theirs}.weight"]
            out[f"blk.{i}.{ours}.bias"] = get(f"transformer.h.{i}.{theirs}.bias", width)
    return {k: v.contiguous().numpy() for k, v in out.items()}


def add_weight(writer, name, array, qtype):
    """One tensor in qtype (1-D ones, the norms and biases, stay f32 as in llama.cpp's files)."""
    if array.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, array.astype(np.float32))
    elif qtype == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, array.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)


def export_gguf(model, path, tok, gguf_type="f16", chat=False, system="", name="gptkit"):
    """Write model (and tok) to path as a GGUF of gguf_type, and an Ollama Modelfile beside it
    (path with .Modelfile for .gguf) -> (path, the Modelfile's path).
    The file is written under a temporary name and renamed: killed or out of disk mid-way, an
    earlier export at path stays whole."""
    problems = gguf_problems(model, tok, gguf_type)
    if problems:
        raise GGUFError("; ".join(problems))
    cfg = model.config
    file_type, qtype = GGUF_TYPES[gguf_type]
    writer = gguf.GGUFWriter(None, "gpt2")
    writer.add_name(name)
    writer.add_file_type(file_type)
    if qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(4 * cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_head_count(cfg.n_head)
    writer.add_layer_norm_eps(LAYER_NORM_EPS)
    tokens, types, merges = gguf_vocab(tok)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(GPT2_PATTERN_PRE)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # llama.cpp refuses a file without merges and gguf an empty array: a bytes-only tokenizer gets one
    # merge that never applies (of two control tokens, which BPE never sees: they are matched whole)
    writer.add_token_merges(merges or ["<|end|> <|end|>"])
    writer.add_bos_token_id(tok.eot)
    writer.add_eos_token_id(tok.end if chat else tok.eot)  # a chat reply ends at <|end|>
    writer.add_pad_token_id(tok.eot)
    # a document starts with <|endoftext|>, as gptkit's own completions do (gptkit/chat.py): llama.cpp puts
    # it before a base model's text; a chat model's template writes it itself (or it would come twice)
    writer.add_add_bos_token(not chat)
    writer.add_add_eos_token(False)
    if chat:
        writer.add_eot_token_id(tok.end)
        writer.add_chat_template(chat_template(system))
    for tensor_name, array in gguf_tensors(model, tok.n_vocab).items():
        add_weight(writer, tensor_name, array, qtype)

    tmp = f"{path}.tmp{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb") as f:  # on disk before the rename, as atomic_write does
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    modelfile = os.path.splitext(path)[0] + ".Modelfile"
    text = ollama_modelfile(os.path.basename(path), chat, system, context=cfg.block_size)
    atomic_write(modelfile, lambda f: f.write(text.encode("utf-8")))
    return path, modelfile


def ollama_modelfile(gguf_name, chat=False, system="", context=1024):
    """An Ollama Modelfile for a GGUF in the same folder. A chat model: gptkit's chat format as an
    Ollama (Go) template, the system prompt it was finetuned with (Ollama puts SYSTEM first in a chat
    that brings none, as gptkit's own template does) and <|end|> as its stop. A base model: the text
    as given (after <|endoftext|>, which llama.cpp adds), stopping at <|endoftext|>. context: the
    model's block_size, as num_ctx: learned positions end there, and llama.cpp aborts on a chat that
    runs past them where its context is longer (Ollama's default is)."""
    lines = [f"FROM ./{gguf_name}", f"PARAMETER num_ctx {context}"]
    if chat:
        template = "<|endoftext|>{{- range .Messages }}<|{{ .Role }}|>{{ .Content }}<|end|>{{- end }}<|assistant|>"
        lines.append(f'TEMPLATE """{template}"""')
        if system:
            lines.append(f'SYSTEM """{system}"""')
        lines.append('PARAMETER stop "<|end|>"')
    else:
        lines.append('TEMPLATE """{{ .Prompt }}"""')
    lines.append('PARAMETER stop "<|endoftext|>"')
    return "\n".join(lines) + "\n"
