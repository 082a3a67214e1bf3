"""Real Qwen3-0.6B config with random weights: max-abs logits difference, emjax vs transformers (fp32, on the CPU).

emjax runs on this machine's default device at full fp32 ("highest") and at JAX's default matmul precision (which on
recent NVIDIA GPUs lets XLA use TF32 for fp32 matmuls; emjax's fp32 training and sampling run at that default unless
told otherwise). Not a test (needs ~8 GB RAM and a minute or two on 2 cores). Run:
    .venv/bin/python bench/parity_full_size.py [--size 0.6b] [--tokens 64]
"""

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from emjax.models import from_pretrained, qwen3  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="0.6b", choices=sorted(qwen3.SIZES))
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    from transformers import Qwen3ForCausalLM

    from emjax.testing import hf_config

    hc = hf_config(qwen3.SIZES[args.size]())
    torch.manual_seed(0)
    hf = Qwen3ForCausalLM(hc).eval()
    tokens = np.random.default_rng(0).integers(0, 151_669, (1, args.tokens))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        t0 = time.perf_counter()
        model = from_pretrained(d, dtype=jnp.float32)
        load_s = time.perf_counter() - t0
        with torch.no_grad():
            ref = hf(torch.tensor(tokens)).logits.numpy()
        outs = {}
        for precision in ("highest", None):
            with jax.default_matmul_precision(precision):
                outs[precision or "default"] = np.asarray(jax.jit(lambda m, t: m(t))(model, jnp.asarray(tokens)))
    for precision, out in outs.items():
        diff = np.abs(out - ref)
        print(f"Qwen3-{args.size} random weights, fp32, {args.tokens} tokens, emjax on {jax.devices()[0].device_kind} "
              f"at {precision} matmul precision: max-abs logits diff {diff.max():.3e} (mean {diff.mean():.3e}; logits "
              f"scale {np.abs(ref).max():.2f}); conversion {load_s:.1f}s")


if __name__ == "__main__":
    main()
