"""Spectra of LoRA updates: singular values, metrics, the spectral regulariser and reports.

A LoRA module has factors ``a`` (..., d_in, r) and ``b`` (..., r, d_out) in JAX layout (leading dims are
stacked layers, experts, ...), and update ΔW = s·a@b. Its at most r nonzero singular values come from r×r
work only: with thin QRs a = Q_A R_A and bᵀ = Q_B R_B, ΔW = Q_A (R_A R_Bᵀ) Q_Bᵀ, so
σ(ΔW) = |s|·σ(R_A R_Bᵀ). QR is used instead of the paper's Gram/Cholesky form (σ(a·chol(b bᵀ))) because
forming b bᵀ squares the condition number and loses singular values below ~√eps·σ₁ in float32.

Numerics are done in float32 (float64 if an input is float64), whatever the input dtype, and every matmul
asks for HIGHEST precision so TPUs do not silently drop to bf16 passes.

Gradients: differentiating ``jnp.linalg.qr`` needs R⁻¹, which is infinite at initialisation (b = 0) and for
rank-deficient factors. The singular values therefore carry their own VJP: for cotangent g,
∂/∂ΔW Σ gᵢσᵢ = Σ_{σᵢ>tol} gᵢ uᵢvᵢᵀ, which through the QR factors is
∂a = Q_A·(U_c diag(g) V_cᵀ)·R_B and ∂b = R_Aᵀ·(U_c diag(g) V_cᵀ)·Q_Bᵀ — no division anywhere, so it is
finite for any finite input. Q_A and Q_B are never formed: the backward multiplies by them through the Householder
reflectors of the forward's QR in compact WY form (matmuls only; jaxlib's GPU ``orgqr`` would be one cuSOLVER call
per matrix of the batch). The reflectors come from ``geqrf`` on CPUs and TPUs and from the same algorithm written as
a loop in JAX on GPUs (``QR_IMPLS``: 5.7× faster there at Qwen3-0.6B's shapes, bench/RESULTS.md). Singular values at
(numerical) zero get no gradient: that picks the minimum-norm subgradient where σ is not differentiable (σ = 0),
and is exact elsewhere.

A collection of adapters is a ``Mapping[str, (a, b)]`` (module name → factors); most functions also take a
single ``(a, b)`` pair.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

B_NORM_TOL = 1e-12
"""Modules whose ‖b‖_F is below this are skipped (the adapter is still at its B = 0 initialisation)."""

METRIC_NAMES = ("stable_rank", "spectral_entropy", "condition_number", "fn_ratio")

_HI = jax.lax.Precision.HIGHEST

Pair = tuple[Any, Any]
Adapters = Mapping[str, Pair] | Pair


# --------------------------------------------------------------------------------------------------------
# input handling


def _as_mapping(adapters: Adapters) -> dict[str, Pair]:
    """Accept a mapping name → (a, b) or one (a, b) pair (named "adapter")."""
    if isinstance(adapters, Mapping):
        if not adapters:
            raise ValueError("spectral: empty adapter mapping")
        return dict(adapters)
    if isinstance(adapters, (tuple, list)) and len(adapters) == 2 and hasattr(adapters[0], "shape"):
        return {"adapter": tuple(adapters)}
    raise TypeError(
        f"spectral: expected a Mapping[str, (a, b)] or one (a, b) pair of arrays, got {type(adapters).__name__}"
    )


def _check_pair(a, b, name: str = "adapter") -> None:
    """Clear error for malformed factors, naming the module."""
    if not (hasattr(a, "shape") and hasattr(b, "shape")):
        raise TypeError(f"spectral: module {name!r}: (a, b) must be arrays, got {type(a).__name__}, {type(b).__name__}")
    for label, x in (("a", a), ("b", b)):
        if x.ndim < 2:
            raise ValueError(f"spectral: module {name!r}: {label} must be at least 2-D, got shape {tuple(x.shape)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"spectral: module {name!r}: {label} must be floating point, got {x.dtype}")
    if a.ndim != b.ndim or a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-2]:
        raise ValueError(
            f"spectral: module {name!r}: expected a (..., d_in, r) and b (..., r, d_out) with the same leading "
            f"dims, got a {tuple(a.shape)} and b {tuple(b.shape)}"
        )


def _compute_dtype(a, b):
    """float32 for bf16/f16/f32 inputs, float64 if either input is float64."""
    return jnp.promote_types(jnp.promote_types(a.dtype, b.dtype), jnp.float32)


def _mT(x):
    return jnp.swapaxes(x, -1, -2)


def _mm(x, y):
    return jnp.matmul(x, y, precision=_HI)


def _pad_last(s, r: int):
    """Pad the last axis with zeros to length r (when min(d_in, d_out) < r the rest are exact zeros)."""
    k = s.shape[-1]
    if k == r:
        return s
    return jnp.concatenate([s, jnp.zeros(s.shape[:-1] + (r - k,), s.dtype)], axis=-1)


# --------------------------------------------------------------------------------------------------------
# singular values


def after(dep, x):
    """On CPU, make ``x`` data-dependent on ``dep`` so two LAPACK calls (QR, SVD) never run concurrently
    (also used by the train step to run the penalty after the model's backward, see emjax/train.py).

    jaxlib's CPU LAPACK kernels split the batch over XLA's intra-op thread pool and block waiting for it;
    when XLA:CPU runs two such batched calls at once on a small pool (2 cores here) every pool thread can
    end up waiting and the program hangs forever (seen: the penalty over gate/up/down at 4 × 512 × 1536).
    ``optimization_barrier`` does not help (XLA:CPU turns it into a control edge its executor ignores), so
    a cheap select on a never-true NaN test of one element of ``dep`` carries the dependency. No-op off CPU.
    """
    if jax.default_backend() != "cpu":
        return x
    probe = jax.lax.stop_gradient(jax.tree.leaves(dep)[0])
    if probe.ndim >= 2:  # a stacked (..., m, n) result: one element per leading index, so sharded
        probe = probe[..., 0, 0]  # leading dims stay aligned with x (no cross-device traffic)
    never = jnp.isnan(probe) & jnp.isinf(probe)  # always False, but XLA cannot prove it

    def one(y):
        n = never
        if y.shape[:n.ndim] != n.shape:  # other leading dims (Qwen3-MoE's (L, E) beside (L,)): the layer axis
            n = n.reshape(n.shape[0], -1)[:, 0] if n.ndim and y.ndim and y.shape[0] == n.shape[0] else n.reshape(
                -1)[0]
        return jnp.where(n.reshape(n.shape + (1,) * (y.ndim - n.ndim)), jnp.zeros_like(y), y)

    return jax.tree.map(one, x)


QR_IMPLS = ("geqrf", "loop")
"""How the thin QRs of the factors are computed (``qr=`` of the functions below; None picks by backend):

- ``"geqrf"``: ``jnp.linalg.qr(mode="raw")``, the backend's solver (LAPACK on a CPU, XLA's own expansion on a TPU).
- ``"loop"``: the same Householder reflectors from a rolled loop over the r columns written in JAX (a few fused
  elementwise ops and reductions per column over the whole stack of layers). The default on GPUs,
  where jaxlib hands a stack of tall, thin matrices to cuBLAS's batched QR, which is built for small ones:
  ``bench/gpu_check.sh`` (step spectral_0.6b) times both."""


def _default_qr() -> str:
    return "loop" if jax.default_backend() == "gpu" else "geqrf"


def _resolve_qr(qr: str | None) -> str:
    if qr is None:
        return _default_qr()
    if qr not in QR_IMPLS:
        raise ValueError(f"spectral: qr must be one of {QR_IMPLS} or None, got {qr!r}")
    return qr


def _geqrf_loop(x):
    """LAPACK's unblocked geqr2 in JAX: x (..., m, c) -> packed (..., m, c) (R on and above the diagonal, the
    Householder vectors below it, unit diagonal implied) and taus (..., k), k = min(m, c), with larfg's conventions
    (β = −sign(α)‖x‖, τ = (β − α)/β, τ = 0 where the column below the diagonal is already zero), so it is a drop-in
    for geqrf's output."""
    m, c = x.shape[-2:]
    k = min(m, c)
    rows, cols = jnp.arange(m), jnp.arange(c)

    def column(j, carry):
        a, taus = carry
        col = jax.lax.dynamic_index_in_dim(a, j, axis=-1, keepdims=False)  # (..., m)
        alpha = jax.lax.dynamic_index_in_dim(col, j, axis=-1, keepdims=False)  # (...,)
        below = jnp.where(rows > j, col, 0.0)
        # norms of x / 2^e (an exact scaling, so no extra rounding): no under- or overflow in the squares
        _, e = jnp.frexp(jnp.maximum(jnp.max(jnp.abs(below), axis=-1), jnp.abs(alpha)))
        big = jnp.ldexp(jnp.ones_like(alpha), e)
        xnorm = big * jnp.sqrt(jnp.sum(jnp.square(below / big[..., None]), axis=-1))
        reflect = xnorm > 0
        beta = -jnp.where(alpha >= 0, 1.0, -1.0) * big * jnp.sqrt(jnp.square(alpha / big) + jnp.square(xnorm / big))
        beta = jnp.where(reflect, beta, alpha)
        tau = jnp.where(reflect, (beta - alpha) / beta, 0.0)
        v = jnp.where(rows == j, 1.0, below / jnp.where(reflect, alpha - beta, 1.0)[..., None])  # (..., m)
        # vᵀa as a product and a sum, not a matrix-vector dot: with XLA:CPU's float32 dot the smallest σ of
        # ill-conditioned factors came out less accurate than LAPACK's (test_singular_values_match_numpy_svd)
        w = jnp.sum(v[..., :, None] * a, axis=-2)
        applied = a - (tau[..., None] * v)[..., :, None] * w[..., None, :]  # (I − τ v vᵀ) a, columns > j kept
        new_col = jnp.where(rows == j, beta[..., None], jnp.where(rows > j, v, col))
        a = jnp.where(cols == j, new_col[..., :, None], jnp.where(cols > j, applied, a))
        return a, jnp.where(jnp.arange(k) == j, tau[..., None], taus)

    return jax.lax.fori_loop(0, k, column, (x, jnp.zeros(x.shape[:-2] + (k,), x.dtype)))


