"""
The tokenizer: GPT-2's BPE (the default) or a byte-level BPE trained by train_tokenizer.py, behind
one interface, with the chat control tokens.

    tok = load_tokenizer("gpt2")                      # or the path of a trained tokenizer (folder or .json)
    tok.eot, tok.system, tok.user, tok.assistant, tok.end   # control-token ids
    tok.controls     # {"<|endoftext|>": id, "<|system|>": id, ...}: the same, by name
    tok.n_vocab      # ids in use (text tokens + control tokens); ids at or above are padding, never sampled
    tok.vocab_size   # the model's embedding rows: n_vocab padded to a multiple of 64 (faster matmuls)
    tok.hash         # "gpt2", or "bpe-" + sha256 of the tokenizer file: what data folders record
    tok.to_string()  # what a checkpoint carries: "gpt2" or the whole tokenizer.json text

There is no process-wide tokenizer: it travels with what it belongs to. A data folder records the
one that made it (data_tokenizer), a checkpoint carries its model's (checkpoint_tokenizer), and
gptkit/loading.py hands it out beside the model; code that needs ids is given a Tokenizer.

Id layout. GPT-2: ids 0..50255 text, <|endoftext|> 50256, <|system|> 50257, <|user|> 50258,
<|assistant|> 50259, <|end|> 50260 (in GPT-2's padding slots, so GPT-2 ids are unchanged).
A trained tokenizer: <|endoftext|> 0, <|system|> 1, <|user|> 2, <|assistant|> 3, <|end|> 4, the 256
single bytes from 5, then its merges in the order they were learned.

Text from people and datasets always goes through encode(), which never produces a control
token: a user who types "<|assistant|>" gets those characters as ordinary text. Control tokens
are only ever placed by render_conversation() and render_prompt().

A conversation renders as
    <|endoftext|><|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|><|user|>...
with loss on the assistant's tokens and the <|end|> that closes them.

Encoding always runs in tiktoken (the fastest encoder we measured, docs/benchmarks.md): a trained
tokenizer's merges become tiktoken ranks (a token's rank is its id, so merges apply in the order
they were learned, as in the `tokenizers` library; tests check both give the same ids).
"""

import codecs
import functools
import hashlib
import json
import os
import sys

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

from gptkit.configurator import UserError
from gptkit.files import atomic_write

