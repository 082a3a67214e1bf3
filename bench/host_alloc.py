"""What emjax/_malloc.py buys: one jitted op writing a fresh 128 MiB output (what XLA:CPU does with an execution's
temporaries) against the same op writing into its donated input. Run it both ways and compare:

    EMJAX_MALLOC_TUNING=0 .venv/bin/python bench/host_alloc.py
    .venv/bin/python bench/host_alloc.py
Not a test.
"""

from __future__ import annotations

import time

import emjax  # noqa: F401  (applies the allocator setting unless EMJAX_MALLOC_TUNING=0)
import jax
import jax.numpy as jnp
import numpy as np
from emjax import _malloc


def median_ms(f, x, *, donate: bool, reps: int = 9) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        y = f(x)
        y.block_until_ready()
        times.append(time.perf_counter() - t)
        if donate:
            x = y
        del y
    return float(np.median(times)) * 1e3


def main():
    x = jnp.ones((32 << 20,), jnp.float32)  # 128 MiB
    fresh, donated = jax.jit(lambda v: v * 2.0), jax.jit(lambda v: v * 2.0, donate_argnums=0)
    fresh(x).block_until_ready()
    x = donated(x)
    print(f"allocator setting applied: {_malloc.APPLIED}")
    print(f"128 MiB op, fresh output   {median_ms(fresh, x, donate=False):6.1f} ms")
    print(f"128 MiB op, donated buffer {median_ms(donated, x, donate=True):6.1f} ms")


if __name__ == "__main__":
    main()
