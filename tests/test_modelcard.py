"""The export's model card (gptkit/modelcard.py, export_hf.py): Hub metadata that huggingface_hub
parses, numbers that match the run's log, and the upload (the network call replaced)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from gptkit.checkpoint import save_checkpoint
from gptkit.modelcard import HubError, push_to_hub
from model import GPT

huggingface_hub = pytest.importorskip("huggingface_hub")

LOG = [{"step": 0, "val_loss": 10.83},
       {"step": 2, "loss": 10.2, "lr": 1e-3, "tokens_seen": 2048},
       {"step": 4, "loss": 9.1, "lr": 1e-3, "tokens_seen": 4096},
       {"step": 4, "val_loss": 9.3456789, "hellaswag_acc_norm": 0.26, "hellaswag_acc": 0.25},
       {"step": 6, "loss": 8.0, "lr": 5e-4, "tokens_seen": 6144},
       {"step": 6, "val_loss": 8.7654321, "hellaswag_acc_norm": 0.3, "hellaswag_acc": 0.28}]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, request):
    """A finished chat run as finetune.py leaves it: ckpt.pt, config.json, log.jsonl."""
    from model import GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=128, bias=False), verbose=False)
    folder = tmp_path_factory.mktemp("run") / "tiny_chat"
    config = {"total_batch_tokens": 1024, "hellaswag_limit": 100, "hellaswag_data": "/data/hs/val.jsonl",
              "system": "Be brief.", "init_from": "out/tiny_cpu", "data_dir": str(folder / "no-data")}
    save_checkpoint(str(folder), {"model": model.state_dict(), "model_config": model.config.to_dict(),
                                  "config": config, "kind": "chat", "step": 6, "tokens_seen": 6144})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in LOG))
    return folder, model


def export(*flags, env=None):
    return subprocess.run([sys.executable, "export_hf.py", *flags], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env or os.environ.copy())


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    folder, model = run_dir
    out = tmp_path_factory.mktemp("hf") / "tiny_chat"
    proc = export(f"--ckpt={folder}", f"--out={out}", "--datasets=databricks/databricks-dolly-15k",
                  "--license=apache-2.0")
    assert proc.returncode == 0, proc.stderr
    return out, model, proc


@pytest.mark.slow
def test_card_metadata_parses_and_validates_offline(exported):
    # ModelCard.validate posts the card to the Hub (network); offline, the same YAML goes through
    # huggingface_hub's own parsers: metadata_load, ModelCardData and its model-index reader
    from huggingface_hub import ModelCard, ModelCardData, metadata_load
    out, _, proc = exported
    assert "README.md" in proc.stdout and "loss.png" in proc.stdout
    meta = metadata_load(out / "README.md")
    assert meta["license"] == "apache-2.0" and meta["datasets"] == ["databricks/databricks-dolly-15k"]
    assert meta["language"] == ["en"] and meta["pipeline_tag"] == "text-generation"
    assert meta["library_name"] == "transformers" and {"gptkit", "gpt2", "chat"} <= set(meta["tags"])
    data = ModelCardData(**meta)  # raises on a malformed model-index
    [result] = data.eval_results
    assert (result.dataset_name, result.metric_type, result.metric_value) == ("HellaSwag", "acc_norm", 0.3)
    card = ModelCard.load(out / "README.md")
    assert card.data.to_dict() == data.to_dict() and card.text.startswith("\n# tiny_chat")


@pytest.mark.slow
def test_card_numbers_match_the_run_log(exported):
    out, model, _ = exported
    text = (out / "README.md").read_text()
    last_val = [r["val_loss"] for r in LOG if "val_loss" in r][-1]
    assert f"| final val loss | {last_val:.4f} (step 6) |" in text  # the last val loss, not the best
    assert f"| parameters | {model.num_params():,} " in text and "| tokens trained | 6,144 in 6 steps" in text
    assert "| HellaSwag acc_norm | 0.3000 on 100 items of `val.jsonl` (step 6" in text
    assert "2 layers, 4 heads, 64 wide, context 128 tokens" in text and "`out/tiny_cpu`" in text
    # the chat format with the trained system prompt, and both ways to use it
    assert "<|assistant|>...<|end|>" in text and "\nBe brief.\n" in text
    # the tokenizer's facts: GPT-2's ids for a model without a tokenizer of its own
    assert "| tokenizer | GPT-2's BPE plus 4 chat tokens: 50,261 ids" in text and "`<|end|>` (id 50260)" in text
    assert "| kind | chat model (finetuned with finetune.py) |" in text
    assert "AutoModelForCausalLM.from_pretrained" in text and "apply_chat_template" in text
    assert "python sample.py --ckpt=" in text
    # the loss plot is in the folder, and the card shows it
    assert "](loss.png)" in text and open(out / "loss.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_the_cards_transformers_snippet_runs_on_the_export(exported, capsys):
    pytest.importorskip("transformers")
    out, _, _ = exported
    text = (out / "README.md").read_text()
    snippet = text.split("## Use with transformers\n\n```python\n")[1].split("```")[0]
    assert "AutoTokenizer.from_pretrained('path/to/this/folder')" in snippet  # no repo named: a folder
    torch.manual_seed(0)
    exec(snippet.replace("path/to/this/folder", str(out)).replace("max_new_tokens=100", "max_new_tokens=8"), {})  # loads, templates, generates, decodes: or raises
    assert capsys.readouterr().out.endswith("\n")  # it printed the answer (a random model's may be empty)


@pytest.mark.slow
def test_push_uploads_the_export_folder_to_the_named_repo(exported, monkeypatch):
    out, _, _ = exported
    calls = []
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kw: calls.append(("create_repo", repo_id, kw)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, **kw: calls.append(("upload_folder", kw["repo_id"], kw)))
    assert push_to_hub(str(out), "me/tiny-chat", private=True) == "https://huggingface.co/me/tiny-chat"
    assert [c[:2] for c in calls] == [("create_repo", "me/tiny-chat"), ("upload_folder", "me/tiny-chat")]
    assert calls[0][2]["private"] is True and calls[0][2]["exist_ok"] is True
    assert calls[1][2]["folder_path"] == str(out) and calls[1][2]["repo_type"] == "model"
    from fnmatch import fnmatch
    from gptkit.lock import LOCK_NAME  # held in the folder while export_hf.py runs: never uploaded
    assert any(fnmatch(LOCK_NAME, p) for p in calls[1][2]["ignore_patterns"])


@pytest.mark.slow
def test_push_offline_or_without_token_is_one_clear_line_and_keeps_the_export(run_dir, tmp_path, monkeypatch,
                                                                                   capsys):
    import export_hf
    from gptkit.configurator import ConfigError, load_config
    from gptkit.system import run_main
    folder, _ = run_dir
    out = tmp_path / "hf"
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)  # no HF_TOKEN, never logged in
    monkeypatch.setattr(sys, "argv", ["export_hf.py", f"--ckpt={folder}", f"--out={out}", "--push_to_hub=me/tiny-chat"])
    with pytest.raises(SystemExit) as exit_info:
        run_main(export_hf.main)  # as the script runs it
    assert exit_info.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: no Hugging Face token") and "hf auth login" in line and "HF_TOKEN" in line
    assert {"config.json", "model.safetensors", "README.md", "loss.png"} <= set(os.listdir(out))
    # a token but no network: the library's connection error, said in one line with what to do
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")

    def offline(self, *args, **kwargs):
        raise huggingface_hub.errors.OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled.")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", offline)
    with pytest.raises(HubError, match=r"could not upload to https://huggingface.co/me/tiny-chat "
                                       r"\(OfflineModeIsEnabled: Cannot reach.*check the network.*hf upload me/tiny-chat") as e:
        push_to_hub(str(out), "me/tiny-chat")
    assert "\n" not in str(e.value) and os.path.getsize(out / "model.safetensors") > 0
    # a name that is no Hub repo is a config error before anything is read
    with pytest.raises(ConfigError, match="is not a Hub repo name: give user/name"):
        load_config(export_hf.ExportConfig, [f"--ckpt={folder}", f"--out={out}", "--push_to_hub=just-a-name"])


def test_a_base_run_without_a_log_gets_a_card_without_curves(run_dir, tmp_path):
    from gptkit.modelcard import run_facts, write_model_card
    from gptkit.tokenizer import load_tokenizer
    _, model = run_dir
    gpt2 = load_tokenizer("gpt2")
    facts = run_facts(model, gpt2, {"kind": "base", "config": {}, "step": 3, "tokens_seen": 3072}, str(tmp_path))
    (tmp_path / "loss.png").write_bytes(b"an earlier export's plot")
    assert write_model_card(str(tmp_path), facts, repo_id="me/base") == ["README.md"]
    assert not (tmp_path / "loss.png").exists()
    text = (tmp_path / "README.md").read_text()
    assert "loss.png" not in text and "final val loss" not in text and "HellaSwag" not in text
    assert "hf download me/base --local-dir base" in text and "--init_from=base" in text
    assert "model-index" not in text and "datasets" not in text  # nothing measured, no data named
    assert "| 3,072 in 3 steps |" in text
    facts = run_facts(model, gpt2, {"kind": "base", "config": {}, "step": 1, "tokens_seen": 1024}, str(tmp_path))
    write_model_card(str(tmp_path), facts)
    assert "| 1,024 in 1 step |" in (tmp_path / "README.md").read_text()
    # shards prepare_fineweb.py made from a Hub dataset name it in the metadata; a local folder does not
    from huggingface_hub import metadata_load
    for source, datasets in (("HuggingFaceFW/fineweb-edu", ["HuggingFaceFW/fineweb-edu"]), (str(tmp_path), None)):
        (tmp_path / "data").mkdir(exist_ok=True)
        (tmp_path / "data" / "prepare_state.bin").write_bytes(json.dumps({"settings": {"source": source}}).encode()
                                                               + b"\n")
        facts = run_facts(model, gpt2, {"kind": "base", "config": {"data_dir": str(tmp_path / "data")}}, str(tmp_path))
        write_model_card(str(tmp_path), facts)
        assert metadata_load(tmp_path / "README.md").get("datasets") == datasets


def test_a_peft_adapter_folder_gets_a_card_that_names_its_base(run_dir, tmp_path):
    """A LoRA run's adapter export: library_name peft, the base it goes on, and peft's loading code."""
    from gptkit.lora import LoRASettings
    from gptkit.modelcard import run_facts, write_model_card
    from gptkit.tokenizer import load_tokenizer
    folder, model = run_dir
    ckpt = torch.load(folder / "ckpt.pt", weights_only=True)
    facts = run_facts(model, load_tokenizer("gpt2"), ckpt, str(folder))
    adapter = LoRASettings(rank=4, alpha=8.0, targets=["attn"], base="out/tiny_base")
    assert write_model_card(str(tmp_path), facts, "me/tiny-lora", adapter=adapter) == ["loss.png", "README.md"]
    card = huggingface_hub.ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "peft" and {"lora", "peft", "gptkit"} <= set(card.data.tags)
    assert "rank 4, alpha 8" in card.text and "`out/tiny_base`" in card.text
    assert "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(\"BASE\"), 'me/tiny-lora')" in card.text
    assert "export_hf.py --ckpt=out/tiny_base --out=BASE" in card.text
