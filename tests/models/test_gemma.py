"""Gemma 3 in emjax (``Qwen3ForCausalLM`` with Gemma's switches) vs transformers' ``Gemma3ForCausalLM`` and the
language model of ``Gemma3ForConditionalGeneration`` in fp32: logits within 1e-4, greedy decoding token-identical
past the sliding window, PEFT adapters interchangeable."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from emjax import lora
from emjax.models import config_from_hf, from_pretrained, gemma
from emjax.sampling import generate
from emjax.testing import hf_greedy, hf_logits, tiny_hf_model, with_config

TOL = 2e-5  # max-abs on fp32 logits of std ~0.4; measured 1-2e-6 against transformers

CASES = {
    "sliding_every_other": dict(),
    "gqa4_mqa": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16),
    "pattern6_untied": dict(num_hidden_layers=6, sliding_window_pattern=6, tie_word_embeddings=False),
    "no_softcap_no_scaling": dict(final_logit_softcapping=None, rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
}



@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    hf = tiny_hf_model(seed=1, family="gemma3", **CASES[case])
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, dtype=jnp.float32)
    assert model.config.sliding_layers == tuple(t == "sliding_attention" for t in hf.config.layer_types)
    tokens = np.random.default_rng(0).integers(0, 256, (2, 40))  # 5 sliding windows long
    diff = np.abs(np.asarray(model(jnp.asarray(tokens))) - hf_logits(hf, tokens)).max()
    assert diff < TOL, diff


def test_each_gemma_switch_matters(tmp_path):
    """Turning off any one switch changes the logits, so the parity above tests each."""
    hf = tiny_hf_model(seed=1, family="gemma3")
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, dtype=jnp.float32)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, 40)))
    ref = np.asarray(model(tokens))
    cfg = model.config
    for change in (dict(sliding_layers=(), sliding_window=0), dict(rope_local_theta=cfg.rope_theta),
                   dict(rope_scaling=()), dict(query_scale=0.0), dict(embed_scale=1.0), dict(final_softcap=0.0),
                   dict(hidden_act="silu")):
        assert np.abs(np.asarray(with_config(model, **change)(tokens)) - ref).max() > 1e-3, change


def test_multimodal_checkpoint_loads_its_language_model(tmp_path):
    """Gemma3ForConditionalGeneration's file (language_model.model.*, vision_tower.*, multi_modal_projector.*): the
    language model loads, the vision weights are skipped, and text-only logits equal the multimodal model's."""
    hf = tiny_hf_model(seed=2, family="gemma3-mm", vocab_size=300)
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gemma3"
    model = from_pretrained(tmp_path, dtype=jnp.float32)
    assert model.hf_layers == "model.language_model.layers" and model.config.final_softcap == 0.0
    tokens = np.random.default_rng(0).integers(0, 296, (2, 40))
    assert np.abs(np.asarray(model(jnp.asarray(tokens))) - hf_logits(hf, tokens)).max() < TOL


def test_hub_config_form_and_presets():
    """A hub config.json in the released form (sliding_window_pattern, top-level rope_theta, rope_scaling for the
    global layers, rope_local_base_freq) inside a multimodal config, as gemma-3-4b-it ships it."""
    text = {"model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34,
            "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "query_pre_attn_scalar": 256,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "rope_theta": 1000000.0,
            "rope_local_base_freq": 10000.0, "sliding_window": 1024, "sliding_window_pattern": 6,
            "final_logit_softcapping": None, "attn_logit_softcapping": None, "rms_norm_eps": 1e-06,
            "vocab_size": 262208, "max_position_embeddings": 131072, "hidden_activation": "gelu_pytorch_tanh"}
    assert config_from_hf({"model_type": "gemma3", "text_config": text}) == gemma.gemma3_4b()
    # the 1B's published count; the others are their language models (the vision tower, ≈0.4B, is not loaded)
    for size, n in {"gemma3-1b": 999_885_952, "gemma3-4b": 3.880e9, "gemma3-12b": 11.766e9,
                    "gemma3-27b": 27.009e9}.items():
        assert abs(gemma.SIZES[size]().num_params - n) < 1e6, size


