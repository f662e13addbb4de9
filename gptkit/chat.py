"""
Turning a conversation or a text into the prompt ids a model continues, shared by sample.py (the
terminal) and serve.py (HTTP): the system-prompt rule, the stop tokens of each mode, and fitting a
prompt into the model's context.

    from gptkit.chat import chat_prompt_ids, stop_tokens_of
    ids, kept = chat_prompt_ids(tokenizer, system, messages, max_new_tokens, model.config.block_size)
    for token in generate(model, ids, max_new_tokens, stop_tokens=stop_tokens_of(tokenizer, "chat"),
                          n_vocab=tokenizer.n_vocab, ...): ...

Fitting the context: a chat drops its oldest user/assistant pairs until the prompt plus room for
the answer fits (the system prompt stays); a single message that cannot fit is a ValueError whose
message says so. A completion prompt too long keeps its last tokens. The answer's room is
max_new_tokens, but never more than half the context, so some history always fits.

Message text goes through tokenizer.encode (never a control token): a typed "<|assistant|>" stays text.
The tokenizer is always the model's (load_model returns it), so its control-token ids are the ones
the model was trained with.
"""

from gptkit.checkpoint import trained_system_prompt


def resolve_system(setting, meta):
    """The system prompt a chat starts with: "auto" asks the model as it was finetuned (the prompt
    of its finetuning data, "" for a base model); any other setting is used as given ("" for none).
    meta: what load_model returns beside the model (a checkpoint dict, or a Hugging Face folder's run info)."""
    return trained_system_prompt(meta) if setting == "auto" else setting


def stop_tokens_of(tokenizer, mode):
    """A chat answer ends at <|end|> (or a stray <|endoftext|>); a completion at <|endoftext|>."""
    return (tokenizer.end, tokenizer.eot) if mode == "chat" else (tokenizer.eot,)


def answer_room(max_new_tokens, block_size):
    # never reserve more than half the context for the answer, so some history always fits
    return min(max_new_tokens, block_size // 2)


def chat_prompt_ids(tokenizer, system, messages, max_new_tokens, block_size):
    """The ids asking for the next answer, and the messages they hold: the oldest user/assistant
    pairs are dropped until the prompt plus the answer's room fits the context."""
    head = [{"role": "system", "content": system}] if system else []
    room = answer_room(max_new_tokens, block_size)
    while True:
        ids = tokenizer.render_prompt(head + messages)
        if len(ids) + room <= block_size or len(messages) <= 1:
            break
        messages = messages[2:]  # the oldest user message and its answer
    if len(ids) >= block_size:
        what, shorter = (("this message and the system prompt take", " (or /system to shorten the system prompt)")
                         if system else ("this message takes", ""))
        raise ValueError(f"{what} {len(ids)} tokens, more than the model's context of {block_size}: "
                         f"write a shorter one{shorter}")
    return ids, messages


def complete_prompt_ids(tokenizer, text, max_new_tokens, block_size):
    """<|endoftext|> (start of a document) + the text; a text too long keeps its last tokens."""
    ids = [tokenizer.eot] + tokenizer.encode(text)
    keep = block_size - answer_room(max_new_tokens, block_size)
    return ids[-keep:]
