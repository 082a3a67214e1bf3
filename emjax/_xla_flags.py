"""XLA:CPU compiles with its legacy fusion emitters (``--xla_cpu_use_fusion_emitters=false``).

Why: on CPU much of a short run (the demo, the test suite) is compilation, and jaxlib 0.10's default (MLIR) fusion
emitters compile our train step more slowly than the legacy ones, which run it about as fast and give the same loss
(``bench/cpu_compile.py``, this 2-core host: compile 1.06-1.14x faster for the tiny preset (two runs), 1.31x
for the 35M shape (one run); step times within this host's noise).
The flag only reaches the CPU compiler, so GPU and TPU processes are unaffected. Applied on import of ``emjax`` by
adding it to ``XLA_FLAGS`` (read when JAX starts its first backend), only for the jaxlib versions it was measured
on (XLA aborts on a flag it does not know), never over the user's own setting of it; ``EMJAX_XLA_TUNING=0`` turns
it off.
"""

from __future__ import annotations

import os
import sys

FLAG = "--xla_cpu_use_fusion_emitters=false"
JAXLIB_VERSIONS = ("0.10.",)  # measured; a newer jaxlib may drop the flag, and XLA aborts on unknown flags


def tune() -> bool:
    """Add the flag to ``XLA_FLAGS``; True when it takes effect (added now, or there already)."""
    if os.environ.get("EMJAX_XLA_TUNING", "1") == "0":
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    if FLAG in flags.split():
        return True
    if "xla_cpu_use_fusion_emitters" in flags:  # the user's own choice
        return False
    if "jax" in sys.modules:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():  # too late: the flags were read
            return False
    try:
        from importlib.metadata import version

        if not version("jaxlib").startswith(JAXLIB_VERSIONS):
            return False
    except Exception:
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
    return True


APPLIED = tune()
