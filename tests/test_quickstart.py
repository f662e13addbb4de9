"""The README's quick start, end to end, as CI sees it: local data instead of the hub."""
import json
import os
import subprocess
import sys

from conftest import ROOT, shared_data


def test_quickstart_pipeline_end_to_end(tmp_path):
    text = open(shared_data("pretrain", "tinyshakespeare", "input.txt"), encoding="utf-8").read()
    # FineWeb-shaped jsonl: one document per speech-sized chunk
    chunks = [c for c in text.split("\n\n") if c.strip()]
    docs = ["\n\n".join(chunks[i:i + 8]) for i in range(0, len(chunks), 8)]
    source = tmp_path / "fineweb.jsonl"
    with open(source, "w", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"text": doc, "id": f"doc-{i}"}) + "\n")
    instruct = shared_data("instruct", "instruction-data.json")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "quickstart.py", f"--source={source}", f"--instruct={instruct}",
           "--max_tokens=200000", "--pretrain_steps=4", "--finetune_steps=2", "--prompt=Name a color.",
           f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'out'}"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for step in range(1, 6):
        assert f"=== [{step}/5] done" in result.stdout
    assert os.path.exists(tmp_path / "out" / "base" / "ckpt.pt")
    chat = json.load(open(tmp_path / "out" / "chat" / "ckpt.json"))
    assert chat["kind"] == "chat"
    assert "chat with it: python sample.py" in result.stdout and "config/fineweb_124m.py" in result.stdout
