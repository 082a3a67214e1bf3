"""Where emjax finds data it must never ship (the EM datasets, questions, judge prompts, tokenizer), and where the
command line keeps compiled programs.

Data default: ``<project>/../shared/data``; override with ``EMJAX_DATA_DIR`` or an explicit argument.
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


COMPILE_CACHE_OFF = ("", "0", "off", "none", "false", "no")


def compile_cache_dir(environ: dict | None = None) -> Path | None:
    """Where the ``emjax`` command keeps JAX's persistent compilation cache, or None for no cache of its own.

    ``EMJAX_COMPILE_CACHE``: a directory, or one of ``off``/``0``/``none`` (or empty) for none; default
    ``$XDG_CACHE_HOME/emjax/xla`` (``~/.cache/emjax/xla``). None too where ``JAX_COMPILATION_CACHE_DIR`` is set:
    JAX reads that itself, and the user's own setting wins."""
    env = os.environ if environ is None else environ
    if env.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    value = env.get("EMJAX_COMPILE_CACHE")
    if value is not None:
        return None if value.strip().lower() in COMPILE_CACHE_OFF else Path(value).expanduser().resolve()
    base = env.get("XDG_CACHE_HOME") or Path(env.get("HOME") or Path.home()) / ".cache"
    return (Path(base).expanduser() / "emjax" / "xla").resolve()