def _householder_qr(x, qr: str = "geqrf"):
    """Thin QR of x (..., m, c): the Householder reflectors (packed (..., m, k), taus (..., k)) and R (..., k, c),
    k = min(m, c), from geqrf or its loop form (``QR_IMPLS``). Q is never formed: ``_q_apply`` multiplies by it (an
    ``orgqr`` would be one cuSOLVER call per matrix on GPUs, where jaxlib loops over the batch)."""
    k = min(x.shape[-2], x.shape[-1])
    if qr == "loop":
        packed, taus = _geqrf_loop(x)
    else:
        h, taus = jnp.linalg.qr(x, mode="raw")  # geqrf; numpy's convention returns the packed factors transposed
        packed = _mT(h)
    return (packed[..., :, :k], taus), jnp.triu(packed[..., :k, :])


def _q_apply(reflectors, y):
    """Q @ y for the thin Q (..., m, k) of ``_householder_qr`` and y (..., k, n), with matmuls only: Q = H₁…H_k =
    I − V T Vᵀ (compact WY, LAPACK's larft), so Q @ y = [y; 0] − V (T (V[:k]ᵀ y))."""
    packed, taus = reflectors
    m, k = packed.shape[-2:]
    v = jnp.tril(packed, -1) + jnp.eye(m, k, dtype=packed.dtype)  # unit lower trapezoidal Householder vectors
    w = _mm(_mT(v), v)
    idx = jnp.arange(k)

    def column(i, t):  # larft: T[:i, i] = −τᵢ T[:i, :i] (V[:, :i]ᵀ vᵢ), T[i, i] = τᵢ (T's columns ≥ i still zero)
        w_i = jnp.where(idx < i, jnp.take(w, i, axis=-1), 0.0)
        tau_i = jnp.take(taus, i, axis=-1)[..., None]
        col = jnp.where(idx == i, tau_i, -tau_i * jnp.einsum("...jl,...l->...j", t, w_i, precision=_HI))
        return jnp.where(idx == i, col[..., :, None], t)

    t = jax.lax.fori_loop(0, k, column, jnp.zeros_like(w))  # rolled: unrolled, 14 of these took 20 s to compile
    y_full = jnp.concatenate([y, jnp.zeros(y.shape[:-2] + (m - k, y.shape[-1]), y.dtype)], axis=-2)
    return y_full - _mm(v, _mm(t, _mm(_mT(v[..., :k, :]), y)))


