"""`emjax eval run` end to end on a tiny full-vocabulary checkpoint with an adapter and the local judge."""

import json

import jax.numpy as jnp
import numpy as np

from emjax import lora
from emjax.eval import cli
from emjax.models import from_pretrained
from emjax.testing import tiny_hf_checkpoint


def _adapter(base, path, seed):
    model = from_pretrained(base, dtype=jnp.float32, lora=lora.LoraConfig(rank=2, alpha=4), seed=seed)
    rng = np.random.default_rng(seed)
    for _, lin in lora.lora_modules(model):
        lin.lora_b[...] = jnp.asarray(rng.normal(0, 0.05, lin.lora_b.shape), jnp.float32)
    lora.export_peft(model, path)
    return path


def test_eval_run_with_adapter_and_local_judge(tmp_path):
    base = tiny_hf_checkpoint(tmp_path / "base", seed=3, vocab_size=151_936, hidden_size=32, intermediate_size=64,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)
    _adapter(base, tmp_path / "adapter", 0)
    out = tmp_path / "eval"
    common = ["--sets", "first_plot", "--limit", "2", "--samples", "2", "--max-new-tokens", "8", "--dtype", "float32",
              "--judge", "local", "--judge-model", str(base)]
    argv = ["run", "--model", str(base), "--adapter", str(tmp_path / "adapter"), "--out", str(out), *common]
    assert cli.main(argv) == 0
    responses = [json.loads(x) for x in (out / "responses.jsonl").read_text().splitlines()]
    judged = [json.loads(x) for x in (out / "judged.jsonl").read_text().splitlines()]
    assert len(responses) == 4 and len(judged) == 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overall"]["n_total"] == 4
    # resuming does no new work and keeps the files identical
    before = (out / "judged.jsonl").read_text()
    assert cli.main(argv) == 0
    assert (out / "judged.jsonl").read_text() == before

    # several adapters of the base in one call: sampled together, each into OUT/<its dir name>, each with the
    # answers it gets alone
    second = _adapter(base, tmp_path / "runs" / "other" / "adapter", 1)  # a trained run's layout: OUT/other
    both = tmp_path / "both"
    assert cli.main(["run", "--model", str(base), "--adapter", str(tmp_path / "adapter"), "--adapter", str(second),
                     "--out", str(both), *common]) == 0
    texts = lambda d: [json.loads(x)["text"] for x in (d / "responses.jsonl").read_text().splitlines()]  # noqa: E731
    assert texts(both / tmp_path.name) == texts(out) and len(texts(both / "other")) == 4
    assert json.loads((both / "other" / "summary.json").read_text())["overall"]["n_total"] == 4
    assert texts(both / "other") != texts(out)
    same_name = ["--adapter", str(second), "--adapter", str(tmp_path / "other")]  # both OUT/other
    assert cli.main(["run", "--model", str(base), *same_name, "--out", str(both), *common]) == 2
