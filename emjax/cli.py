"""``emjax`` command line: one sub-command per concept, each dispatched lazily to its module's ``main(argv)``.

Lazy imports keep ``emjax --help`` instant and let each module own its arguments.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path

from emjax import paths

COMMANDS = {
    "demo": ("emjax.demo", "run the CPU demo (the README's main job)"),
    "data": ("emjax.data.cli", "dataset commands: build, stats, fetch"),
    "train": ("emjax.train", "LoRA fine-tuning from a config"),
    "eval": ("emjax.eval.cli", "sample answers and judge them"),
    "sweep": ("emjax.sweep", "run or print a sweep of training runs"),
    "report": ("emjax.report", "tables and figures from a sweep directory"),
}


def _usage() -> str:
    lines = ["usage: emjax COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


# the default cache's size limit (JAX evicts the least recently used programs beyond it; JAX_COMPILATION_CACHE_MAX_SIZE
# overrides it, -1 for none)
COMPILE_CACHE_MAX_BYTES = 8 * 2**30


def use_compile_cache(environ: dict | None = None) -> Path | None:
    """Turn on JAX's persistent compilation cache at ``emjax.paths.compile_cache_dir()`` (unless JAX already has a
    cache directory): compiled programs outlive the process, so a resumed run, a sweep's next run with the same
    shapes and the same evaluation sampler load their programs instead of compiling them again (tens of seconds
    each on a GPU even for a tiny model; XLA:GPU's autotuning results are kept there too). Must run before the first
    compile: JAX fixes its cache then. Before JAX is imported it only sets the variables JAX reads at import (no
    JAX import at start-up: ≈ 1.2 s for a command that needs none; the processes this one starts inherit them);
    after, it updates JAX's config. Returns the directory, or None where none was set here."""
    env = os.environ if environ is None else environ
    path = paths.compile_cache_dir(env)
    jax = sys.modules.get("jax")
    if path is None or (jax is not None and jax.config.values["jax_compilation_cache_dir"]):
        return None
    try:  # JAX would raise inside the first compile if it could not make the directory
        path.mkdir(parents=True, exist_ok=True)
        writable = os.access(path, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        print(f"emjax: no compilation cache: {path} is not writable (set EMJAX_COMPILE_CACHE to a directory, or off)",
              file=sys.stderr)
        return None
    if jax is None:
        env["JAX_COMPILATION_CACHE_DIR"] = str(path)
        env.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(COMPILE_CACHE_MAX_BYTES))
    else:
        jax.config.update("jax_compilation_cache_dir", str(path))
        if "JAX_COMPILATION_CACHE_MAX_SIZE" not in env:
            jax.config.update("jax_compilation_cache_max_size", COMPILE_CACHE_MAX_BYTES)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"emjax: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    use_compile_cache()
    module = importlib.import_module(COMMANDS[name][0])
    # each command turns its own bad input into one line (user_error), and only that: a ValueError from a bug in
    # emjax keeps its traceback where the command says so (emjax report)
    return int(module.main(rest) or 0)


PREEMPTED = 3  # exit status of `emjax train` and `emjax sweep` when a run stopped for SIGTERM: rerun to resume


def exit_status(statuses) -> int:
    """The exit status for runs ending in ``statuses`` (done | failed | preempted | skipped), the same for
    ``emjax train`` and ``emjax sweep``: a preemption first (rerunning resumes it), then a failure."""
    statuses = set(statuses)
    return PREEMPTED if "preempted" in statuses else 1 if "failed" in statuses else 0


class UserError(Exception):
    """A failure the user can act on that is not a ValueError or OSError (e.g. the judge endpoint refused the key);
    this module is light, so raising modules can subclass it without importing emjax's heavy parts."""


# What bad input raises (emjax's messages name the file, key, line or tensor): one line on stderr and exit status 2,
# not a traceback, which is for debugging emjax itself (EMJAX_DEBUG=1 keeps it).
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError, ConnectionError, UserError)


def show_info(name: str = "emjax") -> None:
    """Print the ``name`` logger's INFO and above on stderr, and only its own: configuring the root logger instead
    (``logging.basicConfig``) lets orbax's, absl's and TFDS's INFO lines through, about a hundred a tiny run."""
    logger = logging.getLogger(name)
    if not any(getattr(h, "_emjax", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._emjax = True
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def user_error(prog: str, e: BaseException) -> int:
    if os.environ.get("EMJAX_DEBUG"):
        raise e
    print(f"{prog}: {type(e).__name__}: {e}\n(set EMJAX_DEBUG=1 for the traceback)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
