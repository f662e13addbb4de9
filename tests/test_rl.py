"""rl.py and gptkit/grpo.py: the advantages and the loss equal trl's GRPOTrainer on the same prompts,
answers and model; the rewards; bad input; and the toy task end to end (pass@1 rises)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from gptkit.configurator import ConfigError, load_config
from gptkit.engine import Engine, Job, answer_all
from gptkit.grpo import GRPOLoss, Reference, RolloutLoader, Sampler, Task, group_advantages
from gptkit.losses import token_logps
from gptkit.hf import export_hf
from gptkit.rewards import RewardError, answer_format, check_reward, exact_match, final_number, gsm8k, load_reward
from gptkit.system import setup_runtime
from gptkit.tokenizer import load_tokenizer
from gptkit.train_config import RLConfig
from model import GPT, GPTConfig

TOK = load_tokenizer("gpt2")


def letter_count(prompt, completion, row):
    """A reward that varies between random answers (a random model is never right): the test's."""
    return float(sum(c in "aeiou" for c in completion) % 4)


# ------------------------------------------------------------------------------------------------
# Rewards

def test_rewards():
    row = {"question": "?", "answer": "She pays 3 + 4 = 7 dollars.\n#### 1,200"}
    assert final_number(row["answer"]) == "1200"
    assert gsm8k("?", "so the answer is 1200.", row) == 1.0
    assert gsm8k("?", "It is 1200 or 5", row) == 0.0  # the last number counts
    assert gsm8k("?", "#### 1200.0", row) == 1.0
    assert gsm8k("?", "no number", row) == 0.0
    assert gsm8k("?", "12", {"answer": "no marker, ends on 12"}) == 1.0
    assert exact_match("?", " p l e k\n", {"answer": "p l e k"}) == 1.0
    assert exact_match("?", "p l e", {"answer": "p l e k"}) == 0.0
    assert answer_format("?", "3 + 4 = 7\n#### 7", {}) == pytest.approx(0.1)
    assert answer_format("?", "7", {}) == 0.0
    assert load_reward("gsm8k") is gsm8k


def test_user_reward_and_bad_rewards(tmp_path):
    (tmp_path / "mine.py").write_text("def short(prompt, completion, row):\n    return len(completion) < 5\n"
                                      "def broken(prompt, completion, row):\n    return row['missing']\n"
                                      "def text(prompt, completion, row):\n    return 'yes'\n")
    short = load_reward(f"{tmp_path / 'mine.py'}:short")
    assert check_reward("short", short, "p", "abc", {}) == 1.0  # a bool counts as a number
    with pytest.raises(RewardError, match=r"reward broken on the prompt 'What is 2\+2\?' raised KeyError"):
        check_reward("broken", load_reward(f"{tmp_path / 'mine.py'}:broken"), "What is 2+2?", "4", {})
    with pytest.raises(RewardError, match="returned 'yes': a reward must be a finite number"):
        check_reward("text", load_reward(f"{tmp_path / 'mine.py'}:text"), "p", "4", {})
    for spec, message in ((f"{tmp_path / 'mine.py'}:nothing", "has no function nothing"),
                          ("no_such_module_xyz:f", "importing no_such_module_xyz failed"),
                          ("gsm9k", "use a built-in"), (f"{tmp_path / 'gone.py'}:f", "no file")):
        with pytest.raises(ConfigError, match=message):
            load_reward(spec)


def test_rl_config_checks():
    cfg = load_config(RLConfig, [os.path.join(ROOT, "config/rl_gsm8k.py")])
    assert cfg.reward == ["gsm8k"] and cfg.loss_type == "dapo" and cfg.beta == 0.0
    for bad, message in ((["--group_size=1"], "2 answers per prompt"), (["--loss_type=ppo"], "use dapo, grpo or dr_grpo"),
                         (["--micro_batch_size=48"], "not a multiple of micro_batch_size=48"),
                         (["--max_new_tokens=2000"], "between 1 and block_size - 1"),
                         (["--scale_rewards=max"], "use group, batch or none"), (["--init_from=scratch"], "improves a chat model")):
        with pytest.raises(ConfigError, match=message):
            load_config(RLConfig, bad)


