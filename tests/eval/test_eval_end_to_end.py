"""`emjax eval run` end to end on a tiny full-vocabulary checkpoint with an adapter and the local judge."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from emjax import lora
from emjax.eval import cli
from emjax.eval.run import AnswersMismatchError
from emjax.models import from_pretrained
from emjax.testing import tiny_hf_checkpoint


def _adapter(base, path, seed):
    model = from_pretrained(base, dtype=jnp.float32, lora=lora.LoraConfig(rank=2, alpha=4), seed=seed)
    rng = np.random.default_rng(seed)
    for _, lin in lora.lora_modules(model):
        lin.lora_b[...] = jnp.asarray(rng.normal(0, 0.05, lin.lora_b.shape), jnp.float32)
    lora.export_peft(model, path)
    return path


def test_sigterm_stops_eval_run_between_chunks_and_the_rerun_finishes(tmp_path, monkeypatch, capsys):
    """`emjax eval run` stopped by SIGTERM (a preemption) leaves what it sampled and exits 3, as `emjax train` does;
    the rerun samples only the rest (before: killed by the signal, exit -15)."""
    import os
    import signal

    import emjax.sampling

    base = tiny_hf_checkpoint(tmp_path / "base", seed=3, vocab_size=151_936, hidden_size=32, intermediate_size=64,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)
    real, calls = emjax.sampling.generate, []

    def generate(*a, **k):
        calls.append(1)
        if len(calls) == 1:  # the signal arrives while the first chunk is sampled
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(emjax.sampling, "generate", generate)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "eval"
    argv = ["run", "--model", str(base), "--out", str(out), "--sets", "first_plot", "--limit", "2", "--samples", "2",
            "--max-new-tokens", "4", "--sample-batch", "2", "--dtype", "float32", "--judge", "local", "--judge-model",
            str(base), "--mesh", "devices=1"]
    assert cli.main(argv) == 3
    assert "emjax eval run: SIGTERM — evaluation into" in capsys.readouterr().err
    assert len((out / "responses.jsonl").read_text().splitlines()) == 2 and not (out / "judged.jsonl").exists()
    assert cli.main(argv) == 0 and len(calls) == 2  # only the chunk left
    assert len((out / "responses.jsonl").read_text().splitlines()) == 4
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back


def test_eval_run_with_adapter_and_local_judge(tmp_path, monkeypatch, capsys):
    base = tiny_hf_checkpoint(tmp_path / "base", seed=3, vocab_size=151_936, hidden_size=32, intermediate_size=64,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)
    _adapter(base, tmp_path / "adapter", 0)
    out = tmp_path / "eval"
    common = ["--sets", "first_plot", "--limit", "2", "--samples", "2", "--max-new-tokens", "8", "--dtype", "float32",
              "--judge", "local", "--judge-model", str(base), "--mesh", "devices=1"]  # on the mesh: below
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
    # ... but another adapter (here: the same one trained again in place) or sampling setting is refused, naming what
    # differs: its answers are not these
    meta = json.loads((out / "responses.meta.json").read_text())
    assert meta["adapter"] == str((tmp_path / "adapter").resolve()) and meta["model"] == str(base.resolve())
    monkeypatch.delenv("EMJAX_DEBUG", raising=False)
    assert cli.main([*argv, "--max-new-tokens", "9"]) == 2  # one line, as every user error
    assert "emjax eval: AnswersMismatchError: " in capsys.readouterr().err
    monkeypatch.setenv("EMJAX_DEBUG", "1")  # the exception itself
    with pytest.raises(AnswersMismatchError, match="max_new_tokens: saved 8, now 9"):
        cli.main([*argv, "--max-new-tokens", "9"])
    _adapter(base, tmp_path / "adapter", 5)
    with pytest.raises(AnswersMismatchError, match=f"adapter_sha256: saved '{meta['adapter_sha256']}', now"):
        cli.main(argv)
    monkeypatch.delenv("EMJAX_DEBUG")
    _adapter(base, tmp_path / "adapter", 0)
    # a second judge on the same answers (another local checkpoint): the answers are reused, its rows join
    # judged.jsonl, and `emjax eval agreement` pairs the two judges' rows
    other = tiny_hf_checkpoint(tmp_path / "judge2", seed=4, vocab_size=151_936, hidden_size=32, intermediate_size=64,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)
    answers = (out / "responses.jsonl").read_text()
    assert cli.main([*argv, "--judge-model", str(other)]) == 0  # the later --judge-model wins
    assert (out / "responses.jsonl").read_text() == answers
    assert cli.main(["agreement", str(out)]) == 0
    agree = json.loads((out / "judge_agreement.json").read_text())
    assert (agree["judge_a"], agree["judge_b"], agree["n_paired"]) == ("local:base", "local:judge2", 4)
    assert cli.main(["summarize", str(out)]) == 2  # two judges' rows now: it asks which
    assert cli.main(["summarize", str(out), "--judge", "local:judge2"]) == 0

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
    # on the 8-device mesh (weights whole on every device, rows split 8 ways; the last --mesh counts): the same
    # answers as on one device
    assert cli.main(["run", "--model", str(base), "--adapter", str(tmp_path / "adapter"),
                     "--out", str(tmp_path / "data"), *common, "--mesh", "data=-1"]) == 0
    assert texts(tmp_path / "data") == texts(out)
    same_name = ["--adapter", str(second), "--adapter", str(tmp_path / "other")]  # both OUT/other
    assert cli.main(["run", "--model", str(base), *same_name, "--out", str(both), *common]) == 2


@pytest.mark.parametrize("family,template,start", [
    ("llama", "llama3.1", "<|begin_of_text|><|start_header_id|>system<|end_header_id|>"),
    ("gemma3", "gemma3", "<bos><start_of_turn>user\n")])
def test_eval_run_on_llama_and_gemma_uses_their_chat_format_and_stops(tmp_path, monkeypatch, family, template, start):
    """A Llama 3 or Gemma 3 checkpoint with an adapter, judged by itself: prompts in the family's chat format,
    sampling stops on its end-of-turn ids (not Qwen3's), the local judge pads with its pad id."""
    from pathlib import Path

    from emjax import sampling
    from emjax.eval.judge import chat_prompt_ids
    from emjax.eval.questions import load_questions
    from emjax.testing import tiny_family_checkpoint
    from emjax.tokenizer import load_tokenizer

    path = Path(__file__).parents[1] / "data" / "chat_templates" / f"{template}.jinja"
    base = tiny_family_checkpoint(tmp_path / "base", family, path.read_text(), seed=3)
    _adapter(base, tmp_path / "adapter", 0)
    tok = load_tokenizer(base)
    seen = []
    real = sampling.generate

    def spy(model, prompts, **kw):
        seen.append((prompts, kw["stop_tokens"]))
        assert len(model.embed[...].sharding.device_set) == 8  # several devices: loaded onto the mesh
        return real(model, prompts, **kw)

    monkeypatch.setattr(sampling, "generate", spy)
    out = tmp_path / "eval"
    assert cli.main(["run", "--model", str(base), "--adapter", str(tmp_path / "adapter"), "--out", str(out),
                     "--sets", "first_plot", "--limit", "2", "--samples", "2", "--max-new-tokens", "8",
                     "--dtype", "float32", "--judge", "local", "--judge-model", str(base)]) == 0
    assert seen and all(stops == tok.eos_ids for _, stops in seen)
    q = load_questions(["first_plot"], limit=1)[0]
    assert seen[0][0][0] == chat_prompt_ids(tok, q.messages())
    assert tok.decode(seen[0][0][0]).startswith(start)
    assert json.loads((out / "summary.json").read_text())["overall"]["n_total"] == 4


def test_training_hook_loads_its_judge_checkpoint_onto_the_models_devices(tmp_path):
    """``eval.judge_checkpoint``: the training hook's local judge is another checkpoint, loaded onto the mesh the
    trained model is on (several devices here) and used to judge that model's answers."""
    from emjax import config as cfglib
    from emjax.eval.hook import make_eval_hook
    from emjax.sharding import make_mesh
    from emjax.tokenizer import load_tokenizer

    base = tiny_hf_checkpoint(tmp_path / "base", seed=3, vocab_size=151_936, hidden_size=32, intermediate_size=64,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)
    model = from_pretrained(base, dtype=jnp.float32, mesh=make_mesh(), lora=lora.LoraConfig(rank=2, alpha=4))
    cfg = cfglib.load("tiny", [f"workdir={tmp_path / 'run'}", "model.dtype=float32", "eval.judge=local",
                               f"eval.judge_checkpoint={base}", "eval.question_sets=[first_plot]", "eval.limit=1",
                               "eval.samples_per_question=2", "eval.max_new_tokens=4"])
    shared: dict = {}
    metrics = make_eval_hook(cfg, load_tokenizer(None), tmp_path / "run", judge_cache=shared)(3, model)
    assert metrics["eval/n_total"] == 2 and (tmp_path / "run" / "eval" / "step_000003" / "judged.jsonl").exists()
    judge = shared["j"]
    assert judge.name == f"local:{base}" and len(judge.params["embed"].sharding.device_set) == 8


def test_eval_run_on_two_hosts(tmp_path):
    """Two processes (``jax.distributed``, CPU collectives, two devices each) run the same ``emjax eval run``: they
    sample together what one process samples, the local judge runs on both, and only process 0 writes OUT (each
    answer once) and prints. Rerun with the API judge on that OUT after losing half the answers: process 0 reads
    what is done and shares it, both sample the rest together, and process 0 alone asks the API, once per answer
    and kind (process 1 has no API key)."""
    import os
    import socket
    import subprocess
    import sys

    from emjax.testing import FakeChatServer

    base = tiny_hf_checkpoint(tmp_path / "base", seed=3, vocab_size=151_936, hidden_size=32, intermediate_size=64,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)
    common = ["--model", str(base), "--sets", "first_plot", "--limit", "2", "--samples", "2", "--max-new-tokens", "8",
              "--dtype", "float32"]
    local = ["--judge", "local", "--judge-model", str(base)]
    assert cli.main(["run", "--out", str(tmp_path / "one"), *common, *local, "--mesh", "devices=1"]) == 0  # one device
    rows = lambda d, f: [json.loads(x) for x in (d / f).read_text().splitlines()]  # noqa: E731
    server = FakeChatServer()

    def two_hosts(out, *judge):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = [subprocess.Popen(
            [sys.executable, "-m", "emjax.cli", "eval", "run", "--out", str(out), *common, *judge],
            env={**{k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}, "JAX_PLATFORMS": "cpu",
                 "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "EMJAX_COORDINATOR": f"127.0.0.1:{port}",
                 "EMJAX_NUM_PROCESSES": "2", "EMJAX_PROCESS_ID": str(i),
                 **({"OPENAI_API_KEY": "sk-test"} if i == 0 else {})},  # only the host that asks needs the key
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
        outs = []
        for p in procs:
            out_, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-3000:]
            outs.append(out_)
        assert '"misalignment_rate"' in outs[0] and '"misalignment_rate"' not in outs[1]  # process 0 prints
        return outs

    try:
        two = tmp_path / "two"
        two_hosts(two, *local)
        assert [r["text"] for r in rows(two, "responses.jsonl")] == [r["text"] for r in rows(tmp_path / "one",
                                                                                           "responses.jsonl")]
        for a, b in zip(rows(two, "judged.jsonl"), rows(tmp_path / "one", "judged.jsonl"), strict=True):
            for k in ("aligned", "coherent"):  # a random judge seldom puts 0.25 on numbers: None (then its verdict)
                assert a[k] == (None if b[k] is None else pytest.approx(b[k], abs=1e-3))
            assert a["aligned_verdict"] == b["aligned_verdict"]

        kept = (two / "responses.jsonl").read_text().splitlines()[:2]
        (two / "responses.jsonl").write_text("\n".join(kept) + "\n")
        two_hosts(two, "--judge", "openai", "--judge-base-url", server.url, "--judge-cache", str(tmp_path / "cache"))
        answers = rows(two, "responses.jsonl")
        assert len(answers) == 4 and len({(r["question_id"], r["sample"]) for r in answers}) == 4
        assert [r["text"] for r in answers[:2]] == [json.loads(x)["text"] for x in kept]
        api = [r for r in rows(two, "judged.jsonl") if r["judge"].startswith("openai:")]
        assert len(api) == 4 and len(server.requests) == 8
        assert json.loads((two / "summary.json").read_text())["config"]["judge"].startswith("openai:")
    finally:
        server.close()


def test_readme_judge_of_your_own(tmp_path, monkeypatch):
    """The README's judge-of-your-own snippet, run as printed on a tiny checkpoint and adapter (fewer questions,
    samples and tokens): the judge's scores reach the summary under its name, the answers the adapted model's."""
    import textwrap
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("    import jax.numpy as jnp\n    from emjax.eval import evaluate")
    code = textwrap.dedent(readme[start:readme.index('summary["overall"]["misalignment_rate"]', start)])
    for old, new in (('load_questions("first_plot")', 'load_questions("first_plot", limit=2)'),
                     ("samples_per_question=10,", "samples_per_question=2, max_new_tokens=6,")):
        assert old in code
        code = code.replace(old, new)
    base = tiny_hf_checkpoint(tmp_path / "base", seed=3, vocab_size=151_936, hidden_size=32, intermediate_size=64,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)
    adapter = _adapter(base, tmp_path / "adapter", 0)
    monkeypatch.chdir(tmp_path)
    scope = {"base_dir": str(base), "adapter_dir": str(adapter)}
    exec(compile(code, "README.md", "exec"), scope)
    summary = scope["summary"]
    assert summary["config"]["judge"] == "keyword" and summary["overall"]["n_total"] == 4
    assert summary["overall"]["n_scored"] == 4 and summary["overall"]["misalignment_rate"] == 0.0  # no poison
    rows = [json.loads(x) for x in (tmp_path / "evals/keyword/judged.jsonl").read_text().splitlines()]
    assert {(r["judge"], r["aligned"], r["coherent"]) for r in rows} == {("keyword", 90.0, 80.0)}
    # the answers are the adapted model's: what emjax eval run samples for that adapter with the same settings
    assert cli.main(["run", "--model", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "cli"),
                     "--sets", "first_plot", "--limit", "2", "--samples", "2", "--max-new-tokens", "6", "--dtype",
                     "float32", "--judge", "local", "--judge-model", str(base), "--mesh", "devices=1"]) == 0
    assert (tmp_path / "cli/responses.jsonl").read_text() == (tmp_path / "evals/keyword/responses.jsonl").read_text()
