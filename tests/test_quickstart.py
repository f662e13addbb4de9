"""The README's quick start, end to end, as CI sees it: local data instead of the hub."""
import json
import os
import shlex
import subprocess
import sys

import pytest

import quickstart
from conftest import ROOT, shared_data
from gptkit.configurator import ConfigError, load_config


def test_quickstart_pipeline_end_to_end(tmp_path):
    text = open(shared_data("pretrain", "tinyshakespeare", "input.txt"), encoding="utf-8").read()
    # FineWeb-shaped jsonl: one document per speech-sized chunk
    chunks = [c for c in text.split("\n\n") if c.strip()]
    docs = ["\n\n".join(chunks[i:i + 8]) for i in range(0, len(chunks), 8)]
    source = tmp_path / "fineweb.jsonl"
    with open(source, "w", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"text": doc, "id": f"doc-{i}"}) + "\n")
    instruct = shared_data("instruct", "instruction-data.json")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "quickstart.py", f"--source={source}", f"--instruct={instruct}",
           # a CPU step of 8,192 tokens takes ~10 s on one thread: as few steps and val tokens as show
           # every stage working (evaluations at the start and end of each run, and at step 1 of 2)
           "--max_tokens=200000", "--pretrain_steps=2", "--finetune_steps=1", "--eval_tokens=4096",
           "--prompt=Name a color.",
           f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'out'}"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for step in range(1, 6):
        assert f"=== [{step}/5] done" in result.stdout
    assert os.path.exists(tmp_path / "out" / "base" / "ckpt.pt")
    for run, steps in (("base", [0, 1, 2]), ("chat", [0, 1])):
        log = [json.loads(line) for line in open(tmp_path / "out" / run / "log.jsonl")]
        assert [r["step"] for r in log if "val_loss" in r] == steps, run
    chat = json.load(open(tmp_path / "out" / "chat" / "ckpt.json"))
    assert chat["kind"] == "chat"
    assert "chat with it: python sample.py" in result.stdout and "config/fineweb_124m.py" in result.stdout


def test_missing_local_data_is_refused_before_any_step(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(quickstart.QuickstartConfig, [f"--source={tmp_path / 'books'}/",
                                                  f"--instruct={tmp_path / 'alpaca.json'}"])
    assert "source=" in str(error.value) and "instruct=" in str(error.value) and "does not exist" in str(error.value)
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(quickstart.QuickstartConfig, [f"--instruct={tmp_path}"])
    assert load_config(quickstart.QuickstartConfig, []).instruct == "databricks/databricks-dolly-15k"  # hub names pass


def test_runs_from_any_folder(tmp_path, monkeypatch, capsys):
    commands = []

    def record(cmd, *args, **kwargs):  # the steps themselves are the end-to-end test above
        commands.append(cmd)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(quickstart.subprocess, "run", record)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (elsewhere / "texts.jsonl").write_text("")
    (elsewhere / "alpaca.json").write_text("[]")
    monkeypatch.setattr(sys, "argv", ["quickstart.py", "--source=texts.jsonl", "--instruct=alpaca.json"])
    for run in ("base", "chat"):  # an earlier quickstart's runs, which train.py would refuse to overwrite
        os.makedirs(elsewhere / "out" / "quickstart" / run)
        (elsewhere / "out" / "quickstart" / run / "ckpt.pt").write_bytes(b"old")
    quickstart.main()
    assert not os.path.exists(elsewhere / "out" / "quickstart" / "base")
    assert not os.path.exists(elsewhere / "out" / "quickstart" / "chat")
    assert len(commands) == 5
    for cmd in commands:
        files = [arg for arg in cmd[1:] if not arg.startswith("--")]  # the script and its recipe
        assert files and all(os.path.isfile(f) for f in files), cmd
    # outputs stay where the README says, relative to the folder it runs from
    assert "--data_dir=data/quickstart/pretrain" in commands[0] and "--out_dir=out/quickstart/base" in commands[1]
    assert "--source=texts.jsonl" in commands[0] and "--sources=alpaca.json" in commands[2]
    sample = os.path.relpath(os.path.join(ROOT, "sample.py"))
    assert f"python {sample} --ckpt=out/quickstart/chat" in capsys.readouterr().out  # a command that works here


def test_printed_commands_paste_back_into_a_shell(tmp_path, monkeypatch, capsys):
    commands = []

    def record(cmd, *args, **kwargs):
        commands.append(cmd)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(quickstart.subprocess, "run", record)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my texts").mkdir()
    (tmp_path / "alpaca.json").write_text("[]")
    monkeypatch.setattr(sys, "argv", ["quickstart.py", "--source=my texts/", "--instruct=alpaca.json",
                                      "--prompt=What is the capital of France?", "--out_dir=my runs"])
    quickstart.main()
    out = capsys.readouterr().out
    printed = [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("=== [") and "done" not in line]
    assert len(printed) == 5
    for line, cmd in zip(printed, commands):
        # a shell splits the printed line back into exactly the arguments that ran
        assert shlex.split(line) == ["python"] + cmd[1:], line
    chat = out.split("chat with it: ")[1].splitlines()[0]
    assert shlex.split(chat) == ["python", commands[4][1], "--ckpt=my runs/chat"]
