"""build(): label tree, schedules, parity with optax / published rules, validation, registry."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import re

import pytest
from flax import nnx
from omegaconf import OmegaConf

import emjax.optim as eo
from emjax.optim import OptimConfig


def _params(seed=0):
    rng = np.random.default_rng(seed)  # numpy: no per-shape compiles for test data
    n = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    return {
        "blocks": {
            "q_proj": {"lora_a": n(2, 8, 4), "lora_b": n(2, 4, 6)},
            "down_proj": {"lora_a": n(2, 12, 4), "lora_b": n(2, 4, 8)},
        },
        "final_norm": n(8),
    }


def _grads_seq(n, seed=10):
    return [jax.tree.map(lambda x: 0.5 * x, _params(seed + i)) for i in range(n)]


def _run(tx, params, grads_seq):
    state = tx.init(params)
    step = jax.jit(tx.update)
    for g in grads_seq:
        u, state = step(g, state, params)
        params = optax.apply_updates(params, u)
    return params, state


def _close(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


# ------------------------------------------------------------------ label tree
class _Proj(nnx.Module):
    def __init__(self, din, dout, r):
        self.kernel = nnx.Param(jnp.ones((din, dout)))
        self.lora_a = nnx.LoRAParam(jnp.ones((2, din, r)))
        self.lora_b = nnx.LoRAParam(jnp.zeros((2, r, dout)))


class _Tiny(nnx.Module):
    def __init__(self):
        self.q_proj = _Proj(8, 6, 4)
        self.gate_proj = _Proj(8, 12, 4)
        self.norm = nnx.Param(jnp.ones((8,)))
        self.stats = nnx.BatchStat(jnp.zeros((8,)))


def test_labels_plain_dicts():
    p = _params()
    p["step"] = jnp.zeros((), jnp.int32)
    p["blocks"]["embed"] = jnp.ones((10, 8))
    lab = eo.labels(p, frozen_patterns=[r"^blocks/embed$"])
    assert lab == {
        "blocks": {
            "q_proj": {"lora_a": "lora", "lora_b": "lora"},
            "down_proj": {"lora_a": "lora", "lora_b": "lora"},
            "embed": "frozen",
        },
        "final_norm": "other",
        "step": "frozen",  # integer leaf: cannot be optimised
    }


def test_labels_nnx_state():
    _, state = nnx.split(_Tiny())
    lab = eo.labels(state)
    assert jax.tree.structure(lab) == jax.tree.structure(state)
    flat = {eo.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(lab)[0]}
    assert flat == {
        "gate_proj/kernel": "other", "gate_proj/lora_a": "lora",
        "gate_proj/lora_b": "lora", "norm": "other",
        "q_proj/kernel": "other", "q_proj/lora_a": "lora",
        "q_proj/lora_b": "lora", "stats": "frozen",
    }
    # the trainable LoRA state as the trainer splits it: all "lora"
    _, lora_state, _ = nnx.split(_Tiny(), nnx.LoRAParam, ...)
    assert set(jax.tree.leaves(eo.labels(lora_state))) == {"lora"}


def test_build_on_nnx_state_matches_dicts():
    """Muon via build() on an nnx.State equals eo.muon on the same factors as plain dicts."""
    _, lora_state, _ = nnx.split(_Tiny(), nnx.LoRAParam, ...)
    lora_state = jax.tree.map(lambda x: x + 0.1 * jnp.arange(x.size).reshape(x.shape) % 3, lora_state)
    grads = jax.tree.map(lambda x: jnp.cos(x + jnp.arange(x.size).reshape(x.shape)), lora_state)
    cfg = OptimConfig(name="muon", learning_rate=0.1, schedule="constant", warmup_steps=0,
                      clip_norm=None, weight_decay=0.01)
    got, _ = _run(eo.build(cfg), lora_state, [grads, grads])
    as_dict = lambda s: jax.tree.map(lambda v: v[...], nnx.to_pure_dict(s))  # noqa: E731
    want, _ = _run(eo.muon(0.1, weight_decay=0.01), as_dict(lora_state), [as_dict(grads)] * 2)
    _close(as_dict(got), want, 1e-6)


# ------------------------------------------------------------------ parity with optax / rules
CONST = dict(schedule="constant", warmup_steps=0, clip_norm=None, learning_rate=1e-2)


@pytest.mark.parametrize(
    "cfg,ref",
    [
        (dict(name="adam"), optax.adam(1e-2)),
        (dict(name="adamw", weight_decay=0.1), optax.adamw(1e-2, weight_decay=0.1)),
        (dict(name="sgd"), optax.sgd(1e-2)),
        (dict(name="sgd", momentum=0.9), optax.sgd(1e-2, momentum=0.9)),
        (dict(name="sgd", momentum=0.9, nesterov=True), optax.sgd(1e-2, momentum=0.9, nesterov=True)),
        (dict(name="lion", weight_decay=0.1), optax.lion(1e-2, weight_decay=0.1)),
    ],
    ids=["adam", "adamw", "sgd", "sgd_momentum", "sgd_nesterov", "lion"],
)
def test_build_equals_optax(cfg, ref):
    cfg = OptimConfig(**CONST, other_optimizer="frozen", **cfg)
    p = _params()
    p.pop("final_norm")  # only LoRA leaves, so the whole tree goes to the named optimiser
    gs = [{"blocks": g["blocks"]} for g in _grads_seq(4)]
    got, _ = _run(eo.build(cfg), p, gs)
    want, _ = _run(ref, p, gs)
    _close(got, want, 1e-7)
    assert not np.allclose(got["blocks"]["q_proj"]["lora_a"], p["blocks"]["q_proj"]["lora_a"])


@pytest.mark.parametrize("name,extra", [("adamw", dict(weight_decay=0.1)), ("muon", dict(weight_decay=0.01)),
                                        ("sgd", dict(momentum=0.9))])
def test_lr_scales_are_a_learning_rate_per_group(name, extra):
    """``lr_scales`` {"lora_b$": 4, "down_proj": 0.5}: each B factor moves as with 4x the learning rate, down_proj's A
    as with half of it (B matches first), the rest as without; the "other" optimiser's leaves too (final_norm)."""
    p, gs = _params(), _grads_seq(3)
    run = lambda lr, **kw: _run(eo.build(OptimConfig(name=name, **{**CONST, "learning_rate": lr}, **extra, **kw)),  # noqa: E731
                                p, gs)[0]
    got = run(1e-2, lr_scales={"lora_b$": 4.0, "down_proj": 0.5, "final_norm": 3.0})
    fast, slow, plain = run(4e-2), run(5e-3), run(1e-2)
    for proj in ("q_proj", "down_proj"):
        _close(got["blocks"][proj]["lora_b"], fast["blocks"][proj]["lora_b"], 1e-6)
    _close(got["blocks"]["down_proj"]["lora_a"], slow["blocks"]["down_proj"]["lora_a"], 1e-6)
    _close(got["blocks"]["q_proj"]["lora_a"], plain["blocks"]["q_proj"]["lora_a"], 1e-6)
    _close(got["final_norm"], run(3e-2)["final_norm"], 1e-6)
    assert not np.allclose(got["blocks"]["q_proj"]["lora_b"], plain["blocks"]["q_proj"]["lora_b"], atol=1e-4)


