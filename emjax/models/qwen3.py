"""Qwen3 decoder (dense, and Qwen3-MoE's routed experts) in Flax NNX, layer-stacked and scanned, with stacked LoRA
and a static KV cache.

Parameters are stored per *role* stacked over layers (``blocks/q_proj/kernel`` is (L, in, out) in JAX layout), so
``jax.lax.scan`` runs one compiled layer body (compile time flat in depth) and LoRA factors of one projection type
form one batched array. Numerics follow transformers' ``Qwen3ForCausalLM`` (RMSNorm variance in fp32, per-head
q/k norm before split-halves RoPE, fp32 softmax); Qwen3-MoE follows ``Qwen3MoeForCausalLM`` (softmax router in
fp32, top-k, optional renormalisation, routing weights cast back to the compute dtype). Experts are stacked too,
``blocks/gate_proj/kernel`` (L, E, in, out), with one LoRA pair per expert (L, E, in, r) — PEFT's per-expert
``mlp.experts.{e}.gate_proj`` adapters — and tokens reach their experts through ``jax.lax.ragged_dot``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from flax import nnx

from emjax.lora import LoraConfig, lora_matmul
from emjax.sharding import DecodeLayout, batch_axes, decode_layout, traced_mesh

# ---------------------------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 128
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 40_960
    # Qwen3-MoE: every layer's MLP is num_experts routed experts of width moe_intermediate_size, of which each token
    # uses num_experts_per_tok (0 experts: dense)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    # family switches (see emjax/models/llama.py): Qwen3's per-head RMSNorm of q and k before RoPE, and RoPE frequency
    # scaling as sorted (key, value) pairs of HF's ``rope_scaling`` (() = none; rope_type "linear" or "llama3")
    qk_norm: bool = True
    rope_scaling: tuple = ()
    # Gemma 3 (see emjax/models/gemma.py): RMSNorm scaling by (1 + w) in fp32; extra norms on the attention and MLP
    # outputs; embeddings × embed_scale (√hidden); GELU-tanh MLP; scores × query_scale (0: 1/√head_dim); layers marked
    # in sliding_layers attend to the last sliding_window positions only, with RoPE θ rope_local_theta (unscaled);
    # tanh soft-capping of the final logits (0: none)
    norm_plus_one: bool = False
    sandwich_norm: bool = False
    embed_scale: float = 0.0
    hidden_act: str = "silu"
    query_scale: float = 0.0
    sliding_window: int = 0
    sliding_layers: tuple = ()
    rope_local_theta: float = 10_000.0
    final_softcap: float = 0.0

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.num_experts and not (0 < self.num_experts_per_tok <= self.num_experts
                                     and self.moe_intermediate_size > 0):
            raise ValueError(f"num_experts={self.num_experts} needs 0 < num_experts_per_tok <= num_experts (got "
                             f"{self.num_experts_per_tok}) and moe_intermediate_size > 0 (got "
                             f"{self.moe_intermediate_size})")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r}: use one of {sorted(ACTIVATIONS)}")
        if self.sliding_layers and (len(self.sliding_layers) != self.num_layers or self.sliding_window <= 0):
            raise ValueError(f"sliding_layers needs one flag per layer ({self.num_layers}, got "
                             f"{len(self.sliding_layers)}) and sliding_window > 0 (got {self.sliding_window})")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def _count(self, experts: int, *, embed: bool = True, norms: bool = True) -> int:
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
        mlp = (d * self.num_experts + experts * 3 * d * self.moe_intermediate_size) if self.is_moe else 3 * d * f
        norm = (2 * hd if self.qk_norm else 0) + (4 if self.sandwich_norm else 2) * d
        head = self.vocab_size * d  # the LM head's matmul: the embedding again if tied
        lookup = self.vocab_size * d if embed and not self.tie_word_embeddings else 0
        return lookup + head + self.num_layers * (attn + mlp + (norm if norms else 0)) + (d if norms else 0)

    @property
    def num_params(self) -> int:
        return self._count(self.num_experts)

    @property
    def num_active_params(self) -> int:
        """Parameters a token passes through (the router and its top-k experts): what FLOP counts use."""
        return self._count(self.num_experts_per_tok)

    @property
    def num_matmul_params(self) -> int:
        """Weights a token is multiplied by (the active ones, the LM head included; no embedding lookup, no norm
        scales): the N in FLOP counts."""
        return self._count(self.num_experts_per_tok, embed=False, norms=False)


def _sized(hidden, layers, heads, intermediate, tied, **kw) -> Qwen3Config:
    return Qwen3Config(vocab_size=151_936, hidden_size=hidden, intermediate_size=intermediate, num_layers=layers,
                       num_heads=heads, num_kv_heads=8, head_dim=128, tie_word_embeddings=tied, **kw)


def qwen3_0_6b() -> Qwen3Config:
    return _sized(1024, 28, 16, 3072, True)


def qwen3_1_7b() -> Qwen3Config:
    return _sized(2048, 28, 16, 6144, True)


def qwen3_4b(*, instruct_2507: bool = False) -> Qwen3Config:
    return _sized(2560, 36, 32, 9728, True, rope_theta=5_000_000.0 if instruct_2507 else 1_000_000.0)


def qwen3_8b() -> Qwen3Config:
    return _sized(4096, 36, 32, 12288, False)


def qwen3_14b() -> Qwen3Config:
    return _sized(5120, 40, 40, 17408, False)


def qwen3_32b() -> Qwen3Config:
    return _sized(5120, 64, 64, 25600, False)


def _moe(hidden, layers, heads, intermediate, moe_intermediate) -> Qwen3Config:
    return Qwen3Config(vocab_size=151_936, hidden_size=hidden, intermediate_size=intermediate, num_layers=layers,
                       num_heads=heads, num_kv_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                       moe_intermediate_size=moe_intermediate, norm_topk_prob=True)


def qwen3_30b_a3b() -> Qwen3Config:
    return _moe(2048, 48, 32, 6144, 768)


def qwen3_235b_a22b() -> Qwen3Config:
    return _moe(4096, 94, 64, 12288, 1536)


SIZES = {"0.6b": qwen3_0_6b, "1.7b": qwen3_1_7b, "4b": qwen3_4b, "8b": qwen3_8b, "14b": qwen3_14b, "32b": qwen3_32b,
         "30b-a3b": qwen3_30b_a3b, "235b-a22b": qwen3_235b_a22b}


def config_from_hf(config: dict[str, Any] | str | os.PathLike, where: str = "config") -> Qwen3Config:
    """From a Hugging Face ``config.json`` (dict or path); reads θ from top-level ``rope_theta`` (hub files) or
    ``rope_parameters`` (transformers 5). ``where`` names an already-read dict's file in error messages."""
    config, where = read_hf_config(config, where)
    mt = config.get("model_type")
    if mt not in ("qwen3", "qwen3_moe"):
        raise ValueError(f"{where}: model_type {mt!r} is not supported (supported: 'qwen3', 'qwen3_moe')")
    moe = {}
    if mt == "qwen3_moe":
        if "num_experts" not in config and "num_local_experts" in config:  # transformers 5 writes this name
            config = dict(config, num_experts=config["num_local_experts"])
        for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
            if key not in config:
                raise KeyError(f"{where}: missing key {key!r}")
        # the released Qwen3-MoE models route every layer; dense layers in between would break the layer stack
        if int(config.get("decoder_sparse_step", 1)) != 1 or config.get("mlp_only_layers"):
            raise ValueError(f"{where}: decoder_sparse_step={config.get('decoder_sparse_step')} / mlp_only_layers="
                             f"{config.get('mlp_only_layers')} (dense layers between MoE layers) is not supported; "
                             f"every layer must be routed (decoder_sparse_step 1, mlp_only_layers [])")
        moe = dict(num_experts=int(config["num_experts"]), num_experts_per_tok=int(config["num_experts_per_tok"]),
                   moe_intermediate_size=int(config["moe_intermediate_size"]),
                   norm_topk_prob=bool(config.get("norm_topk_prob", False)))
    return decoder_config(config, where, **moe)


