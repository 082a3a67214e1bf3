"""Llama 3 in emjax (``Qwen3ForCausalLM`` with qk_norm off and llama3 RoPE scaling) vs transformers'
``LlamaForCausalLM`` in fp32: logits within 1e-4, greedy decoding token-identical, PEFT adapters interchangeable."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from emjax import lora
from emjax.models import config_from_hf, from_pretrained, llama, qwen3
from emjax.sampling import generate
from emjax.testing import hf_greedy, hf_logits, tiny_hf_model, with_config

TOL = 2e-5  # max-abs on fp32 logits of std ~0.4; measured 1-2e-6 against transformers

CASES = {
    "untied": dict(),
    "tied_headdim16": dict(tie_word_embeddings=True, head_dim=16),
    "gqa4": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=20),
    "no_rope_scaling": dict(rope_parameters={"rope_type": "default", "rope_theta": 500_000.0}),
}



@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    hf = tiny_hf_model(seed=1, family="llama", **CASES[case])
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, dtype=jnp.float32)
    assert not model.config.qk_norm and model.blocks.q_norm is None
    tokens = np.random.default_rng(0).integers(0, 256, (2, 80))  # past original_max_position_embeddings (32)
    diff = np.abs(np.asarray(model(jnp.asarray(tokens))) - hf_logits(hf, tokens)).max()
    assert diff < TOL, diff


def test_rope_scaling_is_applied(tmp_path):
    """The llama3 scaling changes the logits at these positions, so the parity above tests it."""
    hf = tiny_hf_model(seed=1, family="llama")
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, dtype=jnp.float32)
    scaling = dict(model.config.rope_scaling)
    assert scaling["rope_type"] == "llama3" and scaling["factor"] == 8.0
    plain = with_config(model, rope_scaling=())
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, 80)))
    assert np.abs(np.asarray(plain(tokens)) - np.asarray(model(tokens))).max() > 1e-3
    # the inverse frequencies against transformers' own llama3 initialiser
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf.config, "cpu")
    ours = np.asarray(qwen3.rope_inv_freq(model.config.head_dim, model.config.rope_theta, model.config.rope_scaling))
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6)


def test_hub_config_form_and_presets():
    """A hub config.json (top-level rope_theta and rope_scaling, as Llama-3.1-8B-Instruct ships it)."""
    hub = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
           "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
           "vocab_size": 128256, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": False,
           "max_position_embeddings": 131072, "attention_bias": False, "mlp_bias": False, "hidden_act": "silu",
           "pretraining_tp": 1, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                 "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    assert config_from_hf(hub) == llama.llama3_1_8b()
    # parameter counts of the model cards: 1.24B, 3.21B, 8.03B, 70.6B
    for size, billions in {"llama3.2-1b": 1.236, "llama3.2-3b": 3.213, "llama3.1-8b": 8.030,
                           "llama3.3-70b": 70.554}.items():
        assert abs(llama.SIZES[size]().num_params / 1e9 - billions) < 0.005, size


@pytest.mark.parametrize("bad,match", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type 'yarn' is not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "missing 'low_freq_factor'"),
    ({"attention_bias": True}, "attention_bias=true is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
])
def test_config_errors_name_the_key(tmp_path, bad, match):
    p = tmp_path / "config.json"
    base = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2}
    p.write_text(json.dumps(dict(base, **bad)))
    with pytest.raises((ValueError, KeyError), match=match) as e:
        config_from_hf(p)
    assert str(p) in str(e.value)


def test_config_file_is_read_once(tmp_path, monkeypatch):
    """The family dispatcher hands the dict it read to the family, still named by its file."""
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
                             "num_hidden_layers": 1, "num_attention_heads": 2, "attention_bias": True}))
    reads, read_text = [], Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: reads.append(self) or read_text(self, *a, **k))
    with pytest.raises(ValueError, match="attention_bias") as e:
        config_from_hf(tmp_path)
    assert str(p) in str(e.value) and reads == [p]


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_greedy_matches_transformers(tmp_path, scan_layers):
    hf = tiny_hf_model(seed=11, noise=0.2, family="llama")
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, dtype=jnp.float32)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(8, 256, n).tolist() for n in (5, 30, 9)]  # decoding runs past position 32
    batch = generate(model, prompts, max_new_tokens=12, stop_tokens=(7,), scan_layers=scan_layers)
    for p, got in zip(prompts, batch):
        assert got == hf_greedy(hf, p, 12, 7)


def test_lora_export_loads_in_peft(tmp_path):
    from peft import PeftModel

    hf = tiny_hf_model(seed=1, family="llama", tie_word_embeddings=True)
    hf.save_pretrained(tmp_path / "base")
    model = from_pretrained(tmp_path / "base", dtype=jnp.float32, lora=lora.LoraConfig(rank=4, alpha=8, rslora=True))
    rng = np.random.default_rng(0)
    for _, lin in lora.lora_modules(model):
        lin.lora_b[...] = jnp.asarray(rng.normal(0, 0.05, lin.lora_b.shape), jnp.float32)
    lora.export_peft(model, tmp_path / "adapter")
    keys = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert sorted(keys) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    tokens = np.random.default_rng(0).integers(0, 256, (2, 40))
    with torch.no_grad():
        ref = peft_model(torch.tensor(tokens)).logits.numpy()
    out = np.asarray(model(jnp.asarray(tokens)))
    base = np.asarray(from_pretrained(tmp_path / "base", dtype=jnp.float32)(jnp.asarray(tokens)))
    assert np.abs(out - base).max() > 1e-2  # the adapter matters
    assert np.abs(out - ref).max() < TOL
    # and back: PEFT's file into a fresh model gives the same logits
    fresh = from_pretrained(tmp_path / "base", dtype=jnp.float32, lora=lora.LoraConfig(rank=4, alpha=8, rslora=True))
    lora.load_peft(fresh, tmp_path / "adapter")
    np.testing.assert_allclose(np.asarray(fresh(jnp.asarray(tokens))), out, atol=1e-6)