@pytest.mark.parametrize("kw,key,pat", [(dict(lr_scales={"lora_b$": 4.0, "lora_bbb$": 16.0}), "lr_scales", "lora_bbb$"),
                                        (dict(frozen_patterns=["nothing_matches"]), "frozen_patterns",
                                         "nothing_matches")])
def test_a_pattern_that_matches_no_leaf_is_named(kw, key, pat):
    """A typo'd LoRA+ factor or frozen pattern would silently do nothing: init names it, with the tree's paths."""
    tx = eo.build(OptimConfig(name="adam", **CONST, **kw))
    with pytest.raises(ValueError, match=rf"optim.{key}: '{re.escape(pat)}' matches no leaf of the trained tree "
                                         r"\(5 leaves: blocks/down_proj/lora_a, "):
        tx.init(_params())


def test_lion_matches_published_rule():
    """c = b1 m + (1-b1) g; theta -= lr (sign(c) + wd theta); m = b2 m + (1-b2) g."""
    lr, b1, b2, wd = 3e-3, 0.9, 0.99, 0.3
    cfg = OptimConfig(name="lion", schedule="constant", warmup_steps=0, clip_norm=None,
                      learning_rate=lr, weight_decay=wd, other_optimizer="frozen")
    rng = np.random.default_rng(1)
    p = {"lora_a": jnp.asarray(rng.standard_normal((2, 6, 3)), jnp.float32)}
    gs = [{"lora_a": jnp.asarray(rng.standard_normal((2, 6, 3)), jnp.float32)} for _ in range(5)]
    got, _ = _run(eo.build(cfg), p, gs)
    theta, m = np.array(p["lora_a"], np.float64), 0.0
    for g in gs:
        g = np.array(g["lora_a"], np.float64)
        c = b1 * m + (1 - b1) * g
        theta = theta - lr * (np.sign(c) + wd * theta)
        m = b2 * m + (1 - b2) * g
    np.testing.assert_allclose(np.asarray(got["lora_a"]), theta, atol=1e-6, rtol=0)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_weight_decay_is_torchs_coupled_l2(nesterov):
    """sgd's weight_decay is L2 added to the gradient before momentum, as torch.optim.SGD does (run here as the
    reference): g += wd θ; buf = μ buf + g; θ -= lr (g + μ buf if Nesterov else buf)."""
    import torch

    lr, mu, wd = 1e-2, 0.9, 0.1
    cfg = OptimConfig(name="sgd", **{**CONST, "learning_rate": lr}, momentum=mu, nesterov=nesterov, weight_decay=wd,
                      other_optimizer="frozen")
    rng = np.random.default_rng(2)
    p = {"lora_a": jnp.asarray(rng.standard_normal((2, 6, 3)), jnp.float32)}
    gs = [{"lora_a": jnp.asarray(rng.standard_normal((2, 6, 3)), jnp.float32)} for _ in range(5)]
    got, _ = _run(eo.build(cfg), p, gs)
    theta = torch.tensor(np.asarray(p["lora_a"]), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=lr, momentum=mu, nesterov=nesterov, weight_decay=wd)
    for g in gs:
        theta.grad = torch.tensor(np.asarray(g["lora_a"]), dtype=torch.float64)
        opt.step()
    np.testing.assert_allclose(np.asarray(got["lora_a"]), theta.detach().numpy(), atol=1e-6, rtol=0)
    without, _ = _run(eo.build(OptimConfig(**{**cfg.__dict__, "weight_decay": 0.0})), p, gs)
    assert np.abs(np.asarray(without["lora_a"]) - theta.detach().numpy()).max() > 1e-3  # the decay is seen


