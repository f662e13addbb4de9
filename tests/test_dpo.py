"""dpo.py and gptkit/preference.py: preference data in the common schemas, the loss against trl's DPOTrainer on
the same exported model, a tiny model learning a preference rule, exact resume, torchrun, bad input."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import dpo
from conftest import ROOT
from gptkit.checkpoint import save_checkpoint
from gptkit.configurator import ConfigError, load_config
from gptkit.generate import generate
from gptkit.hf import export_hf
from gptkit.loading import load_model
from gptkit.preference import DPOLoss, pair_rows, read_pairs, sequence_logps
from gptkit.sft import SFTDataError, read_meta, read_sft_split, val_questions
from gptkit.tokenizer import EOT, load_tokenizer
from model import GPT, GPTConfig
from prepare_instruct import InstructConfig, InstructDataError, prepare
from test_train import losses, read_log

WORDS = "red blue green apple river stone cloud light music table window garden paper silver".split()
RULE = "Sure!"  # the preferred answer starts with it; the rejected one is the same answer without it
TINY = ["--block_size=64", "--compile=False", "--device=cpu", "--questions=2", "--answer_tokens=6"]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def rule_pairs(n, seed=0):
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
        pairs.append({"prompt": f"Tell me about the {rng.choice(WORDS)} {i}.", "chosen": f"{RULE} {body}",
                      "rejected": body})
    return pairs


def prepare_pairs(sources, data_dir, *flags):
    return prepare(load_config(InstructConfig, [f"--sources={json.dumps(sources)}", f"--data_dir={data_dir}",
                                                "--block_size=64", *flags]))


def save_start(folder, kind="chat", seed=0):
    """A tiny random model saved as a gptkit checkpoint of the given kind: the policy's start and the reference."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64), verbose=False)
    os.makedirs(folder, exist_ok=True)
    save_checkpoint(str(folder), {"model": model.state_dict(), "model_config": model.config.to_dict(), "kind": kind,
                                  "config": {"system": ""}, "step": 0})
    return model


def run_dpo(*args, launcher=None, check=True):
    cmd = (launcher or [sys.executable]) + [os.path.join(ROOT, "dpo.py")] + TINY + list(args)
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"dpo.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def rule_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rule")
    source = write_jsonl(folder / "pairs.jsonl", rule_pairs(96))
    prepare_pairs([source], folder / "data", "--val_fraction=0.2")
    save_start(folder / "start")
    return folder


# 8 pairs per step; the same settings for the run, its stopped-and-resumed twin and the torchrun twin
RUN = ["--total_batch_pairs=8", "--learning_rate=3e-3", "--min_lr=3e-4", "--warmup_steps=1", "--max_steps=8",
       "--log_interval=1", "--eval_interval=8", "--ckpt_interval=100"]


@pytest.fixture(scope="module")
def full_run(rule_data):
    out = str(rule_data / "full")
    run_dpo(f"--data_dir={rule_data / 'data'}", f"--init_from={rule_data / 'start'}", f"--out_dir={out}",
            "--micro_batch_size=4", *RUN)
    return out


# ------------------------------------------------------------------------------------------------
# Data: the schemas, the mask, identical pairs, truncation

def test_pair_schemas_render_prompt_and_answers_with_the_mask_on_the_answer(tmp_path):
    tok = load_tokenizer("gpt2")
    q, good, bad = "What is 2+2?", "It is 4.", "It is 5."
    user = {"role": "user", "content": q}
    records = {
        "strings.jsonl": {"prompt": q, "chosen": good, "rejected": bad},
        "messages.jsonl": {"prompt": [user], "chosen": [{"role": "assistant", "content": good}],
                           "rejected": [{"role": "assistant", "content": bad}]},
        "implicit.jsonl": {"chosen": [user, {"role": "assistant", "content": good}],
                           "rejected": [user, {"role": "assistant", "content": bad}]},
        "hh.jsonl": {"chosen": f"\n\nHuman: {q}\n\nAssistant: {good}", "rejected": f"\n\nHuman: {q}\n\nAssistant: {bad}"},
        # UltraFeedback binarized: the prompt as text, and again at the start of chosen and rejected
        "ultrafeedback.jsonl": {"prompt": q, "prompt_id": "x", "messages": [user], "score_chosen": 8.0,
                                "score_rejected": 3.0, "chosen": [user, {"role": "assistant", "content": good}],
                                "rejected": [user, {"role": "assistant", "content": bad}]},
    }
    head = tok.render_prompt([user])
    for name, record in records.items():
        data = tmp_path / name.replace(".jsonl", "")
        summary = prepare_pairs([write_jsonl(tmp_path / name, [record])], data, "--val_fraction=0")
        assert summary["sources"][str(tmp_path / name)]["schema"] == "preference", name
        assert read_meta(str(data))["pairs"] is True
        ids, mask, offsets = read_sft_split(str(data), "train")
        for conv, answer in enumerate((good, bad)):
            seq, m = ids[offsets[conv]:offsets[conv + 1]].tolist(), mask[offsets[conv]:offsets[conv + 1]].tolist()
            assert seq == head + tok.encode(answer) + [tok.enc.encode_single_token("<|end|>")], name
            assert m == [0] * len(head) + [1] * (len(seq) - len(head)), name  # loss on the answer and its <|end|>


