"""Per-device memory of the LoRA train step at a real Qwen3, Llama 3 or Gemma 3 size, with and without the memory
options (``remat``, ``loss_chunk``, ``attn_chunk``): XLA's buffer assignment of the compiled step
(``emjax.train.step_memory``), compiled for abstract inputs, so nothing of the model's size is allocated and a
laptop can read the numbers for Qwen3-8B.

The numbers are the current backend's. On a CPU read ``--dtype float32``: XLA:CPU computes bf16 matmuls in fp32 and
keeps an fp32 copy of the frozen weights (≈ 29 GiB of "temporaries" at 8B, whatever the batch), which a GPU or TPU
does not; a GPU's fusions differ too, but not what the options remove. The baseline is the step a user gets without
the options (``remat=none loss_chunk=0 attn_chunk=0``); the ratio column is each setting's peak over it (over the
first setting that compiled, where the baseline ran out of device memory compiling). ``--kept`` prints instead, for
each setting, the activations the step's backward keeps at the end of the forward (the leaves of ``jax.vjp``'s
backward function, traced abstractly, less the parameters), by dtype: a backend-independent count, so it reads bf16
correctly on a CPU. Not a test.

    .venv/bin/python bench/memory.py [--size 8b] [--batch 16] [--seq 2048] [--dtype float32]
                                     [--settings none:0:0,dots:0:0,full:0:0,full:128:0,full:128:256] [--kept]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from emjax.lora import LoraConfig  # noqa: E402
from emjax.models import gemma, llama, qwen3  # noqa: E402

SIZES = {**qwen3.SIZES, **llama.SIZES, **gemma.SIZES}
from emjax.optim import OptimConfig, build  # noqa: E402
from emjax.train import compile_measured, make_train_step, token_nll  # noqa: E402

GIB = 2.0 ** 30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="8b", choices=sorted(SIZES))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--dtype", default="float32" if jax.default_backend() == "cpu" else "bfloat16")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--settings", default="none:0:0,dots:0:0,full:0:0,full:128:0,full:128:256",
                    help="remat:loss_chunk:attn_chunk triples; the first that compiles is the baseline")
    ap.add_argument("--kept", action="store_true", help="the activations the backward keeps, instead of compiling")
    args = ap.parse_args()

    cfg = SIZES[args.size]()
    lora = LoraConfig(rank=32, alpha=64)
    dtype = jnp.dtype(args.dtype)
    abstract = nnx.eval_shape(lambda: qwen3.Qwen3ForCausalLM(cfg, lora=lora, param_dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, trainable, frozen = nnx.split(abstract, nnx.LoRAParam, ...)
    tx = build(OptimConfig(name="adamw", learning_rate=1e-5, total_steps=100))
    opt = jax.eval_shape(tx.init, trainable)
    B, T = args.batch, args.seq
    batch = {k: jax.ShapeDtypeStruct((B, T), jnp.int32) for k in ("tokens", "loss_mask", "segment_ids", "positions")}
    name = args.size if args.size.startswith(("llama", "gemma")) else f"Qwen3-{args.size}"
    print(f"{name} ({cfg.num_params / 1e9:.2f}B parameters, {args.dtype}), LoRA r 32 on all 7 "
          f"projections, AdamW, batch {B} x {T} tokens, grad_accum {args.grad_accum}; backend "
          f"{jax.default_backend()}, jax {jax.__version__}")
    if cfg.is_moe and jax.default_backend() == "cpu" and not args.kept:
        print(f"  note: XLA:CPU lowers the experts' ragged_dot densely (every token through all {cfg.num_experts} "
              f"experts), so its temporaries overstate what a GPU or TPU needs; --kept counts backend-independently")
    if args.kept:
        return print_kept(args, graphdef, trainable, frozen, batch)
    print(f"{'remat':>6} {'loss_chunk':>10} {'attn_chunk':>10} {'peak GiB':>10} {'temps GiB':>10} {'args GiB':>9} "
          f"{'ratio':>7} {'compile s':>9}")
    base = None
    for setting in args.settings.split(","):
        remat, chunk, attn = setting.split(":")
        step = jax.jit(make_train_step(graphdef, tx, grad_accum=args.grad_accum, lora_scale=lora.scale, remat=remat,
                                       loss_chunk=int(chunk), attn_chunk=int(attn)), donate_argnums=(0, 1))
        t0 = time.perf_counter()
        _, mem = compile_measured(step.lower(trainable, opt, frozen, batch))
        dt = time.perf_counter() - t0
        if mem is None:
            raise SystemExit(f"backend {jax.default_backend()} reports no memory analysis")
        if "compile_oom" in mem:  # XLA:GPU autotunes on real buffers, XLA:TPU checks HBM: it fails to compile
            print(f"{remat:>6} {chunk:>10} {attn:>10}   could not compile: out of device memory ({dt:.1f} s)",
                  flush=True)
            continue
        base = base or mem["peak"]
        print(f"{remat:>6} {chunk:>10} {attn:>10} {mem['peak'] / GIB:>10.2f} {mem['temporaries'] / GIB:>10.2f} "
              f"{mem['arguments'] / GIB:>9.2f} {mem['peak'] / base:>7.3f} {dt:>9.1f}", flush=True)


def print_kept(args, graphdef, trainable, frozen, batch) -> None:
    params = {(x.shape, x.dtype) for x in jax.tree.leaves((trainable, frozen))}
    print(f"{'remat':>6} {'loss_chunk':>10} {'attn_chunk':>10} {'kept GiB':>9}  by dtype (GiB), largest arrays")
    for setting in args.settings.split(","):
        remat, chunk, attn = setting.split(":")

        def kept(t, f, b):
            loss = lambda t: token_nll(nnx.merge(graphdef, t, f), b, remat=remat, loss_chunk=int(chunk),  # noqa: E731
                                       attn_chunk=int(attn))[0]
            return jax.tree.leaves(jax.vjp(loss, t)[1])

        acts = [x for x in jax.eval_shape(kept, trainable, frozen, batch) if (x.shape, x.dtype) not in params]
        nbytes = lambda x: x.size * x.dtype.itemsize  # noqa: E731
        by_dtype = {}
        for x in acts:
            by_dtype[str(x.dtype)] = by_dtype.get(str(x.dtype), 0) + nbytes(x)
        top = sorted(acts, key=nbytes, reverse=True)[:3]
        print(f"{remat:>6} {chunk:>10} {attn:>10} {sum(map(nbytes, acts)) / GIB:>9.2f}  "
              + " ".join(f"{k} {v / GIB:.2f}" for k, v in sorted(by_dtype.items())) + "; "
              + ", ".join(f"{x.dtype}{list(x.shape)}" for x in top), flush=True)


if __name__ == "__main__":
    main()
