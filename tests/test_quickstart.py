"""quickstart.py's settings and the commands it runs. The whole quick start runs end to end in .ci/run: the
README's own command, offline, on the samples it ships (the same code path as local files)."""
import os
import shlex
import subprocess
import sys

import pytest

import quickstart
from conftest import ROOT
from gptkit.configurator import ConfigError, load_config


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

    def record(cmd, *args, **kwargs):  # the steps themselves run end to end in .ci/run
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
