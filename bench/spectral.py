"""Benchmark: the spectral penalty (value + gradient) over all LoRA modules of Qwen3-8B's shapes.

Compares, in the same run, emjax.spectral.penalty (batched over stacked layers, QR + r×r SVD) against
  (a) jnp.linalg.svd of the dense products ΔW = s·A@B (timed on --svd-layers layers, extrapolated linearly
      to all layers — the full 36 would take hours on a CPU), and
  (b) a per-matrix Python loop of jitted QR-based calls (one dispatch per module × layer).
All variants are jitted and warmed up (compiled, and for (b) and the batched version also run once).

    python bench/spectral.py                     # Qwen3-8B shapes, r 32; a few minutes on 2 CPU cores
    python bench/spectral.py --svd-layers 0      # skip the slow dense baseline (seconds)
    python bench/spectral.py --layers 4 --hidden 1024 --intermediate 3072 --kv 512   # small smoke run
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp

from emjax import spectral as sp


def shapes(hidden: int, intermediate: int, kv: int) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of the seven adapted projections of a Qwen3 dense layer (q/o: 32 heads × 128 = hidden)."""
    return {
        "q_proj": (hidden, hidden),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (hidden, hidden),
        "gate_proj": (hidden, intermediate),
        "up_proj": (hidden, intermediate),
        "down_proj": (intermediate, hidden),
    }


def make_adapters(layers: int, r: int, shp, seed: int = 0):
    """Stacked factors with a LoRA-like A and a trained-looking (nonzero) B."""
    key = jax.random.key(seed)
    out = {}
    for i, (name, (d_in, d_out)) in enumerate(shp.items()):
        ka, kb = jax.random.split(jax.random.fold_in(key, i))
        a = jax.random.uniform(ka, (layers, d_in, r), jnp.float32, -1, 1) / math.sqrt(d_in)
        b = jax.random.normal(kb, (layers, r, d_out), jnp.float32) * 1e-3
        out[name] = (a, b)
    return out


def timeit(fn, *args, repeat: int = 3) -> float:
    """Best wall time of ``fn(*args)`` (blocked) after one warm-up call: the least-disturbed run on a shared host."""
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return min(ts)


def dense_penalty(adapters, scale: float):
    """Reference: fn_ratio penalty from a full SVD of each dense ΔW (d_in × d_out)."""
    total, count = 0.0, 0
    for a, b in adapters.values():
        if count:
            a, b = sp.after(total, (a, b))  # serialise the LAPACK calls on CPU (see emjax.spectral.after)
        r = a.shape[-1]
        s = jnp.linalg.svd(scale * jnp.matmul(a, b, precision="highest"), compute_uv=False)
        v = jnp.sqrt(jnp.sum(s**2, -1)) / jnp.sum(s, -1) - 1 / math.sqrt(r)
        total, count = total + jnp.sum(v), count + v.size
    return total / count


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=12288)
    p.add_argument("--kv", type=int, default=1024)
    p.add_argument("--svd-layers", type=int, default=1, help="layers timed for the dense-SVD baseline (0: skip)")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)

    shp = shapes(args.hidden, args.intermediate, args.kv)
    scale = 64 / math.sqrt(args.rank)
    ad = make_adapters(args.layers, args.rank, shp)
    n_mod = args.layers * len(shp)
    print(f"{n_mod} modules ({args.layers} layers x {len(shp)} projections), r={args.rank}, "
          f"hidden={args.hidden}, intermediate={args.intermediate}, kv={args.kv}; "
          f"{jax.devices()[0].platform}, {jax.local_device_count()} device(s)")

    default = sp._default_qr()
    times = {}
    for qr in sorted(sp.QR_IMPLS, key=lambda q: q != default):  # the backend's default first
        batched_val = jax.jit(lambda ad, qr=qr: sp.penalty(ad, scale, qr=qr))
        batched = jax.jit(jax.value_and_grad(lambda ad, qr=qr: sp.penalty(ad, scale, qr=qr)))
        t = time.perf_counter()
        jax.block_until_ready(batched(ad))
        t_compile = time.perf_counter() - t
        t_val = timeit(batched_val, ad, repeat=args.repeat)
        times[qr] = timeit(batched, ad, repeat=args.repeat)
        v_batched, _ = batched(ad)
        tag = f"qr={qr}{' (default)' if qr == default else ''}"
        print(f"batched emjax.spectral.penalty  value only    : {t_val * 1e3:10.1f} ms   {tag}")
        print(f"batched emjax.spectral.penalty  value+grad    : {times[qr] * 1e3:10.1f} ms   (penalty "
              f"{float(v_batched):.6f}; first call, compiling included, {t_compile:.1f} s)   {tag}", flush=True)
    other = next(q for q in sp.QR_IMPLS if q != default)
    print(f"  -> qr={default} (this backend's default) is {times[other] / times[default]:.2f}x faster than qr={other}")
    t_batched = times[default]

    # (b) per-matrix Python loop of jitted QR-based calls
    one = jax.jit(jax.value_and_grad(lambda a, b: sp.penalty((a, b), scale, reduce="sum"), argnums=(0, 1)))
    pairs = [(a[i], b[i]) for a, b in ad.values() for i in range(args.layers)]

    def loop(pairs):
        out = [one(a, b) for a, b in pairs]
        return sum(v for v, _ in out) / len(out), [g for _, g in out]

    t_loop = timeit(loop, pairs, repeat=args.repeat)
    v_loop = float(loop(pairs)[0])
    print(f"per-matrix Python loop ({len(pairs)} calls) value+grad : {t_loop * 1e3:10.1f} ms   (penalty {v_loop:.6f})")
    print(f"  -> batched is {t_loop / t_batched:.1f}x faster than the loop")

    # (a) dense SVD of the full products, on a subset of layers, extrapolated linearly
    if args.svd_layers > 0:
        k = min(args.svd_layers, args.layers)
        sub = {n: (a[:k], b[:k]) for n, (a, b) in ad.items()}
        dense = jax.jit(jax.value_and_grad(lambda ad: dense_penalty(ad, scale)))
        print(f"dense SVD baseline: compiling, then timing {k} layer(s) ({k * len(shp)} modules) once ...", flush=True)
        compiled = dense.lower(sub).compile()  # warm-up = compilation; one run at this size takes minutes
        t = time.perf_counter()
        v_dense, _ = jax.block_until_ready(compiled(sub))
        t_sub = time.perf_counter() - t
        v_ours = float(jax.jit(lambda ad: sp.penalty(ad, scale))(sub))
        t_full = t_sub * args.layers / k
        print(f"dense jnp.linalg.svd value+grad, measured on {k} of {args.layers} layers: {t_sub:10.1f} s "
              f"(penalty {float(v_dense):.6f} vs emjax {v_ours:.6f} on the same layers)")
        print(f"dense jnp.linalg.svd value+grad, EXTRAPOLATED x{args.layers / k:g} to all {n_mod} modules: "
              f"{t_full:10.1f} s")
        print(f"  -> batched is {t_full / t_batched:.0f}x faster than dense SVD (extrapolated from {k} layer(s))")


if __name__ == "__main__":
    main()
