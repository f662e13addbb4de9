import inspect
import io
import os
import pty
import select
import subprocess
import sys
import time

import pytest
import torch

import sample
from gptkit.checkpoint import save_checkpoint
from gptkit.configurator import ConfigError, load_config
from gptkit.generate import generate, generate_samples, make_generator
from gptkit.hf import export_hf
from gptkit.tokenizer import ASSISTANT, END, EOT, SYSTEM, USER, load_tokenizer
from test_generate import lively_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT2 = load_tokenizer("gpt2")  # the test models' tokenizer: their checkpoints carry none, so they load with GPT-2's
FLAGS = ["--device=cpu", "--dtype=float32", "--temperature=0", "--max_new_tokens=8"]  # fp32: the answers of this process


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model on a shared 2-core machine: one thread is much faster
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """(model, chat checkpoint dir, base checkpoint dir), the same tiny weights in both."""
    model = lively_model()
    dirs = {}
    for kind in ("chat", "base"):
        out = str(tmp_path_factory.mktemp(kind))
        save_checkpoint(out, {"model": model.state_dict(), "model_config": model.config.to_dict(),
                              "config": {}, "kind": kind, "step": 0})
        dirs[kind] = out
    return model, dirs["chat"], dirs["base"]


def greedy_text(model, ids, n=8, stop=(END, EOT)):
    return GPT2.decode(generate(model, ids, n, temperature=0, stop_tokens=stop, n_vocab=GPT2.n_vocab))


def loads(model, meta):
    """A stand-in for sample.load_model that gives model (GPT-2's tokenizer) and meta, reading nothing."""
    return lambda *args, **kwargs: (model, GPT2, meta)


def chat_answer(model, messages):
    ids, _ = sample.chat_prompt_ids(GPT2, "", messages, 8, model.config.block_size)
    return greedy_text(model, ids)


