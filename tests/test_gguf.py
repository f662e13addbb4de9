"""GGUF export (gptkit/gguf_export.py, export_hf.py --gguf), checked by llama.cpp itself: llama-cpp-python
loads each file and its logits, greedy answers, tokenization and chat template are compared with gptkit's."""

import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, shared_data
from gptkit.checkpoint import save_checkpoint
from gptkit.generate import generate
from gptkit.gguf_export import GGUFError, export_gguf, ollama_modelfile
from gptkit.tokenizer import load_tokenizer
from model import GPT, GPTConfig

llama_cpp = pytest.importorskip("llama_cpp")
from llama_cpp.llama_chat_format import Jinja2ChatFormatter  # noqa: E402

CONVERSATION = [
    {"role": "system", "content": "You are terse. Answer in one line."},
    {"role": "user", "content": "What is 12 * 12?\n\nShow  the working."},
    {"role": "assistant", "content": " 12 * 12 = 144 \u2714"},
    {"role": "user", "content": "And <|assistant|> in Japanese? \u65e5\u672c\u8a9e"},  # typed, so text
]
PROMPTS = ["Once upon a time", "The capital of France is", " 12 + 30 =", "def f(x):\n    return",
           "caf\u00e9 \u65e5\u672c\u8a9e \U0001f389", "It's a truth universally acknowledged, that",
           "\n\n\n", "a " * 40]
# max |logit difference| over the largest |logit|. llama.cpp's own arithmetic keeps f32 from bitwise
# equality: its GELU reads a table indexed by the input rounded to fp16 (with that GELU put into our
# model, llama.cpp's f32 is as exact as ours: test_llama_cpp_f32_is_as_exact_as_ours_given_its_gelu).
BOUNDS = {"f32": 1e-3, "f16": 1e-2, "q8_0": 5e-2}


def lively(n_embd=64, n_layer=4, bias=True, seed=0, vocab_size=50304, block_size=128):
    """A random GPT with large weights (logits spread over about +-4, so greedy answers are far from
    ties; GPT-2's small init gives near-equal logits), biases on."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=n_layer, n_head=4, n_embd=n_embd, block_size=block_size, vocab_size=vocab_size,
                          bias=bias, dropout=0.0), verbose=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p)) if p.dim() == 1 else p.normal_(0.0, 0.1)
    return model.eval()


def open_gguf(path, vocab_only=False):
    # f32 keys and values in the cache: llama.cpp's default f16 cache would cost about 2e-3 of the f32 bound
    return llama_cpp.Llama(path, n_ctx=128, n_threads=1, logits_all=True, verbose=False, vocab_only=vocab_only,
                           type_k=0, type_v=0)


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory):
    """A chat model on GPT-2's tokenizer, exported in each type -> (model, tok, {type: path})."""
    out = tmp_path_factory.mktemp("gguf")
    model, tok = lively(), load_tokenizer("gpt2")
    paths = {t: export_gguf(model, str(out / f"m-{t}.gguf"), tok, t, chat=True, system="Be brief.")[0]
             for t in BOUNDS}
    return model, tok, paths


@pytest.mark.parametrize("gguf_type", list(BOUNDS))
def test_llama_cpp_logits_equal_ours(gpt2_files, gguf_type):
    model, tok, paths = gpt2_files
    llm = open_gguf(paths[gguf_type])
    try:
        assert llm.n_vocab() == tok.n_vocab  # the padding rows are left out
        worst = 0.0
        for prompt in PROMPTS:
            ids = tok.encode(prompt)
            with torch.no_grad():
                ours = model(torch.tensor([ids]))[0][0, :, :tok.n_vocab].numpy()
            llm.reset()
            llm.eval(ids)
            theirs = np.array(llm.scores[:len(ids)])
            worst = max(worst, float(np.abs(theirs - ours).max() / np.abs(ours).max()))
        assert worst < BOUNDS[gguf_type], f"{gguf_type}: max logit difference {worst:.2e} of the largest logit"
        print(f"{gguf_type}: max logit difference {worst:.2e} of the largest logit")
    finally:
        llm.close()


