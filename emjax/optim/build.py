"""Optimiser config, registry, label tree and builder: one function from config to Optax transform.

The optimiser sees the trainable LoRA state: a pytree (``nnx.State`` or nested dicts) with leaves
like ``blocks/q_proj/lora_a`` (L, in, r) and ``blocks/q_proj/lora_b`` (L, r, out). An explicit label
tree routes LoRA factors, any other trainable leaf and frozen leaves to different transforms, so
Muon never silently touches embeddings, norms or the head.

Per-optimiser defaults the study's sources suggest (set them in experiment configs; ``weight_decay``
itself defaults to 0.0 for every optimiser so nothing is decayed implicitly):

========  ===================  ==================================================================
name      learning rate        notes
========  ===================  ==================================================================
adamw     1e-5                 EM recipe: weight decay 0.01, 5 warm-up steps then linear decay
adam      1e-5                 b = (0.9, 0.999), eps 1e-8; no weight decay (use adamw)
lion      3-10x below AdamW    b = (0.9, 0.99); weight decay 3-10x above AdamW's (optax's 1e-3
                               default is *not* used: ours is explicit)
muon      variant-dependent    beta 0.95, Nesterov, 5 NS steps; "reference" and "rms" scalings
                               differ ~13x on a 4096x32 factor, so learning rates do not transfer
sgd       --                   momentum 0 (plain) or e.g. 0.9, optional Nesterov
========  ===================  ==================================================================
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from emjax.config import OptimConfig
from emjax.optim.muon import SCALINGS, muon
from emjax.sharding import path_str  # one path spelling for the sharding rules and the label tree

LORA_NAMES = ("lora_a", "lora_b")
LABELS = ("lora", "other", "frozen")
SCHEDULES = ("constant", "linear", "cosine")
NS_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

Factory = Callable[["OptimConfig", optax.ScalarOrSchedule], optax.GradientTransformation]
_REGISTRY: dict[str, Factory] = {}


def _where(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def register(name: str, *, replace: bool = False) -> Callable[[Factory], Factory]:
    """Decorator: make ``build`` pick ``fn(cfg, learning_rate) -> GradientTransformation`` by name.

    A name already taken is an error naming who took it, unless ``replace=True`` (e.g. your own ``"adam"``) or the
    holder is the same function defined again (a module imported twice, a notebook cell run again)."""

    def deco(fn: Factory) -> Factory:
        if name == "frozen":
            raise ValueError("optimiser name 'frozen' is reserved (optim.other_optimizer=frozen: never updated)")
        old = _REGISTRY.get(name)
        if old is not None and not replace and _where(old) != _where(fn):
            raise ValueError(f"optimiser {name!r} is already registered (by {_where(old)}); pick another name, or "
                             f"register({name!r}, replace=True) to replace it")
        _REGISTRY[name] = fn
        return fn

    return deco


def available() -> list[str]:
    """Registered optimiser names."""
    return sorted(_REGISTRY)


def factory(name: str) -> Factory:
    """The registered ``fn(cfg, learning_rate) -> GradientTransformation`` for ``name``: how an optimiser of your own
    reuses a registered one (say Adam with the config's b1, b2, eps) inside its own chain or partition."""
    if name not in _REGISTRY:
        raise KeyError(f"optimiser {name!r} is not registered; registered: {available()}")
    return _REGISTRY[name]


@register("sgd")
def _sgd(cfg: OptimConfig, lr) -> optax.GradientTransformation:
    tx = optax.sgd(lr, momentum=cfg.momentum or None, nesterov=cfg.nesterov)
    if cfg.weight_decay:  # coupled L2, as torch.optim.SGD(weight_decay=...)
        tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay), tx)
    return tx


@register("adam")
def _adam(cfg: OptimConfig, lr) -> optax.GradientTransformation:
    return optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)


@register("adamw")
def _adamw(cfg: OptimConfig, lr) -> optax.GradientTransformation:
    return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)


@register("lion")
def _lion(cfg: OptimConfig, lr) -> optax.GradientTransformation:
    # optax.lion is exactly the published rule (sign((1-b1)g + b1 m) + wd*theta, then x lr,
    # m <- b2 m + (1-b2) g); only its 1e-3 default decay differs, so pass ours explicitly.
    return optax.lion(lr, b1=cfg.lion_b1, b2=cfg.lion_b2, weight_decay=cfg.weight_decay)


