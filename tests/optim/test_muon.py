"""Muon vs. a NumPy transcription of Keller Jordan's reference, and vs. optax.contrib.muon."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import emjax.optim as eo

COEFFS = (3.4445, -4.7750, 2.0315)
ns = jax.jit(eo.newton_schulz, static_argnames=("ns_dtype",))  # eager op-by-op dispatch is slow


# ---------- NumPy transcription of the published algorithm (float64, one matrix at a time) ----------
def np_newton_schulz(G, steps=5, coeffs=COEFFS, eps=1e-7):
    a, b, c = coeffs
    X = np.array(G, np.float64)
    transposed = X.shape[0] > X.shape[1]
    if transposed:
        X = X.T
    X = X / (np.linalg.norm(X) + eps)
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.T if transposed else X


def np_muon_run(params, grads_seq, *, lr, beta, nesterov, wd, scaling, eps=1e-7):
    """Reference: m.lerp_(g, 1-beta); u = g.lerp_(m, beta) if nesterov else m; NS; scale;
    p.mul_(1 - lr*wd); p.add_(u, alpha=-lr). JAX layout (in, out): fan_in = rows."""
    params = {k: np.array(v, np.float64) for k, v in params.items()}
    mom = {k: np.zeros_like(v) for k, v in params.items()}
    for grads in grads_seq:
        for k in params:
            g = np.array(grads[k], np.float64)
            mom[k] = beta * mom[k] + (1 - beta) * g
            u = (1 - beta) * g + beta * mom[k] if nesterov else mom[k]
            fan_in, fan_out = u.shape[-2:]
            s = max(1, fan_out / fan_in) ** 0.5 if scaling == "reference" else 0.2 * max(fan_in, fan_out) ** 0.5
            upd = np.stack([np_newton_schulz(m, eps=eps) * s for m in u])
            params[k] = params[k] * (1 - lr * wd) - lr * upd
    return params


def _tree(seed, shapes):
    rng = np.random.default_rng(seed)  # numpy: no per-shape compiles for test data
    return {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}


SHAPES = {"lora_a": (3, 16, 4), "lora_b": (3, 4, 24)}  # stacked (L, in, r) and (L, r, out)


def _run(tx, params, grads_seq):
    state = tx.init(params)
    step = jax.jit(tx.update)
    for g in grads_seq:
        u, state = step(g, state, params)
        params = optax.apply_updates(params, u)
    return params, state


@pytest.mark.parametrize("scaling", ["reference", "rms"])
@pytest.mark.parametrize("nesterov,wd", [(True, 0.0), (True, 0.1), (False, 0.05)])
def test_muon_matches_numpy_reference_10_steps(scaling, nesterov, wd):
    params = _tree(0, SHAPES)
    grads_seq = [_tree(100 + i, SHAPES) for i in range(10)]
    lr, beta = 0.02, 0.95
    tx = eo.muon(lr, beta=beta, nesterov=nesterov, scaling=scaling, weight_decay=wd)
    got, _ = _run(tx, params, grads_seq)
    want = np_muon_run(params, grads_seq, lr=lr, beta=beta, nesterov=nesterov, wd=wd, scaling=scaling)
    for k in SHAPES:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], atol=1e-5, rtol=0)
        # the test can fail: params actually moved by more than the tolerance
        assert np.abs(want[k] - np.asarray(params[k])).max() > 1e-2


@pytest.mark.parametrize("scaling,consistent_rms", [("reference", None), ("rms", 0.2)])
@pytest.mark.parametrize("nesterov", [True, False])
def test_bias_correction_matches_optax_contrib_muon(scaling, consistent_rms, nesterov):
    params = _tree(1, SHAPES)
    grads_seq = [_tree(200 + i, SHAPES) for i in range(6)]
    lr, beta, wd, eps = 0.02, 0.9, 0.05, 1e-7
    dims = optax.contrib.MuonDimensionNumbers(reduction_axis=1, output_axis=2)  # batch over L
    ref = optax.contrib.muon(
        lr, beta=beta, eps=eps, weight_decay=wd, nesterov=nesterov, consistent_rms=consistent_rms,
        muon_weight_dimension_numbers={k: dims for k in SHAPES},
    )
    ours = eo.muon(lr, beta=beta, eps=eps, weight_decay=wd, nesterov=nesterov, scaling=scaling,
                   bias_correction=True)
    got, _ = _run(ours, params, grads_seq)
    want, _ = _run(ref, params, grads_seq)
    for k in SHAPES:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), atol=1e-6, rtol=0)
    if nesterov:  # bias correction reweights g vs m (without Nesterov it is a scalar NS removes)
        plain, _ = _run(eo.muon(lr, beta=beta, eps=eps, weight_decay=wd, nesterov=nesterov,
                                scaling=scaling), params, grads_seq[:3])
        corr, _ = _run(ours, params, grads_seq[:3])
        assert not np.allclose(plain["lora_a"], corr["lora_a"], atol=1e-4)


def test_zero_gradient_gives_zero_update():
    params = {"lora_a": jnp.ones((2, 8, 4)), "lora_b": jnp.zeros((2, 4, 8))}
    grads = {"lora_a": jnp.zeros((2, 8, 4)), "lora_b": jnp.ones((2, 4, 8))}
    for ns_dtype in ("float32", jnp.bfloat16):
        tx = eo.muon(0.1, ns_dtype=ns_dtype)
        u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
        assert np.all(np.isfinite(np.asarray(u["lora_b"], np.float32)))
        np.testing.assert_array_equal(np.asarray(u["lora_a"]), 0.0)
        assert np.abs(np.asarray(u["lora_b"])).max() > 0


def test_batched_equals_per_matrix():
    x = _tree(3, {"x": (5, 12, 6)})["x"]
    batched = ns(x)
    for i in range(x.shape[0]):
        np.testing.assert_allclose(batched[i], ns(x[i]), atol=1e-6, rtol=0)
    # through the optimiser: one stacked leaf vs. a dict of its 2-D slices
    tx = eo.muon(0.1, scaling="rms")
    stacked = {"w": x}
    sliced = {f"w{i}": x[i] for i in range(x.shape[0])}
    u1, _ = jax.jit(tx.update)(stacked, tx.init(stacked))
    u2, _ = jax.jit(tx.update)(sliced, tx.init(sliced))
    for i in range(x.shape[0]):
        np.testing.assert_allclose(u1["w"][i], u2[f"w{i}"], atol=1e-6, rtol=0)


def test_rank4_leading_dims_are_batch():
    x = _tree(4, {"x": (2, 3, 8, 4)})["x"]
    out = ns(x)
    np.testing.assert_allclose(out[1, 2], ns(x[1, 2]), atol=1e-6, rtol=0)


def test_newton_schulz_matches_numpy_and_spectrum_in_band():
    g = np.random.default_rng(5).standard_normal((32, 8)).astype(np.float32)
    out = np.asarray(ns(jnp.asarray(g)))
    np.testing.assert_allclose(out, np_newton_schulz(g), atol=1e-5, rtol=0)
    s = np.linalg.svd(out, compute_uv=False)
    assert s.min() > 0.5 and s.max() < 1.5, s
    # same singular vectors as the polar factor U V^T (orthogonalisation, not just rescaling)
    u, _, vt = np.linalg.svd(g, full_matrices=False)
    assert np.abs(u.T @ out @ vt.T - np.diag(np.diag(u.T @ out @ vt.T))).max() < 1e-4


def test_bf16_newton_schulz_close_to_fp32():
    x = _tree(6, {"x": (4, 64, 8)})["x"]
    a = ns(x)
    b = ns(x, ns_dtype="bfloat16")
    assert b.dtype == jnp.float32
    assert float(jnp.abs(a - b).max()) < 0.05
    assert float(jnp.abs(a - b).max()) > 0  # the bf16 path really ran in bf16


def test_rank_below_2_rejected_with_leaf_name():
    tx = eo.muon(0.1)
    with pytest.raises(ValueError, match=r"norm.*rank < 2"):
        tx.init({"blocks": {"lora_a": jnp.ones((2, 4, 2))}, "norm": jnp.ones((4,))})


def test_composes_with_chain_multisteps_inject():
    params = _tree(7, SHAPES)
    g1, g2 = _tree(8, SHAPES), _tree(9, SHAPES)
    base = eo.muon(0.05, weight_decay=0.01)

    # chain: a no-op clip in front changes nothing
    chained = optax.chain(optax.clip_by_global_norm(1e9), eo.muon(0.05, weight_decay=0.01))
    a, _ = _run(chained, params, [g1, g2])
    b, _ = _run(base, params, [g1, g2])
    for k in SHAPES:  # two programs: a few ulps of fp32 apart (XLA's fusions may differ)
        np.testing.assert_allclose(a[k], b[k], atol=1e-6)

    # MultiSteps(k=2) == one step on the mean gradient
    ms = optax.MultiSteps(eo.muon(0.05, weight_decay=0.01), every_k_schedule=2)
    a, _ = _run(ms, params, [g1, g2])
    b, _ = _run(base, params, [jax.tree.map(lambda x, y: (x + y) / 2, g1, g2)])
    for k in SHAPES:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6)

    # inject_hyperparams: same result; lr and even ns_steps (traced -> fori_loop) are injectable
    inj = optax.inject_hyperparams(eo.muon)(learning_rate=0.05, weight_decay=0.01, beta=0.95,
                                            ns_steps=5)
    a, state = _run(inj, params, [g1, g2])
    b, _ = _run(base, params, [g1, g2])
    for k in SHAPES:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6)
    assert float(eo.current_lr(state)) == pytest.approx(0.05)
    state.hyperparams["learning_rate"] = jnp.asarray(0.0)
    u, _ = jax.jit(inj.update)(g1, state, params)
    assert all(float(jnp.abs(v).max()) == 0 for v in jax.tree.leaves(u))