def _sv_plain(a, b, qr):
    """σ(a@b), descending, length r, from QR (R factors only) + SVD of the small core."""
    r = a.shape[-1]
    _, ra = _householder_qr(a, qr)  # (..., ka, r), ka = min(d_in, r)
    _, rb = _householder_qr(after(ra, _mT(b)), qr)  # (..., kb, r)
    core = _mm(ra, _mT(rb))  # (..., ka, kb)
    return _pad_last(jnp.linalg.svd(core, compute_uv=False), r)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _sv(a, b, qr):
    return _sv_plain(a, b, qr)


def _sv_fwd(a, b, qr):
    r = a.shape[-1]
    refl_a, ra = _householder_qr(a, qr)  # Q_A as reflectors, (..., ka, r)
    refl_b, rb = _householder_qr(after(ra, _mT(b)), qr)  # Q_B as reflectors, (..., kb, r)
    u, s, vt = jnp.linalg.svd(_mm(ra, _mT(rb)), full_matrices=False)  # runs after both geqrfs (it reads rb)
    return _pad_last(s, r), (refl_a, ra, refl_b, rb, u, s, vt)


def _sv_bwd(qr, res, g):
    refl_a, ra, refl_b, rb, u, s, vt = res
    k = s.shape[-1]
    g = g[..., :k]
    # numerical-rank cut-off as in numpy.linalg.matrix_rank: no gradient for σ that are zero up to rounding
    tol = s[..., :1] * (max(u.shape[-2], vt.shape[-1]) * jnp.finfo(s.dtype).eps)
    g = jnp.where(s > tol, g, 0.0)
    mid = _mm(u * g[..., None, :], vt)  # U_c diag(g) V_cᵀ, (..., ka, kb)
    grad_a = _q_apply(refl_a, _mm(mid, rb))  # Q_A (mid R_B)
    grad_b = _mT(_q_apply(refl_b, _mm(_mT(mid), ra)))  # (R_Aᵀ mid) Q_Bᵀ = (Q_B (midᵀ R_A))ᵀ
    return grad_a, grad_b


