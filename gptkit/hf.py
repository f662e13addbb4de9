"""
Hugging Face transformers <-> gptkit, both ways, for GPT-2-shaped models.

    model = load_hf_gpt2("path/to/gpt2-folder")    # a local GPT2LMHeadModel folder, or "gpt2" etc. when online
    export_hf(model, "hf/dolly", tok, chat=True)     # a folder transformers loads with no extra code
    export_peft_adapter(lora_model, "hf/dolly-lora", tok, chat=True)   # a LoRA run's adapters, for peft

This module owns the weights (state dicts both ways, the config mapping, reading a folder, the hub
download) and the export of a whole folder; the tokenizer files that go with it are
gptkit/hf_tokenizer.py's. gptkit/loading.py calls load_hf_gpt2 for a Hugging Face --ckpt or init_from.

Our GPT uses GPT-2's parameter names, so the mapping is one-to-one, with three differences:
- HF GPT-2 stores c_attn, c_proj and c_fc in its Conv1D layout, (in, out): the transpose of nn.Linear.
- Our vocabulary is padded to 50304 (the chat tokens live in the padding); GPT-2's is 50257. On import
  the extra rows start at the mean of GPT-2's embeddings (see from_hf_state_dict); on export all 50304
  rows go out, so HF's logits have the same width as ours.
- HF GPT-2 always has biases. A bias=False model is exported with zero biases, which leaves every
  logit unchanged, and config.json records "gptkit_bias": false so that importing the folder gives
  back a bias=False model (when those biases are still all zero).

Reading a folder needs only safetensors (or torch for pytorch_model.bin); transformers and
huggingface_hub are needed only to download a hub name. An export carries the tokenizer it is
given: GPT-2's files generated from tiktoken's ranks (so exporting works offline), or a trained
tokenizer's tokenizer.json (config.json's "gptkit_tokenizer" names its hash; no vocabulary padding
to 50304 then), and importing such a folder gives back the model with its tokenizer (hf_run_info).

A caveat of the exported tokenizer: Hugging Face tokenizers turn the text "<|user|>" inside a
message into the control token (they match added tokens in any text), where gptkit's own scripts
keep a person's text as ordinary text. Ids agree for every conversation that does not spell out a
control token.
"""

import json
import os

import safetensors.torch
import torch

from model import GPT, GPTConfig
from gptkit.configurator import UserError
from gptkit.files import atomic_write_files
from gptkit.hf_tokenizer import json_writer, tokenizer_files
from gptkit.lora import lora_modules, settings_of
from gptkit.system import print0
from gptkit.tokenizer import GPT2_VOCAB, TOKENIZER_FILE, pad_vocab

PADDED_VOCAB = pad_vocab(GPT2_VOCAB)  # ours: 50304, padded to a multiple of 64 (the chat tokens live in the padding)
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
BIASES = ("ln_1.bias", "attn.c_attn.bias", "attn.c_proj.bias", "ln_2.bias", "mlp.c_fc.bias", "mlp.c_proj.bias")

class HFError(UserError, ValueError):
    """A folder or model that cannot be converted; the message names it and says what to do."""


# ----------------------------------------------------------------------------- weights


def to_hf_state_dict(model):
    """Our GPT -> {HF GPT2LMHeadModel key: tensor}. The tied lm_head is left out (HF ties it to
    transformer.wte.weight); missing biases are written as zeros."""
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    C = model.config.n_embd
    out = {}
    for key, value in sd.items():
        if key == "lm_head.weight":
            continue  # the same tensor as transformer.wte.weight
        if key.endswith(CONV1D):
            value = value.t()
        out[key] = value.contiguous()
    if not model.config.bias:
        dtype = sd["transformer.wte.weight"].dtype
        sizes = (C, 3 * C, C, C, 4 * C, C)  # in the order of BIASES
        for i in range(model.config.n_layer):
            for name, size in zip(BIASES, sizes):
                out[f"transformer.h.{i}.{name}"] = torch.zeros(size, dtype=dtype)
        out["transformer.ln_f.bias"] = torch.zeros(C, dtype=dtype)
    return out


