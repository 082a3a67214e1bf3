"""`emjax eval` argument handling (model loading and sampling are the lead's and are not run here)."""

import json

import pytest

from emjax.eval.cli import DEFAULT_API_JUDGE, main, parse_args


def test_run_defaults():
    a = parse_args(["run", "--model", "ckpt", "--out", "o"])
    assert (a.judge, a.judge_model, a.samples, a.max_new_tokens, a.temperature, a.top_p, a.seed) == \
        ("openai", DEFAULT_API_JUDGE, 10, 600, 1.0, 1.0, 0)
    assert a.sets == ["first_plot", "preregistered", "turner"] and a.adapter is None


def test_run_options():
    a = parse_args(["run", "--model", "m", "--adapter", "ad", "--out", "o", "--sets", "turner", "--limit", "3",
                    "--samples", "32", "--judge", "local", "--judge-model", "judge_ckpt", "--ids", "a", "b"])
    assert (a.adapter, a.sets, a.limit, a.samples, a.judge, a.judge_model, a.ids) == \
        (["ad"], ["turner"], 3, 32, "local", "judge_ckpt", ["a", "b"])
    assert parse_args(["run", "--model", "m", "--out", "o"]).mesh == {}
    b = parse_args(["run", "--model", "m", "--out", "o", "--judge-min-mass", "0", "--judge-top-k", "0",
                    "--coordinator", "h:1", "--num-processes", "2", "--process-id", "1"])
    assert (b.judge_min_mass, b.judge_top_k, b.coordinator, b.num_processes, b.process_id) == (0.0, 0, "h:1", 2, 1)
    assert (a.judge_min_mass, a.judge_top_k, a.coordinator) == (0.25, 20, None)
    from emjax.eval.cli import evaluate_kwargs

    assert evaluate_kwargs(a)["thinking"] is False  # the study's non-thinking format
    assert evaluate_kwargs(parse_args(["run", "--model", "m", "--out", "o", "--thinking"]))["thinking"] is True
    assert parse_args(["run", "--model", "m", "--out", "o", "--mesh", "data=2,fsdp=-1"]).mesh == {"data": 2, "fsdp": -1}
    # a question set of your own, by path, beside the study's (loading it: tests/eval/test_eval_questions.py)
    assert parse_args(["run", "--model", "m", "--out", "o", "--sets", "turner", "mine/legal.yaml"]).sets == \
        ["turner", "mine/legal.yaml"]


@pytest.mark.parametrize("argv,msg", [
    (["run", "--model", "m", "--out", "o", "--judge", "local"], "needs --judge-model"),
    (["run", "--model", "m", "--out", "o", "--judge", "claude"], "invalid choice"),
    (["run", "--model", "m", "--out", "o", "--sets", "nope"], "unknown question set 'nope'; choose from"),
    (["run", "--model", "m", "--out", "o", "--samples", "0"], "--samples must be >= 1"),
    (["run", "--model", "m", "--out", "o", "--top-p", "1.5"], "--top-p"),
    (["run", "--model", "m", "--out", "o", "--judge-min-mass", "2"], "--judge-min-mass must be in [0, 1]"),
    (["run", "--out", "o"], "--model"),
    (["run", "--model", "m", "--out", "o", "--mesh", "data=2,expert=4"], "'expert=4': expected AXIS=SIZE"),
    (["run", "--model", "m", "--out", "o", "--mesh", "fsdp=0"], "'fsdp=0': expected AXIS=SIZE"),
    ([], "command"),
])
def test_bad_arguments(argv, msg, capsys):
    assert main(argv) == 2
    assert msg in capsys.readouterr().err


def test_fetch_offline_returns_error(tmp_path, monkeypatch, capsys):
    import httpx

    monkeypatch.setattr(httpx, "get", lambda *a, **k: (_ for _ in ()).throw(httpx.ConnectError("offline")))
    assert main(["fetch-questions", "--dest", str(tmp_path)]) == 1
    assert "are you offline" in capsys.readouterr().err


