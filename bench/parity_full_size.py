"""Real Qwen3-0.6B config with random weights: max-abs logits difference, emjax vs transformers, fp32.

Not a test (needs ~8 GB RAM and a minute or two on 2 cores). Run:
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
    jax.config.update("jax_default_matmul_precision", "highest")
    from transformers import Qwen3Config, Qwen3ForCausalLM

    c = qwen3.SIZES[args.size]()
    hc = Qwen3Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                     num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                     num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rope_theta=c.rope_theta,
                     tie_word_embeddings=c.tie_word_embeddings, rms_norm_eps=c.rms_norm_eps)
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
        out = np.asarray(jax.jit(lambda m, t: m(t))(model, jnp.asarray(tokens)))
    diff = np.abs(out - ref)
    print(f"Qwen3-{args.size} random weights, fp32, {args.tokens} tokens: max-abs logits diff {diff.max():.3e} "
          f"(mean {diff.mean():.3e}; logits scale {np.abs(ref).max():.2f}); conversion {load_s:.1f}s")


if __name__ == "__main__":
    main()