# ------------------------------------------------------------------------------------------------
# The engine hands back every sampled id, the stop token included

def test_answers_carry_their_ids():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64), verbose=False)
    engine = Engine(model, TOK, max_batch=4, context=40)
    prompt = TOK.encode("Hello there")
    try:
        (answers,) = answer_all(engine, [Job(prompt, 12, (TOK.eot,), n=3, seed=5, temperature=1.0)], answers=True)
    finally:
        engine.close()
    for a in answers:
        assert a.finish_reason in ("stop", "length") and 1 <= len(a.ids) <= 12
        shown = a.ids[:-1] if a.finish_reason == "stop" else a.ids
        assert a.ids[-1] == TOK.eot if a.finish_reason == "stop" else TOK.eot not in a.ids
        assert TOK.decode(shown) == a.text


# ------------------------------------------------------------------------------------------------
# trl as the oracle: the same prompts, answers, rewards and model through GRPOTrainer

class Settings:
    """The RLConfig keys the loader reads, for an in-process round."""

    def __init__(self, **kw):
        self.__dict__.update(dict(prompts_per_step=3, group_size=4, micro_batch_size=12, max_new_tokens=10,
                                  temperature=0.8, top_k=0, top_p=1.0, num_iterations=1, scale_rewards="group",
                                  seed=3), **kw)


@pytest.fixture(scope="module")
def policy_and_export(tmp_path_factory):
    from transformers import AutoTokenizer, GPT2LMHeadModel  # a test-only dependency: the trl comparison's
    folder = tmp_path_factory.mktemp("hf")
    torch.manual_seed(1)
    ours = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, bias=True), verbose=False)
    export_hf(ours, str(folder / "policy"), TOK, chat=True)
    return ours, GPT2LMHeadModel.from_pretrained(str(folder / "policy")), AutoTokenizer.from_pretrained(str(folder / "policy")), folder


def one_round(model, settings, prompts):
    """One RolloutLoader round on the CPU -> (its one micro-batch, the tasks, the loss)."""
    rt = setup_runtime("cpu", "float32", 0)
    tasks = [Task(p, {"answer": "a e"}, TOK.render_prompt([{"role": "user", "content": p}])) for p in prompts]
    sampler = Sampler(model, TOK, rt, [("letter_count", letter_count)], rows=12, context=64, max_queue=12)
    loss = GRPOLoss(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature)
    loader = RolloutLoader(sampler, Reference(model, None), tasks, loss, settings, rt)
    try:
        batch = loader.next_batch()
    finally:
        sampler.close()
    return batch, tasks, rt


def test_a_resumed_run_takes_its_reference_from_the_start(policy_and_export, tmp_path):
    import rl
    from gptkit.lora import LoRASettings, apply_lora
    ours, _, _, folder = policy_and_export
    rt = setup_runtime("cpu", "float32", 0)
    resume = load_config(RLConfig, ["--data=x.jsonl", "--init_from=resume"])
    saved = lambda path: {"loader": {"reference": str(path)}}  # noqa: E731 (what the checkpoint keeps)
    # the resumed policy: other weights, the same shape (dropout aside: the finetune that made the start had some)
    moved = GPT(GPTConfig(**{**ours.config.to_dict(), "dropout": 0.1}), verbose=False)
    reference = rl.reference_of(resume, saved(folder / "policy"), moved, rt)
    assert torch.equal(reference.copy.lm_head.weight, ours.lm_head.weight)
    assert not torch.equal(reference.copy.lm_head.weight, moved.lm_head.weight)
    assert rl.reference_of(load_config(RLConfig, ["--data=x.jsonl"]), None, moved, rt).copy is not moved  # a new run's own start
    gone = saved(tmp_path / "gone")
    assert torch.equal(rl.reference_of(resume, gone, moved, rt).copy.lm_head.weight, moved.lm_head.weight)  # beta 0: a note
    with_kl = load_config(RLConfig, ["--data=x.jsonl", "--init_from=resume", "--beta=0.04"])
    with pytest.raises(ConfigError, match="--beta=0"):  # the loss needs the start: no stand-in
        rl.reference_of(with_kl, gone, moved, rt)
    lora = apply_lora(GPT(ours.config, verbose=False), LoRASettings(rank=2))
    assert rl.reference_of(with_kl, gone, lora, rt).copy is None  # LoRA: its adapters off, nothing to load
    other = GPT(GPTConfig(n_layer=1, n_head=4, n_embd=64, block_size=64, bias=True), verbose=False)
    with pytest.raises(ConfigError, match="another shape"):
        rl.reference_of(with_kl, saved(folder / "policy"), other, rt)


