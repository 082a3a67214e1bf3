"""emjax.spectral against NumPy: full SVDs of the dense product, direct metric formulas, finite differences.

Every test runs twice, once with each QR form (``sp.QR_IMPLS``) as the default: geqrf (the CPU and TPU default) and
the loop in JAX (the GPU default).

Singular-value tolerance (float32 maths): |σᵢ − σᵢ_ref| ≤ 1e-4·max(σᵢ_ref, 1e-2·σ₁_ref), i.e. 1e-4 relative
per value, and 1e-6·σ₁ absolute for values below 1e-2·σ₁ (the zeros of rank-deficient updates); for the
ill-conditioned cases also 5e-4 of each value down to the smallest (1e-4·σ₁).
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from emjax import spectral as sp


@pytest.fixture(autouse=True, params=sp.QR_IMPLS)
def qr_impl(request, monkeypatch):
    monkeypatch.setattr(sp, "_default_qr", lambda: request.param)  # read outside jit: each form compiles its own
    return request.param


def _orth(rng, m, n):
    q, _ = np.linalg.qr(rng.standard_normal((m, n)))
    return q


def _factor(rng, m, n, cond=None, rank=None):
    """m×n Gaussian, or with log-spaced singular values 1..1/cond, or of a given true rank."""
    k = min(m, n)
    if cond is not None:
        return _orth(rng, m, k) @ np.diag(np.logspace(0, -math.log10(cond), k)) @ _orth(rng, n, k).T
    x = rng.standard_normal((m, n))
    if rank is not None:
        x = rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n))
    return x


def _ref_sv(a, b, scale, r):
    """Top r singular values of the dense scale·a@b in float64 (zero-padded like emjax)."""
    prod = scale * np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    s = np.linalg.svd(prod, compute_uv=False)[..., :r]
    return np.concatenate([s, np.zeros(s.shape[:-1] + (r - s.shape[-1],))], -1)


def _assert_sv_close(s, ref, rel=1e-4, floor=1e-2):
    s, ref = np.asarray(s, np.float64), np.asarray(ref, np.float64)
    tol = rel * np.maximum(ref, floor * ref[..., :1])
    err = np.abs(s - ref)
    assert (err <= tol).all(), f"max err/tol {np.max(err / tol):.3g}"


CASES = {
    "random": dict(a=dict(), b=dict()),
    "rank_deficient": dict(a=dict(rank=5), b=dict()),  # true rank 5 < r = 16
    "ill_conditioned_b": dict(a=dict(), b=dict(cond=1e4)),  # the Gram/Cholesky route fails this one
    "ill_conditioned_both": dict(a=dict(cond=1e2), b=dict(cond=1e2)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("lead", [(), (2, 3)])
def test_singular_values_match_numpy_svd(case, lead):
    rng = np.random.default_rng(0)
    r, d_in, d_out = 16, 96, 64
    a = np.stack([_factor(rng, d_in, r, **CASES[case]["a"]) for _ in range(int(np.prod(lead)))])
    b = np.stack([_factor(rng, r, d_out, **CASES[case]["b"]) for _ in range(int(np.prod(lead)))])
    a = a.reshape(lead + a.shape[1:]).astype(np.float32)
    b = b.reshape(lead + b.shape[1:]).astype(np.float32)
    s, mask = sp.singular_values(a, b, scale=-11.3, return_mask=True)
    assert s.shape == lead + (r,) and s.dtype == jnp.float32 and mask.shape == lead and bool(mask.all())
    ref = _ref_sv(a, b, 11.3, r)
    _assert_sv_close(s, ref)
    assert (np.diff(np.asarray(s), axis=-1) <= 0).all()  # descending
    if case.startswith("ill"):  # every value is ≥ 1e-4·σ₁ here: hold each to 5e-4 of itself, about the float32
        # bound for a backward-stable QR (unit roundoff 6e-8 × cond 1e4). Seen on an AVX2 host, seeds 0-5 of this
        # case: up to 7.8e-5 (geqrf) and 1.6e-4 (loop); the Gram/Cholesky route errs by 0.13.
        _assert_sv_close(s, ref, rel=5e-4, floor=0.0)


@pytest.mark.parametrize("shape", [(3, 40, 8), (2, 6, 8), (8, 8)], ids=["tall", "wide", "square"])
def test_q_apply_equals_the_explicit_q_x64(shape, qr_impl):
    """The backward multiplies by Q through the reflectors (compact WY), never forming Q: the same product as
    jnp.linalg.qr's explicit Q, also where a column is already zero (τ = 0, the reflector is the identity)."""
    rng = np.random.default_rng(20)
    x = rng.standard_normal(shape)
    if len(shape) == 3:
        x[0, :, 3:] = 0.0  # rank 3: trailing reflectors are identities
    with jax.enable_x64(True):
        reflectors, r = sp._householder_qr(jnp.asarray(x), qr_impl)
        q, r_ref = jnp.linalg.qr(jnp.asarray(x))
        y = rng.standard_normal(shape[:-2] + (r.shape[-2], 5))
        np.testing.assert_allclose(sp._q_apply(reflectors, jnp.asarray(y)), q @ y, atol=1e-12)
        np.testing.assert_allclose(r, r_ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["gaussian", "zero_columns", "negative", "zero", "tiny", "huge", "wide"])
