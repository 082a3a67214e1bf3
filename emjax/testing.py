"""Tiny random Hugging Face checkpoints for tests, the demo and benchmarks (no hub access anywhere)."""

from __future__ import annotations

import os
from pathlib import Path

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=24, tie_word_embeddings=False, max_position_embeddings=512,
            rms_norm_eps=1e-6)


# Qwen3-MoE: every layer routed, 8 experts of width 32, top 2 (the released models: 128 experts, top 8, renormalised)
TINY_MOE = dict(TINY, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                decoder_sparse_step=1, mlp_only_layers=[])


def tiny_hf_model(seed: int = 0, noise: float = 0.05, moe: bool = False, **overrides):
    """A transformers ``Qwen3ForCausalLM`` (``moe``: ``Qwen3MoeForCausalLM``) with random weights (norm weights
    perturbed too, so they matter)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    kw = dict(TINY_MOE if moe else TINY, **overrides)
    torch.manual_seed(seed)
    model = (Qwen3MoeForCausalLM(Qwen3MoeConfig(**kw)) if moe else Qwen3ForCausalLM(Qwen3Config(**kw))).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    return model


def tiny_hf_checkpoint(path: str | os.PathLike, *, seed: int = 0, max_shard_size: str | None = None,
                       moe: bool = False, **overrides) -> Path:
    """Save a tiny random Qwen3 (or Qwen3-MoE) with ``save_pretrained`` (optionally sharded) and return its
    directory. transformers writes MoE experts in the hub's per-expert layout (``mlp.experts.{e}.gate_proj``)."""
    model = tiny_hf_model(seed=seed, moe=moe, **overrides)
    path = Path(path)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


def hf_config(cfg):
    """transformers' ``Qwen3Config`` for an emjax ``Qwen3Config`` (benchmarks build the same model on both sides)."""
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                       num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                       num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
                       tie_word_embeddings=cfg.tie_word_embeddings, rms_norm_eps=cfg.rms_norm_eps)
