"""
HellaSwag: pick the right ending of a short everyday scene out of four, by which ending the model
finds most likely. Shared by eval_hellaswag.py and the training loop.

    from gptkit.hellaswag import evaluate_hellaswag
    model, tokenizer, meta = load_model("out/fineweb_124m", device=rt.device)   # gptkit/loading.py
    results = evaluate_hellaswag(model, tokenizer, "", rt)   # "" downloads the official val file once
    results["acc_norm"]                                      # also acc, acc_per_token, count

Completion-style scoring, as lm-evaluation-harness and build-nanogpt do it: each ending is scored
as the log-probability of its tokens (" " + ending) after the context. Every row starts with
<|endoftext|>, the token that precedes every document in our pretraining shards, so the model sees
the context as the start of a document, as it did in training. Three ways to pick the winner:
    acc            highest summed log-prob (favours short endings)
    acc_norm       summed log-prob / length of the ending in characters (lm-evaluation-harness)
    acc_per_token  mean log-prob per token (build-nanogpt)
Chat checkpoints are scored the same way, on plain text without chat tokens.
The text is scored as the file gives it, ctx then ending, as build-nanogpt does; lm-evaluation-
harness also puts the activity label in front and strips WikiHow's [header]/[title] markers, and
neither starts with <|endoftext|>, so their figures for the same model differ a little from ours.
Their names differ too: build-nanogpt's "acc_norm" is the per-token rule, our acc_per_token.
"""

import json
import os
import urllib.request

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from gptkit.configurator import UserError

VAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
NUM_ENDINGS = 4


class HellaSwagFormatError(UserError, ValueError):
    """A HellaSwag file that cannot be read; the message names the file, the line and the problem."""


def cache_dir():
    """Where the downloaded val file is kept: $GPTKIT_CACHE/hellaswag, else ~/.cache/gptkit/hellaswag."""
    root = os.environ.get("GPTKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gptkit")
    return os.path.join(root, "hellaswag")


def download_val(url=VAL_URL):
    """Path of the official val file, downloaded on first use. Every rank may call this at once:
    each writes its own temporary file and renames it into place, so no rank reads half a file."""
    path = os.path.join(cache_dir(), os.path.basename(url))
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            f.write(response.read())
        os.replace(tmp, path)
    except Exception as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(
            f"could not download the HellaSwag val file from {url} ({type(e).__name__}: {e}). "
            "Offline? Copy hellaswag_val.jsonl here by hand and pass its path: --data=PATH for "
            "eval_hellaswag.py, --hellaswag_data=PATH for training.") from e
    return path


def _check_item(item):
    """-> None if item follows HellaSwag's schema, else what is wrong with it."""
    if not isinstance(item, dict):
        return f"expected a JSON object, got {type(item).__name__}"
    if not isinstance(item.get("ctx"), str):
        return "no 'ctx' text (the context the endings continue)"
    endings = item.get("endings")
    if not isinstance(endings, list) or len(endings) != NUM_ENDINGS:
        return f"'endings' must be a list of {NUM_ENDINGS} texts"
    if not all(isinstance(e, str) and e.strip() for e in endings):
        return "every ending must be a non-empty text"
    label = item.get("label")
    if isinstance(label, str) and label.isdigit():
        label = int(label)  # the Hugging Face copy stores the label as a string
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < NUM_ENDINGS:
        return f"'label' must be the index of the right ending, 0 to {NUM_ENDINGS - 1}; got {item.get('label')!r}"
    return None


