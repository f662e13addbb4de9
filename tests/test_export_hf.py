"""Hugging Face export and import (gptkit/hf.py, export_hf.py), checked against transformers itself."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, Killed, kill_before_each_rename, shared_data
from gptkit.checkpoint import save_checkpoint
from gptkit.hf import EXPORT_FILES, OWN_TOKENIZER_FILES, HFError, export_hf, is_hf_folder, load_hf_gpt2
from gptkit.hf_tokenizer import gpt2_vocab_and_merges
from gptkit.loading import init_model, load_model
from gptkit.tokenizer import END, EOT, SPECIAL_TOKENS, load_tokenizer
from model import GPT, GPTConfig

transformers = pytest.importorskip("transformers")

CONVERSATION = [
    {"role": "system", "content": "You are terse. Answer in one line."},
    {"role": "user", "content": "What is 12 * 12?\n\nShow  the working."},
    {"role": "assistant", "content": " 12 * 12 = 144 \u2714"},
    {"role": "user", "content": "And in Japanese? \u65e5\u672c\u8a9e"},
]
TEXTS = [
    "Hello world",
    " leading space, trailing space ",
    "two  spaces,   three,\ttab\t\tand\n\nnewlines\r\n\r\nCRLF\n",
    "digits 0 12 345 6789 3.14159 1,000,000 2024-05-20",
    "it's, they're, we've, I'm, you'll, he'd, IT'S",
    "unicode: na\u00efve caf\u00e9 \u00fcber \u65e5\u672c\u8a9e \u4e2d\u6587 \ud55c\uad6d\uc5b4 \u0440\u0443\u0441\u0441\u043a\u0438\u0439 \U0001f389\U0001f680 \u00a0nbsp",
    "code: def f(x):\n    return x**2  # square\n",
    "punctuation!!! ??? ... --- ((()))",
    "",
]


def _ids(result):
    """apply_chat_template returns a list in some transformers versions, a BatchEncoding in others."""
    return list(result["input_ids"]) if hasattr(result, "keys") else list(result)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """A tiny bias=False chat model with trained-looking (non-default) weights, exported once."""
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, bias=False)
    model = GPT(config, verbose=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # LayerNorm weights away from 1, so a transpose slip shows
    model.eval()
    out = str(tmp_path_factory.mktemp("hf_tiny"))
    export_hf(model, out, load_tokenizer("gpt2"), chat=True)
    return model, out


def test_files_and_config(tiny_export):
    model, out = tiny_export
    for name in ("config.json", "model.safetensors", "generation_config.json", "vocab.json", "merges.txt",
                 "tokenizer_config.json", "special_tokens_map.json"):
        assert os.path.exists(os.path.join(out, name)), name
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["vocab_size"] == 50304
    assert config["n_positions"] == 64 and config["activation_function"] == "gelu_new"
    assert config["tie_word_embeddings"] is True and config["gptkit_bias"] is False
    from safetensors import safe_open
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert "lm_head.weight" not in keys  # tied: stored once, as transformers expects
        assert f.get_tensor("transformer.h.0.attn.c_attn.weight").shape == (64, 192)  # Conv1D layout (in, out)
        assert not f.get_tensor("transformer.h.1.mlp.c_fc.bias").any()  # bias=False -> zero biases
    assert "transformer.wte.weight" in keys and "transformer.h.1.mlp.c_proj.bias" in keys


def test_roundtrip_is_bitwise(tiny_export, tmp_path):
    model, out = tiny_export
    back = load_hf_gpt2(out, verbose=False)
    assert back.config == model.config  # bias=False restored through "gptkit_bias"
    assert _same_weights(model, back)
    # a model with biases round-trips too, biases included
    torch.manual_seed(1)
    biased = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, bias=True), verbose=False)
    with torch.no_grad():
        for p in biased.parameters():
            p.add_(0.05 * torch.randn_like(p))
    export_hf(biased, str(tmp_path), load_tokenizer("gpt2"))
    back = load_hf_gpt2(str(tmp_path), verbose=False)
    assert back.config == biased.config and _same_weights(biased, back)


def test_a_run_starts_from_an_exported_folder(tiny_export, tmp_path):
    """train.py / finetune.py --init_from=<a Hugging Face GPT-2 folder>: its weights, this run's dropout."""
    from gptkit.configurator import load_config
    from gptkit.system import Runtime
    from gptkit.train_config import TrainConfig
    model, out = tiny_export
    cfg = load_config(TrainConfig, [f"--init_from={out}", "--dropout=0.1", "--block_size=64", "--device=cpu",
                                    f"--out_dir={tmp_path / 'run'}"])  # block_size: at most the export's context
    started, _, ckpt = init_model(cfg, Runtime(device="cpu", device_type="cpu", dtype="float32"))
    assert ckpt is None  # fresh training from these weights
    assert started.config == GPTConfig(**{**model.config.to_dict(), "dropout": 0.1})
    assert started.transformer.h[0].mlp.dropout.p == 0.1 and _same_weights(model, started)


