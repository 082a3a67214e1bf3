"""In-graph sampling: one jitted prefill and one jitted ``while_loop`` decode over a donated static KV cache.

Prompt lengths are bucketed (and the batch padded) so repeated calls reuse the compiled programs; LoRA factors are
applied unmerged, so the same sampler serves evaluation during training.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emjax.models.qwen3 import KVCache

STOP_TOKENS = (151645, 151643)  # <|im_end|>, <|endoftext|>
PAD_ID = 151643


def _sortable(x):
    """float32 -> uint32 with the same order (for -0.0 < +0.0 and NaN aside): bisection on these keys finds any order
    statistic in 32 passes over the vocabulary. XLA:CPU sorts (behind argsort and ``lax.top_k``) are slow at
    Qwen3's 151,936 logits: with a sort per step, top-p 0.9 sampling ran at 24 new tokens/s in
    ``bench/sampling.py --vocab 151936``, with the bisection at 268."""
    u = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(u >> 31 == 1, ~u, u | jnp.uint32(1 << 31))


def _bisect(pred, lo, hi):
    """Smallest t in [lo, hi] (uint32, per row) with pred(t) true, for pred monotone (false ... false true ... true)
    and pred(hi) true: 32 halvings of the key range."""
    def body(_, c):
        lo, hi = c
        mid = lo + (hi - lo) // 2
        ok = pred(mid)
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    return jax.lax.fori_loop(0, 32, body, (lo, hi))[1]


def _top_k_mask(scaled, k: int):
    """Whether each logit is among the row's k largest (ties at the k-th value all stay), as ``lax.top_k``'s k-th
    value would give."""
    key = _sortable(scaled)
    # the k-th largest key is the smallest t with fewer than k keys above it
    lo, hi = jnp.min(key, -1, keepdims=True), jnp.max(key, -1, keepdims=True)
    kth = _bisect(lambda t: jnp.sum(key > t, -1, keepdims=True) < k, lo, hi)
    return key >= kth


def _top_p_mask(scaled, top_p):
    """Nucleus: the most probable tokens until the mass before the next one reaches ``top_p`` (the top token always
    stays; ties at the threshold probability all stay). The threshold is the smallest probability whose strictly
    more probable tokens hold less than ``top_p``, found by bisection rather than a sort."""
    p = jax.nn.softmax(scaled, axis=-1)
    key = jax.lax.bitcast_convert_type(p, jnp.uint32)  # p >= 0: the bits are in p's order
    hi = jnp.max(key, -1, keepdims=True)
    thr = _bisect(lambda t: jnp.sum(jnp.where(key > t, p, 0.0), -1, keepdims=True) < top_p,
                  jnp.zeros_like(hi), hi)
    return key >= thr


def _categorical(rng, scaled, block: int = 512):
    """One draw per row from softmax(scaled), by the inverse CDF in two levels (which block of ``block`` tokens,
    then which token in it): O(V) adds and one uniform per row, where the Gumbel-max trick of
    ``jax.random.categorical`` draws and takes two logs of a uniform per logit (temperature-1 sampling at Qwen3's
    vocabulary, ``bench/sampling.py --vocab 151936``: 196 new tokens/s with it, 396 with this). Tokens of probability
    0 (masked by top-k/top-p) are never drawn."""
    B, V = scaled.shape
    n = -(-V // block)
    e = jnp.exp(scaled - jnp.max(scaled, axis=-1, keepdims=True))
    e = jnp.pad(e, ((0, 0), (0, n * block - V))).reshape(B, n, block)
    mass = jnp.sum(e, axis=-1)  # (B, n)
    upto = jnp.cumsum(mass, axis=-1)
    u = jax.random.uniform(rng, (B, 1), jnp.float32) * upto[:, -1:]
    last = lambda w: jnp.max(jnp.where(w > 0, jnp.arange(w.shape[-1]), 0), -1)  # noqa: E731  (last non-zero)
    blk = jnp.minimum(jnp.sum(upto <= u, -1), last(mass))  # first block whose cumulative mass exceeds u
    before = jnp.take_along_axis(jnp.pad(upto, ((0, 0), (1, 0)))[:, :-1], blk[:, None], -1)
    inner = jnp.take_along_axis(e, blk[:, None, None], 1)[:, 0]  # (B, block)
    j = jnp.minimum(jnp.sum(jnp.cumsum(inner, -1) <= u - before, -1), last(inner))
    return jnp.minimum(blk * block + j, V - 1).astype(jnp.int32)


def sample_logits(logits, rng, temperature, top_p=1.0, top_k: int = 0):
    """Next token per row from fp32 logits (B, V). ``temperature`` 0 is greedy; ``top_k`` is static (0 = off).

    The sampling path (and its nucleus search for top-p) only runs when it is needed (``lax.cond``), so greedy
    decoding costs an argmax per step. No step sorts the vocabulary (see ``_sortable``)."""
    temperature = jnp.asarray(temperature, jnp.float32)
    top_p = jnp.asarray(top_p, jnp.float32)
    neg = jnp.finfo(jnp.float32).min

    def sample(logits):
        scaled = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
        if top_k and top_k < logits.shape[-1]:
            scaled = jnp.where(_top_k_mask(scaled, top_k), scaled, neg)
        scaled = jax.lax.cond(top_p < 1.0, lambda x: jnp.where(_top_p_mask(x, top_p), x, neg), lambda x: x, scaled)
        return _categorical(rng, scaled)

    def greedy(logits):
        # first index of the maximum, as argmax; two plain reductions run ≈ 2.5x faster than XLA:CPU's argmax
        V = logits.shape[-1]
        first = jnp.min(jnp.where(logits == jnp.max(logits, axis=-1, keepdims=True), jnp.arange(V), V), axis=-1)
        return jnp.minimum(first, V - 1).astype(jnp.int32)  # all-NaN row: a valid id rather than V

    return jax.lax.cond(temperature > 0, sample, greedy, logits)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(4,))
def _prefill(graphdef, state, tokens, mask, cache):
    model = nnx.merge(graphdef, state)
    h, cache = model.hidden_states(tokens, attention_mask=mask, cache=cache)
    last = jnp.take_along_axis(h, (cache.lengths - 1)[:, None, None], axis=1)[:, 0]
    return model.logits(last), cache


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7), donate_argnums=(2,))
def _decode(graphdef, state, cache, first_logits, params, max_new: int, stop_tokens: tuple, top_k: int):
    model = nnx.merge(graphdef, state)
    temperature, top_p, rng = params
    B = first_logits.shape[0]
    stops = jnp.asarray(stop_tokens, jnp.int32)
    # CPU with a per-layer cache (unrolled layers): slice each layer's weights out of the stacked arrays once,
    # outside the loop (a transient copy of the layer weights), instead of copying them every step; accelerators
    # slice in the step, keeping memory flat
    on_cpu = jax.default_backend() == "cpu"
    layers = model.layer_list() if on_cpu and not cache.stacked else None
    # likewise the output projection as a (D, V) matrix (tied: a transposed copy of the embedding), read in the
    # layout a small-batch matmul streams fastest
    head = model.head_matrix() if on_cpu else None

    def cond(c):
        step, _, _, _, done, _ = c
        return (step < max_new) & ~jnp.all(done)

    def body(c):
        step, cache, logits, out, done, rng = c
        rng, key = jax.random.split(rng)
        tok = sample_logits(logits, key, temperature, top_p, top_k)
        out = out.at[:, step].set(jnp.where(done, PAD_ID, tok))
        done = done | jnp.isin(tok, stops)
        h, cache = model.hidden_states(tok[:, None], cache=cache, layers=layers)
        return step + 1, cache, model.logits(h[:, 0], head=head), out, done, rng

    init = (jnp.int32(0), cache, first_logits, jnp.full((B, max_new), PAD_ID, jnp.int32), jnp.zeros((B,), bool), rng)
    step, cache, _, out, done, _ = jax.lax.while_loop(cond, body, init)
    return out, step, cache  # returning the cache lets XLA run the loop in the donated buffer


def _bucket(n: int, size: int) -> int:
    return max(size, int(math.ceil(n / size)) * size)


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, rng: jax.Array | int | None = None,
             stop_tokens: Sequence[int] = STOP_TOKENS, length_bucket: int = 64, batch_bucket: int = 8,
             cache_dtype=None, scan_layers: bool | None = None) -> list[list[int]]:
    """Generate continuations of token-id prompts; each result ends at (and includes) its stop token, or has
    ``max_new_tokens`` tokens. Greedy when ``temperature == 0``.

    ``scan_layers``: scan one layer body over a stacked KV cache (compile time flat in depth) instead of unrolling
    the layers over per-layer caches (the faster decode step on a CPU). Default: unrolled on a CPU, scanned on
    accelerators."""
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    n = len(prompts)
    B = _bucket(n, batch_bucket)
    T = _bucket(max(len(p) for p in prompts), length_bucket)
    tokens = np.zeros((B, T), np.int32)  # pad with id 0: always inside the embedding table
    mask = np.zeros((B, T), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
        mask[i, : len(p)] = 1
    mask[n:, 0] = 1  # padding rows: one dummy token so every row has a valid last position
    if rng is None:
        rng = jax.random.key(0)
    elif isinstance(rng, int):
        rng = jax.random.key(rng)
    graphdef, state = nnx.split(model)
    if scan_layers is None:
        scan_layers = jax.default_backend() != "cpu"
    cache = KVCache.init(model.config, B, T + max_new_tokens, dtype=cache_dtype or model.dtype, stacked=scan_layers)
    logits, cache = _prefill(graphdef, state, jnp.asarray(tokens), jnp.asarray(mask), cache)
    params = (jnp.float32(temperature), jnp.float32(top_p), rng)
    out, _, _ = _decode(graphdef, state, cache, logits, params, int(max_new_tokens),
                     tuple(int(t) for t in stop_tokens), int(top_k))
    out = np.asarray(out)[:n]
    stops = set(int(t) for t in stop_tokens)
    results = []
    for row in out:
        seq = []
        for t in row.tolist():
            seq.append(t)
            if t in stops:
                break
        results.append(seq[:max_new_tokens])
    return results
