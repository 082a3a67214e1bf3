"""Sampler: greedy equals transformers generate(do_sample=False); sampling follows the softmax (chi-square)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from emjax import lora
from emjax.models import from_pretrained
from emjax.sampling import _decode, _prefill, generate, sample_logits
from emjax.testing import all_gathered_shapes, hf_greedy, tiny_hf_model

STOP = 7


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    hf = tiny_hf_model(seed=11, noise=0.2)
    hf.save_pretrained(d)
    return hf, d


def _hf_greedy(hf, prompt, n, stop=STOP):
    return hf_greedy(hf, prompt, n, stop)


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_greedy_matches_transformers_and_rows_are_independent(tiny, scan_layers):
    hf, d = tiny
    model = from_pretrained(d, dtype=jnp.float32)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(8, 256, n).tolist() for n in (5, 17, 9)]
    batch = generate(model, prompts, max_new_tokens=12, stop_tokens=(STOP,), scan_layers=scan_layers)
    for p, got in zip(prompts, batch):
        assert got == _hf_greedy(hf, p, 12)
        assert generate(model, [p], max_new_tokens=12, stop_tokens=(STOP,), scan_layers=scan_layers)[0] == got


def test_stops_at_stop_token(tiny):
    hf, d = tiny
    model = from_pretrained(d, dtype=jnp.float32)
    prompt = [10, 11, 12]
    free = generate(model, [prompt], max_new_tokens=10, stop_tokens=(255,))[0]
    stop = free[3]
    got = generate(model, [prompt], max_new_tokens=10, stop_tokens=(stop,))[0]
    assert got[-1] == stop and len(got) == free.index(stop) + 1
    assert got == _hf_greedy(hf, prompt, 10, stop=stop)


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_greedy_with_adapter_matches_peft(tiny, tmp_path, scan_layers):
    from peft import PeftModel

    hf, d = tiny
    model = from_pretrained(d, dtype=jnp.float32, lora=lora.LoraConfig(rank=4, alpha=8))
    r = np.random.default_rng(1)
    for _, lin in lora.lora_modules(model):
        lin.lora_b[...] = jnp.asarray(r.normal(0, 0.1, lin.lora_b.shape), jnp.float32)
    lora.export_peft(model, tmp_path / "ad")
    pm = PeftModel.from_pretrained(tiny_hf_model(seed=11, noise=0.2), tmp_path / "ad").eval()
    prompt = r.integers(8, 256, 6).tolist()
    got = generate(model, [prompt], max_new_tokens=10, stop_tokens=(STOP,), scan_layers=scan_layers)[0]
    assert got == _hf_greedy(pm, prompt, 10)
    assert got != generate(from_pretrained(d, dtype=jnp.float32), [prompt], max_new_tokens=10,
                           stop_tokens=(STOP,), scan_layers=scan_layers)[0]


def test_no_recompilation_for_same_buckets(tiny):
    _, d = tiny
    model = from_pretrained(d, dtype=jnp.float32)
    generate(model, [[1, 2, 3]], max_new_tokens=4)
    n_pre, n_dec = _prefill._cache_size(), _decode._cache_size()
    generate(model, [[4, 5, 6, 7, 8], [9]], max_new_tokens=4, temperature=0.7, top_p=0.9, rng=3)
    assert (_prefill._cache_size(), _decode._cache_size()) == (n_pre, n_dec)


def _adapters(d, n, moe=False):
    """n models on one checkpoint with different random adapters (B non-zero), and their LoRA states."""
    from flax import nnx

    models = []
    for i in range(n):
        m = from_pretrained(d, dtype=jnp.float32, lora=lora.LoraConfig(rank=4, alpha=8), seed=i)
        r = np.random.default_rng(10 + i)
        for _, lin in lora.lora_modules(m):
            lin.lora_b[...] = jnp.asarray(r.normal(0, 0.1, lin.lora_b.shape), jnp.float32)
        models.append(m)
    return models, [nnx.split(m, nnx.LoRAParam, ...)[1] for m in models]


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_generate_many_equals_generate_per_adapter(tiny, scan_layers):
    """Three adapters in one program: each gets exactly ``generate``'s tokens (greedy, and sampled with its own key
    or one shared key), and the adapters really differ."""
    from emjax.sampling import generate_many

    _, d = tiny
    models, ads = _adapters(d, 3)
    prompts = [np.random.default_rng(n).integers(8, 256, n).tolist() for n in (5, 17, 9)]
    kw = dict(max_new_tokens=10, stop_tokens=(STOP,), scan_layers=scan_layers)
    greedy = generate_many(models[0], ads, prompts, **kw)
    assert greedy == [generate(m, prompts, **kw) for m in models]
    assert greedy[0] != greedy[1]
    from emjax import multi

    assert generate_many(models[0], multi.stack(ads), prompts, **kw) == greedy  # one stacked state
    sampled = generate_many(models[0], ads, prompts, temperature=1.0, top_p=0.9, rngs=[3, 4, 5], **kw)
    assert sampled == [generate(m, prompts, temperature=1.0, top_p=0.9, rng=3 + i, **kw) for i, m in enumerate(models)]
    shared = generate_many(models[1], ads[1:], prompts, temperature=1.0, rngs=7, **kw)
    assert shared == [generate(m, prompts, temperature=1.0, rng=7, **kw) for m in models[1:]]
    with pytest.raises(ValueError, match="2 rngs for 3 adapters"):
        generate_many(models[0], ads, prompts, rngs=[1, 2], **kw)


def test_pack_sampler_samples_each_chunk_once_per_seed_group(tiny, monkeypatch):
    """A pack's eval hooks: runs 0 and 1 (seed 5) share one generate_many per chunk, run 2 (seed 7) gets its own;
    with two adapters per call, three calls in all; every run gets generate's tokens for its own seed."""
    from emjax import sampling
    from emjax.eval.hook import PackSampler

    _, d = tiny
    models, ads = _adapters(d, 3)
    calls = []
    real = sampling.generate_many
    monkeypatch.setattr(sampling, "generate_many", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    sampler = PackSampler((STOP,), adapters_per_call=1)
    sampler.set_step(models[0], dict(enumerate(ads)), {0: 5, 1: 5, 2: 7})
    prompts = [[10, 11, 12], [40, 41]]
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=1.0)
    for run, seed in ((0, 100), (1, 100), (2, 100), (1, 101)):
        got = sampler.generate(run, prompts, seed=seed, **kw)
        assert got == generate(models[run], prompts, rng=jax.random.key(seed), stop_tokens=(STOP,), **kw)
    assert calls == [1, 1, 1, 1, 1]  # chunk 100: runs 0, 1 (one adapter a call), run 2; chunk 101: runs 0, 1
    sampler.adapters_per_call = 2
    calls.clear()
    sampler.reset()
    sampler.set_step(models[0], dict(enumerate(ads)), {0: 5, 1: 5, 2: 7})
    for run in (1, 0):
        assert sampler.generate(run, prompts, seed=100, **kw) == generate(
            models[run], prompts, rng=jax.random.key(100), stop_tokens=(STOP,), **kw)
    assert calls == [2] and not sampler._cache


