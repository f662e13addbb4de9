"""The whole pipeline on a tokenizer of one's own: train_tokenizer -> prepare_fineweb -> train ->
prepare_instruct -> finetune -> sample -> eval_hellaswag -> export_hf -> transformers, with the
tokenizer given once (to the prepare scripts) and carried by data folders and checkpoints after that."""

import dataclasses
import json
import os
import sys
import types

import pytest
import torch

from conftest import shared_data
from gptkit.configurator import load_config
from gptkit.tokenizer import TokenizerError, load_tokenizer
from test_finetune import run

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # every test here stands on the module's pipeline of real runs

TINY = ["--n_layer=2", "--n_head=4", "--n_embd=64", "--block_size=64", "--device=cpu", "--micro_batch_size=8",
        "--total_batch_tokens=512", "--eval_tokens=512", "--log_interval=2", "--sample_tokens=0", "--warmup_steps=1"]
CHATS = [{"instruction": f"Name {thing}.", "output": f"{answer}, of course."}
         for thing, answer in [("a river", "The Thames"), ("a colour", "Blue"), ("a city", "Paris"),
                               ("a tree", "An oak"), ("a fruit", "A pear"), ("a bird", "A robin")] * 4]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Tokenizer and both data folders in this process (fast), training and the rest as users run them."""
    import prepare_fineweb
    import prepare_instruct
    import train_tokenizer
    tmp = tmp_path_factory.mktemp("own_tokenizer")
    book = shared_data("pretrain", "gutenberg", "clocasto-HaikuGenerator", "pg11.txt")
    train_tokenizer.main(load_config(train_tokenizer.TokenizerConfig, [
        f"--source={book}", "--vocab_size=512", f"--out={tmp / 'tok'}"]))
    prepare_fineweb.prepare(load_config(prepare_fineweb.PrepareConfig, [
        f"--source={book}", f"--data_dir={tmp / 'data'}", f"--tokenizer={tmp / 'tok'}", "--val_tokens=4000",
        "--num_proc=1"]))
    (tmp / "chats.json").write_text(json.dumps(CHATS))
    prepare_instruct.prepare(load_config(prepare_instruct.InstructConfig, [
        f"--sources={tmp / 'chats.json'}", f"--data_dir={tmp / 'sft'}", f"--tokenizer={tmp / 'tok'}",
        "--block_size=64", "--val_fraction=0.2"]))
    run("train.py", f"--data_dir={tmp / 'data'}", f"--out_dir={tmp / 'base'}", "--max_steps=4", "--eval_interval=4",
        "--learning_rate=3e-3", *TINY)
    run("finetune.py", f"--data_dir={tmp / 'sft'}", f"--init_from={tmp / 'base'}", f"--out_dir={tmp / 'chat'}",
        "--max_steps=2", "--eval_interval=2", "--questions=1", "--answer_tokens=4", *TINY)
    return tmp, load_tokenizer(str(tmp / "tok"))


def test_data_and_checkpoints_carry_the_tokenizer(pipeline):
    from gptkit.data import list_shards, read_header
    tmp, tok = pipeline
    text = (tmp / "tok" / "tokenizer.json").read_text(encoding="utf-8")
    for folder in ("data", "sft"):
        assert (tmp / folder / "tokenizer.json").read_text(encoding="utf-8") == text
    assert all(read_header(p)[3] == 512 for p in list_shards(str(tmp / "data"), "train"))
    assert json.load(open(tmp / "sft" / "meta.json"))["tokenizer"] == tok.hash
    for run_dir in ("base", "chat"):
        ckpt = torch.load(tmp / run_dir / "ckpt.pt", weights_only=True)  # a string: still weights_only
        assert ckpt["tokenizer"] == text and ckpt["model_config"]["vocab_size"] == 512


def test_sample_eval_and_export_need_no_flag_and_transformers_agrees(pipeline):
    tmp, tok = pipeline
    prompt = "Name a river."
    sampled = run("sample.py", f"--ckpt={tmp / 'chat'}", f"--prompt={prompt}", "--temperature=0",
                  "--max_new_tokens=12", "--device=cpu").stdout
    evaluated = run("eval_hellaswag.py", f"--ckpt={tmp / 'base'}", "--limit=8", "--device=cpu",
                    f"--data={shared_data('hellaswag', 'hellaswag_val_derived.jsonl')}")
    assert "HellaSwag: 8 items" in evaluated.stdout
    run("export_hf.py", f"--ckpt={tmp / 'chat'}", f"--out={tmp / 'hf'}")
    card = (tmp / "hf" / "README.md").read_text(encoding="utf-8")  # the model card names this tokenizer and its ids
    assert f"(`{tok.hash}`, in tokenizer.json): 512 ids" in card and "`<|end|>` (id 4)" in card
    assert ".gptkit.lock" not in os.listdir(tmp / "hf")  # the export's lock is gone with export_hf.py
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp / "hf"))
    real = [open(shared_data(*parts), encoding="utf-8", newline="").read(30_000) for parts in
            [("pretrain", "gutenberg", "karpathy-char-rnn-warpeace", "warpeace_input.txt"),  # BOM, CRLF
             ("pretrain", "wikitext-2", "valid.txt"), ("pretrain", "cia-world-factbook", "world192.txt")]]
    real.append("na\u00efve caf\u00e9 \u65e5\u672c\u8a9e \U0001f642\r\n\ttabs  and  spaces")
    for text in real:
        assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
    messages = [{"role": "user", "content": prompt}]
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids)
    assert ids == tok.render_prompt(messages)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp / "hf"), dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    if out and out[-1] in (tok.end, tok.eot):
        out = out[:-1]  # the stop token: sample.py does not print it
    assert all(i < tok.n_vocab for i in out)
    assert sampled == tok.decode(out) + "\n"
    from gptkit.loading import load_model
    from gptkit.generate import generate
    # and back: the export loads into gptkit with its tokenizer, and answers the same
    model, model_tok, _ = load_model(str(tmp / "hf"), verbose=False)
    assert model_tok.hash == tok.hash and model.config.vocab_size == 512
    assert list(generate(model, ids, 12, temperature=0, stop_tokens=(tok.end, tok.eot), n_vocab=tok.n_vocab)) == out


def test_data_and_model_of_different_tokenizers_is_an_error(pipeline, tmp_path):
    """A GPT-2 checkpoint finetuned on data of the trained tokenizer would read garbage ids."""
    from gptkit.checkpoint import save_checkpoint
    from gptkit.train_config import FinetuneConfig
    from gptkit.loading import init_model
    from model import GPT, GPTConfig
    tmp, tok = pipeline
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16), verbose=False)  # no record: GPT-2
    save_checkpoint(str(tmp_path / "gpt2run"), {"model": model.state_dict(), "model_config": model.config.to_dict(),
                                                "kind": "base", "step": 0})
    cfg = load_config(FinetuneConfig, [f"--data_dir={tmp / 'sft'}", f"--init_from={tmp_path / 'gpt2run'}",
                                       f"--out_dir={tmp_path / 'out'}"])
    with pytest.raises(TokenizerError, match=f"{tok.hash}.*gpt2run.*tokenizer gpt2"):
        init_model(cfg, types.SimpleNamespace(master=False, device="cpu"))
    assert not os.path.exists(tmp_path / "out" / "ckpt.pt")


def test_train_and_bench_size_the_vocabulary_from_the_data(pipeline, monkeypatch):
    from bench import BenchConfig, bench_vocab
    from gptkit.configurator import ConfigError
    from gptkit.loading import model_vocab_size, run_tokenizer
    from gptkit.train_config import TrainConfig
    tmp, tok = pipeline
    cfg = load_config(TrainConfig, [f"--data_dir={tmp / 'data'}"])
    assert run_tokenizer(cfg).hash == tok.hash and model_vocab_size(cfg, tok) == 512
    assert bench_vocab(load_config(BenchConfig, [f"--data_dir={tmp / 'data'}"])) == (512, 512)
    from bench import bench_decode
    from gptkit.system import setup_runtime
    bench = load_config(BenchConfig, [f"--data_dir={tmp / 'data'}", "--vocab_size=1024", "--n_layer=2", "--n_head=4",
                                      "--n_embd=64", "--block_size=16", "--steps=1", "--warmup=0", "--json"])
    # decoding samples among the data tokenizer's 512 ids, not the padding up to 1024
    result = bench_decode(bench, setup_runtime("cpu", "float32", 0, verbose=False))
    assert result["n_vocab"] == 512 and result["new_tokens"] == 8 and result["kv_cache_tokens_per_sec"] > 0
    from bench import bench_tokenize, read_documents
    (tmp / "text").mkdir()
    (tmp / "text" / "a.txt").write_text("Name a river.\n\nThe Thames, of course.\n", encoding="utf-8")
    import tiktoken  # the plain loop the parallel tokenizer is timed against is the same tokenizer's, not GPT-2's

    def no_gpt2(name):
        raise AssertionError(f"bench fetched tiktoken's {name} for a trained tokenizer")
    monkeypatch.setattr(tiktoken, "get_encoding", no_gpt2)
    result = bench_tokenize(load_config(BenchConfig, ["--mode=tokenize", f"--text={tmp / 'text'}", "--num_proc=1",
                                                      f"--tokenizer={tmp / 'tok'}"]))
    documents = read_documents(str(tmp / "text"))
    assert result["tokenizer"] == tok.name and result["tokens"] == sum(1 + len(tok.encode(d)) for d in documents)
    assert model_vocab_size(load_config(TrainConfig, ["--vocab_size=1024"]), tok) == 1024
    with pytest.raises(ConfigError, match="vocab_size=500 is smaller than the 512"):
        model_vocab_size(load_config(TrainConfig, ["--vocab_size=500"]), tok)
    with pytest.raises(ConfigError, match=f"tokenizer=gpt2.*prepared with tokenizer {tok.hash}"):
        run_tokenizer(load_config(TrainConfig, [f"--data_dir={tmp / 'data'}", "--tokenizer=gpt2"]))


@pytest.fixture(scope="module")
def served(pipeline):
    """The chat model of the trained tokenizer behind serve.py's app, in this process (no server start);
    favour(token) makes the model put all its weight on one id, to exercise the stop tokens."""
    from fastapi.testclient import TestClient
    from gptkit.chat import resolve_system
    from gptkit.loading import load_model
    from gptkit.engine import Engine
    from serve import ServeConfig, build_app
    tmp, tok = pipeline
    cfg = load_config(ServeConfig, [f"--ckpt={tmp / 'chat'}", "--temperature=0"])
    model, model_tok, ckpt = load_model(cfg.ckpt, verbose=False)
    assert model_tok.hash == tok.hash  # the checkpoint's own tokenizer, with no flag
    cfg = dataclasses.replace(cfg, system=resolve_system(cfg.system, ckpt))  # as serve.py's main
    favoured = []
    model.lm_head.register_forward_hook(lambda module, args, out: out.index_fill(-1, torch.tensor(favoured), 1e4)
                                        if favoured else out)
    engine = Engine(model, model_tok)
    card = {"id": "chat", "object": "model", "created": 0, "owned_by": "gptkit"}
    try:
        with TestClient(build_app(cfg, engine, card), base_url="http://127.0.0.1") as client:
            yield client, model, tok, favoured
    finally:
        engine.close()


def test_serve_stops_counts_and_keeps_typed_control_tokens_text_with_the_trained_tokenizer(served):
    from gptkit.generate import generate
    client, model, tok, favoured = served
    typed = "Name a river.<|end|><|assistant|>"  # control-token text from a person: plain text
    messages = [{"role": "user", "content": typed}]
    prompt = tok.render_prompt(messages)
    assert [i for i in prompt if i < 5] == [tok.eot, tok.user, tok.end, tok.assistant]  # only the ones placed
    for token, chat_finish, chat_text in [(tok.end, "stop", ""), (tok.eot, "stop", ""), (7, "length", None)]:
        favoured[:] = [token]
        chat = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 5}).json()
        assert chat["usage"]["prompt_tokens"] == len(prompt)
        assert chat["choices"][0]["finish_reason"] == chat_finish
        content = chat["choices"][0]["message"]["content"]
        assert content == (chat_text if chat_text is not None else tok.decode([token] * 5))
        assert chat["usage"]["completion_tokens"] == (0 if chat_finish == "stop" else 5)
        # a completion stops at <|endoftext|> only: <|end|> is text there
        done = client.post("/v1/completions", json={"prompt": typed, "max_tokens": 3}).json()
        assert done["usage"]["prompt_tokens"] == 1 + len(tok.encode(typed))
        stops = token == tok.eot
        assert done["choices"][0]["finish_reason"] == ("stop" if stops else "length")
        assert done["choices"][0]["text"] == ("" if stops else tok.decode([token] * 3))
    favoured[:] = []  # the model as trained: the answer sample.py's code gives
    free = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8}).json()
    expected = list(generate(model, prompt, 8, temperature=0, stop_tokens=(tok.end, tok.eot), n_vocab=tok.n_vocab))
    assert free["choices"][0]["message"]["content"] == tok.decode(expected)
    assert free["usage"]["completion_tokens"] == len(expected)


def test_dpo_pairs_padding_and_folder_lock_with_the_trained_tokenizer(pipeline, monkeypatch):
    """Pairs prepared with --tokenizer, padded with ids of that vocabulary; dpo.py trains the trained-tokenizer
    chat model on them, and refuses an out_dir another process holds."""
    import numpy as np
    import prepare_instruct
    from gptkit.preference import pair_rows, read_pairs
    from gptkit.lock import LOCK_NAME, FolderBusyError, release_folder
    from test_lock import holder
    tmp, tok = pipeline
    pairs = [{"prompt": f"Name {c['instruction'][5:]}", "chosen": c["output"], "rejected": "No idea" + "." * (i % 5)}
             for i, c in enumerate(CHATS[:6])]
    (tmp / "pairs.json").write_text(json.dumps(pairs))
    prepare_instruct.prepare(load_config(prepare_instruct.InstructConfig, [
        f"--sources={tmp / 'pairs.json'}", f"--data_dir={tmp / 'dpo_data'}", f"--tokenizer={tmp / 'tok'}",
        "--block_size=64", "--val_fraction=0.3"]))
    assert LOCK_NAME not in os.listdir(tmp / "dpo_data")  # released when the preparation finished
    ids, mask, offsets, n_pairs = read_pairs(str(tmp / "dpo_data"), "train")
    assert n_pairs >= 2 and int(ids.max()) < tok.n_vocab and ids[0] == tok.eot
    x, y = pair_rows(ids, mask, offsets, list(range(n_pairs)), "cpu")
    assert int(x.max()) < tok.n_vocab and int(y.max()) < tok.n_vocab
    assert set(np.unique(y[y >= 0].numpy())) >= {tok.end}  # each answer closes with the trained <|end|>

    flags = [f"--data_dir={tmp / 'dpo_data'}", f"--init_from={tmp / 'chat'}", f"--out_dir={tmp / 'dpo'}",
             "--block_size=64", "--device=cpu", "--compile=False", "--questions=1", "--answer_tokens=4",
             "--total_batch_pairs=2", "--micro_batch_size=2", "--max_steps=2", "--eval_interval=2",
             "--warmup_steps=1", "--learning_rate=1e-3"]
    import dpo
    monkeypatch.setattr(sys, "argv", ["dpo.py", *flags])  # in this process: no second startup
    try:
        with holder(tmp / "dpo") as proc:
            with pytest.raises(FolderBusyError, match=f"process {proc.pid} on"):
                dpo.main()
        assert os.listdir(tmp / "dpo") == [LOCK_NAME]  # the killed holder's file, nothing of the refused run
        dpo.main()
    finally:
        release_folder(str(tmp / "dpo"))
    ckpt = torch.load(tmp / "dpo" / "ckpt.pt", weights_only=True)
    assert ckpt["tokenizer"] == tok.to_string() and ckpt["model_config"]["vocab_size"] == 512
    assert LOCK_NAME not in os.listdir(tmp / "dpo")

    # its model card: the trained tokenizer's facts and ids, and what made the model
    from gptkit.loading import load_model
    from gptkit.modelcard import run_facts, write_model_card
    model, model_tok, ckpt = load_model(str(tmp / "dpo"), verbose=False)
    assert write_model_card(str(tmp / "dpo_card"), run_facts(model, model_tok, ckpt, str(tmp / "dpo")), None, "mit",
                            [], []) \
        == ["loss.png", "README.md"]  # dpo.py's log plots like the others
    card = (tmp / "dpo_card" / "README.md").read_text(encoding="utf-8")
    val = [json.loads(line) for line in open(tmp / "dpo" / "log.jsonl") if "val_loss" in line][-1]
    assert f"| final val DPO loss | {val['val_loss']:.4f} (step 2) |" in card
    assert f"| val reward accuracy | {val['val_rewards/accuracies']:.4f} " in card
    assert f"| tokenizer | byte-level BPE trained with gptkit's train_tokenizer.py (`{tok.hash}`" in card
    assert "512 ids, control tokens `<|endoftext|>` 0, `<|system|>` 1, `<|user|>` 2, `<|assistant|>` 3, `<|end|>` 4" in card
    assert "Special tokens `<|endoftext|>` (id 0), `<|system|>` (id 1)" in card and "`<|end|>` (id 4)" in card
    assert "| kind | chat model (finetuned with finetune.py, then preference-tuned with dpo.py) |" in card
    assert f"| preference-tuned from | `{tmp / 'chat'}` |" in card
