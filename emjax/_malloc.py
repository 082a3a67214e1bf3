"""Keep large host blocks mapped between XLA:CPU executions (glibc only).

Why: XLA:CPU allocates each execution's temporaries afresh, and glibc serves blocks above 32 MiB (or any block a
worker thread allocates from its 64 MiB arena) with ``mmap`` and unmaps them on free, so every train step
page-faults its activations in again (``bench/host_alloc.py``: a fresh 128 MiB output 41 ms against 5 ms into a
donated buffer; ≈ 10 % of a CPU train step, bench/RESULTS.md). Serving large blocks from the one main heap and never
trimming it removes that cost, at the price of the process keeping its peak host memory. Applied on import of
``emjax`` before JAX starts its threads; ``EMJAX_MALLOC_TUNING=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -2, -3, -8
_BIG = 2**31 - 1  # mallopt takes an int


def tune() -> bool:
    """Apply the settings once; True when they took effect (Linux with glibc and not disabled)."""
    if os.environ.get("EMJAX_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (musl and others: AttributeError)
    except (OSError, AttributeError):
        return False
    ok = True
    for opt, value in ((_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, _BIG), (_M_TRIM_THRESHOLD, _BIG),
                       (_M_TOP_PAD, 64 << 20)):
        ok &= bool(libc.mallopt(opt, value))
    return ok


APPLIED = tune()