def run_sample(args, stdin_text=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, env=env, input=stdin_text or "",
                          capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------------------------------------- helpers

def test_typed_control_token_stays_text():
    tok = GPT2
    typed = "say <|assistant|> and <|end|> please"
    ids, _ = sample.chat_prompt_ids(tok, "be brief", [{"role": "user", "content": typed}], 16, 1024)
    text_ids = tok.encode(typed)
    assert ids == [EOT, SYSTEM] + tok.encode("be brief") + [END, USER] + text_ids + [END, ASSISTANT]
    assert ids.count(ASSISTANT) == 1 and ids.count(END) == 2  # only the ones the renderer placed
    assert ASSISTANT not in text_ids and END not in text_ids


def test_history_drops_oldest_turns_and_keeps_system():
    tok = GPT2
    messages = []
    for i in range(10):
        messages += [{"role": "user", "content": f"question number {i} is here"},
                     {"role": "assistant", "content": f"answer number {i} is there"}]
    messages.append({"role": "user", "content": "last question"})
    block_size, max_new = 128, 40
    ids, kept = sample.chat_prompt_ids(tok, "sys", messages, max_new, block_size)
    assert len(ids) + max_new <= block_size
    assert 1 < len(kept) < len(messages) and kept == messages[-len(kept):]  # the newest turns, in order
    assert kept[0]["role"] == "user"
    assert ids[:2] == [EOT, SYSTEM]  # the system prompt survives
    # one turn more would not have fitted
    longer, _ = sample.chat_prompt_ids(tok, "sys", messages[-len(kept) - 2:], 0, 10_000)
    assert len(longer) + max_new > block_size
    with pytest.raises(ValueError, match="shorter"):
        sample.chat_prompt_ids(tok, "", [{"role": "user", "content": "word " * 200}], max_new, block_size)


def test_complete_prompt_keeps_the_end_of_long_text():
    tok = GPT2
    assert sample.complete_prompt_ids(tok, "Hello world", 10, 64) == [EOT] + tok.encode("Hello world")
    ids = sample.complete_prompt_ids(tok, "word " * 100, 10, 64)
    assert len(ids) == 54 and ids[-1] == tok.encode("word " * 100)[-1]


def test_mode_and_config_checks():
    assert sample.resolve_mode("auto", "chat") == "chat"
    assert sample.resolve_mode("", "base") == "complete"
    assert sample.resolve_mode("chat", "base") == "chat"
    with pytest.raises(ConfigError) as e:
        load_config(sample.SampleConfig, ["--ckpt=x", "--temperature=-1", "--top_p=1.5", "--mode=talk"])
    assert "temperature" in str(e.value) and "top_p" in str(e.value) and "mode" in str(e.value)
    assert "ckpt='x' does not exist" in str(e.value)  # said before loading anything
    with pytest.raises(ConfigError, match="ckpt"):
        load_config(sample.SampleConfig, [])


def test_ctrl_c_stops_an_answer_not_the_chat(ckpts, monkeypatch, capsys):
    model = ckpts[0]
    cfg = load_config(sample.SampleConfig, [f"--ckpt={ckpts[1]}", *FLAGS, "--system="])  # the model is given
    calls = []

    def fake_generate(model, ids, *args, **kwargs):
        calls.append(ids)
        yield 40  # "I"
        if len(calls) == 1:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the first answer
        yield 1101

    inputs = iter(["first", "second"])

    def fake_input(prompt):
        try:
            return next(inputs)
        except StopIteration:
            raise KeyboardInterrupt  # Ctrl-C at the prompt: leave cleanly

    monkeypatch.setattr(sample, "generate", fake_generate)
    monkeypatch.setattr("builtins.input", fake_input)
    sample.chat_loop(model, cfg, None, None, GPT2)
    out = capsys.readouterr().out
    assert "I [stopped]" in out and len(calls) == 2
    # the stopped answer stays in the history as it was shown
    expected, _ = GPT2.render_conversation([{"role": "user", "content": "first"},
                                                        {"role": "assistant", "content": "I"},
                                                        {"role": "user", "content": "second"}])
    assert calls[1] == expected + [ASSISTANT]


def typed_session(monkeypatch, ckpt_dir, lines, mode="chat", flags=()):
    """Run the interactive loop on typed lines, then Ctrl-D; every answer is "I".
    -> ([(prompt ids, stop tokens) of each answer], the lines it never read)."""
    model = lively_model()
    # not loaded: the model is given, so --system is as main() resolves it (none, unless flags say)
    cfg = load_config(sample.SampleConfig, [f"--ckpt={ckpt_dir}", *FLAGS, "--system=", *flags])
    asked = []

    def fake_generate(*args, **kwargs):
        call = inspect.signature(generate).bind(*args, **kwargs).arguments
        asked.append((call["ids"], tuple(call["stop_tokens"])))
        yield 40  # "I"

    remaining = list(lines)

    def fake_input(prompt):
        if not remaining:
            raise EOFError  # Ctrl-D
        return remaining.pop(0)

    monkeypatch.setattr(sample, "generate", fake_generate)
    monkeypatch.setattr("builtins.input", fake_input)
    loop = sample.chat_loop if mode == "chat" else sample.complete_loop
    loop(model, cfg, None, None, GPT2)
    return asked, remaining


def render(*turns, system=""):
    """The prompt ids of a conversation given as alternating user / assistant texts."""
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(turns)]
    return GPT2.render_prompt(messages)


def test_chat_commands_system_reset_help_and_quit(ckpts, monkeypatch, capsys):
    lines = ["/help", "first", "/system Be brief.", "second", "/system", "third", "/reset", "fourth", "/quit",
             "never read"]
    asked, remaining = typed_session(monkeypatch, ckpts[1], lines, flags=["--system=Start here."])
    out = capsys.readouterr().out
    assert [ids for ids, _ in asked] == [
        render("first", system="Start here."),                                  # --system from the command line
        render("first", "I", "second", system="Be brief."),                     # /system TEXT replaces it, history kept
        render("first", "I", "second", "I", "third"),                           # /system alone clears it
        render("fourth"),                                                       # /reset forgets the turns
    ]
    assert all(stop == (END, EOT) for _, stop in asked)  # an answer ends at <|end|> (or <|endoftext|>)
    assert remaining == ["never read"]  # /quit leaves at once
    assert out.count(sample.HELP) == 2  # on start and on /help
    assert "(system prompt set)" in out and "(system prompt cleared)" in out and "(conversation cleared)" in out


