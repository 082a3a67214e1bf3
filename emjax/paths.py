"""Where emjax finds data it must never ship (the EM datasets, questions, judge prompts, tokenizer), and where the
command line keeps compiled programs; and how it writes a file a reader must never see half-written.

Data default: ``<project>/../shared/data``; override with ``EMJAX_DATA_DIR`` or an explicit argument.
"""

from __future__ import annotations

import os
import re
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


def local_dir(value: str | os.PathLike, key: str) -> Path:
    """``value`` as a local directory for what emjax writes, or a ValueError naming ``key`` for a URL (``gs://``,
    ``s3://``): work directories are written through the local filesystem (appended logs, renames, orbax's local
    paths), and ``Path("gs://b/r")`` would quietly become the local directory ``gs:/b/r`` on each host."""
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", str(value)):
        raise ValueError(f"{key} {value}: a URL, and emjax writes to directories of the local filesystem; on "
                         "several hosts use a shared disk every host mounts (Filestore, NFS) and copy results to "
                         "a bucket afterwards (gcloud storage rsync)")
    return Path(value)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same directory and one ``os.replace``: a kill
    mid-write leaves the old file or the new one, never a torn one (a reader of ``final.json`` or ``summary.json``
    would take a torn file for a damaged run). The temporary name carries the process id, so two processes writing
    the same file never write into each other's temporary."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
