"""One jitted optimiser update over Qwen3-8B's LoRA factors: emjax Muon vs optax Adam (and optax's Muon).

Shapes: 36 layers, r = 32, fp32 factors stacked (L, in, r) / (L, r, out) for q, k, v, o, gate, up,
down (252 adapted matrices at full size). Each optimiser's update is jitted (state donated), warmed
up, then timed; the median of --repeats runs is printed with ratios against Adam measured in the
same run. Muon on LoRA factors should cost little more than Adam's memory-bound update: a large
ratio on an accelerator points at a lowering or sharding problem.

    .venv/bin/python bench/optim.py                 # full Qwen3-8B shapes (~1-2 min on 2 CPU cores)
    .venv/bin/python bench/optim.py --layers 4      # quick
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import emjax.optim as eo

HIDDEN, INTER, Q_OUT, KV_OUT = 4096, 12288, 4096, 1024
PROJ = {  # name: (in, out), JAX layout
    "q_proj": (HIDDEN, Q_OUT), "k_proj": (HIDDEN, KV_OUT), "v_proj": (HIDDEN, KV_OUT),
    "o_proj": (Q_OUT, HIDDEN), "gate_proj": (HIDDEN, INTER), "up_proj": (HIDDEN, INTER),
    "down_proj": (INTER, HIDDEN),
}


def lora_tree(layers: int, rank: int, seed: int):
    rng = np.random.default_rng(seed)
    n = lambda *s: jnp.asarray(rng.standard_normal(s, np.float32) * 0.01)  # noqa: E731
    return {"blocks": {name: {"lora_a": n(layers, din, rank), "lora_b": n(layers, rank, dout)}
                       for name, (din, dout) in PROJ.items()}}


def time_updates(cands: dict, params, grads, repeats: int) -> dict[str, float]:
    """Median seconds per jitted update; candidates interleaved per round so drift (other load on
    a shared machine, allocator state) hits them all alike."""
    runs = {}
    for name, tx in cands.items():
        step = jax.jit(tx.update, donate_argnums=(1,))
        updates, state = step(grads, tx.init(params), params)  # compile + warm-up
        jax.block_until_ready((updates, state))
        runs[name] = [step, state, []]
    for _ in range(repeats):
        for name, run in runs.items():
            step, state, times = run
            t0 = time.perf_counter()
            updates, run[1] = step(grads, state, params)
            jax.block_until_ready((updates, run[1]))
            times.append(time.perf_counter() - t0)
            del updates
    return {name: statistics.median(run[2]) for name, run in runs.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-optax-muon", action="store_true", help="skip optax.contrib.muon")
    args = ap.parse_args()

    params, grads = lora_tree(args.layers, args.rank, 0), lora_tree(args.layers, args.rank, 1)
    n = sum(x.size for x in jax.tree.leaves(params))
    print(f"device={jax.devices()[0].device_kind} x{jax.device_count()}  layers={args.layers} "
          f"rank={args.rank}  matrices={args.layers * len(PROJ) * 2}  params={n / 1e6:.1f}M fp32")

    dims = optax.contrib.MuonDimensionNumbers(reduction_axis=1, output_axis=2)
    cands = {
        "optax.adam": optax.adam(1e-4),
        "emjax.muon (fp32 NS)": eo.muon(1e-4),
        "emjax.muon (bf16 NS)": eo.muon(1e-4, ns_dtype="bfloat16"),
    }
    if not args.no_optax_muon:
        cands["optax.contrib.muon"] = optax.contrib.muon(
            1e-4, muon_weight_dimension_numbers=jax.tree.map(lambda _: dims, params))
    results = time_updates(cands, params, grads, args.repeats)
    base = results["optax.adam"]
    print(f"{'optimiser':<24}{'median ms':>12}{'x Adam':>10}")
    for name, t in results.items():
        print(f"{name:<24}{t * 1e3:>12.1f}{t / base:>10.2f}")


if __name__ == "__main__":
    main()