def test_partition_other_frozen_and_clipping():
    """LoRA -> muon, other -> adamw, frozen -> 0; clipping sees only trainable leaves."""
    p = _params()
    p["frozen_embed"] = jnp.ones((4, 4))
    cfg = OptimConfig(name="muon", schedule="constant", warmup_steps=0, learning_rate=1e-2,
                      clip_norm=0.5, weight_decay=0.01, frozen_patterns=["frozen_embed"])
    gs = _grads_seq(3)
    for g in gs:
        g["frozen_embed"] = 1e6 * jnp.ones((4, 4))  # would dominate the norm if it were counted
    got, _ = _run(eo.build(cfg), p, gs)
    np.testing.assert_array_equal(got["frozen_embed"], p["frozen_embed"])

    lab = {"blocks": "lora", "final_norm": "other"}
    ref = optax.chain(
        optax.clip_by_global_norm(0.5),
        optax.partition({"lora": eo.muon(1e-2, weight_decay=0.01),
                         "other": optax.adamw(1e-2, weight_decay=0.01)}, lab),
    )
    strip = lambda t: {k: t[k] for k in ("blocks", "final_norm")}  # noqa: E731
    want, _ = _run(ref, strip(p), [strip(g) for g in gs])
    _close(strip(got), want, 1e-6)


