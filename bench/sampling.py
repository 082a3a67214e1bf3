"""Greedy sampling throughput: emjax.sampling.generate vs transformers generate(do_sample=False), same weights.

The train benchmark's ≈35M-parameter Qwen3 shape, batch 16, 32-token prompts, exactly 128 new tokens, fp32, this
CPU. Checks that both produce the same tokens. Each side: one warm-up run, then the median of 3. Not a test.

    .venv/bin/python bench/sampling.py [--new 128] [--batch 16]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from emjax.models import from_pretrained  # noqa: E402
from emjax.sampling import generate  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=32)
    args = ap.parse_args()
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    hc = Qwen3Config(vocab_size=18_992, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                     num_attention_heads=8, num_key_value_heads=4, head_dim=64, tie_word_embeddings=True)
    hf = Qwen3ForCausalLM(hc).eval()
    prompts = np.random.default_rng(0).integers(0, hc.vocab_size, (args.batch, args.prompt))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model = from_pretrained(d, dtype=jnp.float32)

    def run_emjax():
        return generate(model, prompts.tolist(), max_new_tokens=args.new, stop_tokens=(), length_bucket=32)

    def run_hf():
        with torch.no_grad():
            out = hf.generate(torch.tensor(prompts), attention_mask=torch.ones_like(torch.tensor(prompts)),
                              do_sample=False, max_new_tokens=args.new, min_new_tokens=args.new, eos_token_id=None,
                              pad_token_id=0)
        return out[:, args.prompt:].tolist()

    def timed(run, reps=3):  # one untimed warm-up (compile) run, then the median of `reps` runs
        out = run()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
        return out, float(np.median(times))

    ours, t_ours = timed(run_emjax)
    ref, t_hf = timed(run_hf)
    n = args.batch * args.new
    same = sum(a == b for a, b in zip(ours, ref))
    print(f"batch {args.batch}, {args.prompt}-token prompts, {args.new} new tokens, fp32, {os.cpu_count()} threads, "
          f"jax {jax.__version__} / torch {torch.__version__}")
    print(f"emjax generate        {n / t_ours:8.0f} new tokens/s ({t_ours:.2f} s)")
    print(f"transformers generate {n / t_hf:8.0f} new tokens/s ({t_hf:.2f} s)")
    print(f"speed-up: {t_hf / t_ours:.2f}x; rows token-identical: {same}/{args.batch}")


if __name__ == "__main__":
    main()