def read_hf_config(config: dict[str, Any] | str | os.PathLike, where: str = "config") -> tuple[dict[str, Any], str]:
    """(``config.json`` as a dict, where it came from: the file's path, for error messages; ``where`` for a dict)."""
    if isinstance(config, dict):
        return config, where
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    try:
        return json.loads(path.read_text()), str(path)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


ROPE_SCALING_KEYS = {"linear": ("factor",),
                     "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def rope_from_hf(config: dict[str, Any], where: str) -> tuple[float, tuple]:
    """(θ, scaling pairs) from top-level ``rope_theta`` / ``rope_scaling`` (hub files) or ``rope_parameters``
    (transformers 5, which keeps the scaling keys there too)."""
    params = {**(config.get("rope_scaling") or {}), **(config.get("rope_parameters") or {})}
    theta = float(params.get("rope_theta", config.get("rope_theta", 1_000_000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in ("default", None):
        return theta, ()
    if rope_type not in ROPE_SCALING_KEYS:
        raise ValueError(f"{where}: rope_scaling.rope_type {rope_type!r} is not supported (supported: 'default', "
                         f"{', '.join(repr(k) for k in ROPE_SCALING_KEYS)})")
    missing = [k for k in ROPE_SCALING_KEYS[rope_type] if k not in params]
    if missing:
        raise KeyError(f"{where}: rope_scaling of type {rope_type!r} is missing {missing[0]!r}")
    return theta, (("rope_type", rope_type),) + tuple((k, float(params[k])) for k in ROPE_SCALING_KEYS[rope_type])


def decoder_config(config: dict[str, Any], where: str, **family) -> Qwen3Config:
    """The fields every supported family shares, read from an HF config dict; ``family`` sets the rest."""
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in config:
            raise KeyError(f"{where}: missing key {key!r}")
    theta, scaling = rope_from_hf(config, where)
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise ValueError(f"{where}: {key}=true is not supported (no supported family has biases)")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{where}: hidden_act {act!r} is not supported (only 'silu')")
    heads = config["num_attention_heads"]
    return Qwen3Config(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], num_layers=config["num_hidden_layers"], num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads, rope_theta=theta, rope_scaling=scaling,
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_position_embeddings=int(config.get("max_position_embeddings", 40_960)), **family,
    )


# ---------------------------------------------------------------------------------------------------------------
# Modules


class StackedLinear(nnx.Module):
    """L stacked (in, out) kernels, frozen, plus optional stacked LoRA factors A (L, in, r), B (L, r, out); with
    ``experts`` E, an (E, in, out) stack per layer and one LoRA pair per expert: (L, E, in, r), (L, E, r, out)."""

    def __init__(self, n_layers: int, d_in: int, d_out: int, *, lora: LoraConfig | None, param_dtype, rngs,
                 experts: int = 0):
        init = nnx.initializers.normal(0.02)
        lead = (n_layers, experts) if experts else (n_layers,)
        self.kernel = nnx.Param(init(rngs.params(), (*lead, d_in, d_out), param_dtype))
        if lora is not None:
            bound = 1.0 / math.sqrt(d_in)  # PEFT: kaiming_uniform(a=√5) on (r, in) == U(±1/√in)
            a = jax.random.uniform(rngs.params(), (*lead, d_in, lora.rank), jnp.float32, -bound, bound)
            self.lora_a = nnx.LoRAParam(lora.mask_layers(a))  # A = B = 0 where lora.layers leaves a layer alone
            self.lora_b = nnx.LoRAParam(jnp.zeros((*lead, lora.rank, d_out), jnp.float32))
        else:
            self.lora_a = None
            self.lora_b = None


ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
NORMS = ("input_norm", "post_norm", "q_norm", "k_norm", "attn_out_norm", "mlp_out_norm")
ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True)}
# Activation rematerialisation of the scanned layer body (training): without it the backward keeps every layer's
# activations, the (B, H, T, T) attention probabilities included; a Qwen3-8B batch of 16 × 2048 tokens would need
# over a TB (bench/memory.py). "full" keeps only each layer's input and recomputes the layer's forward in the
# backward (up to a third more compute); "dots" also keeps the projections' outputs and recomputes attention and the
# elementwise ops.
REMAT = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Qwen3Blocks(nnx.Module):
    def __init__(self, cfg: Qwen3Config, *, lora: LoraConfig | None, param_dtype, rngs):
        L, d, hd = cfg.num_layers, cfg.hidden_size, cfg.head_dim
        f = cfg.moe_intermediate_size if cfg.is_moe else cfg.intermediate_size
        shapes = {
            "q_proj": (d, cfg.num_heads * hd), "k_proj": (d, cfg.num_kv_heads * hd),
            "v_proj": (d, cfg.num_kv_heads * hd), "o_proj": (cfg.num_heads * hd, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d),
        }
        targeted = set(lora.module_names()) if lora else set()
        for name, (din, dout) in shapes.items():
            experts = cfg.num_experts if name in MLP else 0
            setattr(self, name, StackedLinear(L, din, dout, lora=lora if name in targeted else None,
                                              param_dtype=param_dtype, rngs=rngs, experts=experts))
        # Qwen3-MoE's router (HF ``mlp.gate``, a (E, d) linear; here (L, d, E)); frozen, never adapted
        self.router = (nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (L, d, cfg.num_experts), param_dtype))
                       if cfg.is_moe else None)
        one = 0.0 if cfg.norm_plus_one else 1.0  # a no-op norm weight: Gemma's norms scale by (1 + w)
        self.input_norm = nnx.Param(jnp.full((L, d), one, param_dtype))
        self.post_norm = nnx.Param(jnp.full((L, d), one, param_dtype))
        # Gemma 3's norms of the attention output (HF post_attention_layernorm) and of the MLP output
        self.attn_out_norm = nnx.Param(jnp.full((L, d), one, param_dtype)) if cfg.sandwich_norm else None
        self.mlp_out_norm = nnx.Param(jnp.full((L, d), one, param_dtype)) if cfg.sandwich_norm else None
        self.q_norm = nnx.Param(jnp.full((L, hd), one, param_dtype)) if cfg.qk_norm else None
        self.k_norm = nnx.Param(jnp.full((L, hd), one, param_dtype)) if cfg.qk_norm else None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Static-shape cache: keys (B, Hkv, hd, S) and values (B, Hkv, S, hd) — the layouts the two attention products
    read as plain matmuls — and the number of valid positions per row (B,).

    Two forms, picked by the sampler: one array per layer (tuples; the cached forward unrolls its layers, so a
    decode step updates each in place and reads no weights out of the stack: the fastest on a CPU), or ``stacked``
    (arrays with a leading layer axis; the cached forward scans one layer body, so compile time stays flat in depth:
    on an H100 the unrolled 28-layer decode step of Qwen3-0.6B was still compiling after 150 s)."""

    k: tuple | jax.Array
    v: tuple | jax.Array
    lengths: jax.Array

    @classmethod
    def init(cls, cfg: Qwen3Config, batch: int, max_len: int, dtype=jnp.float32, stacked: bool = False) -> "KVCache":
        k_shape = (batch, cfg.num_kv_heads, cfg.head_dim, max_len)
        v_shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        lengths = jnp.zeros((batch,), jnp.int32)
        if stacked:
            L = cfg.num_layers
            return cls(jnp.zeros((L, *k_shape), dtype), jnp.zeros((L, *v_shape), dtype), lengths)
        return cls(tuple(jnp.zeros(k_shape, dtype) for _ in range(cfg.num_layers)),
                   tuple(jnp.zeros(v_shape, dtype) for _ in range(cfg.num_layers)), lengths)

    @property
    def stacked(self) -> bool:
        return not isinstance(self.k, tuple)

    @property
    def max_len(self) -> int:
        return self.v.shape[3] if self.stacked else self.v[0].shape[2]


class Qwen3ForCausalLM(nnx.Module):
    """``model(tokens[B, T]) -> logits[B, T, V]`` (fp32), optionally with positions, a padding mask, packing
    segment ids, or a KV cache (then returns ``(logits, cache)``)."""

    def __init__(self, cfg: Qwen3Config, *, lora: LoraConfig | None = None, param_dtype=jnp.float32,
                 dtype=None, rngs: nnx.Rngs | None = None, embed_init_std: float = 0.02):
        rngs = rngs or nnx.Rngs(0)
        self.config = cfg
        self.lora_config = lora
        self.dtype = jnp.dtype(dtype or param_dtype)  # compute dtype
        self.source = None
        self.hf_layers = "model.layers"  # the layers' module path in the HF model (PEFT's adapter names)
        self.embed = nnx.Param(nnx.initializers.normal(embed_init_std)(
            rngs.params(), (cfg.vocab_size, cfg.hidden_size), param_dtype))
        self.blocks = Qwen3Blocks(cfg, lora=lora, param_dtype=param_dtype, rngs=rngs)
        self.final_norm = nnx.Param(jnp.full((cfg.hidden_size,), 0.0 if cfg.norm_plus_one else 1.0, param_dtype))
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (cfg.hidden_size,
                                                                                   cfg.vocab_size), param_dtype))

    # -- public API ------------------------------------------------------------------------------------------------
    def __call__(self, tokens, *, positions=None, attention_mask=None, segment_ids=None, cache: KVCache | None = None,
                 return_hidden: bool = False, remat: str = "none", attn_chunk: int = 0):
        h, new_cache = self.hidden_states(tokens, positions=positions, attention_mask=attention_mask,
                                          segment_ids=segment_ids, cache=cache, remat=remat, attn_chunk=attn_chunk)
        out = h if return_hidden else self.logits(h)
        return out if cache is None else (out, new_cache)

    def logits(self, h, head=None):
        """Final-norm'd hidden states (..., D) -> fp32 logits (..., V). ``head``: a precomputed ``head_matrix()``
        (the sampler makes it once per call)."""
        if head is not None:
            out = jnp.dot(h, head, preferred_element_type=jnp.float32)
        elif self.lm_head is None:
            w = self.embed[...].astype(self.dtype)
            out = jnp.einsum("...d,vd->...v", h, w, preferred_element_type=jnp.float32)
        else:
            out = jnp.einsum("...d,dv->...v", h, self.lm_head[...].astype(self.dtype),
                             preferred_element_type=jnp.float32)
        cap = self.config.final_softcap
        return out if not cap else jnp.tanh(out / cap) * cap

    def head_matrix(self):
        """The output projection as a (D, V) matrix in the compute dtype (tied: the embedding transposed, a copy)."""
        w = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        return w.astype(self.dtype)

    def hidden_states(self, tokens, *, positions=None, attention_mask=None, segment_ids=None, cache=None,
                      layers: list | None = None, remat: str = "none", attn_chunk: int = 0):
        """Final-norm'd hidden states and the updated cache. ``layers`` (from ``layer_list()``, with a per-layer
        cache only) lets a decode loop slice the stacked weights once instead of once per step. ``remat`` (one of
        ``REMAT``) and ``attn_chunk`` (> 0: queries this many positions at a time, each chunk's scores recomputed
        in the backward, so no (B, H, T, T) array is kept) trade compute for memory; no cache only."""
        cfg = self.config
        if remat not in REMAT:
            raise ValueError(f"remat {remat!r}: use one of {sorted(REMAT)}")
        B, T = tokens.shape
        h = jnp.take(self.embed[...], tokens, axis=0, mode="clip")
        if cfg.embed_scale:  # Gemma: × √hidden rounded to the weights' dtype (55.4 -> 55.5 in bf16), as HF does
            h = h * jnp.asarray(cfg.embed_scale, h.dtype)
        h = h.astype(self.dtype)
        # sampling on an FSDP mesh (emjax.sharding.DecodeLayout): the embedded rows split as the cache's, by way of
        # whole rows (from the embedding's layout XLA has no efficient way there, and warns); a decode step's layers
        # then move activations, not weights
        lay = decode_layout(h) if cache is not None else DecodeLayout()
        h = lay.split(lay.wide(h))

        if cache is None:
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
            q_pos = positions
            causal = jnp.arange(T)[:, None] >= jnp.arange(T)[None, :]
            mask = jnp.broadcast_to(causal, (B, T, T))
            q_idx, k_idx = jnp.arange(T)[None, :, None], jnp.arange(T)[None, None, :]
            if segment_ids is not None:
                mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0)
            elif attention_mask is not None:
                mask = mask & (attention_mask[:, None, :] > 0)
            start = None
        else:
            if segment_ids is not None:
                raise ValueError("segment_ids (packing) cannot be combined with a KV cache")
            start = cache.lengths
            q_pos = start[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
            if positions is None:
                positions = q_pos
            n_new = T if attention_mask is None else jnp.sum(attention_mask > 0, axis=1).astype(jnp.int32)
            new_lengths = start + n_new
            k_idx = jnp.arange(cache.max_len)
            # Right-padded rows: valid keys are a prefix [0, new_length); causal on absolute cache positions.
            mask = (k_idx[None, None, :] <= q_pos[:, :, None]) & (k_idx[None, None, :] < new_lengths[:, None, None])
            q_idx, k_idx = q_pos[:, :, None], k_idx[None, None, :]

        cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        if cfg.sliding_layers:
            # Gemma 3's local layers: keys at most sliding_window - 1 positions back (HF: kv > q - window, on
            # absolute indices), RoPE with their own θ. The window is a bias a local layer (flag 1) adds to the
            # masked scores: one bias for all layers and a scalar each, so the scanned backward keeps no per-layer
            # (B, T, S) mask (picking one of two stacked masks per layer made it keep one)
            mask = (mask, jnp.where(q_idx - k_idx < cfg.sliding_window, 0.0, jnp.finfo(jnp.float32).min))
            cos_l, sin_l = rope_tables(positions, cfg.head_dim, cfg.rope_local_theta)
            cos, sin = jnp.stack([cos, cos_l]), jnp.stack([sin, sin_l])
        scale = self.lora_config.scale if self.lora_config else 0.0
        body = _make_layer_fn(cfg, self.dtype, scale, mask, cos, sin, start, attn_chunk if cache is None else 0,
                              lay if T == 1 else DecodeLayout())

        if cache is None:
            # training/scoring: one scanned layer body, compile time flat in depth
            fn = lambda c, p: body(c, p, None)[0]  # noqa: E731
            if REMAT[remat] is not None:
                fn = jax.checkpoint(fn, policy=REMAT[remat], prevent_cse=False)  # the scan already keeps CSE apart
            h, _ = jax.lax.scan(lambda c, p: (fn(c, p), None), h, self._layer_params())
            new_cache = None
        elif cache.stacked:
            # stacked cache: one scanned layer body too; layer i writes its new keys and values into the stacked
            # cache (the loop carry, updated in place) and attends over its slice
            def scan_body(carry, xs):
                h, k_all, v_all = carry
                p, i = xs
                h, (k_all, v_all) = body(h, p, (k_all, v_all, i))
                return (h, k_all, v_all), None

            xs = (self._layer_params(), jnp.arange(cfg.num_layers))
            (h, k_all, v_all), _ = jax.lax.scan(scan_body, (h, cache.k, cache.v), xs)
            new_cache = KVCache(k_all, v_all, new_lengths)
        else:
            # per-layer cache: layers unrolled over per-layer weights and caches, so a decode step neither copies
            # each layer's weights out of the stack (given ``layers``) nor rebuilds a stacked cache
            layers = self.layer_list() if layers is None else layers
            ks, vs = [], []
            for p, kc, vc in zip(layers, cache.k, cache.v, strict=True):
                h, (kc, vc) = body(h, p, (kc, vc))
                ks.append(kc)
                vs.append(vc)
            new_cache = KVCache(tuple(ks), tuple(vs), new_lengths)
        h = norm_fn(cfg)(h, self.final_norm[...], cfg.rms_norm_eps)
        return h, new_cache

    def layer_list(self) -> list[dict]:
        """The stacked layer parameters split into one dict per layer (what a cached forward iterates over)."""
        p = self._layer_params()
        return [jax.tree_util.tree_map(lambda x, i=i: x[i], p) for i in range(self.config.num_layers)]

    def _layer_params(self) -> dict:
        b = self.blocks
        p = {n: getattr(b, n)[...] for n in NORMS if getattr(b, n) is not None}
        if self.config.sliding_layers:
            p["sliding"] = jnp.asarray(self.config.sliding_layers, jnp.int32)  # which mask and RoPE tables
        if b.router is not None:
            p["router"] = b.router[...]
        for name in ATTN + MLP:
            lin = getattr(b, name)
            p[name] = (lin.kernel[...], None if lin.lora_a is None else lin.lora_a[...],
                       None if lin.lora_b is None else lin.lora_b[...])
        return p


# ---------------------------------------------------------------------------------------------------------------
# Pure layer math


def _rms_norm(x, w, eps):
    dtype = x.dtype
    xf = x.astype(jnp.float32)
    xf = xf * checkpoint_name(jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps), "rms_inv")
    return w.astype(dtype) * xf.astype(dtype)


def rms_norm(x, w, eps):
    """transformers' Qwen3RMSNorm: variance in fp32, normalised x cast back to the input dtype, then × weight.

    Below fp32 the backward keeps x and recomputes its fp32 copy, which autodiff would otherwise keep for every
    layer when it is not rematerialised: half the bytes for each norm's residual. The gradient is the same bit for
    bit, except where XLA's excess precision let autodiff keep a bf16 input's unrounded fp32 source instead."""
    if x.dtype == jnp.float32:
        return _rms_norm(x, w, eps)
    return jax.checkpoint(_rms_norm, static_argnums=(2,),
                          policy=jax.checkpoint_policies.save_only_these_names("rms_inv"))(x, w, eps)


def _rms_norm_plus_one(x, w, eps):
    dtype = x.dtype
    xf = x.astype(jnp.float32)
    xf = xf * checkpoint_name(jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps), "rms_inv")
    return (xf * (1.0 + w.astype(jnp.float32))).astype(dtype)


def rms_norm_plus_one(x, w, eps):
    """transformers' Gemma3RMSNorm: normalised in fp32, × (1 + w) in fp32, then cast (Qwen3 casts before × w)."""
    if x.dtype == jnp.float32:
        return _rms_norm_plus_one(x, w, eps)
    return jax.checkpoint(_rms_norm_plus_one, static_argnums=(2,),
                          policy=jax.checkpoint_policies.save_only_these_names("rms_inv"))(x, w, eps)