CONTROL_TOKENS = ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
# GPT-2's ids, kept for GPT-2-only code and tests; everything else reads the tokenizer's attributes
EOT = 50256
GPT2_VOCAB = EOT + 1  # GPT-2's own vocabulary (50256 BPE tokens + <|endoftext|>); the chat tokens lie above
SPECIAL_TOKENS = {"<|system|>": 50257, "<|user|>": 50258, "<|assistant|>": 50259, "<|end|>": 50260}
SYSTEM, USER, ASSISTANT, END = SPECIAL_TOKENS.values()
MIN_VOCAB_SIZE = END + 1  # GPT-2 + chat tokens
MAX_VOCAB = 65536  # shards and SFT files store uint16 ids
TOKENIZER_FILE = "tokenizer.json"  # the file a trained tokenizer (folder) and a data folder hold
# train_tokenizer.py's split before BPE (--pattern); a trained tokenizer.json records which
PATTERNS = {
    # GPT-2's split: contractions, words, numbers, punctuation runs, white space
    "gpt2": r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    # GPT-4's (cl100k): case-insensitive contractions, numbers of at most 3 digits, newlines apart
    "gpt4": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""",
}


class TokenizerError(UserError, ValueError):
    """A missing, corrupt or unusable tokenizer file; the message names it and says what to do."""


def pad_vocab(n):
    return -(-n // 64) * 64


@functools.lru_cache(maxsize=1)
def byte_alphabet():
    """The byte-level BPE byte -> printable character map (GPT-2's vocab.json, the `tokenizers`
    ByteLevel pre-tokenizer): bytes that are visible characters stand for themselves, the others
    (control characters, space, ...) move in order to the code points from 256 up."""
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    alphabet, extra = {}, 0
    for b in range(256):
        if b in visible:
            alphabet[b] = chr(b)
        else:
            alphabet[b] = chr(256 + extra)
            extra += 1
    return alphabet


SHIPPED_GPT2 = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "samples", "gpt2")


def gpt2_encoding():
    """tiktoken's GPT-2 BPE (downloaded once), or gptkit's shipped copy of its files when offline."""
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        return _shipped_gpt2(e)


def _shipped_gpt2(error):
    """GPT-2's BPE from the copies of its two files shipped in samples/gpt2, for a machine that cannot
    reach tiktoken's download site: the same files, checked against the same hashes, give the same ids.
    Says so once (GPTKIT_GPT2_NOTED keeps the scripts quickstart.py runs from saying it again)."""
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(
            os.path.join(SHIPPED_GPT2, "vocab.bpe"), os.path.join(SHIPPED_GPT2, "encoder.json"),
            vocab_bpe_hash="1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
            encoder_json_hash="196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783")
    except Exception as e:
        raise UserError(
            "could not load the GPT-2 tokenizer files: tiktoken downloads them once from "
            "openaipublic.blob.core.windows.net and that failed "
            f"({type(error).__name__}: {error}), and gptkit's copies in {SHIPPED_GPT2} could not be read "
            f"({type(e).__name__}: {e}). Connect to the internet once, or set TIKTOKEN_CACHE_DIR "
            "to a folder that holds tiktoken's cached gpt2 files (vocab.bpe and encoder.json "
            "under their sha1 names).") from e
    if not os.environ.get("GPTKIT_GPT2_NOTED"):
        print(f"note: tiktoken could not fetch GPT-2's tokenizer files ({type(error).__name__}); using gptkit's "
              f"copies in {os.path.relpath(SHIPPED_GPT2)}", file=sys.stderr, flush=True)
        os.environ["GPTKIT_GPT2_NOTED"] = "1"
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=GPT2_VOCAB)


def _bpe_encoding(text, where):
    """A trained tokenizer.json's text -> (tiktoken Encoding, its control-token ids); checks the
    layout train_tokenizer.py writes and names the file when it is not that."""
    try:
        spec = json.loads(text)
        model, pre = spec["model"], spec["pre_tokenizer"]
        vocab = model["vocab"]
        added = {t["content"]: t["id"] for t in spec["added_tokens"]}
        split = pre["pretokenizers"][0]
        pattern = split["pattern"]["Regex"]
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise TokenizerError(f"{where} is not a tokenizer made by train_tokenizer.py ({type(e).__name__}: {e}): "
                             "train one with `python train_tokenizer.py --source=... --out=...`, or use "
                             "--tokenizer=gpt2") from e
    if model.get("type") != "BPE" or split.get("type") != "Split" or added != {t: i for i, t in enumerate(CONTROL_TOKENS)}:
        raise TokenizerError(f"{where} is not a byte-level BPE with the control tokens {', '.join(CONTROL_TOKENS)} at "
                             "ids 0-4: train it with train_tokenizer.py")
    inverse = {c: b for b, c in byte_alphabet().items()}
    try:
        ranks = {bytes(inverse[c] for c in token): i for token, i in vocab.items() if token not in added}
    except KeyError as e:
        raise TokenizerError(f"{where}: token with character {e} is not byte-level BPE: train it with "
                             "train_tokenizer.py") from e
    n_vocab = len(ranks) + len(added)
    if n_vocab > MAX_VOCAB or sorted(ranks.values()) != list(range(len(added), n_vocab)):
        raise TokenizerError(f"{where}: its ids are not 0..{n_vocab - 1} without gaps, or exceed {MAX_VOCAB}: the "
                             "file is corrupt; train the tokenizer again")
    enc = tiktoken.Encoding(name="gptkit_bpe", pat_str=pattern, mergeable_ranks=ranks, special_tokens=added)
    return enc, added


class Tokenizer:
    """Use load_tokenizer() / tokenizer_from_string() rather than this constructor."""

    def __init__(self, text="gpt2", where="gpt2"):
        self.source = text  # "gpt2" or a tokenizer.json's text: what checkpoints carry
        if text == "gpt2":
            base = gpt2_encoding()
            ids = {"<|endoftext|>": EOT, **SPECIAL_TOKENS}
            # a copy of gpt2 that also knows our control tokens, so decode() can show them
            self.enc = tiktoken.Encoding(name="gpt2_chat", pat_str=base._pat_str,
                                         mergeable_ranks=base._mergeable_ranks,
                                         special_tokens={**base._special_tokens, **SPECIAL_TOKENS})
            self.name, self.hash = "gpt2", "gpt2"
        else:
            self.enc, ids = _bpe_encoding(text, where)
            self.hash = "bpe-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
            self.name = f"{self.hash} from {where}"
        self.eot, self.system, self.user, self.assistant, self.end = (ids[t] for t in CONTROL_TOKENS)
        self.controls = {t: ids[t] for t in CONTROL_TOKENS}  # control token -> id, in CONTROL_TOKENS order
        self.roles = {"system": self.system, "user": self.user, "assistant": self.assistant}
        self.n_vocab = max(ids.values()) + 1 if text == "gpt2" else self.enc.n_vocab
        self.vocab_size = pad_vocab(self.n_vocab)

    def to_string(self):
        return self.source

    def encode(self, text):
        """Ordinary text -> ids. Never yields a control token, whatever the text contains."""
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts, num_threads=8):
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids if int(i) < self.n_vocab], errors="replace")

    def token_bytes(self, token_id):
        if token_id >= self.n_vocab:
            return b""  # an unused padding slot: a model that samples it prints nothing
        return self.enc.decode_single_token_bytes(int(token_id))

    def render_conversation(self, messages):
        """messages: [{"role": "system"|"user"|"assistant", "content": str}, ...]
        -> (ids, mask): mask is 1 on the assistant's tokens and their closing <|end|>, else 0."""
        ids, mask = [self.eot], [0]
        for i, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role not in self.roles:
                raise ValueError(f"message {i} has role {role!r}: use system, user or assistant")
            if not isinstance(content, str):
                raise ValueError(f"message {i} ({role}) has no text content")
            if role == "system" and i != 0:
                raise ValueError("a system message may only come first")
            body = self.encode(content) + [self.end]
            learn = 1 if role == "assistant" else 0
            ids.append(self.roles[role])
            mask.append(0)  # the role token is the prompt's, not something the model must produce
            ids.extend(body)
            mask.extend([learn] * len(body))
        return ids, mask

    def render_prompt(self, messages):
        """The ids that ask the model for the next assistant turn: the conversation so far plus
        <|assistant|>; the model is expected to answer and close with <|end|>."""
        ids, _ = self.render_conversation(messages)
        return ids + [self.assistant]


def tokenizer_path(spec):
    """A trained tokenizer's folder or file -> its tokenizer.json path."""
    return os.path.join(spec, TOKENIZER_FILE) if os.path.isdir(spec) else spec


def tokenizer_problems(spec, key="tokenizer"):
    """The config check of a script's tokenizer key -> a list of problems (empty when usable)."""
    if spec == "gpt2" or os.path.isfile(tokenizer_path(spec)):
        return []
    return [f"{key}={spec!r}: no {tokenizer_path(spec)}; give gpt2 or the folder train_tokenizer.py wrote (--out)"]


@functools.lru_cache(maxsize=8)
def tokenizer_from_string(text, where="checkpoint"):
    """What Tokenizer.to_string() gave (a checkpoint's copy) -> the Tokenizer (cached: building one
    takes about a second)."""
    return Tokenizer(text, where)


def load_tokenizer(spec="gpt2", key="tokenizer"):
    """spec: "gpt2", or the path of a trained tokenizer (its folder or its tokenizer.json)."""
    if spec == "gpt2":
        return tokenizer_from_string("gpt2")
    path = tokenizer_path(spec)
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as e:
        raise TokenizerError(f"{key}={spec}: cannot read {path} ({e.strerror}): give gpt2 or the folder "
                             "train_tokenizer.py wrote (--out)") from e
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{key}={spec}: {path} is not UTF-8 JSON: the file is corrupt; train the "
                             "tokenizer again") from e
    return tokenizer_from_string(text, path)


