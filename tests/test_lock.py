"""One writer per folder (gptkit/lock.py), with real processes on one folder for every script that
writes one; a killed holder's lock taken over; a disk that fills during a real checkpoint save;
the exit status of a run SIGTERM stopped."""

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, shakespeare_shards, shared_data
from gptkit.checkpoint import save_checkpoint
from gptkit.configurator import load_config
from gptkit.loading import load_model
from gptkit.lock import LOCK_NAME, FolderBusyError, hold_folder, release_folder
from gptkit.system import run_main
from model import GPT, GPTConfig
import prepare_instruct

TINY = ["--device=cpu", "--n_layer=2", "--n_head=4", "--n_embd=64", "--block_size=64", "--micro_batch_size=4",
        "--total_batch_tokens=256", "--eval_tokens=512", "--log_interval=1", "--sample_tokens=0",
        "--warmup_steps=2", "--compile=False"]
HOLDER = ("import sys, time; from gptkit.lock import hold_folder; hold_folder(sys.argv[1]); "
          "print('held', flush=True); time.sleep(120)")


def env():
    e = dict(os.environ)
    e["OMP_NUM_THREADS"] = "1"  # several processes on 2 shared cores
    return e


def script(name, *args, timeout=120):
    return subprocess.run([sys.executable, os.path.join(ROOT, name), *args], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def holder(folder):
    """Another process that holds folder until the block ends (then it is killed, as a crash would)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def error_lines(stderr):
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("error:")]


def assert_refused(result, holder_pid, folder):
    """The second process stopped at once with one `error:` line naming the first, and no traceback."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and f"process {holder_pid} on" in lines[0] and "is in use by" in lines[0], result.stderr
    assert os.path.abspath(folder) in lines[0]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Train/val shards of tiny Shakespeare, written directly (no prepare run)."""
    return shakespeare_shards(tmp_path_factory.mktemp("shards"), 60_000)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A run folder with a tiny chat checkpoint, saved directly."""
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64), verbose=False)
    out = tmp_path_factory.mktemp("run")
    save_checkpoint(str(out), {"model": model.state_dict(), "model_config": model.config.to_dict(), "kind": "chat",
                               "step": 0, "config": {"system": ""}})
    return str(out)


def test_lock_refuses_a_second_holder_and_takes_over_a_killed_ones(tmp_path, capsys):
    folder = tmp_path / "run"
    with holder(folder) as proc:
        with pytest.raises(FolderBusyError, match=rf"is in use by process {proc.pid} on .*: python[\d.]* -c"):
            hold_folder(folder)
        os.kill(proc.pid, signal.SIGKILL)  # killed: the OS lock goes, the file with its name stays
        proc.wait()
        assert json.loads((folder / LOCK_NAME).read_text())["pid"] == proc.pid
        hold_folder(folder)
    assert f"taking over {folder / LOCK_NAME} from process {proc.pid}" in capsys.readouterr().out
    assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
    hold_folder(folder)  # again in the same process: nothing happens
    release_folder(folder)
    assert os.listdir(folder) == []  # released: the file is gone, so no stale name is left


def test_a_run_refused_at_start_leaves_no_folder(tmp_path, shards):
    """A folder the lock made stays only if something was written into it: a run stopped by a bad
    setting after taking out_dir leaves nothing behind; a folder that existed before, or holds files, stays."""
    made, kept, written = tmp_path / "made", tmp_path / "kept", tmp_path / "written"
    kept.mkdir()
    for folder in (made, kept, written):
        hold_folder(folder)
    (written / "log.jsonl").write_text("{}\n")
    for folder in (made, kept, written):
        release_folder(folder)
    assert not made.exists() and os.listdir(kept) == [] and os.listdir(written) == ["log.jsonl"]
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *TINY, f"--data_dir={shards}",
                           f"--out_dir={out}", f"--init_from={tmp_path / 'nope'}"],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "init_from=" in proc.stderr, proc.stderr
    assert not out.exists()


@pytest.mark.slow
def test_two_trains_on_one_out_dir_then_sigterm_exits_143(tmp_path, shards):
    out = str(tmp_path / "run")
    args = TINY + [f"--data_dir={shards}", f"--out_dir={out}", "--eval_interval=1000", "--ckpt_interval=1",
                   "--max_steps=10000"]
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT,
                             env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while not os.path.exists(os.path.join(out, "ckpt.pt")) and time.time() < deadline:
            assert first.poll() is None, first.communicate()
            time.sleep(0.1)
        # a resume of the run while it still runs: refused before it reads or writes anything there
        assert_refused(script("train.py", *args, "--init_from=resume"), first.pid, out)
        first.send_signal(signal.SIGTERM)
        stdout, stderr = first.communicate(timeout=60)
    finally:
        first.kill()
    assert first.returncode == 143, stdout[-2000:] + stderr[-2000:]  # stopped early: a scheduler requeues it
    assert "SIGTERM received" in stdout and "done:" not in stdout
    saved_step = load_model(out)[2]["step"]
    records = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]  # every line one record
    assert sorted(r["step"] for r in records if "loss" in r) == list(range(1, saved_step + 1))
    assert sorted(os.listdir(out)) == ["ckpt.json", "ckpt.pt", "config.json", "log.jsonl"]  # lock released


