"""Qwen3 in emjax vs transformers' Qwen3ForCausalLM in fp32 (tolerance 2e-5 max-abs on logits)."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from emjax.models import CheckpointError, KVCache, config_from_hf, from_pretrained, qwen3
from emjax.testing import tiny_hf_checkpoint, tiny_hf_model

TOL = 2e-5  # max-abs on fp32 logits of std ~0.4; measured 1-2e-6 against transformers


def _ref_logits(hf, tokens, mask=None):
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return hf(torch.tensor(tokens), **kw).logits.numpy()


CASES = {
    "untied": dict(),
    "tied": dict(tie_word_embeddings=True),
    "gqa4_headdim_ne": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=20),
    "mha": dict(num_attention_heads=4, num_key_value_heads=4, head_dim=16),
}


@pytest.mark.parametrize("family,attn_chunk", [("qwen3", 0), ("qwen3", 4), ("gemma3", 0), ("gemma3", 4)])
def test_packed_rows_equal_each_example_alone(tmp_path, family, attn_chunk):
    """A packed row (data.mode=pack: segment ids, positions restarting per example) gives each example the logits
    transformers gives it alone: no attention across examples, the RoPE of its own positions, and, for Gemma, the
    sliding window (8 here) inside each example (the pipeline's own mask helper is a different function)."""
    hf = tiny_hf_model(seed=1, family=family)
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, dtype=jnp.float32)
    rng = np.random.default_rng(0)
    rows = [[11, 13, 6], [20]]  # example lengths per row; rows padded to 32
    tokens, seg, pos, examples = np.zeros((2, 32), int), np.zeros((2, 32), int), np.zeros((2, 32), int), []
    for r, lengths in enumerate(rows):
        at = 0
        for s, n in enumerate(lengths):
            ex = rng.integers(0, 256, n)
            tokens[r, at:at + n], seg[r, at:at + n], pos[r, at:at + n] = ex, s + 1, np.arange(n)
            examples.append((r, at, ex))
            at += n
    out = np.asarray(model(jnp.asarray(tokens), positions=jnp.asarray(pos), segment_ids=jnp.asarray(seg),
                           attn_chunk=attn_chunk))
    for r, at, ex in examples:
        diff = np.abs(out[r, at:at + len(ex)] - _ref_logits(hf, ex[None])[0]).max()
        assert diff < TOL, (r, at, diff)


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    hf = tiny_hf_model(seed=1, **CASES[case])
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, dtype=jnp.float32)
    tokens = np.random.default_rng(0).integers(0, 256, (2, 80))  # longer than 64
    diff = np.abs(np.asarray(model(jnp.asarray(tokens))) - _ref_logits(hf, tokens)).max()
    assert diff < TOL, diff


@pytest.mark.parametrize("attn_chunk", [0, 16], ids=["whole", "attn_chunk16"])
def test_right_padded_batch_with_mask(tmp_path, attn_chunk):
    """attn_chunk=16 (queries in chunks, 40 = 16 + 16 + 8 padded) must give the same logits."""
    hf = tiny_hf_model(seed=2)
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, dtype=jnp.float32)
    tokens = np.random.default_rng(1).integers(0, 256, (3, 40))
    lengths = np.array([40, 25, 7])
    mask = (np.arange(40)[None] < lengths[:, None]).astype(np.int64)
    tokens = np.where(mask > 0, tokens, 0)
    ref = _ref_logits(hf, tokens, mask)
    out = np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask), attn_chunk=attn_chunk))
    for b, n in enumerate(lengths):
        assert np.abs(out[b, :n] - ref[b, :n]).max() < TOL
        solo = _ref_logits(hf, tokens[b:b + 1, :n])[0]  # and each row equals that row alone
        assert np.abs(out[b, :n] - solo).max() < TOL


