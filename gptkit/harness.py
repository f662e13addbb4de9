"""
Standard benchmarks through EleutherAI's lm-evaluation-harness (ARC, MMLU, PIQA, Winogrande,
HellaSwag, GSM8K, ...) on a gptkit model in memory: the harness owns every task's prompts, answer
parsing and metrics; this module only answers its three questions (log-likelihood, rolling
log-likelihood, greedy generation) with gptkit's model, tokenizer and KV cache. Shared by eval.py
and the training loop.

    from gptkit.harness import evaluate_tasks
    model, tokenizer, meta = load_model("out/dolly", device=rt.device)        # gptkit/loading.py
    scores = evaluate_tasks(model, tokenizer, ["arc_easy", "gsm8k"], rt, limit=100, data_dir="data/evals",
                            chat=True, system_prompt=trained_system_prompt(meta))
    scores["arc_easy"]["acc_norm"], scores["gsm8k"]["exact_match_strict-match"]

The same items give the same per-item results as the harness's own `hf` model on the model's
Hugging Face export (export_hf.py; tests/test_eval.py checks it): the same token ids (GPT-2's BPE,
or the trained tokenizer; a chat prompt's control tokens whole, as the export's tokenizer reads
them), the same left truncation to the context, the same stop rules. Log-likelihoods run batched
(rows of similar length together, padded on the right); generation runs every request through one
continuous batch (gptkit/engine.py, serve.py's), each row at its own length.

Offline: data_dir holds each dataset's splits as local files in the dataset's own schema,
    DATA_DIR/<dataset_path>/<dataset_name>/<split>.jsonl     (or .json, .parquet, .csv)
named as the task's YAML in lm_eval/tasks names them, e.g. allenai/ai2_arc/ARC-Easy/test.jsonl,
openai/gsm8k/main/{train,test}.jsonl, cais/mmlu/abstract_algebra/{dev,test}.jsonl,
Rowan/hellaswag/validation.jsonl (a dataset without a name: no <dataset_name> level).
save_task_data(tasks, DATA_DIR) writes that layout where the hub can be reached; a dataset with no
folder there is read from the hub as usual.
"""

import copy
import functools
import os
import re

import datasets
import torch
import torch.nn.functional as F
from lm_eval import simple_evaluate
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.tasks import TaskManager
from lm_eval.tasks._factory import TaskFactory
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from gptkit.checkpoint import rng_state, set_rng_state
from gptkit.configurator import UserError
from gptkit.engine import Engine, Job, answer_all

# datasets' builder for each kind of local file
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")


class TaskDataError(UserError, ValueError):
    """A task whose data cannot be read; the message says where to put local files."""


def _core(model):
    core = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    return getattr(core, "module", core)       # DDP wrapper