@pytest.mark.slow
def test_finetune_export_and_prepares_refuse_a_held_folder(tmp_path, tiny_ckpt):
    with open(shared_data("instruct", "instruction-data.json"), encoding="utf-8") as f:
        records = json.load(f)[:40]
    source = tmp_path / "chats.json"
    source.write_text(json.dumps(records))
    sft = tmp_path / "sft"
    prepare_instruct.prepare(load_config(prepare_instruct.InstructConfig, [
        f"--sources={source}", f"--data_dir={sft}", "--block_size=64", "--val_fraction=0.2"]))
    assert LOCK_NAME not in os.listdir(sft)  # released when the preparation finished

    out = tmp_path / "chat"
    with holder(out) as proc:
        result = script("finetune.py", *TINY, f"--data_dir={sft}", f"--init_from={tiny_ckpt}", f"--out_dir={out}",
                        "--max_steps=2")
        assert_refused(result, proc.pid, out)
    assert os.listdir(out) == [LOCK_NAME]  # the killed holder's file, and nothing of the refused run

    with holder(sft) as proc:
        before = {name: (sft / name).read_bytes() for name in os.listdir(sft) if name != LOCK_NAME}
        assert_refused(script("prepare_instruct.py", f"--sources={source}", f"--data_dir={sft}", "--block_size=64",
                              "--val_fraction=0.5"), proc.pid, sft)
        assert {name: (sft / name).read_bytes() for name in os.listdir(sft) if name != LOCK_NAME} == before

    data = tmp_path / "shards"
    text = tmp_path / "book.txt"
    text.write_text(open(shared_data("pretrain", "tinyshakespeare", "input.txt"), encoding="utf-8").read()[:20_000])
    with holder(data) as proc:
        assert_refused(script("prepare_fineweb.py", f"--source={text}", f"--data_dir={data}", "--num_proc=1"),
                       proc.pid, data)
    assert os.listdir(data) == [LOCK_NAME]

    hf = tmp_path / "hf"
    with holder(hf) as proc:
        assert_refused(script("export_hf.py", f"--ckpt={tiny_ckpt}", f"--out={hf}"), proc.pid, hf)
    assert os.listdir(hf) == [LOCK_NAME]


FULL_DISK = """
import errno, os, runpy, sys
import gptkit.files

real_open, saves = open, []

class FillingFile:
    '''A file on a disk with room for `room` more bytes: the write that passes it fails as a full disk does.'''
    def __init__(self, f, room):
        self.f, self.room = f, room
    def write(self, data):
        if len(data) > self.room:
            self.f.write(bytes(data[:self.room]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)
    def __getattr__(self, name):
        return getattr(self.f, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.f.close()

def filling_open(path, mode="r", *args, **kwargs):
    f = real_open(path, mode, *args, **kwargs)
    if ".pt.tmp" in os.path.basename(str(path)):
        saves.append(path)
        if len(saves) == 2:  # the second checkpoint save runs out of room part way
            return FillingFile(f, 20_000)
    return f

gptkit.files.open = filling_open  # what atomic_write opens its temporary file with
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_full_disk_during_a_real_checkpoint_save_is_one_error_line(tmp_path, shards):
    out = str(tmp_path / "run")
    result = subprocess.run([sys.executable, "-c", FULL_DISK, os.path.join(ROOT, "train.py"), *TINY,
                             f"--data_dir={shards}", f"--out_dir={out}", "--max_steps=4", "--ckpt_interval=2",
                             "--eval_interval=1000"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "unexpected pos" not in result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: the disk is full (writing {os.path.join(out, 'ckpt.pt')}); the last "
                               "checkpoint is intact") and "--init_from=resume" in lines[0]
    assert load_model(out)[2]["step"] == 2  # the previous checkpoint, whole
    assert sorted(os.listdir(out)) == ["ckpt.json", "ckpt.pt", "config.json", "log.jsonl"]  # no partial file


def test_full_disk_at_a_runs_first_save_does_not_offer_a_resume(tmp_path, capsys):
    def first_save():
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "ckpt.pt"))
    with pytest.raises(SystemExit) as stopped:
        run_main(first_save)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1, err
    assert "no checkpoint had been saved yet" in err and "--init_from=resume" not in err, err


@pytest.mark.slow
def test_resume_of_a_run_that_has_not_saved_yet_names_the_running_process(tmp_path, shards):
    out = tmp_path / "run"
    with holder(out) as proc:
        result = script("train.py", *TINY, f"--data_dir={shards}", f"--out_dir={out}", "--init_from=resume")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"holds no ckpt.pt yet: it is in use by process {proc.pid} on" in result.stderr, result.stderr
    result = script("train.py", *TINY, f"--data_dir={shards}", f"--out_dir={out}", "--init_from=resume")
    assert "holds no ckpt.pt: check out_dir" in result.stderr, result.stderr  # the holder is gone: plain advice