@register("muon")
def _muon(cfg: OptimConfig, lr) -> optax.GradientTransformation:
    return muon(
        lr,
        beta=cfg.muon_beta,
        nesterov=cfg.muon_nesterov,
        ns_steps=cfg.muon_ns_steps,
        ns_coeffs=tuple(cfg.muon_ns_coeffs),
        eps=cfg.muon_eps,
        scaling=cfg.muon_scaling,
        ns_dtype=NS_DTYPES[cfg.muon_ns_dtype],
        weight_decay=cfg.weight_decay,
        bias_correction=cfg.muon_bias_correction,
    )


def _err(key: str, msg: str) -> ValueError:
    return ValueError(f"optim.{key}: {msg}")


def validate(cfg: OptimConfig) -> None:
    """Raise ValueError naming the offending ``optim.<key>`` for any inconsistent setting."""
    if cfg.name not in _REGISTRY:
        raise _err("name", f"unknown optimiser {cfg.name!r}; registered: {available()}")
    if not cfg.learning_rate > 0:
        raise _err("learning_rate", f"must be > 0, got {cfg.learning_rate}")
    if cfg.schedule not in SCHEDULES:
        raise _err("schedule", f"must be one of {SCHEDULES}, got {cfg.schedule!r}")
    if cfg.warmup_steps < 0:
        raise _err("warmup_steps", f"must be >= 0, got {cfg.warmup_steps}")
    if cfg.total_steps < 0:
        raise _err("total_steps", f"must be >= 0, got {cfg.total_steps}")
    if cfg.schedule != "constant" and cfg.total_steps <= cfg.warmup_steps:
        raise _err(
            "total_steps",
            f"schedule {cfg.schedule!r} needs total_steps > warmup_steps ({cfg.warmup_steps}), "
            f"got {cfg.total_steps} (a run's `steps`, or the steps its epochs make; lower optim.warmup_steps, or "
            "use optim.schedule=constant)",
        )
    if not 0.0 <= cfg.end_lr_ratio <= 1.0:
        raise _err("end_lr_ratio", f"must be in [0, 1], got {cfg.end_lr_ratio}")
    if cfg.weight_decay < 0:
        raise _err("weight_decay", f"must be >= 0, got {cfg.weight_decay}")
    if "adam" in (cfg.name, cfg.other_optimizer) and cfg.weight_decay != 0:
        raise _err("weight_decay", "plain adam takes no weight decay; use name 'adamw'")
    if cfg.clip_norm is not None and not cfg.clip_norm > 0:
        raise _err("clip_norm", f"must be > 0 or None, got {cfg.clip_norm}")
    for key in ("b1", "b2", "lion_b1", "lion_b2", "muon_beta", "momentum"):
        v = getattr(cfg, key)
        if not 0.0 <= v < 1.0:
            raise _err(key, f"must be in [0, 1), got {v}")
    for key in ("eps", "muon_eps"):
        if not getattr(cfg, key) > 0:
            raise _err(key, f"must be > 0, got {getattr(cfg, key)}")
    if cfg.nesterov and not cfg.momentum and cfg.name == "sgd":
        raise _err("nesterov", "Nesterov SGD needs momentum > 0")
    if int(cfg.muon_ns_steps) != cfg.muon_ns_steps or cfg.muon_ns_steps < 1:
        raise _err("muon_ns_steps", f"must be an integer >= 1, got {cfg.muon_ns_steps}")
    if len(cfg.muon_ns_coeffs) != 3:
        raise _err("muon_ns_coeffs", f"must be 3 numbers (a, b, c), got {list(cfg.muon_ns_coeffs)}")
    if cfg.muon_scaling not in SCALINGS:
        raise _err("muon_scaling", f"must be one of {SCALINGS}, got {cfg.muon_scaling!r}")
    if cfg.muon_ns_dtype not in NS_DTYPES:
        raise _err("muon_ns_dtype", f"must be one of {tuple(NS_DTYPES)}, got {cfg.muon_ns_dtype!r}")
    if cfg.other_optimizer != "frozen" and cfg.other_optimizer not in _REGISTRY:
        raise _err("other_optimizer", f"must be 'frozen' or one of {available()}")
    if cfg.other_optimizer == "muon":
        raise _err("other_optimizer", "Muon needs matrices; non-LoRA leaves may be vectors")
    for key, pats in (("frozen_patterns", cfg.frozen_patterns), ("lr_scales", cfg.lr_scales)):
        for pat in pats:
            try:
                re.compile(pat)
            except re.error as e:
                raise _err(key, f"bad regex {pat!r}: {e}") from None
    for pat, factor in cfg.lr_scales.items():
        if not factor > 0:
            raise _err(f"lr_scales.{pat}", f"must be > 0 (freeze leaves with frozen_patterns), got {factor}")


