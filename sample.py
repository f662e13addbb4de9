"""
Talk to a model: a multi-turn chat in the terminal for a finetuned checkpoint, plain text
completion for a pretrained one. Tokens are printed as they are generated.

    python sample.py --ckpt=out/dolly                                   # chat (the checkpoint's kind is "chat")
    python sample.py --ckpt=out/fineweb_124m                            # type text, the model continues it
    python sample.py --ckpt=out/dolly --prompt="Name three rivers."     # answer once and exit
    echo "Name three rivers." | python sample.py --ckpt=out/dolly       # the same, prompt read from a pipe
    python sample.py --ckpt=out/dolly < question.txt                    # the whole file is one prompt
    python sample.py --ckpt=out/fineweb_124m --prompt="Once upon a time" --num_samples=3 --temperature=0.9
    python sample.py --ckpt=out/dolly --mode=complete --device=cpu      # force a mode or a device
    python sample.py --ckpt=gpt2 --prompt="Once upon a time"            # OpenAI's GPT-2 (or an exported folder)

A finetuned model's chat starts with the system prompt of its finetuning data, as it was trained
(--system=TEXT for another, --system= for none). In the chat: /reset clears the conversation,
/system TEXT sets the system prompt (/system alone clears it), /quit or Ctrl-D leaves. Ctrl-C
stops the answer being written; at the prompt it quits.
When the conversation outgrows the model's context, its oldest turns are dropped (the system prompt
stays, and room is kept for max_new_tokens of answer).

Piped input is one prompt, however many lines it has (a question with a pasted text, a document
to continue), answered once; for one answer per line, run sample.py once per line (for example
`while read -r q; do python sample.py --ckpt=out/dolly --prompt="$q"; done < questions.txt`).
With --prompt or a piped stdin only the answer goes to stdout (then a newline; with --num_samples,
each under a '----- sample i/n -----' line); everything else goes to stderr, so scripts can use the
output as is. Ctrl-C there exits with code 130, as it does while loading. The same seed gives the
same text (on the same device and dtype).

The weights are held in the compute dtype (--dtype=auto: bf16 on a GPU, and on a CPU with bf16
instructions, where it decodes twice as fast; fp32 on other CPUs); --dtype=float32 for full precision.
"""

import os
import sys
from dataclasses import dataclass, replace

import torch

from gptkit.chat import chat_prompt_ids, complete_prompt_ids, resolve_system, stop_tokens_of
from gptkit.configurator import BaseConfig, UserError, configure
from gptkit.generate import check_sampling_args, generate, generate_samples, make_generator
from gptkit.loading import ckpt_arg_problems, load_model
from gptkit.quantize import precision_line, quantize_problems
from gptkit.system import run_main, setup_runtime
from gptkit.tokenizer import StreamDecoder

HELP = "commands: /reset (clear the conversation), /system TEXT (set the system prompt), /quit or Ctrl-D (leave); Ctrl-C stops an answer"


@dataclass
class SampleConfig(BaseConfig):
    ckpt: str = ""                  # a run directory (out/dolly) or checkpoint file, or a Hugging Face GPT-2
    prompt: str = ""                # answer this once and exit; empty: chat, or all of a piped stdin as one prompt
    mode: str = "auto"              # auto: chat for a finetuned ("chat") checkpoint, complete for a base one
    system: str = "auto"            # system prompt of the chat; auto: the one the model was finetuned with ("" for none)
    max_new_tokens: int = 256       # longest answer, in tokens
    temperature: float = 0.8        # 0 is greedy; lower is safer, higher more varied
    top_k: int = 50                 # sample among the k most likely tokens only; 0: all
    top_p: float = 0.95             # ... and among the most likely ones holding this much probability; 1: all
    repetition_penalty: float = 1.0 # > 1 discourages tokens already in the text (small models loop); 1: off
    num_samples: int = 1            # independent answers to each prompt
    quantize: str = "none"          # int8: weight-only int8 matmuls (a quarter of fp32's bytes); fp16: fbgemm's fp16 matmuls (CPU: the fastest without bf16)

    def validate(self):
        problems = super().validate()
        problems += ckpt_arg_problems(self.ckpt, example="out/dolly")
        if self.mode not in ("", "auto", "chat", "complete"):
            problems.append(f"mode={self.mode!r}: use auto, chat or complete")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens}: use 1 or more")
        if self.num_samples < 1:
            problems.append(f"num_samples={self.num_samples}: use 1 or more")
        return problems + quantize_problems(self.quantize) + check_sampling_args(self.temperature, self.top_k, self.top_p, self.repetition_penalty)


