"""Several LoRA adapters trained on one frozen base in one compiled program: an optimiser (or λ, or seed) sweep on
one chip, with the base weights read and stored once.

The gradient half of the train step (``emjax.train.make_grad_fn``) is vmapped over a leading adapter axis with the
frozen weights unbatched, so each base projection becomes one matmul over every adapter's tokens; each adapter then
takes its own optimiser's update (any Optax ``GradientTransformation``; they need not share a state structure)::

    txs = [build(OptimConfig(name=n, learning_rate=lr, total_steps=1000))
           for n, lr in (("adam", 1e-4), ("lion", 2e-5), ("muon", 2e-3))]
    trainables = multi.stack([trainable_0, trainable_1, trainable_2])      # (N, ...) LoRA factors
    opt_states = multi.init(txs, trainables)
    step = jax.jit(multi.make_multi_train_step(graphdef, txs, spectral_weights=[0.0, 0.0, 0.1],
                                               lora_scale=lora.scale), donate_argnums=(0, 1))
    trainables, opt_states, metrics = step(trainables, opt_states, frozen, batch)   # metrics["loss"]: (N,)

Each adapter's result equals its own ``emjax.train.make_train_step`` (``tests/test_multi.py``). Activations scale
with N, the base weights do not. On a Qwen3-MoE base the adapters' gradients are taken one after another in a loop
inside the program instead (``ragged_dot`` cannot be vmapped with the experts shared): the base is still stored once,
and activations do not scale with N. ``emjax.train.train_many`` runs a whole pack of configured runs this way (each with
its own checkpoints, metrics and PEFT export), and ``emjax sweep --pack N`` packs a sweep's runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from emjax.lora import has_routed_experts, over_adapters
from emjax.train import make_grad_fn


def stack(trees: Sequence[Any]) -> Any:
    """N trees of the same structure (e.g. ``nnx.State`` of LoRA factors) -> one tree with a leading adapter axis."""
    if not trees:
        raise ValueError("multi.stack: no adapters")
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: Any) -> list[Any]:
    """The inverse of :func:`stack`: one tree per adapter."""
    n = jax.tree.leaves(tree)[0].shape[0]
    return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(n)]


def init(txs: Sequence[optax.GradientTransformation], trainables: Any) -> tuple:
    """One optimiser state per adapter, for stacked ``trainables``."""
    adapters = unstack(trainables)
    if len(adapters) != len(txs):
        raise ValueError(f"multi.init: {len(txs)} optimisers for {len(adapters)} stacked adapters")
    return tuple(tx.init(p) for tx, p in zip(txs, adapters))


def make_multi_train_step(graphdef, txs: Sequence[optax.GradientTransformation], *,
                          spectral_weights: Sequence[float] | None = None, shared_batch: bool = True,
                          grad_accum: int = 1, spectral_kind: str = "fn_ratio", spectral_reduce: str = "mean",
                          lora_scale: float = 1.0, lr_fns: Sequence[Callable | None] | None = None,
                          remat: str = "none", loss_chunk: int = 0, attn_chunk: int = 0, lora_layers=None):
    """``step(trainables, opt_states, frozen, batch) -> (trainables, opt_states, metrics)`` for N = ``len(txs)``
    adapters: ``trainables`` stacked (:func:`stack`), ``opt_states`` a tuple of N (:func:`init`), ``frozen`` the
    one base, ``batch`` one (B, T) batch that every adapter trains on (``shared_batch``) or (N, B, T), one each.

    ``spectral_weights``: λ per adapter (the penalty is traced once, vmapped, when any λ is non-zero); the step's
    optional fifth argument, an (N,) array, replaces them at call time as data (one program for any λ > 0, as in
    ``make_train_step``). Metrics carry a
    leading N axis; ``lr`` is added when ``lr_fns`` (one ``opt_state -> lr`` per adapter, e.g.
    ``emjax.optim.current_lr``) is given. The memory options are the single step's."""
    n = len(txs)
    if n < 1:
        raise ValueError("make_multi_train_step: no optimisers")
    weights = [0.0] * n if spectral_weights is None else [float(w) for w in spectral_weights]
    if len(weights) != n:
        raise ValueError(f"make_multi_train_step: {len(weights)} spectral_weights for {n} adapters")
    if lr_fns is not None and len(lr_fns) != n:
        raise ValueError(f"make_multi_train_step: {len(lr_fns)} lr_fns for {n} adapters")
    grads_fn = make_grad_fn(graphdef, grad_accum=grad_accum, with_penalty=any(weights), spectral_kind=spectral_kind,
                            spectral_reduce=spectral_reduce, lora_scale=lora_scale, remat=remat,
                            loss_chunk=loss_chunk, attn_chunk=attn_chunk, lora_layers=lora_layers)
    # the frozen base is unbatched: vmap makes each base projection one matmul over every adapter's activations
    in_axes = (0, None, None if shared_batch else 0, 0)

    def step(trainables, opt_states, frozen, batch, lams=None):
        if len(opt_states) != n:
            raise ValueError(f"multi step: {len(opt_states)} optimiser states for {n} adapters")
        lams = jnp.asarray(weights if lams is None else lams, jnp.float32)
        if lams.shape != (n,):
            raise ValueError(f"multi step: spectral weights of shape {lams.shape} for {n} adapters")
        over = over_adapters(grads_fn, in_axes, sequential=has_routed_experts(frozen))
        grads, metrics = over(trainables, frozen, batch, lams)
        params, new_states = [], []
        for tx, g, p, s in zip(txs, unstack(grads), unstack(trainables), opt_states):
            updates, s = tx.update(g, s, p)
            params.append(optax.apply_updates(p, updates))
            new_states.append(s)
        if lr_fns is not None:
            metrics["lr"] = jnp.stack([jnp.asarray(f(s) if f is not None else jnp.nan, jnp.float32)
                                       for f, s in zip(lr_fns, new_states)])
        return stack(params), tuple(new_states), metrics

    return step
