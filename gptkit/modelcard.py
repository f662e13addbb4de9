"""
A Hugging Face Hub model card for an export, filled from the run that made it, and the upload.

    facts = run_facts(model, tok, ckpt, run_dir)   # parameters, tokens, val loss, HellaSwag, benchmarks: the run's log, eval_results.json
    write_model_card(out_dir, facts, repo_id="me/tiny", license="mit", datasets=[], language=["en"])
    push_to_hub(out_dir, "me/tiny")                # HfApi.create_repo + upload_folder

The card is the folder's README.md: YAML metadata the Hub reads (license, datasets, language,
pipeline_tag, tags, and the HellaSwag result as model-index), then the run's numbers, its loss plot
(loss.png beside it), the benchmark scores (the training loop's last eval_tasks from log.jsonl and
eval.py's eval_results.json beside the run, each with its items, few-shot and prompt format), the
chat format and how to use the model from transformers and gptkit.
"""

import os

import huggingface_hub
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from gptkit.configurator import ConfigError, UserError
from gptkit.data import read_prepare_state
from gptkit.files import atomic_write
from gptkit.lock import LOCK_NAME
from gptkit.plot import (HELLASWAG_KEY, draw_runs, main_metric, main_task_keys, read_eval_results, read_log,
                         read_run, series)

LOSS_PLOT = "loss.png"


class HubError(UserError, RuntimeError):
    """An upload that could not happen; the export folder itself is complete."""


def _last(records, key):
    steps, values = series(records, key)
    return (steps[-1], values[-1]) if steps else (None, None)


def shots_text(num_fewshot):
    """The card's words for a num_fewshot setting (-1 or absent: each task's own number)."""
    return str(num_fewshot) if isinstance(num_fewshot, int) and num_fewshot >= 0 else "the task's own"


def train_task_scores(records, config, kind):
    """The last train-time eval_tasks scores in the log (eval/TASK/METRIC) -> the card's benchmark rows."""
    rows = []
    for task, key in main_task_keys(dict.fromkeys(k for r in records for k in r)).items():
        step, value = _last(records, key)
        if step is not None:
            limit, shots = config.get("eval_tasks_limit") or 0, config.get("eval_tasks_num_fewshot", -1)
            rows.append({"task": task, "metric": key.rsplit("/", 1)[1], "value": value, "step": step,
                         "items": f"first {limit:,}" if limit else "all", "shots": shots_text(shots),
                         "format": "chat" if kind == "chat" else "plain text", "by": "training (eval_tasks)"})
    return rows


# what an entry of eval.py's results holds beside its metrics
RESULT_FIELDS = {"items", "step", "limit", "num_fewshot", "seconds"}


def eval_script_scores(run_dir):
    """eval.py's results beside the run (eval_results.json) -> the card's benchmark rows."""
    rows = []
    for task, entry in read_eval_results(run_dir).items():
        metrics = [k for k, v in entry.items() if k not in RESULT_FIELDS and isinstance(v, (int, float))
                   and not isinstance(v, bool)]
        if not metrics:
            continue
        metric = main_metric(metrics)
        items = entry.get("items")  # the items scored; absent for an aggregate (centered_mean)
        rows.append({"task": task, "metric": metric, "value": entry[metric], "step": entry.get("step"),
                     "items": f"{items:,}" if isinstance(items, int) else "-",
                     "shots": shots_text(entry.get("num_fewshot")),
                     "format": "chat" if entry.get("chat_format") else "plain text",
                     "by": f"eval.py, {entry['date']}" if entry.get("date") else "eval.py"})
    return rows