def _chi2_p(counts, probs):
    probs = np.asarray(probs, np.float64)
    return stats.chisquare(counts, probs / probs.sum() * counts.sum()).pvalue


def _frequencies(logits, n, **kw):
    keys = jax.random.split(jax.random.key(0), n)
    draw = jax.jit(jax.vmap(lambda k: sample_logits(logits[None], k, **kw)[0]))
    return np.bincount(np.asarray(draw(keys)), minlength=logits.shape[0])


def test_sampling_matches_softmax_chi_square():
    logits = jnp.asarray([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    for temperature in (1.0, 0.5):
        counts = _frequencies(logits, 20000, temperature=temperature)
        assert _chi2_p(counts, jax.nn.softmax(logits / temperature)) > 1e-3


@pytest.mark.parametrize("temperature,top_p,top_k", [(0.5, 0.6, 0), (0.7, 1.0, 4)])
def test_generate_draws_from_the_tempered_nucleus_of_the_models_logits(tiny, temperature, top_p, top_k):
    """``generate``'s own settings reach its draw: the first new token of 3000 rows of one prompt follows the softmax
    of transformers' last logits over ``temperature``, cut to the top-p nucleus or the top k (chi-square), and never
    a token outside it (the other sampled tests compare generate with generate_many, which share one step)."""
    from emjax.testing import hf_logits

    hf, d = tiny
    model = from_pretrained(d, dtype=jnp.float32)
    prompt = [12, 40, 99, 8, 200]
    last = hf_logits(hf, np.asarray([prompt]))[0, -1].astype(np.float64)
    p = np.exp((last - last.max()) / temperature)
    p /= p.sum()
    order = np.argsort(-p)
    kept = order[(np.cumsum(p[order]) - p[order]) < top_p][: top_k or None]
    outs = generate(model, [prompt] * 3000, max_new_tokens=1, temperature=temperature, top_p=top_p, top_k=top_k,
                    rng=0, stop_tokens=())
    counts = np.bincount([o[0] for o in outs], minlength=p.size)
    assert 2 <= kept.size <= 8 and counts.sum() == 3000
    assert counts[np.setdiff1d(np.arange(p.size), kept)].sum() == 0
    assert _chi2_p(counts[kept], p[kept]) > 1e-3


def test_top_k_and_top_p_renormalise():
    logits = jnp.asarray([2.0, 1.0, 0.5, 0.0, -1.0])
    p = np.asarray(jax.nn.softmax(logits), np.float64)
    counts = _frequencies(logits, 20000, temperature=1.0, top_k=2)
    assert counts[2:].sum() == 0
    assert _chi2_p(counts[:2], p[:2]) > 1e-3
    # top-p 0.8: keeps tokens until the mass before them reaches 0.8
    keep = (np.cumsum(p) - p) < 0.8
    counts = _frequencies(logits, 20000, temperature=1.0, top_p=0.8)
    assert counts[~keep].sum() == 0
    assert _chi2_p(counts[keep], p[keep]) > 1e-3


def _rows_with_ties_and_masks(V=3000, B=6):
    rng = np.random.default_rng(7)
    x = rng.normal(0, 3, (B, V)).astype(np.float32)
    x[1] = np.round(x[1])  # many ties
    x[2, rng.choice(V, V // 2, replace=False)] = np.finfo(np.float32).min  # masked half
    x[3] = -np.abs(x[3]) - 50  # all negative
    x[4, :] = 1.0  # all equal
    return x


@pytest.mark.parametrize("k", [1, 2, 40, 999])
def test_top_k_mask_equals_the_k_th_largest_value(k):
    from emjax.sampling import _top_k_mask

    x = _rows_with_ties_and_masks()
    kth = -np.sort(-x, axis=-1)[:, k - 1 : k]  # what lax.top_k's k-th value gives
    np.testing.assert_array_equal(np.asarray(jax.jit(_top_k_mask, static_argnums=1)(jnp.asarray(x), k)), x >= kth)


@pytest.mark.parametrize("top_p", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_top_p_mask_equals_the_sorted_definition(top_p):
    from emjax.sampling import _top_p_mask

    x = _rows_with_ties_and_masks()
    p = np.asarray(jax.nn.softmax(jnp.asarray(x), axis=-1), np.float64)
    got = np.asarray(jax.jit(_top_p_mask)(jnp.asarray(x), top_p))
    for row, keep in zip(p, got):
        # sorted: keep while the mass before a token is < top_p; the threshold keeps every token tied with the last.
        # fp32 sums may place a boundary within 1e-5 of top_p one token either way.
        srt = -np.sort(-row)
        before = np.cumsum(srt) - srt
        n_lo, n_hi = (max(1, int(np.sum(before < top_p + d))) for d in (-1e-5, 1e-5))
        assert any(np.array_equal(keep, row >= srt[n - 1]) for n in range(n_lo, n_hi + 1)), (top_p, keep.sum())


def test_categorical_across_blocks_matches_the_distribution():
    from emjax.sampling import _categorical

    V = 1300  # three blocks of 512, the last padded
    logits = np.full(V, np.finfo(np.float32).min, np.float32)  # probability 0 everywhere else
    hot = [0, 511, 512, 1023, 1299]
    logits[hot] = [1.0, 0.0, 2.0, -0.5, 0.5]
    draw = jax.jit(jax.vmap(lambda k: _categorical(k, jnp.asarray(logits)[None])[0]))
    counts = np.bincount(np.asarray(draw(jax.random.split(jax.random.key(1), 30000))), minlength=V)
    assert counts.sum() == counts[hot].sum()  # no token of probability 0 is ever drawn
    assert _chi2_p(counts[hot], jax.nn.softmax(jnp.asarray(logits[hot]))) > 1e-3


def test_temperature_zero_is_argmax():
    logits = jnp.asarray([[0.1, 3.0, 2.9], [5.0, -1.0, 0.0]])
    assert sample_logits(logits, jax.random.key(0), 0.0).tolist() == [1, 0]
    # ties go to the first maximum, as argmax; a NaN row still yields a valid id
    ties = jnp.asarray([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0], [jnp.nan, jnp.nan, jnp.nan]])
    assert sample_logits(ties, jax.random.key(0), 0.0).tolist() == [1, 0, 2]


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_generate_under_a_mesh_matches_single_device(tiny, scan_layers, monkeypatch, capfd):
    """On the 2×2×2 mesh the prompts, the KV cache and the decode loop are split by rows over data × fsdp (each
    device decodes its own rows; unsharded, every device decoded all of them), and the tokens equal one device's,
    greedy and sampled, for ``generate`` and ``generate_many``. The compiled decode loop gathers no weight: the
    weights stay sharded and partial products are summed over fsdp (emjax.sharding.DecodeLayout); left to the
    partitioner, every step all-gathered every layer's weights and the output projection. The cache's KV heads split
    over tensor and no part of it is gathered: each device attends with its own heads (every tensor device repeated
    the attention over a copy of its rows' cache before)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from emjax import sampling
    from emjax.sharding import make_mesh

    _, d = tiny
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    prompts = [[10, 11, 12, 13], [20, 21], [30, 31, 32]]
    kw = dict(max_new_tokens=6, stop_tokens=(STOP,), scan_layers=scan_layers)
    one = from_pretrained(d, dtype=jnp.float32)
    sharded = from_pretrained(d, dtype=jnp.float32, mesh=mesh)
    assert len(sharded.blocks.up_proj.kernel[...].sharding.device_set) == 8
    seen = []  # the partition specs of the cache each decode call gets: (lengths, {keys' and values'})
    gathered = {}  # the shapes the first mesh program of each decode function all-gathers

    def spy(name, real):
        def decode(*args):
            cache = next(a for a in args if isinstance(a, sampling.KVCache))
            spec = lambda x: getattr(x.sharding, "spec", None)  # noqa: E731 (one device: no spec)
            seen.append((spec(cache.lengths), {spec(x) for x in jax.tree.leaves((cache.k, cache.v))}))
            if spec(cache.lengths) is not None and name not in gathered:
                gathered[name] = all_gathered_shapes(real.lower(*args).compile().as_text())
            return real(*args)
        return decode

    for name in ("_decode", "_decode_many"):
        monkeypatch.setattr(sampling, name, spy(name, getattr(sampling, name)))
    for sample in (dict(), dict(temperature=1.0, rng=3)):
        assert generate(sharded, prompts, **sample, **kw) == generate(one, prompts, **sample, **kw)
    rows = ("data", "fsdp")

    def split_by_rows(specs, lead=0):  # lengths (B,); keys and values (B, K, ...), stacked (L, B, K, ...)
        lengths, kv = specs  # ... and the KV heads over tensor: attention runs on each device's own heads
        b = lead + int(scan_layers)
        return lengths[lead] == rows and all(spec[b] == rows and spec[b + 1] == "tensor" for spec in kv)

    assert split_by_rows(seen[0]), seen[0]
    weights = {tuple(x.shape[1:]) for x in jax.tree.leaves(nnx.state(sharded)) if x.ndim == 3}
    embed = tuple(sharded.embed[...].shape)
    weights |= {embed, embed[::-1]}
    assert len(weights) >= 4 and all(len(w) == 2 for w in weights)
    assert gathered["_decode"] and not weights & gathered["_decode"], gathered  # (it gathers activations)
    cache_len = 64 + kw["max_new_tokens"]  # nor any part of the cache (it was whole over tensor before)
    assert not any(cache_len in s for s in gathered["_decode"]), gathered

    models, ads = _adapters(d, 2)
    base = from_pretrained(d, dtype=jnp.float32, mesh=mesh, lora=lora.LoraConfig(rank=4, alpha=8))
    on_mesh = jax.device_put(ads, NamedSharding(mesh, P()))
    seen.clear()
    got = sampling.generate_many(base, on_mesh, prompts, temperature=1.0, rngs=[3, 4], **kw)
    assert got == sampling.generate_many(models[0], ads, prompts, temperature=1.0, rngs=[3, 4], **kw)
    assert split_by_rows(seen[0], lead=1), seen[0]
    assert gathered["_decode_many"] and not weights & gathered["_decode_many"], gathered
    assert not any(cache_len in s for s in gathered["_decode_many"]), gathered
    assert "Involuntary full rematerialization" not in capfd.readouterr().err  # XLA found a way for every layout



_TWO_PROCESS = """
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import jax.numpy as jnp
from emjax.models import from_pretrained
from emjax.sampling import generate
from emjax.sharding import make_mesh
model = from_pretrained(sys.argv[3], dtype=jnp.float32, mesh=make_mesh({"data": 2, "fsdp": -1}))
out = generate(model, json.loads(sys.argv[4]), max_new_tokens=5, stop_tokens=(int(sys.argv[5]),), temperature=1.0,
               rng=3)
print("OUT " + json.dumps(out))
"""


def test_two_processes_sample_what_one_device_does(tiny):
    """Two processes (jax.distributed, CPU collectives), two devices each: the rows split over all four devices, the
    ids come back to both processes, equal to one device's."""
    import json
    import os
    import socket
    import subprocess
    import sys

    _, d = tiny
    prompts = [[10, 11, 12], [20, 21], [5]]
    want = generate(from_pretrained(d, dtype=jnp.float32), prompts, max_new_tokens=5, stop_tokens=(STOP,),
                    temperature=1.0, rng=3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESS, f"127.0.0.1:{port}", str(i), str(d),
                               json.dumps(prompts), str(STOP)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        assert json.loads(out.split("OUT ", 1)[1]) == want