class LlamaCppGELU(torch.nn.Module):
    """GELU as llama.cpp's CPU backend computes it for f32 (ggml-cpu/vec.h, GGML_GELU_FP16, defined
    unconditionally): the input rounded to fp16, looked up in a table of fp16 outputs of the same tanh
    formula, 0 below -10 and the input itself above 10."""

    def forward(self, x):
        y = F.gelu(x.half().float(), approximate="tanh").half().float()
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))


def test_llama_cpp_f32_is_as_exact_as_ours_given_its_gelu(gpt2_files):
    """The f32 file holds our weights exactly. The exact answer: our model in float64 with llama.cpp's
    GELU (its one rounding that differs from ours). llama.cpp's f32 logits are as close to it as our
    own f32 model's are, and all but the rarest are within 1e-3 of ours. Not every one: the table rounds
    GELU's input to fp16, so the smallest f32 difference in an input can move it by a step of the table,
    and which logits that moves depends on the CPU's kernels (measured on an AVX2-only CPU: 9.4e-4 at
    worst between the two f32 runs; on an AVX-512 one 1.2e-3, where gptkit's own f32 was the farther
    from float64, 1.0e-3 against llama.cpp's 1.1e-3; docs/benchmarks.md)."""
    model, tok, paths = gpt2_files
    emulated = copy.deepcopy(model)
    for block in emulated.transformer.h:
        block.mlp.gelu = LlamaCppGELU()
    exact = copy.deepcopy(emulated).double()
    llm = open_gguf(paths["f32"])
    try:
        theirs_off, ours_off, between, most = [], [], [], []
        for prompt in PROMPTS:
            ids = tok.encode(prompt)
            with torch.no_grad():
                ours = emulated(torch.tensor([ids]))[0][0, :, :tok.n_vocab].double().numpy()
                truth = exact(torch.tensor([ids]))[0][0, :, :tok.n_vocab].numpy()
            llm.reset()
            llm.eval(ids)
            theirs = np.array(llm.scores[:len(ids)], dtype=np.float64)
            theirs_off.append(np.abs(theirs - truth).max())
            ours_off.append(np.abs(ours - truth).max())
            between.append(np.abs(theirs - ours).max())
            most.append(np.quantile(np.abs(theirs - ours), 0.999))
        print(f"f32, llama.cpp's GELU: from float64 llama.cpp {max(theirs_off):.1e}, ours {max(ours_off):.1e}; "
              f"between the two {max(between):.1e}, 99.9% of logits within {max(most):.1e}")
        assert max(theirs_off) < 2 * max(ours_off) and max(theirs_off) < 2e-3, (theirs_off, ours_off)
        assert max(between) < 2e-3, between  # at worst the two f32 errors add up
        assert max(most) < 1e-3, most  # the bound, on every prompt, for all but one logit in 1000
    finally:
        llm.close()


def test_llama_cpp_greedy_answers_equal_ours_in_f32(gpt2_files):
    """32 greedy tokens from each prompt, llama.cpp's own sampler against gptkit's generate. A random model
    has near-ties among 50K logits; where our top two are closer than the f32 bound, either pick is right,
    so the answers are compared up to such a tie (and most run all 32 tokens without one)."""
    model, tok, paths = gpt2_files
    llm = open_gguf(paths["f32"])
    whole = 0
    try:
        for prompt in PROMPTS:
            ids = tok.encode(prompt)
            ours = list(generate(model, ids, 32, temperature=0.0, n_vocab=tok.n_vocab))
            with torch.no_grad():
                logits = model(torch.tensor([ids + ours]))[0][0, len(ids) - 1:, :tok.n_vocab]
            top2 = logits.topk(2).values
            ties = ((top2[:, 0] - top2[:, 1]) < BOUNDS["f32"] * logits.abs().max()).nonzero()
            upto = int(ties[0]) if len(ties) else 32
            theirs = []
            for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
                theirs.append(token)
                if len(theirs) == 32:
                    break
            assert theirs[:upto] == ours[:upto], prompt
            whole += upto == 32 and theirs == ours
        assert whole >= len(PROMPTS) // 2, f"only {whole} of {len(PROMPTS)} prompts ran 32 tokens without a tie"
    finally:
        llm.close()