def run_facts(model, tok, ckpt, run_dir):
    """What the card reports, read from the checkpoint and <run_dir>/log.jsonl (absent: left out).
    tok: the model's tokenizer (the one the export writes), whose ids the card states."""
    config = ckpt.get("config") or {}
    log_path = os.path.join(run_dir, "log.jsonl")
    records = read_log(log_path) if os.path.exists(log_path) else []
    val_step, val_loss = _last(records, "val_loss")
    hellaswag_step, hellaswag = _last(records, HELLASWAG_KEY)
    source = None
    data_dir = config.get("data_dir")
    if data_dir and os.path.isdir(data_dir):
        source = ((read_prepare_state(data_dir) or {}).get("settings") or {}).get("source")
    return {
        "kind": ckpt.get("kind", "base"),
        "preference_tuned": "beta" in config,  # dpo.py's run config: a chat model tuned on preference pairs
        "tokenizer": {"hash": tok.hash, "n_vocab": tok.n_vocab, "controls": tok.controls},
        "parameters": model.num_params(),
        "model_config": model.config.to_dict(),
        "step": ckpt.get("step"),
        "tokens_seen": ckpt.get("tokens_seen"),
        "val_loss": val_loss, "val_step": val_step,  # a dpo.py run's is its DPO loss on held-out pairs
        "val_reward_accuracy": _last(records, "val_rewards/accuracies")[1],
        "hellaswag_acc_norm": hellaswag, "hellaswag_step": hellaswag_step,
        "hellaswag_items": config.get("hellaswag_limit") or None,  # 0: all of the val set
        "hellaswag_data": config.get("hellaswag_data") or "",  # empty: the official val file
        "system": config.get("system", "") if ckpt.get("kind") == "chat" else "",
        "init_from": config.get("init_from"),
        "data_source": source,
        "run_dir": run_dir,
        "has_loss_curve": bool(series(records, "loss")[0] or series(records, "val_loss")[0]),
        # lm-evaluation-harness scores: the training loop's last eval_tasks, then eval.py's (if it ran)
        "benchmarks": train_task_scores(records, config, ckpt.get("kind", "base")) + eval_script_scores(run_dir),
    }


def hub_datasets(facts, datasets):
    """The card's datasets: those given, else the Hub dataset the run's shards were prepared from."""
    if datasets:
        return list(datasets)
    source = facts["data_source"]
    # a Hub name is owner/name and no file here; a local folder stays out of the metadata
    if source and source.count("/") == 1 and not os.path.exists(source) and not source.startswith((".", "~")):
        return [source]
    return []


def card_data(facts, repo_id, license, datasets, language, adapter=None):
    """The YAML metadata, as huggingface_hub's ModelCardData (adapter: a peft adapter folder's)."""
    name = repo_id.split("/")[-1] if repo_id else os.path.basename(os.path.normpath(facts["run_dir"]))
    results = []
    if facts["hellaswag_acc_norm"] is not None:
        results.append(EvalResult(task_type="text-generation", task_name="Text Generation",
                                  dataset_type="Rowan/hellaswag", dataset_name="HellaSwag", dataset_split="validation",
                                  metric_type="acc_norm", metric_value=round(facts["hellaswag_acc_norm"], 4)))
    tags = ["gptkit", "gpt2", "causal-lm"] + (["chat", "conversational"] if facts["kind"] == "chat" else [])
    tags += ["lora", "peft"] if adapter else []
    return ModelCardData(license=license, datasets=hub_datasets(facts, datasets) or None, language=language,
                         library_name="peft" if adapter else "transformers", pipeline_tag="text-generation", tags=tags,
                         model_name=name, eval_results=results or None)


def tokenizer_text(tok):
    """The card's words for the model's tokenizer (facts["tokenizer"])."""
    controls = ", ".join(f"`{t}` {i}" for t, i in tok["controls"].items())
    if tok["hash"] == "gpt2":
        return f"GPT-2's BPE plus 4 chat tokens: {tok['n_vocab']:,} ids, control tokens {controls}"
    return (f"byte-level BPE trained with gptkit's train_tokenizer.py (`{tok['hash']}`, in tokenizer.json): "
            f"{tok['n_vocab']:,} ids, control tokens {controls}")


