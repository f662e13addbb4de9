"""The Hugging Face Space folder (gptkit/space.py): its metadata as the Hub reads it, its requirements
against what its code imports, and the folder's own command started here, answering the openai client."""

import ast
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import huggingface_hub
import pytest
import torch
from huggingface_hub import metadata_load

import export_hf
from gptkit.checkpoint import save_checkpoint
from gptkit.configurator import ConfigError, load_config
from gptkit.loading import load_model
from gptkit.lock import LOCK_NAME
from gptkit.modelcard import push_to_hub
from gptkit.space import APP_PORT, MODEL_DIR, REQUIREMENTS, app_files
from model import GPT, GPTConfig

KEY = "space-secret"


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    """A Space folder written by `export_hf.py --ckpt=RUN --space=DIR` (run in-process, as the script
    runs it) around a tiny chat run's checkpoint -> (folder, the names beside its model/, the run's model)."""
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64), verbose=False)
    save_checkpoint(str(run), {"model": model.state_dict(), "model_config": model.config.to_dict(),
                               "config": {"system": "Be brief."}, "kind": "chat", "step": 0})
    folder = tmp_path_factory.mktemp("spaces") / "tiny-chat"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["export_hf.py", f"--ckpt={run}", f"--space={folder}"])
        export_hf.main()
    written = sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder) for f in files
                     if os.path.relpath(d, folder).split(os.sep)[0] != MODEL_DIR and f != LOCK_NAME)
    return folder, written, model


def test_the_space_holds_the_runs_own_model(space):
    """SPACE/model is the run's export: the same weights, and the chat template with its system prompt."""
    folder, _, model = space
    served, tok, meta = load_model(str(folder / MODEL_DIR), device="cpu")
    ours = model.state_dict()
    assert meta["kind"] == "chat" and all(torch.equal(v, ours[k]) for k, v in served.state_dict().items())
    assert "Be brief." in json.load(open(folder / MODEL_DIR / "tokenizer_config.json"))["chat_template"]


def test_the_space_folder_holds_its_app_and_its_metadata(space):
    folder, written, _ = space
    assert {"README.md", "Dockerfile", "requirements.txt", "serve.py", "model.py", "gptkit/engine.py",
            "gptkit/chat_page.html", "samples/gpt2/vocab.bpe", "LICENSE"} <= set(written)
    assert set(written) == set(app_files()) | {"README.md", "Dockerfile", "requirements.txt"}  # and nothing else
    meta = metadata_load(folder / "README.md")  # the Hub's own parser of a README's front matter
    assert meta["sdk"] == "docker" and meta["app_port"] == APP_PORT and meta["title"] == "tiny-chat"
    cmd = command_of(folder)
    assert cmd.startswith("exec python serve.py --ckpt=model --host=0.0.0.0") and "--api_key=\"$GPTKIT_API_KEY\"" in cmd
    assert (folder / "serve.py").read_bytes() == open(os.path.join(os.path.dirname(__file__), "..", "serve.py"), "rb").read()


def command_of(folder):
    """The shell command of the Dockerfile's exec-form CMD ["sh", "-c", "..."]."""
    line = next(line for line in (folder / "Dockerfile").read_text().splitlines() if line.startswith("CMD "))
    shell, flag, cmd = json.loads(line[len("CMD "):])
    assert (shell, flag) == ("sh", "-c")
    return cmd


def third_party_imports(folder):
    """Top-level names of the non-standard-library modules that serve.py needs: its module-level imports
    and those of every gptkit module it reaches, read from the folder's own copies."""
    seen, todo, names = set(), ["serve"], set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        for node in ast.parse((folder / (module.replace(".", "/") + ".py")).read_text(encoding="utf-8")).body:
            found = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            for name in found:
                if name == "model" or name.startswith("gptkit."):
                    todo.append(name)
                elif name.split(".")[0] not in sys.stdlib_module_names:
                    names.add(name.split(".")[0])
    return names


def test_the_requirements_cover_what_the_served_code_imports(space):
    folder, _, _ = space
    needed = third_party_imports(folder) - {"torch"}  # torch: the Dockerfile installs PyTorch's CPU build itself
    listed = set((folder / "requirements.txt").read_text().split())
    provided = {"tiktoken_ext": "tiktoken"}  # modules that come with another package
    assert listed == set(REQUIREMENTS)
    assert {provided.get(n, n) for n in needed} <= listed, {provided.get(n, n) for n in needed} - listed


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_space_folders_own_command_serves_the_model(space, tmp_path):
    """What the container runs, run here from a copy of the folder (its own serve.py and gptkit, not the
    repository's): the key is required, and the openai client gets an answer from the exported model."""
    openai = pytest.importorskip("openai")
    folder, _, _ = space
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PORT=str(port), GPTKIT_API_KEY=KEY, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(["sh", "-c", command_of(folder)], cwd=folder, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    assert json.load(r)["status"] == "ok"
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    stop(proc)
                    pytest.fail(f"the Space's command did not start: {proc.communicate()}")
                time.sleep(0.2)
        with pytest.raises(urllib.error.HTTPError) as refused:  # no key, no answer
            urllib.request.urlopen(url + "/v1/models", timeout=5)
        assert refused.value.code == 401
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY)
        answer = client.chat.completions.create(model="tiny-chat", max_tokens=4, temperature=0,
                                                messages=[{"role": "user", "content": "Hello?"}])
        assert answer.model == "tiny-chat" and answer.choices[0].finish_reason in ("stop", "length")
        assert answer.usage.prompt_tokens > 0
    finally:
        stop(proc)


def stop(proc):
    """Kill the command's whole process group: whatever the shell started must not outlive the test
    (a leftover child holds the pipes open and communicate() would wait for ever)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()


def test_push_creates_a_docker_space_and_uploads_the_folder(space, monkeypatch):
    folder, _, _ = space
    calls = []
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append((repo_id, kw)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: calls.append((kw["repo_id"], kw)))
    url = push_to_hub(str(folder), "me/tiny-chat", space=True)
    assert url == "https://huggingface.co/spaces/me/tiny-chat"
    (_, create), (_, upload) = calls
    assert create["repo_type"] == "space" and create["space_sdk"] == "docker" and create["exist_ok"] is True
    assert upload["repo_type"] == "space" and upload["folder_path"] == str(folder)


def test_out_and_space_together_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="give out or space, not both"):
        load_config(export_hf.ExportConfig, [f"--ckpt={tmp_path}", f"--out={tmp_path}/hf", f"--space={tmp_path}/sp"])