# ------------------------------------------------------------------ schedules and current_lr
@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_schedules(schedule):
    peak, w, T, r = 1e-3, 4, 20, 0.1
    cfg = OptimConfig(learning_rate=peak, schedule=schedule, warmup_steps=w, total_steps=T,
                      end_lr_ratio=r)
    sched = eo.make_schedule(cfg)

    def expected(t):
        if t < w:
            return peak * t / w
        if schedule == "constant":
            return peak
        frac = min(t - w, T - w) / (T - w)
        if schedule == "linear":
            return peak + (peak * r - peak) * frac
        return peak * r + (peak - peak * r) * 0.5 * (1 + math.cos(math.pi * frac))

    for t in [0, 1, 3, 4, 5, 10, 19, 20, 25]:
        assert float(sched(t)) == pytest.approx(expected(t), rel=1e-5, abs=1e-12), t
    # current_lr reads the value the latest update used (state after k updates -> schedule(k-1))
    tx = eo.build(cfg)
    p = {"lora_a": jnp.ones((1, 4, 2))}
    state = tx.init(p)
    assert float(eo.current_lr(state)) == pytest.approx(expected(0), abs=1e-12)
    step = jax.jit(tx.update)
    for k in range(1, 7):
        _, state = step(p, state, p)
        assert float(eo.current_lr(state)) == pytest.approx(expected(k - 1), rel=1e-5, abs=1e-12)


def test_schedule_numbers_are_state_not_compiled_constants():
    # an lr sweep (or a longer run) must reuse one compiled update: the same lowered program for different learning
    # rates, warm-ups and lengths, and the lrs each build's own schedule gives
    p = {"lora_a": jnp.ones((1, 4, 2))}
    cfgs = [OptimConfig(learning_rate=1e-3, schedule="linear", warmup_steps=2, total_steps=10),
            OptimConfig(learning_rate=5e-2, schedule="linear", warmup_steps=0, total_steps=300, end_lr_ratio=0.5)]
    txs = [eo.build(c) for c in cfgs]
    states = [tx.init(p) for tx in txs]
    texts = {jax.jit(tx.update).lower(p, s, p).as_text() for tx, s in zip(txs, states)}
    assert len(texts) == 1
    run = jax.jit(txs[0].update)  # the first build's program, the second build's state
    for k in range(1, 4):
        _, states[1] = run(p, states[1], p)
        assert float(eo.current_lr(states[1])) == pytest.approx(float(eo.make_schedule(cfgs[1])(k - 1)), rel=1e-6)
    other = OptimConfig(learning_rate=1e-3, schedule="cosine", warmup_steps=2, total_steps=10)
    assert jax.jit(eo.build(other).update).lower(p, eo.build(other).init(p), p).as_text() not in texts


def test_current_lr_through_multisteps_and_error():
    tx = optax.MultiSteps(eo.build(OptimConfig(total_steps=10)), every_k_schedule=2)
    assert float(eo.current_lr(tx.init({"a": jnp.ones((2, 2))}))) == 0.0
    with pytest.raises(ValueError, match="inject"):
        eo.current_lr(optax.adam(1e-3).init({"a": jnp.ones(2)}))


# ------------------------------------------------------------------ config, validation, registry
@pytest.mark.parametrize(
    "override,key",
    [
        (dict(name="rmsprop"), "optim.name"),
        (dict(learning_rate=0.0), "optim.learning_rate"),
        (dict(schedule="step"), "optim.schedule"),
        (dict(schedule="linear", total_steps=3, warmup_steps=5), "optim.total_steps"),
        (dict(name="adam", weight_decay=0.01), "optim.weight_decay"),
        (dict(clip_norm=-1.0), "optim.clip_norm"),
        (dict(b2=1.0), "optim.b2"),
        (dict(muon_scaling="spectral"), "optim.muon_scaling"),
        (dict(muon_ns_dtype="float16"), "optim.muon_ns_dtype"),
        (dict(muon_ns_coeffs=[1.0, 2.0]), "optim.muon_ns_coeffs"),
        (dict(other_optimizer="muon"), "optim.other_optimizer"),
        (dict(name="sgd", nesterov=True), "optim.nesterov"),
        (dict(frozen_patterns=["("]), "optim.frozen_patterns"),
        (dict(lr_scales={"[": 2.0}), "optim.lr_scales"),
        (dict(lr_scales={"lora_b$": 0.0}), "optim.lr_scales.lora_b"),
    ],
)
def test_validation_names_the_key(override, key):
    cfg = OptimConfig(**{"total_steps": 100, **override})
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        eo.build(cfg)


def test_omegaconf_structured_config_builds():
    node = OmegaConf.structured(OptimConfig)
    node = OmegaConf.merge(node, OmegaConf.from_dotlist(
        ["name=muon", "total_steps=50", "muon_scaling=rms", "muon_ns_dtype=bfloat16"]))
    tx = eo.build(node)
    p = {"lora_a": jnp.ones((2, 6, 3))}
    u, _ = jax.jit(tx.update)(p, tx.init(p), p)
    assert jnp.all(jnp.isfinite(u["lora_a"]))
    with pytest.raises(Exception):  # typed fields reject wrong types at merge time
        OmegaConf.merge(node, OmegaConf.from_dotlist(["warmup_steps=abc"]))