def _numbers(facts):
    c = facts["model_config"]
    rows = [("parameters", f"{facts['parameters']:,} (tied input/output embeddings)"),
            ("architecture", f"GPT-2: {c['n_layer']} layers, {c['n_head']} heads, {c['n_embd']} wide, "
                             f"context {c['block_size']} tokens, vocabulary {c['vocab_size']}"),
            ("tokenizer", tokenizer_text(facts["tokenizer"])),
            ("kind", "base model (pretrained)" if facts["kind"] != "chat" else
             "chat model (finetuned with finetune.py, then preference-tuned with dpo.py)" if facts["preference_tuned"]
             else "chat model (finetuned with finetune.py)")]
    if facts["tokens_seen"] is not None:
        this = " (this preference tuning)" if facts["preference_tuned"] else " (this finetune)"
        steps = f"{facts['step']:,} step{'' if facts['step'] == 1 else 's'}"
        rows.append(("tokens trained", f"{facts['tokens_seen']:,} in {steps}" + (this if facts["kind"] == "chat" else "")))
    if facts["val_loss"] is not None:
        rows.append(("final val DPO loss" if facts["preference_tuned"] else "final val loss",
                     f"{facts['val_loss']:.4f} (step {facts['val_step']:,})"))
    if facts["preference_tuned"] and facts["val_reward_accuracy"] is not None:
        rows.append(("val reward accuracy", f"{facts['val_reward_accuracy']:.4f} (held-out pairs whose chosen "
                                            "answer gained more than the rejected one; chance is 0.5)"))
    if facts["hellaswag_acc_norm"] is not None:
        items = f"{facts['hellaswag_items']:,} items" if facts["hellaswag_items"] else "the full val set"
        if facts["hellaswag_data"]:  # a file of the user's: say which, the official one is the default
            items += f" of `{os.path.basename(facts['hellaswag_data'])}`"
        rows.append(("HellaSwag acc_norm", f"{facts['hellaswag_acc_norm']:.4f} on {items} "
                                           f"(step {facts['hellaswag_step']:,}; chance is 0.25)"))
    if facts["kind"] == "chat" and facts["init_from"]:
        rows.append(("preference-tuned from" if facts["preference_tuned"] else "finetuned from",
                     f"`{facts['init_from']}`"))
    return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def benchmarks_text(benchmarks):
    """The card's table of lm-evaluation-harness scores, each row saying on what it was computed."""
    lines = ["## Benchmarks", "",
             "lm-evaluation-harness tasks (gptkit/harness.py: the harness's prompts and metrics), each task's "
             "headline metric; items: how many of the task's items were scored.", "",
             "| task | metric | score | items | few-shot | prompts | step | scored by |",
             "|---|---|---|---|---|---|---|---|"]
    for row in benchmarks:
        step = f"{row['step']:,}" if isinstance(row["step"], int) else "-"
        lines.append(f"| {row['task']} | {row['metric']} | {row['value']:.4f} | {row['items']} | {row['shots']} | "
                     f"{row['format']} | {step} | {row['by']} |")
    return "\n".join(lines)


def card_body(facts, repo_id):
    """The Markdown under the metadata."""
    where = repo_id or "path/to/this/folder"
    name = repo_id or os.path.basename(os.path.normpath(facts["run_dir"]))
    chat = facts["kind"] == "chat"
    parts = [f"# {name}",
             "A GPT-2-style language model trained from scratch with gptkit. Numbers from the training run:",
             _numbers(facts)]
    if facts["has_loss_curve"]:
        parts.append(f"![train and val loss against tokens trained]({LOSS_PLOT})")
    if facts["benchmarks"]:
        parts.append(benchmarks_text(facts["benchmarks"]))
    if chat:
        system = facts["system"]
        ids = facts["tokenizer"]["controls"]
        parts.append("## Chat format\n\nSpecial tokens " + ", ".join(f"`{t}` (id {i})" for t, i in ids.items())
                     + "; a conversation is\n"
                     "`<|endoftext|><|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>`, and the model's\n"
                     "turn ends with `<|end|>`. The tokenizer's chat template renders exactly this"
                     + (f", and puts the system prompt the model was finetuned with first when a chat brings none:"
                        f"\n\n```\n{system}\n```" if system else "."))
        snippet = ("messages = [{\"role\": \"user\", \"content\": \"Name three fruits.\"}]\n"
                   "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\",\n"
                   "                                       return_dict=True)\n"
                   "out = model.generate(**inputs, max_new_tokens=100, do_sample=True, temperature=0.8, top_k=50)\n"
                   "print(tokenizer.decode(out[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))")
        gptkit = f"python sample.py --ckpt={where}    # chat in the terminal"
    else:
        snippet = ("ids = tokenizer(\"The meaning of life is\", return_tensors=\"pt\").input_ids\n"
                   "out = model.generate(ids, max_new_tokens=50, do_sample=True, temperature=0.8, top_k=50)\n"
                   "print(tokenizer.decode(out[0]))")
        gptkit = f"python sample.py --ckpt={where} --prompt=\"The meaning of life is\""
    parts.append("## Use with transformers\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
                 f"tokenizer = AutoTokenizer.from_pretrained({where!r})\n"
                 f"model = AutoModelForCausalLM.from_pretrained({where!r})\n{snippet}\n```")
    if chat:
        parts.append("transformers' tokenizer turns control-token text inside a message (someone typing `<|user|>`)\n"
                     "into the control token; remove such strings from untrusted input before `apply_chat_template`.")
    local = repo_id.split("/")[-1] if repo_id else where  # gptkit's scripts read a local folder
    parts.append("## Use with gptkit\n\n```bash\n"
                 + (f"hf download {repo_id} --local-dir {local}\n" if repo_id else "")
                 + gptkit.replace(where, local) + "\n"
                 + (f"python eval_hellaswag.py --ckpt={local}" if chat else
                    f"python finetune.py config/dolly.py --init_from={local}   # into a chat model")
                 + "\n```")
    return "\n\n".join(parts) + "\n"