def texts_300():
    """300 texts: the awkward cases (white space, digits, contractions, unicode) and paragraphs of a book."""
    with open(shared_data("pretrain", "gutenberg", "clocasto-HaikuGenerator", "pg11.txt"), encoding="utf-8") as f:
        book = [p for p in f.read().split("\n\n") if p.strip()]
    awkward = ["Hello world", " leading space, trailing space ", "two  spaces,   three,\ttab\t\tand\n\nnewlines\r\n",
               "digits 0 12 345 6789 3.14159 1,000,000", "it's, they're, we've, I'm, you'll, he'd, IT'S",
               "na\u00efve caf\u00e9 \u00fcber \u65e5\u672c\u8a9e \ud55c\uad6d\uc5b4 \U0001f389\U0001f680 \u00a0nbsp",
               "code: def f(x):\n    return x**2  # square\n", "punctuation!!! ??? ... --- ((()))", "   ", "\n\n\n",
               "<|endoftext|> typed by a user, and <|user|> too"]
    texts = awkward + book[:300 - len(awkward)]
    assert len(texts) == 300
    return texts


def check_tokenization(llm, tok):
    for text in texts_300():
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        assert ids == tok.encode(text), repr(text[:60])
        assert llm.detokenize(ids).decode("utf-8") == text
    # control tokens: parsed whole where llama.cpp is told to (as its chat templates are), with gptkit's ids
    rendered, _ = tok.render_conversation(CONVERSATION[:3])
    text = tok.decode(rendered)
    assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == rendered
    for token, token_id in tok.controls.items():
        assert llm.tokenize(token.encode(), add_bos=False, special=True) == [token_id]
        assert llm.tokenize(token.encode(), add_bos=False, special=False) == tok.encode(token)  # text stays text


def test_tokenization_equals_ours_gpt2(gpt2_files):
    _, tok, paths = gpt2_files
    llm = open_gguf(paths["f16"], vocab_only=True)
    try:
        check_tokenization(llm, tok)
    finally:
        llm.close()


def assert_f32_logits_equal(llm, model, tok, prompt):
    """llama.cpp's logits on one prompt equal the model's within the f32 bound."""
    ids = tok.encode(prompt)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0, :, :tok.n_vocab].numpy()
    llm.eval(ids)
    assert np.abs(np.array(llm.scores[:len(ids)]) - ours).max() < BOUNDS["f32"] * np.abs(ours).max()


def test_tokenization_equals_ours_trained_tokenizer(trained, tmp_path):
    _, tok = trained
    model = lively(vocab_size=tok.vocab_size)
    path, _ = export_gguf(model, str(tmp_path / "own.gguf"), tok, "f32")
    llm = open_gguf(path)
    try:
        check_tokenization(llm, tok)
        assert_f32_logits_equal(llm, model, tok, PROMPTS[5])
    finally:
        llm.close()


def test_a_bytes_only_tokenizer_exports(tmp_path):
    """train_tokenizer.py --vocab_size=261 learns no merges (the toy task's): still a file llama.cpp reads."""
    import train_tokenizer
    from gptkit.configurator import load_config
    source = tmp_path / "text.txt"
    source.write_text("Write backwards: k e l p\np l e k\n" * 50)
    train_tokenizer.main(load_config(train_tokenizer.TokenizerConfig, [f"--source={source}", "--vocab_size=261",
                                                                       f"--out={tmp_path / 'tok'}"]))
    tok = load_tokenizer(str(tmp_path / "tok"))
    path, _ = export_gguf(lively(vocab_size=tok.vocab_size), str(tmp_path / "bytes.gguf"), tok, "q8_0", chat=True)
    llm = open_gguf(path, vocab_only=True)
    try:
        text = "Write backwards: z y \u00e9<|end|>"
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text)
    finally:
        llm.close()