def test_sharded_checkpoint(tmp_path):
    hf = tiny_hf_model(seed=3)
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    model = from_pretrained(tmp_path, dtype=jnp.float32)
    tokens = np.random.default_rng(2).integers(0, 256, (1, 16))
    assert np.abs(np.asarray(model(jnp.asarray(tokens))) - _ref_logits(hf, tokens)).max() < TOL


def test_per_layer_hidden_states(tmp_path):
    """Per-layer parity: truncating both models to k layers gives the same final hidden states."""
    hf = tiny_hf_model(seed=4, num_hidden_layers=3)
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, dtype=jnp.float32)
    tokens = np.random.default_rng(3).integers(0, 256, (2, 12))
    with torch.no_grad():
        ref = hf(torch.tensor(tokens), output_hidden_states=True).hidden_states
    cfg = model.config
    cos, sin = qwen3.rope_tables(jnp.broadcast_to(jnp.arange(12), (2, 12)), cfg.head_dim, cfg.rope_theta)
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((12, 12), bool)), (2, 12, 12))
    body = qwen3._make_layer_fn(cfg, jnp.float32, 0.0, mask, cos, sin, None)
    for k in (1, 2):  # hidden_states[k] (k < L) is the raw output of layer k: scan over the first k layers only
        params = jax.tree_util.tree_map(lambda x: x[:k], model._layer_params())
        h, _ = jax.lax.scan(lambda c, p: (body(c, p, None)[0], None), model.embed[...][tokens], params)
        assert np.abs(np.asarray(h) - ref[k].numpy()).max() < TOL


@pytest.mark.parametrize("stacked", [False, True], ids=["per_layer", "stacked"])
def test_kv_cache_decoding_matches_full_forward(tmp_path, stacked):
    hf = tiny_hf_model(seed=5)
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, dtype=jnp.float32)
    rng = np.random.default_rng(4)
    tokens = jnp.asarray(rng.integers(0, 256, (2, 30)))
    full = np.asarray(model(tokens))
    prompt_len = np.array([10, 6])
    prompt = np.asarray(tokens).copy()
    pmask = (np.arange(12)[None] < prompt_len[:, None]).astype(np.int32)
    cache = KVCache.init(model.config, 2, 40, stacked=stacked)
    assert cache.stacked == stacked and cache.max_len == 40
    logits, cache = model(jnp.asarray(prompt[:, :12] * pmask), attention_mask=jnp.asarray(pmask), cache=cache)
    for b in range(2):
        n = prompt_len[b]
        assert np.abs(np.asarray(logits)[b, :n] - full[b, :n]).max() < TOL
    np.testing.assert_array_equal(np.asarray(cache.lengths), prompt_len)
    # feed the true continuation one token at a time; row b continues at its own position
    for step in range(8):
        nxt = jnp.asarray([[int(tokens[b, prompt_len[b] + step])] for b in range(2)])
        logits, cache = model(nxt, cache=cache)
        for b in range(2):
            assert np.abs(np.asarray(logits)[b, 0] - full[b, prompt_len[b] + step]).max() < TOL


def test_bf16_policy_runs_close(tmp_path):
    hf = tiny_hf_model(seed=6)
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, dtype=jnp.bfloat16)
    assert model.blocks.q_proj.kernel[...].dtype == jnp.bfloat16
    tokens = np.random.default_rng(5).integers(0, 256, (1, 16))
    out = np.asarray(model(jnp.asarray(tokens)))
    assert out.dtype == np.float32
    ref = _ref_logits(hf, tokens)
    assert np.abs(out - ref).max() < 0.025 * np.abs(ref).max()  # measured 1.2 % (bf16 weights and compute)


@pytest.mark.parametrize("family", ["qwen3", "gemma3-mm"])
def test_mesh_loading_matches_single_device(tmp_path, family):
    """Every parameter (Gemma's extra norms too) goes to its sharding from the rules table; logits are unchanged."""
    from emjax.sharding import make_mesh

    hf = tiny_hf_model(seed=7, family=family)
    hf.save_pretrained(tmp_path)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = from_pretrained(tmp_path, dtype=jnp.float32, mesh=mesh)
    spec = model.blocks.q_proj.kernel[...].sharding.spec
    assert tuple(spec) == (None, "fsdp", "tensor"), spec
    tokens = np.random.default_rng(6).integers(0, 256, (2, 16))
    out = np.asarray(jax.jit(lambda m, t: m(t))(model, jnp.asarray(tokens)))
    assert np.abs(out - _ref_logits(hf, tokens)).max() < TOL


