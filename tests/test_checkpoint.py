import os
import subprocess
import sys
import time

import pytest
import torch

from gptkit.checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from gptkit.loading import load_model
from gptkit.tokenizer import load_tokenizer
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(model, step=0):
    return {"model": model.state_dict(), "model_config": model.config.to_dict(), "config": {"x": 1},
            "kind": "base", "step": step, "rng": rng_state()}


def test_save_load_roundtrip(tmp_path, tiny_config):
    model = GPT(tiny_config)
    save_checkpoint(str(tmp_path), _state(model, step=7))
    assert (tmp_path / "ckpt.json").exists()
    loaded, tok, ckpt = load_model(str(tmp_path))
    assert tok.hash == "gpt2"  # a checkpoint without a tokenizer record is GPT-2's
    assert ckpt["step"] == 7
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])


def test_rng_state_roundtrip():
    import random
    import numpy as np
    state = rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(1).item())
    assert a == b


def test_truncated_checkpoint_is_refused(tmp_path, tiny_config):
    save_checkpoint(str(tmp_path), _state(GPT(tiny_config)))
    path = tmp_path / "ckpt.pt"
    data = path.read_bytes()
    path.write_bytes(data[:-1])
    with pytest.raises(CheckpointError, match=r"ckpt\.pt.*truncated or corrupt"):
        load_checkpoint(str(tmp_path))


def test_missing_checkpoint_message(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(str(tmp_path / "nope"))


def test_vocab_mismatch_is_refused(tmp_path):
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50257))
    save_checkpoint(str(tmp_path), _state(model))
    with pytest.raises(CheckpointError, match="tokenizer needs 50261"):
        load_model(str(tmp_path))


def test_folder_without_checkpoint_and_unknown_model_fields(tmp_path, tiny_config):
    from gptkit.loading import ckpt_arg_problems
    (tmp_path / "run").mkdir()
    assert "is a folder without ckpt.pt" in ckpt_arg_problems(str(tmp_path / "run"))[0]
    empty = ckpt_arg_problems("", example="out/dolly")[0]
    assert "--ckpt=out/dolly" in empty and empty.count("such as") == 1, empty  # one example of each kind
    model = GPT(tiny_config)
    state = _state(model)
    state["model_config"] = {**state["model_config"], "rope": True}  # a newer or forked gptkit's model
    save_checkpoint(str(tmp_path / "run"), state)
    assert ckpt_arg_problems(str(tmp_path / "run")) == []
    with pytest.raises(CheckpointError, match=r"fields this gptkit's model does not know \(rope\)"):
        load_model(str(tmp_path / "run"))


