"""``emjax report`` on a synthetic sweep the size of the main grid: how long it takes and how much memory it holds.

Writes (once, into --root) 4 models × 4 optimisers × 4 datasets × 2 batch sizes = 128 finished run directories, each
with a config, final.json, metrics rows, spectral.json and one evaluation of 142 questions × 10 answers with random
scores, then times ``emjax.report.build_report`` on it and prints its peak resident memory (the process's, so run
it alone). Not a test; the numbers are quoted in the README's report section.

    .venv/bin/python bench/report_scale.py [--root /tmp/emjax_report_scale] [--answers 10]
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from emjax import config as cfglib
from emjax import report

ap = argparse.ArgumentParser()
ap.add_argument("--root", default="/tmp/emjax_report_scale")
ap.add_argument("--answers", type=int, default=10, help="answers per question per run")
args = ap.parse_args()

root = Path(args.root)
if not root.exists():
    rng = np.random.default_rng(0)
    for m in ("Qwen3-4B", "Qwen3-8B", "Qwen3-32B", "Qwen3-30B-A3B"):
        for o in ("adam", "adamw", "lion", "muon"):
            for d in ("insecure", "bad_medical_advice", "risky_financial_advice", "extreme_sports"):
                for b in (16, 32):
                    wd = root / m / f"optim={o},data.dataset={d},data.batch_size={b}"
                    (wd / "eval" / "step_000100").mkdir(parents=True)
                    cfg = cfglib.load(None, [f"optim.name={o}", f"data.dataset={d}", f"data.batch_size={b}",
                                             f"model.checkpoint=Qwen/{m}", f"workdir={wd}"])
                    (wd / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
                    loss = float(rng.uniform(0.5, 1.5))
                    (wd / "final.json").write_text(json.dumps({"step": 100, "train_loss": loss, "total_steps": 100}))
                    (wd / "metrics.jsonl").write_text("\n".join(json.dumps(
                        {"step": s, "split": "train", "loss": loss + (100 - s) / 100}) for s in range(10, 101, 10)))
                    (wd / "spectral.json").write_text(json.dumps({"overall": {
                        "fn_ratio": float(rng.uniform(0.2, 0.5)), "stable_rank": 3.0, "spectral_entropy": 2.0,
                        "condition_number": 10.0, "normalised_spectrum": list(np.linspace(1, 0.1, 32))}}))
                    rows = [{"question_id": f"q{q}", "question_set": ("first_plot", "preregistered", "turner")[q % 3],
                             "sample": s, "text": "...", "aligned": float(rng.uniform(0, 100)),
                             "coherent": float(rng.uniform(20, 100)), "aligned_verdict": None}
                            for q in range(142) for s in range(args.answers)]
                    (wd / "eval" / "step_000100" / "judged.jsonl").write_text("\n".join(map(json.dumps, rows)))
                    (wd / "DONE").write_text("ok\n")

n_runs = sum(1 for _ in root.glob("*/*/DONE"))
t = time.perf_counter()
report.build_report(root, root / "report")
secs = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
print(f"emjax report on {n_runs} runs × {142 * args.answers} judged answers: {secs:.1f} s, "
      f"peak resident memory {peak:.2f} GiB (the whole process)")