# --- configs --------------------------------------------------------------------------------------------------

TABLE = {  # reference.md: hidden, layers, q heads, kv heads, intermediate, tied
    "0.6b": (1024, 28, 16, 8, 3072, True), "1.7b": (2048, 28, 16, 8, 6144, True),
    "4b": (2560, 36, 32, 8, 9728, True), "8b": (4096, 36, 32, 8, 12288, False),
    "14b": (5120, 40, 40, 8, 17408, False), "32b": (5120, 64, 64, 8, 25600, False),
}


@pytest.mark.parametrize("size", sorted(TABLE))
def test_size_constructors_match_reference_table(size):
    c = qwen3.SIZES[size]()
    got = (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.intermediate_size, c.tie_word_embeddings)
    assert got == TABLE[size]
    assert (c.vocab_size, c.head_dim, c.rms_norm_eps, c.rope_theta) == (151936, 128, 1e-6, 1e6)


def test_8b_parameter_count():
    assert abs(qwen3.qwen3_8b().num_params / 1e9 - 8.19) < 0.01


def test_config_from_hf_reads_both_rope_forms():
    base = {"model_type": "qwen3", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4}
    assert config_from_hf(dict(base, rope_theta=5e6)).rope_theta == 5e6
    assert config_from_hf(dict(base, rope_parameters={"rope_type": "default", "rope_theta": 3e5})).rope_theta == 3e5


