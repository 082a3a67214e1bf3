"""Sampling several adapters of one base: ``emjax.sampling.generate_many`` (one program, every base matmul one product
over all adapters' rows) against ``generate`` once per adapter, and against transformers + PEFT ``generate`` once per
adapter (``set_adapter``), same weights.

The train benchmark's ≈35M-parameter Qwen3 shape, fp32, LoRA r 32 on all 7 projections with random non-zero B, N
adapters (default 4), batch 16, 32-token prompts, exactly 128 new tokens, greedy. Counts the rows where emjax's
batched tokens equal its per-adapter tokens (they must all be equal) and PEFT's. Each side: one warm-up run (with
compilation), then the median of 3. What it shows: how much of a pack's evaluation during training the shared
decode step saves. Not a test.

    .venv/bin/python bench/sampling_many.py [--adapters 4] [--new 128] [--batch 16] [--skip-torch]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from emjax import lora  # noqa: E402
from emjax.models import from_pretrained  # noqa: E402
from emjax.sampling import generate, generate_many  # noqa: E402
from emjax.testing import hf_config  # noqa: E402
from train_step import BENCH  # noqa: E402  (the train benchmark's shape)


def timed(fn, reps: int = 3):
    t = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return out, first, statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--skip-torch", action="store_true")
    args = ap.parse_args()
    from peft import PeftModel
    from transformers import Qwen3ForCausalLM

    jax.config.update("jax_default_matmul_precision", "highest")
    dev = "cuda" if jax.default_backend() == "gpu" else "cpu"  # PyTorch on the GPU too, if there is one
    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 on both sides
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    hc = hf_config(BENCH)
    hf = Qwen3ForCausalLM(hc).eval()
    prompts = np.random.default_rng(0).integers(0, hc.vocab_size, (args.batch, args.prompt)).tolist()
    cfg = lora.LoraConfig(rank=32, alpha=64)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        models = []
        for i in range(args.adapters):
            m = from_pretrained(d, dtype=jnp.float32, lora=cfg, seed=i)
            r = np.random.default_rng(100 + i)
            for _, lin in lora.lora_modules(m):
                lin.lora_b[...] = jnp.asarray(r.normal(0, 0.02, lin.lora_b.shape), jnp.float32)
            lora.export_peft(m, f"{d}/ad{i}")
            models.append(m)
        adapters = [nnx.split(m, nnx.LoRAParam, ...)[1] for m in models]
        kw = dict(max_new_tokens=args.new, stop_tokens=(), length_bucket=32)
        print(f"{args.adapters} adapters × batch {args.batch}, {args.prompt}-token prompts, {args.new} new tokens, "
              f"fp32, {jax.devices()[0].device_kind}", flush=True)
        many, f_many, t_many = timed(lambda: generate_many(models[0], adapters, prompts, **kw))
        loop, f_loop, t_loop = timed(lambda: [generate(m, prompts, **kw) for m in models])
        same = sum(a == b for x, y in zip(many, loop) for a, b in zip(x, y))
        n_rows = args.adapters * args.batch
        tok = n_rows * args.new
        print(f"emjax generate_many (one program): {t_many:.2f} s, {tok / t_many:.0f} new tokens/s "
              f"(first call {f_many:.1f} s)")
        print(f"emjax generate per adapter:        {t_loop:.2f} s, {tok / t_loop:.0f} new tokens/s "
              f"(first calls {f_loop:.1f} s); rows identical: {same}/{n_rows}")
        print(f"  ratio: {t_loop / t_many:.2f}x")
        if args.skip_torch:
            return
        pm = PeftModel.from_pretrained(hf, f"{d}/ad0", adapter_name="a0").eval()
        for i in range(1, args.adapters):
            pm.load_adapter(f"{d}/ad{i}", adapter_name=f"a{i}")
        pm = pm.to(dev)
        ids = torch.tensor(prompts, device=dev)

        def peft_loop():
            outs = []
            for i in range(args.adapters):
                pm.set_adapter(f"a{i}")
                with torch.no_grad():
                    o = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=args.new, min_new_tokens=args.new, pad_token_id=0)
                outs.append(o[:, args.prompt:].tolist())  # .tolist() waits for the device
            return outs

        ref, f_ref, t_ref = timed(peft_loop)
        same_ref = sum(a == b for x, y in zip(many, ref) for a, b in zip(x, y))
        print(f"transformers + PEFT generate per adapter: {t_ref:.2f} s, {tok / t_ref:.0f} new tokens/s "
              f"(first calls {f_ref:.1f} s); rows identical to emjax: {same_ref}/{n_rows}")
        print(f"  ratio: {t_ref / t_many:.2f}x")


if __name__ == "__main__":
    main()
