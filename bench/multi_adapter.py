"""Several adapters on one base in one program (``emjax.multi``) vs the same adapters trained one after another.

The alternative a user would pick for an optimiser sweep on one machine is one run per optimiser: here, one compiled
``emjax.train`` step per optimiser, run in turn. Both sides train the same N adapters (default: Adam, AdamW, Lion,
Muon) on the train benchmark's shape (``bench/train_step.py``: ≈35M Qwen3, LoRA r 32 on all 7 projections, fp32),
each adapter on a batch of 8 × 256 tokens (the same batch for all, as in an optimiser sweep over one data order).
Prints the time of one multi-adapter step against the sum of the N single steps (timed alternately, 3 warm-up
rounds, medians), adapter-steps per second, and each program's memory from XLA's buffer assignment. Not a test.

    .venv/bin/python bench/multi_adapter.py [--optims adam,adamw,lion,muon] [--batch 8] [--seq 256] [--steps 6]
                                            [--size 0.6b --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402

import train_step as tsb  # noqa: E402  (the train benchmark's shape, batch, optimisers and timing)
from emjax import multi  # noqa: E402
from emjax.models import qwen3  # noqa: E402
from emjax.train import step_memory  # noqa: E402

GIB = 2.0 ** 30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--optims", default="adam,adamw,lion,muon")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--size", default="bench", choices=["bench", *qwen3.SIZES])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    if args.dtype == "float32":
        jax.config.update("jax_default_matmul_precision", "highest")
    tsb.CFG = tsb.BENCH if args.size == "bench" else qwen3.SIZES[args.size]()
    tsb.B, tsb.T, tsb.DTYPE = args.batch, args.seq, args.dtype
    names = args.optims.split(",")

    # the alternative: one compiled single-adapter step per optimiser, run in turn
    singles = [tsb.emjax_stepper(optim=n, warmup=3) for n in names]
    t = time.perf_counter()
    lcfg, graphdef, trainable, frozen = tsb.bench_model()
    txs = [tsb.optimiser(n) for n in names]
    params = multi.stack([trainable] * len(txs))
    run_multi = tsb.stepper(jax.jit(multi.make_multi_train_step(graphdef, txs, lora_scale=lcfg.scale),
                                    donate_argnums=(0, 1)), params, multi.init(txs, params), frozen, tsb.make_batch())
    for _ in range(3):  # the first steps that grow the host heap
        run_multi()
    print(f"  emjax.multi: compile + 3 warm-up steps {time.perf_counter() - t:.1f} s", flush=True)

    t_multi, t_single, fastest = tsb.interleaved(run_multi, lambda: sum(one() for one in singles), args.steps)
    mem_multi, mem_single = (step_memory(one.compiled) for one in (run_multi, singles[0]))
    n = len(txs)
    where = jax.devices()[0].device_kind if jax.default_backend() != "cpu" else f"{os.cpu_count()} CPU threads"
    print(f"Qwen3 shape {args.size}, {args.dtype}, {n} adapters ({args.optims}), LoRA r 32 on all 7 projections, "
          f"batch {args.batch} x {args.seq} tokens per adapter, {where}, jax {jax.__version__}")
    print(f"emjax.multi, one program      {t_multi * 1e3:8.0f} ms a step of all {n} "
          f"({n / t_multi:.2f} adapter-steps/s); peak memory {mem_multi['peak'] / GIB:.2f} GiB")
    print(f"{n} single-adapter steps in turn {t_single * 1e3:8.0f} ms ({n / t_single:.2f} adapter-steps/s); "
          f"one step's peak memory {mem_single['peak'] / GIB:.2f} GiB")
    print(f"speed-up one program / in turn: {t_single / t_multi:.2f}x (fastest rounds {fastest:.2f}x)")


if __name__ == "__main__":
    main()