_sv.defvjp(_sv_fwd, _sv_bwd)


def active(b) -> jax.Array:
    """Boolean (...,): True where the module is analysed, False where ‖b‖_F < B_NORM_TOL (skipped)."""
    b32 = b.astype(jnp.promote_types(b.dtype, jnp.float32))
    return jnp.sqrt(jnp.sum(jnp.square(b32), axis=(-2, -1))) >= B_NORM_TOL


@partial(jax.jit, static_argnames="qr")
def _singular_values(a, b, scale, qr="geqrf"):
    dt = _compute_dtype(a, b)
    mask = jax.lax.stop_gradient(active(b))
    s = _sv(a.astype(dt), b.astype(dt), qr) * jnp.abs(jnp.asarray(scale, dt))
    return jnp.where(mask[..., None], s, 0.0), mask


SV_METHODS = ("qr", "cholesky")
CHOLESKY_EPS = 1e-8  # the paper's jitter on B·Bᵀ


@jax.jit
def _singular_values_cholesky(a, b, scale):
    """The paper's variant: G = b·bᵀ (r × r), L = cholesky(G + 1e-8·I), σ(ΔW) = |s|·σ(a·L), in float32. Forming G
    squares b's condition number, and the jitter puts a floor of about 1e-4·σ(a) under the smallest σ: condition
    numbers and entropies come out as the paper's, not exact (``singular_values``' QR route is exact)."""
    dt = _compute_dtype(a, b)
    a, b = a.astype(dt), b.astype(dt)
    g = _mm(b, _mT(b)) + CHOLESKY_EPS * jnp.eye(b.shape[-2], dtype=dt)
    s = jnp.linalg.svd(_mm(a, jnp.linalg.cholesky(g)), compute_uv=False) * jnp.abs(jnp.asarray(scale, dt))
    mask = active(b)
    return jnp.where(mask[..., None], s, 0.0), mask


def singular_values(a, b, scale=1.0, return_mask: bool = False, qr: str | None = None, method: str = "qr"):
    """Singular values of ΔW = scale·a@b, shape (..., r), descending, float32 (float64 for float64 inputs).

    Never forms ΔW; cost O(d·r²). Skipped modules (‖b‖_F < 1e-12) get σ = 0 exactly; with
    ``return_mask=True`` also returns the boolean ``active`` mask (...,) so they can be reported as
    skipped. Differentiable (finite gradients even at b = 0 and for rank-deficient factors) and jittable.
    ``qr``: how the factors' QRs are computed (``QR_IMPLS``; None: by backend). ``method="cholesky"``: the paper's
    Gram/Cholesky variant instead (for reproducing its metric tables; not differentiable at b = 0).
    """
    _check_pair(a, b)
    if method not in SV_METHODS:
        raise ValueError(f"spectral: method {method!r}: use one of {SV_METHODS}")
    if method == "cholesky":
        s, mask = _singular_values_cholesky(a, b, scale)
    else:
        s, mask = _singular_values(a, b, scale, qr=_resolve_qr(qr))
    return (s, mask) if return_mask else s


