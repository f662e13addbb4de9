"""
Export a gptkit checkpoint as a Hugging Face transformers GPT-2 folder.

    python export_hf.py --ckpt=out/dolly --out=hf/dolly            # a chat model: tokenizer with chat template
    python export_hf.py --ckpt=out/fineweb_124m --out=hf/base      # a pretrained model
    python export_hf.py --ckpt=out/dolly --out=hf/dolly --push_to_hub=your-name/gptkit-dolly   # and upload it
    python export_hf.py --ckpt=out/dolly_lora --out=hf/dolly-lora                      # a LoRA run: a peft adapter folder
    python export_hf.py --ckpt=out/dolly_lora --out=hf/dolly-merged --merge_lora=True  # ... or its merged weights
    python export_hf.py --ckpt=out/dolly --space=spaces/dolly      # a Docker Space that serves it (serve.py)
    python export_hf.py --ckpt=out/dolly --space=spaces/dolly --push_to_hub=your-name/dolly-chat   # and create it
    python export_hf.py --ckpt=out/dolly --gguf=gguf/dolly.gguf --gguf_type=q8_0   # one GGUF file for llama.cpp and Ollama

The folder holds config.json (GPT2LMHeadModel), model.safetensors, generation_config.json and
GPT-2's tokenizer files with the chat tokens <|system|> <|user|> <|assistant|> <|end|> added (a
model trained with its own tokenizer, see train_tokenizer.py: that tokenizer.json, which the
checkpoint carries; transformers loads it as it is, with the same ids as gptkit), and a model card
(README.md with the Hub's metadata, and loss.png) filled from the run's log. A
checkpoint of kind "chat" (written by finetune.py) also gets a chat template that renders exactly
the ids gptkit's own renderer does, and puts the system prompt the model was finetuned with first
in a chat that brings none. Runs on the CPU, offline; transformers is not needed to export.
--push_to_hub=user/name then uploads the folder (log in first: `hf auth login`, or set HF_TOKEN);
without a token or network it says so in one line, and the exported folder stays as written.

    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained("hf/dolly")
    model = AutoModelForCausalLM.from_pretrained("hf/dolly")

A LoRA run (finetune.py or dpo.py with --lora_rank) holds only its adapters and names its base. By
default it exports as a peft adapter folder (adapter_config.json, adapter_model.safetensors, the
tokenizer files, a model card naming the base; --push_to_hub uploads it), which peft puts on the
base's own export:

    python export_hf.py --ckpt=out/fineweb_124m --out=hf/base          # the base, once
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("hf/base"), "hf/dolly-lora")

--merge_lora=True instead writes the base with the adapters folded in: a full folder as above.

--space=DIR writes a Hugging Face Space around the export instead (gptkit/space.py): the model in
DIR/model (a LoRA run merged, as serve.py needs the whole model), and beside it the Dockerfile,
the Space's README.md (sdk: docker) and the copies of serve.py and gptkit it runs. With
--push_to_hub=user/name it creates that Docker Space and uploads the folder; set the Space's secret
GPTKIT_API_KEY there, which the server requires. Try it here first with the command in DIR/README.md.

--gguf=FILE.gguf writes the model as one GGUF file instead (gptkit/gguf_export.py), which llama.cpp,
Ollama and LM Studio run: --gguf_type=f32, f16 (the default) or q8_0; a LoRA run merged; a chat
model with its chat template and <|end|> as its end of turn. Beside it, FILE.Modelfile for Ollama:

    ollama create dolly -f gguf/dolly.Modelfile && ollama run dolly
    llama-cli -m gguf/dolly.gguf -c 1024 -cnv                # llama.cpp's own chat, with the model's template

The other direction, starting a run from a Hugging Face GPT-2 folder (or a hub name when online):

    python train.py config/fineweb_124m.py --init_from=path/to/gpt2-folder
    python finetune.py config/dolly.py --init_from=gpt2-medium
"""

import os
from dataclasses import dataclass, field

from huggingface_hub.utils import validate_repo_id

from gptkit.checkpoint import resolve_path, trained_system_prompt
from gptkit.configurator import BaseConfig, configure
from gptkit.gguf_export import export_gguf, gguf_type_problems
from gptkit.hf import export_hf, export_peft_adapter
from gptkit.loading import ckpt_arg_problems, load_model
from gptkit.lock import hold_folder
from gptkit.lora import settings_of
from gptkit.modelcard import push_to_hub, run_facts, write_model_card
from gptkit.space import MODEL_DIR, write_space
from gptkit.system import print0, run_main, setup_runtime


