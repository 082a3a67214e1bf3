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
from jax.sharding import NamedSharding, PartitionSpec as P

from emjax.lora import over_adapters
from emjax.models.qwen3 import KVCache
from emjax.sharding import batch_axes, batch_sharding, decode_layout, kv_heads_split, mesh_of, rows_on, to_host

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


def _prefill_one(model, tokens, mask, cache):
    """The prompts through the model into the cache; logits at each row's last prompt token."""
    h, cache = model.hidden_states(tokens, attention_mask=mask, cache=cache)
    last = jnp.take_along_axis(h, (cache.lengths - 1)[:, None, None], axis=1)[:, 0]
    return model.logits(last), cache


def _step_one(model, layers, head, cache, logits, done, key, sampling, stops):
    """One decode step of one model: draw from ``logits``, write PAD where a row is already done, run the token
    through the model -> (written tokens, done, cache, next logits)."""
    tok = sample_logits(logits, key, *sampling)
    written = jnp.where(done, PAD_ID, tok)
    done = done | jnp.isin(tok, stops)
    h, cache = model.hidden_states(tok[:, None], cache=cache, layers=layers)
    lay = decode_layout(h)  # on an FSDP mesh: partial logits summed over fsdp, not the head gathered
    return written, done, cache, lay.summed(model.logits(lay.wide(h[:, 0]), head=head), "vocab")


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(4,))
def _prefill(graphdef, state, tokens, mask, cache):
    return _prefill_one(nnx.merge(graphdef, state), tokens, mask, cache)


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
        tok, done, cache, logits = _step_one(model, layers, head, cache, logits, done, key,
                                             (temperature, top_p, top_k), stops)
        return step + 1, cache, logits, out.at[:, step].set(tok), done, rng

    init = (jnp.int32(0), cache, first_logits, jnp.full((B, max_new), PAD_ID, jnp.int32), jnp.zeros((B,), bool), rng)
    step, cache, _, out, done, _ = jax.lax.while_loop(cond, body, init)
    return out, step, cache  # returning the cache lets XLA run the loop in the donated buffer


def _sliced_layers(p: dict, n_layers: int):
    """``Qwen3ForCausalLM._layer_params()`` of a model whose LoRA factors carry a leading adapter axis, split into one
    dict per layer (base weights ``x[i]``, factors ``x[:, i]``), and the matching vmap ``in_axes`` (factors 0)."""
    def one(i):
        out = {}
        for k, v in p.items():
            out[k] = ((v[0][i], *(None if f is None else f[:, i] for f in v[1:])) if isinstance(v, tuple) else v[i])
        return out

    axes = {k: ((None, *(None if f is None else 0 for f in v[1:])) if isinstance(v, tuple) else None)
            for k, v in p.items()}
    return [one(i) for i in range(n_layers)], [axes] * n_layers


@functools.partial(jax.jit, static_argnums=(0, 6), donate_argnums=(5,))
def _prefill_many(graphdef, loras, rest, tokens, mask, cache, moe: bool):
    def one(lora, c):
        return _prefill_one(nnx.merge(graphdef, lora, rest), tokens, mask, c)

    return over_adapters(one, (0, 0), sequential=moe)(loras, cache)


@functools.partial(jax.jit, static_argnums=(0, 6, 7, 8, 9), donate_argnums=(3,))
def _decode_many(graphdef, loras, rest, cache, first_logits, params, max_new: int, stop_tokens: tuple, top_k: int,
                 moe: bool):
    """``_decode`` for N adapters on one base: each step is one vmapped step (every base matmul one product over
    all adapters' rows), each adapter drawing from its own key sequence exactly as ``_decode`` would."""
    temperature, top_p, rngs = params
    N, B = first_logits.shape[:2]
    stops = jnp.asarray(stop_tokens, jnp.int32)
    on_cpu = jax.default_backend() == "cpu"
    stacked = nnx.merge(graphdef, loras, rest)  # the base once; factors with their adapter axis
    if on_cpu and not cache.stacked and not moe:  # as in _decode: slice each layer's weights once, outside the loop
        layers, layer_axes = _sliced_layers(stacked._layer_params(), stacked.config.num_layers)
    else:
        layers, layer_axes = None, None
    head = stacked.head_matrix() if on_cpu else None

    def one(lora, lays, cache, logits, done, key):
        return _step_one(nnx.merge(graphdef, lora, rest), lays, head, cache, logits, done, key,
                         (temperature, top_p, top_k), stops)

    vstep = over_adapters(one, (0, layer_axes, 0, 0, 0, 0), sequential=moe)

    def cond(c):
        step, _, _, _, done, _ = c
        return (step < max_new) & ~jnp.all(done)

    def body(c):
        step, cache, logits, out, done, rngs = c
        keys = jax.vmap(jax.random.split)(rngs)
        tok, done, cache, logits = vstep(loras, layers, cache, logits, done, keys[:, 1])
        return step + 1, cache, logits, out.at[:, :, step].set(tok), done, keys[:, 0]

    init = (jnp.int32(0), cache, first_logits, jnp.full((N, B, max_new), PAD_ID, jnp.int32),
            jnp.zeros((N, B), bool), rngs)
    step, cache, _, out, _, _ = jax.lax.while_loop(cond, body, init)
    return out, step, cache


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
    n = len(prompts)
    rng = _key(rng)
    graphdef, state = nnx.split(model)
    mesh = mesh_of(state)
    tokens, mask = _padded_prompts(prompts, length_bucket, _row_bucket(mesh, batch_bucket))
    B, T = tokens.shape
    if scan_layers is None:
        scan_layers = jax.default_backend() != "cpu"
    cache = _new_cache(mesh, B, lambda: KVCache.init(model.config, B, T + max_new_tokens,
                                                     dtype=cache_dtype or model.dtype, stacked=scan_layers))
    logits, cache = _prefill(graphdef, state, *rows_on(mesh, tokens, mask), cache)
    params = (jnp.float32(temperature), jnp.float32(top_p), rng)
    out, _, _ = _decode(graphdef, state, cache, logits, params, int(max_new_tokens),
                     tuple(int(t) for t in stop_tokens), int(top_k))
    return _trim(to_host(out)[:n], stop_tokens, max_new_tokens)


