"""Greedy sampling throughput: emjax.sampling.generate vs transformers generate(do_sample=False), same weights.

The train benchmark's ≈35M-parameter Qwen3 shape, batch 16, 32-token prompts, exactly 128 new tokens, fp32 (full fp32
on a GPU too: JAX "highest", PyTorch without TF32), on this machine's accelerator (PyTorch on the GPU too, if there is
one). ``--size 0.6b --dtype bfloat16`` times a real Qwen3 shape with random weights in bf16 instead (both libraries'
default precision; bf16 rounding may let a few rows part ways after a near tie). Counts the rows where both produce
the same tokens. Each side: one warm-up run (its time, with compilation, is printed too), then the median of 3.
``--forms both`` times emjax with both KV cache forms (unrolled per-layer, the CPU default; scanned stacked, the
accelerator default). ``--temperature 1 [--top-p 0.9] [--top-k 40]`` times sampling instead of greedy decoding
(transformers ``generate(do_sample=True)`` with the same settings; the draws differ, so no rows are compared; every
row still gets exactly ``--new`` tokens). Not a test.

    .venv/bin/python bench/sampling.py [--new 128] [--batch 16] [--size 0.6b --dtype bfloat16] [--forms both]
                                       [--temperature 1 --top-p 0.9 --top-k 0] [--vocab 151936]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from emjax.models import from_pretrained, qwen3  # noqa: E402
from emjax.sampling import generate  # noqa: E402
from emjax.testing import hf_config  # noqa: E402
from train_step import BENCH  # noqa: E402  (the train benchmark's shape)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--size", default="bench", choices=["bench", *qwen3.SIZES], help="bench: the train bench's shape")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--forms", default="default", choices=["default", "both"],
                    help="both: time emjax with the unrolled per-layer and the scanned stacked KV cache")
    ap.add_argument("--vocab", type=int, default=0, help="another vocabulary size (151936: Qwen3's)")
    ap.add_argument("--temperature", type=float, default=0.0, help="> 0: sample (both libraries)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    args = ap.parse_args()
    from transformers import Qwen3ForCausalLM
    sampled = args.temperature > 0

    if args.dtype == "float32":
        jax.config.update("jax_default_matmul_precision", "highest")
    gpu = jax.default_backend() == "gpu"
    dev = "cuda" if gpu else "cpu"
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    shape = BENCH if args.size == "bench" else qwen3.SIZES[args.size]()
    if args.vocab:
        shape = dataclasses.replace(shape, vocab_size=args.vocab)
    hc = hf_config(shape)
    with torch.device(dev):  # initialised where it runs (a 0.6B random init on the CPU took > 30 s on the H100 host)
        hf = Qwen3ForCausalLM(hc).eval().to(getattr(torch, args.dtype))
    prompts = np.random.default_rng(0).integers(0, hc.vocab_size, (args.batch, args.prompt))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        t = time.perf_counter()
        model = from_pretrained(d, dtype=jnp.dtype(args.dtype))
        print(f"  from_pretrained {time.perf_counter() - t:.1f} s", flush=True)

    def emjax_runner(scan_layers):
        return lambda: generate(model, prompts.tolist(), max_new_tokens=args.new, stop_tokens=(), length_bucket=32,
                                scan_layers=scan_layers, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, rng=0)

    how = (dict(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k or None)
           if sampled else dict(do_sample=False))

    def run_hf():
        ids = torch.tensor(prompts, device=dev)
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), **how,
                              max_new_tokens=args.new, min_new_tokens=args.new, eos_token_id=None, pad_token_id=0)
        return out[:, args.prompt:].tolist()  # .tolist() waits for the GPU

    def timed(run, reps=3):  # one untimed warm-up (compile) run, then the median of `reps` runs
        t = time.perf_counter()
        out = run()
        first = time.perf_counter() - t
        times = []
        for _ in range(reps):
            sync()
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
        return out, float(np.median(times)), first

    forms = {"emjax generate": None} if args.forms == "default" else {"emjax, unrolled layers": False,
                                                                      "emjax, scanned layers": True}
    ours = {name: timed(emjax_runner(scan)) for name, scan in forms.items()}
    ref, t_hf, first_hf = timed(run_hf)
    n = args.batch * args.new
    where = jax.devices()[0].device_kind if gpu else f"{os.cpu_count()} CPU threads"
    print(f"Qwen3 shape {args.size}{f' (vocabulary {args.vocab})' if args.vocab else ''}, batch {args.batch}, {args.prompt}-token prompts, {args.new} new tokens, "
          f"{args.dtype}, {where}, jax {jax.__version__} / torch {torch.__version__}, "
          + (f"sampled (temperature {args.temperature}, top-p {args.top_p}, top-k {args.top_k})" if sampled
             else "greedy"))
    for name, (out, t, first) in ours.items():
        assert all(len(r) == args.new for r in out)
        same = (f"rows token-identical to transformers: {sum(a == b for a, b in zip(out, ref))}/{args.batch}"
                if not sampled else "sampled: rows not compared")
        print(f"{name:<24} {n / t:8.0f} new tokens/s ({t:.2f} s; first call, compiling included, {first:.1f} s); "
              f"{same}")
    print(f"{'transformers generate':<24} {n / t_hf:8.0f} new tokens/s ({t_hf:.2f} s; first call {first_hf:.1f} s)")
    for name, (_, t, _) in ours.items():
        print(f"speed-up {name} / transformers: {t_hf / t:.2f}x")


if __name__ == "__main__":
    main()
