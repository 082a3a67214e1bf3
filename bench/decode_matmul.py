"""What one greedy decode step of bench/sampling.py's model must cost on this CPU: only its weight matmuls.

The ≈35M Qwen3 shape at batch 16 (one new token per row): per layer q, k, v, o, gate, up, down, then the tied
(D, V) output projection, 57 matmuls over ≈140 MB of fp32 weights. Times them chained in one jitted function
(XLA:CPU's kernels, what emjax's decode step runs) and with torch ``F.linear`` (what transformers runs), and prints
the host's DRAM read bandwidth (NumPy sum over 256 MB) for the bytes-only floor. A decode step of
``bench/sampling.py`` cannot beat the XLA number; compare it with new tokens/s there (step ms = 16000 / tokens/s).
Not a test.

    .venv/bin/python bench/decode_matmul.py
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from train_step import BENCH as CFG  # the train benchmark's shape

ROWS = 16


def median_s(f, reps: int = 20) -> float:
    f()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main():
    D, F, hd = CFG.hidden_size, CFG.intermediate_size, CFG.head_dim
    shapes = [(D, CFG.num_heads * hd), (D, CFG.num_kv_heads * hd), (D, CFG.num_kv_heads * hd),
              (CFG.num_heads * hd, D), (D, F), (D, F), (F, D)] * CFG.num_layers + [(D, CFG.vocab_size)]
    rng = np.random.default_rng(0)
    ws = [rng.standard_normal(s, dtype=np.float32) * 0.02 for s in shapes]
    nbytes = sum(w.nbytes for w in ws)
    flops = sum(2 * ROWS * a * b for a, b in shapes)

    big = np.ones(64 * 2**20, np.float32)
    bw = big.nbytes / median_s(big.sum, 5)

    def chain(x, ws):  # each matmul's input is the previous output cut to the next input width, as in a layer
        outs = []
        for w in ws:
            y = x[:, : w.shape[0]] if x.shape[1] >= w.shape[0] else jnp.tile(x, (1, w.shape[0] // x.shape[1]))
            x = y @ w
            outs.append(x[:, :1])
        return jnp.concatenate(outs, axis=1)

    f = jax.jit(chain)
    x = jnp.ones((ROWS, D), jnp.float32)
    jws = [jnp.asarray(w) for w in ws]
    t_xla = median_s(lambda: jax.block_until_ready(f(x, jws)))

    tws = [torch.from_numpy(w.T.copy()) for w in ws]  # nn.Linear stores (out, in)
    tx = torch.ones(ROWS, D)

    def torch_chain():
        with torch.no_grad():
            y = tx
            for w in tws:
                y = torch.nn.functional.linear(y[:, : w.shape[1]] if y.shape[1] >= w.shape[1]
                                               else y.repeat(1, w.shape[1] // y.shape[1]), w)
        return y

    t_torch = median_s(torch_chain)
    print(f"one decode step's weight matmuls, batch {ROWS}: {len(ws)} matmuls, {nbytes / 1e6:.0f} MB fp32, "
          f"{flops / 1e9:.2f} GFLOP")
    print(f"DRAM read (NumPy sum, 256 MB): {bw / 1e9:.1f} GB/s -> bytes-only floor {nbytes / bw * 1e3:.1f} ms")
    print(f"XLA:CPU (jitted chain)   {t_xla * 1e3:6.2f} ms  {flops / t_xla / 1e9:5.0f} GFLOP/s  "
          f"{nbytes / t_xla / 1e9:5.1f} GB/s  -> at most {ROWS / t_xla:.0f} new tokens/s")
    print(f"torch F.linear           {t_torch * 1e3:6.2f} ms  {flops / t_torch / 1e9:5.0f} GFLOP/s  "
          f"{nbytes / t_torch / 1e9:5.1f} GB/s  -> at most {ROWS / t_torch:.0f} new tokens/s")
    print(f"XLA vs torch on the matmuls alone: {t_torch / t_xla:.2f}x")


if __name__ == "__main__":
    main()
