"""Llama 3.x (3.1, 3.2, 3.3; transformers' ``LlamaForCausalLM``, model_type "llama"): the cross-family grid's Llama.

Why no second decoder: a Llama 3 layer is a Qwen3 layer without the per-head q/k RMSNorm, with RoPE's "llama3"
frequency scaling and RMSNorm eps 1e-5 — the same weight names, the same LoRA targets and PEFT keys. So a Llama
checkpoint becomes ``Qwen3ForCausalLM`` with ``qk_norm=False`` and ``rope_scaling`` set, and everything built on that
class (scanned training, both KV caches, sharding rules, packs, Muon, the penalty) runs unchanged. Its chat format
and tokenizer are ``emjax.tokenizer.Llama3Chat``.
"""

from __future__ import annotations

import os
from typing import Any

from emjax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM, decoder_config, read_hf_config

LlamaForCausalLM = Qwen3ForCausalLM  # one decoder class; the family is in the config

MODEL_TYPES = ("llama",)


def _llama3(hidden, layers, heads, intermediate, tied, factor, head_dim=128) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=128_256, hidden_size=hidden, intermediate_size=intermediate, num_layers=layers, num_heads=heads,
        num_kv_heads=8, head_dim=head_dim, rope_theta=500_000.0, rms_norm_eps=1e-5, tie_word_embeddings=tied,
        max_position_embeddings=131_072, qk_norm=False,
        rope_scaling=(("rope_type", "llama3"), ("factor", factor), ("low_freq_factor", 1.0),
                      ("high_freq_factor", 4.0), ("original_max_position_embeddings", 8192.0)))


def llama3_2_1b() -> Qwen3Config:
    return _llama3(2048, 16, 32, 8192, True, 32.0, head_dim=64)


def llama3_2_3b() -> Qwen3Config:
    return _llama3(3072, 28, 24, 8192, True, 32.0)


def llama3_1_8b() -> Qwen3Config:
    return _llama3(4096, 32, 32, 14336, False, 8.0)


def llama3_3_70b() -> Qwen3Config:
    return _llama3(8192, 80, 64, 28672, False, 8.0)


SIZES = {"llama3.2-1b": llama3_2_1b, "llama3.2-3b": llama3_2_3b, "llama3.1-8b": llama3_1_8b,
         "llama3.3-70b": llama3_3_70b}


def config_from_hf(config: dict[str, Any] | str | os.PathLike, where: str = "config") -> Qwen3Config:
    """From a Llama ``config.json`` (dict or path): rope_scaling "llama3" (3.1+) or none (Llama 3.0)."""
    config, where = read_hf_config(config, where)
    mt = config.get("model_type")
    if mt not in MODEL_TYPES:
        raise ValueError(f"{where}: model_type {mt!r} is not a Llama model (expected 'llama')")
    return decoder_config(dict({"rms_norm_eps": 1e-5, "max_position_embeddings": 131_072}, **config), where,
                          qk_norm=False)