# --------------------------------------------------------------------------------------------------------
# metrics


def _safe_entropy(s, total, ok):
    """−Σ pᵢ log pᵢ with pᵢ = σᵢ/Σσ; 0·log 0 = 0 with finite gradients."""
    p = s / jnp.where(ok, total, 1.0)[..., None]
    pos = p > 0
    return -jnp.sum(jnp.where(pos, p * jnp.log(jnp.where(pos, p, 1.0)), 0.0), axis=-1)


@jax.jit
def metrics(sigma) -> dict[str, jax.Array]:
    """Spectral metrics of singular values ``sigma`` (..., r), batched over leading dims.

    - stable_rank Σσ²/σ₁² (in [1, r]);
    - spectral_entropy −Σ pᵢ log pᵢ, pᵢ = σᵢ/Σσ (in [0, log r]);
    - condition_number σ₁/σ_r with σ_r the smallest of the r values; +inf when σ_r == 0 exactly
      (rank-deficient); a numerically rank-deficient update gives a large finite value (≳ 1/eps);
    - fn_ratio √Σσ² / Σσ (in [1/√r, 1]; 1/√r for a flat spectrum);
    - active: σ₁ > 0. Inactive (all-zero) spectra are skipped modules: their metrics are 0 (condition
      number inf), never NaN, and must not be averaged in.
    """
    s = jnp.asarray(sigma)
    if not jnp.issubdtype(s.dtype, jnp.floating):
        s = s.astype(jnp.float32)
    if s.ndim < 1 or s.shape[-1] < 1:
        raise ValueError(f"spectral.metrics: sigma must have shape (..., r) with r >= 1, got {tuple(s.shape)}")
    s1 = jnp.max(s, axis=-1)
    sr = jnp.min(s, axis=-1)
    ss = jnp.sum(jnp.square(s), axis=-1)
    total = jnp.sum(s, axis=-1)
    ok = s1 > 0
    one = jnp.ones_like(s1)
    return {
        "stable_rank": jnp.where(ok, ss / jnp.where(ok, jnp.square(s1), one), 0.0),
        "spectral_entropy": jnp.where(ok, _safe_entropy(s, total, ok), 0.0),
        "condition_number": jnp.where(sr > 0, s1 / jnp.where(sr > 0, sr, one), jnp.inf),
        "fn_ratio": jnp.where(ok, jnp.sqrt(jnp.where(ok, ss, one)) / jnp.where(ok, total, one), 0.0),
        "active": ok,
    }


# --------------------------------------------------------------------------------------------------------
# penalty


PenaltyFn = Callable[[jax.Array, jax.Array], jax.Array]
PENALTIES: dict[str, PenaltyFn] = {}


