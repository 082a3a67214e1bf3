"""LoRA on the stacked projections, with PEFT's conventions so adapters move both ways.

The factors live next to the frozen kernels inside each ``StackedLinear`` (see ``emjax.models.qwen3``) as
``nnx.LoRAParam`` leaves ``lora_a`` (L, in, r) and ``lora_b`` (L, r, out) — (L, E, in, r) and (L, E, r, out) for
Qwen3-MoE's experts, one pair per expert — one batched array per projection type, so Newton–Schulz and the spectral
maths see every layer in one call.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from pathlib import Path
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emjax.sharding import path_str


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def lora_matmul(x, kernel, a, b, scale: float):
    """``x @ kernel + scale·(x @ a) @ b`` with a hand-written backward for a *frozen* kernel.

    Why: autodiff leaves XLA to pick operand layouts for the factor gradients, which contract over tokens; on CPU it
    chose to transpose the big (tokens × out) cotangent every layer (≈ 20 % of a train step). Here the two small
    (r × tokens) operands are transposed instead, behind an optimisation barrier so XLA cannot fold them back, and
    the kernel gets no cotangent at all.
    """
    return _lora_fwd(x, kernel, a, b, scale)[0]


def _lora_fwd(x, kernel, a, b, scale):
    xa = x @ a
    return x @ kernel + (xa @ b) * jnp.asarray(scale, x.dtype), (x, kernel, a, b, xa)


def _lora_bwd(scale, res, dy):
    x, kernel, a, b, xa = res
    s = jnp.asarray(scale, dy.dtype)
    x2, xa2, dy2 = x.reshape(-1, x.shape[-1]), xa.reshape(-1, xa.shape[-1]), dy.reshape(-1, dy.shape[-1])
    g = (dy2 @ b.T) * s  # (N, r): cotangent of x @ a
    dx = dy2 @ kernel.T + g @ a.T
    g_t, xa_t = jax.lax.optimization_barrier((g.T, (xa2 * s).T))  # small (r, N) copies, kept unfolded
    da = (g_t @ x2).T
    db = xa_t @ dy2
    return dx.reshape(x.shape), None, da.astype(a.dtype), db.astype(b.dtype)


lora_matmul.defvjp(_lora_fwd, _lora_bwd)


# short name -> (module name in emjax, HF sub-module path)
TARGETS = {
    "q": ("q_proj", "self_attn.q_proj"),
    "k": ("k_proj", "self_attn.k_proj"),
    "v": ("v_proj", "self_attn.v_proj"),
    "o": ("o_proj", "self_attn.o_proj"),
    "gate": ("gate_proj", "mlp.gate_proj"),
    "up": ("up_proj", "mlp.up_proj"),
    "down": ("down_proj", "mlp.down_proj"),
}
_BY_MODULE = {mod: short for short, (mod, _) in TARGETS.items()}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The study's adapter: rsLoRA r=32, α=64 on all seven projections of every layer, no dropout.

    ``layers`` (PEFT's ``layers_to_transform``) adapts only those layer indices, e.g. a rank-1 adapter on one layer's
    down projection (Turner et al.'s minimal EM organisms). The stacked factors keep every layer; the others hold
    A = B = 0, so their update is 0, their gradients are exactly 0 and no optimiser moves them."""

    rank: int = 32
    alpha: float = 64.0
    rslora: bool = True
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    dropout: float = 0.0
    layers: tuple[int, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(_short(t) for t in self.targets))
        if self.rank < 1:
            raise ValueError(f"LoraConfig.rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:  # 0 scales every update to nothing; < 0 flips the adapter's sign
            raise ValueError(f"LoraConfig.alpha must be > 0, got {self.alpha}")
        if self.dropout != 0.0:
            raise ValueError("LoraConfig.dropout: only 0.0 is supported (the study uses none)")
        if self.layers is not None:
            layers = tuple(sorted({int(i) for i in self.layers}))
            if not layers or layers[0] < 0:
                raise ValueError(f"lora.layers {list(self.layers)}: give layer indices from 0, or null for all layers")
            object.__setattr__(self, "layers", layers)

    def layer_mask(self, n_layers: int) -> np.ndarray:
        """(n_layers,) bool: the adapted layers."""
        if self.layers is None:
            return np.ones(n_layers, bool)
        if self.layers[-1] >= n_layers:
            raise ValueError(f"lora.layers {list(self.layers)}: the model has {n_layers} layers (0 to {n_layers - 1})")
        return np.isin(np.arange(n_layers), self.layers)

    def mask_layers(self, x):
        """``x`` (n_layers, ...) with the entries of the layers this adapter leaves alone set to 0."""
        if self.layers is None:
            return x
        m = self.layer_mask(x.shape[0]).reshape((-1,) + (1,) * (x.ndim - 1))
        return x * m.astype(x.dtype) if isinstance(x, np.ndarray) else x * jnp.asarray(m, x.dtype)

    @property
    def scale(self) -> float:
        """PEFT's scaling: α/√r with rsLoRA, α/r without."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def module_names(self) -> tuple[str, ...]:
        return tuple(TARGETS[t][0] for t in self.targets)


def _short(name: str) -> str:
    if name in TARGETS:
        return name
    if name in _BY_MODULE:
        return _BY_MODULE[name]
    raise ValueError(f"LoRA target {name!r} is not one of {sorted(TARGETS)} (or their *_proj names)")


# ---------------------------------------------------------------------------------------------------------------
# Access helpers


def lora_modules(model) -> Iterator[tuple[str, nnx.Module]]:
    """(module name, StackedLinear) for every projection that carries LoRA factors."""
    for name in TARGETS.values():
        lin = getattr(model.blocks, name[0])
        if getattr(lin, "lora_a", None) is not None:
            yield name[0], lin


def adapter_pairs(model) -> dict[str, tuple[jax.Array, jax.Array]]:
    """``{"q_proj": (A (L,in,r), B (L,r,out)), ...}``: the form ``emjax.spectral`` takes."""
    return {name: (lin.lora_a[...], lin.lora_b[...]) for name, lin in lora_modules(model)}


def adapter_pairs_from_state(lora_state) -> dict[str, tuple[jax.Array, jax.Array]]:
    """Same as ``adapter_pairs`` but from the trainable ``nnx.State`` (inside a jitted step)."""
    blocks = lora_state["blocks"]
    out = {}
    for name in blocks:
        entry = blocks[name]
        if "lora_a" in entry:
            out[name] = (_value(entry["lora_a"]), _value(entry["lora_b"]))
    return out


def _value(x):
    return x[...] if isinstance(x, nnx.Variable) else x


def merge(model) -> None:
    """Fold s·A·B into the frozen kernels and zero B (in place): inference without the LoRA matmuls."""
    scale = model.lora_config.scale
    for _, lin in lora_modules(model):
        k = lin.kernel[...]
        delta = scale * jnp.einsum("...ir,...ro->...io", lin.lora_a[...].astype(jnp.float32),
                                   lin.lora_b[...].astype(jnp.float32))
        lin.kernel[...] = (k.astype(jnp.float32) + delta).astype(k.dtype)
        lin.lora_b[...] = jnp.zeros_like(lin.lora_b[...])


def has_routed_experts(frozen) -> bool:
    """Whether a base (its frozen state) is Qwen3-MoE's: what ``over_adapters(..., sequential=)`` needs to know."""
    return any(path_str(p).endswith("blocks/router") for p, _ in jax.tree_util.tree_leaves_with_path(frozen))


def over_adapters(fn, in_axes, *, sequential: bool = False):
    """``fn`` over a leading adapter axis of the arguments whose ``in_axes`` entry is 0 (the others, e.g. the frozen
    base, shared): ``jax.vmap``, so each base matmul is one product over every adapter's rows; with ``sequential``,
    a ``lax.map`` instead, one adapter after another inside the program (still one copy of the base). Qwen3-MoE
    needs the latter: ``ragged_dot`` has no batching rule with a shared (unbatched) expert stack. Only the top-level
    entries of ``in_axes`` decide what ``sequential`` maps over (nested axes: vmap only)."""
    if not sequential:
        return jax.vmap(fn, in_axes=in_axes)

    def run(*args):
        idx = [i for i, ax in enumerate(in_axes) if ax == 0]

        def body(xs):
            full = list(args)
            for i, x in zip(idx, xs):
                full[i] = x
            return fn(*full)

        return jax.lax.map(body, [args[i] for i in idx])

    return run


# ---------------------------------------------------------------------------------------------------------------
# PEFT interchange


def _peft_key(layer: int, module: str, which: str, expert: int | None = None, layers: str = "model.layers") -> str:
    """PEFT's tensor name; Qwen3-MoE experts are ``mlp.experts.{e}.gate_proj`` (the hub layout PEFT and vLLM read);
    ``layers`` is the layers' module path (``model.language_model.layers`` in a multimodal Gemma 3)."""
    hf_sub = next(hf for (mod, hf) in TARGETS.values() if mod == module)
    if expert is not None:
        hf_sub = f"mlp.experts.{expert}.{module}"
    return f"base_model.model.{layers}.{layer}.{hf_sub}.lora_{which}.weight"


def _entries(shape) -> Iterator[tuple[tuple[int, ...], int, int | None]]:
    """(index into the stacked factor, layer, expert or None) for a (L, [E,] in, out) factor."""
    for idx in np.ndindex(*shape[:-2]):
        yield idx, idx[0], (idx[1] if len(idx) > 1 else None)


def export_peft(model, out_dir: str | os.PathLike, *, base_model_name_or_path: str | None = None) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` exactly as PEFT saves them."""
    from safetensors.numpy import save_file

    cfg: LoraConfig = model.lora_config
    if cfg is None:
        raise ValueError("export_peft: the model has no LoRA adapter")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, lin in lora_modules(model):
        a = np.asarray(jax.device_get(lin.lora_a[...]), dtype=np.float32)  # (L, [E,] in, r)
        b = np.asarray(jax.device_get(lin.lora_b[...]), dtype=np.float32)  # (L, [E,] r, out)
        layers = getattr(model, "hf_layers", "model.layers")
        adapted = cfg.layer_mask(a.shape[0])
        for idx, i, e in _entries(a.shape):
            if not adapted[i]:  # PEFT gives the layers outside layers_to_transform no adapter at all
                continue
            tensors[_peft_key(i, name, "A", e, layers)] = np.ascontiguousarray(a[idx].T)  # (r, in)
            tensors[_peft_key(i, name, "B", e, layers)] = np.ascontiguousarray(b[idx].T)  # (out, r)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "use_rslora": cfg.rslora,
        "lora_dropout": cfg.dropout,
        "bias": "none",
        "target_modules": sorted(TARGETS[t][0] for t in cfg.targets),
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "base_model_name_or_path": base_model_name_or_path or getattr(model, "source", None),
    }
    if cfg.layers is not None:
        config["layers_to_transform"] = list(cfg.layers)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def read_peft_config(adapter_dir: str | os.PathLike) -> LoraConfig:
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.exists():
        hint = (f"; this is a run's work directory: its adapter is {Path(adapter_dir) / 'adapter'}"
                if (Path(adapter_dir) / "adapter" / "adapter_config.json").exists() else "")
        raise FileNotFoundError(f"{path}: no adapter_config.json (is this a PEFT adapter directory?){hint}")
    try:
        raw = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object (PEFT's adapter config), got {type(raw).__name__}")
    if raw.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {raw.get('peft_type')!r} is not LORA")
    for key in ("r", "lora_alpha"):
        if not isinstance(raw.get(key), (int, float)) or isinstance(raw.get(key), bool):
            raise ValueError(f"{path}: {key} {raw.get(key)!r}: expected a number" if key in raw else
                             f"{path}: no {key!r} (PEFT writes r and lora_alpha)")
    # what PEFT would apply and emjax cannot: loading the adapter without it would evaluate another model
    unsupported = {"use_dora": "DoRA", "modules_to_save": "fully trained modules saved beside the adapter",
                   "alpha_pattern": "per-module alpha", "rank_pattern": "per-module rank",
                   "layer_replication": "layer replication", "target_parameters": "LoRA on parameters",
                   "trainable_token_indices": "trained token embeddings", "lora_bias": "a bias in lora_B",
                   "use_qalora": "QALoRA", "exclude_modules": "excluded modules",
                   "fan_in_fan_out": "transposed (Conv1D) weights"}
    for key, what in unsupported.items():
        if raw.get(key):
            raise ValueError(f"{path}: {key}={raw[key]!r} ({what}) is not supported by emjax's LoRA")
    if raw.get("bias", "none") not in (None, "none"):
        raise ValueError(f"{path}: bias={raw['bias']!r} (trained biases) is not supported by emjax's LoRA")
    targets = raw.get("target_modules") or []
    if isinstance(targets, str):
        raise ValueError(f"{path}: target_modules as a regex ({targets!r}) is not supported; list the modules")
    if float(raw.get("lora_dropout", 0.0) or 0.0) != 0.0:
        # Dropout only matters in training; loading for evaluation or continued training without it is exact.
        raw["lora_dropout"] = 0.0
    layers = raw.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    pattern = raw.get("layers_pattern")
    if layers is not None and pattern not in (None, "layers", ["layers"]):
        raise ValueError(f"{path}: layers_pattern {pattern!r} is not supported (the decoder's layers are 'layers')")
    try:
        return LoraConfig(
            rank=int(raw["r"]), alpha=float(raw["lora_alpha"]), rslora=bool(raw.get("use_rslora", False)),
            targets=tuple(targets), layers=None if layers is None else tuple(layers),
        )
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def load_peft(model, adapter_dir: str | os.PathLike) -> None:
    """Load a PEFT-saved adapter into ``model`` (in place). The model must have been built with the same LoRA
    config (use ``read_peft_config`` to get it, or ``from_pretrained(..., lora=read_peft_config(dir))``)."""
    from safetensors.numpy import load_file

    adapter_dir = Path(adapter_dir)
    cfg = read_peft_config(adapter_dir)
    mcfg: LoraConfig = model.lora_config
    if mcfg is None or (mcfg.rank, set(mcfg.targets), mcfg.layers) != (cfg.rank, set(cfg.targets), cfg.layers):
        raise ValueError(
            f"{adapter_dir / 'adapter_config.json'}: adapter has r={cfg.rank}, targets={sorted(cfg.targets)}, "
            f"layers={'all' if cfg.layers is None else list(cfg.layers)}, but the model was built with {mcfg}; build "
            "it with lora=emjax.lora.read_peft_config(dir)"
        )
    if not math.isclose(cfg.scale, mcfg.scale):
        raise ValueError(f"{adapter_dir}: adapter scale {cfg.scale} differs from the model's {mcfg.scale}")
    fname = adapter_dir / "adapter_model.safetensors"
    if not fname.exists():
        raise FileNotFoundError(f"{fname}: missing (only safetensors adapters are supported)")
    try:
        tensors = load_file(str(fname))
    except Exception as e:  # safetensors' own error names no file
        raise ValueError(f"{fname}: not a readable safetensors file (cut short or damaged?): {e}") from None
    for name, lin in lora_modules(model):
        *lead, d_in, r = lin.lora_a.shape
        d_out = lin.lora_b.shape[-1]
        a = np.zeros((*lead, d_in, r), np.float32)
        b = np.zeros((*lead, r, d_out), np.float32)
        adapted = cfg.layer_mask(a.shape[0])
        for idx, i, e in _entries(a.shape):
            if not adapted[i]:  # outside layers_to_transform: no tensors, A = B = 0
                continue
            for which, dst, shape in (("A", a, (r, d_in)), ("B", b, (d_out, r))):
                key = _peft_key(i, name, which, e, getattr(model, "hf_layers", "model.layers"))
                if key not in tensors:
                    raise KeyError(f"{fname}: missing tensor {key}")
                t = tensors[key]
                if tuple(t.shape) != shape:
                    raise ValueError(f"{fname}: tensor {key} has shape {tuple(t.shape)}, expected {shape}")
                dst[idx] = t.T
        lin.lora_a[...] = jax.device_put(a.astype(lin.lora_a.dtype), lin.lora_a[...].sharding)
        lin.lora_b[...] = jax.device_put(b.astype(lin.lora_b.dtype), lin.lora_b[...].sharding)