def test_loop_qr_gives_geqrf_reflectors_x64(kind):
    """The loop form is a drop-in for geqrf: the same packed reflectors, R and τ (larfg's sign and τ = 0
    conventions), and no under- or overflow in the column norms at float32's extremes (1e-30, 1e30). The reference is
    LAPACK's geqrf through numpy, whatever the backend: on a GPU, jnp.linalg.qr of float32 at those extremes failed
    this test (an H200, 2026-11-29; jaxlib sends small batched QRs to cuBLAS)."""
    rng = np.random.default_rng(21)
    x = rng.standard_normal((2, 3, 9, 5) if kind == "wide" else (3, 40, 6))
    if kind == "zero_columns":
        x[..., 2] = 0.0
        x[1, 5:, 4] = 0.0  # nothing below the diagonal: τ = 0
    x = {"negative": -np.abs(x), "zero": 0 * x, "tiny": 1e-30 * x, "huge": 1e30 * x}.get(kind, x)
    dtype = np.float32 if kind in ("tiny", "huge") else np.float64
    with jax.enable_x64(True):
        packed, taus_loop = map(np.asarray, jax.jit(sp._geqrf_loop)(jnp.asarray(x, dtype)))
    h, taus = np.linalg.qr(x.astype(dtype), mode="raw")
    ref = np.swapaxes(h, -1, -2)
    big = np.max(np.abs(x)) if kind in ("tiny", "huge") else 1.0
    upper = np.triu(np.ones(ref.shape[-2:], bool))  # R: scales with x; the reflectors below: O(1)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    assert packed.dtype == dtype and np.isfinite(packed).all()
    np.testing.assert_allclose(np.where(upper, packed / big, 0), np.where(upper, ref / big, 0), atol=tol)
    np.testing.assert_allclose(np.where(upper, 0, packed), np.where(upper, 0, ref), atol=tol)
    np.testing.assert_allclose(taus_loop, taus, atol=tol)