@dataclass
class ExportConfig(BaseConfig):
    ckpt: str = ""  # the run directory (or ckpt.pt file) to export
    out: str = ""   # the folder to write; created if needed
    # the model card (README.md) and the upload
    license: str = "mit"  # the weights' license, as a Hub license id (mit, apache-2.0, cc-by-4.0, other, ...)
    datasets: list[str] = field(default_factory=list)  # Hub dataset ids trained on; empty: the one the run's shards came from, if any
    language: list[str] = field(default_factory=lambda: ["en"])  # ISO 639-1 codes of the training text
    push_to_hub: str = ""  # user/name: upload the folder to that Hub model repo (created if needed); empty: no upload
    private: bool = False  # a new Hub repo is private
    merge_lora: bool = False  # a LoRA run: write the merged model (a full folder) instead of a peft adapter folder
    space: str = ""  # a folder to write a Docker Space into (the model in SPACE/model); push_to_hub then creates a Space
    gguf: str = ""  # a .gguf file to write instead, for llama.cpp and Ollama (FILE.Modelfile beside it)
    gguf_type: str = "f16"  # the GGUF's weights: f32, f16 or q8_0

    def validate(self):
        problems = super().validate()
        problems += ckpt_arg_problems(self.ckpt, example="out/dolly", hf=False)
        problems += gguf_type_problems(self.gguf_type)
        if self.gguf:
            if self.out or self.space or self.push_to_hub:
                problems.append("give gguf alone: --gguf writes one file, without --out, --space or --push_to_hub")
            elif not self.gguf.endswith(".gguf") or os.path.isdir(self.gguf):
                problems.append(f"gguf={self.gguf!r}: give a file name ending in .gguf, such as --gguf=gguf/dolly.gguf")
        elif self.space:
            if self.out:
                problems.append(f"give out or space, not both: --space={self.space} writes the model into "
                                f"{os.path.join(self.space, MODEL_DIR)}")
            elif os.path.exists(self.space) and not os.path.isdir(self.space):
                problems.append(f"space={self.space!r} is a file: give a folder, such as --space=spaces/dolly")
            elif os.path.exists(os.path.join(self.space, "ckpt.pt")):
                problems.append(f"space={self.space!r} holds a gptkit run (ckpt.pt): give another folder")
        elif not self.out:
            problems.append("out is empty: give the folder to write, such as --out=hf/dolly (or --space=spaces/dolly)")
        elif os.path.exists(self.out) and not os.path.isdir(self.out):
            problems.append(f"out={self.out!r} is a file: give a folder")
        elif os.path.exists(os.path.join(self.out, "ckpt.pt")):  # its config.json is the run's own
            problems.append(f"out={self.out!r} holds a gptkit run (ckpt.pt), whose files the export would "
                            "overwrite: give another folder, such as --out=hf/NAME")
        if self.push_to_hub:
            try:
                validate_repo_id(self.push_to_hub)
                if self.push_to_hub.count("/") != 1:
                    raise ValueError("no owner")
            except ValueError:
                problems.append(f"push_to_hub={self.push_to_hub!r} is not a Hub repo name: give user/name, "
                                "such as --push_to_hub=your-name/gptkit-dolly")
        return problems