# On a mesh the rows of a batch split over its batch axes (as in training), and so do the KV cache and the decode
# loop: each device decodes its own rows. Left unsharded, every device decoded every row and held the whole cache.

def _row_bucket(mesh, batch_bucket: int) -> int:
    """Batch padding unit: ``batch_bucket``, and a multiple of the devices the rows split over."""
    return math.lcm(batch_bucket, math.prod(mesh.shape[a] for a in batch_axes(mesh))) if mesh else batch_bucket


def _new_cache(mesh, B: int, make, lead: int = 0):
    """``make()``'s cache, created already split by rows over the mesh (never whole on one device), and by KV heads
    over tensor where the decode layout splits them (``kv_heads_split``); ``lead``: axes before the batch axis
    (``generate_many``'s adapters)."""
    if mesh is None:
        return make()
    shape = jax.eval_shape(make)
    kv = lead + (1 if shape.stacked else 0)  # keys and values (..., B, K, ...), stacked (..., L, B, K, ...)
    kv_sh = batch_sharding(mesh, B, kv)
    heads = kv_heads_split(mesh, B, jax.tree.leaves(shape.k)[0].shape[kv + 1])
    if heads:  # and the heads over tensor, as the decode step's attention uses them (emjax.sharding.DecodeLayout)
        kv_sh = NamedSharding(mesh, P(*kv_sh.spec, heads))

    def zeros(x, sharding):
        return jnp.zeros(x.shape, x.dtype, device=sharding)

    return KVCache(jax.tree.map(lambda x: zeros(x, kv_sh), shape.k), jax.tree.map(lambda x: zeros(x, kv_sh), shape.v),
                   zeros(shape.lengths, batch_sharding(mesh, B, lead)))


def _padded_prompts(prompts, length_bucket: int, batch_bucket: int):
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
    return tokens, mask


def _key(rng):
    if rng is None:
        return jax.random.key(0)
    return jax.random.key(rng) if isinstance(rng, int) else rng


def _trim(out, stop_tokens, max_new_tokens: int) -> list[list[int]]:
    """Each row up to and including its first stop token."""
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


def generate_many(model, adapters, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                  temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, rngs=None,
                  stop_tokens: Sequence[int] = STOP_TOKENS, length_bucket: int = 64, batch_bucket: int = 8,
                  cache_dtype=None, scan_layers: bool | None = None) -> list[list[list[int]]]:
    """``generate`` for several adapters on one base in one program: ``out[i][j]`` continues prompt j with adapter
    i. ``model``: a LoRA model (its frozen weights are the base; its own factors are not used); ``adapters``: LoRA
    states shaped like ``nnx.split(model, nnx.LoRAParam, ...)[1]`` (a sequence, or one state whose leaves carry a
    leading adapter axis, as ``emjax.multi.stack`` makes). ``rngs``: one key (or int) per adapter, or one for all;
    adapter i's draws are exactly those of ``generate(model_i, prompts, rng=rngs[i])``.

    Why: a decode step reads every base weight for a handful of rows; N adapters' rows in one step read them once
    (every base matmul becomes one product over N × B rows), which is what makes evaluating a pack's runs during
    training cheap (``bench/sampling_many.py``). On a Qwen3-MoE base the adapters take turns inside each step
    (see ``emjax.lora.over_adapters``)."""
    if not prompts:
        return []
    graphdef, _, rest = nnx.split(model, nnx.LoRAParam, ...)
    if isinstance(adapters, (list, tuple)):
        if not adapters:
            raise ValueError("generate_many: no adapters")
        adapters = jax.tree.map(lambda *xs: jnp.stack(xs), *adapters)
    N = int(jax.tree.leaves(adapters)[0].shape[0])
    if isinstance(rngs, (list, tuple)):
        if len(rngs) != N:
            raise ValueError(f"generate_many: {len(rngs)} rngs for {N} adapters")
        keys = jnp.stack([_key(r) for r in rngs])
    else:
        keys = jnp.stack([_key(rngs)] * N)
    mesh = mesh_of(rest)
    tokens, mask = _padded_prompts(prompts, length_bucket, _row_bucket(mesh, batch_bucket))
    B, T = tokens.shape
    if scan_layers is None:
        scan_layers = jax.default_backend() != "cpu"

    def make():
        one = KVCache.init(model.config, B, T + max_new_tokens, dtype=cache_dtype or model.dtype, stacked=scan_layers)
        return jax.tree.map(lambda x: jnp.zeros((N, *x.shape), x.dtype), one)

    cache = _new_cache(mesh, B, make, lead=1)
    moe = bool(model.config.is_moe)
    logits, cache = _prefill_many(graphdef, adapters, rest, *rows_on(mesh, tokens, mask), cache, moe)
    params = (jnp.float32(temperature), jnp.float32(top_p), keys)
    out, _, _ = _decode_many(graphdef, adapters, rest, cache, logits, params, int(max_new_tokens),
                             tuple(int(t) for t in stop_tokens), int(top_k), moe)
    out = to_host(out)
    return [_trim(o[:len(prompts)], stop_tokens, max_new_tokens) for o in out]
