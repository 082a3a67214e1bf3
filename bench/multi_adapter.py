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
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import train_step as tsb  # noqa: E402  (the train benchmark's shape and batch)
from emjax import multi  # noqa: E402
from emjax.lora import LoraConfig  # noqa: E402
from emjax.models import qwen3  # noqa: E402
from emjax.optim import OptimConfig, build  # noqa: E402
from emjax.train import make_train_step, step_memory  # noqa: E402

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
    tsb.B, tsb.T = args.batch, args.seq
    names = args.optims.split(",")
    lcfg = LoraConfig(rank=32, alpha=64, rslora=True)
    model = qwen3.Qwen3ForCausalLM(tsb.CFG, lora=lcfg, param_dtype=jnp.dtype(args.dtype), rngs=nnx.Rngs(0))
    graphdef, trainable, frozen = nnx.split(model, nnx.LoRAParam, ...)
    dev = jax.devices()[0]
    frozen = jax.device_put(frozen, dev)
    txs = [build(OptimConfig(name=n, learning_rate=1e-4, total_steps=1000, weight_decay=0.0 if n == "adam" else 0.01))
           for n in names]
    batch = jax.device_put(tsb.make_batch(), dev)

    singles = []
    for tx in txs:
        step = jax.jit(make_train_step(graphdef, tx, lora_scale=lcfg.scale), donate_argnums=(0, 1))
        own = jax.tree.map(jnp.copy, trainable)  # each donates its own
        singles.append([step, *jax.device_put((own, tx.init(own)), dev)])
    mstep = jax.jit(multi.make_multi_train_step(graphdef, txs, lora_scale=lcfg.scale), donate_argnums=(0, 1))
    params = jax.device_put(multi.stack([trainable] * len(txs)), dev)
    mstate = {"p": params, "s": jax.device_put(multi.init(txs, params), dev)}
    mem_single = step_memory(singles[0][0].lower(*singles[0][1:], frozen, batch).compile())
    mem_multi = step_memory(mstep.lower(mstate["p"], mstate["s"], frozen, batch).compile())

    def run_singles() -> float:
        t = time.perf_counter()
        for s in singles:
            s[1], s[2], m = s[0](s[1], s[2], frozen, batch)
            jax.block_until_ready((s[1], m["loss"]))
        return time.perf_counter() - t

    def run_multi() -> float:
        t = time.perf_counter()
        mstate["p"], mstate["s"], m = mstep(mstate["p"], mstate["s"], frozen, batch)
        jax.block_until_ready((mstate["p"], m["loss"]))
        return time.perf_counter() - t

    t0 = time.perf_counter()
    for _ in range(3):  # compile, then the steps that grow the host heap
        run_singles(), run_multi()
    print(f"  compile + 3 warm-up rounds {time.perf_counter() - t0:.1f} s", flush=True)
    t_multi, t_single, fastest = tsb.interleaved(run_multi, run_singles, args.steps)
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