def test_transformers_logits_equal_ours_tiny(tiny_export):
    model, out = tiny_export
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    idx = torch.randint(0, 50304, (2, 40))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf_model(idx).logits
    assert theirs.shape == ours.shape == (2, 40, 50304)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_transformers_logits_equal_ours_124m_shape(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, bias=False), verbose=False).eval()
    export_hf(model, str(tmp_path), load_tokenizer("gpt2"))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert hf_model.config.n_positions == 1024
    idx = torch.randint(0, 50257, (1, 24))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf_model(idx).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_transformers_generate_stops_where_gptkit_does(tiny_export, tmp_path):
    """generation_config.json: in transformers' generate an exported chat model's reply ends at
    <|end|>, as in sample.py; a base model writes <|end|> on and ends at <|endoftext|>."""
    model, chat_dir = tiny_export
    export_hf(model, str(tmp_path / "base"), load_tokenizer("gpt2"))
    new_tokens = {}
    for kind, folder in (("chat", chat_dir), ("base", str(tmp_path / "base"))):
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        steps = []

        def steer(module, inputs, logits):  # the 3rd new token is <|end|>, the 5th <|endoftext|>
            steps.append(1)
            forced = {3: END, 5: EOT}.get(len(steps))
            if forced is None:
                return logits
            logits = logits.clone()
            logits[:, -1, forced] = 1e4
            return logits

        hf_model.lm_head.register_forward_hook(steer)
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([[EOT, 15496]]), max_new_tokens=10, do_sample=False)
        new_tokens[kind] = out[0, 2:].tolist()
    assert len(new_tokens["chat"]) == 3 and new_tokens["chat"][-1] == END
    assert len(new_tokens["base"]) == 5 and new_tokens["base"][2] == END and new_tokens["base"][-1] == EOT


def test_vocab_and_merges_equal_gpt2_files():
    vocab, merges = gpt2_vocab_and_merges()
    with open(shared_data("gpt2", "encoder.json"), encoding="utf-8") as f:
        assert vocab == json.load(f)
    with open(shared_data("gpt2", "vocab.bpe"), encoding="utf-8") as f:
        lines = f.read().split("\n")
    assert lines[0].startswith("#version")
    assert merges == [line for line in lines[1:] if line]


def test_autotokenizer_matches_tiktoken(tiny_export):
    _, out = tiny_export
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = load_tokenizer("gpt2")
    for text in TEXTS:
        ids = hf_tok.encode(text, add_special_tokens=False)
        assert ids == ours.encode(text), repr(text)
        assert hf_tok.decode(ids) == text, repr(text)
    # control tokens stay whole, with the ids gptkit gives them
    for token, token_id in {"<|endoftext|>": EOT, **SPECIAL_TOKENS}.items():
        assert hf_tok.encode(token, add_special_tokens=False) == [token_id]
        assert hf_tok.convert_ids_to_tokens(token_id) == token
    assert hf_tok.encode("x<|user|>y<|end|>", add_special_tokens=False) == [87, SPECIAL_TOKENS["<|user|>"], 88, END]