def schedule_value(kind: str, count, peak, warmup, total, end) -> jax.Array:
    """Linear warm-up from 0 over ``warmup`` steps (HF convention), then constant/linear/cosine to ``end`` at
    ``total``: lr(t) = peak*t/w for t < w; linear: peak -> end at T; cosine: end + (peak-end)*(1+cos(pi*(t-w)/(T-w)))/2.
    Every number may be traced (:class:`LrSchedule` keeps them in the optimiser state); only ``kind`` is static."""
    t = jnp.asarray(count, jnp.float32)
    w, T = jnp.asarray(warmup, jnp.float32), jnp.asarray(total, jnp.float32)
    peak, end = jnp.asarray(peak, jnp.float32), jnp.asarray(end, jnp.float32)
    frac = jnp.clip((t - w) / jnp.maximum(T - w, 1.0), 0.0, 1.0)
    if kind == "constant":
        after = jnp.broadcast_to(peak, t.shape)
    elif kind == "linear":
        after = peak + (end - peak) * frac
    elif kind == "cosine":
        after = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    else:
        raise ValueError(f"schedule: must be one of {SCHEDULES}, got {kind!r}")
    return jnp.where(t < w, peak * t / jnp.maximum(w, 1.0), after)


class LrScheduleState(NamedTuple):
    count: jax.Array  # updates so far (int32)
    peak: jax.Array
    warmup: jax.Array
    total: jax.Array
    end: jax.Array


class LrSchedule:
    """The learning-rate schedule as an Optax stateful schedule whose numbers live in the optimiser state, not in
    the compiled step: runs that differ only in learning rate, warm-up or length (an lr sweep) share one compiled
    train step and its persistent-cache entry."""

    def __init__(self, kind: str, peak: float, warmup: int, total: int, end: float):
        self.kind, self.numbers = kind, (peak, warmup, total, end)

    def init(self) -> LrScheduleState:
        peak, w, T, end = self.numbers
        return LrScheduleState(jnp.zeros([], jnp.int32), jnp.asarray(peak, jnp.float32), jnp.asarray(w, jnp.int32),
                               jnp.asarray(T, jnp.int32), jnp.asarray(end, jnp.float32))

    def update(self, state: LrScheduleState, **extra_args) -> LrScheduleState:
        return state._replace(count=optax.safe_increment(state.count))

    def __call__(self, state: LrScheduleState, **extra_args) -> jax.Array:
        return schedule_value(self.kind, state.count, state.peak, state.warmup, state.total, state.end)

    @classmethod
    def from_config(cls, cfg: OptimConfig) -> "LrSchedule":
        return cls(cfg.schedule, cfg.learning_rate, cfg.warmup_steps, cfg.total_steps,
                   cfg.learning_rate * cfg.end_lr_ratio)


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    """``cfg``'s schedule as a plain function of the step (see :func:`schedule_value`)."""
    sched = LrSchedule.from_config(cfg)
    return lambda count: schedule_value(sched.kind, count, *sched.numbers)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def labels(params: Any, frozen_patterns: tuple[str, ...] | list[str] = ()) -> Any:
    """Same-structure pytree of labels: "lora" | "other" | "frozen".

    "frozen": path matches a ``frozen_patterns`` regex, a non-Param nnx Variable (e.g. BatchStat,
    RNG state) or a non-float leaf. "lora": an ``nnx.LoRAParam`` or a leaf named lora_a / lora_b.
    "other": any other trainable leaf. nnx Variables keep their wrapper (label as their value), so
    the tree matches ``params`` leaf for leaf, as optax.partition needs.
    """
    pats = [re.compile(p) for p in frozen_patterns]
    names, hit = [], set()

    def one(path, leaf):
        name = path_str(path)
        names.append(name)
        is_var = _is_variable(leaf)
        arrays = jax.tree.leaves(leaf)
        if len(arrays) != 1:
            raise ValueError(f"labels: {name} is not a single array leaf: {type(leaf).__name__}")
        matched = [i for i, p in enumerate(pats) if p.search(name)]
        hit.update(matched)
        if matched:
            label = "frozen"
        elif is_var and not isinstance(leaf, nnx.Param):
            label = "frozen"
        elif not jnp.issubdtype(jnp.result_type(arrays[0]), jnp.floating):
            label = "frozen"
        elif isinstance(leaf, nnx.LoRAParam) or (path and name.split("/")[-1] in LORA_NAMES):
            label = "lora"
        else:
            label = "other"
        return jax.tree.map(lambda _: label, leaf) if is_var else label

    out = jax.tree_util.tree_map_with_path(one, params, is_leaf=_is_variable)
    _check_all_match("frozen_patterns", frozen_patterns, hit, names)
    return out


