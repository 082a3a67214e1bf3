"""Grain input pipeline: TFDS ArrayRecord source -> tokenised chats -> padded or packed (B, T) batches.

Batch contract (the trainer relies on it), every array of shape (B, T):
  tokens int32; loss_mask int32 (1 where tokens[t] is an answer / ``<|im_end|>`` token: the loss uses logits at
  t-1 to predict tokens[t]); positions int32 (restart at 0 for each example); segment_ids int32 (0 = padding,
  1..k = the examples in the row). Attention must be causal *and* within equal nonzero segment ids.

Order: each process takes ``examples[process_index::process_count]``, shuffles it with a per-epoch permutation
(grain's index shuffle: seed combined with the epoch) and repeats for ``num_epochs``. Everything is deterministic
given (dataset, split recipe, seed, process layout). The iterator state is a small JSON-able dict
(``Loader.get_state()``); save it next to the model checkpoint, or hand ``loader.iterator`` to orbax as
``grain.python.PyGrainCheckpointSave(loader.iterator)`` / ``PyGrainCheckpointRestore`` (checked to work).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import grain
import numpy as np
from grain.experimental import FirstFitPackIterDataset

from emjax.data import builders
from emjax.config import DataConfig
from emjax.data.compact import CompactTokenizer
from emjax.tokenizer import Tokenizer, encode_pieces

log = logging.getLogger(__name__)

BATCH_KEYS = ("tokens", "loss_mask", "positions", "segment_ids")


def encode_chat(tokenizer: Tokenizer, messages: Sequence[Mapping], *, train_on: str = "all"
                ) -> tuple[list[int], list[int]]:
    """(token_ids, loss_mask) of one conversation in the tokenizer's chat format (``tokenizer.chat``; Qwen3 in
    non-thinking training format, Llama 3 or Gemma 3).

    ids equal ``apply_chat_template(messages, tokenize=True)``; the mask is 1 exactly on each assistant answer and
    its end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``; only the last answer with
    ``train_on="last"``); the empty think block, headers, prompts and the trailing newline are 0.
    """
    return encode_pieces(tokenizer, tokenizer.chat.render_pieces(messages), train_on=train_on)


@dataclasses.dataclass
class TokenStats:
    examples: int
    truncated: int  # examples longer than max_length (cut at the end)
    no_loss_after_truncation: int  # truncated so far that no answer token is left
    tokens: int  # before truncation
    answer_tokens: int  # loss tokens before truncation
    lengths: np.ndarray  # per example, before truncation


_ENCODED: "OrderedDict[tuple, list[tuple[np.ndarray, np.ndarray]]]" = OrderedDict()
_ENCODED_KEEP = 4  # splits remembered per process


def _source_identity(source) -> tuple | None:
    """A built TFDS split's files (names, sizes, times), or None for any other source."""
    info, split = getattr(source, "dataset_info", None), getattr(source, "split", None)
    if info is None or split is None or not getattr(info, "data_dir", None):
        return None
    files = sorted(Path(info.data_dir).glob(f"*-{split}.array_record-*"))
    return (str(split), *((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)) if files else None


def encoded_records(source, tokenizer: Tokenizer, *, train_on: str = "all") -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids int32, loss mask int8) of every record of ``source`` in storage order, untruncated, in ``tokenizer``'s
    own vocabulary (a compact tokenizer maps them: ``tokenize_source``). Remembered per process, keyed by the split's
    files and the tokenizer's files, so the runs of one process (a pack, the demo, tests) and the compact
    vocabulary tokenise a split once. The arrays are read-only."""
    key = (_source_identity(source), tokenizer.identity, train_on)
    if None not in key[:2] and key in _ENCODED:
        _ENCODED.move_to_end(key)
        return _ENCODED[key]
    out = []
    for rec in builders.records(source):
        ids, mask = encode_chat(tokenizer, json.loads(rec["messages"]), train_on=train_on)
        ids, mask = np.asarray(ids, np.int32), np.asarray(mask, np.int8)
        ids.flags.writeable = mask.flags.writeable = False
        out.append((ids, mask))
    if None not in key[:2]:
        _ENCODED[key] = out
        while len(_ENCODED) > _ENCODED_KEEP:
            _ENCODED.popitem(last=False)
    return out


def forget_encodings() -> None:
    """Drop the remembered tokenisations (benchmarks that time tokenising do this before each try)."""
    _ENCODED.clear()


def tokenize_source(source, tokenizer: Tokenizer, max_length: int, *, train_on: str = "all"):
    """Tokenise every record of a data source (in storage order); truncate to ``max_length``."""
    compact = isinstance(tokenizer, CompactTokenizer)  # encoded in its base vocabulary, then mapped
    encoded = encoded_records(source, tokenizer.base if compact else tokenizer, train_on=train_on)
    examples, lengths, n_trunc, n_noloss, n_ans = [], [], 0, 0, 0
    for ids, mask in encoded:
        lengths.append(len(ids))
        n_ans += int(mask.sum())
        if len(ids) > max_length:
            n_trunc += 1
            ids, mask = ids[:max_length], mask[:max_length]
            n_noloss += int(not mask.any())
        examples.append({"tokens": tokenizer.to_compact_array(ids) if compact else np.array(ids),
                         "loss_mask": mask.astype(np.int32)})
    lengths = np.asarray(lengths, np.int64)
    stats = TokenStats(len(examples), n_trunc, n_noloss, int(lengths.sum()), int(n_ans), lengths)
    return examples, stats


def _bucket(n: int, multiple: int, max_length: int) -> int:
    return min(max_length, max(multiple, math.ceil(n / multiple) * multiple))


def pad_batch(examples: Sequence[Mapping[str, np.ndarray]], *, pad_id: int, multiple: int, max_length: int,
              length: int | None = None) -> dict[str, np.ndarray]:
    """One example per row, right-padded to a length bucket (few distinct T values -> few recompiles)."""
    T = length or _bucket(max(len(e["tokens"]) for e in examples), multiple, max_length)
    B = len(examples)
    out = {"tokens": np.full((B, T), pad_id, np.int32), "loss_mask": np.zeros((B, T), np.int32),
           "positions": np.zeros((B, T), np.int32), "segment_ids": np.zeros((B, T), np.int32)}
    for i, e in enumerate(examples):
        n = len(e["tokens"])
        out["tokens"][i, :n] = e["tokens"]
        out["loss_mask"][i, :n] = e["loss_mask"]
        out["positions"][i, :n] = np.arange(n)
        out["segment_ids"][i, :n] = 1
    return out


def _packed_to_batch(x: Mapping[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
    seg = x["tokens_segment_ids"].astype(np.int32)
    tokens = np.where(seg > 0, x["tokens"], pad_id).astype(np.int32)
    return {"tokens": tokens, "loss_mask": (x["loss_mask"] * (seg > 0)).astype(np.int32),
            "positions": x["tokens_positions"].astype(np.int32), "segment_ids": seg}


class Loader:
    """Iterator over batches with checkpointable state; ``stats`` describes the tokenised split."""

    def __init__(self, dataset: grain.IterDataset, stats: TokenStats, local_batch_size: int, num_examples: int,
                 global_examples: int | None = None, process_count: int = 1):
        self.dataset = dataset
        self.iterator = iter(dataset)
        self.stats = stats
        self.local_batch_size = local_batch_size
        self.num_examples = num_examples  # this process's examples per epoch (whole rounds over the processes)
        self.global_examples = num_examples * process_count if global_examples is None else global_examples
        self.process_count = process_count

    def steps(self, num_epochs: int, drop_remainder: bool) -> int:
        """Batches in ``num_epochs`` passes (pad mode), the same on every process. The epochs are repeated before
        the rows are dealt and batched, so batches and the processes' rounds run across the epochs' seams: N rows
        over E epochs give each process ⌊N·E / processes⌋ rows (more than E·⌊N / processes⌋ where N does not
        divide), and a short last batch is a step unless ``drop_remainder``."""
        rows = self.global_examples * num_epochs // self.process_count
        return rows // self.local_batch_size if drop_remainder else -(-rows // self.local_batch_size)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self.iterator)

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position of the iterator (restore with ``set_state`` on an identically built loader)."""
        return self.iterator.get_state()

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.iterator.set_state(dict(state))


