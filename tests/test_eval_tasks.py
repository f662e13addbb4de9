"""lm-evaluation-harness tasks during training (eval_tasks in train.py / finetune.py): the scores a run
logs at its interval and last step are evaluate_tasks' on the saved checkpoint, a mistake fails before
the first step, and plot_log.py and the model card show the scores. The task files are test_eval.py's
(ARC-Easy and GSM8K items in the datasets' real schemas, read offline through data_dir)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, shared_data
from gptkit.configurator import ConfigError, load_config
from gptkit.modelcard import card_body, run_facts
from gptkit.plot import Run, draw_runs, eval_task_key, main_task_keys, score_panels
from gptkit.train_config import FinetuneConfig, TrainConfig
from test_eval import CPU, GPT2, SYSTEM, _model, _write_jsonl, data_dir  # noqa: F401 (data_dir: a fixture)

TINY = ["--device=cpu", "--n_layer=2", "--n_head=4", "--n_embd=64", "--block_size=64", "--micro_batch_size=4",
        "--eval_tokens=1024", "--log_interval=1", "--sample_tokens=0", "--warmup_steps=2", "--total_batch_tokens=256"]
# as the trainer logs them: every metric of a task under eval/TASK/, the headline first of MAIN_METRICS
SCORES = {"eval/arc_easy/acc": 0.5, "eval/arc_easy/acc_norm": 0.75, "eval/arc_easy/centered_acc": 0.6,
          "eval/gsm8k/exact_match_strict-match": 0.25, "eval/gsm8k/exact_match_flexible-extract": 0.5,
          "eval/centered_mean/centered_acc": 0.6}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Train/val shards of the first ~25k tokens of tiny Shakespeare."""
    from gptkit.data import write_shard
    from gptkit.tokenizer import EOT
    with open(shared_data("pretrain", "tinyshakespeare", "input.txt"), encoding="utf-8") as f:
        ids = np.array([EOT] + GPT2.encode(f.read()[:100_000]), dtype=np.uint16)
    path = tmp_path_factory.mktemp("shards")
    cut = len(ids) * 9 // 10
    write_shard(str(path / "train_000000.bin"), ids[:cut])
    write_shard(str(path / "val_000000.bin"), ids[cut:])
    return str(path)


