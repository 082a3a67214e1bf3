"""The training hook's checks and bookkeeping that need no model: ``check_eval_config`` before training, and a step
directory left by other eval settings (a resumed run whose config changed)."""

import json

import pytest
import yaml

from emjax import config as cfglib
from emjax.config import ConfigError
from emjax.eval.hook import check_eval_config, make_eval_hook
from emjax.eval.questions import load_questions
from emjax.testing import FakeChatServer
from test_eval_run import IM_END, Tok  # noqa: E402  (tests dir is on sys.path via rootdir conftest)


def _cfg(tmp_path, *overrides):
    return cfglib.load("tiny", [f"workdir={tmp_path / 'run'}", "eval.final=true", "eval.question_sets=[first_plot]",
                                "eval.limit=1", *overrides])


@pytest.mark.parametrize("overrides,named", [
    (["eval.judge=gpt"], "eval.judge 'gpt': use 'local' or 'openai'"),
    (["eval.samples_per_question=0"], "eval.samples_per_question 0: must be >= 1"),
    (["eval.max_new_tokens=0"], "eval.max_new_tokens 0: must be >= 1"),
    (["eval.batch_size=-1"], "eval.batch_size -1: must be >= 1"),
    (["eval.limit=0"], "eval.limit 0: must be >= 1"),
    (["eval.top_p=0"], r"eval.top_p 0.0: must be in \(0, 1\]"),
    (["eval.every=-5", "eval.final=false"], "eval.every -5: must be >= 0"),
    (["eval.judge_checkpoint=/nowhere/Qwen3-32B"], "eval.judge_checkpoint '/nowhere/Qwen3-32B': no such checkpoint"),
    (["eval.question_sets=[first_plot,bogus]"], r"eval.question_sets \['first_plot', 'bogus'\]: unknown question set"),
])
def test_check_eval_config_names_the_key(tmp_path, overrides, named):
    """A bad eval.* value is one ConfigError naming the key, before training (it failed at the first evaluation,
    e.g. max_new_tokens=0 as an IndexError in sampling after the whole training)."""
    with pytest.raises(ConfigError, match=named):
        check_eval_config(_cfg(tmp_path, *overrides))


def test_check_eval_config_accepts_good_settings_and_skips_when_off(tmp_path):
    check_eval_config(_cfg(tmp_path))
    check_eval_config(_cfg(tmp_path, "eval.judge_checkpoint=Qwen/Qwen3-32B"))  # a hub id: fetched when it loads
    check_eval_config(_cfg(tmp_path, "eval.final=false", "eval.max_new_tokens=0", "eval.judge=gpt"))  # off


def test_check_eval_config_wants_the_api_key_without_showing_it(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"eval.judge 'openai': no API key in \$OPENAI_API_KEY"):
        check_eval_config(_cfg(tmp_path, "eval.judge=openai"))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-SECRET")
    check_eval_config(_cfg(tmp_path, "eval.judge=openai"))


def test_check_eval_config_checks_the_question_files(tmp_path):
    """A question file of one's own with a template str.format cannot fill: named (file, question, template)."""
    good = load_questions("first_plot", limit=1)[0].judge_prompts
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump([{"id": "m0", "paraphrases": ["Hi?"],
                                     "judge_prompts": {"aligned": good["aligned"], "coherent": "{question} {ans}"}}]))
    with pytest.raises(ConfigError, match=r"eval.question_sets .*mine\.yaml: question 'm0': key "
                                          r"'judge_prompts\.coherent': unknown field \{ans\}"):
        check_eval_config(_cfg(tmp_path, f"eval.question_sets=[{mine}]"))


class _Sampler:
    """Stands in for a pack's PackSampler: "nice" for every prompt, and how many prompts it was asked for."""

    def __init__(self, tok):
        self.tok, self.asked = tok, 0

    def generate(self, run, prompts, *, max_new_tokens, temperature, top_p, seed):
        self.asked += len(prompts)
        return [self.tok.encode("nice") + [IM_END] for _ in prompts]


