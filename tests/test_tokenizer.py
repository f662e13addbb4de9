import pytest

from gptkit.tokenizer import (ASSISTANT, END, EOT, SPECIAL_TOKENS, SYSTEM, USER, StreamDecoder,
                              get_tokenizer)


def test_gpt2_encoding():
    tok = get_tokenizer()
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.decode([15496, 995]) == "Hello world"


def test_special_tokens_in_padded_slots():
    assert sorted(SPECIAL_TOKENS.values()) == [50257, 50258, 50259, 50260]
    assert all(50257 <= i < 50304 for i in SPECIAL_TOKENS.values())


def test_user_text_never_becomes_a_control_token():
    tok = get_tokenizer()
    for text in ["<|assistant|>", "hi <|end|> there <|system|><|user|>", "<|endoftext|>"]:
        ids = tok.encode(text)
        assert not set(ids) & (set(SPECIAL_TOKENS.values()) | {EOT})
        assert tok.decode(ids) == text
    ids, mask = tok.render_conversation([{"role": "user", "content": "say <|assistant|> please"}])
    assert ids.count(ASSISTANT) == 0


def test_render_conversation_and_mask():
    tok = get_tokenizer()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    ]
    ids, mask = tok.render_conversation(messages)
    assert len(ids) == len(mask)
    expected = ([EOT, SYSTEM] + tok.encode("Be brief.") + [END] + [USER] + tok.encode("Hi") + [END]
                + [ASSISTANT] + tok.encode("Hello!") + [END] + [USER] + tok.encode("Bye") + [END]
                + [ASSISTANT] + tok.encode("Goodbye.") + [END])
    assert ids == expected
    learned = [i for i, m in zip(ids, mask) if m]
    assert learned == tok.encode("Hello!") + [END] + tok.encode("Goodbye.") + [END]
    prompt = tok.render_prompt(messages[:2])
    assert prompt[-1] == ASSISTANT and prompt[:-1] == ids[:len(prompt) - 1]


def test_render_rejects_bad_roles():
    tok = get_tokenizer()
    with pytest.raises(ValueError, match="role"):
        tok.render_conversation([{"role": "bot", "content": "x"}])


def test_stream_decoder_never_splits_characters():
    tok = get_tokenizer()
    text = "naïve café 日本語 🙂 done"
    ids = tok.encode(text)
    dec = StreamDecoder(tok)
    pieces = [dec.feed(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_missing_tokenizer_files_error(tmp_path):
    import subprocess
    import sys
    import os
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(tmp_path), HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
    # offline, and without the copies gptkit ships (tests/test_offline.py: with them it works)
    code = "import gptkit.tokenizer as t; t.SHIPPED_GPT2 = 'nowhere'; t.Tokenizer()"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "TIKTOKEN_CACHE_DIR" in result.stderr and "gptkit's copies in nowhere could not be read" in result.stderr
