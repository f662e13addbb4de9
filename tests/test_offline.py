"""Without the hub or tiktoken's download site: the quick start uses the samples shipped in samples/
(each file as samples/README.md lists it), the tokenizer GPT-2's shipped BPE files (the same ids as
tiktoken's), and a hub model name fails in one line that says what to do. The quick start itself
runs offline, end to end, in CI (.ci/run)."""

import hashlib
import os
import re
import subprocess
import sys

import huggingface_hub
import pytest
import tiktoken

import quickstart
from conftest import ROOT, shared_data
from gptkit.hf import HFError
from gptkit.loading import load_model
from gptkit.tokenizer import Tokenizer, load_tokenizer

SAMPLES = os.path.join(ROOT, "samples")


def test_samples_are_the_files_their_readme_lists_each_with_its_license():
    readme = open(os.path.join(SAMPLES, "README.md"), encoding="utf-8").read()
    listed = dict((name, digest) for digest, name in re.findall(r"^([0-9a-f]{64})  (\S+)$", readme, flags=re.M))
    files = {os.path.relpath(os.path.join(d, n), SAMPLES) for d, _, names in os.walk(SAMPLES) for n in names}
    assert set(listed) == files - {"README.md", "gpt2/LICENSE", "instruct/LICENSE.txt"}
    for name, digest in listed.items():
        with open(os.path.join(SAMPLES, name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest, name
    assert sum(os.path.getsize(os.path.join(SAMPLES, name)) for name in files) < 4e6  # a few MB at most
    assert "Modified MIT License" in open(os.path.join(SAMPLES, "gpt2", "LICENSE"), encoding="utf-8").read()
    assert "Apache License" in open(os.path.join(SAMPLES, "instruct", "LICENSE.txt"), encoding="utf-8").read()
    for path in quickstart.SAMPLES.values():  # what the quick start falls back to
        assert os.path.exists(os.path.join(ROOT, path))


def test_tokenizer_uses_the_shipped_gpt2_files_when_tiktoken_cannot_fetch_them(monkeypatch, capsys):
    online = load_tokenizer("gpt2")  # tiktoken's own gpt2 (from its cache), loaded before the download fails

    def unreachable(name):
        raise ConnectionError("openaipublic.blob.core.windows.net: no route to host")

    monkeypatch.setattr(tiktoken, "get_encoding", unreachable)
    monkeypatch.delenv("GPTKIT_GPT2_NOTED", raising=False)
    offline = Tokenizer()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "note: tiktoken could not fetch" in err and "samples/gpt2" in err
    text = open(shared_data("pretrain", "gutenberg", "clocasto-HaikuGenerator", "pg5200.txt"), encoding="utf-8").read()[:30_000]
    text += " user text <|endoftext|> <|assistant|> stays text 🙂"
    assert offline.encode(text) == online.encode(text)
    conversation = [{"role": "user", "content": "Hi <|end|>"}, {"role": "assistant", "content": "Hello."}]
    assert offline.render_conversation(conversation) == online.render_conversation(conversation)
    Tokenizer()
    assert capsys.readouterr().err == ""  # said once per process (and not again by quickstart's steps)


def test_a_hub_model_offline_is_one_line_that_says_what_to_do(monkeypatch):
    def offline(*args, **kwargs):  # huggingface_hub's own message runs to several lines
        raise huggingface_hub.errors.LocalEntryNotFoundError(
            "Got: ConnectError: [Errno -2] Name or service not known\nAn error happened while trying to locate "
            "the files on the Hub, and we cannot find the appropriate snapshot folder.\nPlease check your "
            "internet connection and try again.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(HFError) as error:
        load_model("gpt2")
    message = str(error.value)
    assert "\n" not in message and "Name or service not known" in message
    assert "`hf download gpt2 --local-dir gpt2`" in message and "give its path" in message


def test_quickstart_without_the_hub_uses_the_samples(tmp_path, monkeypatch, capsys):
    commands = []

    def record(cmd, *args, **kwargs):  # the steps run for real in CI's offline quick start
        commands.append(cmd)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(quickstart.subprocess, "run", record)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert quickstart.hub_unreachable() == "HF_HUB_OFFLINE is set"  # no network call needed to know
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["quickstart.py"])
    quickstart.main()
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if "hub cannot be reached" in line]
    assert len(notes) == 1 and notes[0].startswith("note: the Hugging Face hub cannot be reached (HF_HUB_OFFLINE")
    pretrain, instruct = (os.path.relpath(os.path.join(ROOT, p)) for p in quickstart.SAMPLES.values())
    assert f"--source={pretrain}" in commands[0] and f"--sources={instruct}" in commands[2]

    # a dataset the user named is theirs: never swapped for a sample
    commands.clear()
    monkeypatch.setattr(sys, "argv", ["quickstart.py", "--source=HuggingFaceFW/fineweb", "--subset=sample-10BT"])
    quickstart.main()
    assert "--source=HuggingFaceFW/fineweb" in commands[0] and f"--sources={instruct}" in commands[2]