@pytest.mark.parametrize("bad,match", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type 'yarn' is not supported"),
    ({"hidden_activation": "relu"}, "hidden_activation 'relu' is not supported"),
    ({"layer_types": ["sliding_attention", "chunked_attention"]}, "layer_types must list 2"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
])
def test_config_errors_name_the_key(tmp_path, bad, match):
    p = tmp_path / "config.json"
    base = {"model_type": "gemma3_text", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 2, "num_attention_heads": 2, "head_dim": 4}
    p.write_text(json.dumps(dict(base, **bad)))
    with pytest.raises((ValueError, KeyError), match=match) as e:
        config_from_hf(p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_greedy_matches_transformers_past_the_window(tmp_path, scan_layers):
    hf = tiny_hf_model(seed=11, noise=0.2, family="gemma3", tie_word_embeddings=False)  # tied: it repeats a token
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, dtype=jnp.float32)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(8, 256, n).tolist() for n in (5, 19, 9)]  # prompts and decoding both pass the window
    batch = generate(model, prompts, max_new_tokens=12, stop_tokens=(7,), scan_layers=scan_layers)
    for p, got in zip(prompts, batch):
        assert got == hf_greedy(hf, p, 12, 7) and len(set(got)) > 3


def test_adapters_sample_together_as_they_would_alone(tmp_path):
    """``generate_many`` on a Gemma base (per-layer mask and RoPE flags ride along with the sliced layers): each
    adapter gets ``generate``'s tokens."""
    from flax import nnx

    from emjax.sampling import generate_many

    # untied: with tied embeddings × √hidden a random Gemma repeats its input token whatever the adapter
    tiny_hf_model(seed=5, noise=0.2, family="gemma3", tie_word_embeddings=False).save_pretrained(tmp_path)
    models, ads = [], []
    for seed in (0, 1):
        m = from_pretrained(tmp_path, dtype=jnp.float32, lora=lora.LoraConfig(rank=2, alpha=4), seed=seed)
        for _, lin in lora.lora_modules(m):
            lin.lora_b[...] = jnp.asarray(np.random.default_rng(seed).normal(0, 0.3, lin.lora_b.shape), jnp.float32)
        models.append(m)
        ads.append(nnx.split(m, nnx.LoRAParam, ...)[1])
    prompts = [np.random.default_rng(n).integers(8, 256, n).tolist() for n in (5, 13)]
    kw = dict(max_new_tokens=8, stop_tokens=(7,), scan_layers=False)  # the per-layer slices carry the flags
    got = generate_many(models[0], ads, prompts, **kw)
    assert got == [generate(m, prompts, **kw) for m in models] and got[0] != got[1]


@pytest.mark.parametrize("family", ["gemma3", "gemma3-mm"])
def test_lora_export_loads_in_peft_and_back(tmp_path, family):
    from peft import PeftModel

    hf = tiny_hf_model(seed=1, family=family, vocab_size=300)
    hf.save_pretrained(tmp_path / "base")
    cfg = lora.LoraConfig(rank=4, alpha=8, rslora=True)
    model = from_pretrained(tmp_path / "base", dtype=jnp.float32, lora=cfg)
    rng = np.random.default_rng(0)
    for _, lin in lora.lora_modules(model):
        lin.lora_b[...] = jnp.asarray(rng.normal(0, 0.05, lin.lora_b.shape), jnp.float32)
    lora.export_peft(model, tmp_path / "adapter")
    tokens = np.random.default_rng(0).integers(0, 296, (2, 30))
    out = np.asarray(model(jnp.asarray(tokens)))
    base = np.asarray(from_pretrained(tmp_path / "base", dtype=jnp.float32)(jnp.asarray(tokens)))
    assert np.abs(out - base).max() > 1e-2  # the adapter matters
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        ref = peft_model(input_ids=torch.tensor(tokens)).logits.numpy()
    assert np.abs(out - ref).max() < TOL
    fresh = from_pretrained(tmp_path / "base", dtype=jnp.float32, lora=cfg)
    lora.load_peft(fresh, tmp_path / "adapter")
    np.testing.assert_allclose(np.asarray(fresh(jnp.asarray(tokens))), out, atol=1e-6)
