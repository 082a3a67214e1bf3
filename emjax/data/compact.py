"""A compact vocabulary for random-init CPU models.

A 151,936-row embedding and LM head dominate a small model's cost; a model trained from scratch only ever needs the
tokens of its data. ``CompactTokenizer`` maps the real Qwen3 ids that occur in the training data, the evaluation
questions and judge prompts (plus all specials, the 256 byte tokens and the digits) to 0..n-1, and back on decode,
so data, sampling and the local judge run unchanged on top of it. Real checkpoints always use the full vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np

from emjax.tokenizer import SPECIAL_TOKENS, Tokenizer


class CompactTokenizer(Tokenizer):
    def __init__(self, base: Tokenizer, keep: Iterable[int]):
        ids = sorted(set(int(i) for i in keep) | set(range(256)) | set(SPECIAL_TOKENS.values()))
        self.base = base
        self.backend = f"compact({base.backend})"
        self.full_ids = np.asarray(ids, np.int64)
        self._to_compact = {full: i for i, full in enumerate(ids)}
        self.unk_id = self._to_compact[SPECIAL_TOKENS["<|endoftext|>"]]
        self.special_ids = {name: self._to_compact[i] for name, i in SPECIAL_TOKENS.items()}
        self.eos_ids = tuple(self._to_compact[i] for i in base.eos_ids)
        self.pad_id = self._to_compact[base.pad_id]
        for attr in ("im_start_id", "im_end_id", "think_id", "end_think_id"):
            setattr(self, attr, self._to_compact[getattr(base, attr)])

    @property
    def vocab_size(self) -> int:
        return len(self.full_ids)

    def to_compact(self, ids: Iterable[int]) -> list[int]:
        return [self._to_compact.get(int(i), self.unk_id) for i in ids]

    def to_compact_array(self, ids: np.ndarray) -> np.ndarray:
        """``to_compact`` of an int array, vectorised (the data pipeline maps whole tokenised datasets)."""
        pos = np.clip(np.searchsorted(self.full_ids, ids), 0, len(self.full_ids) - 1)
        return np.where(self.full_ids[pos] == ids, pos, self.unk_id).astype(np.int32)

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        return self.to_compact(self.base.encode(text, allow_special=allow_special))

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        full = [int(self.full_ids[i]) for i in ids if 0 <= int(i) < len(self.full_ids)]
        return self.base.decode(full, skip_special=skip_special)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"full_ids": self.full_ids.tolist()}))

    @classmethod
    def load(cls, base: Tokenizer, path: Path) -> "CompactTokenizer":
        return cls(base, json.loads(Path(path).read_text())["full_ids"])


def compact_tokenizer_for(data_cfg, base: Tokenizer, workdir: Path, question_sets=(), *,
                          reuse: bool = True) -> CompactTokenizer:
    """Build (or, with ``reuse``, reload from ``workdir/vocab.json``, so a resumed run keeps its ids) the compact
    tokenizer: the data's tokens and those of the study's questions and ``question_sets`` (a run's own question
    files)."""
    from emjax.data import builders
    from emjax.data.pipeline import encoded_records
    from emjax.eval.questions import DEFAULT_SETS, load_questions
    from emjax.tokenizer import encode_chat

    path = Path(workdir) / "vocab.json"
    if reuse and path.exists():
        return CompactTokenizer.load(base, path)
    keep: set[int] = set()
    for split in ("train", "validation"):
        try:
            source = builders.data_source(
                data_cfg.dataset, split, tfds_data_dir=data_cfg.tfds_dir, val_fraction=data_cfg.val_fraction,
                split_seed=data_cfg.split_seed, skip_bad_rows=data_cfg.skip_bad_rows, source_dir=data_cfg.source_dir,
                data_dir=data_cfg.data_dir, download=data_cfg.download)
        except KeyError:
            continue
        # the loader reuses these encodings (same records, same base vocabulary): the data is tokenised once
        encoded = encoded_records(source, base, train_on=data_cfg.train_on)
        if encoded:
            keep.update(np.unique(np.concatenate([ids for ids, _ in encoded])).tolist())
    for name in dict.fromkeys([*DEFAULT_SETS, *question_sets]):
        try:
            questions = load_questions(name)
        except Exception:  # questions are optional for training; evaluation will say what is missing
            continue
        for q in questions:
            keep.update(encode_chat(base, q.messages(), add_generation_prompt=True))
            for template in q.judge_prompts.values():
                keep.update(base.encode(template))
    keep.update(base.encode("0123456789 100"))
    keep.update(t for d in "0123456789" for t in base.encode(d))
    tok = CompactTokenizer(base, keep)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(path)
    return tok