def test_chat_template_matches_renderer(tiny_export):
    _, out = tiny_export
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = load_tokenizer("gpt2")
    prompt = _ids(hf_tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True))
    assert prompt == ours.render_prompt(CONVERSATION)
    full = CONVERSATION + [{"role": "assistant", "content": "\u5341\u4e8c\u304b\u3051\u308b\u5341\u4e8c"}]
    rendered = _ids(hf_tok.apply_chat_template(full, tokenize=True))
    assert rendered == ours.render_conversation(full)[0]
    no_system = CONVERSATION[1:3]
    assert _ids(hf_tok.apply_chat_template(no_system, tokenize=True)) == ours.render_conversation(no_system)[0]
    with pytest.raises(Exception, match="system message may only come first"):
        hf_tok.apply_chat_template([CONVERSATION[1], CONVERSATION[0]], tokenize=True)


def test_two_models_with_two_tokenizers_export_in_one_process(tiny_export, trained, tmp_path):
    """No tokenizer lingers between exports: each folder gets the files, ids and config of the
    tokenizer it was given, whatever was exported before (an export over a folder of the other
    tokenizer replaces its tokenizer files too)."""
    gpt2_model, _ = tiny_export
    _, own = trained
    gpt2 = load_tokenizer("gpt2")
    torch.manual_seed(0)
    own_model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=own.vocab_size),
                    verbose=False).eval()
    export_hf(gpt2_model, str(tmp_path / "over"), gpt2, chat=True)  # then the other tokenizer's export over it
    exports = {"own": (own_model, own), "gpt2": (gpt2_model, gpt2), "over": (own_model, own)}  # alternating
    for name, (model, tok) in exports.items():
        export_hf(model, str(tmp_path / name), tok, chat=True)
    for name, (model, tok) in exports.items():
        folder = str(tmp_path / name)
        assert sorted(os.listdir(folder)) == (EXPORT_FILES if tok is gpt2 else OWN_TOKENIZER_FILES), name
        config = json.load(open(os.path.join(folder, "config.json")))
        assert config["gptkit_tokenizer"] == tok.hash and config["vocab_size"] == model.config.vocab_size
        assert config["bos_token_id"] == config["eos_token_id"] == tok.eot
        hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
        for text in TEXTS:
            assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text), (name, text)
        assert _ids(hf_tok.apply_chat_template(CONVERSATION, tokenize=True)) == tok.render_conversation(CONVERSATION)[0]
        # and back into gptkit: the folder's model comes with the tokenizer it was exported with
        loaded, loaded_tok, _ = load_model(folder, verbose=False)
        assert loaded_tok.hash == tok.hash and _same_weights(model, loaded)


def test_random_transformers_gpt2_loads_with_same_logits(tmp_path):
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=50257)
    hf_model = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # non-zero biases and LayerNorm shifts must carry over
    hf_model.save_pretrained(str(tmp_path / "st"))
    # the older pytorch_model.bin form (OpenAI's upload has no "transformer." prefix)
    (tmp_path / "bin").mkdir()
    (tmp_path / "st" / "config.json").rename(tmp_path / "bin" / "config.json")
    plain = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items()}
    torch.save(plain, tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "st" / "config.json").write_text((tmp_path / "bin" / "config.json").read_text())

    idx = torch.randint(0, 50257, (2, 50))
    with torch.no_grad():
        theirs = hf_model(idx).logits
    for folder in ("st", "bin"):
        model = load_hf_gpt2(str(tmp_path / folder), verbose=False).eval()
        assert model.config.bias is True and model.config.vocab_size == 50304 and model.config.block_size == 128
        with torch.no_grad():
            ours, _ = model(idx)
        torch.testing.assert_close(ours[..., :50257], theirs, atol=1e-4, rtol=0)
        # the padded rows, where the chat tokens live, start at the mean of GPT-2's rows
        wte = model.transformer.wte.weight
        torch.testing.assert_close(wte[50257:], wte[:50257].mean(0).expand(47, -1))
    # init_from for a finetune with a shorter context and dropout
    short = load_hf_gpt2(str(tmp_path / "st"), verbose=False, block_size=64, dropout=0.1).eval()
    assert short.config.block_size == 64 and short.config.dropout == 0.1
    with torch.no_grad():
        torch.testing.assert_close(short(idx)[0][..., :50257], theirs, atol=1e-4, rtol=0)
    with pytest.raises(HFError, match="block_size <= 128"):
        load_hf_gpt2(str(tmp_path / "st"), block_size=256)
    with pytest.raises(HFError, match="n_layer"):
        load_hf_gpt2(str(tmp_path / "st"), n_layer=4)
    assert is_hf_folder(str(tmp_path / "st")) and not is_hf_folder(str(tmp_path / "missing"))