def _check_all_match(key: str, patterns, hit: set[int], names: list[str]) -> None:
    """A pattern that matches no leaf is a typo (the setting would silently do nothing): name it, with the paths."""
    for i, pat in enumerate(patterns):
        if i not in hit and names:
            shown = ", ".join(names[:4]) + (", …" if len(names) > 4 else "")
            raise _err(key, f"{pat!r} matches no leaf of the trained tree ({len(names)} leaves: {shown}); "
                            "patterns are regexes searched in these paths")


def scale_by_path(scales: Mapping[str, float]) -> optax.GradientTransformation:
    """Multiply each leaf's update by the factor of the first regex in ``scales`` its path ("a/b/c") matches, 1 if
    none: after an optimiser whose update is proportional to its learning rate (every one here, decoupled weight
    decay included) this is a learning rate per group of leaves."""
    pats = [(re.compile(p), float(f)) for p, f in scales.items()]

    def factor(path) -> float:
        name = path_str(path)
        return next((f for p, f in pats if p.search(name)), 1.0)

    def init(params):
        names = [path_str(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
        _check_all_match("lr_scales", list(scales), {i for i, (p, _) in enumerate(pats)
                                                     if any(p.search(n) for n in names)}, names)
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map_with_path(lambda path, u: u * factor(path), updates), state

    return optax.GradientTransformation(init, update)


def build(cfg: OptimConfig) -> optax.GradientTransformation:
    """Config -> clip(global norm over trainable leaves), partition{lora, other, frozen}, then the per-group
    learning-rate factors (``lr_scales``, if any).

    The learning rate is injected (``optax.inject_hyperparams``) so ``current_lr(opt_state)`` reads
    the value used by the latest update; the schedule's numbers sit in the state (:class:`LrSchedule`), so the
    compiled update does not depend on them. Weight decay belongs to each optimiser (see module doc).
    """
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):  # a structured-config node: back to the dataclass
        cfg = OmegaConf.to_object(cfg)
    validate(cfg)
    schedule = LrSchedule.from_config(cfg)
    patterns = tuple(cfg.frozen_patterns)
    label_fn = lambda p: labels(p, patterns)  # noqa: E731
    trainable_fn = lambda p: jax.tree.map(lambda l: l != "frozen", label_fn(p))  # noqa: E731

    def make(learning_rate):
        main = _REGISTRY[cfg.name](cfg, learning_rate)
        if cfg.other_optimizer == "frozen":
            other = optax.set_to_zero()
        else:
            other = _REGISTRY[cfg.other_optimizer](cfg, learning_rate)
        tx = optax.partition(
            {"lora": main, "other": other, "frozen": optax.set_to_zero()}, label_fn
        )
        if cfg.clip_norm is not None:
            tx = optax.chain(optax.masked(optax.clip_by_global_norm(cfg.clip_norm), trainable_fn), tx)
        if cfg.lr_scales:
            tx = optax.chain(tx, scale_by_path(dict(cfg.lr_scales)))
        return tx

    return optax.inject_hyperparams(make)(learning_rate=schedule)


def current_lr(opt_state: Any) -> jax.Array:
    """Learning rate used by the latest update (at init: the step-0 value), from the opt state."""
    found = []

    def visit(node):
        if hasattr(node, "hyperparams") and hasattr(node, "inner_state"):  # Inject*HyperparamsState
            if "learning_rate" in node.hyperparams:
                found.append(node.hyperparams["learning_rate"])
                return
        if isinstance(node, (tuple, list)):
            for child in node:
                visit(child)
        elif isinstance(node, dict):
            for child in node.values():
                visit(child)
        elif hasattr(node, "inner_state"):  # MaskedState, MultiStepsState wrappers...
            visit(node.inner_state)
        elif hasattr(node, "inner_opt_state"):
            visit(node.inner_opt_state)

    visit(opt_state)
    if not found:
        raise ValueError(
            "current_lr: no injected 'learning_rate' in this optimiser state; "
            "build it with emjax.optim.build or optax.inject_hyperparams"
        )
    return found[0]
