"""``emjax`` command line: one sub-command per concept, each dispatched lazily to its module's ``main(argv)``.

Lazy imports keep ``emjax --help`` instant and let each module own its arguments.
"""

from __future__ import annotations

import importlib
import sys

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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"emjax: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
