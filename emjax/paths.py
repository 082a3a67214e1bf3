"""Where emjax finds data it must never ship (the EM datasets, questions, judge prompts, tokenizer).

Default: ``<project>/../shared/data``; override with ``EMJAX_DATA_DIR`` or an explicit argument.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """Root of the shared data tree (contains ``em/`` and ``tokenizers/``)."""
    if override:
        return Path(override).expanduser().resolve()
    env = os.environ.get("EMJAX_DATA_DIR")
    if env:
        return Path(env).expanduser().resolve()
    return (PROJECT_ROOT.parent / "shared" / "data").resolve()


def em_dir(override: str | os.PathLike | None = None) -> Path:
    return data_dir(override) / "em"


def qwen3_tokenizer_dir(override: str | os.PathLike | None = None) -> Path:
    return data_dir(override) / "tokenizers" / "qwen3"
