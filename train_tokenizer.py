"""
Train your own byte-level BPE tokenizer on your text; every gptkit script can then use it with
--tokenizer=PATH (prepare_*.py record it in the data folder, checkpoints carry it).

    python train_tokenizer.py --source=path/to/text_folder --vocab_size=16384 --out=tokenizers/mytext
    python train_tokenizer.py config/own_text.py --source=path/to/text_folder --out=tokenizers/own_text
    python train_tokenizer.py --source=HuggingFaceFW/fineweb-edu --subset=sample-10BT --max_chars=1e9 \\
        --vocab_size=32768 --pattern=gpt4 --out=tokenizers/fineweb32k
    python prepare_fineweb.py --source=path/to/text_folder --tokenizer=tokenizers/mytext --data_dir=data/mytext

Reads the same sources as prepare_fineweb.py (gptkit/sources.py: local parquet/jsonl/txt files or
folders, or a hub dataset streamed), normalised the same way (CRLF -> LF, no BOM), up to max_chars
characters. About 1% of the documents (chosen by the same stable hash as prepare_fineweb's val
split) are held out to measure bytes per token against GPT-2. Writes <out>/tokenizer.json and
<out>/summary.txt, as the folder's one writer (gptkit/lock.py).

The BPE trainer is the Hugging Face `tokenizers` library's (multi-core Rust; its tokenizer.json is
what transformers loads). Byte-level: every UTF-8 text round-trips exactly, no unknown token.
Text is first split with the GPT-2 or GPT-4 pattern (--pattern), so no token spans a word and its
punctuation. The control tokens sit at ids 0-4 (<|endoftext|> <|system|> <|user|> <|assistant|>
<|end|>), then the 256 bytes, then the merges. The same text and settings give a byte-identical file.
"""

import os
import time
from dataclasses import dataclass

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from gptkit.configurator import BaseConfig, UserError, configure, print_config
from gptkit.documents import normalize_text, split_hash
from gptkit.files import atomic_write
from gptkit.lock import hold_folder, release_folder
from gptkit.sources import open_records, source_problems
from gptkit.system import print0, run_main
from gptkit.tokenizer import CONTROL_TOKENS, MAX_VOCAB, PATTERNS, TOKENIZER_FILE, load_tokenizer

HELD_OUT = 0.01  # share of documents kept out of training, to measure bytes per token


@dataclass
class TokenizerConfig(BaseConfig):
    source: str = "HuggingFaceFW/fineweb-edu"  # as prepare_fineweb.py: hub dataset name, or local parquet/jsonl/txt file or folder
    subset: str = "sample-10BT"                # hub config (ignored for local files)
    vocab_size: int = 16384                    # tokens, control tokens included: 261 (bytes + 5 controls) to 65,536
    pattern: str = "gpt2"                      # pre-tokenizer split: gpt2 or gpt4
    max_chars: int = 100_000_000               # read at most this many characters (training + held out)
    out: str = ""                              # folder to write tokenizer.json and summary.txt (the other scripts' --tokenizer)

    def validate(self):
        problems = super().validate()
        least = 256 + len(CONTROL_TOKENS)
        if not least <= self.vocab_size <= MAX_VOCAB:
            problems.append(f"vocab_size={self.vocab_size}: use {least} (256 bytes + {len(CONTROL_TOKENS)} control "
                            f"tokens) to {MAX_VOCAB} (shards store uint16 ids); 16384 or 32768 are usual")
        if self.pattern not in PATTERNS:
            problems.append(f"pattern={self.pattern!r}: use gpt2 or gpt4")
        if self.max_chars < 1:
            problems.append(f"max_chars={self.max_chars}: must be at least 1")
        if not self.out or self.out == "gpt2":
            problems.append("out is empty: give the folder to write, such as --out=tokenizers/mytext")
        return problems + source_problems(self.source)


def read_corpus(cfg):
    """-> (training documents, held-out documents), normalised as prepare_fineweb.py does, at most
    max_chars characters in all, with a progress bar."""
    train, held, chars = [], [], 0
    with tqdm(total=cfg.max_chars, unit="char", unit_scale=True, desc="reading") as bar:
        for record_id, text in open_records(cfg.source, cfg.subset):
            text = normalize_text(text or "")[:cfg.max_chars - chars]  # a record without text (None) adds nothing
            if not text:
                continue
            (held if split_hash(record_id, text) < HELD_OUT else train).append(text)
            chars += len(text)
            bar.update(len(text))
            if chars >= cfg.max_chars:
                break
    if not train:
        raise UserError(f"source={cfg.source} holds no text to train on ({chars} characters read): give a "
                        "source with documents in it")
    if not held:  # a tiny source: its last document is measured instead (it was also trained on)
        held = train[-1:]
    return train, held


def build_and_train(texts, vocab_size, pattern):
    """A byte-level BPE trained on texts -> its tokenizer.json text."""
    tok = tokenizers.Tokenizer(models.BPE())  # no unk_token: every byte is in the vocabulary
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(PATTERNS[pattern]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # bytes -> printable characters
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(CONTROL_TOKENS), show_progress=True,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return tok.to_str()


def bytes_per_token(tok, texts):
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return n_bytes / max(1, sum(len(ids) for ids in tok.encode_batch(texts)))


def main(cfg):
    out = cfg.out
    hold_folder(out)  # one writer: two runs at once could leave one's tokenizer.json beside the other's summary
    train, held = read_corpus(cfg)
    n_chars = sum(len(t) for t in train)
    start = time.time()
    text = build_and_train(train, cfg.vocab_size, cfg.pattern)
    seconds = time.time() - start
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, TOKENIZER_FILE)
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
    tok, gpt2 = load_tokenizer(out, key="out"), load_tokenizer("gpt2")
    ours, theirs = bytes_per_token(tok, held), bytes_per_token(gpt2, held)
    summary = (f"tokenizer: {path} ({tok.hash})\n"
               f"trained on: {cfg.source} ({n_chars:,} characters in {len(train):,} documents) in {seconds:.1f}s\n"
               f"vocabulary: {tok.n_vocab:,} tokens (asked {cfg.vocab_size:,}); the model pads it to {tok.vocab_size:,}\n"
               f"split pattern: {cfg.pattern}\n"
               "control tokens: " + ", ".join(f"{t} {i}" for i, t in enumerate(CONTROL_TOKENS)) + "\n"
               f"bytes per token on {sum(len(t) for t in held):,} held-out characters: {ours:.3f} "
               f"(GPT-2: {theirs:.3f}, {ours / theirs - 1:+.1%})\n")
    atomic_write(os.path.join(out, "summary.txt"), lambda f: f.write(summary.encode("utf-8")))
    print0(summary + f"next: python prepare_fineweb.py --source={cfg.source} --tokenizer={out} --data_dir=data/NAME"
           f"   (chat data: python prepare_instruct.py --tokenizer={out} ...)")
    release_folder(out)  # (on an error it is released when the process ends)


if __name__ == "__main__":
    cfg = configure(TokenizerConfig)
    print_config(cfg)
    run_main(main, cfg, on_interrupt="nothing was written")