@pytest.mark.slow
def test_scripts_report_a_bad_checkpoint_in_one_line(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    for script, args in (("sample.py", ["--prompt=hi"]), ("eval_hellaswag.py", []),
                         ("export_hf.py", [f"--out={tmp_path / 'hf'}"])):
        proc = subprocess.run([sys.executable, script, f"--ckpt={tmp_path}", "--device=cpu", *args],
                              cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (script, proc.stderr)
        assert "error: cannot read checkpoint" in proc.stderr, (script, proc.stderr)


def test_checkpoint_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    torch.save({"model": {}, "model_config": {}, "evil": Evil()}, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match="weights_only=True") as error:
        load_checkpoint(str(tmp_path))
    assert "weights_only=False" not in str(error.value)  # torch's own advice, unsafe here, is not passed on


@pytest.mark.parametrize("saved_kind, run_kind, advice", [
    ("base", "chat", r"finetune\.py cannot resume; to finetune its model, use --init_from=.*run with a new --out_dir"),
    ("chat", "base", r"train\.py cannot resume; resume it with finetune\.py")])
def test_resume_refuses_a_run_of_the_other_script(saved_kind, run_kind, advice):
    from types import SimpleNamespace
    from gptkit.checkpoint import restore_training_state
    from gptkit.configurator import ConfigError
    ckpt = {"kind": saved_kind, "optimizer": [], "loader": {}}
    with pytest.raises(ConfigError, match=advice):
        restore_training_state(ckpt, SimpleNamespace(out_dir="run", optimizer="adamw"), None, [], None, None, run_kind)


@pytest.mark.slow
def test_kill_during_save_keeps_previous(tmp_path):
    # A child process saves big checkpoints over and over; kill it without warning in the middle of
    # a save (most of each save is writing ckpt.pt), at several points of the save.
    out = tmp_path / "run"
    code = f"""
import sys, torch
sys.path.insert(0, {ROOT!r})
from gptkit.checkpoint import save_checkpoint
from model import GPT, GPTConfig
model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=256, block_size=64), verbose=False)
step = 0
while True:
    step += 1
    save_checkpoint({str(out)!r}, {{"model": model.state_dict(), "model_config": model.config.to_dict(), "step": step}})
    print(step, flush=True)
"""
    for fraction in (0.3, 0.7):
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        done = []
        while len(done) < 3:  # let a few saves complete, to time them
            done.append((int(proc.stdout.readline()), time.perf_counter()))
        save_seconds = (done[-1][1] - done[0][1]) / (len(done) - 1)
        time.sleep(fraction * save_seconds)  # part way through the next save
        proc.kill()
        proc.wait()
        model, _, ckpt = load_model(str(out))
        assert ckpt["step"] >= done[-1][0]


def test_full_disk_during_save_keeps_previous_and_says_what_to_do(tmp_path, tiny_config, monkeypatch, capsys):
    import errno
    from gptkit.system import run_main
    model = GPT(tiny_config, verbose=False)
    out = str(tmp_path / "run")
    save_checkpoint(out, {"model": model.state_dict(), "model_config": model.config.to_dict(), "step": 1})
    before = {name: (tmp_path / "run" / name).read_bytes() for name in os.listdir(out)}

    def save_until_full(obj, f):
        f.write(b"x" * 1000)  # part of the file is written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_until_full)

    def main():
        save_checkpoint(out, {"model": model.state_dict(), "model_config": model.config.to_dict(), "step": 2})

    with pytest.raises(SystemExit) as stop:
        run_main(main)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the disk is full") and "--init_from=resume" in err and "intact" in err
    assert {name: (tmp_path / "run" / name).read_bytes() for name in os.listdir(out)} == before  # no temp file
    # other OS errors are not a full disk: they keep their traceback
    monkeypatch.setattr(torch, "save", lambda obj, f: (_ for _ in ()).throw(PermissionError(errno.EACCES, "denied")))
    with pytest.raises(PermissionError):
        run_main(main)


def test_ctrl_c_is_one_line_that_says_what_is_kept(capsys):
    from gptkit.system import run_main

    def main():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as stop:
        run_main(main, on_interrupt="the shards written so far are kept")
    assert stop.value.code == 130
    assert capsys.readouterr().err == "\ninterrupted: the shards written so far are kept\n"


@pytest.mark.slow
def test_tied_embeddings_stay_one_tensor_through_save_resume_and_export(tmp_path, tiny_config):
    from gptkit.hf import export_hf, load_hf_gpt2
    model = GPT(tiny_config, verbose=False)
    save_checkpoint(str(tmp_path / "run"), _state(model))
    stored = load_checkpoint(str(tmp_path / "run"))["model"]
    # one copy on disk: both names point at the same storage
    assert stored["lm_head.weight"].data_ptr() == stored["transformer.wte.weight"].data_ptr()
    export_hf(model, str(tmp_path / "hf"), load_tokenizer("gpt2"))
    loaded = [load_model(str(tmp_path / "run"), verbose=False)[0],  # sample, eval, export, and resume's build_model
              load_hf_gpt2(str(tmp_path / "hf"), verbose=False)]
    for other in loaded:
        assert other.lm_head.weight is other.transformer.wte.weight
        assert sum(p.numel() for p in other.parameters()) == model.num_params()
        torch.testing.assert_close(other.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)
        # a training step moves the one tensor: input and output embeddings stay equal
        other.train()
        idx = torch.randint(0, 50257, (2, 16))
        other(idx, idx)[1].backward()
        torch.optim.SGD(other.parameters(), lr=1.0).step()
        assert other.lm_head.weight is other.transformer.wte.weight
        assert not torch.equal(other.lm_head.weight, model.lm_head.weight)
