"""LoRA adapters interoperate with PEFT: same logits after export -> PEFT load, and after PEFT save -> load_peft."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from emjax import lora
from emjax.models import from_pretrained
from emjax.testing import tiny_hf_model

TOL = 2e-5  # max-abs on fp32 logits of std ~0.4; measured 1-2e-6 against transformers


def _randomise_b(model, seed=0):
    rng = np.random.default_rng(seed)
    for _, lin in lora.lora_modules(model):
        lin.lora_b[...] = jnp.asarray(rng.normal(0, 0.05, lin.lora_b.shape), jnp.float32)


def _peft_adapter(hf, pcfg, path, seed):
    """PEFT's adapter ``pcfg`` on ``hf`` with random B (so it is not a no-op), saved to ``path``."""
    from peft import get_peft_model

    pm = get_peft_model(hf, pcfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    pm.save_pretrained(path)
    return pm


def test_config_scale_and_targets():
    c = lora.LoraConfig()
    assert c.scale == pytest.approx(64 / np.sqrt(32))
    assert lora.LoraConfig(rank=8, alpha=16, rslora=False).scale == 2.0
    assert lora.LoraConfig(targets=("q_proj", "down")).targets == ("q", "down")
    with pytest.raises(ValueError, match="LoRA target 'lm_head'"):
        lora.LoraConfig(targets=("lm_head",))
    for alpha in (0, -3):  # an adapter scaled to nothing (or flipped) trains nothing useful
        with pytest.raises(ValueError, match=f"LoraConfig.alpha must be > 0, got {alpha}"):
            lora.LoraConfig(alpha=alpha)


def test_init_follows_peft(tmp_path):
    tiny_hf_model().save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, dtype=jnp.float32, lora=lora.LoraConfig(rank=8, alpha=16))
    a = np.asarray(model.blocks.gate_proj.lora_a[...])
    assert a.shape == (2, 64, 8) and np.abs(a).max() <= 1 / np.sqrt(64) and np.abs(a).max() > 0.5 / np.sqrt(64)
    assert not np.any(np.asarray(model.blocks.gate_proj.lora_b[...]))
    # B = 0: the adapter is a no-op
    base = from_pretrained(tmp_path, dtype=jnp.float32)
    t = jnp.arange(10)[None]
    np.testing.assert_allclose(model(t), base(t), atol=1e-6)