def test_hook_sets_aside_answers_of_other_eval_settings(tmp_path, monkeypatch, capsys):
    """A resumed training run whose eval settings changed finds its earlier attempt's answers at a step: the hook
    moves them under eval/superseded/ (kept, out of the reports' eval/step_*) and evaluates that step afresh,
    rather than filing old answers under the new settings or stopping the training; with the same settings it
    resumes them and does no work."""
    server = FakeChatServer()
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("EMJAX_CACHE_DIR", str(tmp_path / "cache"))  # the API judge's disk cache
    tok = Tok()
    tok.eos_ids = (IM_END,)
    try:
        wd = tmp_path / "run"
        cfg = _cfg(tmp_path, "eval.judge=openai", "eval.samples_per_question=2", "eval.max_new_tokens=4")
        sampler = _Sampler(tok)
        assert make_eval_hook(cfg, tok, wd, sampler=sampler)(5, None)["eval/n_total"] == 2
        # 2 answers x 2 kinds; the two answers are the same text, so a request may be answered by the judge's cache
        n = len(server.requests)
        assert 2 <= n <= 4
        step = wd / "eval" / "step_000005"
        meta = json.loads((step / "responses.meta.json").read_text())
        assert meta["model"] == "random init: preset tiny" and meta["max_new_tokens"] == 4
        make_eval_hook(cfg, tok, wd, sampler=sampler)(5, None)  # the same settings: nothing to do
        assert sampler.asked == 2 and len(server.requests) == n

        cfg2 = _cfg(tmp_path, "eval.judge=openai", "eval.samples_per_question=2", "eval.max_new_tokens=6")
        assert make_eval_hook(cfg2, tok, wd, sampler=sampler)(5, None)["eval/n_total"] == 2
        assert sampler.asked == 4
        assert json.loads((step / "responses.meta.json").read_text())["max_new_tokens"] == 6
        old = wd / "eval" / "superseded" / "step_000005"
        assert json.loads((old / "responses.meta.json").read_text())["max_new_tokens"] == 4
        assert (old / "summary.json").exists()
        assert "max_new_tokens: saved 4, now 6" in capsys.readouterr().err
        # another adapter (what trains it changed): set aside too, under a new name
        cfg3 = _cfg(tmp_path, "eval.judge=openai", "eval.samples_per_question=2", "eval.max_new_tokens=6",
                    "optim.learning_rate=0.5")
        make_eval_hook(cfg3, tok, wd, sampler=sampler)(5, None)
        assert (wd / "eval" / "superseded" / "step_000005-2").is_dir() and sampler.asked == 6
    finally:
        server.close()


def test_hook_api_judge_keeps_a_disk_cache(tmp_path, monkeypatch):
    """The hook's API judge caches its answers on disk (in <cache>/judge, as `emjax eval run`'s): a step judged
    again (an evaluation resumed after a stop mid-judging, a re-score with another judge_min_mass) in a later
    process asks the API nothing it asked before."""
    server = FakeChatServer()
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("EMJAX_CACHE_DIR", str(tmp_path / "cache"))
    tok = Tok()
    tok.eos_ids = (IM_END,)
    try:
        wd = tmp_path / "run"
        cfg = _cfg(tmp_path, "eval.judge=openai", "eval.samples_per_question=2", "eval.max_new_tokens=4")
        make_eval_hook(cfg, tok, wd, sampler=_Sampler(tok))(5, None)
        n = len(server.requests)  # 2 answers x 2 kinds: the same text twice, so 2 to 4 (the cache may answer one)
        assert 2 <= n <= 4 and (tmp_path / "cache" / "judge" / "judge_cache.jsonl").is_file()
        (wd / "eval" / "step_000005" / "judged.jsonl").unlink()  # stopped before its rows were written
        assert make_eval_hook(cfg, tok, wd, sampler=_Sampler(tok))(5, None)["eval/n_total"] == 2
        cfg2 = _cfg(tmp_path, "eval.judge=openai", "eval.samples_per_question=2", "eval.max_new_tokens=4",
                    "eval.judge_min_mass=0.5")
        make_eval_hook(cfg2, tok, wd, sampler=_Sampler(tok))(5, None)
        rows = [json.loads(x) for x in (wd / "eval" / "step_000005" / "judged.jsonl").read_text().splitlines()]
        assert [r["min_mass"] for r in rows] == [0.25] * 2 + [0.5] * 2  # scored again, from the cache
        assert len(server.requests) == n
    finally:
        server.close()


def test_training_identity_names_what_trained_the_adapter():
    """The hook's answers identity changes with what trains the adapter (here λ and the optimiser), and not with
    how the step is reported (spectral.metrics_method, free on resume) or computed (remat)."""
    from emjax import config as cfglib
    from emjax.eval.run import training_identity

    base = training_identity(cfglib.load("tiny"))
    for same in (["spectral.metrics_method=cholesky"], ["remat=full"]):
        assert training_identity(cfglib.load("tiny", same)) == base, same
    for other in (["spectral.weight=1.0"], ["optim.name=muon"], ["seed=3"]):
        assert training_identity(cfglib.load("tiny", other))["adapter"] != base["adapter"], other
