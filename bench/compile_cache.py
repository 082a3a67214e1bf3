"""What the command line's persistent compilation cache saves: the second of two ``emjax train tiny`` runs with the
same shapes (another seed, as a sweep's next run or a resumed run would be), with the cache on (a fresh directory,
filled by the first run) against off (``EMJAX_COMPILE_CACHE=off``: every process compiles). Each run is the whole
command in its own process (start-up, data, compile, steps, checkpoint, spectral report); the dataset is built
before timing. Prints each run's wall time and the ratio of the second runs.

Not a test. ``.venv/bin/python bench/compile_cache.py [--steps 6] [--platform cuda]`` (``bench/gpu_check.sh`` runs it
on a GPU, where a tiny program took tens of seconds to compile; XLA_FLAGS pass through, e.g.
``--xla_gpu_autotune_level=0`` to see what autotuning costs a cold run).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time


def run(workdir: str, steps: int, seed: int, cache: str, platform: str) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update(JAX_PLATFORMS=platform, TOKENIZERS_PARALLELISM="false", EMJAX_COMPILE_CACHE=cache)
    cmd = [sys.executable, "-m", "emjax.cli", "train", "tiny", f"workdir={workdir}", "progress=false", f"steps={steps}",
           "log_every=2", f"ckpt_every={steps}", "val_batches=2", "export_peft=false", f"seed={seed}"]
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--platform", default="cpu", help="JAX_PLATFORMS for the runs (cpu, cuda, tpu)")
    args = ap.parse_args()
    from emjax.data import builders

    builders.build("insecure")  # not timed
    second = {}
    with tempfile.TemporaryDirectory() as tmp:
        for side, cache in (("cache off", "off"), ("cache on", os.path.join(tmp, "xla"))):
            first = run(os.path.join(tmp, f"{side[6:]}-0"), args.steps, 0, cache, args.platform)
            second[side] = run(os.path.join(tmp, f"{side[6:]}-1"), args.steps, 1, cache, args.platform)
            print(f"{side:>9}: first run {first:5.1f} s, second run (seed 1) {second[side]:5.1f} s", flush=True)
    print(f"emjax train tiny, {args.steps} steps, one {args.platform} device, the second run: cache on "
          f"{second['cache on']:.1f} s, off {second['cache off']:.1f} s, "
          f"off / on = {second['cache off'] / second['cache on']:.2f}x")


if __name__ == "__main__":
    main()
