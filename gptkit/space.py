"""
A Hugging Face Space that serves a model: a folder that runs serve.py on an export, as a Docker Space.

    files = write_space("spaces/dolly", name="dolly")   # beside spaces/dolly/model, an export_hf folder
    # then: hf upload --repo-type=space your-name/dolly spaces/dolly .   (export_hf.py --push_to_hub does it)

The folder holds what the Space's container needs and nothing more:
    README.md         the Space's metadata (sdk: docker, app_port) and how to use it
    Dockerfile        Python, the CPU build of PyTorch, requirements.txt; runs command(name)
    requirements.txt  the libraries serve.py imports (torch comes from PyTorch's CPU index)
    serve.py, model.py, gptkit/, samples/gpt2/, LICENSE   copies of this gptkit's own files
    model/            the exported model (export_hf.py writes it there)
The Space listens on every interface, so serve.py requires an API key: the Space's secret
GPTKIT_API_KEY (Settings -> Variables and secrets); the chat page has a field for it, and API clients
send it as `Authorization: Bearer <key>`. The command is plain shell, so the same folder runs on any
machine with the requirements installed: `cd spaces/dolly && GPTKIT_API_KEY=... PORT=8000 sh -c "<command>"`
(README.md gives the command in full).
"""

import glob
import os
import shlex

from gptkit.files import atomic_write_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP_PORT = 7860  # the port Hugging Face's proxy expects a Docker Space on, unless its README says another
MODEL_DIR = "model"  # the export inside the Space folder
# the libraries the copied code imports when serve.py runs (tests/test_space.py checks the list against the imports)
REQUIREMENTS = ["numpy", "tiktoken", "safetensors", "huggingface_hub", "fastapi", "starlette", "uvicorn", "tqdm"]


def app_files():
    """The gptkit files the Space runs, as paths relative to the repository root."""
    package = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "gptkit", "*"))
                     if p.endswith((".py", ".html")))
    shipped_gpt2 = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "samples", "gpt2", "*")))
    return ["serve.py", "model.py", "LICENSE", *package, *shipped_gpt2]


def command(name):
    """What the container runs: serve.py on the export, on every interface, with the Space's secret as the key.
    `exec`: serve.py replaces the shell, so the container's stop signal reaches it (and no orphan is left)."""
    return (f"exec python serve.py --ckpt={MODEL_DIR} --host=0.0.0.0 --port=${{PORT:-{APP_PORT}}} --device=cpu "
            f"--dtype=float32 --api_key=\"$GPTKIT_API_KEY\" --name={shlex.quote(name)}")


def _copy_of(path):
    def write(f):
        with open(os.path.join(ROOT, path), "rb") as source:
            f.write(source.read())
    return write


def _text(text):
    return lambda f: f.write(text.encode("utf-8"))


def dockerfile(name):
    return (
        "FROM python:3.11-slim\n"
        "WORKDIR /app\n"
        "COPY requirements.txt .\n"
        "# the CPU build of PyTorch: a Space's free hardware has no GPU, and the CUDA build is gigabytes\n"
        "RUN pip install --no-cache-dir torch --index-url https://download.pytorch.org/whl/cpu \\\n"
        "    && pip install --no-cache-dir -r requirements.txt\n"
        "COPY . .\n"
        f"EXPOSE {APP_PORT}\n"
        f"CMD [\"sh\", \"-c\", {_json_string(command(name))}]\n")


def _json_string(text):
    """A Dockerfile exec-form string (JSON): quotes and backslashes escaped."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def readme(name, license="mit"):
    return (
        "---\n"
        f"title: {name}\n"
        "emoji: 💬\n"
        "colorFrom: blue\n"
        "colorTo: gray\n"
        "sdk: docker\n"
        f"app_port: {APP_PORT}\n"
        f"license: {license}\n"
        "tags:\n- gptkit\n"
        "pinned: false\n"
        "---\n\n"
        f"# {name}\n\n"
        "A GPT trained with gptkit and served by its `serve.py`: a chat page at `/` "
        "and the OpenAI API at `/v1` (`/v1/chat/completions`, `/v1/completions`, `/v1/models`, `/health`).\n\n"
        "Set the Space's secret `GPTKIT_API_KEY` (Settings -> Variables and secrets) before it starts: the "
        "server answers only requests that carry it (`Authorization: Bearer <key>`; the page has a field for "
        "it), and without one it refuses to start rather than serve the world.\n\n"
        "```python\n"
        "from openai import OpenAI\n"
        "client = OpenAI(base_url=\"https://<owner>-<space>.hf.space/v1\", api_key=\"<GPTKIT_API_KEY>\")\n"
        "print(client.chat.completions.create(model=\"gptkit\", messages=[{\"role\": \"user\", \"content\": \"Hi!\"}])"
        ".choices[0].message.content)\n"
        "```\n\n"
        "The same folder runs on any machine: `pip install torch -r requirements.txt`, then\n"
        f"`GPTKIT_API_KEY=secret PORT=8000 sh -c {shlex.quote(command(name))}`.\n")


def write_space(space_dir, name, license="mit"):
    """Write the Space's files around space_dir/model (an export, written by export_hf before this)
    -> the names written. Replaced as one set, Dockerfile last: an interrupted write leaves the earlier
    Space whole, or a folder without its Dockerfile, never a mix."""
    files = {path: _copy_of(path) for path in app_files()}
    files.update({"README.md": _text(readme(name, license)), "Dockerfile": _text(dockerfile(name)),
                  "requirements.txt": _text("\n".join(REQUIREMENTS) + "\n")})
    atomic_write_files(space_dir, files, marker="Dockerfile")
    return sorted(files)
