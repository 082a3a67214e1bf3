"""LoRA train step: emjax (jitted, donated) vs PyTorch + PEFT on the same Qwen3-shaped model.

Default shape (issue 5): hidden 512, intermediate 1536, 8 layers, 8 query / 4 KV heads, head_dim 64, vocab 18,992,
tied embeddings (≈35M parameters); batch 8 × 256 tokens; LoRA r 32, α 64, rsLoRA on all 7 projections; AdamW; fp32
(on a GPU at full fp32 precision on both sides: JAX "highest", PyTorch without TF32). ``--size 0.6b --dtype bfloat16``
times a real Qwen3 shape with random weights instead (frozen weights and compute in bf16 on both sides, LoRA factors
fp32; both libraries' default matmul precision). On a GPU the peak that MFU is quoted against is the fastest of 15 JAX
8192² matmuls in the bench's dtype, and PyTorch runs on the GPU too. On a CPU, PEFT is timed twice: in this process,
its steps alternating with emjax's (so it gets emjax's allocator setting, emjax/_malloc.py), and in its own process
with glibc's default allocator, as a user would run it. Also prints the cost
of the spectral penalty (λ > 0 over λ = 0) and of Muon against Adam, and the measured fp32 matmul peak (NumPy 2048²
matmuls) that MFU is quoted against. Each side runs 6 untimed warm-up steps (in some runs XLA:CPU's host heap still
grows, page-faulting ≈1.4 GB a step, up to the 5th step: bench/profile_step.py --faults); the step time is the median
of the timed steps (this shared 2-core machine's noise is ±15 %, with outliers to 2x). Each pair (emjax and PEFT in
this process, λ > 0 and λ = 0, Muon and Adam) is timed alternately, and the ratio of its fastest steps is printed too.
Not a test.

    .venv/bin/python bench/train_step.py [--steps 10] [--skip-torch] [--size 0.6b --dtype bfloat16 --seq 512]
                                         [--only peft,penalty,muon,remat]
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from emjax.lora import LoraConfig  # noqa: E402
from emjax.models import qwen3  # noqa: E402
from emjax.optim import OptimConfig, build  # noqa: E402
from emjax.train import flops_per_token, make_train_step  # noqa: E402

BENCH = qwen3.Qwen3Config(vocab_size=18_992, hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8,
                          num_kv_heads=4, head_dim=64, tie_word_embeddings=True)
# The benchmark's shape, dtype and device; main() sets them from the command line (profile_step imports the defaults)
CFG, B, T, DTYPE = BENCH, 8, 256, "float32"
WARMUP = 6  # untimed steps for both sides (compile, then heap growth); reported: the median of the timed ones
ON_GPU = jax.default_backend() == "gpu"


def matmul_peak(n=2048, reps=15) -> float:
    """Fastest of ``reps`` n² matmuls, in FLOP/s (a peak: the fastest, not the mean, on a noisy host): NumPy fp32 on a
    CPU; on a GPU, JAX 8192² in the bench's dtype and matmul precision."""
    if ON_GPU:
        n = 8192
        a = jax.random.normal(jax.random.key(0), (n, n), DTYPE)
        mm = jax.jit(lambda x, y: x @ y)
        mm(a, a).block_until_ready()
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            mm(a, a).block_until_ready()
            best = min(best, time.perf_counter() - t)
        return 2 * n**3 / best
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = a.copy()
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def make_batch() -> dict:
    """The benchmark batch: B × T random tokens, every position a loss target, one segment per row."""
    rng = np.random.default_rng(0)
    return {"tokens": jnp.asarray(rng.integers(0, CFG.vocab_size, (B, T)), jnp.int32),
            "loss_mask": jnp.ones((B, T), jnp.int32), "segment_ids": jnp.ones((B, T), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))}


def bench_model():
    """The benchmark's model with LoRA r 32, α 64, rsLoRA on all 7 projections, split into (LoRA config, graphdef,
    trainable, frozen); the same weights on every call."""
    lcfg = LoraConfig(rank=32, alpha=64, rslora=True)
    model = qwen3.Qwen3ForCausalLM(CFG, lora=lcfg, param_dtype=jnp.dtype(DTYPE), rngs=nnx.Rngs(0))
    return lcfg, *nnx.split(model, nnx.LoRAParam, ...)