def _signsgd_factory(cfg, lr):
    return optax.chain(optax.scale_by_sign(), optax.scale_by_learning_rate(lr))


def test_register_custom_optimiser():
    name = "signsgd_test"
    eo.register(name)(_signsgd_factory)  # again on a rerun of the test in one process: the same function

    with pytest.raises(ValueError, match=r"already registered \(by [\w.]*test_build._signsgd_factory\)"):
        eo.register(name)(lambda cfg, lr: optax.sgd(lr))
    with pytest.raises(ValueError, match="reserved"):
        eo.register("frozen")(lambda cfg, lr: optax.sgd(lr))

    def again(cfg, lr):  # the same function defined again (a module imported twice, a notebook cell run again)
        return optax.sgd(lr)

    again.__qualname__ = eo.factory(name).__qualname__
    assert eo.register(name)(again) is again and eo.factory(name) is again
    old_adam = eo.factory("adam")
    try:  # replacing a built-in takes replace=True
        with pytest.raises(ValueError, match="replace=True"):
            eo.register("adam")(lambda cfg, lr: optax.sgd(lr))
        eo.register("adam", replace=True)(lambda cfg, lr: optax.sgd(lr))
        assert eo.factory("adam") is not old_adam
    finally:
        eo.register("adam", replace=True)(old_adam)
    with pytest.raises(KeyError, match="not registered"):
        eo.factory("no_such_optimiser")
    eo.register(name, replace=True)(_signsgd_factory)
    cfg = OptimConfig(name=name, other_optimizer="frozen", **CONST)
    p = {"lora_a": jnp.ones((1, 3, 2))}
    g = {"lora_a": jnp.asarray([[[2.0, -3.0], [0.5, -0.1], [1.0, 1.0]]])}
    u, _ = eo.build(cfg).update(g, eo.build(cfg).init(p), p)
    np.testing.assert_allclose(u["lora_a"], -1e-2 * np.sign(g["lora_a"]))


def test_readme_partition_of_the_factors_through_factory():
    """The README's ``muon_a_adam_b``: a registered optimiser that partitions the LoRA factors itself, reusing the
    built-ins through ``factory``, on the trainer's own tree (an nnx.State of LoRAParams): Muon's update on every A
    factor, Adam's on every B factor."""
    from flax import nnx

    from emjax import config as cfglib
    from emjax import lora as loralib
    from emjax.train import build_model

    def muon_a_adam_b(cfg, learning_rate):
        def by_factor(params):  # "a" for the lora_a leaves, "b" for the rest
            return jax.tree_util.tree_map_with_path(
                lambda path, _: "a" if eo.path_str(path).endswith("lora_a") else "b", params)
        return optax.partition({"a": eo.factory("muon")(cfg, learning_rate),
                                "b": eo.factory("adam")(cfg, learning_rate)}, by_factor)

    eo.register("muon_a_adam_b_test")(muon_a_adam_b)
    model = build_model(cfglib.load("tiny").model, loralib.LoraConfig(rank=4, alpha=8), None, vocab_size=64)
    _, tr, _ = nnx.split(model, nnx.LoRAParam, ...)
    tr = jax.tree.map(lambda x: x + 0.01, tr)  # B = 0 would make Muon's and Adam's first steps alike
    g = jax.tree.map(lambda x: jnp.sin(jnp.arange(x.size, dtype=x.dtype).reshape(x.shape)), tr)

    def update(name):
        tx = eo.build(OptimConfig(name=name, learning_rate=1e-2, schedule="constant", warmup_steps=0, clip_norm=None))
        return {eo.path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(tx.update(g, tx.init(tr), tr)[0])}

    mixed, muon, adam = update("muon_a_adam_b_test"), update("muon"), update("adam")
    assert len(mixed) == 14
    for k, v in mixed.items():
        np.testing.assert_array_equal(v, (muon if k.endswith("lora_a") else adam)[k])
        assert float(jnp.abs(muon[k] - adam[k]).max()) > 1e-3  # the two differ: the check can fail
