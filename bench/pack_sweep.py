"""A sweep trained as packs (``emjax sweep --pack N``) against the same sweep run by run (``emjax sweep``).

Both sides run the real CLI end to end in fresh output roots, one after the other, and are timed by wall clock:
process start, data, model, compilation, training, validation and export included, which is what a user waits for.
Default: the ``tiny`` config, Adam and Muon × λ 0 and 1 (4 runs), 4 steps each. Also checks that every run of
both sweeps finished and that each packed run's final training loss matches its run alone (rtol 1e-4). Not a test.

    .venv/bin/python bench/pack_sweep.py [--steps 4] [--pack 4] [--config tiny] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SWEEP = """\
steps: {steps}
ckpt_every: {steps}
val_batches: 1
progress: false
sweep:
  base: {config}
  grid:
    optim:
      - {{_name: adam, optim.name: adam}}
      - {{_name: muon, optim.name: muon, optim.learning_rate: 2.0e-2}}
    spectral.weight: [0.0, 1.0]
"""


def run(sweep: Path, root: Path, pack: int) -> float:
    t = time.perf_counter()
    # cold compiles on both sides: no persistent compilation cache (the sides share programs: evaluation, spectral)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    subprocess.run([sys.executable, "-m", "emjax.cli", "sweep", str(sweep), "--root", str(root), "--pack", str(pack)],
                   check=True, capture_output=True, env={**env, "EMJAX_COMPILE_CACHE": "off"})
    return time.perf_counter() - t


def final_losses(root: Path) -> dict[str, float]:
    out = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        if not (d / "DONE").exists():
            raise SystemExit(f"{d}: did not finish")
        out[d.name] = json.loads((d / "final.json").read_text())["train_loss"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--pack", type=int, default=4)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--keep", help="keep both sweeps' directories here (default: a temporary directory)")
    args = ap.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="emjax_pack_sweep_"))
    work.mkdir(parents=True, exist_ok=True)
    sweep = work / "sweep.yaml"
    sweep.write_text(SWEEP.format(steps=args.steps, config=args.config))
    alone_s = run(sweep, work / "alone", 1)
    packed_s = run(sweep, work / "packed", args.pack)
    alone, packed = final_losses(work / "alone"), final_losses(work / "packed")
    assert alone.keys() == packed.keys() and len(alone) == 4
    worst = max(abs(packed[k] - alone[k]) / abs(alone[k]) for k in alone)
    print(f"{len(alone)} runs of `{args.config}`, {args.steps} steps each")
    print(f"emjax sweep (one run after the other): {alone_s:7.1f} s")
    print(f"emjax sweep --pack {args.pack}:                {packed_s:7.1f} s")
    print(f"speed-up: {alone_s / packed_s:.2f}x  (final training losses agree to {worst:.1e} relative)")
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