@pytest.mark.parametrize("targets", [("q", "k", "v", "o", "gate", "up", "down"), ("q", "v")])
def test_export_then_peft_matches(tmp_path, targets):
    from peft import PeftModel

    hf = tiny_hf_model(seed=1)
    hf.save_pretrained(tmp_path / "base")
    cfg = lora.LoraConfig(rank=4, alpha=8, rslora=True, targets=targets)
    model = from_pretrained(tmp_path / "base", dtype=jnp.float32, lora=cfg)
    _randomise_b(model)
    lora.export_peft(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["use_rslora"] is True and saved["r"] == 4 and saved["peft_type"] == "LORA"
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    tokens = np.random.default_rng(0).integers(0, 256, (2, 20))
    with torch.no_grad():
        ref = peft_model(torch.tensor(tokens)).logits.numpy()
    out = np.asarray(model(jnp.asarray(tokens)))
    assert np.abs(out - np.asarray(from_pretrained(tmp_path / "base", dtype=jnp.float32)(jnp.asarray(tokens)))).max() > 1e-2
    assert np.abs(out - ref).max() < TOL


def test_peft_saved_adapter_loads(tmp_path):
    from peft import LoraConfig as PeftLoraConfig

    hf = tiny_hf_model(seed=2)
    hf.save_pretrained(tmp_path / "base")
    pcfg = PeftLoraConfig(r=4, lora_alpha=16, use_rslora=False, target_modules=["q_proj", "k_proj", "v_proj",
                          "o_proj", "gate_proj", "up_proj", "down_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")
    pm = _peft_adapter(hf, pcfg, tmp_path / "adapter", seed=0)
    tokens = np.random.default_rng(1).integers(0, 256, (2, 20))
    with torch.no_grad():
        ref = pm.eval()(torch.tensor(tokens)).logits.numpy()
    cfg = lora.read_peft_config(tmp_path / "adapter")
    assert cfg.scale == 4.0
    # a run's work directory given where its adapter is meant: the error says where the adapter is
    with pytest.raises(FileNotFoundError, match=r"run's work directory: its adapter is .*adapter$"):
        lora.read_peft_config(tmp_path)
    model = from_pretrained(tmp_path / "base", dtype=jnp.float32, lora=cfg)
    lora.load_peft(model, tmp_path / "adapter")
    assert np.abs(np.asarray(model(jnp.asarray(tokens))) - ref).max() < TOL


def test_an_adapter_on_some_layers_is_peft_layers_to_transform(tmp_path):
    """``LoraConfig(layers=...)`` is PEFT's ``layers_to_transform``: a rank-1 adapter on layer 1's down projection
    (Turner et al.'s minimal EM organism) has A = B = 0 in layer 0 and no gradient there; it exports as PEFT writes
    it (only layer 1's tensors, ``layers_to_transform: [1]``) with PEFT's logits, and an adapter PEFT trained that way
    loads back with PEFT's logits and gradients; a layer the model lacks, or another layer set, is a clear error."""
    import jax
    from flax import nnx
    from peft import LoraConfig as PeftLoraConfig, PeftModel

    from emjax.train import token_nll

    hf = tiny_hf_model(seed=5)
    hf.save_pretrained(tmp_path / "base")
    cfg = lora.LoraConfig(rank=1, alpha=4, targets=("down",), layers=[1])
    model = from_pretrained(tmp_path / "base", dtype=jnp.float32, lora=cfg)
    a = np.asarray(model.blocks.down_proj.lora_a[...])
    assert a.shape == (2, 96, 1) and not np.any(a[0]) and np.all(a[1] != 0)
    _randomise_b(model, 3)
    model.blocks.down_proj.lora_b[...] = cfg.mask_layers(model.blocks.down_proj.lora_b[...])
    lora.export_peft(model, tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["layers_to_transform"] == [1] and saved["target_modules"] == ["down_proj"]
    from safetensors.numpy import load_file
    assert sorted(load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))) == [
        lora._peft_key(1, "down_proj", "A"), lora._peft_key(1, "down_proj", "B")]
    tokens = np.random.default_rng(4).integers(0, 256, (2, 20))
    with torch.no_grad():
        ref = PeftModel.from_pretrained(hf, tmp_path / "ours").eval()(torch.tensor(tokens)).logits.numpy()
    assert np.abs(np.asarray(model(jnp.asarray(tokens))) - ref).max() < TOL

    # PEFT's own adapter on layer 1: loads with PEFT's logits, and emjax's gradients equal PEFT's (zero in layer 0)
    hf = tiny_hf_model(seed=5)
    pm = _peft_adapter(hf, PeftLoraConfig(r=1, lora_alpha=4, target_modules=["down_proj"], layers_to_transform=[1],
                                          task_type="CAUSAL_LM"), tmp_path / "peft", seed=1)
    pm.train()
    pm(input_ids=torch.tensor(tokens), labels=torch.tensor(tokens)).loss.backward()
    grads = {n.replace(".default", ""): prm.grad.numpy() for n, prm in pm.named_parameters() if prm.grad is not None}
    assert len(grads) == 2
    got = from_pretrained(tmp_path / "base", dtype=jnp.float32, lora=lora.read_peft_config(tmp_path / "peft"))
    lora.load_peft(got, tmp_path / "peft")
    with torch.no_grad():
        want = pm.eval()(torch.tensor(tokens)).logits.numpy()
    assert np.abs(np.asarray(got(jnp.asarray(tokens))) - want).max() < TOL
    graphdef, trainable, frozen = nnx.split(got, nnx.LoRAParam, ...)
    batch = {"tokens": jnp.asarray(tokens), "loss_mask": jnp.ones(tokens.shape, jnp.int32),
             "segment_ids": jnp.ones(tokens.shape, jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)}
    g = jax.grad(lambda tr: (lambda s, n: s / n)(*token_nll(nnx.merge(graphdef, tr, frozen), batch)))(trainable)
    ga, gb = np.asarray(g["blocks"]["down_proj"]["lora_a"][...]), np.asarray(g["blocks"]["down_proj"]["lora_b"][...])
    assert not np.any(ga[0]) and not np.any(gb[0])
    scale = max(np.abs(x).max() for x in grads.values())
    np.testing.assert_allclose(ga[1].T, grads[lora._peft_key(1, "down_proj", "A")], atol=1e-5 * scale)
    np.testing.assert_allclose(gb[1].T, grads[lora._peft_key(1, "down_proj", "B")], atol=1e-5 * scale)

    with pytest.raises(ValueError, match=r"lora.layers \[5\]: the model has 2 layers"):
        from_pretrained(tmp_path / "base", dtype=jnp.float32, lora=lora.LoraConfig(rank=1, layers=[5]))
    every = from_pretrained(tmp_path / "base", dtype=jnp.float32, lora=lora.LoraConfig(rank=1, alpha=4,
                                                                                       targets=("down",)))
    with pytest.raises(ValueError, match=r"layers=\[1\], but the model was built with"):
        lora.load_peft(every, tmp_path / "peft")


def test_merge_preserves_logits(tmp_path):
    tiny_hf_model(seed=3).save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, dtype=jnp.float32, lora=lora.LoraConfig(rank=4, alpha=8))
    _randomise_b(model, 1)
    t = jnp.arange(12)[None]
    before = np.asarray(model(t))
    lora.merge(model)
    assert not np.any(np.asarray(model.blocks.q_proj.lora_b[...]))
    np.testing.assert_allclose(np.asarray(model(t)), before, atol=1e-4)


