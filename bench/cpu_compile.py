"""XLA:CPU compile and step time: the fusion emitters, and the unoptimised random init, side by side in one run.

* JAX's default (MLIR) fusion emitters, which emjax uses, against the legacy ones
  (``--xla_cpu_use_fusion_emitters=false``). XLA_FLAGS is read once per process, so each side runs in its own child
  process. Each child compiles and times train steps of the ``tiny`` preset: Adam at LoRA rank 4 (the test suite's
  shape, batch 4 × 256), Adam at rank 16 (the demo's rank), and a pack of four adapters (Adam, Lion, Muon, Adam + the
  spectral penalty, ``emjax.multi``); and bench/train_step.py's ≈35M shape (batch 8 × 256, r 32 on all 7
  projections, AdamW). Step times are the medians of ``--steps`` steps after 3 warm-up steps. emjax set the legacy
  flag for one session (it compiled the rank-4 Adam step faster) and dropped it when this bench showed it slower
  at rank 16 and for packs.
* the random init compiled without LLVM optimisation (``emjax.train.INIT_COMPILER_OPTIONS``): both ways in the same
  process, on the tiny preset sharded over 8 simulated devices (the test suite's mesh).

Not a test. ``.venv/bin/python bench/cpu_compile.py [--steps 5] [--skip-bench-shape]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

LEGACY = "--xla_cpu_use_fusion_emitters=false"


def child(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from emjax import multi
    from emjax.lora import LoraConfig
    from emjax.models import qwen3
    from emjax.optim import OptimConfig, build
    from emjax.train import PRESETS, make_train_step

    out = {"xla_flags": os.environ.get("XLA_FLAGS", "")}
    tiny = qwen3.Qwen3Config(vocab_size=4096, tie_word_embeddings=True, **PRESETS["tiny"])
    shapes = {"tiny r4": (tiny, 4, 256, LoraConfig(rank=4, alpha=8), ["adam"]),
              "tiny r16": (tiny, 4, 256, LoraConfig(rank=16, alpha=32), ["adam"]),
              "tiny r4 pack": (tiny, 4, 256, LoraConfig(rank=4, alpha=8), ["adam", "lion", "muon", "adam+reg"])}
    if not args.skip_bench_shape:
        shapes["35M r32"] = (qwen3.Qwen3Config(vocab_size=18_992, hidden_size=512, intermediate_size=1536,
                                               num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64,
                                               tie_word_embeddings=True),
                             8, 256, LoraConfig(rank=32, alpha=64, rslora=True), ["adamw"])
    for name, (cfg, B, T, lcfg, opts) in shapes.items():
        model = qwen3.Qwen3ForCausalLM(cfg, lora=lcfg, rngs=nnx.Rngs(0))
        graphdef, trainable, frozen = nnx.split(model, nnx.LoRAParam, ...)
        txs = [build(OptimConfig(name=o.split("+")[0], learning_rate=1e-4, total_steps=1000)) for o in opts]
        rng = np.random.default_rng(0)
        batch = {"tokens": jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32),
                 "loss_mask": jnp.ones((B, T), jnp.int32), "segment_ids": jnp.ones((B, T), jnp.int32),
                 "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))}
        if len(opts) == 1:
            fn = make_train_step(graphdef, txs[0], lora_scale=lcfg.scale)
            state = [trainable, txs[0].init(trainable)]
        else:
            fn = multi.make_multi_train_step(graphdef, txs, lora_scale=lcfg.scale,
                                             spectral_weights=[float(o.endswith("+reg")) for o in opts])
            stacked = multi.stack([trainable] * len(opts))
            state = [stacked, multi.init(txs, stacked)]
        step = jax.jit(fn, donate_argnums=(0, 1))
        t = time.perf_counter()
        compiled = step.lower(state[0], state[1], frozen, batch).compile()
        compile_s = time.perf_counter() - t
        times = []
        for i in range(3 + args.steps):
            t = time.perf_counter()
            state[0], state[1], m = compiled(state[0], state[1], frozen, batch)
            jax.block_until_ready((state[0], m["loss"]))
            if i >= 3:
                times.append(time.perf_counter() - t)
        out[name] = {"compile_s": compile_s, "step_ms": 1e3 * float(np.median(times)),
                     "loss": float(np.mean(m["loss"]))}
    return out


def init_compare() -> dict:
    import jax
    from flax import nnx

    from emjax import sharding as shd
    from emjax.lora import LoraConfig
    from emjax.models import qwen3
    from emjax.train import INIT_COMPILER_OPTIONS, PRESETS

    cfg = qwen3.Qwen3Config(vocab_size=4096, tie_word_embeddings=True, **PRESETS["tiny"])
    mesh = shd.make_mesh({})

    def make():
        return nnx.split(qwen3.Qwen3ForCausalLM(cfg, lora=LoraConfig(rank=4, alpha=8), rngs=nnx.Rngs(0),
                                                embed_init_std=cfg.hidden_size ** -0.5))[1]

    shardings = shd.state_shardings(nnx.eval_shape(make), mesh)
    out = {}
    for name, options in (("default", None), ("emjax", INIT_COMPILER_OPTIONS)):
        t = time.perf_counter()
        lowered = jax.jit(make, out_shardings=shardings).lower()  # Lowered.compile compiles afresh (no cache dir)
        compiled = lowered.compile(options) if options else lowered.compile()
        jax.block_until_ready(compiled())
        out[name] = time.perf_counter() - t
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--skip-bench-shape", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--init", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child or args.init:
        print(json.dumps(init_compare() if args.init else child(args)))
        return 0
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # cold compiles on both sides
    cmd = [sys.executable, __file__, "--child", "--steps", str(args.steps)] + (
        ["--skip-bench-shape"] if args.skip_bench_shape else [])
    res = {}
    for side, flags in (("legacy", LEGACY), ("default", "")):
        print(f"timing {side} emitters ...", flush=True)
        out = subprocess.run(cmd, env={**env, "XLA_FLAGS": flags}, capture_output=True, text=True, check=True)
        res[side] = json.loads(out.stdout.strip().splitlines()[-1])
    print("\nXLA:CPU fusion emitters, one process each: JAX's default (MLIR; emjax uses it) vs legacy "
          f"({LEGACY}); ratio = legacy / default (above 1: the default is faster)")
    print(f"{'shape':13s} {'':11s} {'default':>10s} {'legacy':>10s} {'ratio':>7s}")
    for shape in [k for k in res["default"] if isinstance(res["default"][k], dict)]:
        a, b = res["default"][shape], res["legacy"][shape]
        print(f"{shape:13s} {'compile s':11s} {a['compile_s']:10.2f} {b['compile_s']:10.2f} "
              f"{b['compile_s'] / a['compile_s']:6.2f}x")
        print(f"{shape:13s} {'step ms':11s} {a['step_ms']:10.1f} {b['step_ms']:10.1f} "
              f"{b['step_ms'] / a['step_ms']:6.2f}x")
        print(f"{shape:13s} {'loss after':11s} {a['loss']:10.6f} {b['loss']:10.6f}")
    print("\nrandom init of the tiny preset over 8 simulated devices, compile + run, one process:")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    out = subprocess.run([sys.executable, __file__, "--init"], env=env, capture_output=True, text=True, check=True)
    init = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  LLVM optimised (JAX default) {init['default']:.2f} s, unoptimised (emjax) {init['emjax']:.2f} s: "
          f"{init['default'] / init['emjax']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