def test_chat_refuses_a_message_too_long_and_goes_on(ckpts, monkeypatch, capsys):
    asked, _ = typed_session(monkeypatch, ckpts[1], ["first", "word " * 100, "second"])  # then Ctrl-D: it returns
    out = capsys.readouterr().out
    assert "write a shorter one" in out
    # the refused message is not in the history: the next prompt is as if it was never typed
    assert [ids for ids, _ in asked] == [render("first"), render("first", "I", "second")]


def test_completion_loop_continues_each_text_alone(ckpts, monkeypatch, capsys):
    asked, remaining = typed_session(monkeypatch, ckpts[1], ["Once upon a time", "The river", "/exit", "never read"],
                                     mode="complete")
    tok = GPT2
    # no history, no chat tokens: each text continued on its own, until <|endoftext|> only
    assert asked == [([EOT] + tok.encode("Once upon a time"), (EOT,)), ([EOT] + tok.encode("The river"), (EOT,))]
    assert remaining == ["never read"]
    assert capsys.readouterr().out.count("I\n") == 2


def test_one_shot_prompt_with_a_system_prompt(ckpts, monkeypatch, capsys):
    """--prompt (or a pipe) with --system: one answer to the system prompt and the message."""
    asked = []

    def fake_generate(*args, **kwargs):
        asked.append(inspect.signature(generate).bind(*args, **kwargs).arguments["ids"])
        yield 40  # "I"

    monkeypatch.setattr(sample, "generate", fake_generate)
    monkeypatch.setattr(sample, "load_model", loads(lively_model(), {"kind": "chat"}))
    flags = [f"--ckpt={ckpts[1]}", *FLAGS, "--system=Be brief."]
    sample.main(load_config(sample.SampleConfig, flags + ["--prompt=Name a river."]))
    monkeypatch.setattr("sys.stdin", io.StringIO("Name a river.\n"))  # not a terminal: read as the prompt
    sample.main(load_config(sample.SampleConfig, flags))
    assert asked == [render("Name a river.", system="Be brief.")] * 2
    assert capsys.readouterr().out == "I\n" * 2


def test_a_chat_starts_with_the_system_prompt_it_was_finetuned_with(ckpts, monkeypatch, capsys):
    """A finetuned checkpoint records the system prompt of its data: sample.py prompts with it unless
    --system says otherwise, so the model is asked in the format it was trained on."""
    asked = []

    def fake_generate(*args, **kwargs):
        asked.append(inspect.signature(generate).bind(*args, **kwargs).arguments["ids"])
        yield 40  # "I"

    monkeypatch.setattr(sample, "generate", fake_generate)
    trained = {"kind": "chat", "config": {"system": "Be brief."}}
    monkeypatch.setattr(sample, "load_model", loads(lively_model(), trained))
    flags = [f"--ckpt={ckpts[1]}", *FLAGS, "--prompt=Name a river."]
    sample.main(load_config(sample.SampleConfig, flags))
    sample.main(load_config(sample.SampleConfig, flags + ["--system=Be kind."]))
    sample.main(load_config(sample.SampleConfig, flags + ["--system="]))  # none
    trained["config"] = {}  # finetuned before checkpoints recorded it, or a base model's config
    sample.main(load_config(sample.SampleConfig, flags))
    assert asked == [render("Name a river.", system="Be brief."), render("Name a river.", system="Be kind."),
                     render("Name a river."), render("Name a river.")]


