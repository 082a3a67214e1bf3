"""What one decode step moves between devices when the weights are FSDP-sharded: emjax's decode layout
(``emjax.sharding.DecodeLayout``: activations cross devices, partial products summed over fsdp) against leaving the
layout to XLA's partitioner (what emjax did before: it all-gathered the weights in every step).

Compiles ``emjax.sampling._decode`` (the scanned KV cache, the accelerator default) for a random Qwen3 of the given
shape on a simulated CPU mesh and reads the bytes from the compiled program: every collective in the decode loop's
body, each layer's counted once per layer (the layer scan's trip count), i.e. the bytes each device receives or
sends per generated token, not counting any collective's algorithm. Also times a decode step on the simulated mesh,
which on one CPU says little about an interconnect (collectives there are memory copies). Not a test.

    .venv/bin/python bench/decode_collectives.py [--size bench|bench-moe|0.6b] [--mesh fsdp=8] [--batch 16] [--new 32]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("--size", default="bench", help="bench: the train benchmark's ≈35M shape; bench-moe: the same with "
                "16 experts of width 384, 4 per token; or a qwen3.SIZES key")
ap.add_argument("--mesh", default="fsdp=8", help="axis=size,... over simulated CPU devices (their product)")
ap.add_argument("--batch", type=int, default=16)
ap.add_argument("--prompt", type=int, default=32)
ap.add_argument("--new", type=int, default=32)
args = ap.parse_args()
MESH = {k: int(v) for k, v in (kv.split("=") for kv in args.mesh.split(","))}
N_DEV = 1
for v in MESH.values():
    N_DEV *= max(v, 1)
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={N_DEV}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import emjax.models.qwen3 as qwen3mod  # noqa: E402
from emjax import sampling  # noqa: E402
from emjax import sharding as shd  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from train_step import BENCH  # noqa: E402

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "s64": 8, "u64": 8}


def computations(hlo: str) -> dict[str, list[str]]:
    comps, cur = {}, None
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY\s+)?(%[\w.\-]+)\s.*\{\s*$", line)
        if m:
            cur = m.group(1)
            comps[cur] = []
        elif line.strip() == "}":
            cur = None
        elif cur:
            comps[cur].append(line)
    return comps


def result_bytes(line: str, op: str) -> int:
    result = line.split("=", 1)[1].split(f" {op}", 1)[0]
    shapes = re.findall(r"(\w+)\[([\d,]*)\]", result)
    if op.endswith("-start") and len(shapes) > 1:
        shapes = shapes[len(shapes) // 2:]  # an async start's tuple: (operands, results)
    return sum(BYTES.get(t, 4) * int(np.prod([int(d) for d in dims.split(",") if d] or [1])) for t, dims in shapes)


def collective_bytes(comps, name: str, seen=()) -> dict[str, int]:
    """Bytes per collective kind in one execution of computation ``name`` and what it calls (a while with a known
    trip count that many times; a conditional's costliest branch)."""
    out: dict[str, int] = {}

    def add(d, k=1):
        for key, v in d.items():
            out[key] = out.get(key, 0) + k * v

    for line in comps.get(name, []):
        for kind in COLLECTIVES:
            for op in (kind, f"{kind}-start"):
                if f" {op}(" in line:
                    add({kind: result_bytes(line, op)})
        if " while(" in line:
            trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
            body = re.search(r"body=(%[\w.\-]+)", line).group(1)
            add(collective_bytes(comps, body, seen + (name,)), int(trips.group(1)) if trips else 1)
            continue
        branches = re.search(r"branch_computations=\{([^}]*)\}", line)
        if branches:
            costs = [collective_bytes(comps, b.strip(), seen + (name,)) for b in branches.group(1).split(",")]
            add(max(costs, key=lambda d: sum(d.values())))
        for callee in re.findall(r"calls=(%[\w.\-]+)", line):
            if callee not in seen:
                add(collective_bytes(comps, callee, seen + (name,)))
    return out


def decode_loop_body(hlo: str, comps) -> str:
    for line in hlo.splitlines():
        if " while(" in line and 'op_name="jit(_decode)/while"' in line:
            return re.search(r"body=(%[\w.\-]+)", line).group(1)
    raise SystemExit("bench: the decode loop was not found in the compiled program")


def main():
    jax.config.update("jax_default_matmul_precision", "highest")
    moe = dict(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=384)
    cfg = {"bench": BENCH, "bench-moe": dataclasses.replace(BENCH, **moe)}.get(args.size) or qwen3mod.SIZES[args.size]()
    mesh = shd.make_mesh(MESH)
    model = qwen3mod.Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, shd.state_shardings(state, mesh))
    model = nnx.merge(graphdef, state)
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.prompt)).tolist()

    def run(layout: bool):
        jax.clear_caches()  # the decode program is traced again with the layout switched
        for mod in (qwen3mod, sampling):
            mod.decode_layout = shd.decode_layout if layout else (lambda x: shd.DecodeLayout())
        texts, real = [], sampling._decode

        def spy(*a):  # the first call's program (the timed calls run it without lowering it again)
            if not texts:
                texts.append(real.lower(*a).compile().as_text())
            return real(*a)

        sampling._decode = spy
        try:
            kw = dict(max_new_tokens=args.new, stop_tokens=(), length_bucket=32, scan_layers=True)
            out = sampling.generate(model, prompts, **kw)
            times = []
            for _ in range(3):
                t = time.perf_counter()
                sampling.generate(model, prompts, **kw)
                times.append(time.perf_counter() - t)
        finally:
            sampling._decode = real
            for mod in (qwen3mod, sampling):
                mod.decode_layout = shd.decode_layout
        comps = computations(texts[0])
        return out, collective_bytes(comps, decode_loop_body(texts[0], comps)), float(np.median(times))

    ours, ours_b, ours_t = run(True)
    xla, xla_b, xla_t = run(False)
    mb = lambda b: f"{b / 2**20:9.2f} MiB"  # noqa: E731
    print(f"Qwen3 shape {args.size} ({weight_bytes / 2**20:.0f} MiB of fp32 weights), mesh {dict(mesh.shape)} "
          f"(simulated CPU devices), batch {args.batch}, {args.new} new tokens, scanned KV cache")
    print("collective bytes per decode step (the loop body; per device), by kind:")
    for kind in COLLECTIVES:
        if ours_b.get(kind) or xla_b.get(kind):
            print(f"  {kind:20s} emjax layout {mb(ours_b.get(kind, 0))}   XLA's partitioner {mb(xla_b.get(kind, 0))}")
    tot_o, tot_x = sum(ours_b.values()), sum(xla_b.values())
    print(f"  {'total':20s} emjax layout {mb(tot_o)}   XLA's partitioner {mb(tot_x)}   "
          f"-> {tot_x / max(tot_o, 1):.1f}x less traffic")
    print(f"a call on the simulated mesh: emjax layout {ours_t:.2f} s, XLA's partitioner {xla_t:.2f} s "
          f"({xla_t / ours_t:.2f}x; one CPU's memory copies, not an interconnect); tokens identical: {ours == xla}")


if __name__ == "__main__":
    main()