def optimiser(name: str):
    """The benchmark's settings for optimiser ``name`` (weight decay 0.01 but for Adam; Muon with RMS scaling)."""
    return build(OptimConfig(name=name, learning_rate=1e-4, total_steps=1000,
                             weight_decay=0.0 if name == "adam" else 0.01, muon_scaling="rms"))


def stepper(step, trainable, opt_state, frozen, batch):
    """``step`` (jitted, donating its first two arguments) compiled once, ahead; calling the result runs one more step
    on its own state and returns its seconds. ``.compiled``: the executable (HLO text, memory analysis)."""
    compiled = step.lower(trainable, opt_state, frozen, batch).compile()
    state = [trainable, opt_state]

    def one() -> float:
        t = time.perf_counter()
        state[0], state[1], m = compiled(state[0], state[1], frozen, batch)
        jax.block_until_ready((state[0], m["loss"]))
        return time.perf_counter() - t

    one.compiled = compiled
    return one


def emjax_stepper(*, optim: str = "adamw", spectral_weight: float = 0.0, warmup: int = WARMUP, **memory):
    """A compiled, warmed-up train step (see ``stepper``). ``memory``: make_train_step's remat / loss_chunk /
    attn_chunk."""
    t = time.perf_counter()
    lcfg, graphdef, trainable, frozen = bench_model()
    tx = optimiser(optim)
    step = jax.jit(make_train_step(graphdef, tx, spectral_weight=spectral_weight, lora_scale=lcfg.scale, **memory),
                   donate_argnums=(0, 1))
    one = stepper(step, trainable, tx.init(trainable), frozen, make_batch())
    for _ in range(warmup):  # the first steps that grow the host heap
        one()
    opts = "".join(f" {k}={v}" for k, v in memory.items())
    print(f"  emjax {optim} λ={spectral_weight}{opts}: compile + {warmup} warm-up steps "
          f"{time.perf_counter() - t:.1f} s", flush=True)
    return one


def interleaved(a, b, steps: int) -> tuple[float, float, float]:
    """Median step times of two steppers timed alternately, so this machine's drift hits both alike, and the ratio of
    their fastest steps (b over a: the least disturbed estimate on a noisy host)."""
    ta, tb = [], []
    for _ in range(steps):
        ta.append(a())
        tb.append(b())
    return float(np.median(ta)), float(np.median(tb)), min(tb) / min(ta)


def peft_stepper():
    """The same step in PyTorch + PEFT (with grad-norm clipping, as emjax's AdamW chain), warmed up; calling the
    result runs one more step and returns its seconds."""
    import torch
    from peft import LoraConfig as PeftLoraConfig, get_peft_model
    from transformers import Qwen3ForCausalLM

    from emjax.testing import hf_config

    torch.set_num_threads(os.cpu_count() or 1)
    dev = "cuda" if ON_GPU else "cpu"
    with torch.device(dev):  # initialised where it runs (a 0.6B random init on the CPU took > 30 s on the H100 host)
        model = Qwen3ForCausalLM(hf_config(CFG)).to(getattr(torch, DTYPE))
    model = get_peft_model(model, PeftLoraConfig(r=32, lora_alpha=64, use_rslora=True, lora_dropout=0.0,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                 "up_proj", "down_proj"], task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)
    tokens = torch.randint(0, CFG.vocab_size, (B, T), device=dev)
    sync = torch.cuda.synchronize if ON_GPU else (lambda: None)

    def one() -> float:
        sync()
        t = time.perf_counter()
        out = model(input_ids=tokens, labels=tokens)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t

    for _ in range(WARMUP):
        one()
    return one