def test_not_gpt2_folders_give_clear_errors(tmp_path, tiny_export):
    _, out = tiny_export
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(HFError, match=r"llama.*not a GPT-2 checkpoint"):
        load_hf_gpt2(str(tmp_path / "llama"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(HFError, match=r"empty.*no config.json"):
        load_hf_gpt2(str(tmp_path / "empty"))
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(open(os.path.join(out, "config.json")).read())
    with pytest.raises(HFError, match=r"noweights holds no weights"):
        load_hf_gpt2(str(tmp_path / "noweights"))
    # weights from one model, config.json of another shape
    (tmp_path / "mismatch").mkdir()
    config = json.load(open(os.path.join(out, "config.json")))
    config["n_embd"] = 128
    (tmp_path / "mismatch" / "config.json").write_text(json.dumps(config))
    os.symlink(os.path.join(out, "model.safetensors"), tmp_path / "mismatch" / "model.safetensors")
    with pytest.raises(HFError, match=r"mismatch.*shape"):
        load_hf_gpt2(str(tmp_path / "mismatch"))
    with pytest.raises(HFError, match="is not a folder"):
        load_hf_gpt2(str(tmp_path / "does-not-exist"))  # a path, so no attempt at the hub
    # damaged files and impossible shapes are named, with what to do
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "config.json").write_text('{"model_type": "gpt2", "n_la')
    with pytest.raises(HFError, match=r"cannot read .*damaged/config\.json.*export the folder again"):
        load_hf_gpt2(str(tmp_path / "damaged"))
    (tmp_path / "damaged" / "config.json").write_text(open(os.path.join(out, "config.json")).read())
    (tmp_path / "damaged" / "model.safetensors").write_bytes(open(os.path.join(out, "model.safetensors"), "rb").read()[:5000])
    with pytest.raises(HFError, match=r"cannot read .*model\.safetensors.*truncated or corrupt"):
        load_hf_gpt2(str(tmp_path / "damaged"))
    config["n_embd"], config["n_head"] = 64, 3
    (tmp_path / "damaged" / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFError, match="n_embd 64 is not a multiple of n_head 3"):
        load_hf_gpt2(str(tmp_path / "damaged"))


@pytest.mark.slow
def test_export_script_end_to_end(tmp_path, tiny_export):
    model, _ = tiny_export
    ckpt_dir, out = tmp_path / "run", tmp_path / "hf"
    save_checkpoint(str(ckpt_dir), {"model": model.state_dict(), "model_config": model.config.to_dict(),
                                    "config": {"system": "Be brief."}, "kind": "chat", "step": 10})
    result = subprocess.run([sys.executable, "export_hf.py", f"--ckpt={ckpt_dir}", f"--out={out}"],
                            cwd=ROOT, env=os.environ.copy(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "wrote a chat model" in result.stdout and "AutoModelForCausalLM.from_pretrained" in result.stdout
    assert "chat_template" in json.load(open(out / "tokenizer_config.json"))
    assert json.load(open(out / "config.json"))["gptkit_system"] == "Be brief."  # finetune.py's, carried over
    assert _same_weights(model, load_hf_gpt2(str(out), verbose=False))
    result = subprocess.run([sys.executable, "export_hf.py", f"--ckpt={tmp_path / 'missing'}"],
                            cwd=ROOT, env=os.environ.copy(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "does not exist" in result.stderr and "--out=" in result.stderr
    # exporting into the run's own folder would replace its config.json
    result = subprocess.run([sys.executable, "export_hf.py", f"--ckpt={ckpt_dir}", f"--out={ckpt_dir}"],
                            cwd=ROOT, env=os.environ.copy(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "holds a gptkit run (ckpt.pt)" in result.stderr
    assert "config.json" not in os.listdir(ckpt_dir)


def test_hub_names_download_then_load(tiny_export, monkeypatch):
    # the hub itself is out of reach in tests: its download function is replaced at the boundary
    import huggingface_hub
    model, out = tiny_export
    asked = []

    def fake_snapshot_download(name, allow_patterns=None, **kwargs):
        asked.append((name, allow_patterns))
        return out

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    for name in ("gpt2", "openai-community/gpt2-medium"):
        assert _same_weights(model, load_hf_gpt2(name, verbose=False))
    # sample.py and eval_hellaswag.py take a hub name as --ckpt; export_hf.py, which makes such folders, does not
    import eval_hellaswag
    import export_hf as export_script
    from gptkit.configurator import ConfigError, load_config
    assert load_config(eval_hellaswag.EvalConfig, ["--ckpt=gpt2"]).ckpt == "gpt2"
    loaded, _, info = load_model("gpt2", verbose=False)
    assert info == {"kind": "base"} and not loaded.training and _same_weights(model, loaded)
    assert load_model(out, verbose=False)[2] == {"kind": "chat", "config": {"system": ""}}  # a chat export
    with pytest.raises(ConfigError, match="is a Hugging Face model, not a gptkit run"):
        load_config(export_script.ExportConfig, [f"--ckpt={out}", "--out=elsewhere"])
    assert [name for name, _ in asked] == ["gpt2", "openai-community/gpt2-medium", "gpt2"]
    assert "config.json" in asked[0][1] and "model.safetensors" in asked[0][1]  # weights only, no other formats

    def offline(name, **kwargs):
        raise OSError("could not reach huggingface.co")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(HFError, match=r"'gpt2' is not a local folder, and downloading it .*could not reach"):
        load_hf_gpt2("gpt2", verbose=False)


def test_imported_gpt2_never_prefers_the_padded_slots(tmp_path):
    # A trained GPT-2's embeddings share a large common direction that its final hidden state points
    # away from: every real logit is far below 0 (about -35 for OpenAI's 124M). Rows added for the
    # padded vocabulary must not score above them, or sampling the imported model emits only those.
    torch.manual_seed(0)
    hf_model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32,
                                                                    n_positions=16, vocab_size=50257)).eval()
    common = torch.randn(32)
    common /= common.norm()
    with torch.no_grad():
        hf_model.transformer.wte.weight.copy_(3 * common + 0.3 * torch.randn(50257, 32))
        hf_model.transformer.ln_f.weight.fill_(0.5)
        hf_model.transformer.ln_f.bias.copy_(-10 * common)
    hf_model.save_pretrained(str(tmp_path))
    idx = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        assert hf_model(idx).logits.max() < -5  # real logits far below 0, as in the trained model
        probs = torch.softmax(load_hf_gpt2(str(tmp_path), verbose=False).eval()(idx)[0].float(), dim=-1)
    # each padded row scores the mean of the real logits, so it is no likelier than an average token
    # (exp of a mean <= mean of exps): all 47 together get at most 47 / 50257 of the probability
    assert probs[..., 50257:].sum(-1).max().item() <= 47 / 50257 + 1e-6


@pytest.mark.slow
def test_export_killed_over_an_earlier_export_leaves_it_or_a_refused_folder(tiny_export, tmp_path, monkeypatch):
    # Export a model, then export another one (other width, base kind) into the same folder, killed
    # while it writes the weights and before each file rename in turn. sample.py and train.py
    # --init_from read the folder: each kill must leave the earlier export whole, the new one, or a
    # folder they refuse, never the new config.json with the old weights or the reverse.
    import safetensors.torch
    from gptkit.configurator import UserError
    old_model, _ = tiny_export
    torch.manual_seed(1)
    new_model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=32, bias=False), verbose=False)
    folder = str(tmp_path / "hf")

    def read():
        try:
            model, _, ckpt = load_model(folder, verbose=False)
        except UserError:
            return "refused"
        for name, reference, kind in (("old", old_model, "chat"), ("new", new_model, "base")):
            if ckpt["kind"] == kind and _same_weights(model, reference):
                return name
        return "mix"

    def kill(*args, **kwargs):
        raise Killed

    gpt2 = load_tokenizer("gpt2")
    export_hf(old_model, folder, gpt2, chat=True)
    for writer in ("save", "save_file"):  # killed (or out of disk) while writing the weights
        monkeypatch.setattr(safetensors.torch, writer, kill)
    with pytest.raises(Killed):
        export_hf(new_model, folder, gpt2, chat=False)
    monkeypatch.undo()
    assert read() == "old"

    outcomes = kill_before_each_rename(monkeypatch, lambda: export_hf(new_model, folder, gpt2, chat=False), read,
                                       reset=lambda: export_hf(old_model, folder, gpt2, chat=True))
    assert all(outcome in ("old", "new", "refused") for outcome in outcomes), outcomes
    assert outcomes[-1] == "new" and "old" not in outcomes[outcomes.index("new"):]


def test_a_run_folder_before_its_first_save_is_not_a_hugging_face_folder(tmp_path, tiny_export):
    # a run killed before its first checkpoint holds only its settings in config.json
    from gptkit.loading import ckpt_arg_problems
    (tmp_path / "config.json").write_text(json.dumps({"out_dir": str(tmp_path), "n_layer": 2}))
    assert not is_hf_folder(str(tmp_path))
    assert "has not saved yet" in ckpt_arg_problems(str(tmp_path))[0]
    _, out = tiny_export
    assert is_hf_folder(out)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "n_la')  # damaged: load_hf_gpt2 names it
    assert is_hf_folder(str(tmp_path))


def test_transformers_generate_never_samples_the_unused_slots(tiny_export):
    """As in sample.py, transformers' generate on an export never picks ids 50261..50303, the padding
    slots without text (generation_config.json suppresses them)."""
    from gptkit.tokenizer import MIN_VOCAB_SIZE
    model, chat_dir = tiny_export
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(chat_dir, dtype=torch.float32).eval()

    def pad_wins(module, inputs, logits):
        logits = logits.clone()
        logits[..., MIN_VOCAB_SIZE:] = 1e4
        return logits

    hf_model.lm_head.register_forward_hook(pad_wins)
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([[EOT, 15496]]), max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert len(out[0, 2:]) == 5 and all(token < MIN_VOCAB_SIZE for token in out[0, 2:].tolist())


def test_a_chat_export_starts_chats_with_its_training_system_prompt(tiny_export, tmp_path):
    # finetune.py trains every conversation with the data's system prompt: transformers' chat template
    # and sample.py --ckpt=<export> must put it first too when a chat brings none
    model, _ = tiny_export
    system = 'Answer "briefly".\nUse \\ and {{ braces }} and {% tags %}: caf\u00e9 \u65e5\u672c \U0001f600'
    folder = str(tmp_path / "hf")
    export_hf(model, folder, load_tokenizer("gpt2"), chat=True, system=system)
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    ours = load_tokenizer("gpt2")
    chat = CONVERSATION[1:3]  # user, assistant: no system message
    rendered = _ids(hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True))
    assert rendered == ours.render_prompt([{"role": "system", "content": system}] + chat)
    # a chat that brings its own system message keeps it, alone
    assert _ids(hf_tok.apply_chat_template(CONVERSATION, tokenize=True)) == ours.render_conversation(CONVERSATION)[0]
    assert load_model(folder, verbose=False)[2] == {"kind": "chat", "config": {"system": system}}
