"""The training loop and train.py, on CPU with a 2-layer, 64-wide model and real text."""

import copy
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, shakespeare_shards, shared_data
from gptkit.tokenizer import load_tokenizer

TINY = ["--device=cpu", "--n_layer=2", "--n_head=4", "--n_embd=64", "--block_size=64", "--micro_batch_size=4",
        "--eval_tokens=1024", "--log_interval=1", "--sample_tokens=0", "--warmup_steps=2"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Train/val shards of tiny Shakespeare (the first ~55k tokens; val is the last tenth)."""
    return shakespeare_shards(tmp_path_factory.mktemp("shards"), 200_000)


def env():
    e = dict(os.environ)
    e["OMP_NUM_THREADS"] = "1"  # 2 processes on 2 shared cores: no oversubscription
    return e


def run_train(*args, launcher=None, check=True):
    cmd = (launcher or [sys.executable]) + [os.path.join(ROOT, "train.py")] + TINY + list(args)
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def losses(records, key="loss"):
    return {r["step"]: r[key] for r in records if key in r}


# ------------------------------------------------------------------------------------------------
# End to end: learning, exact resume, SIGTERM, DDP, divergence

@pytest.fixture(scope="module")
def full_run(data_dir, tmp_path_factory):
    """12 uninterrupted steps with dropout (so the RNG state matters for resume)."""
    out = str(tmp_path_factory.mktemp("full"))
    args = [f"--data_dir={data_dir}", f"--out_dir={out}", "--max_steps=12", "--total_batch_tokens=512",
            "--learning_rate=1e-2", "--min_lr=1e-3", "--eval_interval=6", "--ckpt_interval=100", "--dropout=0.1"]
    run_train(*args, "--sample_tokens=4")
    return out, args


@pytest.mark.slow
def test_val_loss_falls(full_run):
    out, _ = full_run
    val = losses(read_log(out), "val_loss")
    assert sorted(val) == [0, 6, 12]
    assert val[0] > 10.0  # about ln(50304) for an untrained model
    assert val[12] < val[0] - 2.5, val
    with open(os.path.join(out, "ckpt.json")) as f:
        summary = json.load(f)
    assert summary["step"] == 12 and summary["kind"] == "base"
    assert abs(summary["best_val_loss"] - min(val.values())) < 1e-12
    records = read_log(out)
    assert any("samples" in r for r in records)
    assert all(k in records[5] for k in ("loss", "lr", "grad_norm", "tokens_per_sec"))


@pytest.mark.slow
def test_stop_and_resume_gives_bitwise_identical_losses(full_run, tmp_path):
    full_out, args = full_run
    out = str(tmp_path / "resumed")
    args = [a for a in args if not a.startswith("--out_dir")] + [f"--out_dir={out}"]
    first = run_train(*args, "--stop_step=5")
    assert "stopped at step 5" in first.stdout
    assert max(losses(read_log(out))) == 5
    run_train(*args, "--init_from=resume")
    expected, got = read_log(full_out), read_log(out)
    assert losses(got) == losses(expected)  # every step 1..12, bitwise (floats compared exactly)
    assert sorted(losses(got)) == list(range(1, 13))
    assert losses(got, "val_loss") == losses(expected, "val_loss")
    assert losses(got, "lr") == losses(expected, "lr")


@pytest.mark.slow
def test_resume_inside_a_log_interval_logs_what_an_uninterrupted_run_logs(data_dir, tmp_path):
    # stopped at step 5 with a log line every 3 steps: the line at step 6 averages steps 4-6, two of
    # them run before the stop
    args = [f"--data_dir={data_dir}", "--max_steps=6", "--total_batch_tokens=256", "--log_interval=3",
            "--eval_interval=100", "--ckpt_interval=100"]
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    run_train(*args, f"--out_dir={full}")
    run_train(*args, f"--out_dir={resumed}", "--stop_step=5")
    assert sorted(losses(read_log(resumed))) == [3]
    run_train(*args, f"--out_dir={resumed}", "--init_from=resume")
    expected = losses(read_log(full))
    assert sorted(expected) == [3, 6]
    assert losses(read_log(resumed)) == expected  # floats compared exactly


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_signal_saves_and_resume_continues(data_dir, tmp_path, signum):
    out = str(tmp_path / "stopped")
    cmd = [sys.executable, os.path.join(ROOT, "train.py")] + TINY + [
        f"--data_dir={data_dir}", f"--out_dir={out}", "--max_steps=1000", "--total_batch_tokens=256",
        "--eval_interval=1000", "--ckpt_interval=1000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = os.path.join(out, "log.jsonl")
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if os.path.exists(log):
                with open(log, encoding="utf-8") as f:
                    if sum('"loss"' in line for line in f) >= 3:
                        break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signum, stderr  # 143 / 130: stopped early, not finished (a scheduler requeues it)
    assert f"{signal.Signals(signum).name} received" in stdout and "Traceback" not in stderr
    with open(os.path.join(out, "ckpt.json")) as f:
        stopped_at = json.load(f)["step"]
    assert 3 <= stopped_at < 1000
    assert max(losses(read_log(out))) == stopped_at
    run_train(f"--data_dir={data_dir}", f"--out_dir={out}", f"--max_steps={stopped_at + 1}",
              "--total_batch_tokens=256", "--eval_interval=1000", "--init_from=resume")
    steps = sorted(losses(read_log(out)))
    assert steps == list(range(1, stopped_at + 2))  # continued from the checkpoint, nothing run twice
    with open(os.path.join(out, "ckpt.json")) as f:
        assert json.load(f)["step"] == stopped_at + 1


@pytest.mark.slow
def test_torchrun_two_processes_match_one_with_double_accumulation(data_dir, tmp_path):
    common = [f"--data_dir={data_dir}", "--max_steps=2", "--total_batch_tokens=1024", "--data_mode=sequential",
              "--eval_interval=2", "--learning_rate=3e-3"]
    single, ddp = str(tmp_path / "single"), str(tmp_path / "ddp")
    run_train(*common, f"--out_dir={single}")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = run_train(*common, f"--out_dir={ddp}", launcher=torchrun)
    assert "2 accumulation steps x 2 process(es)" in proc.stdout
    assert proc.stdout.count("step 2/2 |") == 1  # rank 0 alone prints
    one, two = read_log(single), read_log(ddp)
    for key in ("loss", "val_loss", "grad_norm"):
        a, b = losses(one, key), losses(two, key)
        assert sorted(a) == sorted(b) and len(a) >= 2, key
        for step in a:
            assert abs(a[step] - b[step]) < 1e-5, (key, step, a[step], b[step])


@pytest.mark.slow
def test_absurd_learning_rate_stops_with_clear_message(data_dir, tmp_path):
    out = str(tmp_path / "diverge")
    proc = run_train(f"--data_dir={data_dir}", f"--out_dir={out}", "--max_steps=40", "--total_batch_tokens=256",
                     "--learning_rate=1e6", "--min_lr=1e6", "--warmup_steps=0", "--max_bad_steps=2",
                     "--ckpt_interval=1", "--eval_interval=1000", check=False)
    assert proc.returncode != 0
    assert "loss became non-finite 2 steps in a row" in proc.stderr
    assert "lower learning_rate" in proc.stderr and "Traceback" not in proc.stderr
    from gptkit.checkpoint import load_checkpoint
    ckpt = load_checkpoint(out)  # the last good checkpoint is intact and loads
    records = read_log(out)
    first_bad = min(r["step"] for r in records if r.get("skipped_step"))
    assert ckpt["step"] == first_bad - 1  # the last good step's checkpoint, not overwritten since
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


@pytest.mark.slow
def test_nonfinite_steps_read_at_the_next_log_still_stop_the_run(data_dir, tmp_path):
    # the host reads the steps' finite flags only at log and checkpoint time: the run must
    # still stop, name the step where it happened, and log every skipped step
    out = str(tmp_path / "diverge_late")
    proc = run_train(f"--data_dir={data_dir}", f"--out_dir={out}", "--max_steps=40", "--total_batch_tokens=256",
                     "--learning_rate=1e6", "--min_lr=1e6", "--warmup_steps=0", "--max_bad_steps=2",
                     "--log_interval=5", "--ckpt_interval=1000", "--eval_interval=1000", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    skipped = [r["step"] for r in read_log(out) if r.get("skipped_step")]
    assert len(skipped) == 2 and skipped[1] == skipped[0] + 1, skipped
    assert f"loss became non-finite 2 steps in a row at step {skipped[1]}" in proc.stderr
    assert skipped[1] <= 5  # read at the first log step


@pytest.mark.slow
def test_hellaswag_during_training_and_a_missing_file_fails_first(data_dir, tmp_path):
    hellaswag = shared_data("hellaswag", "hellaswag_val_derived.jsonl")
    args = [f"--data_dir={data_dir}", "--max_steps=2", "--total_batch_tokens=256", "--eval_interval=2",
            "--hellaswag_interval=2", "--hellaswag_limit=8"]
    out = str(tmp_path / "hs")
    run_train(*args, f"--out_dir={out}", f"--hellaswag_data={hellaswag}")
    scored = [r for r in read_log(out) if "hellaswag_acc_norm" in r]
    assert [r["step"] for r in scored] == [2] and scored[0]["hellaswag_count"] == 8
    assert 0.0 <= scored[0]["hellaswag_acc_norm"] <= 1.0
    # a file that cannot be read (or downloaded) stops the run before its first step, not at the
    # first evaluation hours later
    broken = tmp_path / "broken_hellaswag.jsonl"
    broken.write_text('{"ctx": "half a record"\n', encoding="utf-8")
    proc = run_train(*args, f"--out_dir={tmp_path / 'hs_broken'}", f"--hellaswag_data={broken}", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "broken_hellaswag.jsonl" in proc.stderr and "--hellaswag_interval=0" in proc.stderr
    assert "Traceback" not in proc.stderr and "step 1" not in proc.stdout


# ------------------------------------------------------------------------------------------------
# The pieces, in process

def tiny_cfg(*args):
    """A tiny TrainConfig; its out_dir is a new temporary folder unless args name one (init_model takes
    the folder's lock for the rest of the process: never the checkout's out/)."""
    import tempfile
    from gptkit.configurator import load_config
    from gptkit.train_config import TrainConfig
    out = [] if any(a.startswith("--out_dir=") for a in args) else [f"--out_dir={tempfile.mkdtemp()}/run"]
    return load_config(TrainConfig, TINY + ["--total_batch_tokens=256", "--max_steps=100", *out, *args])


def cpu_runtime():
    from gptkit.system import Runtime
    return Runtime(device="cpu", device_type="cpu", dtype="float32")


@pytest.mark.slow
def test_token_weighted_accumulation(tiny_config):
    from model import GPT
    from gptkit.optim import train_step
    torch.manual_seed(0)
    x = torch.randint(0, 50257, (4, 64))
    y = torch.randint(0, 50257, (4, 64))
    for row, masked in enumerate([0, 20, 50, 63]):  # rows with very different numbers of targets
        y[row, :masked] = -1
    empty = (x[:1], torch.full_like(y[:1], -1))  # a micro-batch without any target adds nothing
    cfg, rt = tiny_cfg("--grad_clip=0"), cpu_runtime()
    base = GPT(tiny_config, verbose=False)
    results = []
    for micro_batches in ([(x, y)], [(x[i:i + 1], y[i:i + 1]) for i in range(4)] + [empty]):
        model = GPT(tiny_config, verbose=False)
        model.load_state_dict(base.state_dict())
        before = {k: v.clone() for k, v in model.named_parameters()}
        opt = torch.optim.SGD(model.parameters(), lr=1.0)  # the update is minus the gradient
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        loss, grad_norm, finite = train_step(model, [opt], micro_batches, cfg, rt, scaler)
        assert finite and torch.isfinite(grad_norm)
        results.append((loss, {k: before[k] - p.detach() for k, p in model.named_parameters()}))
    (loss_one, grads_one), (loss_four, grads_four) = results
    with torch.no_grad():
        logits, _ = base(x)
        expected = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-1)
    assert abs(loss_one.item() - expected.item()) < 1e-5
    assert abs(loss_four.item() - expected.item()) < 1e-5
    for name in grads_one:
        assert torch.allclose(grads_one[name], grads_four[name], atol=1e-6, rtol=0), name
    # a plain mean of per-micro-batch means would weight the 1-target row like the 64-target one
    assert grads_one["transformer.wte.weight"].abs().sum() > 0


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])  # AdamW skips the update on the device, Muon on the host
def test_nonfinite_loss_skips_the_update(tiny_config, optimizer):
    from model import GPT
    from gptkit.optim import configure_optimizers, train_step
    cfg, rt = tiny_cfg(f"--optimizer={optimizer}"), cpu_runtime()
    model = GPT(tiny_config, verbose=False)
    optimizers = configure_optimizers(model, cfg, "cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x = torch.randint(0, 50257, (2, 64))
    assert train_step(model, optimizers, [(x, x)], cfg, rt, scaler)[2]  # one good step: the state has moments
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state_before = [copy.deepcopy(opt.state_dict()) for opt in optimizers]
    loss, _, finite = train_step(model, optimizers, [(x, x)], cfg, rt, scaler)
    assert not finite and not torch.isfinite(loss)
    for k, v in model.state_dict().items():
        assert torch.equal(v.nan_to_num(), before[k].nan_to_num()), k  # no parameter moved
    for opt, old in zip(optimizers, state_before):  # moments and step counts untouched
        assert old["state"], "the good step should have left optimizer state to compare"
        for p_id, p_state in opt.state_dict()["state"].items():
            for name, value in p_state.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(old["state"][p_id][name])), name
    assert all(p.grad is None for p in model.parameters())


def test_adamw_step_reads_nothing_back_from_the_device(tiny_config, monkeypatch):
    """With AdamW (bf16/fp32) the step never waits for the GPU: the host can queue the next step's
    work while this one runs. Here any read of a tensor value on the host fails the test."""
    from model import GPT
    from gptkit.optim import configure_optimizers, train_step
    cfg, rt = tiny_cfg(), cpu_runtime()
    model = GPT(tiny_config, verbose=False)
    optimizers = configure_optimizers(model, cfg, "cpu")
    x = torch.randint(0, 50257, (2, 64))

    def host_read(*args):
        raise AssertionError("the training step read a tensor value on the host (a GPU sync)")

    with monkeypatch.context() as m:
        for name in ("__bool__", "item", "tolist", "__float__", "__int__"):
            m.setattr(torch.Tensor, name, host_read)
        loss, grad_norm, finite = train_step(model, optimizers, [(x, x)], cfg, rt,
                                             torch.amp.GradScaler("cpu", enabled=False))
    assert finite and torch.isfinite(loss) and torch.isfinite(grad_norm)
    assert all(opt.state_dict()["state"] for opt in optimizers)  # the update happened


def test_lr_schedules():
    from gptkit.optim import lr_multiplier
    cfg = tiny_cfg("--learning_rate=1e-3", "--min_lr=1e-4", "--warmup_steps=10", "--max_steps=100")
    cosine = [lr_multiplier(s, cfg) for s in range(100)]
    assert cosine[0] == pytest.approx(0.1) and cosine[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(cosine[9:], cosine[10:]))  # decays monotonically after warmup
    assert cosine[99] == pytest.approx(0.1)  # ends at min_lr / learning_rate
    assert cosine[54] == pytest.approx(0.55, abs=0.02)  # halfway through the decay: halfway down
    cfg = tiny_cfg("--learning_rate=1e-3", "--min_lr=0", "--warmup_steps=10", "--max_steps=100",
                   "--lr_schedule=wsd", "--decay_fraction=0.2")
    wsd = [lr_multiplier(s, cfg) for s in range(100)]
    assert wsd[5] == pytest.approx(0.6) and all(m == 1.0 for m in wsd[10:80])
    assert wsd[80] < 1.0 and wsd[99] == pytest.approx(0.0)
    steps = np.diff(wsd[80:])
    assert np.allclose(steps, steps[0])  # a straight line down


def test_muon_optimizer_covers_every_parameter_once(tiny_config):
    from model import GPT
    from gptkit.optim import configure_optimizers, set_lr, train_step
    cfg, rt = tiny_cfg("--optimizer=muon", "--muon_weight_decay=0.03"), cpu_runtime()
    model = GPT(tiny_config, verbose=False)
    adamw, muon = configure_optimizers(model, cfg, "cpu")
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    # each optimizer its own decay: Muon's steps are ~30x AdamW's, so the same factor would shrink far more
    assert muon.param_groups[0]["weight_decay"] == 0.03
    assert max(g["weight_decay"] for g in adamw.param_groups) == cfg.weight_decay == 0.1
    seen = [id(p) for opt in (adamw, muon) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # all, none twice
    assert {id(p) for p in muon.param_groups[0]["params"]} == {id(p) for p in model.hidden_matrices()}
    set_lr([adamw, muon], 0.5)
    assert muon.param_groups[0]["lr"] == pytest.approx(cfg.muon_learning_rate * 0.5)
    assert adamw.param_groups[0]["lr"] == pytest.approx(cfg.learning_rate * 0.5)
    before = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    x = torch.randint(0, 50257, (2, 64))
    _, _, finite = train_step(model, [adamw, muon], [(x, x)], cfg, rt, torch.amp.GradScaler("cpu", enabled=False))
    assert finite and not torch.equal(before, model.transformer.h[0].attn.c_attn.weight)


def test_batch_size_must_divide_across_processes():
    from gptkit.configurator import ConfigError
    from gptkit.losses import grad_accum_steps
    cfg = tiny_cfg("--total_batch_tokens=768")  # 3 micro-batches of 4 x 64
    assert grad_accum_steps(cfg, 1) == 3
    with pytest.raises(ConfigError, match="not a multiple of micro_batch_size"):
        grad_accum_steps(cfg, 2)


@pytest.mark.slow
def test_missing_data_is_a_clear_error(tmp_path):
    proc = run_train(f"--data_dir={tmp_path / 'nowhere'}", f"--out_dir={tmp_path / 'out'}", "--max_steps=2",
                     "--total_batch_tokens=256", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("prepare the data first") == 1  # one problem, said once (not once per split)


@pytest.mark.slow
def test_plot_log_writes_png(full_run, tmp_path):
    out, _ = full_run
    png = str(tmp_path / "loss.png")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "plot_log.py"), f"--out_dir={out}", f"--out={png}"],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(png) > 10_000  # a drawn figure, not an empty canvas


@pytest.mark.slow
def test_init_model_from_checkpoint_path(full_run):
    from gptkit.configurator import ConfigError
    from gptkit.checkpoint import load_checkpoint
    from gptkit.loading import init_model
    out, _ = full_run
    cfg = tiny_cfg(f"--init_from={out}", "--dropout=0.2")
    model, tok, ckpt = init_model(cfg, cpu_runtime())
    assert tok.hash == "gpt2"  # the data's tokenizer, which the checkpoint carries too
    assert ckpt is None  # new training from these weights: no optimizer or step carried over
    assert model.config.dropout == 0.2 and model.transformer.h[0].mlp.dropout.p == 0.2
    saved = load_checkpoint(out)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    with pytest.raises(ConfigError, match="is none of: scratch, resume"):
        init_model(tiny_cfg("--init_from=no/such/thing"), cpu_runtime())


@pytest.mark.slow
def test_a_new_run_never_overwrites_a_run_folder(full_run, data_dir):
    # the same command run again (no --init_from=resume) would wipe the log at once and the checkpoint later
    out, args = full_run
    before = {name: os.path.getmtime(os.path.join(out, name)) for name in os.listdir(out)}
    proc = run_train(*args, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{out} already holds a run" in proc.stderr and "step 12" in proc.stderr
    assert "--init_from=resume" in proc.stderr and "new --out_dir" in proc.stderr
    # a pretraining run: only train.py resumes it (finetune.py's user is told so, not sent to a refusal)
    assert "--init_from=resume (with train.py: it is a pretraining run)" in proc.stderr
    assert f"start from its model with --init_from={out} and a new --out_dir" in proc.stderr
    assert {name: os.path.getmtime(os.path.join(out, name)) for name in os.listdir(out)} == before
    # starting from the run's weights into the same folder is refused the same way
    from gptkit.configurator import ConfigError
    from gptkit.loading import init_model
    with pytest.raises(ConfigError, match="already holds a run"):
        init_model(tiny_cfg(f"--init_from={out}", f"--out_dir={out}"), cpu_runtime())


@pytest.mark.slow
def test_full_disk_when_a_resume_rewrites_config_json_keeps_the_old_one(full_run, tmp_path):
    # A resume writes the run's config.json again. The file-size limit makes every write past 256
    # bytes fail (EFBIG) as a full disk would: the run stops, and config.json must still be the
    # whole record of the run, not a file cut at 256 bytes.
    import resource
    import shutil
    out, args = full_run
    run = str(tmp_path / "run")
    shutil.copytree(out, run)
    before = (tmp_path / "run" / "config.json").read_bytes()
    assert len(before) > 256

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (256, 256))

    cmd = [sys.executable, os.path.join(ROOT, "train.py")] + TINY + args + [
        f"--out_dir={run}", "--init_from=resume", "--max_steps=13"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300,
                          preexec_fn=limit_file_size)
    assert proc.returncode != 0 and "File too large" in proc.stderr, proc.stderr[-2000:]
    assert (tmp_path / "run" / "config.json").read_bytes() == before


@pytest.mark.slow
def test_resume_removes_temporary_files_of_a_save_cut_short(full_run, tmp_path):
    # a kill during a save leaves ckpt.pt.tmpPID behind (as big as a checkpoint, gigabytes for the
    # large recipes): each such kill would leave one more, until the disk is full
    import shutil
    out, args = full_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    for name in ("ckpt.pt.tmp4242", "ckpt.json.tmp4242", "notes.tmp4242"):
        (run / name).write_bytes(b"left by a killed save")
    run_train(*args, f"--out_dir={run}", "--init_from=resume", "--max_steps=13")
    assert not (run / "ckpt.pt.tmp4242").exists() and not (run / "ckpt.json.tmp4242").exists()
    assert (run / "notes.tmp4242").exists()  # a user's file is left alone


def test_resume_drops_log_records_after_the_checkpoint(tmp_path):
    from gptkit.checkpoint import truncate_log
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 11)]
    (tmp_path / "log.jsonl").write_text("".join(lines) + '{"step": 11, "lo', encoding="utf-8")  # cut by a kill
    truncate_log(str(tmp_path), 6)
    assert [r["step"] for r in read_log(str(tmp_path))] == [1, 2, 3, 4, 5, 6]
    assert sorted(os.listdir(tmp_path)) == ["log.jsonl"]  # no temporary file left behind


def test_metrics_logger_writes_jsonl_and_wandb(tmp_path, monkeypatch):
    """--wandb_log=True: every record goes to wandb too (wandb itself is replaced by a recorder)."""
    import types
    from gptkit.system import MetricsLogger
    calls = []

    class Run:
        def log(self, data, step):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    fake_wandb = types.SimpleNamespace(init=lambda **kwargs: calls.append(("init", kwargs)) or Run())
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    logger = MetricsLogger(str(tmp_path), wandb_log=True, wandb_project="proj", wandb_run_name="run1",
                           config={"n_layer": 2})
    logger.log(3, loss=torch.tensor(2.5), lr=np.float32(0.5), samples=["text"])
    logger.close()
    assert calls[0] == ("init", {"project": "proj", "name": "run1", "config": {"n_layer": 2}, "resume": None})
    assert calls[1:] == [("log", {"loss": 2.5, "lr": 0.5, "samples": ["text"]}, 3), ("finish",)]
    [record] = read_log(str(tmp_path))
    assert record["step"] == 3 and record["loss"] == 2.5 and record["lr"] == 0.5
    # a resumed run appends to its log and to the same wandb run; other ranks write nothing
    for enabled, step in ((True, 4), (False, 5)):
        logger = MetricsLogger(str(tmp_path), enabled=enabled, wandb_log=True, resume=True)
        logger.log(step, loss=2.0)
        logger.close()
    assert calls[3][1]["resume"] == "allow" and calls[4:] == [("log", {"loss": 2.0}, 4), ("finish",)]
    assert [r["step"] for r in read_log(str(tmp_path))] == [3, 4]


class FixedLoader:
    """The same (x, y) batch every time; enough of a loader for the loop and its checkpoint."""

    def __init__(self, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, 50257, (4, 64), generator=gen)
        self.y = torch.randint(0, 50257, (4, 64), generator=gen)

    def next_batch(self):
        return self.x, self.y

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


@pytest.mark.slow
def test_activation_checkpointing_flag_reaches_the_model(tiny_config, tmp_path, monkeypatch):
    """--activation_checkpointing=True makes the loop recompute every block in the backward pass
    (and only in training: evaluation is not checkpointed), with the same losses as without."""
    import torch.utils.checkpoint
    from model import GPT
    from gptkit.trainer import train
    real_checkpoint = torch.utils.checkpoint.checkpoint
    calls = []

    def counting_checkpoint(function, *args, **kwargs):
        calls.append(function)
        return real_checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    records = {}
    for flag in (False, True):
        calls.clear()
        torch.manual_seed(0)
        model = GPT(tiny_config, verbose=False)
        out = str(tmp_path / f"ac_{flag}")
        cfg = tiny_cfg(f"--out_dir={out}", "--max_steps=2", "--eval_interval=2", f"--activation_checkpointing={flag}")
        loader = FixedLoader()
        train(cfg, cpu_runtime(), model, load_tokenizer("gpt2"), loader, lambda: [loader.next_batch()])
        assert model.activation_checkpointing is flag
        # 2 steps x 1 micro-batch x 2 blocks when on; the two evals run unchecked
        assert len(calls) == (2 * 2 if flag else 0)
        assert all(isinstance(function, type(model.transformer.h[0])) for function in calls)
        records[flag] = read_log(out)
    assert losses(records[True]) == losses(records[False]) and len(losses(records[True])) == 2
    assert losses(records[True], "val_loss") == losses(records[False], "val_loss")


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once(data_dir, tmp_path):
    """The first Ctrl-C asks for the step to finish and a checkpoint; a second one stops the run at
    once: the step is not finished and nothing is saved."""
    out = str(tmp_path / "stopped")
    # 64 micro-batches per step: a step lasts seconds, long enough to press Ctrl-C twice inside one
    cmd = [sys.executable, os.path.join(ROOT, "train.py")] + TINY + [
        f"--data_dir={data_dir}", f"--out_dir={out}", "--max_steps=1000", "--total_batch_tokens=16384",
        "--eval_interval=1000", "--ckpt_interval=1000", "--log_interval=1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = os.path.join(out, "log.jsonl")
    deadline = time.time() + 180
    try:
        while time.time() < deadline:  # step 1 is logged: step 2 has just begun
            if os.path.exists(log):
                with open(log, encoding="utf-8") as f:
                    if any('"loss"' in line for line in f):
                        break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        # the second Ctrl-C once the first is handled (it prints): two signals that arrive before
        # Python runs its handler are handled once
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "SIGINT received" in line:
                break
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
        stdout = "".join(seen) + stdout
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, "a run stopped at once must not report success"
    assert "SIGINT received" in stdout and "Traceback" not in stderr
    assert "interrupted: stopped at once, without saving" in stderr
    assert not os.path.exists(os.path.join(out, "ckpt.pt")), "the second Ctrl-C should not wait for a save"
    assert max(losses(read_log(out))) == 1  # step 2 never finished


def test_resume_names_what_it_ignores_and_keeps_block_size_as_the_row_length(tmp_path, capsys):
    """On resume the model's shape comes from the checkpoint (other n_layer/n_embd are named as ignored),
    but block_size is the length of the rows the run trains on: never called ignored, and checked once,
    against the model's context, by init_model."""
    from model import GPT, GPTConfig
    from gptkit.checkpoint import save_checkpoint
    from gptkit.configurator import ConfigError
    from gptkit.loading import init_model
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, dropout=0.1), verbose=False)
    run_settings = {**dataclasses.asdict(tiny_cfg()), "max_steps": 30, "dropout": 0.1}
    for name in ("short", "long"):
        save_checkpoint(str(tmp_path / name), {"model": model.state_dict(), "model_config": model.config.to_dict(),
                                               "kind": "base", "step": 0, "config": run_settings})
    resumed, tok, ckpt = init_model(tiny_cfg("--init_from=resume", f"--out_dir={tmp_path / 'short'}",
                                             "--block_size=32", "--n_layer=3"), cpu_runtime())
    note = capsys.readouterr().out
    assert "ignoring n_layer=3 (checkpoint: 2)" in note and "block_size" not in note.split("ignoring")[1].split("\n")[0]
    assert "dropout" not in note  # the default dropout differs from the run's too, but the command did not ask for it
    # a setting that changes the rest of the run (a forgotten --max_steps=30) is named, with the run's value
    assert "differ from the run's: block_size=32 (the run: 64), max_steps=100 (the run: 30)" in note
    assert resumed.config.block_size == 64 and ckpt["step"] == 0 and tok.hash == "gpt2"
    with pytest.raises(ConfigError, match="block_size=128 is longer than the model's context of 64"):
        init_model(tiny_cfg("--init_from=resume", f"--out_dir={tmp_path / 'long'}", "--block_size=128",
                            "--total_batch_tokens=512"), cpu_runtime())