def test_llama_cpp_chat_handler_renders_our_template(gpt2_files):
    _, tok, paths = gpt2_files
    llm = open_gguf(paths["q8_0"])
    try:
        assert llm.chat_format == "chat_template.default"  # llama-cpp-python took the file's own template
        formatter = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="<|end|>",
                                        bos_token="<|endoftext|>")
        chat = [{**m, "content": m["content"].replace("<|assistant|>", "")} for m in CONVERSATION]
        for messages, system in ((chat, None), (chat[1:2], "Be brief.")):  # no system: the trained one goes first
            prompt = formatter(messages=messages).prompt
            expected = tok.render_prompt(([{"role": "system", "content": system}] if system else []) + messages)
            assert llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True) == expected
        # a turn through llama.cpp's own chat path; <|end|> is its end of generation
        assert llm.token_eos() == tok.end
        reply = llm.create_chat_completion(messages=chat[1:2], max_tokens=8, temperature=0.0)
        assert reply["choices"][0]["finish_reason"] in ("stop", "length")
    finally:
        llm.close()


def test_ollama_modelfile():
    text = ollama_modelfile("dolly.gguf", chat=True, system="Be brief.")
    assert text.splitlines()[0] == "FROM ./dolly.gguf"
    assert 'SYSTEM """Be brief."""' in text and 'PARAMETER stop "<|end|>"' in text
    assert "<|endoftext|>{{- range .Messages }}<|{{ .Role }}|>{{ .Content }}<|end|>{{- end }}<|assistant|>" in text
    base = ollama_modelfile("base.gguf", context=256)
    assert 'TEMPLATE """{{ .Prompt }}"""' in base and "SYSTEM" not in base and "<|end|>" not in base
    assert "PARAMETER num_ctx 256" in base.splitlines()  # Ollama's longer default would run past the positions


def test_a_base_model_completes_in_llama_cpp_as_in_gptkit(tmp_path):
    """A base model's prompt is <|endoftext|> + the text in gptkit (complete_prompt_ids): llama.cpp adds
    the same token by itself, so a plain completion there is gptkit's greedy answer."""
    from gptkit.chat import complete_prompt_ids
    model, tok = lively(), load_tokenizer("gpt2")
    path, _ = export_gguf(model, str(tmp_path / "base.gguf"), tok, "f32")
    prompt = PROMPTS[1]
    ids = complete_prompt_ids(tok, prompt, 8, model.config.block_size)
    assert ids[0] == tok.eot
    ours = list(generate(model, ids, 8, temperature=0.0, n_vocab=tok.n_vocab))
    with torch.no_grad():
        top2 = model(torch.tensor([ids + ours]))[0][0, len(ids) - 1:-1, :tok.n_vocab].topk(2).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-2  # no near-tie that llama.cpp's own rounding could flip
    llm = open_gguf(path)
    try:
        assert llm.tokenize(prompt.encode("utf-8")) == ids  # the document start added, as gptkit adds it
        reply = llm.create_completion(prompt, max_tokens=8, temperature=0.0)
        assert reply["choices"][0]["text"] == tok.decode(ours)
    finally:
        llm.close()


