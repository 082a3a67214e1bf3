"""Muon on sharded stacked LoRA factors (8 simulated CPU devices) equals the single-device result."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import emjax.optim as eo

CASES = [
    # (leaf shape, spec): L sharded; `in` sharded (L divisible: axis moves to L); `in` sharded, L not
    ((8, 16, 4), P("d", None, None)),
    ((8, 32, 4), P(None, "d", None)),
    ((3, 4, 32), P(None, None, "d")),
]


def _inputs(shape):
    rng = np.random.default_rng(0)
    return tuple({"lora": jnp.asarray(rng.standard_normal(shape), jnp.float32)} for _ in range(3))


def _two_steps(tx, params, g1, g2):
    state = tx.init(params)
    u1, state = tx.update(g1, state, params)
    u2, state = tx.update(g2, state, params)
    return u1, u2


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
@pytest.mark.parametrize("shape,spec", CASES)
def test_sharded_update_equals_single_device(axis_type, shape, spec):
    assert jax.device_count() == 8
    tx = eo.muon(0.1, weight_decay=0.01, scaling="rms")
    params, g1, g2 = _inputs(shape)
    want = jax.jit(lambda p, a, b: _two_steps(tx, p, a, b))(params, g1, g2)

    mesh = jax.make_mesh((8,), ("d",), axis_types=(axis_type,))
    sh = NamedSharding(mesh, spec)
    put = lambda t: jax.device_put(t, sh)  # noqa: E731
    fn = jax.jit(lambda p, a, b: _two_steps(tx, p, a, b))
    with jax.set_mesh(mesh):
        got = fn(put(params), put(g1), put(g2))
        hlo = fn.lower(put(params), put(g1), put(g2)).compile().as_text()
    for w, g in zip(want, got):
        np.testing.assert_allclose(np.asarray(g["lora"]), np.asarray(w["lora"]), atol=1e-6, rtol=0)
        out_sharding = g["lora"].sharding
        assert isinstance(out_sharding, NamedSharding)
        if axis_type == AxisType.Explicit:
            # Explicit: the update comes back exactly as the parameter is laid out
            assert out_sharding.spec == spec
    # Each matrix whole on one device: no all-reduce of Gram matrices / norms inside Newton-Schulz.
    assert "all-reduce" not in hlo


def test_unsharded_no_mesh_is_noop():
    x = jnp.ones((4, 8, 2))
    from emjax.optim.muon import _matrices_whole

    y, pin, undo = _matrices_whole(x)
    assert y is x and pin(y) is y and undo(y) is y