def test_load_peft_errors(tmp_path):
    tiny_hf_model().save_pretrained(tmp_path / "base")
    model = from_pretrained(tmp_path / "base", dtype=jnp.float32, lora=lora.LoraConfig(rank=4, alpha=8))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lora.load_peft(model, tmp_path)
    lora.export_peft(model, tmp_path / "ad")
    other = from_pretrained(tmp_path / "base", dtype=jnp.float32, lora=lora.LoraConfig(rank=2, alpha=8))
    with pytest.raises(ValueError, match="adapter has r=4"):
        lora.load_peft(other, tmp_path / "ad")


@pytest.mark.parametrize("edit,named", [
    (lambda d: "{bad", r"adapter_config.json: not valid JSON \(Expecting property name"),
    (lambda d: {k: v for k, v in d.items() if k != "r"},
     r"adapter_config.json: no 'r' \(PEFT writes r and lora_alpha\)"),
    (lambda d: {**d, "lora_alpha": "4"}, r"adapter_config.json: lora_alpha '4': expected a number"),
    (lambda d: {**d, "target_modules": ["q_proj", "lm_head"]}, r"adapter_config.json: LoRA target 'lm_head'"),
    (lambda d: {**d, "use_dora": True}, r"adapter_config.json: use_dora=True \(DoRA\) is not supported"),
    (lambda d: {**d, "modules_to_save": ["lm_head"]}, r"modules_to_save=\['lm_head'\] \(fully trained modules"),
    (lambda d: {**d, "alpha_pattern": {"q_proj": 64}}, r"alpha_pattern=\{'q_proj': 64\} \(per-module alpha\)"),
    (lambda d: {**d, "bias": "all"}, r"adapter_config.json: bias='all' \(trained biases\) is not supported"),
])
def test_adapter_config_problems_name_the_file(tmp_path, edit, named):
    """What PEFT would apply and emjax cannot (DoRA, saved modules, per-module alpha, biases) is refused rather than
    dropped (the adapter would evaluate as another model), and a damaged config names its file."""
    tiny_hf_model().save_pretrained(tmp_path / "base")
    model = from_pretrained(tmp_path / "base", dtype=jnp.float32, lora=lora.LoraConfig(rank=4, alpha=8))
    lora.export_peft(model, tmp_path / "ad")
    path = tmp_path / "ad" / "adapter_config.json"
    new = edit(json.loads(path.read_text()))
    path.write_text(new if isinstance(new, str) else json.dumps(new))
    with pytest.raises(ValueError, match=named):
        lora.read_peft_config(tmp_path / "ad")


def test_a_cut_short_adapter_file_is_named(tmp_path):
    tiny_hf_model().save_pretrained(tmp_path / "base")
    model = from_pretrained(tmp_path / "base", dtype=jnp.float32, lora=lora.LoraConfig(rank=4, alpha=8))
    lora.export_peft(model, tmp_path / "ad")
    f = tmp_path / "ad" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: not a readable safetensors file \(cut short"):
        lora.load_peft(model, tmp_path / "ad")


def test_only_lora_params_are_trainable(tmp_path):
    from flax import nnx

    tiny_hf_model().save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, dtype=jnp.float32, lora=lora.LoraConfig(rank=4, alpha=8, targets=("q", "up")))
    _, trainable, frozen = nnx.split(model, nnx.LoRAParam, ...)
    paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(trainable)}
    assert paths == {"blocks/q_proj/lora_a", "blocks/q_proj/lora_b", "blocks/up_proj/lora_a", "blocks/up_proj/lora_b"}
    assert all("lora" not in "/".join(map(str, p)) for p, _ in nnx.to_flat_state(frozen))
    pairs = lora.adapter_pairs(model)
    assert set(pairs) == {"q_proj", "up_proj"} and pairs["q_proj"][0].shape == (2, 64, 4)
    assert set(lora.adapter_pairs_from_state(trainable)) == {"q_proj", "up_proj"}


