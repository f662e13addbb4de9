"""
A toy task whose answers a program checks, for trying rl.py on a CPU in minutes: write a few
letters backwards ("Write backwards: k e l p" -> "p l e k"). It writes, from one seed:
    <out_dir>/sft.jsonl        chat records (messages) to finetune a tiny chat model on (prepare_instruct.py)
    <out_dir>/rl_train.jsonl   prompt + answer records rl.py samples and rewards (--reward=exact_match)
    <out_dir>/rl_val.jsonl     held-out prompt + answer records for pass@1
    <out_dir>/text.txt         the chats' text, to train a byte-level tokenizer on (261 ids: a tiny output layer)
The three sets share no letter string, so pass@1 measures the skill, not memory.

    python prepare_toy_task.py                                  # data/reverse
    python train_tokenizer.py --source=data/reverse/text.txt --vocab_size=261 --out=data/reverse/tokenizer
    python prepare_instruct.py config/reverse_sft.py --tokenizer=data/reverse/tokenizer && python finetune.py config/reverse_sft.py
    python rl.py config/reverse_rl.py                           # pass@1 before and after: docs/benchmarks.md
"""

import json
import random
from dataclasses import dataclass

from gptkit.configurator import BaseConfig, configure
from gptkit.files import atomic_write_files
from gptkit.system import print0, run_main

LETTERS = "abcdefghijklmnopqrstuvwxyz"
PROMPT = "Write backwards: "


@dataclass
class ToyTaskConfig(BaseConfig):
    out_dir: str = "data/reverse"   # the three .jsonl files land here
    min_letters: int = 3            # shortest string
    max_letters: int = 6            # longest string
    sft_examples: int = 4000        # chat records for the first, supervised model
    rl_prompts: int = 4000          # prompts rl.py trains on
    val_prompts: int = 200          # held-out prompts for pass@1
    sft_copied: float = 0.6         # share of the chat records whose answer copies the letters instead of
                                    # reversing them: demonstrations with a mistake in them, as real ones have,
                                    # so that the SFT model can do the task but does not always, and the
                                    # exact-match reward has something to fix
    seed: int = 1337

    def validate(self):
        problems = super().validate()
        if not 0 <= self.sft_copied < 1:
            problems.append(f"sft_copied={self.sft_copied}: use a share in [0, 1)")
        if not 1 <= self.min_letters <= self.max_letters:
            problems.append(f"min_letters={self.min_letters} and max_letters={self.max_letters}: use 1 <= min <= max")
        need = self.sft_examples + self.rl_prompts + self.val_prompts
        if min(self.sft_examples, self.rl_prompts, self.val_prompts) < 1:
            problems.append("sft_examples, rl_prompts and val_prompts must each be at least 1")
        elif need > 0.5 * sum(len(LETTERS) ** n for n in range(self.min_letters, self.max_letters + 1)):
            problems.append(f"{need} distinct strings of {self.min_letters}-{self.max_letters} letters are too many "
                            "of all there are: raise max_letters or ask for fewer")
        return problems


def strings(cfg):
    """Distinct random letter strings (spaced: one token per letter), in a seeded order."""
    rng, seen = random.Random(cfg.seed), set()
    total = cfg.sft_examples + cfg.rl_prompts + cfg.val_prompts
    while len(seen) < total:
        n = rng.randint(cfg.min_letters, cfg.max_letters)
        seen.add(" ".join(rng.choice(LETTERS) for _ in range(n)))
    out = sorted(seen)
    rng.shuffle(out)
    return out


def main(cfg):
    words = strings(cfg)
    sft, train, val = (words[:cfg.sft_examples], words[cfg.sft_examples:cfg.sft_examples + cfg.rl_prompts],
                       words[cfg.sft_examples + cfg.rl_prompts:])

    def lines(records):
        return "".join(json.dumps(r) + "\n" for r in records).encode("utf-8")

    def task(w):
        return {"prompt": PROMPT + w, "answer": " ".join(reversed(w.split()))}

    copied = random.Random(cfg.seed + 1)  # its own stream: the strings stay the same whatever the share

    def demonstration(w):  # what the SFT model learns from: right, or the letters copied as they are
        return w if copied.random() < cfg.sft_copied else task(w)["answer"]

    files = {
        "sft.jsonl": lines({"messages": [{"role": "user", "content": PROMPT + w},
                                         {"role": "assistant", "content": demonstration(w)}]} for w in sft),
        "rl_train.jsonl": lines(task(w) for w in train),
        "text.txt": "".join(f"{PROMPT}{w}\n{task(w)['answer']}\n" for w in sft).encode("utf-8"),
        "rl_val.jsonl": lines(task(w) for w in val),
    }
    # rl_val.jsonl last: a folder holding it holds the other two from the same run
    atomic_write_files(cfg.out_dir, {name: (lambda f, data=data: f.write(data)) for name, data in files.items()},
                       marker="rl_val.jsonl")
    print0(f"wrote {len(sft)} chat records, {len(train)} train prompts and {len(val)} val prompts to {cfg.out_dir}; "
           f"next: python train_tokenizer.py --source={cfg.out_dir}/text.txt --vocab_size=261 "
           f"--out={cfg.out_dir}/tokenizer")


if __name__ == "__main__":
    run_main(main, configure(ToyTaskConfig))