def norm_fn(cfg: Qwen3Config):
    return rms_norm_plus_one if cfg.norm_plus_one else rms_norm


def rope_inv_freq(head_dim, theta, scaling: tuple = ()):
    """RoPE inverse frequencies in fp32, with transformers' "linear" or "llama3" scaling (``Qwen3Config.rope_scaling``).
    Llama 3.1+ stretches the low frequencies by ``factor``, keeps the high ones and interpolates between."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    s = dict(scaling)
    if s.get("rope_type") == "linear":
        return inv_freq / s["factor"]
    if s.get("rope_type") == "llama3":
        factor, lo, hi, old = s["factor"], s["low_freq_factor"], s["high_freq_factor"], \
            s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > old / lo, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        return jnp.where(medium, smoothed, scaled)
    if s:
        raise ValueError(f"rope_scaling {scaling!r}: unknown rope_type")
    return inv_freq


def rope_tables(positions, head_dim, theta, scaling: tuple = ()):
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, T, hd/2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """Split-halves RoPE on (B, T, H, hd) with tables (B, T, hd)."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    c, s = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * c + rot * s


def _linear(x, params, scale):
    kernel, a, b = params
    if a is None:
        return x @ kernel.astype(x.dtype)
    return lora_matmul(x, kernel.astype(x.dtype), a.astype(x.dtype), b.astype(x.dtype), scale)