def test_stop_tokens_of_each_mode(ckpts, monkeypatch, capsys):
    """With the real sampler: an answer ends at <|end|> in chat mode; a completion writes <|end|> as
    text and ends at <|endoftext|>."""
    model = lively_model()
    calls = []

    def steer(module, inputs, logits):  # the 3rd new token is <|end|>, the 5th <|endoftext|>
        calls.append(1)
        forced = {3: END, 5: EOT}.get(len(calls))
        if forced is None:
            return logits
        logits = logits.clone()
        logits[..., forced] = 1e4
        return logits

    model.lm_head.register_forward_hook(steer)
    monkeypatch.setattr(sample, "load_model", loads(model, {"kind": "chat"}))
    texts, steps = {}, {}
    for mode in ("chat", "complete"):
        calls.clear()
        cfg = load_config(sample.SampleConfig, [f"--ckpt={ckpts[1]}", *FLAGS, f"--mode={mode}", "--prompt=Hi"])
        sample.main(cfg)
        texts[mode], steps[mode] = capsys.readouterr().out, len(calls)
    assert steps["chat"] == 3 and "<|end|>" not in texts["chat"] and len(texts["chat"]) > 1
    assert steps["complete"] == 5 and "<|end|>" in texts["complete"] and "<|endoftext|>" not in texts["complete"]


# ---------------------------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_one_shot_prompt_prints_only_the_answer(ckpts):
    model, chat_dir, _ = ckpts
    result = run_sample([f"--ckpt={chat_dir}", "--prompt=Name a river.", *FLAGS])
    assert result.returncode == 0, result.stderr
    assert result.stdout == chat_answer(model, [{"role": "user", "content": "Name a river."}]) + "\n"
    assert "mode chat" in result.stderr


@pytest.mark.slow
def test_bf16_holds_the_weights_in_bf16(ckpts):
    """--dtype=bfloat16 (the default on CPUs with bf16 instructions) decodes with bf16 weights: the
    answer is the one a bf16 copy of the model gives in this process."""
    model, chat_dir, _ = ckpts
    result = run_sample([f"--ckpt={chat_dir}", "--prompt=Name a river.", *FLAGS, "--dtype=bfloat16"])
    assert result.returncode == 0, result.stderr
    assert "dtype bfloat16 (as configured); weights bfloat16" in result.stderr
    bf16 = lively_model().to(torch.bfloat16).eval()
    bf16.load_state_dict(model.state_dict())  # the same weights, rounded to bf16
    assert result.stdout == chat_answer(bf16, [{"role": "user", "content": "Name a river."}]) + "\n"


@pytest.mark.slow
def test_base_checkpoint_defaults_to_completion(ckpts):
    model, _, base_dir = ckpts
    result = run_sample([f"--ckpt={base_dir}", "--prompt=Once upon a time", *FLAGS])
    assert result.returncode == 0, result.stderr
    expected = greedy_text(model, [EOT] + GPT2.encode("Once upon a time"), stop=(EOT,))
    assert result.stdout == expected + "\n"
    assert "mode complete" in result.stderr


@pytest.mark.slow
def test_piped_prompt_and_seeded_samples(ckpts):
    """A piped prompt of two lines is one prompt (one message), two samples: the text equals what the
    same seed gives in this process."""
    model, chat_dir, _ = ckpts
    args = [f"--ckpt={chat_dir}", "--device=cpu", "--dtype=float32", "--temperature=1.0", "--top_k=0", "--top_p=1.0",
            "--max_new_tokens=12", "--num_samples=2", "--seed=7"]
    result = run_sample(args, stdin_text="Name a river.\nAnd a sea.\n")
    assert result.returncode == 0, result.stderr
    message = [{"role": "user", "content": "Name a river.\nAnd a sea."}]
    ids, _ = sample.chat_prompt_ids(GPT2, "", message, 12, 64)
    samples = generate_samples(model, ids, 2, 12, stop_tokens=(END, EOT), temperature=1.0,
                               generator=make_generator(model, 7), n_vocab=GPT2.n_vocab)
    texts = [GPT2.decode(s) for s in samples]
    assert texts[0] != texts[1]
    assert result.stdout == f"----- sample 1/2 -----\n{texts[0]}\n----- sample 2/2 -----\n{texts[1]}\n"