def test_models_llama_cpp_cannot_hold_are_refused(tmp_path, trained):
    tok = load_tokenizer("gpt2")
    with pytest.raises(GGUFError, match="use f32, f16, q8_0"):
        export_gguf(lively(), str(tmp_path / "x.gguf"), tok, "int4")
    with pytest.raises(GGUFError, match="blocks of 32.*--gguf_type=f16"):
        export_gguf(lively(n_embd=48), str(tmp_path / "x.gguf"), tok, "q8_0")
    import train_tokenizer
    from gptkit.configurator import load_config
    train_tokenizer.main(load_config(train_tokenizer.TokenizerConfig, [
        f"--source={shared_data('pretrain', 'gutenberg', 'clocasto-HaikuGenerator', 'pg11.txt')}",
        "--vocab_size=300", "--pattern=gpt4", f"--out={tmp_path / 'gpt4'}"]))
    gpt4 = load_tokenizer(str(tmp_path / "gpt4"))
    with pytest.raises(GGUFError, match="GPT-4 pattern.*--pattern=gpt2"):
        export_gguf(lively(vocab_size=gpt4.vocab_size), str(tmp_path / "x.gguf"), gpt4, "f16")
    assert not (tmp_path / "x.gguf").exists()


def test_a_failed_write_leaves_the_earlier_file(tmp_path, monkeypatch):
    model, tok = lively(), load_tokenizer("gpt2")
    path = str(tmp_path / "m.gguf")
    export_gguf(model, path, tok, "f16")
    before = open(path, "rb").read()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    import gguf
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full_disk)
    with pytest.raises(OSError, match="No space"):
        export_gguf(lively(seed=1), path, tok, "f16")
    assert open(path, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["m.Modelfile", "m.gguf"]  # no temporary left behind


def run_export(*args):
    return subprocess.run([sys.executable, "export_hf.py", *args], cwd=ROOT, env=os.environ.copy(),
                          capture_output=True, text=True, timeout=300)


def test_export_script_writes_a_gguf_llama_cpp_runs(tmp_path):
    model = lively(block_size=64)
    run = tmp_path / "run"
    save_checkpoint(str(run), {"model": model.state_dict(), "model_config": model.config.to_dict(),
                               "config": {"system": "Be brief."}, "kind": "chat", "step": 10})
    out = tmp_path / "gguf" / "tiny.gguf"
    result = run_export(f"--ckpt={run}", f"--gguf={out}", "--gguf_type=q8_0")
    assert result.returncode == 0, result.stderr
    assert "ollama create tiny -f" in result.stdout and "llama-cli -m" in result.stdout
    assert f"llama-cli -m {out} -c 64 -cnv" in result.stdout  # the model's context, which llama.cpp must not pass
    modelfile = (tmp_path / "gguf" / "tiny.Modelfile").read_text()
    assert 'SYSTEM """Be brief."""' in modelfile and "PARAMETER num_ctx 64" in modelfile
    llm = open_gguf(str(out))
    try:
        assert llm.metadata["general.architecture"] == "gpt2" and llm.metadata["gpt2.context_length"] == "64"
        assert "Be brief." in llm.metadata["tokenizer.chat_template"]
    finally:
        llm.close()
    # bad values: one error each, nothing written
    for args, message in (([f"--gguf={out}", "--gguf_type=int4"], "gguf_type='int4'"),
                          ([f"--gguf={tmp_path}"], "ending in .gguf"),
                          ([f"--gguf={out}", f"--out={tmp_path / 'hf'}"], "give gguf alone")):
        result = run_export(f"--ckpt={run}", *args)
        assert result.returncode == 2 and message in result.stderr, result.stderr
    assert sorted(os.listdir(tmp_path / "gguf")) == ["tiny.Modelfile", "tiny.gguf"]


def test_an_untied_output_layer_goes_out_as_its_own_tensor(tmp_path):
    model, tok = lively(), load_tokenizer("gpt2")
    with torch.no_grad():  # an imported or edited model whose output layer is not the token embedding
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight + 0.1 * torch.randn_like(model.lm_head.weight))
    path, _ = export_gguf(model, str(tmp_path / "untied.gguf"), tok, "f32")
    llm = open_gguf(path)
    try:
        assert_f32_logits_equal(llm, model, tok, PROMPTS[1])
    finally:
        llm.close()
