"""Several adapters on one frozen base in one program: each adapter's step equals its own single-adapter step, for
different optimisers, λ, shared or per-adapter batches and gradient accumulation; no array holds a copy of the base per adapter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import _batch, _tiny_split

from emjax import multi
from emjax.optim import OptimConfig, build, current_lr
from emjax.train import make_train_step

OPTIMISERS = [("adam", 1e-2), ("lion", 1e-3), ("muon", 1e-2)]


def _commit(tree):
    """On the device explicitly, as a step's outputs are: otherwise a step's second call compiles it again."""
    return jax.device_put(tree, jax.devices()[0])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """One tiny base and three different adapters (all factors perturbed per adapter), with three optimisers."""
    lcfg, graphdef, trainable, frozen = _tiny_split(tmp_path_factory.mktemp("multi"), seed=1)
    trainables = [jax.tree.map(lambda x, s=s: x + 0.01 * jax.random.normal(jax.random.key(s), x.shape), trainable)
                  for s in (1, 2, 3)]
    txs = [build(OptimConfig(name=n, learning_rate=lr, total_steps=10)) for n, lr in OPTIMISERS]
    return lcfg, graphdef, _commit(frozen), trainables, txs


def _single_runs(graphdef, frozen, trainables, txs, batches, lcfg, weights, steps, **kw):
    """Each adapter trained alone with emjax.train's step: the reference."""
    out = []
    for i, (tx, p) in enumerate(zip(txs, trainables)):
        step = jax.jit(make_train_step(graphdef, tx, spectral_weight=weights[i], lora_scale=lcfg.scale,
                                       lr_fn=current_lr, **kw))
        p, s = _commit((p, tx.init(p)))
        losses = []
        for t in range(steps):
            p, s, m = step(p, s, frozen, batches[t][i])
            losses.append(float(m["loss"]))
        out.append((p, losses, float(m["lr"]), m.get("penalty")))
    return out


WEIGHTS = [0.0, 0.5, 0.1]


def _pack_step(graphdef, txs, lcfg, **kw):
    """The pack's step as test_each_adapter_equals_its_own_step[shared_accum2] and the sharded test both jit it: one
    program, so the second compile of it in a run is a persistent-cache hit (tests/conftest.py)."""
    return jax.jit(multi.make_multi_train_step(graphdef, txs, spectral_weights=WEIGHTS, lora_scale=lcfg.scale,
                                               lr_fns=[current_lr] * len(txs), **kw), donate_argnums=(0, 1))


@pytest.mark.parametrize("shared_batch,grad_accum", [(True, 2), (False, 1)], ids=["shared_accum2", "per_adapter"])
def test_each_adapter_equals_its_own_step(setup, shared_batch, grad_accum):
    """The references are single-adapter steps without micro-batches (test_train.py's
    test_grad_accum_equals_one_big_batch shows accumulation changes no number), the same three programs for both
    cases."""
    lcfg, graphdef, frozen, trainables, txs = setup
    weights = WEIGHTS
    steps, n = 2, len(txs)
    rng = np.random.default_rng(0)
    as_jnp = lambda b: _commit({k: jnp.asarray(v) for k, v in b.items()})  # noqa: E731
    if shared_batch:
        shared = [as_jnp(_batch(rng)) for _ in range(steps)]
        per_adapter = [[b] * n for b in shared]
        multi_batches = shared
    else:
        per_adapter = [[as_jnp(_batch(rng)) for _ in range(n)] for _ in range(steps)]
        multi_batches = [multi.stack(bs) for bs in per_adapter]
    ref = _single_runs(graphdef, frozen, trainables, txs, per_adapter, lcfg, weights, steps)

    step = _pack_step(graphdef, txs, lcfg, shared_batch=shared_batch, grad_accum=grad_accum)
    params = _commit(multi.stack(trainables))
    states = _commit(multi.init(txs, params))
    losses = []
    for t in range(steps):
        params, states, m = step(params, states, frozen, multi_batches[t])
        assert m["loss"].shape == (n,)
        losses.append(np.asarray(m["loss"]))
    for i, (p_ref, l_ref, lr_ref, pen_ref) in enumerate(ref):
        np.testing.assert_allclose([l[i] for l in losses], l_ref, rtol=1e-5)
        assert float(m["lr"][i]) == pytest.approx(lr_ref)
        if pen_ref is not None:
            assert float(m["penalty"][i]) == pytest.approx(float(pen_ref), rel=1e-4)
        for a, b in zip(jax.tree.leaves(multi.unstack(params)[i]), jax.tree.leaves(p_ref), strict=True):
            diff = np.abs(np.asarray(a) - np.asarray(b))
            if OPTIMISERS[i][0] == "lion":
                # Lion's sign update moves a coordinate by a whole lr where its gradient is ~0: allow a few of those
                assert np.mean(diff > 1e-5) < 0.01 and diff.max() < 2.5 * OPTIMISERS[i][1]
            else:
                assert diff.max() < 1e-5, (OPTIMISERS[i][0], diff.max())
    # adapters with different optimisers really trained differently
    first = [jax.tree.leaves(p)[0] for p in multi.unstack(params)]
    assert not np.allclose(first[0], first[1]) and not np.allclose(first[1], first[2])