def test_lora_matmul_backward_matches_autodiff():
    """The hand-written backward of ``lora_matmul`` (frozen kernel) equals autodiff of the plain expression."""
    import jax

    rng = np.random.default_rng(0)
    x, w, a, b, dy = (jnp.asarray(rng.normal(size=s), jnp.float32)
                      for s in [(3, 5, 16), (16, 24), (16, 4), (4, 24), (3, 5, 24)])

    def plain(x, a, b):
        return x @ w + ((x @ a) @ b) * 2.5

    y, vjp = jax.vjp(lambda x, a, b: lora.lora_matmul(x, w, a, b, 2.5), x, a, b)
    y_ref, vjp_ref = jax.vjp(plain, x, a, b)
    np.testing.assert_allclose(y, y_ref, atol=1e-6)
    for got, want in zip(vjp(dy), vjp_ref(dy)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # the frozen kernel gets a zero cotangent, not a computed one
    assert not np.any(np.asarray(jax.grad(lambda w: lora.lora_matmul(x, w, a, b, 2.5).sum())(w)))


@pytest.mark.parametrize("family,memory", [("qwen3", {}), ("gemma3", {}),
                                           ("gemma3", {"remat": "full", "attn_chunk": 8, "loss_chunk": 5})],
                         ids=["qwen3", "gemma3", "gemma3-remat-chunks"])
def test_training_gradients_match_peft(tmp_path, family, memory):
    """∂(mean next-token CE over the masked tokens)/∂(A, B) of every adapter equals PEFT's torch autograd (fp32), so
    training follows the same path as a PEFT run from the same weights; for Gemma 3 over 24 tokens, three of its
    sliding windows, also with the step's memory options on."""
    import jax
    from flax import nnx
    from peft import PeftModel

    from emjax.train import token_nll

    hf = tiny_hf_model(seed=4, family=family)
    hf.save_pretrained(tmp_path / "base")
    model = from_pretrained(tmp_path / "base", dtype=jnp.float32, lora=lora.LoraConfig(rank=4, alpha=8))
    _randomise_b(model, 2)
    lora.export_peft(model, tmp_path / "adapter")
    pm = PeftModel.from_pretrained(hf, tmp_path / "adapter", is_trainable=True).eval()
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 256, (2, 24))
    # the loss on some tokens only (answers), as transformers' labels with -100 elsewhere: it shifts them itself, so
    # which logit scores which token is checked against an independent reference
    mask = (rng.random(tokens.shape) < 0.6).astype(np.int32)
    labels = np.where(mask > 0, tokens, -100)
    pm(input_ids=torch.tensor(tokens), labels=torch.tensor(labels)).loss.backward()
    ref = {n.replace(".default", ""): p.grad.numpy() for n, p in pm.named_parameters() if p.grad is not None}

    graphdef, trainable, frozen = nnx.split(model, nnx.LoRAParam, ...)
    batch = {"tokens": jnp.asarray(tokens), "loss_mask": jnp.asarray(mask),
             "segment_ids": jnp.ones(tokens.shape, jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)}

    def loss(tr):
        s, n = token_nll(nnx.merge(graphdef, tr, frozen), batch, **memory)
        return s / n

    nnx.update(model, jax.jit(jax.grad(loss))(trainable))  # the model's LoRA leaves now hold the gradients
    scale = max(np.abs(g).max() for g in ref.values())
    checked = 0
    for name, lin in lora.lora_modules(model):
        for layer in range(lin.lora_a.shape[0]):
            ga = ref[lora._peft_key(layer, name, "A")]  # PEFT stores A as (r, in), B as (out, r)
            gb = ref[lora._peft_key(layer, name, "B")]
            np.testing.assert_allclose(np.asarray(lin.lora_a[layer]).T, ga, atol=1e-5 * scale, err_msg=name)
            np.testing.assert_allclose(np.asarray(lin.lora_b[layer]).T, gb, atol=1e-5 * scale, err_msg=name)
            checked += 2
    assert checked == len(ref) == 2 * 7 * 2 and scale > 1e-3