def _hf_config_to_ours(hf, where, **overrides):
    """Check that an HF config.json describes a GPT-2 our model can reproduce -> GPTConfig."""
    problems = []
    if hf.get("model_type") != "gpt2":
        problems.append(f"model_type is {hf.get('model_type')!r}, not 'gpt2'")
    archs = hf.get("architectures") or []
    if archs and not any(a in ("GPT2LMHeadModel", "GPT2Model") for a in archs):
        problems.append(f"architectures is {archs}, not GPT2LMHeadModel")
    if problems:
        raise HFError(f"{where} is not a GPT-2 checkpoint: {'; '.join(problems)}. Give a folder saved from "
                      "transformers' GPT2LMHeadModel (config.json + model.safetensors or pytorch_model.bin)")
    n_embd = hf.get("n_embd", 768)
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        problems.append(f"activation_function {hf['activation_function']!r} (ours is GPT-2's tanh GELU, gelu_new)")
    if hf.get("n_inner") not in (None, 4 * n_embd):
        problems.append(f"n_inner {hf['n_inner']} (ours is 4 * n_embd = {4 * n_embd})")
    if abs(hf.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12:
        problems.append(f"layer_norm_epsilon {hf['layer_norm_epsilon']} (ours is 1e-5)")
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
        problems.append("non-standard attention scaling")
    if hf.get("add_cross_attention", False):
        problems.append("cross-attention layers")
    if not hf.get("tie_word_embeddings", True):
        problems.append("untied input and output embeddings (ours are tied)")
    n_head = hf.get("n_head", 12)
    if not isinstance(n_head, int) or not isinstance(n_embd, int) or n_head < 1 or n_embd % n_head:
        problems.append(f"n_embd {n_embd} is not a multiple of n_head {n_head}")
    vocab = hf.get("vocab_size", GPT2_VOCAB)
    own_tokenizer = hf.get("gptkit_tokenizer", "gpt2") != "gpt2"  # a gptkit export with a trained tokenizer
    if vocab < GPT2_VOCAB and not own_tokenizer:
        problems.append(f"vocab_size {vocab}: gptkit's GPT-2 tokenizer needs at least {GPT2_VOCAB}")
    if problems:
        raise HFError(f"{where}: this GPT-2 variant cannot be loaded into gptkit's model: {'; '.join(problems)}")
    fields = dict(
        block_size=hf.get("n_positions", 1024),
        vocab_size=pad_vocab(vocab) if own_tokenizer else max(PADDED_VOCAB, pad_vocab(vocab)),
        n_layer=hf.get("n_layer", 12),
        n_head=n_head,
        n_embd=n_embd,
        dropout=0.0,
        bias=True,  # HF GPT-2 always has biases; a gptkit export without them is detected by the caller
    )
    fields.update(overrides)
    return GPTConfig(**fields)


def _read_folder_weights(folder):
    """All tensors of an HF folder: model.safetensors (or its shards) or pytorch_model.bin."""
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    binary = os.path.join(folder, "pytorch_model.bin")

    def read(path):
        try:
            return safetensors.torch.load_file(path)
        except Exception as e:  # safetensors' own error names neither the file nor the fix
            raise HFError(f"cannot read {path} ({type(e).__name__}: {e}): the file is truncated or corrupt; "
                          "download or export it again") from e

    if os.path.exists(single):
        return read(single)
    if os.path.exists(index):
        shards = sorted(set(_read_json(index)["weight_map"].values()))
        sd = {}
        for shard in shards:
            sd.update(read(os.path.join(folder, shard)))
        return sd
    if os.path.exists(binary):
        try:
            return torch.load(binary, map_location="cpu", weights_only=True)  # a .bin must not run code
        except Exception as e:
            raise HFError(f"cannot read {binary} safely ({type(e).__name__}: {e}); "
                          "convert it to model.safetensors with transformers' save_pretrained") from e
    raise HFError(f"{folder} holds no weights: expected model.safetensors, model.safetensors.index.json "
                  "or pytorch_model.bin next to config.json")


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, OSError) as e:
        raise HFError(f"cannot read {path} ({type(e).__name__}: {e}): download or export the folder again") from e