def _attend(q, k, v, mask, dtype, keys_transposed: bool = False, scale: float = 0.0, window=None):
    """Softmax attention with the G query heads of a KV head stacked as rows (both products plain batched matmuls):
    q (B, K, G, Tq, hd), k (B, K, S, hd) or, from the cache, (B, K, hd, S), v (B, K, S, hd), mask (B, Tq, S)
    -> (B, K, G, Tq, hd). ``window``: (flag, bias (B or 1, Tq, S)), bias 0 inside a sliding window and the fp32
    minimum outside, added to the scores of a layer whose flag is 1 (Gemma 3's local layers).

    Below fp32 the backward keeps the fp32 probabilities (the softmax's own residual) and recasts them, rather than
    also keeping their ``dtype`` copy for the second product: a third fewer bytes for the largest activation of a
    layer that is not rematerialised, the same gradient bit for bit."""
    def f(q, k, v, mask, window):
        return _attend_math(q, k, v, mask, dtype, keys_transposed, scale=scale, window=window)

    if jnp.dtype(dtype) != jnp.float32:
        f = jax.checkpoint(f, policy=jax.checkpoint_policies.save_only_these_names("attn_probs"))
    return f(q, k, v, mask, window)


def _attend_math(q, k, v, mask, dtype, keys_transposed, scale=0.0, window=None):
    B, K, G, Tq, hd = q.shape
    spec = "bkqd,bkds->bkqs" if keys_transposed else "bkqd,bksd->bkqs"
    scores = jnp.einsum(spec, q.reshape(B, K, G * Tq, hd), k, preferred_element_type=jnp.float32)
    scores = scores.reshape(B, K, G, Tq, -1) * (scale or 1.0 / math.sqrt(hd))
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    if window is not None:  # a key outside the window gets finfo.min or -inf (if masked already): exp 0 either way;
        flag, bias = window  # no row is all -inf, as every query's own key is inside its window
        scores = scores + flag.astype(jnp.float32) * bias[:, None, None]
    probs = checkpoint_name(jax.nn.softmax(scores, axis=-1), "attn_probs")
    out = jnp.einsum("bkqs,bksd->bkqd", probs.astype(dtype).reshape(B, K, G * Tq, -1), v)
    return out.reshape(B, K, G, Tq, hd)