def checkpoint_tokenizer(ckpt):
    """The tokenizer a checkpoint carries; checkpoints older than this record use GPT-2."""
    return tokenizer_from_string(ckpt.get("tokenizer") or "gpt2")


def data_tokenizer(data_dir):
    """The tokenizer that made a data folder: the copy prepare_*.py left in it, or GPT-2 when it
    holds none (folders made before tokenizers were recorded, llm.c shards)."""
    path = os.path.join(data_dir, TOKENIZER_FILE)
    return load_tokenizer(path, key="data_dir") if os.path.exists(path) else load_tokenizer("gpt2")


def record_tokenizer(data_dir, tok):
    """Leave a copy of tok in data_dir (GPT-2 needs none), so train.py and finetune.py know it.
    A folder made with another tokenizer is an error (a mix of two tokenizers' ids is garbage)."""
    made = data_tokenizer(data_dir)
    if made.hash != tok.hash and (made.hash != "gpt2" or any(n.endswith(".bin") for n in os.listdir(data_dir))):
        raise TokenizerError(f"{data_dir} holds data made with tokenizer {made.name}, not {tok.name}: use another "
                             f"data_dir, or delete {data_dir} to start over")
    if tok.hash != "gpt2" and made.hash != tok.hash:
        atomic_write(os.path.join(data_dir, TOKENIZER_FILE), lambda f: f.write(tok.to_string().encode("utf-8")))


def check_same_tokenizer(data_tok, data_dir, model_tok, model_where):
    """Data made with one tokenizer and a model trained with another would train on garbage ids ->
    the model's tokenizer (data_tok None: no data folder to check, rl.py's case)."""
    if data_tok is not None and data_tok.hash != model_tok.hash:
        raise TokenizerError(f"{data_dir} was made with tokenizer {data_tok.name}, but the model in {model_where} "
                             f"uses tokenizer {model_tok.name}: prepare the data again with "
                             f"--tokenizer=<the model's tokenizer>, or start from a model made with the data's")
    return model_tok


class StreamDecoder:
    """Turns ids into text one at a time for streaming, never emitting half a UTF-8 character:
    bytes of a character split across tokens are held back until the character is complete."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id):
        return self.decoder.decode(self.tokenizer.token_bytes(token_id))

    def flush(self):
        return self.decoder.decode(b"", final=True)