def from_hf_state_dict(hf_sd, ours, where="checkpoint"):
    """{HF key: tensor} -> ours, the state dict of a freshly initialised GPT with biases, filled in
    (wte rows past the checkpoint's vocabulary start at the mean of its rows). Keys may carry the "transformer." prefix
    (GPT2LMHeadModel) or not (GPT2Model, OpenAI's upload)."""
    hf_sd = {(k[len("transformer."):] if k.startswith("transformer.") else k): v for k, v in hf_sd.items()}
    # HF's attention mask buffers (h.N.attn.bias / masked_bias) are not weights
    hf_sd = {k: v for k, v in hf_sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    lm_head = hf_sd.pop("lm_head.weight", None)
    if lm_head is not None and "wte.weight" in hf_sd and not torch.equal(lm_head, hf_sd["wte.weight"]):
        raise HFError(f"{where}: lm_head.weight differs from wte.weight; gptkit's embeddings are tied")
    expected = {k[len("transformer."):] for k in ours if k.startswith("transformer.")}
    missing = sorted(expected - set(hf_sd))
    unexpected = sorted(set(hf_sd) - expected)
    if missing or unexpected:
        raise HFError(f"{where}: weights do not match a GPT-2 of this config; missing {missing[:5]}, "
                      f"unexpected {unexpected[:5]}")
    for key in expected:
        value = hf_sd[key]
        if key.endswith(CONV1D):
            value = value.t()
        target = ours["transformer." + key]
        if key == "wte.weight":
            if value.shape[1] != target.shape[1] or value.shape[0] > target.shape[0]:
                raise HFError(f"{where}: wte.weight has shape {tuple(value.shape)}, expected up to {tuple(target.shape)}")
            target[:value.shape[0]] = value.to(target.dtype)
            # The rows GPT-2 lacks (the chat tokens' slots) start at the mean of its rows, so each
            # scores the mean of the real logits: never likelier than an average token. Fresh random
            # rows would score near 0, far above a trained GPT-2's logits (about -35), and the
            # imported model would sample nothing but these slots.
            target[value.shape[0]:] = value.to(target.dtype).mean(0)
            continue
        if value.shape != target.shape:
            raise HFError(f"{where}: {key} has shape {tuple(value.shape)} but config.json implies "
                          f"{tuple(target.shape)}; the weights and config.json do not belong together")
        ours["transformer." + key] = value.to(target.dtype).contiguous()
    ours["lm_head.weight"] = ours["transformer.wte.weight"]
    return ours


def _download(name):
    """A hub name such as gpt2 or openai-community/gpt2-medium -> a local snapshot folder."""
    try:  # optional: only a hub download needs huggingface_hub
        from huggingface_hub import snapshot_download
    except ImportError:
        raise HFError(f"{name!r} is not a local folder; to download it from the Hugging Face hub, "
                      "pip install transformers (or give the path of a downloaded GPT-2 folder)")
    try:
        return snapshot_download(name, allow_patterns=["config.json", "model.safetensors",
                                                       "model.safetensors.index.json", "model-*.safetensors"])
    except Exception as e:  # huggingface_hub's messages run to several lines: the first one says what failed
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        raise HFError(f"{name!r} is not a local folder, and downloading it from the Hugging Face hub failed "
                      f"({type(e).__name__}: {first_line}). On a machine with internet, `hf download {name} "
                      f"--local-dir {os.path.basename(name)}` saves it as a folder: copy that here and give its "
                      "path instead") from e


HUB_PREFIXES = ("gpt2", "openai-community/gpt2", "distilgpt2", "distilbert/distilgpt2")


def is_hub_name(name):
    """True for a hub name of a GPT-2 (gpt2, gpt2-xl, openai-community/gpt2-medium, ...) that is not a
    local path. Other hub names are not guessed at: a mistyped path must not become a download."""
    return name.startswith(HUB_PREFIXES) and not os.path.exists(name)


def hf_run_info(name_or_path):
    """What a checkpoint dict would tell about a Hugging Face model: {"kind": "chat", "config":
    {"system": ...}} for a folder exported from a gptkit chat model, else {"kind": "base"}; and
    "tokenizer" (the tokenizer.json text) for an export made with a trained tokenizer."""
    config_path = os.path.join(name_or_path, "config.json")
    hf_config = _read_json(config_path) if os.path.isfile(config_path) else {}
    info = {"kind": "base"}
    if hf_config.get("gptkit_kind") == "chat":
        info = {"kind": "chat", "config": {"system": hf_config.get("gptkit_system", "")}}
    if hf_config.get("gptkit_tokenizer", "gpt2") != "gpt2":
        path = os.path.join(name_or_path, TOKENIZER_FILE)
        try:
            with open(path, encoding="utf-8") as f:
                info["tokenizer"] = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise HFError(f"{path}: cannot read the tokenizer this export was made with ({type(e).__name__}): "
                          "export the checkpoint again") from e
    return info


def is_hf_folder(path):
    """True for a folder that looks like a Hugging Face checkpoint: a model's config.json (it names a
    model_type; the config.json of a gptkit run that has not saved yet holds its settings) and no
    gptkit ckpt.pt."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path) or os.path.exists(os.path.join(path, "ckpt.pt")):
        return False
    try:
        with open(config_path, encoding="utf-8") as f:
            return "model_type" in json.load(f)
    except (OSError, ValueError):
        return True  # a damaged model folder: load_hf_gpt2 names the file and the fix


def load_hf_gpt2(name_or_path, verbose=True, **overrides):
    """A Hugging Face GPT-2 (local folder or hub name) -> our GPT on the CPU, in train mode.
    overrides: dropout, and block_size no longer than the checkpoint's (position embeddings are
    cut to it, for finetuning with a shorter context)."""
    unknown = sorted(set(overrides) - {"dropout", "block_size"})
    if unknown:
        raise HFError(f"load_hf_gpt2 can only override dropout and block_size, not {unknown}: "
                      "the other fields come from the checkpoint's config.json")
    name_or_path = os.path.expanduser(name_or_path)
    if os.path.isdir(name_or_path):
        folder = name_or_path
    elif os.path.exists(name_or_path) or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise HFError(f"{name_or_path} is not a folder: give a Hugging Face GPT-2 folder holding config.json "
                      "and model.safetensors (or a hub name such as gpt2 when online)")
    else:
        folder = _download(name_or_path)
    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        raise HFError(f"{folder} is not a Hugging Face checkpoint folder: it has no config.json")
    hf_config = _read_json(config_path)
    n_positions = hf_config.get("n_positions", 1024)
    if overrides.get("block_size", n_positions) > n_positions:
        raise HFError(f"block_size={overrides['block_size']} is longer than the {n_positions} positions "
                      f"{folder} was trained with: use block_size <= {n_positions}")
    config = _hf_config_to_ours(hf_config, folder, **overrides)
    hf_sd = _read_folder_weights(folder)
    for key in ("wpe.weight", "transformer.wpe.weight"):
        if key in hf_sd:
            hf_sd[key] = hf_sd[key][:config.block_size]  # a shorter context keeps the first positions
    model = GPT(config, verbose=False)
    sd = from_hf_state_dict(hf_sd, model.state_dict(), folder)
    model.load_state_dict(sd)
    if hf_config.get("gptkit_bias") is False:
        # exported from a bias=False gptkit model: drop the zero biases again, unless someone has
        # trained them since (then the model needs them and keeps bias=True)
        bias_keys = [k for k in sd if k.endswith(BIASES) or k == "transformer.ln_f.bias"]
        if all(not sd[k].any() for k in bias_keys):
            config = GPTConfig(**{**config.to_dict(), "bias": False})
            model = GPT(config, verbose=False)
            model.load_state_dict({k: v for k, v in sd.items() if k not in bias_keys})
    if verbose:
        print0(f"loaded Hugging Face GPT-2 from {folder}: {model.num_params():,} parameters, {config.n_layer} layers, "
               f"{config.n_embd} wide, T={config.block_size}, bias={config.bias}, "
               f"vocab {hf_config.get('vocab_size', GPT2_VOCAB)} -> {config.vocab_size}")
    return model


# ----------------------------------------------------------------------------- export


EXPORT_FILES = ["added_tokens.json", "config.json", "generation_config.json", "merges.txt", "model.safetensors",
                "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]  # with GPT-2's tokenizer
OWN_TOKENIZER_FILES = ["config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
                       TOKENIZER_FILE, "tokenizer_config.json"]  # with a trained one


def export_hf(model, out_dir, tok, chat=False, system=""):
    """Write out_dir for transformers: config.json, model.safetensors, generation_config.json and
    the tokenizer files of tok, the model's tokenizer (with the chat template when chat; system: the
    system prompt the model was finetuned with, which the template puts first when a chat brings
    none). Returns the list of files written.
    An export over an earlier one replaces it as one set, config.json last: killed or out of disk
    mid-way, the folder holds the earlier export whole, or no config.json (refused), never a mix."""
    cfg = model.config
    if settings_of(model):
        raise HFError("the model carries LoRA adapters: merge them first (gptkit.lora.merge_adapters), or write "
                      "them as a peft adapter folder (export_peft_adapter)")
    if cfg.vocab_size < tok.n_vocab:
        raise HFError(f"the model has {cfg.vocab_size} token embeddings; its tokenizer {tok.name} needs "
                      f"{tok.n_vocab}")
    hf_config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,  # padded: the chat tokens' rows, and logits as wide as ours
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "use_cache": True,
        "bos_token_id": tok.eot,
        "eos_token_id": tok.eot,
        "tie_word_embeddings": True,
        "torch_dtype": str(model.lm_head.weight.dtype).replace("torch.", ""),
        "gptkit_bias": cfg.bias,  # False: the biases below are zeros; import drops them again
        "gptkit_kind": "chat" if chat else "base",
        "gptkit_system": system if chat else "",  # sample.py --ckpt=<this folder> starts chats with it
        "gptkit_tokenizer": tok.hash,  # not gpt2: the tokenizer.json here is the model's
    }
    files = {
        "config.json": json_writer(hf_config),
        # the weights as bytes (safetensors writes files only by name): one more copy in memory, briefly
        "model.safetensors": lambda f: f.write(safetensors.torch.save(to_hf_state_dict(model),
                                                                      metadata={"format": "pt"})),
        "generation_config.json": json_writer({
            "bos_token_id": tok.eot,
            "eos_token_id": [tok.end, tok.eot] if chat else tok.eot,  # a chat reply stops at <|end|>
            "pad_token_id": tok.eot,
            # the padding slots have no text: never generated, as in gptkit.generate
            "suppress_tokens": list(range(tok.n_vocab, cfg.vocab_size)),
        }),
        **tokenizer_files(tok, chat=chat, model_max_length=cfg.block_size, system=system if chat else ""),
    }
    expected = EXPORT_FILES if tok.hash == "gpt2" else OWN_TOKENIZER_FILES
    assert sorted(files) == expected, f"export writes {sorted(files)}, expected {expected}"
    remove_stale(out_dir, expected)  # an earlier export's other tokenizer, or adapter: transformers would read them
    atomic_write_files(out_dir, files, marker="config.json")  # is_hf_folder and transformers look for it
    return expected


ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]
PEFT_PREFIX = "base_model.model."  # peft's PeftModelForCausalLM keys: base_model.model.<the GPT2LMHeadModel's name>


def export_peft_adapter(model, out_dir, tok, chat=False, system=""):
    """Write a LoRA model's adapters (gptkit/lora.py, unmerged) as a peft adapter folder:
    adapter_config.json, adapter_model.safetensors and the tokenizer files, which
    peft.PeftModel.from_pretrained(GPT2LMHeadModel of the base's export, out_dir) loads. Our
    lora_A (r, in) and lora_B (out, r) are peft's tensors as they are: peft's fan_in_fan_out=True
    handles GPT-2's transposed Conv1D layout. Returns the list of files written."""
    settings = settings_of(model)
    if settings is None:
        raise HFError("this model has no LoRA adapters: export it with export_hf (a full model folder)")
    if settings.train_norms:
        raise HFError("this LoRA run also trained biases and LayerNorms, which a peft LoRA adapter does not "
                      "carry: export the merged model instead (export_hf.py --merge_lora=True)")
    assert lora_modules(model), "settings without adapter modules"
    weights = {PEFT_PREFIX + name: value.detach().float().cpu().contiguous()
               for name, value in model.state_dict().items() if ".lora_A." in name or ".lora_B." in name}
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": settings.base,  # informational: the user gives the base model object
        "r": settings.rank,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": settings.module_names(),  # suffixes: "attn.c_proj" and "mlp.c_proj" stay apart
        "fan_in_fan_out": True,  # GPT-2's Conv1D stores (in, out)
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    files = {
        "adapter_config.json": json_writer(adapter_config),
        "adapter_model.safetensors": lambda f: f.write(safetensors.torch.save(weights, metadata={"format": "pt"})),
        **tokenizer_files(tok, chat=chat, model_max_length=model.config.block_size, system=system if chat else ""),
    }
    remove_stale(out_dir, files)
    atomic_write_files(out_dir, files, marker="adapter_config.json")
    return sorted(files)


def remove_stale(out_dir, files):
    """Remove an earlier export's files that this one does not write (a full model's, an adapter's, the
    other tokenizer's): transformers and peft would read them beside the new ones."""
    for stale in set(EXPORT_FILES + OWN_TOKENIZER_FILES + ADAPTER_FILES) - set(files):
        if os.path.exists(os.path.join(out_dir, stale)):
            os.remove(os.path.join(out_dir, stale))