def info(*args):
    print(*args, file=sys.stderr, flush=True)  # stdout carries only the answer in one-shot mode


def resolve_mode(mode, kind):
    if mode in ("", "auto"):
        return "chat" if kind == "chat" else "complete"
    return mode


def stream(model, ids, cfg, stop_tokens, generator, autocast, tokenizer):
    """Print the answer as it is generated -> (answer ids, True if Ctrl-C stopped it).
    tokenizer: the model's; it decodes the answer and bounds the ids sampled."""
    decoder, answer = StreamDecoder(tokenizer), []
    try:
        for token in generate(model, ids, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                              cfg.repetition_penalty, stop_tokens, generator, autocast=autocast,
                              n_vocab=tokenizer.n_vocab):
            answer.append(token)
            sys.stdout.write(decoder.feed(token))
            sys.stdout.flush()
        sys.stdout.write(decoder.flush())
        return answer, False
    except KeyboardInterrupt:
        sys.stdout.write(decoder.flush())
        return answer, True


def respond(model, ids, cfg, stop_tokens, generator, autocast, tokenizer, interactive=True):
    """One or several answers to the prompt ids, printed to stdout -> (the first answer's text, True if
    Ctrl-C stopped it). interactive: mark a stopped answer on the screen; otherwise (one-shot) stdout
    gets only the answer and the caller says it was stopped."""
    if cfg.num_samples == 1:
        answer, interrupted = stream(model, ids, cfg, stop_tokens, generator, autocast, tokenizer)
        sys.stdout.write(" [stopped]\n" if interrupted and interactive else "\n")
        sys.stdout.flush()
        return tokenizer.decode(answer), interrupted
    # several answers: one batch, printed when done (streaming them side by side would be unreadable)
    try:
        samples = generate_samples(model, ids, cfg.num_samples, cfg.max_new_tokens, stop_tokens=stop_tokens,
                                   temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                   repetition_penalty=cfg.repetition_penalty, generator=generator, autocast=autocast,
                                   n_vocab=tokenizer.n_vocab)
    except KeyboardInterrupt:
        if interactive:
            print("[stopped]", flush=True)
        return "", True  # nothing was shown, so the history records an empty answer
    texts = [tokenizer.decode(s) for s in samples]
    for i, text in enumerate(texts):
        print(f"----- sample {i + 1}/{len(texts)} -----\n{text}", flush=True)
    return texts[0], False


def chat_loop(model, cfg, generator, autocast, tokenizer):
    system, messages = cfg.system, []
    block_size = model.config.block_size
    print(HELP, flush=True)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: leave cleanly
            print()
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return
        if text == "/reset":
            messages = []
            print("(conversation cleared)", flush=True)
            continue
        if text == "/system" or text.startswith("/system "):
            system = text[len("/system"):].strip()
            print(f"(system prompt {'set' if system else 'cleared'})", flush=True)
            continue
        if text == "/help":
            print(HELP, flush=True)
            continue
        try:
            ids, messages = chat_prompt_ids(tokenizer, system, messages + [{"role": "user", "content": text}],
                                            cfg.max_new_tokens, block_size)
        except ValueError as e:
            print(f"({e})", flush=True)
            continue
        answer, _ = respond(model, ids, cfg, stop_tokens_of(tokenizer, "chat"), generator, autocast, tokenizer)
        messages = messages + [{"role": "assistant", "content": answer}]  # a stopped answer stays as shown


def complete_loop(model, cfg, generator, autocast, tokenizer):
    print("type text and the model continues it; /quit or Ctrl-D leaves, Ctrl-C stops a continuation", flush=True)
    while True:
        try:
            text = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if text.strip() in ("/quit", "/exit"):
            return
        ids = complete_prompt_ids(tokenizer, text, cfg.max_new_tokens, model.config.block_size)
        respond(model, ids, cfg, stop_tokens_of(tokenizer, "complete"), generator, autocast, tokenizer)