def main():
    cfg = configure(ExportConfig)
    # one writer: two exports at once would mix their files (a GGUF's: its folder)
    hold_folder(os.path.dirname(os.path.abspath(cfg.gguf)) if cfg.gguf else cfg.space or cfg.out)
    setup_runtime("cpu", "float32", cfg.seed)  # export is a copy of fp32 weights: no GPU needed
    if cfg.space:
        return export_space(cfg)
    if cfg.gguf:
        return export_gguf_file(cfg)
    # tok: the tokenizer the checkpoint carries; a LoRA run's adapters stay apart unless merged
    model, tok, ckpt = load_model(cfg.ckpt, device="cpu", merge_lora=cfg.merge_lora)
    chat = ckpt.get("kind") == "chat"
    if ckpt.get("lora") and not cfg.merge_lora:
        files = export_peft_adapter(model, cfg.out, tok, chat=chat, system=trained_system_prompt(ckpt))
        facts = run_facts(model, tok, ckpt, os.path.dirname(resolve_path(cfg.ckpt)))
        files += write_model_card(cfg.out, facts, cfg.push_to_hub, cfg.license, cfg.datasets, cfg.language,
                                  adapter=settings_of(model))
        print0(f"wrote the LoRA adapters of a {'chat' if chat else 'base'} model to {cfg.out}: {', '.join(files)}\n"
               f"their base: {ckpt['lora']['base']} (export it too, then load both with peft:)\n"
               "    from peft import PeftModel\n"
               f"    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_EXPORT), {cfg.out!r})")
        if cfg.push_to_hub:
            print0(f"uploaded to {push_to_hub(cfg.out, cfg.push_to_hub, cfg.private)}")
        return
    if cfg.merge_lora and not ckpt.get("lora"):
        print0(f"note: {cfg.ckpt} is not a LoRA run: merge_lora has nothing to merge")
    files = export_full(model, tok, ckpt, cfg, cfg.out, cfg.push_to_hub)
    print0(f"wrote a {'chat' if chat else 'base'} model to {cfg.out}: {', '.join(files)}")
    if chat:
        print0("note: transformers' tokenizer turns control-token text a person types (such as <|user|>) into "
               "the control token; gptkit's own scripts keep it text. Remove such strings from untrusted input "
               "before apply_chat_template.")
    print0("load it with:\n"
           "    from transformers import AutoModelForCausalLM, AutoTokenizer\n"
           f"    tokenizer = AutoTokenizer.from_pretrained({cfg.out!r})\n"
           f"    model = AutoModelForCausalLM.from_pretrained({cfg.out!r})")
    if cfg.push_to_hub:
        print0(f"uploaded to {push_to_hub(cfg.out, cfg.push_to_hub, cfg.private)}")


def export_full(model, tok, ckpt, cfg, out, repo_id):
    """The transformers folder and its model card -> the names written."""
    files = export_hf(model, out, tok, chat=ckpt.get("kind") == "chat", system=trained_system_prompt(ckpt))
    facts = run_facts(model, tok, ckpt, os.path.dirname(resolve_path(cfg.ckpt)))
    return files + write_model_card(out, facts, repo_id, cfg.license, cfg.datasets, cfg.language)


def export_gguf_file(cfg):
    """--gguf: the model (a LoRA run merged) as one GGUF file and its Ollama Modelfile."""
    model, tok, ckpt = load_model(cfg.ckpt, device="cpu", merge_lora=True)  # llama.cpp runs a whole model
    chat = ckpt.get("kind") == "chat"
    name = os.path.splitext(os.path.basename(cfg.gguf))[0]
    path, modelfile = export_gguf(model, cfg.gguf, tok, cfg.gguf_type, chat=chat, system=trained_system_prompt(ckpt),
                                  name=name)
    print0(f"wrote a {'chat' if chat else 'base'} model to {path} ({cfg.gguf_type}, "
           f"{os.path.getsize(path) / 2**20:.1f} MiB) and its Ollama Modelfile {modelfile}; run it with\n"
           f"    ollama create {name} -f {modelfile} && ollama run {name}\n"
           f"    llama-cli -m {path} -c {model.config.block_size}{' -cnv' if chat else ''}")


def export_space(cfg):
    """--space: the merged model in SPACE/model, the Space's files around it, and with push_to_hub
    the Docker Space created and uploaded."""
    model, tok, ckpt = load_model(cfg.ckpt, device="cpu", merge_lora=True)  # serve.py runs a whole model
    name = os.path.basename(os.path.normpath(cfg.space))
    export_full(model, tok, ckpt, cfg, os.path.join(cfg.space, MODEL_DIR), "")
    files = write_space(cfg.space, name=name, license=cfg.license)
    print0(f"wrote a Docker Space serving the {ckpt.get('kind', 'base')} model to {cfg.space}: "
           f"{MODEL_DIR}/ and {len(files)} files ({', '.join(f for f in files if '/' not in f)})\n"
           f"try it here first: see {os.path.join(cfg.space, 'README.md')} for its command")
    if cfg.push_to_hub:
        print0(f"created the Space {push_to_hub(cfg.space, cfg.push_to_hub, cfg.private, space=True)}: set its "
               "secret GPTKIT_API_KEY (Settings -> Variables and secrets), which the server requires")


if __name__ == "__main__":
    run_main(main)  # a bad checkpoint or output folder: one `error:` line, exit code 2
