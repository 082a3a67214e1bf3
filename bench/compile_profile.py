"""Where a pytest run's XLA compile time goes: a pytest plugin that times every ``compile_or_get_cached`` call in
each test process (xdist workers included; not the subprocesses tests start) and writes one JSON file per process,
and a summary of those files (by program name, the train-step programs that recur, the tests that compile most).

Not a test, and it measures the suite rather than compares two ways, so it prints no ratio::

    rm -rf /tmp/emjax_compile_profile
    PYTHONPATH=bench .venv/bin/python -m pytest -q -n 2 tests -p compile_profile
    .venv/bin/python bench/compile_profile.py          # EMJAX_COMPILE_PROFILE_DIR overrides the directory
"""

from __future__ import annotations

import collections
import glob
import hashlib
import json
import os
import sys
import time

OUT = os.environ.get("EMJAX_COMPILE_PROFILE_DIR", "/tmp/emjax_compile_profile")
_REC: list[dict] = []
_CURRENT = {"test": "<collection>"}


def pytest_configure(config):
    from jax._src import compiler
    from jax._src.interpreters import pxla

    real = compiler.compile_or_get_cached

    def timed(backend, computation, *args, **kwargs):
        t = time.perf_counter()
        out = real(backend, computation, *args, **kwargs)
        try:
            name = str(computation.operation.attributes["sym_name"]).strip('"')
        except Exception:
            name = "?"
        # a fingerprint for train steps only (printing every module would cost more than the profile tells)
        fp = hashlib.md5(str(computation).encode()).hexdigest()[:10] if "step" in name else ""
        _REC.append({"test": _CURRENT["test"], "name": name, "s": time.perf_counter() - t, "fp": fp})
        return out

    compiler.compile_or_get_cached = pxla.compiler.compile_or_get_cached = timed


def pytest_runtest_logstart(nodeid, location):
    _CURRENT["test"] = nodeid


def pytest_unconfigure(config):
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, f"compiles_{os.getpid()}.json"), "w") as f:
        json.dump(_REC, f)


def summary(out: str = OUT) -> None:
    rec = [r for f in glob.glob(os.path.join(out, "compiles_*.json")) for r in json.load(open(f))]
    if not rec:
        sys.exit(f"no compiles_*.json in {out}: run pytest with -p compile_profile first (see the docstring)")
    print(f"{len(rec)} compiles, {sum(r['s'] for r in rec):.1f} s in all (summed over processes)")
    by = collections.defaultdict(lambda: [0, 0.0])
    for r in rec:
        by[r["name"]][0] += 1
        by[r["name"]][1] += r["s"]
    print("\nby program: seconds, count, name")
    for name, (n, s) in sorted(by.items(), key=lambda kv: -kv[1][1])[:15]:
        print(f"{s:8.1f} {n:4d}  {name}")
    steps = [r for r in rec if r["fp"]]
    print(f"\ntrain-step programs: {len(steps)} compiles, {len({r['fp'] for r in steps})} distinct, "
          f"{sum(r['s'] < 0.5 for r in steps)} under 0.5 s (cache hits)")
    per_test = collections.Counter()
    for r in rec:
        per_test[r["test"]] += r["s"]
    print("\ntests that compile most: seconds, test")
    for test, s in per_test.most_common(15):
        print(f"{s:8.1f}  {test}")


if __name__ == "__main__":
    summary()