def test_penalty_qr_forms_agree():
    """The penalty and its gradient are the same with either QR form, up to float32 rounding, at init (b = 0) too."""
    rng = np.random.default_rng(22)
    mods = {"q": (rng.standard_normal((2, 48, 8)) / 7, rng.standard_normal((2, 8, 32)) * 1e-3),
            "down": (rng.standard_normal((2, 64, 8)) / 8, _factor(rng, 8, 40, rank=3)[None].repeat(2, 0)),
            "fresh": (rng.standard_normal((2, 32, 8)), np.zeros((2, 8, 24)))}
    mods = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), mods)
    out = {qr: jax.jit(jax.value_and_grad(lambda m, qr=qr: sp.penalty(m, 2.0, qr=qr)))(mods) for qr in sp.QR_IMPLS}
    (v0, g0), (v1, g1) = out.values()
    np.testing.assert_allclose(v1, v0, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(y, x, rtol=1e-3, atol=1e-5 * float(jnp.max(jnp.abs(x))))
    assert not np.any(np.asarray(g0["fresh"][0])) and not np.any(np.asarray(g1["fresh"][0]))


def test_gram_cholesky_route_loses_small_singular_values():
    """Why QR: the paper's σ(a·chol(b bᵀ + 1e-8 I)) in float32 misses the same tolerance by orders of magnitude."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((96, 16)).astype(np.float32)
    b = _factor(rng, 16, 64, cond=1e4).astype(np.float32)
    chol = np.linalg.cholesky(b @ b.T + 1e-8 * np.eye(16, dtype=np.float32)).astype(np.float32)
    s_chol = np.linalg.svd(a @ chol, compute_uv=False)
    ref = _ref_sv(a, b, 1.0, 16)
    with pytest.raises(AssertionError):
        _assert_sv_close(s_chol, ref, floor=0.0)
    _assert_sv_close(sp.singular_values(a, b), ref, floor=0.0)


def test_the_papers_cholesky_method_on_request():
    """``method="cholesky"`` (reports only, for the paper's metric tables): a numpy transcription of the paper's
    σ = s·σ(a·chol(b bᵀ + 1e-8 I)) in float32, stacked modules and skipped ones too; on well-conditioned factors it
    agrees with the exact QR route, on ill-conditioned ones it is the paper's number, not the exact one."""
    rng = np.random.default_rng(5)
    a = rng.standard_normal((3, 96, 16)).astype(np.float32)
    b = np.stack([_factor(rng, 16, 64, cond=c) for c in (3.0, 1e4, 1.0)]).astype(np.float32)
    b[2] = 0.0  # still at B = 0: skipped
    got, mask = sp.singular_values(a, b, 2.0, return_mask=True, method="cholesky")
    assert mask.tolist() == [True, True, False] and not np.any(np.asarray(got[2]))
    for i in range(2):
        chol = np.linalg.cholesky(b[i] @ b[i].T + 1e-8 * np.eye(16, dtype=np.float32)).astype(np.float32)
        want = 2.0 * np.linalg.svd(a[i] @ chol, compute_uv=False)
        big = want >= (1e-2 if i else 0.0) * want[0]  # ill-conditioned: float32 Gram noise decides the small ones
        np.testing.assert_allclose(np.asarray(got[i])[big], want[big], rtol=2e-4, atol=1e-6 * want[0])
    _assert_sv_close(got[0], _ref_sv(a[0], b[0], 2.0, 16), floor=0.0)  # well conditioned: the exact values
    with pytest.raises(AssertionError):  # ill-conditioned: not the exact values (the QR route's are)
        _assert_sv_close(got[1], _ref_sv(a[1], b[1], 2.0, 16), floor=0.0)
    rep = sp.report({"q_proj": (a, b)}, 2.0, method="cholesky")
    assert rep["rows"][1]["condition_number"] == pytest.approx(float(got[1][0] / got[1][-1]), rel=1e-5)
    with pytest.raises(ValueError, match="method 'svd'"):
        sp.report({"q_proj": (a, b)}, method="svd")


def test_wide_factors_pad_with_zeros():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((12, 16)).astype(np.float32)  # d_in < r
    b = rng.standard_normal((16, 8)).astype(np.float32)  # d_out < r
    s = sp.singular_values(a, b)
    _assert_sv_close(s, _ref_sv(a, b, 1.0, 16))
    assert np.all(np.asarray(s)[8:] == 0)


def test_bf16_inputs_compute_in_float32():
    rng = np.random.default_rng(3)
    a32 = rng.standard_normal((4, 128, 16)).astype(np.float32)
    b32 = rng.standard_normal((4, 16, 64)).astype(np.float32)
    a, b = jnp.asarray(a32, jnp.bfloat16), jnp.asarray(b32, jnp.bfloat16)
    s = sp.singular_values(a, b, 2.0)
    assert s.dtype == jnp.float32
    # exact maths on the bf16 values: float32 tolerance; vs the unrounded float32 factors: bf16 rounding (~2^-8)
    _assert_sv_close(s, _ref_sv(np.asarray(a, np.float32), np.asarray(b, np.float32), 2.0, 16))
    _assert_sv_close(s, _ref_sv(a32, b32, 2.0, 16), rel=2e-2)


def test_float64_inputs_stay_float64():
    rng = np.random.default_rng(4)
    with jax.enable_x64(True):
        a, b = rng.standard_normal((64, 8)), _factor(rng, 8, 48, cond=1e6)
        s = sp.singular_values(jnp.asarray(a), jnp.asarray(b))
        assert s.dtype == jnp.float64
        _assert_sv_close(s, _ref_sv(a, b, 1.0, 8), rel=1e-9, floor=0.0)


def test_skipped_modules_detected():
    rng = np.random.default_rng(5)
    a = rng.standard_normal((3, 32, 4)).astype(np.float32)
    b = rng.standard_normal((3, 4, 16)).astype(np.float32)
    b[1] = 0.0
    b[2] *= 1e-14  # below B_NORM_TOL
    s, mask = sp.singular_values(a, b, return_mask=True)
    assert mask.tolist() == [True, False, False]
    assert sp.active(b).tolist() == [True, False, False]
    assert np.all(np.asarray(s)[1:] == 0) and np.all(np.asarray(s)[0] > 0)
    m = sp.metrics(s)
    assert m["active"].tolist() == [True, False, False]
    assert all(np.isfinite(np.asarray(m[k])[1:]).all() for k in ("stable_rank", "spectral_entropy", "fn_ratio"))


# ------------------------------------------------------------------------------------------------ metrics


def test_metrics_flat_and_spike():
    r = 8
    flat = sp.metrics(jnp.full((r,), 3.0))
    np.testing.assert_allclose(flat["stable_rank"], r, rtol=1e-6)
    np.testing.assert_allclose(flat["spectral_entropy"], math.log(r), rtol=1e-6)
    np.testing.assert_allclose(flat["condition_number"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(flat["fn_ratio"], 1 / math.sqrt(r), rtol=1e-6)
    spike = sp.metrics(jnp.array([5.0] + [0.0] * (r - 1)))
    np.testing.assert_allclose(spike["stable_rank"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(spike["spectral_entropy"], 0.0, atol=1e-7)
    assert np.isinf(spike["condition_number"])  # rank-deficient: σ_r == 0
    np.testing.assert_allclose(spike["fn_ratio"], 1.0, rtol=1e-6)
    zero = sp.metrics(jnp.zeros((2, r)))
    assert not zero["active"].any()
    for k in ("stable_rank", "spectral_entropy", "fn_ratio"):
        assert np.all(np.asarray(zero[k]) == 0)


def test_metrics_random_match_numpy_formulas():
    rng = np.random.default_rng(6)
    s = -np.sort(-rng.uniform(0.01, 5.0, (3, 5, 12)), axis=-1)
    m = sp.metrics(jnp.asarray(s, jnp.float32))
    p = s / s.sum(-1, keepdims=True)
    want = {
        "stable_rank": (s**2).sum(-1) / s[..., 0] ** 2,
        "spectral_entropy": -(p * np.log(p)).sum(-1),
        "condition_number": s[..., 0] / s[..., -1],
        "fn_ratio": np.sqrt((s**2).sum(-1)) / s.sum(-1),
    }
    for k, v in want.items():
        np.testing.assert_allclose(m[k], v, rtol=2e-6, err_msg=k)


# ------------------------------------------------------------------------------------------------ penalty


def _np_penalty(s, kind):
    r = s.shape[-1]
    if kind == "fn_ratio":
        return np.sqrt((s**2).sum(-1)) / s.sum(-1) - 1 / math.sqrt(r)
    p = s / s.sum(-1, keepdims=True)
    return math.log(r) + (p * np.log(p)).sum(-1)


def _adapters(rng, dtype=np.float32, L=2, r=6):
    shapes = {"q_proj": (40, 40), "k_proj": (40, 24), "down_proj": (56, 40)}
    return {
        n: (rng.standard_normal((L, di, r)).astype(dtype), rng.standard_normal((L, r, do)).astype(dtype))
        for n, (di, do) in shapes.items()
    }


@pytest.mark.parametrize("kind", ["fn_ratio", "entropy"])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_penalty_value_matches_full_svd(kind, reduce):
    rng = np.random.default_rng(7)
    ad = _adapters(rng)
    vals = np.concatenate([_np_penalty(_ref_sv(a, b, 2.0, 6), kind).ravel() for a, b in ad.values()])
    want = vals.mean() if reduce == "mean" else vals.sum()
    got = sp.penalty(ad, scale=2.0, kind=kind, reduce=reduce)
    assert got.shape == () and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert (vals >= 0).all()


@pytest.mark.parametrize("kind", ["fn_ratio", "entropy"])
def test_penalty_gradient_matches_finite_differences_x64(kind):
    rng = np.random.default_rng(8)
    with jax.enable_x64(True):
        a, b = jnp.asarray(rng.standard_normal((2, 7, 3))), jnp.asarray(rng.standard_normal((2, 3, 5)))
        f = lambda a, b: sp.penalty({"m": (a, b)}, scale=1.7, kind=kind)  # noqa: E731
        ga, gb = jax.grad(f, argnums=(0, 1))(a, b)
        fj = jax.jit(f)
        eps = 1e-6
        for x, g, which in ((a, ga, 0), (b, gb, 1)):
            num = np.zeros(x.shape)
            for idx in np.ndindex(*x.shape):
                e = jnp.zeros(x.shape).at[idx].set(eps)
                args_p = (a + e, b) if which == 0 else (a, b + e)
                args_m = (a - e, b) if which == 0 else (a, b - e)
                num[idx] = (fj(*args_p) - fj(*args_m)) / (2 * eps)
            np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("kind", ["fn_ratio", "entropy"])
def test_penalty_gradient_matches_autodiff_through_full_svd(kind):
    rng = np.random.default_rng(9)
    r = 6

    def dense(ad):
        vals = []
        for a, b in ad.values():
            s = jnp.linalg.svd(2.0 * a @ b, compute_uv=False)
            total = s.sum(-1)
            if kind == "fn_ratio":
                v = jnp.sqrt((s**2).sum(-1)) / total - 1 / math.sqrt(r)
            else:
                p = s / total[..., None]
                v = math.log(r) + jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), -1)
            vals.append(v.ravel())
        return jnp.concatenate(vals).mean()

    with jax.enable_x64(True):
        ad = jax.tree.map(jnp.asarray, _adapters(rng, dtype=np.float64, L=1, r=r))
        want = jax.jit(jax.grad(dense))(ad)
        got = jax.jit(jax.grad(lambda ad: sp.penalty(ad, scale=2.0, kind=kind)))(ad)
        for n in ad:
            for g, w in zip(got[n], want[n]):
                np.testing.assert_allclose(g, w, rtol=1e-7, atol=1e-10 * np.abs(w).max())


@pytest.mark.parametrize("kind", ["fn_ratio", "entropy"])
def test_penalty_finite_at_init_and_rank_deficient(kind):
    rng = np.random.default_rng(10)
    a = rng.standard_normal((3, 32, 8)).astype(np.float32)
    b = rng.standard_normal((3, 8, 24)).astype(np.float32)
    b[0] = 0.0  # initialisation
    a[1, :, 3:] = 0.0  # rank 3 < r, σ exactly 0
    a[2] = rng.standard_normal((32, 2)) @ rng.standard_normal((2, 8))  # rank 2, σ zero only up to rounding
    f = jax.jit(lambda a, b: sp.penalty((a, b), kind=kind, reduce="sum"))
    v = f(a, b)
    ga, gb = jax.grad(f, argnums=(0, 1))(a, b)
    assert np.isfinite(v) and np.isfinite(ga).all() and np.isfinite(gb).all()
    assert np.all(np.asarray(ga[0]) == 0) and np.all(np.asarray(gb[0]) == 0)  # b = 0 contributes nothing
    per = sp.per_module_penalty(a, b, kind=kind)
    assert float(per[0]) == 0.0
    # the rank-deficient entries are ordinary penalties of their nonzero spectrum (zeros included in r)
    np.testing.assert_allclose(per[1:], _np_penalty(_ref_sv(a[1:], b[1:], 1.0, 8), kind), rtol=1e-4)
    ga0, gb0 = jax.grad(lambda a, b: sp.penalty((a, b), kind=kind), argnums=(0, 1))(a * 0, b * 0)
    assert np.all(np.asarray(ga0) == 0) and np.all(np.asarray(gb0) == 0)


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_penalty_over_some_layers_counts_only_them(reduce):
    """``layers`` (an adapter on those layers only, ``LoraConfig.layers``): the penalty of the stack restricted to
    them, the mean's denominator included; the other layers get no gradient (here they are not even zero)."""
    rng = np.random.default_rng(13)
    ad = _adapters(rng, L=4)
    keep = [1, 3]
    got = sp.penalty(ad, scale=2.0, reduce=reduce, layers=keep)
    want = sp.penalty({n: (a[keep], b[keep]) for n, (a, b) in ad.items()}, scale=2.0, reduce=reduce)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert abs(float(got) - float(sp.penalty(ad, scale=2.0, reduce=reduce))) > 1e-4
    g = jax.grad(lambda ad: sp.penalty(ad, scale=2.0, reduce=reduce, layers=keep))(ad)
    for ga, gb in g.values():
        assert not np.any(np.asarray(ga)[[0, 2]]) and not np.any(np.asarray(gb)[[0, 2]])
        assert np.all(np.abs(np.asarray(gb)[keep]).sum(axis=(1, 2)) > 0)
    rep = sp.report(ad, scale=2.0, layers=keep)  # the other layers' rows are left out, not skipped
    assert {r["index"][0] for r in rep["rows"]} == set(keep) and rep["overall"]["n"] == 3 * len(keep)
    sub = sp.report({n: (a[keep], b[keep]) for n, (a, b) in ad.items()}, scale=2.0)
    assert rep["overall"]["fn_ratio"] == pytest.approx(sub["overall"]["fn_ratio"], rel=1e-6)


def test_penalty_bf16_gradients_come_back_in_bf16():
    rng = np.random.default_rng(11)
    ad = {k: (jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)) for k, (a, b) in _adapters(rng).items()}
    g = jax.jit(jax.grad(sp.penalty))(ad)
    assert all(x.dtype == jnp.bfloat16 and np.isfinite(np.asarray(x, np.float32)).all() for p in g.values() for x in p)


def test_penalty_sharded_over_layers_matches_unsharded():
    rng = np.random.default_rng(12)
    ad = _adapters(rng, L=8)
    mesh = jax.make_mesh((8,), ("layers",), axis_types=(jax.sharding.AxisType.Explicit,))
    shard = NamedSharding(mesh, P("layers"))
    ad_sh = jax.device_put(ad, shard)
    f = jax.jit(jax.value_and_grad(lambda ad: sp.penalty(ad, scale=11.3)))
    v, g = f(ad)
    v_sh, g_sh = f(ad_sh)
    hlo = f.lower(ad_sh).compile().as_text()
    assert "all-gather" not in hlo and "f32[1,40,6]" in hlo  # QR is batch-partitioned: one layer per device
    np.testing.assert_allclose(v_sh, v, rtol=1e-6)
    for n in ad:
        for x, y in zip(g_sh[n], g[n]):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6 * np.abs(np.asarray(y)).max())
            assert x.sharding.spec[0] == "layers"  # gradients stay sharded like the factors


# ------------------------------------------------------------------------------------------------ reports


def test_report_and_summary():
    rng = np.random.default_rng(13)
    ad = _adapters(rng, L=3)
    ad["layers/self_attn/k_proj"] = ad.pop("k_proj")
    ad["q_proj"][1][1] = 0.0  # q_proj layer 1 skipped
    rep = sp.report(ad, scale=2.0, include_sigma=True)
    json.dumps(rep, allow_nan=False)
    assert len(rep["rows"]) == 9
    assert set(rep["by_projection"]) == {"q_proj", "k_proj", "down_proj"}
    q = rep["by_projection"]["q_proj"]
    assert (q["n"], q["n_skipped"]) == (3, 1)
    assert rep["overall"]["n_skipped"] == 1
    skipped = [r for r in rep["rows"] if not r["active"]]
    assert [(r["module"], r["index"]) for r in skipped] == [("q_proj", [1])]
    assert all(skipped[0][k] is None for k in sp.METRIC_NAMES)
    a, b = ad["q_proj"]
    ref = _ref_sv(a[[0, 2]], b[[0, 2]], 2.0, 6)
    want = np.sqrt((ref**2).sum(-1)) / ref.sum(-1)
    np.testing.assert_allclose(q["fn_ratio"], want.mean(), rtol=1e-5)
    # the mean normalised spectrum σᵢ/σ₁ over active rows (what emjax report plots per optimiser), from plain SVDs
    np.testing.assert_allclose(q["normalised_spectrum"], (ref / ref[:, :1]).mean(0), rtol=1e-5, atol=1e-6)
    every = [_ref_sv(x[0][i], x[1][i], 2.0, 6) for k, x in ad.items() for i in range(3) if k != "q_proj" or i != 1]
    np.testing.assert_allclose(rep["overall"]["normalised_spectrum"], np.mean([s / s[0] for s in every], 0),
                               rtol=1e-5, atol=1e-6)
    row = next(r for r in rep["rows"] if r["projection"] == "k_proj" and r["index"] == [2])
    _assert_sv_close(np.array(row["sigma"]), _ref_sv(*[x[2] for x in ad["layers/self_attn/k_proj"]], 2.0, 6))
    flat = sp.summary(ad, scale=2.0)
    assert flat["spectral/fn_ratio/q_proj"] == pytest.approx(q["fn_ratio"])
    assert flat["spectral/n_skipped"] == 1
    assert flat["spectral/stable_rank"] == pytest.approx(rep["overall"]["stable_rank"])


def test_projection_type():
    assert sp.projection_type("model/layers/3/self_attn/q_proj") == "q_proj"
    assert sp.projection_type("layers.7.mlp.down_proj") == "down_proj"


# ------------------------------------------------------------------------------------------------ errors


def test_bad_inputs_raise_clear_errors():
    a, b = jnp.ones((2, 8, 4)), jnp.ones((2, 4, 6))
    with pytest.raises(ValueError, match="'v_proj'.*a \\(2, 8, 4\\) and b \\(2, 5, 6\\)"):
        sp.penalty({"q_proj": (a, b), "v_proj": (a, jnp.ones((2, 5, 6)))})
    with pytest.raises(ValueError, match="unknown penalty kind 'nuclear'"):
        sp.penalty((a, b), kind="nuclear")
    with pytest.raises(ValueError, match="reduce"):
        sp.penalty((a, b), reduce="max")
    with pytest.raises(TypeError, match="floating"):
        sp.singular_values(jnp.ones((8, 4), jnp.int32), b[0])
    with pytest.raises(ValueError, match=r"already registered \(by emjax.spectral._fn_ratio_penalty\).*replace=True"):
        sp.register_penalty("fn_ratio")(lambda s, m: s)
    old = sp.PENALTIES["fn_ratio"]
    try:
        mine = sp.register_penalty("fn_ratio", replace=True)(lambda s, m: jnp.zeros(s.shape[:-1]))
        assert sp.PENALTIES["fn_ratio"] is mine and float(sp.penalty((a, b), kind="fn_ratio")) == 0.0
    finally:
        sp.PENALTIES["fn_ratio"] = old


def test_no_lapack_thread_pool_hang_on_one_cpu_device(tmp_path):
    """Regression: concurrent batched LAPACK calls hung XLA:CPU's small thread pool (see spectral.after)."""
    import os
    import subprocess
    import sys

    script = tmp_path / "hang.py"
    script.write_text(
        "import jax, jax.numpy as jnp\n"
        "from emjax import spectral as sp\n"
        "k = jax.random.key(0)\n"
        "shp = [(512, 512), (512, 128), (512, 128), (512, 512), (512, 1536), (512, 1536), (1536, 512)]\n"
        "ad = {str(i): (jax.random.normal(k, (4, m, 16)), jax.random.normal(k, (4, 16, n)))"
        " for i, (m, n) in enumerate(shp)}\n"
        "v, g = jax.jit(jax.value_and_grad(lambda ad: sp.penalty(ad, 16.0)))(ad)\n"
        "print(float(v))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, the pool shape that hung
    out = subprocess.run([sys.executable, str(script)], env=env, timeout=120, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert math.isfinite(float(out.stdout.strip().splitlines()[-1]))
