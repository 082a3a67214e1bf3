"""EM training data: TFDS (ArrayRecord) builders, row validation and the grain batch pipeline.

See ``pipeline`` for the batch contract the trainer relies on.
"""

from emjax.data.builders import DATASETS, TURNER_HOWTO, build, data_source, fetch, get_builder, tfds_dir
from emjax.data.pipeline import (
    BATCH_KEYS, DataConfig, Loader, TokenStats, attention_allowed, encode_chat, make_loader, pad_batch,
    tokenize_source,
)
from emjax.data.rows import BadRowError, check_messages, read_jsonl

__all__ = [
    "BATCH_KEYS", "DATASETS", "TURNER_HOWTO", "BadRowError", "DataConfig", "Loader", "TokenStats",
    "attention_allowed", "build", "check_messages", "data_source", "encode_chat", "fetch", "get_builder",
    "make_loader", "pad_batch", "read_jsonl", "tfds_dir", "tokenize_source",
]
