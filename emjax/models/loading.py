"""Hugging Face checkpoint -> emjax model, one tensor slice at a time, straight to its device sharding.

Safetensors files are memory-mapped; each device shard of each stacked parameter is assembled from only the bytes
it needs (``jax.make_array_from_callback``), so the host never holds a second full copy of the model.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from emjax import sharding as shd
from emjax.lora import LoraConfig
from emjax.models import gemma, llama, qwen3

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted; the message names the tensor and file."""


class SafetensorsFile:
    """Lazy, memory-mapped view of one ``.safetensors`` file (header parsed by hand: it is 8 bytes + JSON)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            if n is None or 8 + n > size:
                raise CheckpointError(f"{self.path}: not a safetensors file, or cut short ({size} bytes)")
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise CheckpointError(f"{self.path}: unreadable safetensors header ({e})") from None
        header.pop("__metadata__", None)
        end = max((info["data_offsets"][1] for info in header.values()), default=0)
        if 8 + n + end > size:
            raise CheckpointError(f"{self.path}: cut short: its header promises {8 + n + end} bytes, the file has "
                                  f"{size} (download it again)")
        self.meta = header
        self._base = 8 + n
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.meta[name]["shape"])

    def dtype(self, name: str) -> str:
        return self.meta[name]["dtype"]

    def get(self, name: str) -> np.ndarray:
        info = self.meta[name]
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        raw = self._mm[self._base + start: self._base + end]
        return raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


class Checkpoint:
    """All tensors of a (possibly sharded) HF checkpoint directory, by name."""

    def __init__(self, root: Path):
        self.root = root
        index = root / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in root.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{root}: no *.safetensors files (only safetensors checkpoints are supported)")
            weight_map = None
        self.files = {}
        for fname in files:
            if not (root / fname).exists():
                raise CheckpointError(f"{index}: lists {fname}, which does not exist in {root}")
            self.files[fname] = SafetensorsFile(root / fname)
        self.where: dict[str, SafetensorsFile] = {}
        for f in self.files.values():
            for name in f.meta:
                self.where[name] = f
        if weight_map is not None:
            for name, fname in weight_map.items():
                if name not in self.files[fname].meta:
                    raise CheckpointError(f"{index}: tensor {name} is mapped to {fname} but is not in that file")
        self.used: set[str] = set()

    def tensor(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.where:
            raise CheckpointError(f"{self.root}: missing tensor {name}")
        f = self.where[name]
        if f.dtype(name) not in _FLOAT_DTYPES:  # an integer (or fp8) weight is a quantised one: a cast is garbage
            raise CheckpointError(f"{f.path}: tensor {name} has dtype {f.dtype(name)}: quantised checkpoints are not "
                                  f"supported (weights must be {' / '.join(_FLOAT_DTYPES)}; use the unquantised model)")
        if f.shape(name) != tuple(shape):
            raise CheckpointError(f"{f.path}: tensor {name} has shape {f.shape(name)}, expected {tuple(shape)}")
        self.used.add(name)
        return f.get(name)


def is_hub_id(name: str | os.PathLike) -> bool:
    """Whether ``name`` is to be fetched from the Hugging Face hub (``org/model``): not a local path, nor spelled
    like one."""
    name = str(name)
    return not Path(name).expanduser().exists() and not name.startswith((".", "/", "~")) and name.count("/") == 1


def resolve(path_or_hub_id: str | os.PathLike) -> Path:
    """A local directory, or a hub id fetched with huggingface_hub (clear error when offline)."""
    p = Path(path_or_hub_id).expanduser()
    if p.is_dir():
        return p
    name = str(path_or_hub_id)
    if not is_hub_id(name):
        raise FileNotFoundError(f"{name}: not a checkpoint directory (expected config.json + *.safetensors)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as e:  # offline, unknown repo, gated...
        raise FileNotFoundError(
            f"{name}: not a local directory and could not be fetched from the Hugging Face hub ({type(e).__name__}: "
            f"{e}). Download it where you have internet with `hf download {name} --local-dir DIR` "
            f"(config.json, *.safetensors and the tokenizer files) and pass DIR instead."
        ) from e


# model_type -> the family's config reader; every family loads into ``Qwen3ForCausalLM`` (see emjax/models/llama.py)
FAMILIES = {"qwen3": qwen3.config_from_hf, "qwen3_moe": qwen3.config_from_hf, "llama": llama.config_from_hf,
            "gemma3_text": gemma.config_from_hf, "gemma3": gemma.config_from_hf}
# Where a checkpoint keeps its language model: causal LMs under "model."; Gemma 3's multimodal checkpoints under
# "language_model.model." (hub files, transformers 4) or "model.language_model." (saved by transformers 5). Their
# vision tower and projector are not loaded.
LM_PREFIXES = ("model.", "language_model.model.", "model.language_model.")
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


# config.json's integer sizes the model is shaped by (and, by model_type, the family's own): each one present must be a
# positive integer, or null for the two that fall back (to num_attention_heads, and hidden_size / num_attention_heads)
_SIZE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim")
_FAMILY_SIZE_KEYS = {"qwen3_moe": ("num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size"),
                     "gemma3_text": ("sliding_window",), "gemma3": ("sliding_window",)}
_NULLABLE = ("num_key_value_heads", "head_dim")


def _check_sizes(config: dict, where: str, model_type: str) -> None:
    if model_type == "gemma3" and isinstance(config.get("text_config"), dict):  # the multimodal form
        config, where = config["text_config"], f"{where}: text_config"
    for key in _SIZE_KEYS + _FAMILY_SIZE_KEYS.get(model_type, ()):
        v = config.get(key)
        if key not in config or (v is None and key in _NULLABLE):
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{where}: {key} must be a positive integer (got {v!r})")


def config_from_hf(config) -> qwen3.Qwen3Config:
    """Any supported family's ``config.json`` (dict or path), by its ``model_type``."""
    config, where = qwen3.read_hf_config(config)
    mt = config.get("model_type")
    if mt not in FAMILIES:
        raise ValueError(f"{where}: model_type {mt!r} is not supported (supported: "
                         f"{', '.join(repr(k) for k in FAMILIES)})")
    _check_sizes(config, where, mt)
    return FAMILIES[mt](config, where)  # the dict already read, named by its file


