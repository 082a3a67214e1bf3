"""Where the LoRA train step's time goes on this machine: forward vs forward+backward of the ≈35M Qwen3 shape of
bench/train_step.py (hidden states only, and with the loss), and one layer's attention (jax.nn.dot_product_attention)
and MLP alone. Prints milliseconds. With ``--ops`` it instead traces two full train steps with the
JAX profiler and prints where the time goes per XLA op (summed over both steps' executions, halved; ops that run
concurrently overlap, so the sum exceeds the wall time): the per-op findings in bench/RESULTS.md come from here.
With ``--faults`` it prints the time and the minor page faults of each of the first 10 steps after compiling (why
bench/train_step.py warms up 6 steps). Not a test.

    .venv/bin/python bench/profile_step.py [--ops [--spectral-weight 0.1] | --faults]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import resource
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emjax.lora import LoraConfig
from emjax.models import qwen3
from emjax.train import token_nll

from train_step import B, CFG, T, emjax_stepper, make_batch  # noqa: E402  (the train benchmark's shape and step)


def timed(f, *args, n=3) -> float:
    jax.block_until_ready(f(*args))
    t = time.perf_counter()
    for _ in range(n):
        out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / n * 1e3


def op_profile(spectral_weight: float = 0.0, top: int = 25):
    step = emjax_stepper(spectral_weight=spectral_weight)  # compiled and warmed up, AdamW
    hlo = step.compiled.as_text()
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        for _ in range(2):
            step()
        jax.profiler.stop_trace()
        events = json.load(gzip.open(glob.glob(f"{d}/plugins/profile/*/*.trace.json.gz")[0]))["traceEvents"]
    per_op, per_kind = collections.Counter(), collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and re.search(r"\.\d+$|fusion$", name) and "::" not in name:
            per_op[name] += e["dur"] / 2e3
            per_kind["ynn_fusion (mostly dots)" if name.startswith("ynn_fusion") else re.sub(r"[.\d]+$", "", name)] += \
                e["dur"] / 2e3
    print(f"per XLA op kind (ms per step, {sum(per_kind.values()):.0f} in all):")
    for k, v in per_kind.most_common(12):
        print(f"  {v:8.1f}  {k}")
    print("top ops:")
    for name, v in per_op.most_common(top):
        m = re.search(r"%" + re.escape(name) + r" = (\S+) .*?op_name=\"([^\"]*)\"", hlo)
        print(f"  {v:8.1f}  {name:36s} {m.group(1) if m else '':30s} {m.group(2)[-60:] if m else ''}")


def fault_profile(steps: int = 10):
    step = emjax_stepper(warmup=1)  # compiled, one step run
    for i in range(2, steps + 2):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = step()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        print(f"step {i:2d}: {t * 1e3:7.0f} ms, {faults:7d} minor faults")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", action="store_true", help="per-XLA-op breakdown of the full train step")
    ap.add_argument("--spectral-weight", type=float, default=0.0, help="λ of the step --ops profiles")
    ap.add_argument("--faults", action="store_true", help="time and page faults of the first steps")
    args = ap.parse_args()
    if args.faults:
        return fault_profile()
    if args.ops:
        return op_profile(args.spectral_weight)
    model = qwen3.Qwen3ForCausalLM(CFG, lora=LoraConfig(rank=32, alpha=64), rngs=nnx.Rngs(0))
    g, tr, fr = nnx.split(model, nnx.LoRAParam, ...)
    batch = make_batch()
    rng = np.random.default_rng(0)

    def hidden_sum(tr, fr, b):
        return nnx.merge(g, tr, fr)(b["tokens"], positions=b["positions"], segment_ids=b["segment_ids"],
                                    return_hidden=True).sum()

    def loss(tr, fr, b):
        return token_nll(nnx.merge(g, tr, fr), b)[0]

    rows = [
        ("hidden states, forward", jax.jit(hidden_sum)),
        ("hidden states, forward+backward (LoRA grads)", jax.jit(jax.grad(hidden_sum))),
        ("loss, forward", jax.jit(loss)),
        ("loss, forward+backward (LoRA grads)", jax.jit(jax.grad(loss))),
    ]
    for name, f in rows:
        print(f"{name:<48} {timed(f, tr, fr, batch):8.1f} ms")

    H, K, hd, D, F = CFG.num_heads, CFG.num_kv_heads, CFG.head_dim, CFG.hidden_size, CFG.intermediate_size
    q = jnp.asarray(rng.normal(size=(B, T, H, hd)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, T, K, hd)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    wg = jnp.asarray(rng.normal(size=(D, F)) * 0.02, jnp.float32)
    wd = jnp.asarray(rng.normal(size=(F, D)) * 0.02, jnp.float32)

    def attn(q, k):
        return jax.nn.dot_product_attention(q, k, k, is_causal=True).sum()

    def mlp(x):
        return ((jax.nn.silu(x @ wg) * (x @ wg)) @ wd).sum()

    print(f"{'one layer: attention fwd / fwd+bwd':<48} {timed(jax.jit(attn), q, k):8.1f} / "
          f"{timed(jax.jit(jax.grad(attn, argnums=(0, 1))), q, k):.1f} ms")
    print(f"{'one layer: MLP fwd / fwd+bwd':<48} {timed(jax.jit(mlp), x):8.1f} / "
          f"{timed(jax.jit(jax.grad(mlp)), x):.1f} ms")


if __name__ == "__main__":
    main()
