"""Muon (Keller Jordan's reference) as an Optax transform, batched over stacked LoRA factors.

Why our own and not ``optax.contrib.muon``: the study needs the reference's momentum (no bias
correction), its eps, a choice of shape scaling (reference vs. Moonlight RMS-matching, whose learning
rates differ ~13x on a 4096x32 LoRA factor), and stacked (L, in, r) factors orthogonalised in one
batched call with each matrix kept whole on one device. ``bias_correction=True`` reproduces optax's
convention exactly so results can be compared with it.

Layout: a leaf of shape (..., fan_in, fan_out) is a stack of JAX-layout matrices (y = x @ W); every
leading dim is a batch dim.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from emjax.sharding import traced_mesh

DEFAULT_NS_COEFFS = (3.4445, -4.7750, 2.0315)
SCALINGS = ("reference", "rms")


class ScaleByMuonState(NamedTuple):
    """Step count (for the optional bias correction) and the momentum buffer."""

    count: jax.Array
    mu: optax.Updates


def _check_rank(path, x) -> None:
    if jnp.ndim(x) < 2:
        name = jax.tree_util.keystr(path)
        raise ValueError(
            f"muon: leaf {name or '<root>'} has shape {jnp.shape(x)} (rank < 2); Muon only "
            "orthogonalises matrices or stacks of matrices. Route it elsewhere with the label tree "
            "(emjax.optim.labels / optax.partition)."
        )


def _matrices_whole(x: jax.Array):
    """Constrain the last two dims of ``x`` to be unsharded; return (x, pin, undo).

    Newton-Schulz on a matrix split over devices would all-reduce a Gram matrix every iteration;
    keeping each matrix on one device (stack dims may stay sharded) makes it collective-free.
    Explicit mesh axes: one ``reshard`` in (a mesh axis that split a matrix moves to a free,
    divisible stack dim, else the matrix is replicated) and one back, so the update is laid out
    like the parameter. Auto axes: ``pin`` re-applies the constraint (stack dims unconstrained) to
    every iterate, since the partitioner may otherwise re-split matrices after a single
    constraint. No-op without a mesh (neither on the array's type nor in context).
    """
    identity = lambda y: y  # noqa: E731
    aval_sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = traced_mesh(x)
    if mesh is None:
        return x, identity, identity
    if any(t == AxisType.Explicit for t in mesh.axis_types):
        spec = tuple(aval_sharding.spec) if aval_sharding is not None else ()
        spec = spec + (None,) * (x.ndim - len(spec))
        lead = list(spec[:-2])
        moved = [a for entry in spec[-2:] if entry is not None
                 for a in ((entry,) if isinstance(entry, str) else entry)]
        for axis in moved:
            for i, entry in enumerate(lead):
                if entry is None and x.shape[i] % mesh.shape[axis] == 0:
                    lead[i] = axis
                    break
        new_spec = P(*lead, None, None)
        if new_spec == P(*spec):
            return x, identity, identity
        undo = lambda y: jax.sharding.reshard(y, P(*spec))  # noqa: E731
        return jax.sharding.reshard(x, new_spec), identity, undo
    whole = NamedSharding(mesh, P(*([P.UNCONSTRAINED] * (x.ndim - 2)), None, None))
    pin = lambda y: jax.lax.with_sharding_constraint(y, whole)  # noqa: E731
    return pin(x), pin, identity


def newton_schulz(
    x: jax.Array,
    *,
    ns_steps: int = 5,
    ns_coeffs: Sequence[float] = DEFAULT_NS_COEFFS,
    eps: float = 1e-7,
    ns_dtype: Any = "float32",
) -> jax.Array:
    """Approximately orthogonalise each matrix in the last two dims of ``x`` (batched over the rest).

    X <- X / (||X||_F + eps) (norm in fp32), transpose so the Gram matrix is on the short side, then
    ``ns_steps`` times X <- aX + (bA + cA^2)X with A = X X^T, in ``ns_dtype``. Singular values land
    roughly in [0.5, 1.5] (by design of the coefficients). A zero matrix maps to zero.
    """
    if x.ndim < 2:
        raise ValueError(f"newton_schulz: expected rank >= 2, got shape {x.shape}")
    a, b, c = ns_coeffs
    out_dtype = x.dtype
    x, pin, undo = _matrices_whole(x)
    xf = x.astype(jnp.float32)
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        xf = jnp.swapaxes(xf, -1, -2)
    norm = jnp.sqrt(jnp.sum(jnp.square(xf), axis=(-2, -1), keepdims=True))
    X = pin((xf / (norm + eps)).astype(jnp.dtype(ns_dtype)))

    def step(_, X):
        A = X @ jnp.swapaxes(X, -1, -2)
        B = b * A + c * (A @ A)
        return pin(a * X + B @ X)

    if isinstance(ns_steps, jax.core.Tracer):  # e.g. an injected hyperparameter under jit
        X = jax.lax.fori_loop(0, ns_steps, step, X)
    else:  # static: unroll (fuses well, lets XLA batch the small matmuls)
        for i in range(int(ns_steps)):
            X = step(i, X)
    if transposed:
        X = jnp.swapaxes(X, -1, -2)
    return undo(X.astype(out_dtype))


def shape_scale(fan_in: int, fan_out: int, scaling: str) -> float:
    """Per-matrix update multiplier: reference sqrt(max(1, out/in)); rms 0.2*sqrt(max(in, out))."""
    if scaling == "reference":
        return max(1.0, fan_out / fan_in) ** 0.5
    if scaling == "rms":
        return 0.2 * max(fan_in, fan_out) ** 0.5
    raise ValueError(f"muon: scaling must be one of {SCALINGS}, got {scaling!r}")


def scale_by_muon(
    *,
    beta: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    ns_coeffs: Sequence[float] = DEFAULT_NS_COEFFS,
    eps: float = 1e-7,
    scaling: str = "reference",
    ns_dtype: Any = "float32",
    bias_correction: bool = False,
) -> optax.GradientTransformation:
    """Muon direction without learning rate or decay: momentum, Newton-Schulz, shape scaling.

    Reference momentum: m <- beta*m + (1-beta)*g; Nesterov u = (1-beta)*g + beta*m, else u = m.
    With ``bias_correction`` (optax.contrib.muon's convention): u = beta*m/(1-beta^(t+1)) +
    (1-beta)*g/(1-beta^t) for Nesterov, else m/(1-beta^t).
    """
    if scaling not in SCALINGS:
        raise ValueError(f"muon: scaling must be one of {SCALINGS}, got {scaling!r}")
    if len(tuple(ns_coeffs)) != 3:
        raise ValueError(f"muon: ns_coeffs must be (a, b, c), got {ns_coeffs!r}")

    def init_fn(params):
        jax.tree_util.tree_map_with_path(_check_rank, params)
        return ScaleByMuonState(
            count=jnp.zeros([], jnp.int32), mu=jax.tree.map(jnp.zeros_like, params)
        )

    def update_fn(updates, state, params=None):
        del params
        jax.tree_util.tree_map_with_path(_check_rank, updates)
        count = optax.safe_increment(state.count)
        mu = jax.tree.map(lambda g, m: beta * m + (1 - beta) * g, updates, state.mu)
        if bias_correction:
            t = count.astype(jnp.float32)
            if nesterov:
                u = jax.tree.map(
                    lambda g, m: beta * m / (1 - beta ** (t + 1)) + (1 - beta) * g / (1 - beta**t),
                    updates, mu,
                )
            else:
                u = jax.tree.map(lambda m: m / (1 - beta**t), mu)
        elif nesterov:
            u = jax.tree.map(lambda g, m: (1 - beta) * g + beta * m, updates, mu)
        else:
            u = mu

        def orth(x):
            o = newton_schulz(x, ns_steps=ns_steps, ns_coeffs=ns_coeffs, eps=eps, ns_dtype=ns_dtype)
            return (o * shape_scale(x.shape[-2], x.shape[-1], scaling)).astype(x.dtype)

        return jax.tree.map(orth, u), ScaleByMuonState(count=count, mu=mu)

    return optax.GradientTransformation(init_fn, update_fn)


def muon(
    learning_rate: optax.ScalarOrSchedule,
    *,
    beta: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    ns_coeffs: Sequence[float] = DEFAULT_NS_COEFFS,
    eps: float = 1e-7,
    scaling: str = "reference",
    ns_dtype: Any = "float32",
    weight_decay: float = 0.0,
    bias_correction: bool = False,
) -> optax.GradientTransformation:
    """Muon for matrices / stacks of matrices (rank >= 2 leaves only; route others by labels).

    theta <- theta - lr * (muon_direction + weight_decay * theta): decoupled decay multiplied by the
    learning rate, as in the reference (p.mul_(1 - lr*wd)) and optax. ``ns_dtype`` is a dtype name
    or dtype ("float32" | "bfloat16"); the default is a string because optax.inject_hyperparams
    would mistake the callable ``jnp.float32`` for a schedule.
    """
    parts = [
        scale_by_muon(
            beta=beta, nesterov=nesterov, ns_steps=ns_steps, ns_coeffs=ns_coeffs, eps=eps,
            scaling=scaling, ns_dtype=ns_dtype, bias_correction=bias_correction,
        )
    ]
    # A static zero decay is skipped so the transform also works without params.
    if not (isinstance(weight_decay, (int, float)) and weight_decay == 0):
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)