class GptkitLM(TemplateLM):
    """lm-evaluation-harness's model interface over a gptkit GPT and its Tokenizer.

    chat: the harness renders prompts with apply_chat_template (the model's own chat format, with
    system_prompt first when the task brings none, as the export's chat template does) and the
    control-token text in them becomes control tokens. Otherwise prompts are plain text, and
    encode() never yields a control token."""

    def __init__(self, model, tokenizer, rt, batch_size=8, chat=False, system_prompt="", progress=False, seed=1337):
        super().__init__()
        self.model, self.tok, self.rt = model, tokenizer, rt
        self.batch_size, self.chat, self.system_prompt, self.progress = batch_size, chat, system_prompt, progress
        self.seed = seed
        self._device = torch.device(rt.device)
        # control-token text -> id, longest first so that no control token is matched by a prefix
        self._control_pattern = re.compile("|".join(re.escape(t) for t in sorted(tokenizer.controls, key=len,
                                                                                   reverse=True)))
        self._control_ids = set(tokenizer.controls.values())

    # --- what the harness asks of every model ---------------------------------------------------

    @property
    def eot_token_id(self):
        # what ends an answer: <|end|> for a chat model (the export's eos), <|endoftext|> for a base one
        return self.tok.end if self.chat else self.tok.eot

    @property
    def prefix_token_id(self):
        return self.tok.eot  # the token before every pretraining document, and the export's bos

    @property
    def max_length(self):
        return _core(self.model).config.block_size

    @property
    def tokenizer_name(self):
        return self.tok.hash  # fingerprints the harness's request cache

    def chat_template(self, chat_template=False):
        return f"gptkit chat format ({self.tok.name}; system prompt {self.system_prompt!r})" if self.chat else ""

    def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kwargs):
        if not self.chat:
            ids = self.tok.encode(string)
        else:
            # a rendered chat prompt: its control-token text is whole control tokens, the text between
            # them is encoded on its own (what the export's tokenizer does with the same string)
            ids, start = [], 0
            for match in self._control_pattern.finditer(string):
                ids += self.tok.encode(string[start:match.start()]) + [self.tok.controls[match.group()]]
                start = match.end()
            ids += self.tok.encode(string[start:])
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids):
        """Text of ids without the control tokens (transformers' skip_special_tokens)."""
        return self.tok.decode([i for i in ids if i not in self._control_ids])

    def apply_chat_template(self, chat_history, add_generation_prompt=True):
        messages = list(chat_history)
        if self.system_prompt and (not messages or messages[0]["role"] != "system"):
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        if add_generation_prompt:
            ids = self.tok.render_prompt(messages)
        else:  # continue the last (assistant) message: its closing <|end|> is not there yet
            ids, _ = self.tok.render_conversation(messages)
            ids = ids[:-1]
        return self.tok.decode(ids)  # control tokens as their text; tok_encode makes them tokens again

    # --- scoring -------------------------------------------------------------------------------

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        """requests: [(strings, context ids, continuation ids)] -> [(summed log-prob of the
        continuation, whether greedy decoding gives exactly it)], in the order given."""
        block_size = self.max_length
        # longest first: similar lengths share a batch (less padding), an out-of-memory comes at once
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="log-likelihoods", disable=disable_tqdm or not self.progress)
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                # as the harness's hf model: the whole row cut to block_size + 1 from the left, the last id not read
                rows = [(requests[i][1] + requests[i][2])[-(block_size + 1):] for i in batch]
                idx = torch.full((len(rows), max(len(r) for r in rows) - 1), self.tok.eot, dtype=torch.long)
                for r, ids in enumerate(rows):
                    idx[r, :len(ids) - 1] = torch.tensor(ids[:-1])  # right padding: causal, never read
                with self.rt.autocast():
                    logits, _ = self.model(idx.to(self._device))  # (B, T, V)
                for r, i in enumerate(batch):
                    continuation = requests[i][2]
                    n = len(continuation)
                    end = len(rows[r]) - 1  # positions predicting the continuation: [end - n, end)
                    logprobs = F.log_softmax(logits[r, end - n:end].float(), dim=-1)  # (n, V)
                    target = torch.tensor(continuation, device=logprobs.device)
                    score = float(logprobs.gather(1, target[:, None]).sum())
                    results[i] = (score, bool((logprobs.argmax(dim=-1) == target).all()))
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
                bar.update(len(batch))
        finally:
            self.model.train(was_training)
            bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        """Whole-text log-likelihood (perplexity tasks such as wikitext), in windows of the context."""
        windows, owners = [], []
        for n, (text,) in enumerate(request.args for request in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(n)
        totals = [0.0] * len(requests)
        for n, (score, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[n] += score
        return totals

    def generate_until(self, requests, disable_tqdm=False):
        """Continue each prompt until a stop string or stop token. Every request is a job of one
        continuous batch (gptkit/engine.py, batch_size rows, as serve.py's clients share one), greedy
        unless the task samples; a sampled answer has its own seed (seed + its index), so it is the
        same whatever else runs beside it (fp32; eval.py scores in fp32 on a CPU)."""
        stop_tokens = (self.tok.eot, self.tok.end) if self.chat else (self.tok.eot,)  # the export's eos ids
        jobs = []
        for index, request in enumerate(requests):
            context, gen_kwargs = request.args
            kwargs = normalize_gen_kwargs(gen_kwargs, 256)  # the harness's hf model's default of 256 tokens
            until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tok.decode([self.eot_token_id]))
            max_gen_toks = kwargs.pop("max_gen_toks")
            if max_gen_toks >= self.max_length:
                raise UserError(f"a task asks for {max_gen_toks} new tokens, which leaves no room for its prompt "
                                f"in the model's context of {self.max_length}: pass a smaller --max_gen_toks")
            ids = self.tok_encode(context, left_truncate_len=self.max_length - max_gen_toks)
            sampling = dict(temperature=0.0)
            if kwargs.get("do_sample") and kwargs.get("temperature", 0) > 0:
                sampling = dict(temperature=kwargs["temperature"], top_k=kwargs.get("top_k") or 0,
                                top_p=kwargs.get("top_p") or 1.0)
            jobs.append(Job(ids, max_gen_toks, stop_tokens, stop=until, seed=self.seed + index,
                            hide_tokens=tuple(self._control_ids), **sampling))  # as tok_decode: no control tokens
        model = _core(self.model)
        was_training = model.training  # the engine puts the model in eval mode; the training loop gets it back as it was
        engine = Engine(model, self.tok, autocast=self.rt.autocast, max_batch=self.batch_size,
                        max_queue=max(1, len(jobs)), thread=False)  # answer_all runs it here
        bar = tqdm(total=len(jobs), desc="generations", disable=disable_tqdm or not self.progress)
        try:
            answers = answer_all(engine, jobs, on_done=lambda: bar.update(1))
        finally:
            engine.close()
            bar.close()
            model.train(was_training)
        results = []
        for request, job, (text,) in zip(requests, jobs, answers):
            text = postprocess_generated_text(text, job.stop, None)
            self.cache_hook.add_partial("generate_until", request.args, text)
            results.append(text)
        return results


# ----------------------------------------------------------------------------------------------
# Tasks and their data

def local_split_files(data_dir, dataset_path, dataset_name=None):
    """-> (folder, {split: file}) of a dataset's local copy under data_dir; the dict is empty when absent."""
    folder = os.path.join(data_dir, dataset_path, dataset_name or "")
    files = {}
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            stem, ext = os.path.splitext(name)
            if ext in LOCAL_FORMATS:
                files[stem] = os.path.join(folder, name)
    return folder, files


def with_local_data(cfg, data_dir):
    """A task's config (the harness's YAML as a dict) -> the same config reading its dataset from
    data_dir's copy, if there is one; splits with no file there are dropped from the config."""
    if not data_dir or not cfg.get("dataset_path") or "task" not in cfg:
        return cfg
    folder, files = local_split_files(data_dir, cfg["dataset_path"], cfg.get("dataset_name"))
    if not files:
        return cfg
    formats = {LOCAL_FORMATS[os.path.splitext(path)[1]] for path in files.values()}
    if len(formats) > 1:
        raise TaskDataError(f"{folder} mixes file formats ({', '.join(sorted(files.values()))}): "
                            "keep one format per dataset folder")
    local = {**cfg, "dataset_path": formats.pop(), "dataset_name": None, "dataset_kwargs": {"data_files": files}}
    for key in SPLIT_KEYS:
        if local.get(key) and local[key] not in files:
            local[key] = None  # the harness then takes the next split it knows (test, else validation)
    if not (local.get("test_split") or local.get("validation_split")):
        scored = " or ".join(f"{cfg[k]}.jsonl" for k in ("test_split", "validation_split") if cfg.get(k))
        raise TaskDataError(f"task {cfg['task']}: {folder} has {', '.join(os.path.basename(p) for p in files.values())} "
                            f"but none of the splits it scores ({scored}): add one in the dataset's schema")
    return local


class LocalDataTaskFactory(TaskFactory):
    """The harness's task builder, with each task's dataset redirected to data_dir's copy where one exists.
    The harness downloads a task's data as it builds it, so the redirect has to happen here, per task:
    a group such as mmlu holds 57 tasks, each with its own dataset_name."""

    def __init__(self, data_dir, meta=None):
        super().__init__(meta=meta)
        self.data_dir = data_dir

    def _load_full_config(self, entry, overrides=None):
        return with_local_data(super()._load_full_config(entry, overrides), self.data_dir)


@functools.lru_cache(maxsize=1)
def _task_index():
    """The harness's TaskManager of its built-in tasks: indexing their YAML files takes ~10 s, so once a process."""
    return TaskManager()


def task_manager(data_dir=""):
    """The harness's TaskManager, reading datasets from data_dir's copies (see the module docstring)."""
    manager = copy.copy(_task_index())
    if not isinstance(getattr(manager, "_factory", None), TaskFactory):
        raise RuntimeError("this lm-eval has no TaskManager._factory: gptkit/harness.py is written for lm-eval "
                           "0.4.13 and newer 0.4 releases (pip install 'lm-eval>=0.4.13,<0.5')")
    manager._factory = LocalDataTaskFactory(data_dir, meta=manager.metadata)
    return manager


def check_task_names(tasks, manager=None):
    """-> problems: the names in tasks the harness does not know."""
    known = set((manager or _task_index()).all_tasks)
    return [f"task {name!r} is not one lm-evaluation-harness knows: `lm-eval ls tasks` lists them "
            "(hellaswag, arc_easy, arc_challenge, piqa, winogrande, mmlu, gsm8k, ...)" for name in tasks
            if name not in known]


def load_tasks(tasks, manager):
    """The harness's TaskManager.load(tasks) (names of tasks, groups, tags), the data read now: a
    dataset that cannot be read is one error that says where local files go. -> {"tasks": {name:
    Task}, every leaf; "groups": {name: Group}; "group_map": {group: [child names]}}"""
    try:
        return manager.load(list(tasks))
    except UserError:
        raise
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:  # no network, no file, no dataset
        raise TaskDataError(
            f"could not read the data of {', '.join(tasks)} ({type(e).__name__}: {str(e)[:300]}). Without the "
            "Hugging Face hub, put each dataset's splits in DATA_DIR/<dataset_path>/<dataset_name>/<split>.jsonl "
            "in the dataset's own schema (names as in the task's YAML, e.g. allenai/ai2_arc/ARC-Easy/test.jsonl) "
            "and pass --data_dir=DATA_DIR; `python eval.py --tasks=... --download_to=DATA_DIR` writes them "
            "where the hub can be reached") from e


def _top_level(loaded):
    """TaskManager.load's flat dicts -> the groups and tasks that no group holds (what to evaluate:
    each group brings its members, and the harness aggregates them)."""
    children = {name for members in loaded["group_map"].values() for name in members}
    return ([group for name, group in loaded["groups"].items() if name not in children]
            + [task for name, task in loaded["tasks"].items() if name not in children])


def save_task_data(tasks, data_dir):
    """Write every dataset the tasks read into data_dir's layout (needs the hub) -> the files written."""
    written = []
    for task in load_tasks(tasks, task_manager())["tasks"].values():
        cfg = task.config
        folder = os.path.join(data_dir, cfg.dataset_path, cfg.dataset_name or "")
        for split, dataset in task.dataset.items():
            path = os.path.join(folder, f"{split}.jsonl")
            if path not in written:
                os.makedirs(folder, exist_ok=True)
                dataset.to_json(path, lines=True, force_ascii=False)
                written.append(path)
    return written


# ----------------------------------------------------------------------------------------------
# Running

def run_harness(model, tokenizer, tasks, rt, limit=None, data_dir="", chat=False, system_prompt="", batch_size=8,
                num_fewshot=None, max_gen_toks=0, progress=False, log_samples=False, bootstrap_iters=0, seed=1337):
    """lm-evaluation-harness's simple_evaluate on a gptkit model in memory -> the harness's own output
    dict ("results", "group_subtasks", "configs", "n-samples", and with log_samples "samples": each
    item's prompt, answers and score).

    tasks: harness names (tasks, groups, tags). limit: the first `limit` items of each task (None: all).
    data_dir: local dataset copies (module docstring). chat: prompts in the model's chat format, with
    few-shot examples as earlier turns. num_fewshot: None keeps each task's own. max_gen_toks: new
    tokens per generation (0: each task's own, else 256). bootstrap_iters: 0 skips the stderr of
    metrics that are not means (the harness's command line uses 100000: slow on big tasks).
    The model is put in eval mode and left as it was found."""
    lm = GptkitLM(model, tokenizer, rt, batch_size=batch_size, chat=chat, system_prompt=system_prompt,
                  progress=progress, seed=seed)
    manager = task_manager(data_dir)
    problems = check_task_names(tasks, manager)
    if problems:
        raise TaskDataError("; ".join(problems))
    loaded = load_tasks(tasks, manager)
    return simple_evaluate(model=lm, tasks=_top_level(loaded), task_manager=manager,
                           num_fewshot=num_fewshot, limit=limit, log_samples=log_samples,
                           bootstrap_iters=bootstrap_iters, apply_chat_template=chat, fewshot_as_multiturn=chat,
                           gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks else None)


def summarize(output, tasks):
    """The harness's output -> {name: {metric: value}} for the names asked for: a group's own
    aggregate rather than its members', a tag's tasks one by one. Metric names are the harness's,
    with the filter after an underscore where it is not "none" (gsm8k: exact_match_strict-match)."""
    results, group_subtasks = output["results"], output.get("group_subtasks", {})
    members = set()
    for name in tasks:
        stack = list(group_subtasks.get(name, []))
        while stack:
            member = stack.pop()
            members.add(member)
            stack += group_subtasks.get(member, [])
    summary = {}
    for name, entry in results.items():
        if name in members and name not in tasks:
            continue
        metrics = {}
        for key, value in entry.items():
            metric, _, filter_name = key.partition(",")
            if filter_name and "_stderr" not in metric and isinstance(value, (int, float)):
                metrics[metric if filter_name == "none" else f"{metric}_{filter_name}"] = float(value)
        summary[name] = metrics
    return summary


def centered_accuracy(output, summary):
    """A base-model aggregate in the spirit of nanochat's CORE, from the harness's logged items ->
    ({name: centered accuracy}, their mean or None). For each multiple-choice entry of the summary
    (a task, or a group over all its tasks' items): (acc - chance) / (1 - chance), where acc is the
    share of items whose highest summed log-prob choice is right and chance is the mean over the
    same items of 1 / number of choices. 0 is guessing, 1 is every item right; the mean is
    unweighted over the entries. Needs log_samples=True."""
    samples, group_subtasks = output.get("samples") or {}, output.get("group_subtasks", {})
    centered = {}
    for name in summary:
        leaves, stack = [], [name]
        while stack:
            member = stack.pop()
            stack += group_subtasks.get(member, [])
            if member in samples:
                leaves.append(member)
        items = [item for leaf in leaves for item in samples[leaf]
                 if output["configs"][leaf]["output_type"] == "multiple_choice"]
        if not items or len(items) != sum(len(samples[leaf]) for leaf in leaves):
            continue  # not (only) multiple choice
        chance = sum(1 / len(item["arguments"]) for item in items) / len(items)
        acc = sum(item["acc"] for item in items) / len(items)
        centered[name] = (acc - chance) / (1 - chance)
    return centered, (sum(centered.values()) / len(centered) if centered else None)


def evaluate_tasks(model, tokenizer, tasks, rt, limit=None, data_dir="", chat=False, system_prompt="", batch_size=8,
                   num_fewshot=None, max_gen_toks=0, progress=False):
    """The training loop's call: run_harness on a model in memory -> {name: {metric: value}} (summarize),
    plus "centered_mean" {"centered_acc": ...} when any multiple-choice task ran (centered_accuracy).
    The caller's random state is kept: simple_evaluate seeds python, numpy and torch, which in a training
    run would change the dropout and data order that follow an eval."""
    saved = rng_state()
    try:
        output = run_harness(model, tokenizer, tasks, rt, limit=limit, data_dir=data_dir, chat=chat,
                             system_prompt=system_prompt, batch_size=batch_size, num_fewshot=num_fewshot,
                             max_gen_toks=max_gen_toks, progress=progress, log_samples=True)
    finally:
        set_rng_state(saved)
    summary = summarize(output, tasks)
    centered, mean = centered_accuracy(output, summary)
    for name, value in centered.items():
        summary[name]["centered_acc"] = value
    if mean is not None:
        summary["centered_mean"] = {"centered_acc": mean}
    return summary