def load_items(path, limit=0):
    """Read a HellaSwag JSONL file -> [{"ctx", "endings", "label"}]; the first `limit` items if limit > 0."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no HellaSwag file at {path}: give the path of a HellaSwag JSONL file, "
                                "or leave data empty to download the official val file")
    items = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise HellaSwagFormatError(f"{path}, line {line_number}: not valid JSON ({e.msg})") from None
            problem = _check_item(item)
            if problem:
                raise HellaSwagFormatError(f"{path}, line {line_number}: {problem}. Each line must be a JSON "
                                           "object with ctx, endings (4 texts) and label (0-3).")
            items.append({"ctx": item["ctx"], "endings": item["endings"], "label": int(item["label"])})
            if limit and len(items) == limit:
                break
    if not items:
        raise HellaSwagFormatError(f"{path} holds no HellaSwag items")
    return items


def render_item(item, block_size, tokenizer):
    """-> four (ids, n_scored): ids = <|endoftext|> + ctx + " " + ending in the model's tokenizer, and
    the last n_scored ids are the ending's tokens to score. Rows are at most block_size + 1 long (the
    model reads ids[:-1] and predicts ids[1:]); a longer one loses tokens from the left of the context."""
    context = [tokenizer.eot] + tokenizer.encode(item["ctx"])
    rows = []
    for ending in item["endings"]:
        ending_ids = tokenizer.encode(" " + ending)
        ids = (context + ending_ids)[-(block_size + 1):]
        # Only an ending longer than the whole context window loses its own first tokens.
        rows.append((ids, min(len(ending_ids), len(ids) - 1)))
    return rows


def pick_endings(sum_logprobs, num_tokens, num_chars):
    """(N, 4) tensors -> the chosen ending of each item, (N,) each, under the three rules."""
    return {
        "acc": sum_logprobs.argmax(dim=-1),
        "acc_norm": (sum_logprobs / num_chars).argmax(dim=-1),
        "acc_per_token": (sum_logprobs / num_tokens).argmax(dim=-1),
    }


@torch.no_grad()
def score_rows(model, rows, rt, pad_id):
    """rows: [(ids, n_scored)] -> (summed log-prob of each row's scored tokens, their count), (R,) each.
    All rows go through one forward call, padded on the right with pad_id (an id of the model's
    tokenizer, its <|endoftext|>): with causal attention the padding never touches the positions
    that are scored."""
    max_len = max(len(ids) for ids, _ in rows)
    idx = torch.full((len(rows), max_len - 1), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), max_len - 1), -1, dtype=torch.long)
    for r, (ids, n_scored) in enumerate(rows):
        ids = torch.tensor(ids, dtype=torch.long)
        idx[r, :len(ids) - 1] = ids[:-1]
        targets[r, len(ids) - 1 - n_scored:len(ids) - 1] = ids[-n_scored:]  # only the ending's tokens
    idx, targets = idx.to(rt.device), targets.to(rt.device)
    with rt.autocast():
        logits, _ = model(idx)  # (R, T, V)
    scored = targets >= 0
    # Log-softmax in fp32 on the scored positions only: far less memory than over all (R, T, V).
    logprobs = F.log_softmax(logits[scored].float(), dim=-1)  # (N, V)
    token_logprobs = logprobs.gather(1, targets[scored].unsqueeze(1)).squeeze(1)  # (N,)
    row_of_token = scored.nonzero()[:, 0]
    sum_logprobs = torch.zeros(len(rows), device=logprobs.device).index_add_(0, row_of_token, token_logprobs)
    return sum_logprobs, scored.sum(dim=1).float()


def _block_size(model):
    core = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    core = getattr(core, "module", core)       # DDP wrapper
    return core.config.block_size


def evaluate_hellaswag(model, tokenizer, data_path, rt, limit=0, batch_size=8, progress=False):
    """HellaSwag accuracy of model -> {"acc", "acc_norm", "acc_per_token", "count"}.

    tokenizer: the model's (load_model returns it; the training loop's is the data's).
    data_path: a HellaSwag JSONL file; "" or None downloads the official val file once.
    limit: score only the first `limit` items (0: all). batch_size: items per forward call (x4 rows).
    Under DDP each rank scores items rank::world_size and the counts are summed over ranks, so
    every rank returns the totals. The model is put in eval mode and left as it was found."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: give at least 1 item per forward call")
    path = data_path or download_val()
    items = load_items(path, limit)
    block_size = _block_size(model)
    mine = items[rt.rank::rt.world_size]
    rendered = [(render_item(item, block_size, tokenizer), item) for item in mine]
    # Longest first, so batches hold rows of similar length (less padding) and any
    # out-of-memory shows up in the first batch rather than after an hour.
    rendered.sort(key=lambda pair: -max(len(ids) for ids, _ in pair[0]))
    correct = {"acc": 0, "acc_norm": 0, "acc_per_token": 0}
    was_training = model.training
    model.eval()
    try:
        bar = tqdm(total=len(rendered), desc="hellaswag", unit="item", disable=not (progress and rt.master))
        for start in range(0, len(rendered), batch_size):
            batch = rendered[start:start + batch_size]
            rows = [row for item_rows, _ in batch for row in item_rows]
            sum_logprobs, num_tokens = score_rows(model, rows, rt, tokenizer.eot)
            num_chars = torch.tensor([[len(e) for e in item["endings"]] for _, item in batch], dtype=torch.float)
            picks = pick_endings(sum_logprobs.view(-1, NUM_ENDINGS).cpu(), num_tokens.view(-1, NUM_ENDINGS).cpu(),
                                 num_chars)
            labels = torch.tensor([item["label"] for _, item in batch])
            for name, chosen in picks.items():
                correct[name] += int((chosen == labels).sum())
            bar.update(len(batch))
        bar.close()
    finally:
        model.train(was_training)
    totals = torch.tensor([correct["acc"], correct["acc_norm"], correct["acc_per_token"], len(rendered)],
                          dtype=torch.long, device=rt.device)
    if rt.world_size > 1:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    acc, acc_norm, acc_per_token, count = totals.tolist()
    return {"acc": acc / count, "acc_norm": acc_norm / count, "acc_per_token": acc_per_token / count,
            "count": count}