def adapter_card_body(facts, repo_id, adapter):
    """The Markdown of a peft adapter folder's card: what the adapters are, their base, how to load them."""
    where = repo_id or "path/to/this/folder"
    name = repo_id or os.path.basename(os.path.normpath(facts["run_dir"]))
    modules = ", ".join(f"`{m}`" for m in adapter.module_names())
    parts = [f"# {name}",
             f"LoRA adapters (rank {adapter.rank}, alpha {adapter.alpha:g}, on {modules} of every block) for "
             f"the GPT-2-style model `{adapter.base}`, trained with gptkit. Numbers from the training run:",
             _numbers(facts)]
    if facts["has_loss_curve"]:
        parts.append(f"![train and val loss against tokens trained]({LOSS_PLOT})")
    parts.append("## Use with peft\n\nThe adapters go on the base model's own export "
                 f"(`python export_hf.py --ckpt={adapter.base} --out=BASE`):\n\n"
                 "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
                 f"tokenizer = AutoTokenizer.from_pretrained({where!r})\n"
                 f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(\"BASE\"), {where!r})\n```\n\n"
                 "`export_hf.py --merge_lora=True` on the same run writes the merged model instead: one folder "
                 "that transformers loads alone.")
    return "\n\n".join(parts) + "\n"


def write_model_card(out_dir, facts, repo_id="", license="mit", datasets=(), language=("en",), adapter=None):
    """README.md (and loss.png when the run logged a loss) in out_dir -> the file names written.
    adapter: the LoRASettings of a peft adapter folder, whose card says so and names the base."""
    import matplotlib.pyplot as plt  # here, not at the top: after draw_runs has chosen the Agg backend
    written, plot_path = [], os.path.join(out_dir, LOSS_PLOT)
    run = None
    if facts["has_loss_curve"]:
        try:
            run = read_run(facts["run_dir"])
        except ConfigError:  # a log the plot cannot place on a token axis: the card goes without it
            facts = {**facts, "has_loss_curve": False}
    if run is not None:
        fig = draw_runs([run])
        atomic_write(plot_path, lambda f: fig.savefig(f, format="png", dpi=120))
        plt.close(fig)
        written.append(LOSS_PLOT)
    elif os.path.exists(plot_path):
        os.remove(plot_path)  # an earlier export's: not this model's curve
    metadata = card_data(facts, repo_id, license, list(datasets), list(language), adapter).to_yaml()
    body = adapter_card_body(facts, repo_id, adapter) if adapter else card_body(facts, repo_id)
    card = ModelCard(f"---\n{metadata}\n---\n\n{body}")  # parses it back: a bad card fails here
    atomic_write(os.path.join(out_dir, "README.md"), lambda f: f.write(str(card).encode("utf-8")))
    return written + ["README.md"]


def push_to_hub(folder, repo_id, private=False, space=False):
    """Upload folder to the Hub repo repo_id (created if needed) -> its URL: a model repo, or with
    space=True a Docker Space (gptkit/space.py's folder). No token, no network or a refusal: HubError,
    one line that says what to do; the folder is untouched either way."""
    repo_type = "space" if space else "model"
    url = f"https://huggingface.co/{'spaces/' if space else ''}{repo_id}"
    again = (f"the export in {folder} is complete; upload it later with: "
             f"hf upload {'--repo-type=space ' if space else ''}{repo_id} {folder} .")
    if not huggingface_hub.get_token():
        raise HubError(f"no Hugging Face token, so nothing was uploaded: log in with `hf auth login` "
                       f"(or set HF_TOKEN to a write token from https://huggingface.co/settings/tokens); {again}")
    api = huggingface_hub.HfApi()
    try:
        extra = {"space_sdk": "docker"} if space else {}  # a new Space must name its SDK
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True, **extra)
        # the export's own .gptkit.lock (held while export_hf.py runs) is no part of the model
        api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type=repo_type,
                          commit_message="Upload a gptkit export", ignore_patterns=[f"**/{LOCK_NAME}", LOCK_NAME])
    except Exception as e:  # network down, token refused, name taken: all said the same way
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubError(f"could not upload to {url} ({type(e).__name__}: {reason}): "
                       f"check the network and that your token may write there; {again}") from e
    return url