def _hf_sub(module: str) -> str:
    return ("self_attn." if module in qwen3.ATTN else "mlp.") + module


def _sources(cfg: qwen3.Qwen3Config, prefix: str = "model."):
    """emjax parameter path -> (HF name template with {i} for stacked, transpose?)."""
    layer = prefix + "layers.{i}."
    src = {
        "embed": (prefix + "embed_tokens.weight", False),
        "final_norm": (prefix + "norm.weight", False),
        "blocks/input_norm": (layer + "input_layernorm.weight", False),
        "blocks/post_norm": (layer + "post_attention_layernorm.weight", False),
    }
    if cfg.sandwich_norm:  # Gemma 3: post_attention_layernorm is on the attention output; the MLP input has its own
        src["blocks/post_norm"] = (layer + "pre_feedforward_layernorm.weight", False)
        src["blocks/attn_out_norm"] = (layer + "post_attention_layernorm.weight", False)
        src["blocks/mlp_out_norm"] = (layer + "post_feedforward_layernorm.weight", False)
    if cfg.qk_norm:
        src["blocks/q_norm"] = (layer + "self_attn.q_norm.weight", False)
        src["blocks/k_norm"] = (layer + "self_attn.k_norm.weight", False)
    for m in qwen3.ATTN:
        src[f"blocks/{m}/kernel"] = (f"{layer}{_hf_sub(m)}.weight", True)
    for m in qwen3.MLP:
        sub = f"mlp.experts.{{e}}.{m}" if cfg.is_moe else _hf_sub(m)
        src[f"blocks/{m}/kernel"] = (f"{layer}{sub}.weight", True)
    if cfg.is_moe:
        src["blocks/router"] = (layer + "mlp.gate.weight", True)
    if not cfg.tie_word_embeddings:
        src["lm_head"] = ("lm_head.weight", True)
    return src


def _lora_leaf(path: str, shape, rng: np.random.Generator, sharding, lora: LoraConfig | None = None):
    """A fresh LoRA factor (fp32) of the layer-stacked (layers, [experts,] in, out) shape: A ~ U(±1/√in) from the
    host ``rng`` (PEFT's kaiming-uniform bound), B = 0; A = 0 too in the layers ``lora.layers`` leaves alone (drawn
    all the same, so the adapted layers get the values they would have with every layer adapted)."""
    if path.endswith("/lora_a"):
        bound = 1.0 / np.sqrt(shape[-2])
        a = rng.uniform(-bound, bound, size=shape).astype(np.float32)
        return jax.device_put(lora.mask_layers(a) if lora is not None else a, sharding)
    return jax.device_put(np.zeros(shape, np.float32), sharding)


def init_lora(lora_state, seed: int, mesh: jax.sharding.Mesh | None = None, lora: LoraConfig | None = None):
    """Fresh LoRA factors for ``seed``, drawn exactly as ``from_pretrained(..., seed=seed, lora=lora)`` draws them
    (the same host RNG over the factors in the same order): what lets runs that differ only in seed share one loaded
    base."""
    rng = np.random.default_rng(seed)

    def one(path, var):
        p = shd.path_str(path)
        return _lora_leaf(p, var.shape, rng, shd.param_sharding(p, var.shape, mesh), lora)

    return jax.tree_util.tree_map_with_path(one, lora_state)


def _run_dir_hint(root: Path) -> str:
    """For an emjax training run's work directory given as a model: where its base and adapter are."""
    import yaml

    try:
        model = (yaml.safe_load((root / "config.yaml").read_text()) or {}).get("model") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return ""
    if model.get("checkpoint"):
        return (f"; it is an emjax training run's work directory, not a model: its base is {model['checkpoint']} "
                f"and its adapter {root / 'adapter'} (emjax eval run --model {model['checkpoint']} --adapter "
                f"{root / 'adapter'})")
    return (f"; it is an emjax training run's work directory, not a model, and its base is a random init of preset "
            f"{model.get('preset')!r}, which is not saved: evaluate such a run while it trains (eval.final=true, "
            "eval.every=N), or train from a saved checkpoint (model.checkpoint=DIR)")


