"""bench_recipe.py's logic without its hours of training: which points the stages pick from the results
so far, that a rerun runs only what is missing and appends as each run finishes, and that nanoGPT's
checkpoint and log lines are read right."""

import json

import pytest
import torch

import bench_recipe
from model import GPT, GPTConfig
from gptkit.configurator import configure


def recipe_cfg(*args):
    return configure(bench_recipe.RecipeConfig, ["--report_only=False", *args])


def fake_loss(point, muon_best=0.04):
    """A made-up landscape: AdamW best at 2.4e-3, Muon best without decay at muon_best, WSD a little better."""
    t = point["train"]
    if t.get("optimizer") == "muon":
        loss = 4.0 + (0.1 if t["muon_weight_decay"] else 0.0) + abs(t["muon_learning_rate"] - muon_best)
    else:
        loss = 5.0 + abs(t["learning_rate"] - 2.4e-3) * 100
    loss -= 0.05 if t.get("lr_schedule") == "wsd" else 0.0
    return loss + (1 - point.get("token_scale", 1.0))


def planned_points(muon_best=0.04):
    cfg, results, points, planned = recipe_cfg(), [], {}, []
    for point in bench_recipe.plan(cfg, results, points):
        planned.append(point)
        results += [{"name": point["name"], "seed": s, "val_loss": fake_loss(point, muon_best)} for s in (1, 2)]
    return cfg, planned


def test_stages_build_on_the_best_point_so_far():
    cfg, planned = planned_points()
    by_name = {p["name"]: p for p in planned}
    # AdamW's rate doubles from 6e-4 while the doubling helps: 4.8e-3 was worse, so no 9.6e-3
    assert [p["name"] for p in planned if p["stage"] == "lr"] == ["adamw lr=0.0012", "adamw lr=0.0024", "adamw lr=0.0048"]
    assert planned[0]["runner"] == "nanogpt" and planned[1]["name"] == "adamw lr=6e-4"
    # Muon's AdamW part (embeddings, LayerNorms) takes the best AdamW learning rate
    muon = [p for p in planned if p["stage"] == "muon"]
    assert {p["train"]["learning_rate"] for p in muon} == {2.4e-3}
    # the learning-rate points of Muon use the better weight decay (0 here), going up while it helps
    assert [p["name"] for p in muon[2:]] == ["muon lr=0.04 wd=0", "muon lr=0.08 wd=0"]
    assert [p["name"] for p in planned if p["stage"] == "schedule"] == ["muon lr=0.04 wd=0 wsd"]
    tokens = [p for p in planned if p["stage"] == "tokens"]
    assert [p["token_scale"] for p in tokens] == [0.7, 0.5]
    assert all(p["train"] == by_name["muon lr=0.04 wd=0 wsd"]["train"] for p in tokens)
    assert [p["batch_tokens"] for p in planned if p["stage"] == "batch"] == [4096, 16384]
    assert bench_recipe.steps_of(cfg, tokens[0]) == round(0.7 * cfg.tokens / cfg.batch_tokens)
    # the confirm stage: nanoGPT again, then the configs' default recipe, the 70% run first
    confirm = [p for p in planned if p["stage"] == "confirm"]
    assert confirm[0]["runner"] == "nanogpt" and confirm[0]["name"] == planned[0]["name"]
    assert [p["token_scale"] for p in confirm[1:]] == [0.7, 0.5, 1.0]
    assert all(p["train"] == bench_recipe.DEFAULT for p in confirm[1:])


def test_muon_rate_goes_down_when_up_does_not_help():
    _, planned = planned_points(muon_best=0.01)
    assert [p["name"] for p in planned if p["stage"] == "muon"][2:] == ["muon lr=0.04 wd=0", "muon lr=0.01 wd=0"]


def test_a_rerun_runs_only_the_missing_runs_and_appends_each(tmp_path, monkeypatch, capsys):
    (tmp_path / "nanoGPT").mkdir()
    (tmp_path / "nanoGPT" / "train.py").write_text("")
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps({"name": "nanoGPT train.py", "seed": 1, "stage": "reference", "tokens": 1,
                                   "val_loss": 5.0, "train_tokens_per_sec": 10, "out_dir": str(tmp_path)}) + "\n")
    ran = []

    def fake_run(cfg, point, seed, data_dir):
        ran.append((point["name"], seed))
        assert len(results.read_text().splitlines()) == len(ran)  # the runs before were written already
        return {"name": point["name"], "seed": seed, "stage": point["stage"], "tokens": 1,
                "val_loss": fake_loss(point), "train_tokens_per_sec": 10, "wall_s": 1.0, "out_dir": str(tmp_path)}

    monkeypatch.setattr(bench_recipe, "run_point", fake_run)
    monkeypatch.setattr(bench_recipe, "prepare_data", lambda cfg: "unused")
    monkeypatch.setattr("sys.argv", ["bench_recipe.py", f"--nanogpt_dir={tmp_path / 'nanoGPT'}",
                                     f"--results={results}", "--plot=", "--stages=reference"])
    bench_recipe.main()
    assert ran == [("nanoGPT train.py", 2), ("adamw lr=6e-4", 1), ("adamw lr=6e-4", 2)]
    assert [json.loads(line)["seed"] for line in results.read_text().splitlines()] == [1, 2, 1, 2]
    table = capsys.readouterr().out
    assert "| reference | nanoGPT train.py | 1 | 5.0000 / 5.1800 | 5.0900 | +0.0000 |" in table
    assert "| reference | adamw lr=6e-4 | 1 | 5.1800 / 5.1800 | 5.1800 | +0.0900 |" in table


def test_nanogpt_checkpoint_and_log_lines_are_read_as_written(tmp_path):
    cfg = recipe_cfg("--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--vocab_size=64")
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, bias=False), verbose=False)
    # the layout nanoGPT's train.py saves, compiled model's prefix included
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}, "iter_num": 8,
                "model_args": {"n_layer": 2}, "best_val_loss": torch.tensor(3.0), "config": {"dataset": "x"}},
               tmp_path / "ckpt.pt")
    loaded = bench_recipe.load_nanogpt(tmp_path / "ckpt.pt", cfg)
    x = torch.randint(0, 64, (2, 16))
    assert torch.equal(loaded(x, x)[1], model(x, x)[1])
    output = ("step 0: train loss 4.2, val loss 4.2\n"
              "iter 0: loss 4.1000, time 900.00ms, mfu -100.00%\n"
              "iter 1: loss 3.9000, time 100.00ms, mfu 1.00%\n"
              "iter 2: loss 3.8000, time 200.00ms, mfu 1.00%\n")
    records = bench_recipe.nanogpt_log(output, steps=2, batch_tokens=1000)
    assert [(r["step"], r["loss"], r["tokens_seen"]) for r in records] == [(1, 4.1, 1000), (2, 3.9, 2000)]
    assert records[1]["tokens_per_sec"] == pytest.approx(10_000)