def test_base_weights_are_not_copied_per_adapter(setup):
    lcfg, graphdef, frozen, trainables, txs = setup
    params = multi.stack(trainables)
    states = multi.init(txs, params)
    batch = {k: jnp.asarray(v) for k, v in _batch(np.random.default_rng(0)).items()}
    step = jax.jit(multi.make_multi_train_step(graphdef, txs, lora_scale=lcfg.scale), donate_argnums=(0, 1))
    hlo = step.lower(params, states, frozen, batch).compile().as_text()
    kernels = [x.shape for x in jax.tree.leaves(frozen) if x.ndim >= 2]
    assert kernels
    for shape in kernels:  # the optimised program has no array of N copies of any base weight
        assert f"f32[{','.join(map(str, (len(txs), *shape)))}]" not in hlo
        assert f"f32[{','.join(map(str, shape))}]" in hlo  # (the check can see the weight itself)


def test_sharded_multi_step_equals_single_device(setup):
    from emjax import sharding as shd

    lcfg, graphdef, frozen, trainables, txs = setup
    step = _pack_step(graphdef, txs, lcfg, shared_batch=True, grad_accum=2)
    batch = _batch(np.random.default_rng(4))
    params = multi.stack(trainables)
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    s_params = jax.device_put(params, shd.adapter_stack_shardings(params, mesh))
    assert any(len(x.sharding.device_set) > 1 and x.sharding.spec[0] is None for x in jax.tree.leaves(s_params))
    s_frozen = jax.device_put(frozen, shd.state_shardings(frozen, mesh))
    s_batch = {k: jax.device_put(v, shd.batch_sharding(mesh)) for k, v in batch.items()}
    p2, _, m2 = step(s_params, multi.init(txs, s_params), s_frozen, s_batch)
    p1, _, m1 = step(*_commit((params, multi.init(txs, params), frozen,  # (donates: after the mesh's copies)
                               {k: jnp.asarray(v) for k, v in batch.items()})))
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(m1["loss"]), np.asarray(m2["loss"]), rtol=1e-6)


def test_mismatched_counts_are_clear(setup):
    lcfg, graphdef, frozen, trainables, txs = setup
    with pytest.raises(ValueError, match="2 spectral_weights for 3 adapters"):
        multi.make_multi_train_step(graphdef, txs, spectral_weights=[0.1, 0.2])
    params = multi.stack(trainables)
    step = multi.make_multi_train_step(graphdef, txs, spectral_weights=[0.0, 0.1, 0.2])
    batch = {k: jnp.asarray(v) for k, v in _batch(np.random.default_rng(0)).items()}
    with pytest.raises(ValueError, match=r"spectral weights of shape \(2,\) for 3 adapters"):
        jax.eval_shape(step, params, multi.init(txs, params), frozen, batch, jnp.zeros(2))
    with pytest.raises(ValueError, match="3 optimisers for 2 stacked adapters"):
        multi.init(txs, multi.stack(trainables[:2]))
    with pytest.raises(ValueError, match="no adapters"):
        multi.stack([])


def test_moe_pack_step_equals_each_adapter_alone(tmp_path):
    """On a Qwen3-MoE base the pack takes its adapters' gradients in turn (lax.map: ragged_dot cannot be vmapped
    with shared experts); each adapter's losses, penalty and factors still equal its own step's."""
    lcfg, graphdef, trainable, frozen = _tiny_split(tmp_path, seed=1, preset="tiny-moe")
    trainables = [jax.tree.map(lambda x, s=s: x + 0.01 * jax.random.normal(jax.random.key(s), x.shape), trainable)
                  for s in (1, 2)]
    txs = [build(OptimConfig(name=n, learning_rate=lr, total_steps=10)) for n, lr in OPTIMISERS[::2]]
    weights, steps = [0.0, 0.5], 2
    frozen = _commit(frozen)
    rng = np.random.default_rng(0)
    batches = [_commit({k: jnp.asarray(v) for k, v in _batch(rng).items()}) for _ in range(steps)]
    ref = _single_runs(graphdef, frozen, trainables, txs, [[b, b] for b in batches], lcfg, weights, steps)
    step = jax.jit(multi.make_multi_train_step(graphdef, txs, spectral_weights=weights, lora_scale=lcfg.scale))
    params = _commit(multi.stack(trainables))
    states = _commit(multi.init(txs, params))
    for t in range(steps):
        params, states, m = step(params, states, frozen, batches[t])
    for i, (p_ref, l_ref, _, pen_ref) in enumerate(ref):
        assert float(m["loss"][i]) == pytest.approx(l_ref[-1], rel=1e-5)
        if pen_ref is not None:
            assert float(m["penalty"][i]) == pytest.approx(float(pen_ref), rel=1e-4)
        for a, b in zip(jax.tree.leaves(multi.unstack(params)[i]), jax.tree.leaves(p_ref), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
