"""
A gptkit Tokenizer as Hugging Face tokenizer files, for an export that AutoTokenizer loads with the
same ids as gptkit (gptkit/hf.py writes them beside the weights).

    files = tokenizer_files(tok, chat=True, model_max_length=1024, system="Be brief.")
    # {file name: write_fn}: export_hf writes them with the weights, as one set (atomic_write_files)

GPT-2's tokenizer goes out as vocab.json + merges.txt (rebuilt from tiktoken's ranks, so exporting
works offline) plus our chat tokens in added_tokens.json; a tokenizer trained by train_tokenizer.py
goes out as its own tokenizer.json, which transformers reads as it is. Either way
tokenizer_config.json makes the control tokens whole, never-split special tokens, and a chat
export carries a chat template that renders exactly Tokenizer.render_conversation's ids.
"""

import functools
import json

from gptkit.tokenizer import EOT, SPECIAL_TOKENS, TOKENIZER_FILE, byte_alphabet, gpt2_encoding

# Jinja for transformers' apply_chat_template: the same ids as Tokenizer.render_conversation (and,
# with add_generation_prompt, render_prompt). One line, so no stray whitespace reaches the text.
CHAT_TEMPLATE = (
    "{{- '<|endoftext|>' -}}"
    # DEFAULT_SYSTEM: the system prompt the model was finetuned with, for chats that bring none
    "{%- if DEFAULT_SYSTEM and (messages | length == 0 or messages[0]['role'] != 'system') -%}"
    "{{- '<|system|>' + DEFAULT_SYSTEM + '<|end|>' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('message role must be system, user or assistant, not ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' and not loop.first -%}"
    "{{- raise_exception('a system message may only come first') -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>' + message['content'] + '<|end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)


def chat_template(system=""):
    """CHAT_TEMPLATE with its DEFAULT_SYSTEM set to system (the transformers and GGUF exports')."""
    # a Jinja string literal: json.dumps escapes quotes, backslashes and newlines the way Jinja
    # reads them, and ensure_ascii=False leaves other characters for Jinja to take as they are
    return "{%- set DEFAULT_SYSTEM = " + json.dumps(system, ensure_ascii=False) + " -%}" + CHAT_TEMPLATE


def json_writer(obj, indent=2):
    """write_fn for atomic_write_files: obj as UTF-8 JSON (the export's config files use it too)."""
    return lambda f: f.write((json.dumps(obj, indent=indent, ensure_ascii=False) + "\n").encode("utf-8"))


def _split_by_merges(token, ranks, max_rank):
    """Byte-pair-encode token using only merges of rank < max_rank: for a vocabulary token of
    rank r this leaves exactly the two parts whose merge created it."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best, best_rank = None, max_rank
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = i, rank
        if best is None:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts


@functools.lru_cache(maxsize=1)
def gpt2_vocab_and_merges():
    """(vocab {token string: id}, merges ["a b", ...]) in the format of GPT-2's encoder.json and
    vocab.bpe, rebuilt from tiktoken's ranks (a token's rank is its id; merge i makes id 256 + i)."""
    enc = gpt2_encoding()
    # ids 0..EOT-1 are GPT-2's BPE tokens, each its own rank (tiktoken's public API, no private ranks)
    ranks = {enc.decode_single_token_bytes(i): i for i in range(EOT)}
    alphabet = byte_alphabet()
    as_text = lambda b: "".join(alphabet[x] for x in b)
    vocab = {as_text(token): rank for token, rank in ranks.items()}
    vocab["<|endoftext|>"] = EOT
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = _split_by_merges(token, ranks, rank)
        assert len(parts) == 2, f"token {token!r} (rank {rank}) is not the merge of two earlier tokens"
        merges.append(f"{as_text(parts[0])} {as_text(parts[1])}")
    return vocab, merges


def tokenizer_files(tok, chat=False, model_max_length=1024, system=""):
    """tok's tokenizer files for AutoTokenizer.from_pretrained(out_dir) -> {file name: write_fn}:
    GPT-2's vocab.json and merges.txt plus our control tokens, or a trained tokenizer's own
    tokenizer.json (the `tokenizers` library's format, which transformers reads as it is)."""
    if tok.hash == "gpt2":
        vocab, merges = gpt2_vocab_and_merges()
        files = {"vocab.json": json_writer(vocab, indent=None),
                 "merges.txt": lambda f: f.write(("#version: 0.2\n" + "\n".join(merges) + "\n").encode("utf-8")),
                 "added_tokens.json": json_writer(SPECIAL_TOKENS)}
    else:
        files = {TOKENIZER_FILE: lambda f: f.write(tok.to_string().encode("utf-8"))}
    # Control tokens are matched whole, before BPE, and never stripped or normalised, so the text
    # between two of them is encoded on its own, exactly as our renderer does.
    added = tok.controls
    added_tokens_decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                     "single_word": False, "special": True} for t, i in added.items()}
    eos = "<|end|>" if chat else "<|endoftext|>"  # a chat model's turn ends with <|end|>
    chat_tokens = list(added)[1:]
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer" if tok.hash == "gpt2" else "PreTrainedTokenizerFast",
        "add_prefix_space": False,
        "add_bos_token": False,
        "bos_token": "<|endoftext|>",
        "eos_token": eos,
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "errors": "replace",
        "clean_up_tokenization_spaces": False,  # decode exactly what the ids spell, like tiktoken
        "model_max_length": model_max_length,
        "added_tokens_decoder": added_tokens_decoder,
        "additional_special_tokens": chat_tokens,
        "extra_special_tokens": chat_tokens,
    }
    if chat:
        tokenizer_config["chat_template"] = chat_template(system)
    files["tokenizer_config.json"] = json_writer(tokenizer_config)
    files["special_tokens_map.json"] = json_writer({
        "bos_token": "<|endoftext|>", "eos_token": eos, "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "additional_special_tokens": chat_tokens})
    return files