def read_until(fd, buffer, predicate, timeout=60):
    deadline = time.time() + timeout
    while not predicate(buffer[0]):
        if time.time() > deadline:
            raise AssertionError(f"timed out; terminal shows:\n{buffer[0]}")
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                data = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
            buffer[0] += data.decode("utf-8", errors="replace").replace("\r\n", "\n")


@pytest.mark.slow
def test_chat_in_a_terminal(ckpts):
    """Two turns, /reset, a turn, /quit, through a pseudo-terminal; greedy answers are checked
    against the model run here on the same history, so the history must be right."""
    model, chat_dir, _ = ckpts
    u1, u2 = "Tell me about rivers.", "And lakes?"
    a1 = chat_answer(model, [{"role": "user", "content": u1}])
    a2 = chat_answer(model, [{"role": "user", "content": u1}, {"role": "assistant", "content": a1},
                             {"role": "user", "content": u2}])
    assert a2 != chat_answer(model, [{"role": "user", "content": u2}]), "history should change this answer"

    master, slave = pty.openpty()
    env = dict(os.environ, OMP_NUM_THREADS="1", TERM="dumb")
    proc = subprocess.Popen([sys.executable, "sample.py", f"--ckpt={chat_dir}", *FLAGS], cwd=ROOT, env=env,
                            stdin=slave, stdout=slave, stderr=slave)  # input() writes its prompt to stderr
    os.close(slave)
    screen = [""]
    try:
        def prompts(n):
            return lambda text: text.count("\n> ") + text.startswith("> ") >= n and text.endswith("> ")

        read_until(master, screen, prompts(1))
        assert "/reset" in screen[0] and "/quit" in screen[0]  # the help line
        for n, line in enumerate([u1, u2, "/reset", u1], start=2):
            os.write(master, (line + "\n").encode())
            read_until(master, screen, prompts(n))
        os.write(master, b"/quit\n")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    text = screen[0]
    first = text.index(f"{u1}\n{a1}\n")
    second = text.index(f"{u2}\n{a2}\n", first)
    cleared = text.index("(conversation cleared)", second)
    assert text.index(f"{u1}\n{a1}\n", cleared) > cleared  # after /reset the first answer comes back


@pytest.mark.slow
def test_one_shot_mistakes_are_one_error_line(ckpts):
    _, chat_dir, _ = ckpts
    empty = run_sample([f"--ckpt={chat_dir}", *FLAGS], stdin_text="  \n")
    assert empty.returncode == 2 and "Traceback" not in empty.stderr, empty.stderr
    assert "error: stdin was empty" in empty.stderr
    # the test model's context is 64 tokens: a long system prompt leaves no room for the message
    too_long = run_sample([f"--ckpt={chat_dir}", "--prompt=Hi.", "--system=" + "word " * 200, *FLAGS])
    assert too_long.returncode == 2 and "Traceback" not in too_long.stderr, too_long.stderr
    assert "error: this message and the system prompt take" in too_long.stderr and "/system" in too_long.stderr
    # without a system prompt the message alone is named
    alone = run_sample([f"--ckpt={chat_dir}", "--prompt=" + "word " * 200, *FLAGS])
    assert alone.returncode == 2 and "error: this message takes" in alone.stderr and "/system" not in alone.stderr


