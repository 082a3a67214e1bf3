"""A tiny ``emjax train`` run on a host with 8 (simulated) CPU devices, on the 8-device mesh (the default) against
``mesh.devices=1`` (no mesh: everything on the first device), side by side in one run.

Why: the test suite's processes have 8 simulated devices for its sharding checks, and a tiny run sharded over them
spends much of its time on collectives, replicated batches and resharding programs; tests/test_train.py therefore
trains on one device except where it checks the mesh. Each side runs ``emjax train tiny`` in its own process (the
whole command: start-up, data, compile, steps, checkpoint, spectral report) with no persistent compilation cache;
the dataset is built before timing. Prints each side's wall time and the ratio.

Not a test. ``.venv/bin/python bench/tiny_mesh.py [--steps 12] [--repeats 1]``
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time


def run(workdir: str, steps: int, extra: list[str]) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               TOKENIZERS_PARALLELISM="false", EMJAX_COMPILE_CACHE="off")
    cmd = [sys.executable, "-m", "emjax.cli", "train", "tiny", f"workdir={workdir}", "progress=false", f"steps={steps}",
           "log_every=4", "ckpt_every=100", "val_batches=2", "export_peft=false", *extra]
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    from emjax.data import builders

    builders.build("insecure")  # not timed
    sides = {"8-device mesh": [], "mesh.devices=1": ["mesh.devices=1"]}
    times: dict[str, list[float]] = {k: [] for k in sides}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for i, (name, extra) in enumerate(sides.items()):
                times[name].append(run(os.path.join(tmp, f"run{r}-{i}"), args.steps, extra))
                print(f"{name:>16}: {times[name][-1]:6.1f} s", flush=True)
    best = {k: min(v) for k, v in times.items()}
    print(f"emjax train tiny, {args.steps} steps, 8 simulated CPU devices (best of {args.repeats}): "
          f"8-device mesh {best['8-device mesh']:.1f} s, mesh.devices=1 {best['mesh.devices=1']:.1f} s, "
          f"mesh / one device = {best['8-device mesh'] / best['mesh.devices=1']:.2f}x")


if __name__ == "__main__":
    main()