def main():
    global CFG, B, T, DTYPE
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--skip-torch", action="store_true", help="time emjax's step alone instead of the PEFT pair")
    ap.add_argument("--size", default="bench", choices=["bench", *qwen3.SIZES], help="bench: issue 5's ≈35M shape")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--only", default="peft,penalty,muon", help="comparisons to run (comma list of peft, penalty, "
                    "muon, remat); each pair is compiled and timed on its own")
    ap.add_argument("--peft-only", action="store_true", help=argparse.SUPPRESS)  # the default-allocator PEFT run
    args = ap.parse_args()
    CFG = BENCH if args.size == "bench" else qwen3.SIZES[args.size]()
    B, T, DTYPE = args.batch, args.seq, args.dtype
    only = set(args.only.split(","))
    full_fp32 = DTYPE == "float32"
    if full_fp32:  # fp32 means fp32 on a GPU too (JAX would use TF32 by default; PyTorch's default is full fp32)
        jax.config.update("jax_default_matmul_precision", "highest")
    if args.peft_only:
        run = peft_stepper()
        return print(f"PEFT_SECONDS {np.median([run() for _ in range(args.steps)])}")
    peak = matmul_peak()
    fpt = flops_per_token(CFG, T)
    tok = B * T
    where = (f"{jax.devices()[0].device_kind}, {'full fp32' if full_fp32 else 'default'} matmul precision"
             if ON_GPU else f"{os.cpu_count()} CPU threads")
    print(f"model {CFG.num_params / 1e6:.1f}M params, batch {B}x{T}, LoRA r32 all 7 projections, {DTYPE}, {where}; "
          f"measured {DTYPE} matmul peak {peak / 1e9:.0f} GFLOP/s; {fpt / 1e6:.0f} MFLOP/token (4N + attention)")
    rows = []
    base = functools.cache(emjax_stepper)  # the plain AdamW step, compiled once for every comparison below
    if args.skip_torch:  # emjax's step alone
        run = base()
        rows = [("emjax AdamW", float(np.median([run() for _ in range(args.steps)])))]
    elif "peft" in only:  # the two steps timed alternately in this process
        t_adamw, t_peft, fastest = interleaved(base(), peft_stepper(), args.steps)
        rows = [("emjax AdamW", t_adamw), ("PyTorch+PEFT AdamW", t_peft)]
        if not ON_GPU:  # PEFT as a user runs it: its own process, glibc's default allocator (emjax's mallopt is off)
            cmd = [sys.executable, __file__, "--peft-only", "--steps", str(args.steps), "--size", args.size,
                   "--dtype", DTYPE, "--batch", str(B), "--seq", str(T)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                 env={**os.environ, "EMJAX_MALLOC_TUNING": "0"}).stdout
            rows.append(("  same, own process*", float(out.split("PEFT_SECONDS")[-1])))
    for name, t in rows:
        print(f"{name:<22} {t * 1e3:8.1f} ms/step  {tok / t:8.0f} tokens/s  MFU {tok * fpt / t / peak:6.1%}")
    if len(rows) > 1:
        own = (f"; {rows[2][1] / rows[0][1]:.2f}x against PEFT in its own process with glibc's default allocator (*)"
               if len(rows) > 2 else "")
        alloc = "" if ON_GPU else ", where PEFT gets emjax's allocator setting too"
        print(f"speed-up emjax / PEFT: {rows[1][1] / rows[0][1]:.2f}x (medians, interleaved in this process{alloc}; "
              f"fastest steps {fastest:.2f}x){own}")
    if "penalty" in only:
        t0, t_pen, fastest = interleaved(base(), emjax_stepper(spectral_weight=0.1), args.steps)
        print(f"spectral penalty: step time with λ>0 / λ=0 = {t_pen / t0:.3f}x ({t_pen * 1e3:.1f} vs {t0 * 1e3:.1f} "
              f"ms, medians, interleaved; fastest steps {fastest:.3f}x)")
    if "muon" in only:
        t_adam, t_muon, fastest = interleaved(emjax_stepper(optim="adam"), emjax_stepper(optim="muon"), args.steps)
        print(f"Muon vs Adam: step time ratio = {t_muon / t_adam:.3f}x ({t_muon * 1e3:.1f} vs {t_adam * 1e3:.1f} ms, "
              f"medians, interleaved; fastest steps {fastest:.3f}x)")
    if "remat" in only:  # what the memory options cost in time (bench/memory.py: what they save)
        for kw in (dict(remat="dots"), dict(remat="full"), dict(remat="full", loss_chunk=64),
                   dict(remat="full", loss_chunk=64, attn_chunk=64)):
            t0, t1, fastest = interleaved(base(), emjax_stepper(**kw), args.steps)
            opts = " ".join(f"{k}={v}" for k, v in kw.items())
            print(f"{opts}: step time ratio to remat=none = {t1 / t0:.3f}x ({t1 * 1e3:.1f} vs {t0 * 1e3:.1f} ms, "
                  f"medians, interleaved; fastest steps {fastest:.3f}x)", flush=True)


if __name__ == "__main__":
    main()