def test_init_lora_draws_what_from_pretrained_draws(tmp_path):
    """A pack's runs with other seeds get their adapters from init_lora: the same factors from_pretrained(seed=s)
    gives, with B = 0."""
    from flax import nnx

    from emjax.lora import LoraConfig
    from emjax.models.loading import init_lora

    p = tiny_hf_checkpoint(tmp_path)
    split = [nnx.split(from_pretrained(p, dtype=jnp.float32, lora=LoraConfig(rank=4, alpha=8), seed=s),
                       nnx.LoRAParam, ...)[1] for s in (0, 1)]
    drawn = init_lora(split[0], 1)
    assert jax.tree.structure(drawn) == jax.tree.structure(split[1])
    for a, b, c in zip(jax.tree.leaves(drawn), jax.tree.leaves(split[1]), jax.tree.leaves(split[0]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.dtype == jnp.float32 and (not np.asarray(c).any() or not np.array_equal(a, c))


# --- clear errors ---------------------------------------------------------------------------------------------

def test_unknown_model_type(tmp_path):
    p = tiny_hf_checkpoint(tmp_path)
    cfg = json.loads((p / "config.json").read_text())
    cfg["model_type"] = "mistral"
    (p / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json: model_type 'mistral' is not supported"):
        from_pretrained(p)


@pytest.mark.parametrize("model_type,bad", [
    ("qwen3", {"hidden_size": "32"}), ("qwen3", {"num_hidden_layers": 0}), ("qwen3", {"head_dim": 4.0}),
    ("qwen3", {"vocab_size": True}), ("qwen3_moe", {"num_experts_per_tok": "2"}), ("llama", {"intermediate_size": -1}),
    ("gemma3_text", {"sliding_window": None}), ("gemma3", {"num_attention_heads": "2"}),
])
def test_config_sizes_must_be_positive_integers(tmp_path, model_type, bad):
    """A size of the wrong type or not positive was a JAX shape traceback, or "need at least one array to stack" for
    0 layers: now one error naming config.json and the key (a multimodal Gemma's text_config)."""
    base = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": None, "head_dim": 4}
    if model_type == "qwen3_moe":
        base.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8)

    def config(**change):
        if model_type == "gemma3":
            return {"model_type": "gemma3", "text_config": {"model_type": "gemma3_text", **base, **change}}
        return {"model_type": model_type, **base, **change}

    assert config_from_hf(config()).num_kv_heads == 2  # null: num_attention_heads's
    p = tmp_path / "config.json"
    p.write_text(json.dumps(config(**bad)))
    [(key, value)] = bad.items()
    where = f"{p}: text_config" if model_type == "gemma3" else str(p)
    want = f"{where}: {key} must be a positive integer (got {value!r})"
    with pytest.raises(ValueError, match=f"^{re.escape(want)}$"):
        config_from_hf(p)


def _edit_tensors(p, edit):
    """``edit(tensors)`` applied to checkpoint ``p``'s model.safetensors, in place."""
    from safetensors.numpy import load_file, save_file

    f = p / "model.safetensors"
    t = load_file(str(f))
    edit(t)
    save_file(t, str(f), metadata={"format": "pt"})


def test_integer_weights_are_refused(tmp_path):
    """A quantised checkpoint's integer weight was cast to float silently."""
    p = tiny_hf_checkpoint(tmp_path)
    name = "model.layers.0.self_attn.q_proj.weight"
    _edit_tensors(p, lambda t: t.update({name: t[name].astype(np.int32)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor model\.layers\.0\.self_attn\.q_proj"
                                              r"\.weight has dtype I32: quantised checkpoints are not supported "
                                              r"\(weights must be F64 / F32 / F16 / BF16"):
        from_pretrained(p)


@pytest.mark.parametrize("moe,name", [(False, "model.layers.1.mlp.up_proj.weight"),
                                      (True, "model.layers.1.mlp.experts.5.up_proj.weight")], ids=["dense", "moe"])
def test_missing_tensor_names_tensor(tmp_path, moe, name):
    p = tiny_hf_checkpoint(tmp_path, moe=moe)
    _edit_tensors(p, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=f"missing tensor {name.replace('.', '[.]')}"):
        from_pretrained(p)


def test_shape_mismatch_names_tensor_and_file(tmp_path):
    p = tiny_hf_checkpoint(tmp_path)
    name = "model.layers.0.self_attn.k_proj.weight"
    _edit_tensors(p, lambda t: t.update({name: t[name][:-1]}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor model\.layers\.0\.self_attn\.k_proj"
                                              r"\.weight has shape"):
        from_pretrained(p)


def test_a_damaged_safetensors_file_is_named(tmp_path):
    """Cut short (an interrupted download), empty, or with a header that is not JSON: one error naming the file (they
    were a reshape ValueError, a struct.error and a JSONDecodeError)."""
    p = tiny_hf_checkpoint(tmp_path)
    f = p / "model.safetensors"
    whole = f.read_bytes()
    for data, want in ((whole[:-100], r"model\.safetensors: cut short: its header promises \d+ bytes, the file has"),
                       (b"", r"model\.safetensors: not a safetensors file, or cut short \(0 bytes\)"),
                       (whole[:8] + b"{" * (len(whole) - 8), r"model\.safetensors: unreadable safetensors header")):
        f.write_bytes(data)
        with pytest.raises(CheckpointError, match=want):
            from_pretrained(p)


def test_a_training_run_given_as_a_model_says_where_its_base_is(tmp_path):
    """A run's work directory (config.yaml, adapter/) is not a model: the error says which base and adapter to give,
    or, for a random-init preset base (never saved), how such a run is evaluated."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model:\n  checkpoint: /models/Qwen3-8B\n  preset: tiny\n")
    with pytest.raises(CheckpointError, match=r"run: no config.json; it is an emjax training run's work directory.*"
                                              r"--model /models/Qwen3-8B --adapter .*run/adapter"):
        from_pretrained(run)
    (run / "config.yaml").write_text("model:\n  checkpoint: null\n  preset: tiny\n")
    with pytest.raises(CheckpointError, match=r"random init of preset 'tiny', which is not saved.*eval.final=true"):
        from_pretrained(run)
    (run / "config.yaml").unlink()
    with pytest.raises(CheckpointError, match=r"run: no config.json$"):
        from_pretrained(run)


def test_loading_shows_a_bar_of_the_models_bytes(tmp_path, monkeypatch):
    """Loading counts every parameter's bytes into a progress bar (shown once it has taken 2 s: an 8B checkpoint
    takes minutes to read, a tiny one never shows it)."""
    import tqdm.auto

    bars = []

    class Bar(tqdm.auto.tqdm):
        def __init__(self, *a, **kw):
            super().__init__(*a, **{**kw, "disable": True})
            self.kw, self.done = kw, 0
            bars.append(self)

        def update(self, n=1):
            self.done += n

    ckpt = tiny_hf_checkpoint(tmp_path / "c")
    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    model = from_pretrained(ckpt, dtype=jnp.float32)
    nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(nnx.state(model)))
    [bar] = bars
    assert bar.kw["total"] == bar.done == nbytes and bar.kw["delay"] == 2.0 and bar.kw["unit"] == "B"


def test_unexpected_tensor_is_an_error(tmp_path):
    from safetensors.numpy import load_file, save_file

    p = tiny_hf_checkpoint(tmp_path)
    f = p / "model.safetensors"
    t = load_file(str(f))
    t["model.layers.0.self_attn.q_proj.bias"] = np.zeros(96, np.float32)
    save_file(t, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.0\.self_attn\.q_proj\.bias"):
        from_pretrained(p)


def test_offline_hub_id_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"`hf download Qwen/Qwen3-0.6B"):
        from_pretrained("Qwen/Qwen3-0.6B")


def test_missing_directory_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        from_pretrained(tmp_path / "nope" / "deeper")


@pytest.mark.parametrize("attn_chunk", [0, 16], ids=["whole", "attn_chunk16"])
def test_backward_keeps_no_mask_per_layer(attn_chunk):
    """What the scanned layers keep for the backward (traced, not run): no attention mask per layer, as the mask is
    the same for all of them; and Gemma-style sliding layers keep only their flag more than global ones, not the
    mask or RoPE table they picked (a (L, B, 1, G, T, T) bool and two (L, B, T, hd) tables before) nor, with query
    chunks, a per-layer split of the mask or window."""
    import dataclasses

    import jax
    from flax import nnx

    from emjax.lora import LoraConfig
    from emjax.train import token_nll

    L, B, T = 6, 2, 64
    base = qwen3.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=L, num_heads=2,
                             num_kv_heads=1, head_dim=16)
    local = dataclasses.replace(base, sliding_window=16, sliding_layers=(False, True) * (L // 2))

    def kept(cfg):
        graphdef, lora, rest = nnx.split(qwen3.Qwen3ForCausalLM(cfg, lora=LoraConfig(rank=2), rngs=nnx.Rngs(0)),
                                         nnx.LoRAParam, ...)
        ones = jnp.ones((B, T), jnp.int32)
        batch = {"tokens": ones, "loss_mask": ones, "segment_ids": ones,
                 "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))}
        nll = lambda lo: token_nll(nnx.merge(graphdef, lo, rest), batch, attn_chunk=attn_chunk)[0]  # noqa: E731
        leaves = jax.eval_shape(lambda lo: jax.tree.leaves(jax.vjp(nll, lo)[1]), lora)
        return sorted((x.shape, str(x.dtype)) for x in leaves if x.ndim and x.shape[0] == L)

    for cfg in (base, local):
        assert not [x for x in kept(cfg) if x[1] == "bool"], cfg.sliding_layers
    assert kept(local) == sorted(kept(base) + [((L,), "int32")])


def _bf16_lora_vjp(attention_mask=None, remat="none"):
    """Loss, LoRA gradients and the arrays the backward keeps, for a tiny bf16 model with adapters."""
    from flax import nnx

    from emjax.lora import LoraConfig

    cfg = qwen3.Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4,
                            num_kv_heads=2, head_dim=16)
    model = qwen3.Qwen3ForCausalLM(cfg, lora=LoraConfig(rank=4), param_dtype=jnp.bfloat16, rngs=nnx.Rngs(3))
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    # B non-zero, so every factor has a gradient that depends on the whole layer
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape, x.dtype), lora)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 8)))

    def loss(lora):
        m = nnx.merge(graphdef, lora, rest)
        return jnp.mean(m(tokens, attention_mask=attention_mask, remat=remat).astype(jnp.float32) ** 2)

    @jax.jit
    def run(lora):
        value, vjp = jax.vjp(loss, lora)
        return value, vjp(jnp.ones_like(value))[0], jax.tree.leaves(vjp)

    # XLA may otherwise keep a bf16 value's unrounded fp32 source for an fp32 use (excess precision), which
    # autodiff of the plain rms_norm exploits and its recomputation cannot: bit-for-bit only without it
    exact = run.lower(lora).compile({"xla_allow_excess_precision": False})
    return *exact(lora), cfg


@pytest.mark.parametrize("padded", [False, True], ids=["causal", "padded"])
def test_bf16_backward_keeps_no_fp32_norm_inputs_or_cast_probs(monkeypatch, padded):
    # Below fp32, rms_norm keeps its input rather than its fp32 copy, and attention keeps the fp32 probabilities
    # rather than those and their bf16 cast; the gradient must not change by a bit.
    mask = jnp.asarray([[1] * 8, [1] * 5 + [0] * 3]) if padded else None
    value, grads, kept, cfg = _bf16_lora_vjp(mask)
    with monkeypatch.context() as m:  # autodiff of the plain math
        m.setattr(qwen3, "rms_norm", qwen3._rms_norm)
        m.setattr(qwen3, "_attend", lambda q, k, v, mask, dtype, keys_transposed=False, **kw:
                  qwen3._attend_math(q, k, v, mask, dtype, keys_transposed, **kw))
        value0, grads0, kept0, _ = _bf16_lora_vjp(mask)
    assert float(value) == float(value0)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))

    L, B, T, H, K, hd, D = 3, 2, 8, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    probs = (L, B, K, H // K, T, T)

    def layer_f32(leaves):  # fp32 activations the scanned layers keep (not per-row scalars such as 1/rms)
        return sorted(x.shape for x in leaves if x.dtype == jnp.float32 and x.ndim > 2 and x.shape[0] == L
                      and x.shape[-1] > 1)

    def layer_bytes(leaves):
        return sum(x.nbytes for x in leaves if x.ndim > 2 and x.shape[0] == L)

    assert layer_f32(kept) == [probs]
    # autodiff of the plain math keeps the two hidden-state norms' and the q/k norms' fp32 inputs too, and the
    # probabilities' bf16 cast; the norms' bf16 inputs are kept instead
    assert layer_f32(kept0) == sorted([probs, (L, B, T, D), (L, B, T, D), (L, B, T, H, hd), (L, B, T, K, hd)])
    probs_bf16 = B * H * T * T * 2
    qk_norm_inputs = B * T * (H + K) * hd * 2  # the bf16 halves of the q/k norms' fp32 inputs
    assert layer_bytes(kept0) - layer_bytes(kept) >= L * (probs_bf16 + qk_norm_inputs)


@pytest.mark.parametrize("remat", ["dots", "full"])
def test_bf16_residual_savings_keep_remat_policies(remat):
    # the inner checkpoints must not make a rematerialised layer keep more
    _, _, kept, _ = _bf16_lora_vjp(remat=remat)
    _, _, kept_none, _ = _bf16_lora_vjp()
    assert sum(x.nbytes for x in kept) < sum(x.nbytes for x in kept_none)
    assert not [x.shape for x in kept if x.dtype == jnp.float32 and x.ndim == 6]  # no probabilities kept
