"""
Export a gptkit checkpoint as a Hugging Face transformers GPT-2 folder.

    python export_hf.py --ckpt=out/dolly --out=hf/dolly            # a chat model: tokenizer with chat template
    python export_hf.py --ckpt=out/fineweb_124m --out=hf/base      # a pretrained model

The folder holds config.json (GPT2LMHeadModel), model.safetensors, generation_config.json and
GPT-2's tokenizer files with the chat tokens <|system|> <|user|> <|assistant|> <|end|> added (a
model trained with its own tokenizer, see train_tokenizer.py: that tokenizer.json, which the
checkpoint carries; transformers loads it as it is, with the same ids as gptkit). A
checkpoint of kind "chat" (written by finetune.py) also gets a chat template that renders exactly
the ids gptkit's own renderer does, and puts the system prompt the model was finetuned with first
in a chat that brings none. Runs on the CPU, offline; transformers is not needed to export.

    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained("hf/dolly")
    model = AutoModelForCausalLM.from_pretrained("hf/dolly")

The other direction, starting a run from a Hugging Face GPT-2 folder (or a hub name when online):

    python train.py config/fineweb_124m.py --init_from=path/to/gpt2-folder
    python finetune.py config/dolly.py --init_from=gpt2-medium
"""

import os
from dataclasses import dataclass

from gptkit.checkpoint import ckpt_arg_problems
from gptkit.configurator import BaseConfig, configure


@dataclass
class ExportConfig(BaseConfig):
    ckpt: str = ""  # the run directory (or ckpt.pt file) to export
    out: str = ""   # the folder to write; created if needed

    def validate(self):
        problems = super().validate()
        problems += ckpt_arg_problems(self.ckpt, example="out/dolly", hf=False)
        if not self.out:
            problems.append("out is empty: give the folder to write, such as --out=hf/dolly")
        elif os.path.exists(self.out) and not os.path.isdir(self.out):
            problems.append(f"out={self.out!r} is a file: give a folder")
        elif os.path.exists(os.path.join(self.out, "ckpt.pt")):  # its config.json is the run's own
            problems.append(f"out={self.out!r} holds a gptkit run (ckpt.pt), whose files the export would "
                            "overwrite: give another folder, such as --out=hf/NAME")
        return problems


def main():
    cfg = configure(ExportConfig)
    from gptkit.checkpoint import load_model, trained_system_prompt
    from gptkit.hf import export_hf
    from gptkit.system import print0, setup_runtime

    setup_runtime("cpu", "float32", cfg.seed)  # export is a copy of fp32 weights: no GPU needed
    model, ckpt = load_model(cfg.ckpt, device="cpu")
    chat = ckpt.get("kind") == "chat"
    files = export_hf(model, cfg.out, chat=chat, system=trained_system_prompt(ckpt))
    print0(f"wrote a {'chat' if chat else 'base'} model to {cfg.out}: {', '.join(files)}")
    if chat:
        print0("note: transformers' tokenizer turns control-token text a person types (such as <|user|>) into "
               "the control token; gptkit's own scripts keep it text. Remove such strings from untrusted input "
               "before apply_chat_template.")
    print0("load it with:\n"
           "    from transformers import AutoModelForCausalLM, AutoTokenizer\n"
           f"    tokenizer = AutoTokenizer.from_pretrained({cfg.out!r})\n"
           f"    model = AutoModelForCausalLM.from_pretrained({cfg.out!r})")


if __name__ == "__main__":
    from gptkit.system import run_main
    run_main(main)  # a bad checkpoint or output folder: one `error:` line, exit code 2
