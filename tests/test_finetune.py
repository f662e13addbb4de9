"""finetune.py: token-weighted loss over accumulated micro-batches, and a CPU run end to end
(pretrain a tiny model -> prepare instruction data -> finetune -> a chat checkpoint sample.py opens)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, shared_data
from gptkit.train_config import FinetuneConfig
from gptkit.configurator import ConfigError, load_config
from gptkit.data import shard_path, write_shard
from gptkit.hf import load_hf_gpt2
from gptkit.optim import train_step
from gptkit.sft import SFTLoader, read_sft_split
from gptkit.system import Runtime
from gptkit.tokenizer import END, SPECIAL_TOKENS, USER, load_tokenizer
from model import GPT, GPTConfig
from prepare_instruct import InstructConfig, prepare


def run(script, *args, timeout=240):
    result = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=dict(os.environ),
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


class GradCatcher(torch.optim.Optimizer):
    """An 'optimizer' that only records the gradients the step hands it."""

    def __init__(self, params):
        super().__init__(params, {})

    def step(self, closure=None):
        self.grads = [p.grad.detach().clone() for group in self.param_groups for p in group["params"]]


def step_gradients(model, micro_batches):
    cfg = load_config(FinetuneConfig, ["--grad_clip=0"])  # clipping would hide a difference in scale
    rt = Runtime(device="cpu", device_type="cpu", dtype="float32")
    catcher = GradCatcher(model.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss, _, stepped = train_step(model, [catcher], micro_batches, cfg, rt, scaler)
    assert stepped
    return loss.item(), catcher.grads


@pytest.mark.slow
def test_accumulation_gives_the_same_gradients_as_one_batch(tmp_path):
    path = tmp_path / "chats.jsonl"  # answers of very different lengths
    path.write_text("".join(json.dumps({"instruction": f"Count to {n}.", "output": " ".join(map(str, range(n)))}) + "\n"
                            for n in (1, 5, 30, 2, 12, 40, 3)))
    prepare(load_config(InstructConfig, [f"--sources={path}", f"--data_dir={tmp_path}", "--block_size=64",
                                         "--val_fraction=0"]))
    x, y = SFTLoader(str(tmp_path), "train", batch_size=4, block_size=64, seed=0).next_batch()
    counts = (y != -1).sum(dim=1)
    assert len(set(counts.tolist())) > 1  # rows with different numbers of answer tokens: the case that matters
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64), verbose=False)
    loss_1, grads_1 = step_gradients(model, [(x, y)])
    loss_4, grads_4 = step_gradients(model, [(x[i:i + 1], y[i:i + 1]) for i in range(4)])
    assert abs(loss_1 - loss_4) < 1e-6
    for g1, g4 in zip(grads_1, grads_4):
        torch.testing.assert_close(g4, g1, atol=1e-6, rtol=0)
    # averaging per micro-batch means instead would weight short answers up: measurably different
    model.zero_grad()
    sum(model(x[i:i + 1], y[i:i + 1])[1] for i in range(4)).div(4).backward()
    naive = [p.grad for p in model.parameters()]
    assert max((a - b).abs().max().item() for a, b in zip(naive, grads_1)) > 1e-4


def test_finetune_config_checks():
    with pytest.raises(ConfigError, match="init_from=scratch with lora_rank: adapters train on a pretrained model"):
        load_config(FinetuneConfig, ["--init_from=scratch", "--lora_rank=8"])
    assert load_config(FinetuneConfig, ["--init_from=scratch"]).init_from == "scratch"  # a toy task's chat model
    for recipe in ("config/dolly.py", "config/alpaca.py"):
        cfg = load_config(FinetuneConfig, [os.path.join(ROOT, recipe)])
        assert cfg.init_from == "out/fineweb_124m" and cfg.dropout > 0
        assert load_config(InstructConfig, [os.path.join(ROOT, recipe)]).data_dir == cfg.data_dir


@pytest.mark.slow
def test_data_without_val_split_is_refused_before_the_model_loads(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"instruction": "Say hi.", "output": "Hi."}) + "\n")
    prepare(load_config(InstructConfig, [f"--sources={path}", f"--data_dir={tmp_path / 'sft'}", "--block_size=64",
                                         "--val_fraction=0"]))
    result = subprocess.run([sys.executable, "finetune.py", f"--data_dir={tmp_path / 'sft'}",
                             f"--out_dir={tmp_path / 'out'}", f"--init_from={tmp_path / 'no_model_needed'}",
                             "--device=cpu", "--block_size=64"],
                            cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "has no val conversations" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_pretrain_then_finetune_end_to_end(tmp_path):
    text = open(shared_data("pretrain", "tinyshakespeare", "input.txt"), encoding="utf-8").read()[:120_000]
    tokens = [50256] + load_tokenizer("gpt2").encode(text)
    split = len(tokens) * 9 // 10
    write_shard(shard_path(str(tmp_path / "shards"), "train", 0), tokens[:split])
    write_shard(shard_path(str(tmp_path / "shards"), "val", 0), tokens[split:])
    # a tiny model and short rows: the 50k-way output layer is most of the cost on a CPU
    tiny = ["--device=cpu", "--block_size=64", "--micro_batch_size=4", "--total_batch_tokens=256",
            "--warmup_steps=2", "--log_interval=4", "--sample_tokens=0"]
    run("train.py", f"--data_dir={tmp_path / 'shards'}", f"--out_dir={tmp_path / 'base'}", "--init_from=scratch",
        "--n_layer=2", "--n_head=4", "--n_embd=64", "--max_steps=8", "--learning_rate=3e-3", "--min_lr=3e-4",
        "--eval_interval=8", "--eval_tokens=1024", *tiny)

    run("prepare_instruct.py", f"--sources={shared_data('instruct', 'instruction-data.json')}",
        f"--data_dir={tmp_path / 'sft'}", "--block_size=64", "--val_fraction=0.05", "--system=Be brief.")
    out = tmp_path / "chat"
    result = run("finetune.py", f"--data_dir={tmp_path / 'sft'}", f"--out_dir={out}", f"--init_from={tmp_path / 'base'}",
                 "--max_steps=20", "--learning_rate=3e-3", "--min_lr=3e-4", "--dropout=0.1", "--eval_interval=10",
                 "--eval_tokens=2048", "--answer_tokens=6", *tiny)
    stdout = result.stdout
    assert "answers before finetuning" in stdout and "answers after finetuning" in stdout
    # the questions asked before and after are held-out val questions: an answer to a train
    # question would show what the model memorised, not what it learned
    questions = {split: first_questions(tmp_path / "sft", split) for split in ("train", "val")}
    for question in questions["val"][:4]:
        assert stdout.count(f"Q: {question}\n") == 2, question
    asked = [line for line in stdout.splitlines() if line.startswith("Q: ")]
    assert len(asked) == 8 and not any(f"Q: {q}\n" in stdout for q in set(questions["train"]) - set(questions["val"]))
    val_losses = [r["val_loss"] for r in map(json.loads, open(out / "log.jsonl")) if "val_loss" in r]
    assert len(val_losses) == 3 and val_losses[-1] < val_losses[0] - 0.5, val_losses

    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ckpt["kind"] == "chat" and ckpt["step"] == 20
    assert ckpt["model_config"]["dropout"] == 0.1  # raised for finetuning; the pretrained model had 0
    assert ckpt["config"]["system"] == "Be brief."  # the data's: sample.py starts chats with it
    shape = {key: ckpt["config"][key] for key in ("n_layer", "n_head", "n_embd")}
    assert shape == {"n_layer": 2, "n_head": 4, "n_embd": 64}  # the model's, not the config's defaults (12, 12, 768)
    assert "n_layer = 2" in stdout and "n_layer = 12" not in stdout  # and so is the config printed at the start
    assert json.loads((out / "ckpt.json").read_text())["kind"] == "chat"
    result = run("sample.py", f"--ckpt={out}", "--prompt=Name a fruit.", "--max_new_tokens=4", "--device=cpu")
    assert "chat" in result.stderr


def first_questions(data_dir, split):
    """The text of each conversation's first user turn, in file order."""
    ids, _, offsets = read_sft_split(str(data_dir), split)
    questions = []
    for a, b in zip(offsets[:-1], offsets[1:]):
        conv = ids[a:b].tolist()
        start = conv.index(USER) + 1
        questions.append(load_tokenizer("gpt2").decode(conv[start:conv.index(END, start)]))
    return questions


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A one-step base model, instruction data, and an uninterrupted 3-step finetune of it
    -> (folder, the finetune flags, the finetune's log records)."""
    tmp_path = tmp_path_factory.mktemp("finetune")
    text = open(shared_data("pretrain", "tinyshakespeare", "input.txt"), encoding="utf-8").read()[:20_000]
    tokens = [50256] + load_tokenizer("gpt2").encode(text)
    write_shard(shard_path(str(tmp_path / "shards"), "train", 0), tokens)
    write_shard(shard_path(str(tmp_path / "shards"), "val", 0), tokens[-2000:])
    tiny = ["--device=cpu", "--block_size=64", "--micro_batch_size=4", "--sample_tokens=0", "--log_interval=1"]
    run("train.py", f"--data_dir={tmp_path / 'shards'}", f"--out_dir={tmp_path / 'base'}", "--n_layer=2",
        "--n_head=4", "--n_embd=64", "--max_steps=1", "--total_batch_tokens=256", "--warmup_steps=0",
        "--eval_interval=1", "--eval_tokens=256", *tiny)
    run("prepare_instruct.py", f"--sources={shared_data('instruct', 'instruction-data.json')}",
        f"--data_dir={tmp_path / 'sft'}", "--block_size=64", "--val_fraction=0.05")
    common = [f"--data_dir={tmp_path / 'sft'}", f"--init_from={tmp_path / 'base'}", "--max_steps=3",
              "--total_batch_tokens=512", "--data_mode=sequential", "--dropout=0", "--warmup_steps=1",
              "--eval_interval=3", "--eval_tokens=1024", "--answer_tokens=0", "--learning_rate=1e-3", *tiny]
    return tmp_path, common, run_finetune([sys.executable], common, tmp_path / "single")[0]


def run_finetune(launcher, args, out):
    proc = subprocess.run(launcher + ["finetune.py", *args, f"--out_dir={out}"], cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{out}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return [json.loads(line) for line in open(out / "log.jsonl")], proc


def by_step(records, key):
    return {r["step"]: r[key] for r in records if key in r}


@pytest.mark.slow
def test_torchrun_two_processes_match_one_with_double_accumulation(finetuned):
    tmp_path, common, single = finetuned
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    ddp, proc = run_finetune(torchrun, common, tmp_path / "ddp")
    assert "1 accumulation steps x 2 process(es)" in proc.stdout
    for key in ("loss", "grad_norm"):  # the same rows, token-weighted over both ranks: the same step
        one, two = by_step(single, key), by_step(ddp, key)
        assert sorted(one) == sorted(two) == [1, 2, 3], key
        for step in one:
            assert abs(one[step] - two[step]) < 1e-5, (key, step, one[step], two[step])


@pytest.mark.slow
def test_stopped_finetune_resumes_exactly(finetuned):
    """finetune.py --init_from=resume: the interrupted run ends with the same figures, bitwise."""
    tmp_path, common, single = finetuned
    out = tmp_path / "resumed"
    first, proc = run_finetune([sys.executable], common + ["--stop_step=1"], out)
    assert "stopped at step 1" in proc.stdout and max(by_step(first, "loss")) == 1
    resumed, proc = run_finetune([sys.executable], common + ["--init_from=resume", "--answer_tokens=2"], out)
    # the same settings (answers shown or not change nothing): no note (finetune's own defaults are not
    # the checkpoint's shape, and were named as ignored on every resume), and no "before" answers from a
    # model already part-finetuned
    assert "note: resuming" not in proc.stdout and "answers before finetuning" not in proc.stdout, proc.stdout
    assert "answers after finetuning" in proc.stdout
    for key in ("loss", "grad_norm", "lr", "val_loss"):
        assert by_step(resumed, key) == by_step(single, key), key
    assert sorted(by_step(resumed, "loss")) == [1, 2, 3]
    assert json.loads((out / "ckpt.json").read_text())["kind"] == "chat"


@pytest.mark.slow
def test_finetune_from_a_hugging_face_folder_trains_the_chat_tokens(tmp_path):
    """GPT-2 has no rows for the chat tokens: they start at the mean embedding and must learn."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=50257)
    transformers.GPT2LMHeadModel(hf_config).save_pretrained(str(tmp_path / "hf"))
    run("prepare_instruct.py", f"--sources={shared_data('instruct', 'instruction-data.json')}",
        f"--data_dir={tmp_path / 'sft'}", "--block_size=64", "--val_fraction=0.05", "--system=Be brief.")
    out = tmp_path / "chat"
    run("finetune.py", f"--data_dir={tmp_path / 'sft'}", f"--out_dir={out}", f"--init_from={tmp_path / 'hf'}",
        "--device=cpu", "--block_size=64", "--micro_batch_size=4", "--total_batch_tokens=256", "--max_steps=2",
        "--warmup_steps=1", "--learning_rate=1e-3", "--eval_interval=2", "--eval_tokens=256", "--answer_tokens=0",
        "--sample_tokens=0")
    before = load_hf_gpt2(str(tmp_path / "hf"), verbose=False).transformer.wte.weight.detach()
    after = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)["model"]["transformer.wte.weight"]
    mean = before[:50257].mean(0)
    for token in SPECIAL_TOKENS.values():
        torch.testing.assert_close(before[token], mean)
        assert (after[token] - before[token]).abs().max() > 1e-4, token