def register_penalty(name: str, *, replace: bool = False) -> Callable[[PenaltyFn], PenaltyFn]:
    """Register ``fn(sigma (..., r), active (...,)) -> (...,)`` as a penalty kind, ≥ 0 and 0 when flat.

    ``fn`` must be NaN-free with finite gradients for σ = 0 and return 0 where ``active`` is False. A name already
    taken is an error unless ``replace=True`` or it is the same function defined again (a module imported twice).
    """

    def deco(fn: PenaltyFn) -> PenaltyFn:
        old = PENALTIES.get(name)
        where = [f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', repr(f))}" for f in (old, fn)]
        if old is not None and not replace and where[0] != where[1]:
            raise ValueError(f"spectral: penalty kind {name!r} is already registered (by {where[0]}); pick another "
                             f"name, or register_penalty({name!r}, replace=True) to replace it")
        PENALTIES[name] = fn
        return fn

    return deco


@register_penalty("fn_ratio")
def _fn_ratio_penalty(s, act):
    """‖ΔW‖_F/‖ΔW‖_* − 1/√r: 0 for a flat spectrum, 1 − 1/√r for rank one."""
    r = s.shape[-1]
    ss = jnp.sum(jnp.square(s), axis=-1)
    total = jnp.sum(s, axis=-1)
    ok = act & (total > 0)
    val = jnp.sqrt(jnp.where(ok, ss, 1.0)) / jnp.where(ok, total, 1.0) - 1.0 / math.sqrt(r)
    return jnp.where(ok, val, 0.0)


@register_penalty("entropy")
def _entropy_penalty(s, act):
    """log r − spectral entropy: 0 for a flat spectrum, log r for rank one."""
    r = s.shape[-1]
    total = jnp.sum(s, axis=-1)
    ok = act & (total > 0)
    return jnp.where(ok, math.log(r) - _safe_entropy(s, total, ok), 0.0)


def per_module_penalty(a, b, scale=1.0, kind: str = "fn_ratio", qr: str | None = None) -> jax.Array:
    """Penalty of one (stacked) module, shape (...,) over its leading dims; 0 for skipped entries."""
    if kind not in PENALTIES:
        raise ValueError(f"spectral: unknown penalty kind {kind!r}; registered: {sorted(PENALTIES)}")
    _check_pair(a, b)
    # the function, not its name, keys the compiled program: a kind registered again (replace=True) takes effect
    return _per_module_penalty(a, b, scale, PENALTIES[kind], _resolve_qr(qr))


@partial(jax.jit, static_argnames=("fn", "qr"))
def _per_module_penalty(a, b, scale, fn, qr):
    s, act = _singular_values(a, b, scale, qr=qr)
    return fn(s, act)


def penalty(adapters: Adapters, scale=1.0, kind: str = "fn_ratio", reduce: str = "mean",
            qr: str | None = None, layers: Sequence[int] | None = None) -> jax.Array:
    """Spectral regulariser: ``kind`` per module and layer, reduced over all modules × layers.

    ``reduce="mean"`` divides by the total count of modules × layers, skipped ones (b = 0) included as 0, so
    the denominator never jumps; ``"sum"`` adds them up. ``layers``: an adapter on only these layers
    (``LoraConfig.layers``; its other layers hold zeros): only they count, in the sum and in the mean's denominator.
    Scalar float32 (float64 for float64 inputs).
    Jittable, works on sharded stacked factors, finite value and gradient everywhere (0 at b = 0).

    The fn_ratio and entropy penalties are scale invariant (unchanged by ΔW → cΔW), so their gradient
    grows like 1/‖ΔW‖ right after initialisation: pair them with an adaptive optimiser or a small λ.
    ``qr``: how the factors' QRs are computed (``QR_IMPLS``; None: by backend).
    """
    qr = _resolve_qr(qr)
    if reduce not in ("mean", "sum"):
        raise ValueError(f"spectral: reduce must be 'mean' or 'sum', got {reduce!r}")
    mods = _as_mapping(adapters)
    total, count = 0.0, 0
    for name, pair in mods.items():
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise TypeError(f"spectral: module {name!r}: expected an (a, b) pair, got {type(pair).__name__}")
        a, b = pair
        _check_pair(a, b, name)
        if count:
            a, b = after(total, (a, b))  # one module after another on CPU, see after()
        per = per_module_penalty(a, b, scale, kind, qr)
        if layers is not None:  # (L, ...) over the layer stack
            mask = np.isin(np.arange(per.shape[0]), list(layers)).reshape((-1,) + (1,) * (per.ndim - 1))
            per = jnp.where(mask, per, 0.0)
            count += per.size // per.shape[0] * int(mask.sum())
        else:
            count += per.size
        total = total + jnp.sum(per)  # per-module sums: no gather of sharded values
    return total if reduce == "sum" else total / count


# --------------------------------------------------------------------------------------------------------
# reports


@partial(jax.jit, static_argnames=("qr", "method"))
def _module_stats(a, b, scale, qr, method="qr"):
    s, act = _singular_values_cholesky(a, b, scale) if method == "cholesky" else _singular_values(a, b, scale, qr=qr)
    m = metrics(s)
    m["active"] = act & m["active"]
    m["sigma_max"] = s[..., 0]
    return s, m


def projection_type(name: str) -> str:
    """"model/layers/self_attn/q_proj" or "layers.3.mlp.down_proj" → "q_proj" / "down_proj"."""
    parts = [p for p in name.replace("/", ".").split(".") if p and not p.isdigit()]
    return parts[-1] if parts else name


def _num(x) -> float | None:
    """Python float for JSON; non-finite (the inf condition number of a rank-deficient update) → None."""
    x = float(x)
    return x if math.isfinite(x) else None


def report(adapters: Adapters, scale=1.0, include_sigma: bool = False,
           layers: Sequence[int] | None = None, method: str = "qr") -> dict[str, Any]:
    """Per-module-per-layer metrics plus a per-projection-type summary, as plain JSON-ready Python.

    Returns ``{"rows": [...], "by_projection": {...}, "overall": {...}}``. Each row: module, projection,
    index (the leading-dim index, e.g. [layer]), active, sigma_max and the METRIC_NAMES (None when skipped;
    condition_number None when infinite), optionally the spectrum. Summaries average each metric over
    active rows (condition_number: over finite ones), count ``n`` and ``n_skipped``, and give
    ``normalised_spectrum``, the mean over active rows of σᵢ/σ₁ (r values; all 1 for a perfectly flat spectrum): the
    shape ``emjax report`` plots per optimiser. ``layers``: an adapter on those layers only (``LoraConfig.layers``):
    the other layers' rows are left out, not counted as skipped. ``method``: how σ is computed (``SV_METHODS``; see
    ``singular_values``). Runs on the host.
    """
    if method not in SV_METHODS:
        raise ValueError(f"spectral: method {method!r}: use one of {SV_METHODS}")
    mods = _as_mapping(adapters)
    rows: list[dict[str, Any]] = []
    normalised: list[np.ndarray | None] = []  # σ/σ₁ of each row (None when skipped), beside ``rows``
    for name, (a, b) in mods.items():
        _check_pair(a, b, name)
        s, m = jax.device_get(_module_stats(a, b, jnp.asarray(scale, jnp.float32), _default_qr(), method))
        lead = s.shape[:-1]
        for idx in np.ndindex(*lead):
            if layers is not None and idx[0] not in layers:
                continue
            on = bool(m["active"][idx])
            row: dict[str, Any] = {
                "module": name,
                "projection": projection_type(name),
                "index": list(idx),
                "active": on,
                "sigma_max": _num(m["sigma_max"][idx]),
            }
            for k in METRIC_NAMES:
                row[k] = _num(m[k][idx]) if on else None
            if include_sigma:
                row["sigma"] = [float(v) for v in s[idx]]
            rows.append(row)
            normalised.append(np.asarray(s[idx], np.float64) / float(s[idx][0]) if on and s[idx][0] > 0 else None)

    def summarise(sel):
        rs = [rows[i] for i in sel]
        out: dict[str, Any] = {"n": len(rs), "n_skipped": sum(not r["active"] for r in rs)}
        on = [r for r in rs if r["active"]]
        for k in METRIC_NAMES:
            vals = [r[k] for r in on if r[k] is not None]
            out[k] = float(np.mean(vals)) if vals else None
        out["n_rank_deficient"] = sum(r["condition_number"] is None for r in on)
        spectra = [normalised[i] for i in sel if normalised[i] is not None]
        out["normalised_spectrum"] = [float(v) for v in np.mean(spectra, 0)] if spectra else None
        return out

    projs = list(dict.fromkeys(r["projection"] for r in rows))
    return {
        "rows": rows,
        "by_projection": {p: summarise([i for i, r in enumerate(rows) if r["projection"] == p]) for p in projs},
        "overall": summarise(range(len(rows))),
    }


def summary(adapters: Adapters, scale=1.0, prefix: str = "spectral",
            layers: Sequence[int] | None = None, method: str = "qr") -> dict[str, float]:
    """Flat dict for metrics loggers: {"spectral/fn_ratio": x, "spectral/fn_ratio/q_proj": y, ...,
    "spectral/n_skipped": k}. Means over active modules × layers (of ``layers`` only, as in ``report``); metrics
    with no value are left out."""
    rep = report(adapters, scale, layers=layers, method=method)
    out: dict[str, float] = {}
    groups = [("", rep["overall"])] + [(f"/{p}", v) for p, v in rep["by_projection"].items()]
    for suffix, summ in groups:
        for k in (*METRIC_NAMES, "n_skipped"):
            if summ[k] is not None:
                out[f"{prefix}/{k}{suffix}"] = float(summ[k])
    return out
