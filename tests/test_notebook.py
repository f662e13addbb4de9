"""notebooks/walkthrough.ipynb: stored without outputs, and runs top to bottom on the CPU."""

import os
import resource
import time

import pytest

from conftest import ROOT, shared_data

nbformat = pytest.importorskip("nbformat")
NOTEBOOK = os.path.join(ROOT, "notebooks", "walkthrough.ipynb")


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, "the notebook has no code cells"
    with_outputs = [i for i, cell in enumerate(code) if cell.outputs or cell.execution_count is not None]
    assert not with_outputs, f"code cells {with_outputs} carry outputs: clear them before committing " \
                             "(jupyter nbconvert --clear-output --inplace notebooks/walkthrough.ipynb)"
    # it uses gptkit and model.py, never a copy of them
    source = "\n".join(cell.source for cell in code)
    assert "from model import GPT" in source and "from gptkit.trainer import" in source
    assert "class GPT" not in source and "def train_step" not in source


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    from nbclient import NotebookClient
    monkeypatch.setenv("GPTKIT_NOTEBOOK_TEXT", shared_data("pretrain", "tinyshakespeare", "input.txt"))
    monkeypatch.setenv("GPTKIT_NOTEBOOK_WORK", str(tmp_path))
    monkeypatch.setenv("GPTKIT_NOTEBOOK_STEPS", "20")  # the notebook's 300 and 60, shorter for CI
    monkeypatch.setenv("GPTKIT_NOTEBOOK_CHAT_STEPS", "20")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    start, children = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    # any cell error (an assert in the notebook included) raises CellExecutionError here
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}}).execute()
    used = resource.getrusage(resource.RUSAGE_CHILDREN)  # the kernel, once it has exited
    cpu = used.ru_utime + used.ru_stime - children.ru_utime - children.ru_stime
    print(f"\nnotebook executed in {time.time() - start:.1f} s ({cpu:.1f} s of CPU time in the kernel)")
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    text = "".join(out.get("text", "") for out in outputs)
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    # a tokenizer trained on the text, its control tokens at 0-4, beside GPT-2's at 50256-50260
    assert "trained tokenizer: 512 ids" in text and "'<|end|>': 4}" in text and "'<|end|>': 50260}" in text
    assert "\n   GPT-2: 16 tokens: " in text and "\n trained: " in text
    assert "val loss at init" in text and "step 20/20" in text and "before finetuning" in text
    assert "finetune step 20:" in text and "<|assistant|>[Paris][.][<|end|>]" in text  # loss on the answer only
    assert len(images) >= 2  # the loss plot and the attention picture
    assert os.path.exists(tmp_path / "shards" / "train_000000.bin")  # written where it was told


def test_notebook_without_internet_trains_on_a_shipped_book(tmp_path, monkeypatch, capsys):
    """Its first cell, offline with TEXT_PATH empty: a book from samples/, not a stop."""
    import sys
    import urllib.request

    def offline(*args, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(urllib.request, "urlretrieve", offline)
    monkeypatch.delenv("GPTKIT_NOTEBOOK_TEXT", raising=False)
    monkeypatch.setenv("GPTKIT_NOTEBOOK_WORK", str(tmp_path))
    monkeypatch.chdir(os.path.join(ROOT, "notebooks"))
    monkeypatch.setattr(sys, "path", list(sys.path))  # the cell adds the repository root to it
    first = next(cell for cell in nbformat.read(NOTEBOOK, as_version=4).cells if cell.cell_type == "code")
    namespace = {}
    exec(first.source, namespace)
    assert namespace["TEXT_PATH"] == os.path.join(ROOT, "samples", "pretrain", "pg1342.txt")
    assert len(namespace["text"]) > 500_000 and "could not download" in capsys.readouterr().out