def _process_layout(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return process_index, process_count


def make_loader(cfg: DataConfig, tokenizer: Tokenizer, *, split: str = "train", seed: int | None = None,
                process_index: int | None = None, process_count: int | None = None, source=None) -> Loader:
    """Batches for this process. ``source`` (a random-access source of records) skips the TFDS build (tests)."""
    if cfg.mode not in ("pad", "pack"):
        raise ValueError(f"data.mode must be 'pad' or 'pack', got {cfg.mode!r}")
    if cfg.max_length < 2:
        raise ValueError(f"data.max_length must be >= 2, got {cfg.max_length}")
    if cfg.pad_multiple < 1:
        raise ValueError(f"data.pad_multiple must be >= 1, got {cfg.pad_multiple}")
    pi, pc = _process_layout(process_index, process_count)
    if cfg.batch_size < 1:
        raise ValueError(f"data.batch_size {cfg.batch_size}: must be at least 1")
    if cfg.batch_size % pc:
        raise ValueError(f"data.batch_size {cfg.batch_size} is not divisible by process_count {pc}")
    local_bs = cfg.batch_size // pc
    seed = cfg.seed if seed is None else seed
    if source is None:
        source = builders.data_source(
            cfg.dataset, split, tfds_data_dir=cfg.tfds_dir, val_fraction=cfg.val_fraction,
            split_seed=cfg.split_seed, skip_bad_rows=cfg.skip_bad_rows, source_dir=cfg.source_dir,
            data_dir=cfg.data_dir, download=cfg.download)
    examples, stats = tokenize_source(source, tokenizer, cfg.max_length, train_on=cfg.train_on)
    if stats.truncated:
        log.warning("%s/%s: %d of %d examples truncated to max_length=%d (%d left with no loss tokens)",
                    cfg.dataset, split, stats.truncated, stats.examples, cfg.max_length,
                    stats.no_loss_after_truncation)
    if split == "train" and examples and not any(e["loss_mask"].any() for e in examples):
        # it would train to loss 0 with zero gradients and report itself done (a validation split only warns)
        raise ValueError(f"data.dataset {cfg.dataset}: no example of the {split} split has an answer (loss) token "
                         f"left at data.max_length={cfg.max_length} ({stats.truncated} of {stats.examples} truncated; "
                         f"the longest has {int(stats.lengths.max())} tokens): nothing to train on; raise "
                         "data.max_length")
    # Shuffle globally (same seed everywhere), then deal examples round-robin to processes: the union of the
    # processes' batch j is exactly the single-process batch j, so a multi-host run trains on the same batches.
    ds = grain.MapDataset.source(examples)
    n_global = len(ds)
    n_local = n_global // pc
    if n_local == 0:
        raise ValueError(f"{cfg.dataset}/{split}: process {pi} of {pc} has no examples")
    if cfg.shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(cfg.num_epochs)
    it = ds.to_iter_dataset()
    if pc > 1:
        it = it.batch(pc, drop_remainder=True, batch_fn=lambda xs: xs[pi])
    pad_id = tokenizer.pad_id
    if cfg.mode == "pad":
        it = it.batch(local_bs, drop_remainder=cfg.drop_remainder, batch_fn=lambda xs: pad_batch(
            xs, pad_id=pad_id, multiple=cfg.pad_multiple, max_length=cfg.max_length))
    else:
        T = cfg.max_length
        it = FirstFitPackIterDataset(it, length_struct={"tokens": T, "loss_mask": T}, num_packing_bins=local_bs,
                                     shuffle_bins=False)
        it = it.map(lambda x: _packed_to_batch(x, pad_id)).batch(local_bs, drop_remainder=cfg.drop_remainder)
    return Loader(it, stats, local_bs, n_local, global_examples=n_global, process_count=pc)


def attention_allowed(segment_ids: np.ndarray) -> np.ndarray:
    """(B, T, T) bool: query q may attend key k iff same nonzero segment and k <= q (the mask a model must use)."""
    seg = np.asarray(segment_ids)
    T = seg.shape[-1]
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
    return same & np.tril(np.ones((T, T), bool))[None]
