"""eval.py and gptkit/harness.py: lm-evaluation-harness on a gptkit model, checked against the
harness's own `hf` model on the same model's Hugging Face export, on small local task files in the
datasets' real schemas (ARC-Easy: multiple choice; GSM8K: generation), plain and in chat format."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import eval as eval_script
from gptkit.checkpoint import save_checkpoint
from gptkit.configurator import ConfigError, load_config
from gptkit.engine import Engine
from gptkit.generate import generate
from gptkit.harness import GptkitLM, TaskDataError, evaluate_tasks, run_harness, task_manager, with_local_data
from gptkit.hf import export_hf
from gptkit.system import Runtime
from gptkit.tokenizer import load_tokenizer
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT2 = load_tokenizer("gpt2")
CPU = Runtime(device="cpu", device_type="cpu", dtype="float32")
SYSTEM = "Answer briefly."
ARC = [("Which of these is a planet?", ["Mars", "the Moon", "the Sun"], "A"),
       ("What do plants need to grow?", ["sand", "light", "plastic", "noise"], "B"),
       ("Water freezes at", ["0 degrees C", "50 degrees C", "100 degrees C", "200 degrees C"], "A"),
       ("Which animal lives in water?", ["a fish", "a camel", "a horse", "a bird"], "1")]
GSM8K = [("Tom has 3 apples and gets 2 more. How many apples does he have?", "3 + 2 = <<3+2=5>>5\n#### 5"),
         ("A box holds 4 pens. How many pens are in 2 boxes?", "4 * 2 = <<4*2=8>>8\n#### 8"),
         ("Sam reads 10 pages a day. How many pages in 3 days?", "10 * 3 = <<10*3=30>>30\n#### 30")]


def _write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """ARC-Easy and GSM8K items in the hub datasets' schemas, in harness.py's local layout."""
    root = tmp_path_factory.mktemp("evals")
    labels = "ABCD"
    arc = [{"id": f"q{i}", "question": question,
            # the real set has both letter and number labels; answerKey names one of them
            "choices": {"text": choices, "label": list("1234"[:len(choices)] if key.isdigit() else labels[:len(choices)])},
            "answerKey": key} for i, (question, choices, key) in enumerate(ARC)]
    _write_jsonl(root / "allenai/ai2_arc/ARC-Easy/test.jsonl", arc)
    _write_jsonl(root / "allenai/ai2_arc/ARC-Easy/train.jsonl", arc[::-1])
    gsm = [{"question": q, "answer": a} for q, a in GSM8K]
    _write_jsonl(root / "openai/gsm8k/main/test.jsonl", gsm)
    _write_jsonl(root / "openai/gsm8k/main/train.jsonl", gsm[::-1])
    return str(root)


def _model(seed=0):
    torch.manual_seed(seed)
    # T=128: room for a one-shot GSM8K prompt and 12 new tokens
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=128, vocab_size=50304, bias=False, dropout=0.0),
                verbose=False)
    return model.eval()


# --- unit checks, no harness run ---------------------------------------------------------------

def test_local_data_redirects_a_task_to_its_files(tmp_path):
    cfg = {"task": "arc_easy", "dataset_path": "allenai/ai2_arc", "dataset_name": "ARC-Easy",
           "training_split": "train", "validation_split": "validation", "test_split": "test"}
    assert with_local_data(cfg, str(tmp_path)) == cfg  # no local copy: the hub, unchanged
    _write_jsonl(tmp_path / "allenai/ai2_arc/ARC-Easy/test.jsonl", [{"question": "q"}])
    local = with_local_data(cfg, str(tmp_path))
    assert local["dataset_path"] == "json" and local["dataset_name"] is None
    assert local["dataset_kwargs"] == {"data_files": {"test": str(tmp_path / "allenai/ai2_arc/ARC-Easy/test.jsonl")}}
    assert (local["test_split"], local["training_split"], local["validation_split"]) == ("test", None, None)
    os.rename(tmp_path / "allenai/ai2_arc/ARC-Easy/test.jsonl", tmp_path / "allenai/ai2_arc/ARC-Easy/dev.jsonl")
    with pytest.raises(TaskDataError, match=r"dev.jsonl but none of the splits it scores \(test.jsonl or validation"):
        with_local_data(cfg, str(tmp_path))


def test_chat_prompts_become_the_models_own_ids():
    lm = GptkitLM(_model(), GPT2, CPU, chat=True, system_prompt=SYSTEM)
    messages = [{"role": "user", "content": "Hi <|user|> there"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Name a river."}]
    text = lm.apply_chat_template(messages)
    with_system = [{"role": "system", "content": SYSTEM}] + messages
    # the control-token text of the template becomes control tokens, the same as render_prompt's ids
    # (a user who typed "<|user|>" gets the token too, as with the export's tokenizer)
    typed = GPT2.render_prompt(with_system)
    assert lm.tok_encode(text) == lm.tok_encode(GPT2.decode(typed))
    assert lm.tok_encode(text)[-1] == GPT2.assistant and lm.tok_encode(text).count(GPT2.user) == 3
    # continuing an assistant message: no closing <|end|>
    prefill = lm.apply_chat_template(messages[:2], add_generation_prompt=False)
    assert prefill.endswith("<|assistant|>Hello")
    # plain-text mode never makes a control token
    assert GPT2.user not in GptkitLM(_model(), GPT2, CPU).tok_encode("<|user|>")


def test_loglikelihood_is_the_models_own(data_dir):
    """Batched, right-padded scoring gives what one unpadded forward of each row gives."""
    model = _model()
    lm = GptkitLM(model, GPT2, CPU, batch_size=3)
    requests = [(("", ""), GPT2.encode("The cat sat on"), GPT2.encode(" the mat")),
                (("", ""), GPT2.encode("A"), GPT2.encode(" b")),
                (("", ""), GPT2.encode("One two three four five six"), GPT2.encode(" seven eight nine")),
                (("", ""), GPT2.encode("x " * 200), GPT2.encode(" y"))]  # longer than the context: cut on the left
    got = lm._loglikelihood_tokens(requests)
    for (_, context, continuation), (score, _) in zip(requests, got):
        ids = (context + continuation)[-129:]
        with torch.no_grad():
            logits, _ = model(torch.tensor([ids[:-1]]))
        logprobs = torch.log_softmax(logits[0, -len(continuation):], dim=-1)
        expected = float(logprobs.gather(1, torch.tensor(continuation)[:, None]).sum())
        assert score == pytest.approx(expected, abs=1e-4)


def test_generations_share_one_continuous_batch(monkeypatch):
    """generate_until answers every request through one engine of batch_size rows, and each greedy
    answer is the one the model gives that prompt alone (control tokens left out of the text)."""
    model = _model()
    lm = GptkitLM(model, GPT2, CPU, batch_size=4)
    widths, step = [], Engine._step
    monkeypatch.setattr(Engine, "_step", lambda engine: (widths.append(len(engine.running)), step(engine)))
    requests = [SimpleNamespace(args=(f"Question {i}:" + " word" * (3 * i), {"until": ["\x00"], "max_gen_toks": 6}))
                for i in range(6)]
    texts = lm.generate_until(requests)
    assert max(widths) == 4  # four rows decoded together, the batch's limit
    for request, text in zip(requests, texts):
        alone = generate(model, lm.tok_encode(request.args[0]), 6, temperature=0, stop_tokens=(GPT2.eot,),
                         n_vocab=GPT2.n_vocab)
        assert text == lm.tok_decode(list(alone))
    assert len(set(texts)) > 1


def test_config_checks():
    with pytest.raises(ConfigError, match="ckpt='nowhere' does not exist"):
        load_config(eval_script.EvalHarnessConfig, ["--ckpt=nowhere"])
    with pytest.raises(ConfigError, match="chat='yes'"):
        load_config(eval_script.EvalHarnessConfig, ["--ckpt=gpt2", "--chat=yes"])
    with pytest.raises(ConfigError, match="data_dir='nowhere' is not a folder"):
        load_config(eval_script.EvalHarnessConfig, ["--ckpt=gpt2", "--data_dir=nowhere"])


# --- the harness, against its own hf model --------------------------------------------------------

def _items(output, task):
    """Per item: (doc id, the requests' arguments, the model's answers, the item's scores)."""
    rows = []
    for sample in output["samples"][task]:
        answers = [[(round(a[0], 3), a[1]) if isinstance(a, tuple) else a for a in resp] for resp in sample["resps"]]
        scores = {k: sample[k] for k in ("acc", "acc_norm", "exact_match") if k in sample}
        rows.append((sample["doc_id"], sample["filter"], str(sample["arguments"]), answers, scores))
    return sorted(rows, key=lambda row: (row[0], row[1]))


@pytest.mark.slow
@pytest.mark.parametrize("chat", [False, True])
def test_same_items_as_the_harness_hf_model(tmp_path, data_dir, chat):
    """eval's LM and the harness's `hf` model on the export give the same per-item results: the
    same prompts, log-likelihoods (to 1e-3), greedy flags, generated text and scores."""
    from lm_eval import simple_evaluate  # the oracle: the harness's own model class on the export
    model = _model(seed=1 if chat else 0)
    system = SYSTEM if chat else ""
    tasks = ["arc_easy", "gsm8k"]
    kwargs = dict(num_fewshot=1, log_samples=True, bootstrap_iters=0, apply_chat_template=chat,
                  fewshot_as_multiturn=chat, gen_kwargs={"max_gen_toks": 12})
    ours = run_harness(model, GPT2, tasks, CPU, data_dir=data_dir, chat=chat, system_prompt=system, batch_size=4,
                       num_fewshot=1, max_gen_toks=12, log_samples=True)
    export_hf(model, str(tmp_path / "hf"), GPT2, chat=chat, system=system)
    theirs = simple_evaluate(model="hf", model_args=f"pretrained={tmp_path / 'hf'},dtype=float32", tasks=tasks,
                             task_manager=task_manager(data_dir), batch_size=1, device="cpu", **kwargs)
    for task in tasks:
        assert _items(ours, task) == _items(theirs, task)
        assert ours["results"][task] == theirs["results"][task]
    assert len(ours["samples"]["arc_easy"]) == len(ARC)
    if chat:
        assert "<|system|>" + SYSTEM in ours["samples"]["gsm8k"][0]["arguments"][0][0]


@pytest.mark.slow
def test_eval_script_writes_results_beside_the_run(tmp_path, data_dir):
    model = _model()
    run = tmp_path / "run"
    save_checkpoint(str(run), {"model": model.state_dict(), "model_config": model.config.to_dict(), "config": {},
                               "kind": "base", "step": 7})
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1")
    command = [sys.executable, os.path.join(ROOT, "eval.py"), f"--ckpt={run}", "--tasks=arc_easy,gsm8k",
               f"--data_dir={data_dir}", "--device=cpu", "--max_gen_toks=8", "--num_fewshot=0", "--limit=3"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "arc_easy" in result.stdout and "exact_match" in result.stdout and "centered_acc" in result.stdout
    saved = json.load(open(run / "eval_results.json"))["tasks"]
    in_process = evaluate_tasks(model, GPT2, ["arc_easy", "gsm8k"], CPU, limit=3, data_dir=data_dir, num_fewshot=0,
                                max_gen_toks=8)
    for task in ("arc_easy", "gsm8k"):
        for metric, value in in_process[task].items():
            assert saved[task][metric] == pytest.approx(value), (task, metric)
        assert saved[task]["step"] == 7 and saved[task]["items"] == 3
    assert saved["centered_mean"]["averages"] == ["arc_easy"]
    # offline with no local copy: one error line that says where the files go
    missing = subprocess.run(command[:3] + ["--tasks=piqa", "--device=cpu"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
    assert missing.returncode == 2
    assert "error: could not read the data of piqa" in missing.stderr and "--data_dir=DATA_DIR" in missing.stderr