@pytest.mark.slow
def test_a_hugging_face_folder_answers_like_its_checkpoint(ckpts, tmp_path):
    # an exported model (or any GPT-2 folder, or a hub name such as gpt2) loads in sample.py directly
    model, chat_dir, base_dir = ckpts
    for chat in (True, False):
        folder = str(tmp_path / ("chat" if chat else "base"))
        export_hf(model, folder, GPT2, chat=chat)
        prompt = "--prompt=Name a river." if chat else "--prompt=Once upon a time"
        exported = run_sample([f"--ckpt={folder}", prompt, *FLAGS])
        original = run_sample([f"--ckpt={chat_dir if chat else base_dir}", prompt, *FLAGS])
        assert exported.returncode == 0, exported.stderr
        assert exported.stdout == original.stdout and exported.stdout.strip()
        assert ("mode chat" if chat else "mode complete") in exported.stderr


# ---------------------------------------------------------------------------------------------- long chats, Ctrl-C, output

@pytest.mark.slow
def test_a_chat_longer_than_the_context(ckpts, monkeypatch, capsys):
    """Eight turns through the real sampler on a model with a 64-token context: old turns go, the
    system prompt stays, every prompt plus its answer fits, and each answer is what the model gives
    on that prompt alone (nothing is carried over from an earlier turn's KV cache)."""
    model = ckpts[0]
    cfg = load_config(sample.SampleConfig, [f"--ckpt={ckpts[1]}", *FLAGS[:3], "--max_new_tokens=1000",
                                            "--system=Be brief."])
    calls = []

    def spy_generate(model, ids, *args, **kwargs):
        answer = list(generate(model, ids, *args, **kwargs))
        calls.append((list(ids), answer))
        yield from answer

    questions = [f"question {i} about rivers" for i in range(8)]
    remaining = list(questions)

    def fake_input(prompt):
        if not remaining:
            raise EOFError
        return remaining.pop(0)

    monkeypatch.setattr(sample, "generate", spy_generate)
    monkeypatch.setattr("builtins.input", fake_input)
    sample.chat_loop(model, cfg, None, None, GPT2)
    tok, block = GPT2, model.config.block_size
    assert len(calls) == 8
    for i, (ids, answer) in enumerate(calls):
        assert ids[:2] == [EOT, SYSTEM] and ids[-1] == ASSISTANT
        assert tok.encode(questions[i]) == ids[-2 - len(tok.encode(questions[i])):-2]  # the new question is in
        assert len(ids) + len(answer) <= block
        assert len(ids) <= block - block // 2  # at most half the context kept for the answer (1000 asked)
        assert answer == greedy_text_ids(model, ids)
    assert tok.encode(questions[0]) not in [calls[-1][0][j:j + 4] for j in range(len(calls[-1][0]))]
    assert "[stopped]" not in capsys.readouterr().out


def greedy_text_ids(model, ids):
    return list(generate(model, ids, 10_000, temperature=0, stop_tokens=(END, EOT), n_vocab=GPT2.n_vocab))


def interrupt_after(tokens):
    def fake_generate(*args, **kwargs):
        yield from tokens
        raise KeyboardInterrupt
    return fake_generate