def split_rows(x, y):
    """A loader micro-batch's rows -> (prompt ids, answer ids) of each."""
    out = []
    for xr, yr in zip(x.tolist(), y.tolist()):
        start = next(i for i, t in enumerate(yr) if t != -1)
        out.append((xr[:start + 1], [t for t in yr if t != -1]))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("loss_type,beta,scale", [("dapo", 0.0, "group"), ("grpo", 0.04, "group"), ("grpo", 0.0, "group"), ("dapo", 0.04, "group"),
                                                  ("dr_grpo", 0.0, "none"), ("dapo", 0.1, "batch")])
def test_advantages_and_loss_equal_trls(policy_and_export, loss_type, beta, scale):
    from datasets import Dataset  # test-only dependencies, heavy to import: the comparison with trl's
    from trl import GRPOConfig, GRPOTrainer
    ours, hf_model, hf_tok, folder = policy_and_export
    settings = Settings(scale_rewards=scale)
    # prompts of one length: trl left-pads prompts, and transformers' GPT-2 then starts the padded rows'
    # positions at the padding (a quirk of the pair, not of the objective), so the oracle gets none
    prompts = ["Name a fruit", "Say a word", "Count to three"]
    assert len({len(TOK.encode(p)) for p in prompts}) == 1
    batch, tasks, rt = one_round(ours, settings, prompts)
    x, y, advantages, ref, _, figures = batch
    rows = split_rows(x, y)
    G = settings.group_size
    by_ids = {tuple(t.ids): t.prompt for t in tasks}
    order = [by_ids[tuple(rows[g * G][0])] for g in range(len(tasks))]  # the loader's shuffle
    assert sorted(order) == sorted(prompts)
    assert [p for p, _ in rows] == [TOK.render_prompt([{"role": "user", "content": p}]) for p in order for _ in range(G)]

    def rollout(trl_prompts, trainer):  # trl's generation step, given our answers
        return {"prompt_ids": [p for p, _ in rows], "completion_ids": [c for _, c in rows],
                "logprobs": [[0.0] * len(c) for _, c in rows]}

    def trl_reward(prompts, completions, **kw):
        return [letter_count(p, c, {}) for p, c in zip(prompts, completions)]

    args = GRPOConfig(output_dir=str(folder / "trl"), per_device_train_batch_size=len(rows), num_generations=G,
                      gradient_accumulation_steps=1, max_completion_length=settings.max_new_tokens, beta=beta,
                      loss_type=loss_type, scale_rewards=scale, temperature=settings.temperature, epsilon=0.2,
                      report_to="none", use_cpu=True, bf16=False, fp16=False)
    os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
    trainer = GRPOTrainer(model=hf_model, reward_funcs=trl_reward, args=args, processing_class=hf_tok,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), rollout_func=rollout)
    trainer.model.train()  # dropout is 0: "train" only selects trl's normalisation and metrics
    trainer.current_gradient_accumulation_steps = 1  # what trl's training loop sets: one micro-batch per step
    inputs = [{"prompt": p} for p in order for _ in range(G)]
    out = trainer._generate_and_score_completions(inputs)
    assert out["completion_ids"].shape[0] == len(rows)
    # the same rewards (trl decodes the answers itself) and the same advantages
    trl_rewards = torch.tensor(trainer._logs["rewards"]["trl_reward"])
    assert torch.allclose(trl_rewards.view(-1, G).mean(), figures["reward"] / float(y.ne(-1).sum()), atol=1e-6)
    assert advantages.abs().max() > 0.1  # the groups' rewards differ: the check has teeth
    assert torch.allclose(advantages, out["advantages"].float(), atol=1e-5), (advantages, out["advantages"])

    # the loss, with a sampling policy that differs from the current one so that the clip acts
    mask = out["completion_mask"].bool()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        current = token_logps(ours, x, y, settings.temperature)
    shift = torch.randn(y.shape, generator=generator) * 0.3
    old = torch.where(y != -1, current + shift, torch.zeros_like(current))
    ours_old = torch.zeros_like(out["completion_mask"], dtype=torch.float32)
    ours_ref = torch.zeros_like(ours_old)
    for i, (p, c) in enumerate(rows):  # our rows' answer positions -> trl's right-padded answer columns
        cols = torch.arange(len(c))
        ours_old[i, cols] = old[i, len(p) - 1 + cols]
        ours_ref[i, cols] = ref[i, len(p) - 1 + cols] - 0.2 * torch.rand(len(c), generator=generator)
        ref[i, len(p) - 1 + cols] = ours_ref[i, cols]  # a reference that differs from the policy: KL > 0
    out["old_per_token_logps"] = ours_old
    if beta:
        out["ref_per_token_logps"] = ours_ref
    loss_fn = GRPOLoss(loss_type, 0.2, 0.2, beta, settings.temperature, settings.max_new_tokens)
    hf_model.zero_grad()
    trl_loss = trainer._compute_loss(trainer.model, out)
    trl_loss.backward()
    ours.zero_grad()
    loss_sum, stats = loss_fn(ours, (x, y, advantages, ref, old, {}))
    loss = loss_sum / loss_fn.count((x, y)).float()
    loss.backward()
    assert abs(loss.item() - trl_loss.item()) < 1e-5, (loss.item(), trl_loss.item())
    trl_clip = trainer._metrics["train"]["clip_ratio/region_mean"][-1]
    assert stats["clip_ratio"].item() / loss_fn.count((x, y)).item() > 0  # some tokens clipped
    assert abs(float(mask.sum()) - float(y.ne(-1).sum())) == 0
    # the gradients too: the same log-probs, through the same weights (Conv1D in transformers: transposed)
    ours_grad = ours.transformer.h[0].attn.c_attn.weight.grad
    trl_grad = hf_model.transformer.h[0].attn.c_attn.weight.grad.t()
    assert torch.allclose(ours_grad, trl_grad, atol=1e-6, rtol=1e-4), (ours_grad - trl_grad).abs().max()
    assert ours_grad.abs().max() > 1e-4
    if loss_type == "dapo":
        assert abs(stats["clip_ratio"].item() / float(mask.sum()) - trl_clip) < 1e-5


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    a = group_advantages(rewards)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()  # unbiased, as trl's
    assert torch.allclose(a[0], (rewards[0] - 0.5) / (std + 1e-4)) and a[1].abs().max() == 0  # one reward: no signal
    assert torch.allclose(group_advantages(rewards, "none")[0], rewards[0] - 0.5)