def run_train(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1")  # offline: no hub retries
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *TINY, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# --- settings, keys, plot and card: no harness run ---------------------------------------------------

def test_eval_tasks_settings_are_checked():
    cfg = load_config(TrainConfig, ["--eval_tasks=arc_easy, piqa", "--eval_interval=50", "--eval_tasks_interval=100"])
    assert cfg.eval_tasks == ["arc_easy", "piqa"]
    assert load_config(TrainConfig, ["--eval_tasks="]).eval_tasks == []  # off
    with pytest.raises(ConfigError, match="eval_tasks_interval=75 is not a multiple of eval_interval=50"):
        load_config(TrainConfig, ["--eval_tasks=arc_easy", "--eval_interval=50", "--eval_tasks_interval=75"])
    with pytest.raises(ConfigError, match="eval_tasks_limit=-1 must be 0 or more"):
        load_config(TrainConfig, ["--eval_tasks=arc_easy", "--eval_tasks_limit=-1"])
    with pytest.raises(ConfigError, match="eval_tasks_data='nowhere' is not a folder"):
        load_config(TrainConfig, ["--eval_tasks=arc_easy", "--eval_tasks_data=nowhere"])


def test_each_task_has_one_headline_metric():
    assert main_task_keys(["val_loss", "hellaswag_acc_norm", *SCORES, "eval/wikitext/word_perplexity"]) == {
        "arc_easy": "eval/arc_easy/acc_norm", "gsm8k": "eval/gsm8k/exact_match_strict-match",
        "centered_mean": "eval/centered_mean/centered_acc", "wikitext": "eval/wikitext/word_perplexity"}


def test_plot_has_a_panel_per_task_for_one_run_and_for_several():
    a = Run("a", "out/a", 100, [{"step": 1, "loss": 3.0, "lr": 1e-3}, {"step": 2, "val_loss": 2.9, **SCORES},
                                {"step": 4, "val_loss": 2.5, "eval/arc_easy/acc_norm": 0.8, "hellaswag_acc_norm": 0.3}])
    b = Run("b", "out/b", 200, [{"step": 1, "loss": 3.1, "lr": 1e-3}, {"step": 3, "eval/piqa/acc_norm": 0.55}])
    assert [p[0] for p in score_panels([a])] == ["hellaswag_acc_norm", "eval/arc_easy/acc_norm",
                                                  "eval/gsm8k/exact_match_strict-match", "eval/centered_mean/centered_acc"]
    fig = draw_runs([a, b])
    axes = {ax.get_ylabel(): ax for ax in fig.axes}
    assert "arc_easy\nacc_norm" in axes and "piqa\nacc_norm" in axes and "HellaSwag acc_norm" in axes
    [line] = axes["arc_easy\nacc_norm"].get_lines()  # run a's only: b did not score arc_easy
    assert list(line.get_xdata()) == [200, 400] and list(line.get_ydata()) == [0.75, 0.8]  # x: tokens trained
    [line] = axes["piqa\nacc_norm"].get_lines()
    assert list(line.get_xdata()) == [600] and line.get_label() == "b"


def test_card_shows_the_runs_last_scores_and_eval_py_results(tmp_path):
    model = _model()
    records = [{"step": 2, "val_loss": 3.0, **SCORES}, {"step": 4, "val_loss": 2.0, **SCORES,
                                                         "eval/arc_easy/acc_norm": 0.8125}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    results = {"tasks": {"piqa": {"acc": 0.5, "acc_norm": 0.625, "centered_acc": 0.25, "items": 40, "ckpt": "x",
                                  "step": 4, "kind": "chat", "chat_format": True, "limit": 40, "num_fewshot": -1,
                                  "date": "2026-12-03 10:00:00", "seconds": 3.2},
                         "gsm8k": {"exact_match_strict-match": 0.1, "exact_match_flexible-extract": 0.2, "items": 10,
                                   "step": 4, "chat_format": True, "limit": 10, "num_fewshot": 0, "date": "d"}}}
    (tmp_path / "eval_results.json").write_text(json.dumps(results))
    ckpt = {"kind": "chat", "config": {"eval_tasks_limit": 50, "system": SYSTEM}, "step": 4, "tokens_seen": 1024}
    text = card_body(run_facts(model, GPT2, ckpt, str(tmp_path)), "me/tiny")
    assert "## Benchmarks" in text
    assert "| arc_easy | acc_norm | 0.8125 | first 50 | the task's own | chat | 4 | training (eval_tasks) |" in text
    assert "| gsm8k | exact_match_strict-match | 0.2500 | first 50 |" in text
    assert "| piqa | acc_norm | 0.6250 | 40 | the task's own | chat | 4 | eval.py, 2026-12-03 10:00:00 |" in text
    assert "| gsm8k | exact_match_strict-match | 0.1000 | 10 | 0 | chat | 4 | eval.py, d |" in text
    # a run with neither: no section
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "Benchmarks" not in card_body(run_facts(model, GPT2, {"kind": "base", "config": {}}, str(empty)), "")


# --- end to end: train.py with eval_tasks, on the harness ---------------------------------------------

@pytest.mark.slow
def test_train_logs_the_tasks_at_their_interval_and_the_end_as_the_checkpoint_scores(shards, data_dir, tmp_path):
    from gptkit.harness import evaluate_tasks  # the oracle: the harness on the saved model
    from gptkit.loading import load_model
    out = str(tmp_path / "run")
    tasks = ["--eval_tasks=arc_easy,gsm8k", f"--eval_tasks_data={data_dir}", "--eval_tasks_limit=3",
             "--eval_tasks_max_gen_toks=8", "--eval_tasks_num_fewshot=1"]  # GSM8K's own 5 shots: 3 items here
    proc = run_train(f"--data_dir={shards}", f"--out_dir={out}", "--max_steps=6", "--eval_interval=2",
                     "--eval_tasks_interval=4", *tasks)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scored = [r for r in read_log(out) if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in scored] == [4, 6]  # the interval and the last step, not step 2
    last = {k: v for k, v in scored[-1].items() if k.startswith("eval/")}
    model, tokenizer, meta = load_model(out, device="cpu")
    assert meta["step"] == 6
    expected = evaluate_tasks(model, tokenizer, ["arc_easy", "gsm8k"], CPU, limit=3, data_dir=data_dir,
                              max_gen_toks=8, num_fewshot=1)
    assert last == {f"eval/{task}/{metric}": value for task, values in expected.items()
                    for metric, value in values.items()}
    assert {"eval/arc_easy/acc", "eval/gsm8k/exact_match_flexible-extract"} <= set(last)
    # the console shows each task's headline metric only
    [line] = [line for line in proc.stdout.splitlines() if line.startswith("step 6:")]
    assert "eval/arc_easy/acc_norm" in line and "eval/gsm8k/exact_match_strict-match" in line
    assert "eval/arc_easy/acc " not in line and "flexible-extract" not in line
    # plot_log.py draws them; the card (export_hf.py's run_facts) reports the last ones
    fig = draw_runs([Run("run", out, 256, read_log(out))])
    assert {"arc_easy\nacc_norm", "gsm8k\nexact_match_strict-match"} <= {ax.get_ylabel() for ax in fig.axes}
    text = card_body(run_facts(model, tokenizer, {"kind": "base", "config": meta["config"]}, out), "")
    assert f"| arc_easy | acc_norm | {last['eval/arc_easy/acc_norm']:.4f} | first 3 | 1 | plain text " \
           "| 6 | training (eval_tasks) |" in text


@pytest.mark.slow
def test_a_bad_task_or_missing_data_fails_before_the_first_step(shards, data_dir, tmp_path, monkeypatch):
    proc = run_train(f"--data_dir={shards}", f"--out_dir={tmp_path / 'bad'}", "--max_steps=2",
                     "--eval_tasks=arc_easy,arc_eazy", f"--eval_tasks_data={data_dir}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    [error] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "task 'arc_eazy' is not one lm-evaluation-harness knows" in error and "--eval_tasks=" in error
    assert "Traceback" not in proc.stderr and "step 1" not in proc.stdout
    # in process (the harness's task index is read once): a task with no local file, a few-shot split
    # too small for the task's shots, an answer longer than the context
    from gptkit.trainer import check_eval_tasks
    model = _model()  # T=128
    # no hub: a missing file fails at once, not after the hub client's retries
    monkeypatch.setattr("datasets.config.HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [(["arc_easy"], str(empty), [], r"could not read the data of arc_easy.*--eval_tasks_data=DATA_DIR"),
             (["gsm8k"], data_dir, ["--eval_tasks_num_fewshot=1", "--eval_tasks_max_gen_toks=200"],
              r"asks for 200 new tokens.*context of 128.*--eval_tasks_max_gen_toks")]
    short = tmp_path / "short"
    _write_jsonl(short / "openai/gsm8k/main/test.jsonl", [{"question": "1 + 1?", "answer": "#### 2"}])
    _write_jsonl(short / "openai/gsm8k/main/train.jsonl", [{"question": "2 + 2?", "answer": "#### 4"}])
    cases.append((["gsm8k"], str(short), ["--eval_tasks_max_gen_toks=8"],  # its own 5 shots from 1 train item
                  r"ValueError: Sample larger than population.*--eval_tasks_num_fewshot"))
    for tasks, folder, flags, message in cases:
        cfg = load_config(TrainConfig, [f"--eval_tasks={','.join(tasks)}", f"--eval_tasks_data={folder}", *flags])
        with pytest.raises(ConfigError, match=message) as e:
            check_eval_tasks(model, GPT2, CPU, cfg, "base")
        assert "\n" not in str(e.value), e.value


@pytest.mark.slow
def test_a_chat_run_is_scored_in_its_chat_format(data_dir, monkeypatch):
    import gptkit.harness
    from gptkit.trainer import score_tasks
    calls, real = [], gptkit.harness.evaluate_tasks

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(gptkit.harness, "evaluate_tasks", spy)
    model = _model(seed=1)
    cfg = load_config(FinetuneConfig, ["--init_from=out/tiny_cpu", f"--system={SYSTEM}", "--eval_tasks=arc_easy",
                                       f"--eval_tasks_data={data_dir}"])
    chat = score_tasks(model, GPT2, CPU, cfg, "chat", limit=None)
    assert (calls[0]["chat"], calls[0]["system_prompt"]) == (True, SYSTEM)
    expected = real(model, GPT2, ["arc_easy"], CPU, data_dir=data_dir, chat=True, system_prompt=SYSTEM)
    assert chat == {eval_task_key(task, metric): value for task, values in expected.items()
                    for metric, value in values.items()}
    score_tasks(model, GPT2, CPU, cfg, "base", limit=None)  # the same settings on a base model: plain text
    assert (calls[-1]["chat"], calls[-1]["system_prompt"]) == (False, "")