def test_ctrl_c_in_a_one_shot_answer_exits_130(ckpts, monkeypatch, capsys):
    """--prompt or a pipe: Ctrl-C ends the process with 130 (what a shell expects of Ctrl-C), and
    stdout holds only what was answered: a script must not take a cut answer for a whole one."""
    monkeypatch.setattr(sample, "load_model", loads(lively_model(), {"kind": "chat"}))
    monkeypatch.setattr(sample, "generate", interrupt_after([40]))  # "I", then Ctrl-C
    with pytest.raises(KeyboardInterrupt):  # sample.py's __main__ turns it into exit code 130
        sample.main(load_config(sample.SampleConfig, [f"--ckpt={ckpts[1]}", *FLAGS, "--prompt=Hi"]))
    captured = capsys.readouterr()
    assert captured.out == "I\n" and "stopped" in captured.err
    # several samples are printed at the end: nothing was shown
    monkeypatch.setattr(sample, "generate_samples", lambda *args, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        sample.main(load_config(sample.SampleConfig, [f"--ckpt={ckpts[1]}", *FLAGS, "--prompt=Hi", "--num_samples=2"]))
    captured = capsys.readouterr()
    assert captured.out == "" and "stopped" in captured.err


def test_ctrl_c_in_one_of_several_answers_keeps_the_chat(ckpts, monkeypatch, capsys):
    asked = []

    def fake_samples(model, ids, num_samples, *args, **kwargs):
        asked.append(ids)
        if len(asked) == 1:
            raise KeyboardInterrupt
        return [[40]] * num_samples

    inputs = iter(["first", "second"])

    def fake_input(prompt):
        try:
            return next(inputs)
        except StopIteration:
            raise KeyboardInterrupt  # then Ctrl-C at the prompt: the chat ends
    monkeypatch.setattr(sample, "generate_samples", fake_samples)
    monkeypatch.setattr("builtins.input", fake_input)
    cfg = load_config(sample.SampleConfig, [f"--ckpt={ckpts[1]}", *FLAGS, "--num_samples=2", "--system="])
    sample.chat_loop(ckpts[0], cfg, None, None, GPT2)
    out = capsys.readouterr().out
    assert "[stopped]" in out and "----- sample 2/2 -----\nI\n" in out
    assert asked == [render("first"), render("first", "", "second")]  # nothing was shown: an empty answer


MULTIBYTE = "😀 日本語の文章 👨‍👩‍👧 café"


def test_streamed_multibyte_characters_are_never_split(ckpts, monkeypatch):
    """Emoji and CJK characters whose bytes span several tokens: each write is whole characters,
    and the screen shows exactly the text."""
    tok = GPT2
    ids = tok.encode(MULTIBYTE)
    assert any(len(tok.token_bytes(i).decode("utf-8", errors="ignore")) == 0 for i in ids)  # split characters
    writes = []

    class Screen(io.StringIO):
        def write(self, text):
            writes.append(text)
            return super().write(text)

    monkeypatch.setattr(sample, "generate", lambda *args, **kwargs: iter(ids))
    monkeypatch.setattr(sample, "load_model", loads(lively_model(), {"kind": "chat"}))
    screen = Screen()
    monkeypatch.setattr("sys.stdout", screen)
    sample.main(load_config(sample.SampleConfig, [f"--ckpt={ckpts[1]}", *FLAGS, "--prompt=Hi"]))
    assert screen.getvalue() == MULTIBYTE + "\n"
    assert not any("\ufffd" in w for w in writes) and len([w for w in writes if w]) > 5  # streamed, never garbled


def test_a_terminal_without_utf8_gets_a_character_it_can_show(ckpts, monkeypatch):
    """stdout in cp1252 (a Windows pipe or file) cannot hold an emoji: the answer goes on with '?'
    rather than the chat dying on UnicodeEncodeError."""
    raw = io.BytesIO()
    monkeypatch.setattr("sys.stdout", io.TextIOWrapper(raw, encoding="cp1252"))
    monkeypatch.setattr(sample, "generate", lambda *args, **kwargs: iter(GPT2.encode(MULTIBYTE)))
    monkeypatch.setattr(sample, "load_model", loads(lively_model(), {"kind": "chat"}))
    sample.main(load_config(sample.SampleConfig, [f"--ckpt={ckpts[1]}", *FLAGS, "--prompt=Hi"]))
    sys.stdout.flush()
    assert raw.getvalue().decode("cp1252") == MULTIBYTE.encode("cp1252", errors="replace").decode("cp1252") + "\n"
    assert raw.getvalue().decode("cp1252").endswith(" café\n")  # what cp1252 has is kept


@pytest.mark.slow
def test_a_closed_pipe_ends_quietly(ckpts):
    """`python sample.py --prompt=... | head -c 10`: the reader leaves early; no traceback."""
    _, chat_dir, _ = ckpts
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "sample.py", f"--ckpt={chat_dir}", "--prompt=Hi", "--device=cpu",
                             "--max_new_tokens=40"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first token
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert "Traceback" not in stderr and "Broken pipe" not in stderr, stderr