# ------------------------------------------------------------------------------------------------
# End to end: the toy task (prepare_toy_task.py -> a tiny SFT model -> rl.py), and bad input

def run(args, cwd, timeout=300, check=True):
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    if check:
        assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def toy_sft(tmp_path_factory):
    """The README's toy pipeline, smaller: 3 letters (the same positions every time: learned in 300
    steps rather than 800), a tiny chat model from scratch that mostly copies (60% of its demonstrations do)."""
    work = tmp_path_factory.mktemp("toy")
    script = lambda name: os.path.join(ROOT, name)  # noqa: E731
    run([script("prepare_toy_task.py"), "--out_dir=data/reverse", "--min_letters=3", "--max_letters=3",
         "--sft_examples=3000", "--rl_prompts=1000", "--val_prompts=100"], work)
    run([script("train_tokenizer.py"), "--source=data/reverse/text.txt", "--vocab_size=261",
         "--out=data/reverse/tokenizer"], work)
    recipe = os.path.join(ROOT, "config/reverse_sft.py")
    run([script("prepare_instruct.py"), recipe, "--tokenizer=data/reverse/tokenizer"], work)
    run([script("finetune.py"), recipe, "--max_steps=300", "--compile=False"], work)
    return work


@pytest.mark.slow
def test_toy_task_end_to_end_raises_pass_at_1(toy_sft):
    # the bar, 20 points on held-out prompts, in 30 steps (measured: 0.15 -> 0.58 -> 0.77);
    # the README-sized run's curve is in docs/benchmarks.md
    run([os.path.join(ROOT, "rl.py"), os.path.join(ROOT, "config/reverse_rl.py"), "--val_prompts=100",
         "--max_steps=30", "--eval_interval=15", "--compile=False", "--questions=0"], toy_sft)
    records = [json.loads(line) for line in open(toy_sft / "out/reverse_rl/log.jsonl")]
    passes = [r["pass@1"] for r in records if "pass@1" in r]
    assert len(passes) == 3 and passes[0] < 0.5, passes  # greedy, the SFT model mostly copies
    assert passes[-1] >= passes[0] + 0.2, passes
    steps = [r for r in records if "reward" in r]
    assert len(steps) == 30 and all(k in steps[0] for k in ("kl", "clip_ratio", "completions/mean_length"))
    assert any(r["reward_std"] > 0 for r in steps) and max(r["kl"] for r in steps) > 0  # signal, and the model moved