def split_chunks(x, axis: int, size: int):
    """x with ``axis`` zero-padded to a multiple of ``size`` and split into chunks: (n_chunks, ..., size, ...), the
    chunk index first (what a ``lax.scan`` over chunks takes); the other axes, and their sharding, stay whole."""
    n = -(-x.shape[axis] // size)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n * size - x.shape[axis])
    x = jnp.pad(x, pad)
    return jnp.moveaxis(x.reshape(*x.shape[:axis], n, size, *x.shape[axis + 1:]), axis, 0)


def _attend_chunked(q, k, v, mask_chunks, dtype, chunk, window=None, **kw):
    """``_attend`` over query chunks in a scan whose body is rematerialised: every query row still sees all its keys
    (the same softmax), but only one chunk's (B, H, chunk, S) scores exist at a time, in the backward too.
    ``mask_chunks`` and the window's bias come split already (``split_chunks`` on axis 1), once for all layers: split
    inside a scanned layer, each layer's backward would keep its own copy."""
    B, K, G, T, hd = q.shape
    body = jax.checkpoint(lambda qc, mc, bc: _attend(qc, k, v, mc, dtype, window=None if bc is None else
                                                     (window[0], bc), **kw), prevent_cse=False)
    xs = (split_chunks(q, 3, chunk), mask_chunks, None if window is None else window[1])
    _, out = jax.lax.scan(lambda c, xs: (c, body(*xs)), None, xs)  # (n, B, K, G, chunk, hd)
    return jnp.moveaxis(out, 0, 3).reshape(B, K, G, -1, hd)[:, :, :, :T]


def _make_layer_fn(cfg: Qwen3Config, dtype, scale, mask, cos, sin, cache_start, attn_chunk=0,
                   lay: DecodeLayout = DecodeLayout()):
    H, K, hd, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
    G = H // K
    norm, act = norm_fn(cfg), ACTIVATIONS[cfg.hidden_act]
    attn_kw = dict(scale=cfg.query_scale)
    mask, window_bias = mask if cfg.sliding_layers else (mask, None)
    chunked = 0 < attn_chunk < mask.shape[1]  # attn_chunk is 0 with a cache
    if chunked:
        mask = split_chunks(mask, 1, attn_chunk)
        window_bias = None if window_bias is None else split_chunks(window_bias, 1, attn_chunk)

    def layer(h, p, kv):
        B, T, _ = h.shape
        window = (p["sliding"], window_bias) if cfg.sliding_layers else None
        x = lay.wide(norm(h, p["input_norm"], eps))
        # a decode step on a tensor mesh: each device attends with its own heads over its own slice of the cache
        heads = lay.splits_heads(K)
        proj = lay.heads if heads else (lambda y: lay.summed(y, "mlp"))
        q, k, v = (proj(_linear(x, p[name], scale)) for name in ("q_proj", "k_proj", "v_proj"))
        q, k, v = q.reshape(B, T, H, hd), k.reshape(B, T, K, hd), v.reshape(B, T, K, hd)
        if cfg.qk_norm:
            q, k = norm(q, p["q_norm"], eps), norm(k, p["k_norm"], eps)
        if cfg.sliding_layers:  # [global, local] tables from hidden_states: both rotations, the flag picks one (a
            # scalar select keeps nothing per layer for the backward; picking a table would keep it, (B, T, hd) each)
            q, k = (jax.lax.select_n(p["sliding"], apply_rope(x, cos[0], sin[0]),
                                     apply_rope(x, cos[1], sin[1])) for x in (q, k))
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # heads-first layout (B, K, rows, hd) with the G query heads of a KV head stacked as rows (g, t): both
        # attention products become plain batched matmuls with no transposes inside them.
        q5 = q.reshape(B, T, K, G, hd).transpose(0, 2, 3, 1, 4)  # (B, K, G, T, hd)
        kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        if kv is not None:
            # keys stored transposed (B, K, hd, S): the decode-time score product is then a plain matmul; each row
            # writes its T new positions at its own start
            if len(kv) == 3:  # stacked cache (L, B, ...) and this layer's index: one scatter of the new positions
                # in the cache's own layout, so the loop updates it in place (a vmapped dynamic_update_slice over the
                # batch axis made XLA copy the whole stacked cache in every layer)
                k_st, v_st, li = kv
                rows, pos = jnp.arange(B)[:, None], cache_start[:, None] + jnp.arange(T)[None, :]  # (B, 1), (B, T)
                k_st = k_st.at[li, rows, :, :, pos].set(k.astype(k_st.dtype), unique_indices=True)
                v_st = v_st.at[li, rows, :, pos, :].set(v.astype(v_st.dtype), unique_indices=True)
                kc, vc, new_kv = k_st[li], v_st[li], (k_st, v_st)
            else:
                kc, vc = kv
                kc = jax.vmap(lambda c, x, i: jax.lax.dynamic_update_slice(c, x, (0, 0, i)))(
                    kc, kh.swapaxes(-1, -2).astype(kc.dtype), cache_start)
                vc = jax.vmap(lambda c, x, i: jax.lax.dynamic_update_slice(c, x, (0, i, 0)))(
                    vc, vh.astype(vc.dtype), cache_start)
                new_kv = (kc, vc)
            attn = _attend(q5, kc.astype(dtype), vc.astype(dtype), mask, dtype, keys_transposed=True, window=window,
                           **attn_kw)
        else:
            new_kv = None
            attn = (_attend_chunked(q5, kh, vh, mask, dtype, attn_chunk, window=window, **attn_kw) if chunked
                    else _attend(q5, kh, vh, mask, dtype, window=window, **attn_kw))
        attn = lay.wide(attn.transpose(0, 3, 1, 2, 4).reshape(B, T, H * hd), "mlp" if heads else None)
        attn = lay.split(lay.wide(_linear(attn, p["o_proj"], scale), "embed"))
        if cfg.sandwich_norm:
            attn = norm(attn, p["attn_out_norm"], eps)
        h = h + attn
        x = norm(h, p["post_norm"], eps)
        if cfg.is_moe:
            moe = (lay.split(_moe_mlp_decode(lay.wide(x), p, cfg, scale, lay)) if lay.active
                   else _moe_mlp(x, p, cfg, scale))
            return h + moe, new_kv
        x = lay.wide(x)
        gate, up = (lay.wide(_linear(x, p[name], scale), "mlp") for name in ("gate_proj", "up_proj"))
        mlp = lay.split(lay.wide(_linear(act(gate) * up, p["down_proj"], scale), "embed"))
        if cfg.sandwich_norm:
            mlp = norm(mlp, p["mlp_out_norm"], eps)
        return h + mlp, new_kv

    return layer


def _expert_linear(x, params, group_sizes, scale):
    """Rows of ``x`` sorted by expert through their expert's (in, out) kernel and LoRA pair: the ragged form of
    ``_linear`` (kernel (E, in, out), a (E, in, r), b (E, r, out))."""
    kernel, a, b = params
    return _expert_lora(x, jax.lax.ragged_dot(x, kernel.astype(x.dtype), group_sizes), a, b, group_sizes, scale)


def _expert_lora(x, y, a, b, group_sizes, scale):
    """``y`` plus the experts' LoRA update of ``x``'s rows (none when ``a`` is None)."""
    if a is None:
        return y
    xa = jax.lax.ragged_dot(x, a.astype(x.dtype), group_sizes)
    return y + jax.lax.ragged_dot(xa, b.astype(x.dtype), group_sizes) * jnp.asarray(scale, x.dtype)


def _moe_mlp(x, p, cfg: Qwen3Config, scale):
    """Qwen3-MoE's sparse block on (B, T, D): each token goes to its top-k experts by router probability (fp32
    softmax; renormalised over the k when ``norm_topk_prob``) and their outputs are summed with those weights.

    The (token, choice) pairs are sorted by expert so every expert's rows are contiguous and ``ragged_dot`` runs
    each expert's matmul on its own rows only: k/E of the dense work (on TPUs and GPUs; XLA:CPU lowers it densely).

    On a mesh each device dispatches its own rows of the batch (``shard_map`` over the batch axes, the experts
    gathered like any FSDP weight): left to the partitioner, the sort over all (token, choice) pairs made every
    device gather the whole batch and run every token's experts.
    """
    mesh = traced_mesh(x)
    axes = batch_axes(mesh, x.shape[0]) if mesh is not None else ()
    local = functools.partial(_moe_dispatch, cfg=cfg, scale=scale)
    if not axes:
        return local(x, p)
    rows = jax.sharding.PartitionSpec(axes)
    return jax.shard_map(local, mesh=mesh, in_specs=(rows, jax.sharding.PartitionSpec()), out_specs=rows,
                         axis_names=set(axes))(x, p)


def _route(logits, cfg: Qwen3Config, dtype):
    """Router logits (N, E) -> each (token, choice) pair's token, its weight, and the experts' group sizes, with the
    pairs sorted by expert."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, cfg.num_experts_per_tok)  # (N, k)
    if cfg.norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    flat = experts.reshape(-1)  # (N·k,), row n·k + j is token n's j-th choice
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=cfg.num_experts).astype(jnp.int32)
    return order // cfg.num_experts_per_tok, jnp.take(weights.astype(dtype).reshape(-1), order), sizes


def _moe_mlp_decode(x, p, cfg: Qwen3Config, scale, lay):
    """``_moe_mlp`` for a decode step on an FSDP mesh (``emjax.sharding.DecodeLayout``): the rows whole over fsdp
    (``x`` laid out ``lay.wide``), each device routes them all and multiplies its slice of the hidden size by its
    slice of every expert's kernels, the partial products summed over fsdp; the output comes back with its columns
    over fsdp. Left to the partitioner (as ``_moe_mlp`` is), every step gathered every expert's weights."""
    mesh, f = lay.mesh, lay.mesh.shape["fsdp"]
    B, T, D = x.shape
    if D % f:
        return _moe_mlp(lay.split(x), p, cfg, scale)
    wide = tuple(a for a in lay.rows if a != "fsdp")
    P = jax.sharding.PartitionSpec
    rows = P(wide or None)
    params = {k: p[k] for k in ("router", "gate_proj", "up_proj", "down_proj")}
    cols_in, cols_out = P(None, "fsdp", None), P(None, None, "fsdp")  # (E, in, out): the hidden size's side over fsdp
    specs = {"router": P("fsdp", None), "gate_proj": (cols_in, P(), P()), "up_proj": (cols_in, P(), P()),
             "down_proj": (cols_out, P(), cols_out)}  # a: whole; b (E, r, out): its own columns of the output
    specs = jax.tree.map(lambda spec, x: None if x is None else spec, specs, params,
                         is_leaf=lambda x: x is None or isinstance(x, P))

    def local(x, p):
        n = x.shape[0] * T
        xf = x.reshape(n, D)
        i = jax.lax.axis_index("fsdp")
        xl = jax.lax.dynamic_slice_in_dim(xf, i * (D // f), D // f, axis=1)

        def summed(y):  # partial products (fp32) summed over fsdp, in the compute dtype as one device's product
            return jax.lax.psum(y, "fsdp").astype(x.dtype)

        logits = summed(jnp.dot(xl, p["router"].astype(x.dtype), preferred_element_type=jnp.float32))
        token, weights, sizes = _route(logits, cfg, x.dtype)
        xs, xsl = jnp.take(xf, token, axis=0), jnp.take(xl, token, axis=0)

        def from_hidden(params):  # the base product from this device's slice, the whole LoRA update on every device
            kernel, a, b = params
            y = summed(jax.lax.ragged_dot(xsl, kernel.astype(x.dtype), sizes, preferred_element_type=jnp.float32))
            return _expert_lora(xs, y, a, b, sizes, scale)

        hidden = jax.nn.silu(from_hidden(p["gate_proj"])) * from_hidden(p["up_proj"])
        ys = _expert_linear(hidden, p["down_proj"], sizes, scale) * weights[:, None]  # this device's columns
        return jnp.zeros((n, D // f), x.dtype).at[token].add(ys).reshape(x.shape[0], T, D // f)

    return jax.shard_map(local, mesh=mesh, in_specs=(rows, specs), out_specs=P(wide or None, None, "fsdp"),
                         axis_names=set(lay.rows))(x, params)


def _moe_dispatch(x, p, cfg: Qwen3Config, scale):
    """``_moe_mlp`` on the rows one device holds."""
    B, T, D = x.shape
    xf = x.reshape(B * T, D)
    logits = xf @ p["router"].astype(x.dtype)  # HF: F.linear in the compute dtype, softmax in fp32
    token, weights, sizes = _route(logits, cfg, x.dtype)
    xs = jnp.take(xf, token, axis=0)
    hidden = jax.nn.silu(_expert_linear(xs, p["gate_proj"], sizes, scale)) * _expert_linear(xs, p["up_proj"], sizes,
                                                                                               scale)
    ys = _expert_linear(hidden, p["down_proj"], sizes, scale) * weights[:, None]
    return jnp.zeros_like(xf).at[token].add(ys).reshape(B, T, D)
