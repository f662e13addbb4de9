"""
The OpenAI wire format, as serve.py speaks it: checking a request's JSON, and turning an engine
job's events (gptkit/engine.py) into the responses and stream chunks of /v1/chat/completions and
/v1/completions.

A request that is not what the API expects (bad JSON, a wrong type, a value out of range, too many
messages) raises RequestError, which the server turns into OpenAI's error body with status 400:
    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": null}}
Fields gptkit does not use (tools, presence_penalty, user, ...) are accepted and ignored, as many
clients send them by default. logprobs: on chat, `logprobs: true` (+ `top_logprobs`: 0-20) gives each
answer token's log-probability under the model (the log-softmax of its logits over the tokenizer's
ids, before temperature, top-k and top-p) and the most likely alternatives; on completions,
`logprobs: k` (0-5) gives the legacy shape (tokens, token_logprobs, top_logprobs, text_offset
counted from the start of the answer). `model` may name any model: there is one, and answers carry
its name. `top_k` is accepted as an extension (OpenAI has none).
"""

import json
import math
import time
import uuid


class RequestError(Exception):
    def __init__(self, message, param=None, status=400, kind="invalid_request_error"):
        super().__init__(message)
        self.param, self.status, self.kind = param, status, kind


def error_body(message, kind="invalid_request_error", param=None, code=None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def parse_json(raw):
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON ({e}): send a JSON object") from e
    if not isinstance(body, dict):
        raise RequestError(f"the request body is a JSON {type(body).__name__}: send a JSON object")
    return body


NUMBER, INTEGER, BOOL, STRING = "a number", "an integer", "true or false", "a string"
_TYPES = {NUMBER: (int, float), INTEGER: (int,), BOOL: (bool,), STRING: (str,)}


def get(body, name, kind, default, low=None, high=None):
    """body[name] checked to be of `kind` and within [low, high]; missing or null: default."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, _TYPES[kind]) or (kind != BOOL and isinstance(value, bool)):
        raise RequestError(f"{name} must be {kind}, not {json.dumps(value)[:40]}", param=name)
    allowed = f"{low} or more" if high is None else f"{low} to {high}"
    if not math.isfinite(value):  # Python's JSON reads NaN and Infinity, which no range check catches
        raise RequestError(f"{name}={value} is not a number: use {allowed}", param=name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise RequestError(f"{name}={value} is out of range: use {allowed}", param=name)
    return value


def logprobs_field(body, kind):
    """-> None (no log-probabilities) or how many of the most likely tokens to list beside each."""
    if kind == "chat":
        top = get(body, "top_logprobs", INTEGER, None, 0, 20)
        if not get(body, "logprobs", BOOL, False):
            if top is not None:
                raise RequestError("top_logprobs needs logprobs: true", param="top_logprobs")
            return None
        return top or 0
    return get(body, "logprobs", INTEGER, None, 0, 5)


def sampling_fields(body, defaults, limits, kind="chat"):
    """The settings both endpoints share -> dict for an engine Job (plus stream, include_usage).
    kind: "chat" or "complete", whose logprobs fields differ."""
    # newer clients send max_completion_tokens, older ones max_tokens
    max_tokens = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop)):
        raise RequestError("stop must be a string or a list of at most 4 strings", param="stop")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise RequestError("stream_options must be an object such as {\"include_usage\": true}", param="stream_options")
    return {
        "temperature": get(body, "temperature", NUMBER, defaults["temperature"], 0, 2),
        "top_p": get(body, "top_p", NUMBER, defaults["top_p"], 0, 1) or 1e-9,  # 0: greedy in effect
        "top_k": get(body, "top_k", INTEGER, defaults["top_k"], 0, None),
        "max_tokens": get(body, max_tokens, INTEGER, defaults["max_tokens"], 1, limits["max_tokens"]),
        "n": get(body, "n", INTEGER, 1, 1, limits["n"]),
        "seed": get(body, "seed", INTEGER, None, 0, 2**63 - 1),
        "stop": stop or [],
        "logprobs": logprobs_field(body, kind),
        "stream": get(body, "stream", BOOL, False),
        "include_usage": get(stream_options, "include_usage", BOOL, False),
    }


def chat_messages(body, max_messages):
    """body["messages"] -> [{"role", "content"}] with text content; "developer" counts as "system"."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {\"role\": ..., \"content\": ...}", param="messages")
    if len(messages) > max_messages:
        raise RequestError(f"{len(messages)} messages is more than this server takes ({max_messages}): "
                           "send the most recent ones", param="messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object with role and content", param=where)
        role, content = message.get("role"), message.get("content")
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant"):
            raise RequestError(f"{where}.role is {json.dumps(role)}: use system, user or assistant", param=where)
        if isinstance(content, list):  # content parts: only text ones can be answered
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise RequestError(f"{where}.content: only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                                   "are understood", param=where)
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError(f"{where}.content must be a string", param=where)
        if role == "system" and i != 0:
            raise RequestError(f"{where}: a system message may only come first", param=where)
        out.append({"role": role, "content": content})
    return out


def completion_prompt(body):
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise RequestError("prompt must be a string (or a list of one string)", param="prompt")
    return prompt


# ----------------------------------------------------------------------------------------------
# Responses

def new_id(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens, completion_tokens):
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(id_, obj, model, choices, **extra):
    return {"id": id_, "object": obj, "created": int(time.time()), "model": model, "choices": choices, **extra}


ID_PREFIX = {"chat": "chatcmpl", "complete": "cmpl"}
OBJECT = {"chat": "chat.completion", "complete": "text_completion"}
CHUNK_OBJECT = {"chat": "chat.completion.chunk", "complete": "text_completion"}


def chat_delta(index, delta, finish_reason=None):
    return {"index": index, "delta": delta, "finish_reason": finish_reason}


def completion_choice(index, text, finish_reason=None, logprobs=None):
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def logprobs_object(kind, entries, tokenizer, offset=0):
    """An engine's (token, log-probability, [(token, log-probability)] of the most likely) entries
    in the API's shape: chat's {"content": [...]}, or completions' parallel lists (offset: the
    answer's characters before these tokens, for text_offset)."""
    if entries is None:
        return None
    text = tokenizer.decode
    if kind == "chat":
        def item(token, logprob):
            return {"token": text([token]), "logprob": logprob, "bytes": list(tokenizer.token_bytes(token))}
        return {"content": [{**item(token, logprob), "top_logprobs": [item(t, lp) for t, lp in top]}
                            for token, logprob, top in entries], "refusal": None}
    offsets = []
    for token, _, _ in entries:
        offsets.append(offset)
        offset += len(text([token]))
    return {"tokens": [text([token]) for token, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [{text([t]): lp for t, lp in top} for _, _, top in entries], "text_offset": offsets}


def whole_choice(kind, index, text, finish_reason, logprobs=None):
    """Answer `index` of a response that is not streamed."""
    if kind == "chat":
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish_reason}
    return completion_choice(index, text, finish_reason, logprobs)


def chunk_choice(kind, index, text=None, finish_reason=None, logprobs=None):
    """A streamed piece of answer `index`: some text, or (text None) its end and why it ended."""
    if kind == "chat":
        choice = chat_delta(index, {} if text is None else {"content": text}, finish_reason)
        return {**choice, "logprobs": logprobs} if logprobs is not None else choice
    return completion_choice(index, text or "", finish_reason, logprobs)


def sse(data):
    """One server-sent event: a JSON object, or the closing [DONE]."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def whole_response(job, kind, id_, model, prompt_tokens, disconnected, tokenizer):
    """A queued engine job's answers, once all are made, as the response body (a dict).
    tokenizer: the model's, for the tokens' text in logprobs."""
    texts, finishes, completion_tokens = [""] * job.n, [None] * job.n, 0
    entries = [[] for _ in range(job.n)]
    async for event in job.events(disconnected):
        if event[0] == "error":
            raise RequestError(event[1], status=500, kind="server_error")
        if event[0] == "text":
            texts[event[1]] += event[2]
            entries[event[1]] += event[3] or []
        else:
            finishes[event[1]] = event[2]
            completion_tokens += event[3]
    if None in finishes:  # cut short: the client left (nobody reads this) or the server is stopping
        raise RequestError("the server stopped before the answer was complete", status=503, kind="server_error")
    logprobs = [logprobs_object(kind, e if job.logprobs is not None else None, tokenizer) for e in entries]
    choices = [whole_choice(kind, i, text, finish, logprobs[i])
               for i, (text, finish) in enumerate(zip(texts, finishes))]
    return envelope(id_, OBJECT[kind], model, choices, usage=usage(prompt_tokens, completion_tokens))


async def stream_chunks(job, kind, id_, model, prompt_tokens, include_usage, tokenizer):
    """A queued engine job's text as it comes, as server-sent events; [DONE] only after every answer
    has ended (a stream cut by the server's shutdown has none, so the client can tell). tokenizer:
    the model's, for the tokens' text in logprobs."""
    def chunk(choices, **extra):
        return sse(envelope(id_, CHUNK_OBJECT[kind], model, choices, **extra))

    if kind == "chat":  # the first chunk of each answer names its role
        yield chunk([chat_delta(i, {"role": "assistant", "content": ""}) for i in range(job.n)])
    completion_tokens, ended, offsets = 0, 0, [0] * job.n
    async for event in job.events():
        if event[0] == "error":
            yield sse(error_body(event[1], "server_error"))
            return
        if event[0] == "text":
            _, index, text, entries = event
            yield chunk([chunk_choice(kind, index, text, None, logprobs_object(kind, entries, tokenizer, offsets[index]))])
            offsets[index] += sum(len(tokenizer.decode([token])) for token, _, _ in entries or [])
        else:
            completion_tokens, ended = completion_tokens + event[3], ended + 1
            yield chunk([chunk_choice(kind, event[1], None, event[2])])
    if ended < job.n:
        return
    if include_usage:
        yield chunk([], usage=usage(prompt_tokens, completion_tokens))
    yield sse("[DONE]")