@pytest.mark.slow
def test_stop_and_resume_give_the_figures_of_an_uninterrupted_run(toy_sft):
    """--stop_step then --init_from=resume: the same samples, rewards, losses and pass@1, and the kl is
    still to the starting model (reloaded from the path the checkpoint keeps), not to the resumed weights."""
    common = [os.path.join(ROOT, "rl.py"), os.path.join(ROOT, "config/reverse_rl.py"), "--max_steps=6",
              "--eval_interval=3", "--val_prompts=20", "--compile=False", "--questions=0", "--ckpt_interval=3",
              "--prompts_per_step=4", "--micro_batch_size=16"]  # small steps: the figures, not the learning, are checked
    run(common + ["--out_dir=out/rl_whole"], toy_sft)
    stopped = run(common + ["--out_dir=out/rl_resumed", "--stop_step=3"], toy_sft)
    assert "stopped at step 3" in stopped.stdout + stopped.stderr
    run(common + ["--out_dir=out/rl_resumed", "--init_from=resume"], toy_sft)
    logs = [[json.loads(line) for line in open(toy_sft / f"out/{name}/log.jsonl")] for name in ("rl_whole", "rl_resumed")]
    for key in ("loss", "reward", "kl", "completions/mean_length", "pass@1"):
        one, two = ({r["step"]: r[key] for r in log if key in r} for log in logs)
        assert sorted(one) == sorted(two) and one, key
        for step in one:
            assert abs(one[step] - two[step]) < 1e-6, (key, step, one[step], two[step])
    assert max(r["kl"] for r in logs[1] if "kl" in r and r["step"] > 3) > 0