def from_pretrained(path_or_hub_id: str | os.PathLike, *, dtype=jnp.bfloat16, compute_dtype=None,
                    lora: LoraConfig | None = None, mesh: jax.sharding.Mesh | None = None, seed: int = 0):
    """Load a Hugging Face Qwen3, Qwen3-MoE, Llama 3 or Gemma 3 checkpoint into ``Qwen3ForCausalLM``.

    ``dtype`` is the parameter dtype of the frozen weights (LoRA factors are always fp32); ``compute_dtype``
    defaults to it. With ``mesh`` every tensor goes straight to its sharding from ``emjax.sharding``.
    """
    root = resolve(path_or_hub_id)
    cfg = config_from_hf(root / "config.json") if (root / "config.json").exists() else None
    if cfg is None:
        raise CheckpointError(f"{root}: no config.json{_run_dir_hint(root)}")
    ckpt = Checkpoint(root)
    abstract = nnx.eval_shape(lambda: qwen3.Qwen3ForCausalLM(cfg, lora=lora, param_dtype=dtype,
                                                             dtype=compute_dtype, rngs=nnx.Rngs(seed)))
    graphdef, state = nnx.split(abstract)
    prefix = next((p for p in LM_PREFIXES if p + "embed_tokens.weight" in ckpt.where), "model.")
    sources = _sources(cfg, prefix)
    rng = np.random.default_rng(seed)

    def load_leaf(path, var):
        p = shd.path_str(path)
        shape, leaf_dtype = var.shape, var.dtype
        sharding = shd.param_sharding(p, shape, mesh)
        if p.endswith(("/lora_a", "/lora_b")):
            return _lora_leaf(p, shape, rng, sharding, lora)
        if p not in sources:
            raise CheckpointError(f"{root}: no source for parameter {p}")
        template, transpose = sources[p]
        # stacked over layers ({i}) and, for Qwen3-MoE's experts, over experts ({e}): one HF tensor per entry
        n_lead = ("{i}" in template) + ("{e}" in template)
        per = shape[n_lead:]
        hf_shape = tuple(reversed(per)) if transpose else tuple(per)
        if n_lead == 2:
            views = np.empty(shape[:2], object)
            for i, e in np.ndindex(*shape[:2]):
                views[i, e] = ckpt.tensor(template.format(i=i, e=e), hf_shape)  # validates names and shapes
        elif n_lead == 1:
            views = np.empty(shape[:1], object)
            for i in range(shape[0]):
                views[i] = ckpt.tensor(template.format(i=i), hf_shape)
        else:
            views = ckpt.tensor(template, hf_shape)

        def read(view, idx):  # only the bytes of this shard; HF (out, in) -> JAX (in, out)
            return view[tuple(reversed(idx))].T if transpose else view[idx]

        def cb(index):
            if n_lead:
                sel = views[index[:n_lead]]
                out = np.stack([read(v, index[n_lead:]) for v in sel.reshape(-1)])
                out = out.reshape(*sel.shape, *out.shape[1:])
            else:
                out = read(views, index)
            return np.asarray(out, dtype=leaf_dtype)

        return jax.make_array_from_callback(tuple(shape), sharding, cb)

    from tqdm.auto import tqdm

    # an 8B checkpoint takes a minute or more to read, a 70B many: a bar (bytes of the model as loaded, rate, ETA)
    # once loading has taken 2 s, on process 0 only
    total = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in jax.tree_util.tree_leaves(state))
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, delay=2.0, leave=False,
              desc=f"loading {root.name}", disable=jax.process_index() != 0) as bar:
        def load_and_count(path, var):
            out = load_leaf(path, var)
            bar.update(int(np.prod(var.shape)) * np.dtype(var.dtype).itemsize)
            return out

        loaded = jax.tree_util.tree_map_with_path(load_and_count, state)
    unused = sorted(n for n in ckpt.where if n not in ckpt.used and not n.endswith(_IGNORED_SUFFIXES)
                    and not (prefix != "model." and n.startswith(_VISION_PREFIXES)))
    for name in ("lm_head.weight", "language_model.lm_head.weight"):
        if cfg.tie_word_embeddings and name in unused:
            unused.remove(name)  # some tied checkpoints store the copy anyway
    if unused:
        raise CheckpointError(f"{ckpt.where[unused[0]].path}: unexpected tensor {unused[0]} "
                              f"({len(unused)} unused in total) — not a plain Qwen3 / Qwen3-MoE / Llama / Gemma 3 "
                              "checkpoint?")
    model = nnx.merge(graphdef, loaded)
    model.source = str(path_or_hub_id)
    # PEFT names an adapter by the module path in the HF model: the multimodal Gemma's language model is
    # model.language_model.layers in transformers 5
    model.hf_layers = "model.layers" if prefix == "model." else "model.language_model.layers"
    return model