def test_hub_source_reads_ultrafeedbacks_train_prefs_split(monkeypatch, tmp_path):
    import datasets  # heavy (seconds to import): only this test needs it, as only a hub source does
    asked = {}

    def load_dataset(name, split):
        asked[name] = split
        return [{"prompt": "Hi?", "chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"}],
                 "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Go away."}]}] * 1

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    summary = prepare_pairs(["HuggingFaceH4/ultrafeedback_binarized"], tmp_path / "d", "--val_fraction=0")
    assert asked == {"HuggingFaceH4/ultrafeedback_binarized": "train_prefs"}
    assert summary["splits"]["train"]["conversations"] == 2


def test_identical_pairs_are_dropped_and_counted_and_overlong_pairs_truncated_by_the_rule(tmp_path):
    tok = load_tokenizer("gpt2")
    long_prompt = " ".join(WORDS * 4)  # ~56 tokens: with an answer, more than block_size + 1 = 65
    records = [{"prompt": "Same?", "chosen": "yes", "rejected": "yes"},
               {"prompt": long_prompt, "chosen": "a b c d e f g h i j k l", "rejected": "no"},
               {"prompt": "Fine?", "chosen": "yes", "rejected": "no"}]
    source = write_jsonl(tmp_path / "p.jsonl", records)
    stats = prepare_pairs([source], tmp_path / "drop", "--val_fraction=0")["sources"][source]
    assert stats["identical chosen and rejected dropped"] == 1 and stats["overlong dropped"] == 1
    assert stats["train"] == 1
    stats = prepare_pairs([source], tmp_path / "cut", "--val_fraction=0", "--overlong=truncate")["sources"][source]
    assert stats["overlong truncated"] == 1 and stats["train"] == 2
    ids, mask, offsets = read_sft_split(str(tmp_path / "cut"), "train")
    chosen, rejected = ids[offsets[0]:offsets[1]].tolist(), ids[offsets[1]:offsets[2]].tolist()
    head = tok.render_prompt([{"role": "user", "content": long_prompt}])
    answer = tok.encode("a b c d e f g h i j k l") + [tok.enc.encode_single_token("<|end|>")]
    keep = max(65 - len(answer), 65 // 2)  # the documented rule: the prompt keeps its end (and <|endoftext|>)
    assert chosen == (head[:1] + head[len(head) - keep + 1:] + answer)[:65] and len(chosen) <= 65
    assert rejected[:keep] == chosen[:keep] and mask[offsets[0]:offsets[0] + keep].sum() == 0


# ------------------------------------------------------------------------------------------------
# The loss: equal to trl's on the same exported model and the same pairs

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A policy and a (different) reference, each as a gptkit model and its Hugging Face export."""
    from transformers import AutoTokenizer, GPT2LMHeadModel  # a test-only dependency: the trl comparison's
    folder = tmp_path_factory.mktemp("hf")
    models = {}
    for name, seed in (("policy", 1), ("reference", 2)):
        torch.manual_seed(seed)
        ours = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, bias=True), verbose=False).eval()
        export_hf(ours, str(folder / name), load_tokenizer("gpt2"), chat=True)
        models[name] = (ours, GPT2LMHeadModel.from_pretrained(str(folder / name)).eval())
    return models, AutoTokenizer.from_pretrained(str(folder / "policy")), folder


@pytest.mark.slow
@pytest.mark.parametrize("loss_type,rpo_alpha", [("sigmoid", 0.0), ("ipo", 0.0), ("sigmoid", 0.5)])
def test_loss_rewards_and_logps_equal_trls(exported, rule_data, loss_type, rpo_alpha):
    # test-only dependencies, heavy to import: only the comparison with trl needs them
    from datasets import Dataset
    from trl import DPOConfig as TrlConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    (policy, hf_policy), (reference, hf_reference) = exported[0]["policy"], exported[0]["reference"]
    beta, pairs = 0.3, [0, 1, 2, 3, 4]
    ids, mask, offsets, _ = read_pairs(str(rule_data / "data"), "train")
    examples = []
    for p in pairs:  # the same token ids for trl: prompt, then each answer (where the mask starts)
        convs = [ids[offsets[c]:offsets[c + 1]].tolist() for c in (2 * p, 2 * p + 1)]
        start = int(np.argmax(mask[offsets[2 * p]:offsets[2 * p + 1]]))
        examples.append({"prompt_ids": convs[0][:start], "chosen_ids": convs[0][start:], "rejected_ids": convs[1][start:]})
    types, weights = ([loss_type, "sft"], [1.0, rpo_alpha]) if rpo_alpha else ([loss_type], None)
    args = TrlConfig(output_dir=str(exported[2] / "trl"), beta=beta, loss_type=types, loss_weights=weights,
                     report_to="none", use_cpu=True, bf16=False, fp16=False)
    trainer = DPOTrainer(model=hf_policy, ref_model=hf_reference, args=args, processing_class=exported[1],
                         train_dataset=Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]}))
    trainer.model.train()  # dropout is 0: "train" only selects where trl files its metrics
    inputs = DataCollatorForPreference(pad_token_id=EOT)(examples)
    trl_loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False).item()
    trl = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    x, y = pair_rows(ids, mask, offsets, pairs, "cpu")
    with torch.no_grad():
        ref = sequence_logps(reference, x, y)[0]
        loss_sum, figures = DPOLoss(beta, loss_type, rpo_alpha=rpo_alpha)(policy, (x, y, ref))
    assert abs(loss_sum.item() / len(pairs) - trl_loss) < 1e-4, (loss_sum.item() / len(pairs), trl_loss)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected"):
        assert abs(figures[name].item() / len(pairs) - trl[name]) < 1e-4, (name, figures[name].item(), trl[name])
    assert abs(trl["rewards/margins"]) > 1e-3  # policy and reference differ: the check has teeth


def test_label_smoothing_is_conservative_dpo():
    logps, ref, n = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0]), torch.tensor([3, 4])
    z = 0.1 * ((-3.0 + 4.0) - (-5.0 + 4.0))
    plain, _ = DPOLoss(0.1).pair_losses(logps, n, ref)
    smoothed, _ = DPOLoss(0.1, label_smoothing=0.2).pair_losses(logps, n, ref)
    sig = torch.nn.functional.logsigmoid
    assert torch.allclose(plain, -sig(torch.tensor(z)))
    assert torch.allclose(smoothed, -0.8 * sig(torch.tensor(z)) - 0.2 * sig(torch.tensor(-z)))


# ------------------------------------------------------------------------------------------------
# End to end: a rule learned, exact resume, torchrun

def rule_following(model, tok, prompts):
    """-> (share of greedy answers that start with RULE, mean probability of RULE's first token as the
    answer's first). A tiny random model's next-token distribution is nearly flat over 50k tokens, so
    temperature-1 samples would need far more steps to show the rule; greedy answers show it in 8.
    tok: the model's tokenizer (load_model's)."""
    first = tok.encode(RULE)[0]
    hits, probability = 0, 0.0
    with torch.no_grad():
        for ids in prompts:
            text = tok.decode(list(generate(model, ids, 4, temperature=0.0, stop_tokens=(tok.end, tok.eot),
                                          n_vocab=tok.n_vocab)))
            hits += text.strip().startswith(RULE)
            probability += model(torch.tensor([ids]))[0][0, -1].softmax(-1)[first].item()
    return hits / len(prompts), probability / len(prompts)


@pytest.mark.slow
def test_reward_accuracy_rises_and_sampled_answers_follow_the_rule(rule_data, full_run):
    log = read_log(full_run)
    accuracy = losses(log, "val_rewards/accuracies")
    assert accuracy[0] <= 0.5 and accuracy[8] >= 0.9, accuracy  # held-out pairs: 0 at the start (all ties)
    assert losses(log, "val_loss")[8] < 0.5 * losses(log, "val_loss")[0]
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert name in log[-2] or name in log[-1]
    prompts = [ids for ids, _ in val_questions(str(rule_data / "data"), 8, 64)[::2]]
    before = rule_following(*load_model(str(rule_data / "start"), verbose=False)[:2], prompts)
    after = rule_following(*load_model(full_run, verbose=False)[:2], prompts)
    assert before[0] == 0 and after[0] == 1, (before, after)  # held-out prompts: every greedy answer follows it
    assert after[1] > 5 * before[1], (before, after)
    assert load_model(full_run, verbose=False)[2]["kind"] == "chat"


@pytest.mark.slow
def test_stop_and_resume_give_the_losses_of_an_uninterrupted_run(rule_data, full_run):
    out = str(rule_data / "resumed")
    common = [f"--data_dir={rule_data / 'data'}", f"--out_dir={out}", "--micro_batch_size=4", *RUN]
    proc = run_dpo(f"--init_from={rule_data / 'start'}", "--stop_step=3", *common)
    assert "stopped at step 3" in proc.stdout + proc.stderr
    run_dpo("--init_from=resume", *common)
    one, two = read_log(full_run), read_log(out)
    for key in ("loss", "rewards/margins", "val_loss", "val_rewards/accuracies"):
        a, b = losses(one, key), losses(two, key)
        assert sorted(a) == sorted(b) and a, key
        for step in a:
            assert abs(a[step] - b[step]) < 1e-6, (key, step, a[step], b[step])


@pytest.mark.slow
def test_torchrun_two_processes_match_one(rule_data, full_run):
    out = str(rule_data / "ddp")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = run_dpo(f"--data_dir={rule_data / 'data'}", f"--init_from={rule_data / 'start'}", f"--out_dir={out}",
                   "--micro_batch_size=2", *RUN, launcher=torchrun)
    assert "2 accumulation steps x 2 process(es)" in proc.stdout
    one, two = read_log(full_run), read_log(out)
    for key in ("loss", "grad_norm", "rewards/accuracies", "val_loss", "val_rewards/margins"):
        a, b = losses(one, key), losses(two, key)
        assert sorted(a) == sorted(b) and a, key
        # step 1 scores the starting weights: every reward is 0 up to rounding (which differs with the
        # padding of each process's batches), so "chosen > rejected" is a coin toss there
        for step in [s for s in a if key != "rewards/accuracies" or s > 1]:
            assert abs(a[step] - b[step]) < 1e-5, (key, step, a[step], b[step])


# ------------------------------------------------------------------------------------------------
# Bad input

@pytest.mark.slow
def test_bad_inputs_give_their_messages(rule_data, full_run, tmp_path, monkeypatch, capsys):
    source = write_jsonl(tmp_path / "broken.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"},
                                                      {"prompt": "a", "chosen": "b"}])
    with pytest.raises(InstructDataError, match=r"broken\.jsonl, record 1: missing field 'rejected' \(line 2;"):
        prepare_pairs([source], tmp_path / "x", "--on_bad_record=error")
    # in-process (dpo.main raises what run_main prints as one `error:` line): no val pairs and SFT data are
    # refused before the model loads; a base model to start from gets a warning (then the run is refused
    # here, as its out_dir holds a run, so no training is needed)
    def main(*args):
        monkeypatch.setattr(sys, "argv", ["dpo.py", *TINY, *args])
        dpo.main()

    save_start(tmp_path / "base", kind="base")
    no_val = tmp_path / "no_val"
    prepare_pairs([write_jsonl(tmp_path / "p.jsonl", rule_pairs(6))], no_val, "--val_fraction=0")
    with pytest.raises(SFTDataError, match="the val split of .* holds no preference pairs"):
        main(f"--data_dir={no_val}", f"--init_from={tmp_path / 'base'}", f"--out_dir={tmp_path / 'o'}")
    capsys.readouterr()
    with pytest.raises(ConfigError, match="already holds a run"):
        main(f"--data_dir={rule_data / 'data'}", f"--init_from={tmp_path / 'base'}", f"--out_dir={full_run}")
    assert f"warning: {tmp_path / 'base'} is a base model" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="already holds a run"):
        main(f"--data_dir={rule_data / 'data'}", f"--init_from={rule_data / 'start'}", f"--out_dir={full_run}")
    assert "warning" not in capsys.readouterr().out  # a chat model: no warning
    sft = tmp_path / "sft"
    chats = write_jsonl(tmp_path / "c.jsonl", [{"instruction": "a", "output": "b"}])
    prepare(load_config(InstructConfig, [f"--sources={chats}", f"--data_dir={sft}", "--val_fraction=0"]))
    with pytest.raises(SFTDataError, match="holds instruction data, not preference pairs"):
        main(f"--data_dir={sft}", f"--init_from={rule_data / 'start'}", f"--out_dir={tmp_path / 'o3'}")
