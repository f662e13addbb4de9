"""
FineWeb-Edu (or local parquet/jsonl/txt) -> GPT-2 token shards with a document-level train/val split.
(Work in progress: only the configuration is defined so far.)
"""

from dataclasses import dataclass

from gptkit.configurator import BaseConfig, configure


@dataclass
class PrepareConfig(BaseConfig):
    source: str = "HuggingFaceFW/fineweb-edu"  # hub dataset name, or a local file/folder of parquet, jsonl or txt
    subset: str = "sample-10BT"                # hub config: sample-10BT, sample-100BT, sample-350BT, default
    data_dir: str = "data/fineweb_edu"         # where the shards go
    shard_tokens: int = 100_000_000            # tokens per shard (200 MB of uint16)
    val_tokens: int = 10_485_760               # about this many tokens go to val, chosen per document
    max_tokens: int = 0                        # stop after this many tokens in all (0: the whole source)
    num_proc: int = 0                          # tokenizer processes; 0: all cores


if __name__ == "__main__":
    cfg = configure(PrepareConfig)