@pytest.mark.slow
def test_a_bad_reward_is_one_error_line(toy_sft, tmp_path):
    (tmp_path / "bad_reward.py").write_text("def score(prompt, completion, row):\n    return None\n")
    proc = run([os.path.join(ROOT, "rl.py"), os.path.join(ROOT, "config/reverse_rl.py"), "--max_steps=3",
                f"--reward={tmp_path / 'bad_reward.py'}:score", "--out_dir=out/bad", "--compile=False"],
               toy_sft, check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() + proc.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "returned None" in errors[0] and "Write backwards:" in errors[0], errors


@pytest.mark.slow
def test_lora_on_gsm8k_records_with_the_harness_scoring_gsm8k(tmp_path):
    """rl.py --lora_rank on records in GSM8K's schema (question, answer), the user's own reward by
    module:function, and the harness's gsm8k at the last step: the adapters train (kl to the start,
    which is the adapters off, moves), the checkpoint is a LoRA run's, and plot_log.py draws the scores."""
    from gptkit.plot import Run, score_panels
    from test_eval import GSM8K, _write_jsonl
    torch.manual_seed(0)
    export_hf(GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=256, bias=True), verbose=False),
              str(tmp_path / "start"), TOK, chat=True)
    _write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": q, "answer": a} for q, a in GSM8K * 4])
    (tmp_path / "my_reward.py").write_text("def vowels(prompt, completion, row):\n"
                                          "    return float(sum(c in 'aeiou' for c in completion) % 4)\n")
    evals = tmp_path / "evals"
    _write_jsonl(evals / "openai/gsm8k/main/test.jsonl", [{"question": q, "answer": a} for q, a in GSM8K])
    _write_jsonl(evals / "openai/gsm8k/main/train.jsonl", [{"question": q, "answer": a} for q, a in GSM8K])
    run([os.path.join(ROOT, "rl.py"), f"--data={tmp_path / 'gsm8k.jsonl'}", "--val_data=", "--val_fraction=0.3",
         f"--reward={tmp_path / 'my_reward.py'}:vowels", f"--init_from={tmp_path / 'start'}", "--out_dir=out/lora",
         "--lora_rank=4", "--learning_rate=1e-2", "--min_lr=1e-2", "--warmup_steps=0", "--device=cpu",
         "--block_size=256", "--max_new_tokens=8", "--prompts_per_step=2", "--group_size=4", "--micro_batch_size=8",
         "--max_steps=3", "--eval_interval=3", "--val_prompts=2", "--questions=0", "--compile=False",
         "--eval_tasks=gsm8k", f"--eval_tasks_data={evals}", "--eval_tasks_limit=2", "--eval_tasks_num_fewshot=0",
         "--eval_tasks_max_gen_toks=8"], tmp_path)
    records = [json.loads(line) for line in open(tmp_path / "out/lora/log.jsonl")]
    steps = [r for r in records if "reward" in r]
    # step 1: the adapters start at zero, so the policy is the start (up to the matmuls' rounding, which
    # may differ with a buffer's alignment); then they move it
    assert len(steps) == 3 and steps[0]["kl"] < 1e-6 and max(r["kl"] for r in steps[1:]) > 1e-3, steps
    assert "eval/gsm8k/exact_match_strict-match" in records[-1] and records[-1]["step"] == 3
    ckpt = torch.load(tmp_path / "out/lora/ckpt.pt", weights_only=True)
    assert ckpt["lora"]["rank"] == 4 and all("lora" in name for name in ckpt["model"])
    # plot_log.py's panels: the reward, pass@1 and the harness's score under the loss
    panels = [key for key, _, _ in score_panels([Run("lora", str(tmp_path / "out/lora"), 1, records)])]
    assert panels == ["reward", "pass@1", "eval/gsm8k/exact_match_strict-match"], panels
    run([os.path.join(ROOT, "plot_log.py"), "--out_dir=out/lora"], tmp_path)
    assert (tmp_path / "out/lora/loss.png").stat().st_size > 0


def test_toy_task_copies_the_share_it_is_asked_to(tmp_path):
    import prepare_toy_task
    from gptkit.configurator import load_config
    out = tmp_path / "toy"
    prepare_toy_task.main(load_config(prepare_toy_task.ToyTaskConfig, [f"--out_dir={out}", "--sft_examples=1000"]))
    chats = [json.loads(line)["messages"] for line in open(out / "sft.jsonl")]
    letters = [(m[0]["content"].removeprefix(prepare_toy_task.PROMPT), m[1]["content"]) for m in chats]
    copied = sum(a == w for w, a in letters if w != w[::-1])
    reversed_ = sum(a == " ".join(reversed(w.split())) for w, a in letters if w != w[::-1])
    palindromes = sum(w == w[::-1] for w, _ in letters)
    assert copied + reversed_ + palindromes == 1000 and 0.55 < copied / (copied + reversed_) < 0.65
    for rl in ("rl_train.jsonl", "rl_val.jsonl"):  # the prompts rl.py learns and is scored on: always right
        assert all(json.loads(line)["answer"] == " ".join(reversed(json.loads(line)["prompt"].split()[2:]))
                   for line in open(out / rl))
    assert any("sft_copied=1.0" in p for p in prepare_toy_task.ToyTaskConfig(sft_copied=1.0).validate())