def read_prompt(cfg):
    """The one-shot prompt: --prompt, else all of a piped stdin; "" at a terminal (then we chat)."""
    if cfg.prompt or sys.stdin.isatty():
        return cfg.prompt
    prompt = sys.stdin.read()  # a pipe: answer once, as with --prompt
    if not prompt.strip():
        raise UserError("stdin was empty: pipe a prompt in, or give --prompt=\"...\"")
    return prompt


def answer_once(model, cfg, mode, prompt, generator, autocast, tokenizer):
    """--prompt or a pipe: one answer (or num_samples) on stdout, nothing else there."""
    block_size = model.config.block_size
    if mode == "chat":
        messages = [{"role": "user", "content": prompt.strip()}]
        try:
            ids, _ = chat_prompt_ids(tokenizer, cfg.system, messages, cfg.max_new_tokens, block_size)
        except ValueError as e:
            raise UserError(str(e)) from e
    else:
        ids = complete_prompt_ids(tokenizer, prompt.rstrip("\n"), cfg.max_new_tokens, block_size)
    _, interrupted = respond(model, ids, cfg, stop_tokens_of(tokenizer, mode), generator, autocast, tokenizer,
                             interactive=False)
    if interrupted:
        # exit code 130 as for any Ctrl-C: a script must not take a cut answer for a whole one
        info("stopped by Ctrl-C")
        raise KeyboardInterrupt


def main(cfg):
    if hasattr(sys.stdout, "reconfigure"):
        # a stdout that cannot encode every character (a Windows pipe or file is cp1252) shows '?'
        # for the others rather than ending the chat with UnicodeEncodeError at the first emoji
        sys.stdout.reconfigure(errors="replace")
    rt = setup_runtime(cfg.device, cfg.dtype, cfg.seed, verbose=False, inference=True, quantize=cfg.quantize)
    info(f"device: {rt.device}; {precision_line(rt, cfg.quantize)}; torch {torch.__version__}")
    model, tokenizer, meta = load_model(cfg.ckpt, device=rt.device, dtype=rt.weights_dtype, verbose=False,
                                        quantize=cfg.quantize)  # the model's own tokenizer
    kind = meta.get("kind", "base")
    mode = resolve_mode(cfg.mode, kind)
    info(f"loaded {cfg.ckpt}: {kind} model, {model.num_params():,} parameters, context {model.config.block_size}; "
         f"mode {mode}")
    if mode == "chat" and kind != "chat":
        info("note: this checkpoint was not finetuned for chat; expect rambling (mode=complete suits it)")
    if cfg.compile:
        # decoding feeds a new shape at every token (prompt lengths, cache positions): compiling
        # would mostly recompile, so sampling runs eagerly
        info("compile=True is ignored by sample.py: it decodes eagerly")
    generator = make_generator(model, cfg.seed)  # on the model's device: same seed, same text
    cfg = replace(cfg, system=resolve_system(cfg.system, meta))  # auto: ask the model as it was trained
    if mode == "chat" and cfg.system:
        info(f"system prompt: {cfg.system!r} (--system=TEXT for another, --system= for none)")

    prompt = read_prompt(cfg)
    if prompt:
        answer_once(model, cfg, mode, prompt, generator, rt.autocast, tokenizer)
    elif mode == "chat":
        chat_loop(model, cfg, generator, rt.autocast, tokenizer)
    else:
        complete_loop(model, cfg, generator, rt.autocast, tokenizer)


if __name__ == "__main__":
    try:
        run_main(main, configure(SampleConfig))  # a bad checkpoint: one `error:` line, exit code 2
    except KeyboardInterrupt:  # Ctrl-C while loading or in one-shot mode: no traceback
        sys.exit(130)
    except BrokenPipeError:  # the reader of stdout left (`| head`): stop quietly, as other tools do
        # stdout to /dev/null, or Python's flush at exit fails on the closed pipe a second time
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
