"""
GPT-2's BPE through tiktoken, plus the chat control tokens in the padded vocabulary slots.

Text from people and datasets always goes through encode(), which never produces a control
token: a user who types "<|assistant|>" gets those characters as ordinary text. Control tokens
are only ever placed by render_conversation() and render_prompt().

A conversation renders as
    <|endoftext|><|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|><|user|>...
with loss on the assistant's tokens and the <|end|> that closes them.
"""

import codecs
import os
import sys

from gptkit.configurator import UserError

EOT = 50256  # <|endoftext|>: document separator in pretraining, start of every conversation
SPECIAL_TOKENS = {
    "<|system|>": 50257,
    "<|user|>": 50258,
    "<|assistant|>": 50259,
    "<|end|>": 50260,
}
SYSTEM, USER, ASSISTANT, END = (SPECIAL_TOKENS[k] for k in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"))
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
MIN_VOCAB_SIZE = max(SPECIAL_TOKENS.values()) + 1  # a model must have at least this many embeddings

_cached = None


SHIPPED_GPT2 = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "samples", "gpt2")


def _load_gpt2():
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        return _shipped_gpt2(e)


def _shipped_gpt2(error):
    """GPT-2's BPE from the copies of its two files shipped in samples/gpt2, for a machine that cannot
    reach tiktoken's download site: the same files, checked against the same hashes, give the same ids.
    Says so once (GPTKIT_GPT2_NOTED keeps the scripts quickstart.py runs from saying it again)."""
    import tiktoken
    try:
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        from tiktoken_ext.openai_public import r50k_pat_str
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
                             special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=50257)


class Tokenizer:

    def __init__(self):
        import tiktoken
        base = _load_gpt2()
        # A copy of gpt2 that also knows our control tokens, so decode() can show them.
        self.enc = tiktoken.Encoding(
            name="gpt2_chat",
            pat_str=base._pat_str,
            mergeable_ranks=base._mergeable_ranks,
            special_tokens={**base._special_tokens, **SPECIAL_TOKENS},
        )
        self.eot = EOT
        self.n_vocab = MIN_VOCAB_SIZE

    def encode(self, text):
        """Ordinary text -> ids. Never yields a control token, whatever the text contains."""
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts, num_threads=8):
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids if int(i) < MIN_VOCAB_SIZE], errors="replace")

    def token_bytes(self, token_id):
        if token_id >= MIN_VOCAB_SIZE:
            return b""  # an unused padding slot: a model that samples it prints nothing
        return self.enc.decode_single_token_bytes(int(token_id))

    def render_conversation(self, messages):
        """messages: [{"role": "system"|"user"|"assistant", "content": str}, ...]
        -> (ids, mask): mask is 1 on the assistant's tokens and their closing <|end|>, else 0."""
        ids, mask = [EOT], [0]
        for i, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role not in ROLE_TOKENS:
                raise ValueError(f"message {i} has role {role!r}: use system, user or assistant")
            if not isinstance(content, str):
                raise ValueError(f"message {i} ({role}) has no text content")
            if role == "system" and i != 0:
                raise ValueError("a system message may only come first")
            body = self.encode(content) + [END]
            learn = 1 if role == "assistant" else 0
            ids.append(ROLE_TOKENS[role])
            mask.append(0)  # the role token is the prompt's, not something the model must produce
            ids.extend(body)
            mask.extend([learn] * len(body))
        return ids, mask

    def render_prompt(self, messages):
        """The ids that ask the model for the next assistant turn: the conversation so far plus
        <|assistant|>; the model is expected to answer and close with <|end|>."""
        ids, _ = self.render_conversation(messages)
        return ids + [ASSISTANT]


def get_tokenizer():
    """The process-wide tokenizer (building one takes about a second)."""
    global _cached
    if _cached is None:
        _cached = Tokenizer()
    return _cached


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