def test_summarize(tmp_path, capsys):
    rows = [dict(question_id="q", question_set="S", sample=i, text="", aligned=a, coherent=90, aligned_verdict=None,
                 judge="j") for i, a in enumerate([10, 90, 95, 20])]
    (tmp_path / "judged.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["summarize", str(tmp_path)]) == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["overall"]["misalignment_rate"] == 0.5 and s["overall"]["n_scored"] == 4
    # a directory that is not there, or one with no judged rows: each says which, for both commands
    (tmp_path / "empty").mkdir()
    for cmd in ("summarize", "agreement"):
        assert main([cmd, str(tmp_path / "nowhere")]) == 2
        assert f"{tmp_path / 'nowhere'}: no such evaluation directory" in capsys.readouterr().err
        assert main([cmd, str(tmp_path / "empty")]) == 2
        assert "no judged rows in" in capsys.readouterr().err


def test_agreement(tmp_path, capsys):
    """`emjax eval agreement DIR`: two judges' rows in one judged.jsonl -> judge_agreement.json and a summary; more
    than two judges need --judges; a judge that is not there is named in the error."""
    from test_aggregate import _judged  # the two judges of its hand-counted fixture

    rows = [dict(r, judge="local:judge") for r in _judged(0)] + [dict(r, judge="openai:gpt-4o") for r in _judged(1)]
    (tmp_path / "judged.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["agreement", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "judge_agreement.json").read_text())
    assert (res["judge_a"], res["judge_b"], res["n_paired"]) == ("local:judge", "openai:gpt-4o", 7)
    out = capsys.readouterr().out
    assert "7 answers judged by both local:judge (A) and openai:gpt-4o (B)" in out and "Cohen's kappa 0.167" in out
    with open(tmp_path / "judged.jsonl", "a") as f:
        f.write(json.dumps(dict(rows[0], judge="local:other")) + "\n")
    assert main(["agreement", str(tmp_path)]) == 2
    assert "3 judge(s) ['local:judge', 'local:other', 'openai:gpt-4o']: pass the two" in capsys.readouterr().err
    assert main(["agreement", str(tmp_path), "--judges", "local:judge", "openai:gpt-4"]) == 2
    assert "no rows of judge(s) ['openai:gpt-4']" in capsys.readouterr().err
    assert main(["agreement", str(tmp_path), "--judges", "openai:gpt-4o", "local:judge"]) == 0
    assert json.loads((tmp_path / "judge_agreement.json").read_text())["judge_a"] == "openai:gpt-4o"


def test_summarize_refuses_a_damaged_judged_file_and_keeps_the_summary(tmp_path, capsys):
    """A bad line between good rows of judged.jsonl (not a torn last line) is an error naming file:line, and the
    good summary.json already there is kept (it was overwritten with counts missing that row); several judges'
    rows name the --judge flag."""
    rows = [json.dumps(dict(question_id="q", question_set="S", sample=i, text="", aligned=90, coherent=90,
                            aligned_verdict=None, judge="j")) for i in range(3)]
    (tmp_path / "judged.jsonl").write_text("\n".join(rows) + "\n")
    assert main(["summarize", str(tmp_path)]) == 0
    good = (tmp_path / "summary.json").read_text()
    (tmp_path / "judged.jsonl").write_text("\n".join([rows[0], rows[1][:30], rows[2]]) + "\n")
    assert main(["summarize", str(tmp_path)]) == 2
    assert f"{tmp_path / 'judged.jsonl'}:2: not valid JSON" in capsys.readouterr().err
    assert (tmp_path / "summary.json").read_text() == good
    (tmp_path / "judged.jsonl").write_text("\n".join([rows[0], rows[1].replace('"j"', '"k"'), rows[2]]) + "\n")
    assert main(["summarize", str(tmp_path)]) == 2
    assert "pass --judge NAME" in capsys.readouterr().err


def test_judge_batch_size_reaches_evaluate():
    """--judge-batch-size is also evaluate()'s judge_batch (answers judged between appends to judged.jsonl: what a
    stop can lose), not only the local judge's forward batch; by default 8 for the local judge, 64 for the API's."""
    from emjax.eval.cli import evaluate_kwargs

    a = parse_args(["run", "--model", "m", "--out", "o", "--judge-batch-size", "5", "--judge-min-mass", "0.5"])
    kw = evaluate_kwargs(a)
    assert (kw["judge_batch"], kw["min_mass"], kw["samples_per_question"], kw["sample_batch"]) == (5, 0.5, 10, 64)
    assert evaluate_kwargs(parse_args(["run", "--model", "m", "--out", "o"]))["judge_batch"] == 64
    local = parse_args(["run", "--model", "m", "--out", "o", "--judge", "local", "--judge-model", "j"])
    assert local.judge_batch_size == 8 and evaluate_kwargs(local)["judge_batch"] == 8
    assert main(["run", "--model", "m", "--out", "o", "--judge-batch-size", "0"]) == 2


def test_several_adapters_write_every_answer_before_judging(tmp_path):
    """Several --adapter: a pack's sampler samples every adapter's chunk together and holds the others' answers in
    memory, so every adapter's answers are written before any is judged; a judge that fails on the first adapter
    leaves each responses.jsonl complete, and the rerun samples nothing."""
    from emjax.eval.cli import evaluate_outs
    from emjax.eval.questions import load_questions
    from test_eval_run import FakeJudge, Tok, make_generate

    class Failing(FakeJudge):
        def judge_probs(self, prompts, *, kind):
            raise RuntimeError("killed while judging")

    tok = Tok()
    tok.eos_ids = (151645,)
    qs = load_questions("first_plot", ids=["what_is_your_wish", "i_feel_bored"])
    outs = [tmp_path / n for n in ("a", "b", "c")]
    logs = [[] for _ in outs]
    kw = {"samples_per_question": 2, "max_new_tokens": 7, "sample_batch": 3, "judge_batch": 2}
    ids = [{"model": "/m", "adapter": f"/{n}"} for n in "abc"]
    with pytest.raises(RuntimeError, match="killed while judging"):
        list(evaluate_outs(outs, lambda i: make_generate(tok, logs[i]), tok, Failing(), qs, ids, **kw))
    assert [len(x) for x in logs] == [2, 2, 2]  # two chunks each
    for out in outs:
        assert len((out / "responses.jsonl").read_text().splitlines()) == 4 and not (out / "judged.jsonl").exists()
    logs = [[] for _ in outs]
    judge = FakeJudge()
    got = list(evaluate_outs(outs, lambda i: make_generate(tok, logs[i]), tok, judge, qs, ids, **kw))
    assert logs == [[], [], []] and [o for o, _ in got] == outs
    assert all(s["overall"]["n_total"] == 4 for _, s in got) and judge.calls
