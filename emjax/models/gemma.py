"""Gemma 3 (transformers' ``Gemma3ForCausalLM``, model_type "gemma3_text", and the language model of
``Gemma3ForConditionalGeneration``, model_type "gemma3"): the cross-family grid's Gemma.

Why no second decoder: a Gemma 3 layer is the Qwen3 layer (per-head q/k RMSNorm before RoPE, GQA) with switches —
RMSNorm scaling by (1 + w) in fp32, norms on the attention and MLP outputs as well as their inputs, a GELU-tanh
MLP, embeddings × √hidden, scores × query_pre_attn_scalar^-½, and five of every six layers attending to a sliding
window with their own RoPE θ (10,000, unscaled) while the global layers use θ 1e6 with linear scaling (×8 from 4B
up). Each is a ``Qwen3Config`` field, so training, both KV caches, sharding, packs, Muon, the penalty and PEFT export
run unchanged. The multimodal checkpoints (4B, 12B, 27B) load their language model only; images are not supported.
``attn_logit_softcapping`` is ignored, as transformers' Gemma 3 attention ignores it, and so is the multimodal
model's ``final_logit_softcapping`` (transformers applies it in ``Gemma3ForCausalLM`` only); released configs have
null for both.
"""

from __future__ import annotations

import os
from typing import Any

from emjax.models.qwen3 import ROPE_SCALING_KEYS, Qwen3Config, decoder_config, read_hf_config

MODEL_TYPES = ("gemma3_text", "gemma3")
ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


def _gemma3(hidden, layers, heads, kv, intermediate, *, head_dim=256, window=1024, vocab=262_208,
            query_pre_attn_scalar=256, scaling=8.0, max_pos=131_072) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_layers=layers, num_heads=heads,
        num_kv_heads=kv, head_dim=head_dim, rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        max_position_embeddings=max_pos, norm_plus_one=True, sandwich_norm=True, embed_scale=hidden ** 0.5,
        hidden_act="gelu_tanh", query_scale=query_pre_attn_scalar ** -0.5, sliding_window=window,
        sliding_layers=tuple(bool((i + 1) % 6) for i in range(layers)), rope_local_theta=10_000.0,
        rope_scaling=(("rope_type", "linear"), ("factor", scaling)) if scaling else ())


def gemma3_1b() -> Qwen3Config:
    return _gemma3(1152, 26, 4, 1, 6912, window=512, vocab=262_144, scaling=0.0, max_pos=32_768)


def gemma3_4b() -> Qwen3Config:
    return _gemma3(2560, 34, 8, 4, 10240)


def gemma3_12b() -> Qwen3Config:
    return _gemma3(3840, 48, 16, 8, 15360)


def gemma3_27b() -> Qwen3Config:
    return _gemma3(5376, 62, 32, 16, 21504, head_dim=128, query_pre_attn_scalar=168)


SIZES = {"gemma3-1b": gemma3_1b, "gemma3-4b": gemma3_4b, "gemma3-12b": gemma3_12b, "gemma3-27b": gemma3_27b}


def _rope(config: dict[str, Any], where: str) -> dict[str, Any]:
    """Global (θ, scaling) and local θ from the hub form (``rope_theta``, ``rope_scaling``, ``rope_local_base_freq``)
    or transformers 5's ``rope_parameters`` per layer type."""
    params = config.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full, local = dict(params.get("full_attention") or {}), dict(params.get("sliding_attention") or {})
    else:
        full = {**(config.get("rope_scaling") or {}), "rope_theta": config.get("rope_theta", 1_000_000.0)}
        local = {"rope_type": "default", "rope_theta": config.get("rope_local_base_freq", 10_000.0)}
    if local.get("rope_type", "default") != "default":
        raise ValueError(f"{where}: rope_parameters.sliding_attention.rope_type {local['rope_type']!r} is not "
                         f"supported (only 'default')")
    full.setdefault("rope_theta", 1_000_000.0)
    rope_type = full.get("rope_type", full.get("type", "default"))
    if rope_type not in ("default", *ROPE_SCALING_KEYS):
        raise ValueError(f"{where}: rope_scaling.rope_type {rope_type!r} is not supported (supported: 'default', "
                         f"{', '.join(repr(k) for k in ROPE_SCALING_KEYS)})")
    return {"rope_parameters": full, "rope_local_theta": float(local.get("rope_theta", 10_000.0))}


def config_from_hf(config: dict[str, Any] | str | os.PathLike, where: str = "config") -> Qwen3Config:
    """From a Gemma 3 ``config.json`` (dict or path); a multimodal ("gemma3") config's ``text_config``."""
    config, where = read_hf_config(config, where)
    mt = config.get("model_type")
    if mt not in MODEL_TYPES:
        raise ValueError(f"{where}: model_type {mt!r} is not a Gemma 3 model (expected one of {MODEL_TYPES})")
    multimodal = mt == "gemma3"
    if multimodal:
        if not isinstance(config.get("text_config"), dict):
            raise KeyError(f"{where}: missing key 'text_config' (a multimodal Gemma 3 config)")
        config, where = config["text_config"], f"{where}: text_config"
    config = dict({"vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                   "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "rms_norm_eps": 1e-6,
                   "max_position_embeddings": 131_072, "tie_word_embeddings": True, "sliding_window": 4096,
                   "query_pre_attn_scalar": 256}, **config)  # Gemma3TextConfig's defaults
    if config.get("use_bidirectional_attention"):
        raise ValueError(f"{where}: use_bidirectional_attention=true (EmbeddingGemma) is not supported")
    act = config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ACTIVATIONS:
        raise ValueError(f"{where}: hidden_activation {act!r} is not supported (supported: {sorted(ACTIVATIONS)})")
    L = int(config["num_hidden_layers"])
    types = config.get("layer_types")
    if types is None:
        pattern = int(config.get("sliding_window_pattern", 6))
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(L)]
    bad = [t for t in types if t not in ("sliding_attention", "full_attention")]
    if len(types) != L or bad:
        raise ValueError(f"{where}: layer_types must list {L} of 'sliding_attention' / 'full_attention' (got "
                         f"{len(types)}{', e.g. ' + repr(bad[0]) if bad else ''})")
    rope = _rope(config, where)
    base = {k: v for k, v in config.items() if k not in ("rope_scaling", "rope_theta", "hidden_act")}
    return decoder_config(
        dict(base, rope_parameters=rope["rope_parameters"]), where,
        norm_plus_one=True, sandwich_norm=True, embed_scale=float(config["hidden_size"]) ** 0.5,
        hidden_act=ACTIVATIONS[act], query_scale=float(config["query_pre_attn_scalar"]) ** -0.5,
        sliding_window=int(config["sliding_window"]), sliding_layers=tuple(t == "sliding_attention" for t in types),
        rope_local_theta=rope["rope_local_theta"],
        # transformers applies final_logit_softcapping in Gemma3ForCausalLM only, not in the multimodal model
        final_softcap=0.0 if multimodal else float(config.get("final_logit_softcapping") or 0.0))
