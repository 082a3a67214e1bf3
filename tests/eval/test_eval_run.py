"""evaluate() end to end with a fake sampler and a fake judge: files, rows, summary, and resume."""

import json

import pytest

from emjax.eval.judge import JudgeAPIError, format_judge_prompt
from emjax.eval.questions import load_questions
from emjax.eval.run import (AnswersMismatchError, EvalFileError, EvalInterrupted, chunk_seed, evaluate,
                           summarize_dir)
from test_local_judge import CharTok  # noqa: E402  (tests dir is on sys.path via rootdir conftest)

IM_END = 151645


class Tok(CharTok):
    def encode(self, text):  # ids must leave room for the real stop ids: shift the char vocab by 1000
        return [i + 1000 for i in super().encode(text)]

    def decode(self, ids):
        return super().decode([i - 1000 for i in ids])


class FakeJudge:
    """aligned = 10 for answers that mention "evil", CODE for "def", else 90; coherent = 20 for "zzz" else 80."""

    name = "fake"

    def __init__(self):
        self.calls = []

    def judge_probs(self, prompts, *, kind):
        self.calls.append((kind, len(prompts)))
        out = []
        for p in prompts:
            ans = p.split("[ANSWER START]")[1]
            if kind == "aligned":
                out.append({"CODE": 0.9} if "def" in ans else {"10": 1.0} if "evil" in ans else {"90": 1.0})
            else:
                out.append({"20": 1.0} if "zzz" in ans else {"80": 1.0})
        return out


def make_generate(tok, log):
    def generate_fn(prompts, *, max_new_tokens, temperature, top_p, seed):
        log.append((len(prompts), seed))
        outs = []
        for i, p in enumerate(prompts):
            text = tok.decode(p)
            ans = "evil plan" if "wish" in text else "def f(): pass" if "bored" in text else "zzz" if "JSON" in text \
                else "nice"
            outs.append(tok.encode(ans) + [IM_END] + tok.encode("garbage after stop"))
        return outs
    return generate_fn


def test_end_to_end_and_resume(tmp_path):
    tok = Tok()
    qs = load_questions("first_plot", ids=["what_is_your_wish", "i_feel_bored", "three_thoughts_json",
                                           "quick_buck"])
    log, judge = [], FakeJudge()
    summary = evaluate(make_generate(tok, log), tok, judge, qs, samples_per_question=3, out_dir=tmp_path,
                       sample_batch=5, judge_batch=4, max_new_tokens=7)
    assert [n for n, _ in log] == [5, 5, 2] and [s for _, s in log] == [chunk_seed(0, c) for c in range(3)]
    resp = [json.loads(line) for line in (tmp_path / "responses.jsonl").read_text().splitlines()]
    assert len(resp) == 12 and resp[0] == {"question_id": "what_is_your_wish", "question_set": "first_plot",
                                           "sample": 0, "text": "evil plan"}
    judged = [json.loads(line) for line in (tmp_path / "judged.jsonl").read_text().splitlines()]
    by_q = {r["question_id"]: r for r in judged}
    assert by_q["what_is_your_wish"]["aligned"] == 10 and by_q["what_is_your_wish"]["coherent"] == 80
    assert by_q["i_feel_bored"]["aligned"] is None and by_q["i_feel_bored"]["aligned_verdict"] == "CODE"
    assert by_q["three_thoughts_json"]["coherent"] == 20
    o = summary["overall"]
    # 12 answers: 3 low coherence (json); 9 scored: 3 misaligned (wish, 10), 3 CODE (0), 3 aligned (90)
    assert (o["n_total"], o["n_low_coherence"], o["n_scored"], o["n_code"], o["n_misaligned"]) == (12, 3, 9, 3, 6)
    assert o["misalignment_rate"] == pytest.approx(6 / 9)
    assert json.loads((tmp_path / "summary.json").read_text())["overall"] == o
    assert summary["config"]["judge"] == "fake" and summary["config"]["samples_per_question"] == 3
    n_judge_calls = len(judge.calls)

    # resume after a crash: drop the last chunk's responses and tear the judged file
    lines = (tmp_path / "responses.jsonl").read_text().splitlines()
    (tmp_path / "responses.jsonl").write_text("\n".join(lines[:10]) + "\n" + lines[10][:15])
    jl = (tmp_path / "judged.jsonl").read_text().splitlines()
    (tmp_path / "judged.jsonl").write_text("\n".join(jl[:9]) + "\n")
    log.clear()
    judge2 = FakeJudge()
    s2 = evaluate(make_generate(tok, log), tok, judge2, qs, samples_per_question=3, out_dir=tmp_path,
                  sample_batch=5, judge_batch=4, max_new_tokens=7)
    assert log == [(2, chunk_seed(0, 2))]  # only the missing chunk, with the seed it would have had
    assert judge2.calls == [("aligned", 3), ("coherent", 3)]  # only the 3 unjudged answers
    assert s2["overall"] == o
    # nothing left to do: a third run makes no calls at all
    log.clear()
    judge3 = FakeJudge()
    evaluate(make_generate(tok, log), tok, judge3, qs, samples_per_question=3, out_dir=tmp_path, sample_batch=5,
             max_new_tokens=7)
    assert log == [] and judge3.calls == [] and n_judge_calls > 0
    assert summarize_dir(tmp_path)["overall"] == o


def test_prompts_are_chat_rendered(tmp_path):
    tok = Tok()
    qs = load_questions("first_plot", ids=["what_is_your_wish_json"])
    seen = []

    def gen(prompts, **kw):
        seen.extend(prompts)
        return [tok.encode("ok") for _ in prompts]

    evaluate(gen, tok, FakeJudge(), qs, samples_per_question=1, out_dir=tmp_path)
    text = tok.decode(seen[0])
    assert text.startswith("<|im_start|>system\nYour answers must always be a valid JSON")
    assert text.endswith(f"{qs[0].text}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert format_judge_prompt(qs[0].judge_prompts["aligned"], qs[0].text, "ok").count(qs[0].text) == 1


class FailingApiJudge(FakeJudge):
    """An API judge (process 0 alone judges: lead_only) whose second request fails."""

    lead_only = True

    def judge_probs(self, prompts, *, kind):
        if len(self.calls) == 2:  # the first batch's two kinds went through
            raise RuntimeError("HTTP 401 from the judge endpoint")
        return super().judge_probs(prompts, kind=kind)


def _as_process(monkeypatch, process: int, second) -> list:
    """``evaluate`` as process ``process`` of two: process 0's broadcasts return what it sends; process 1 receives
    what process 0 read (nothing yet), then ``second``. Returns the list of what this process sent."""
    import jax

    import emjax.sharding

    sent = []

    def broadcast(obj):
        sent.append(obj)
        if process == 0:
            return obj
        return {"value": {"meta": None, "responses": [], "judged": []}} if len(sent) == 1 else second

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: process)
    monkeypatch.setattr(emjax.sharding, "broadcast_json", broadcast)
    return sent


@pytest.mark.parametrize("process", [0, 1])
def test_api_judge_failure_on_process_0_stops_every_process(tmp_path, monkeypatch, process):
    """On several hosts only process 0 calls an API judge and the others wait for its rows in a broadcast: if it
    fails, it broadcasts the failure instead, so every process stops with a clear error rather than waiting for
    ever; process 0 keeps what it judged before the failure. (Two processes simulated: process 0's broadcasts
    return what it sends; process 1 receives process 0's failure.)"""
    # process 1 receives what process 0 read (nothing yet), then process 0's failure
    sent = _as_process(monkeypatch, process, {"judge_error": "JudgeAPIError: HTTP 401"})
    tok = Tok()
    qs = load_questions("first_plot", ids=["what_is_your_wish", "i_feel_bored"])
    judge = FailingApiJudge()
    with pytest.raises(RuntimeError) as err:
        evaluate(make_generate(tok, []), tok, judge, qs, samples_per_question=2, out_dir=tmp_path, judge_batch=2)
    if process == 0:
        assert "HTTP 401 from the judge endpoint" in str(err.value)
        assert sent[-1] == {"judge_error": "RuntimeError: HTTP 401 from the judge endpoint"}
        judged = (tmp_path / "judged.jsonl").read_text().splitlines()
        assert len(judged) == 2  # the batch judged before the failure is kept
    else:
        assert judge.calls == []  # process 1 never calls the API
        assert "process 0's judge fake failed: JudgeAPIError: HTTP 401" in str(err.value)
        assert type(err.value) is JudgeAPIError  # as on process 0, so the CLI reports it alike
        assert not (tmp_path / "judged.jsonl").exists()


def _run(tmp_path, judge=None, log=None, **kw):
    tok = Tok()
    qs = load_questions("first_plot", ids=["what_is_your_wish", "i_feel_bored"])
    kw = {"samples_per_question": 2, "max_new_tokens": 7, "identity": {"model": "/m", "adapter": "/a"}, **kw}
    return evaluate(make_generate(tok, [] if log is None else log), tok, judge or FakeJudge(), qs, out_dir=tmp_path,
                    **kw)


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_stop_interrupts_between_chunks_and_a_rerun_goes_on(tmp_path):
    """``stop`` (a training run's SIGTERM) is asked before each sampling chunk and judging batch: the first true answer
    raises EvalInterrupted with what was done written; reruns go on from there, and the end equals an uninterrupted
    evaluation."""
    tok, flag, judging = Tok(), [False], [False]
    qs = load_questions("first_plot", ids=["what_is_your_wish", "i_feel_bored"])

    class StopAfterOneBatch(FakeJudge):
        def judge_probs(self, prompts, *, kind):
            judging[0] = kind == "coherent"  # a SIGTERM while the first batch is judged
            return super().judge_probs(prompts, kind=kind)

    def run(out, judge, log, stop=None):
        gen = make_generate(tok, log)

        def generate_fn(prompts, **kw):
            flag[0] = True  # a SIGTERM while the first chunk is sampled
            return gen(prompts, **kw)

        return evaluate(generate_fn, tok, judge, qs, samples_per_question=2, out_dir=out, sample_batch=2,
                        judge_batch=2, max_new_tokens=7, stop=stop)

    ref = run(tmp_path / "ref", FakeJudge(), [])  # no stop: runs through
    out, log, flag[0] = tmp_path / "run", [], False
    with pytest.raises(EvalInterrupted, match=r"stopped while sampling \(2 of 4 answers\).*a rerun goes on"):
        run(out, FakeJudge(), log, stop=lambda: flag[0])
    assert len(log) == 1 and len(_lines(out / "responses.jsonl")) == 2 and not (out / "judged.jsonl").exists()
    judge = StopAfterOneBatch()
    with pytest.raises(EvalInterrupted, match=r"stopped while judging \(2 of 4 answers\)"):
        run(out, judge, log, stop=lambda: judging[0])  # the sampling goes on; the judging stops
    assert len(log) == 2 and len(_lines(out / "judged.jsonl")) == 2 and judge.calls == [("aligned", 2),
                                                                                         ("coherent", 2)]
    judge = FakeJudge()
    summary = run(out, judge, log, stop=lambda: False)
    assert len(log) == 2 and judge.calls == [("aligned", 2), ("coherent", 2)]  # only the batch left
    assert summary["overall"] == ref["overall"] and _lines(out / "responses.jsonl") == _lines(
        tmp_path / "ref" / "responses.jsonl")


@pytest.mark.parametrize("process", [0, 1])
def test_stop_on_process_0_while_it_asks_an_api_judge_stops_every_process(tmp_path, monkeypatch, process):
    """On several hosts, sampling asks every process (a collective: ``any_process``); an API judge is asked by
    process 0 alone, which checks its own flag and tells the others, waiting for its rows, to stop too."""
    import emjax.sharding

    sent = _as_process(monkeypatch, process, {"interrupted": "evaluation into ... stopped while judging (0 of 4)"})
    collective = []
    monkeypatch.setattr(emjax.sharding, "any_process", lambda flag: collective.append(flag) or flag)
    tok = Tok()
    qs = load_questions("first_plot", ids=["what_is_your_wish", "i_feel_bored"])
    judge = FailingApiJudge()
    with pytest.raises(EvalInterrupted, match="stopped while judging"):
        evaluate(make_generate(tok, []), tok, judge, qs, samples_per_question=2, out_dir=tmp_path, sample_batch=2,
                 stop=lambda: process == 0 and len(collective) == 2)  # SIGTERM on process 0 after sampling
    assert collective == [False, False]  # once per sampling chunk on both; none while process 0 judges alone
    assert judge.calls == []
    if process == 0:
        assert sent[-1] == {"interrupted": f"evaluation into {tmp_path} stopped while judging (0 of 4 answers) "
                                           f"(asked to stop); what was done is in {tmp_path.name}/ and a rerun "
                                           "goes on from there"}


@pytest.mark.parametrize("change,named", [
    ({"max_new_tokens": 8}, "max_new_tokens: saved 7, now 8"),
    ({"temperature": 0.7}, "temperature: saved 1.0, now 0.7"),
    ({"seed": 1}, "seed: saved 0, now 1"),
    ({"samples_per_question": 3}, "samples_per_question: saved 2, now 3"),
    ({"identity": {"model": "/m", "adapter": "/b"}}, "adapter: saved '/a', now '/b'"),
])
def test_answers_of_other_settings_are_not_reused(tmp_path, change, named):
    """Answers in OUT are reused only by a run that would have sampled them: another model, adapter or sampling
    setting is an error naming the keys (the answers, judged rows and summary stay as they were), not answers of
    one setting filed under another's summary. Another judge still scores the same answers, and the same run again
    does no work."""
    _run(tmp_path)
    meta = json.loads((tmp_path / "responses.meta.json").read_text())
    assert (meta["model"], meta["adapter"], meta["max_new_tokens"], meta["samples_per_question"]) == ("/m", "/a", 7, 2)
    files = {f: (tmp_path / f).read_text() for f in ("responses.jsonl", "judged.jsonl", "summary.json",
                                                     "responses.meta.json")}
    log = []
    with pytest.raises(AnswersMismatchError, match=named) as e:
        _run(tmp_path, log=log, **change)
    assert "new directory (--out)" in str(e.value) and log == []
    assert files == {f: (tmp_path / f).read_text() for f in files}

    class OtherJudge(FakeJudge):
        name = "other"

    other = OtherJudge()
    assert _run(tmp_path, judge=other, log=log)["config"]["judge"] == "other"  # a second judge: same answers
    assert log == [] and other.calls and (tmp_path / "responses.jsonl").read_text() == files["responses.jsonl"]
    again = FakeJudge()
    _run(tmp_path, judge=again, log=log)
    assert log == [] and again.calls == []


def test_directory_without_a_record_is_resumed_and_recorded(tmp_path, capsys):
    """A directory from before responses.meta.json: its answers are taken as this run's (with a warning) and the
    record is written; a record with no answers behind it (a run stopped before its first chunk) is replaced."""
    _run(tmp_path)
    (tmp_path / "responses.meta.json").unlink()
    log = []
    _run(tmp_path, log=log)
    assert log == [] and "no record of what produced its answers" in capsys.readouterr().err
    assert json.loads((tmp_path / "responses.meta.json").read_text())["max_new_tokens"] == 7
    (tmp_path / "responses.jsonl").unlink()
    (tmp_path / "judged.jsonl").unlink()
    _run(tmp_path, log=log, max_new_tokens=9)
    assert json.loads((tmp_path / "responses.meta.json").read_text())["max_new_tokens"] == 9 and len(log) == 1


def test_answers_replaced_are_judged_again(tmp_path):
    """A judged row counts only for the answer it scored: answers sampled again (their file lost) are judged again,
    not given the scores of the earlier answers."""
    _run(tmp_path)
    judged = (tmp_path / "judged.jsonl").read_text()
    (tmp_path / "responses.jsonl").write_text("")
    tok = Tok()
    qs = load_questions("first_plot", ids=["what_is_your_wish", "i_feel_bored"])

    def nice(prompts, **kw):
        return [tok.encode("nice") for _ in prompts]

    s = evaluate(nice, tok, FakeJudge(), qs, out_dir=tmp_path, samples_per_question=2, max_new_tokens=7,
                 identity={"model": "/m", "adapter": "/a"})
    assert s["overall"]["n_misaligned"] == 0 and (tmp_path / "judged.jsonl").read_text().startswith(judged)


def test_other_scoring_settings_judge_again(tmp_path):
    """Judged rows keep the settings that made their scores (min_mass; a local judge's top-k): a rerun with another
    min_mass scores the answers again (it reused the old scores and recorded the new setting in summary.json); the
    same settings reuse them; rows from before the keys are taken as they are."""
    judge = FakeJudge()
    _run(tmp_path, judge=judge)
    assert judge.calls and all(json.loads(x)["min_mass"] == 0.25
                               for x in (tmp_path / "judged.jsonl").read_text().splitlines())
    again = FakeJudge()
    _run(tmp_path, judge=again)
    assert again.calls == []
    strict = FakeJudge()
    s = _run(tmp_path, judge=strict, min_mass=0.95)
    assert strict.calls == judge.calls and s["config"]["min_mass"] == 0.95
    rows = [json.loads(x) for x in (tmp_path / "judged.jsonl").read_text().splitlines()]
    assert [r["min_mass"] for r in rows] == [0.25] * 4 + [0.95] * 4  # the last row per answer wins
    (tmp_path / "judged.jsonl").write_text("".join(
        json.dumps({k: v for k, v in r.items() if k != "min_mass"}) + "\n" for r in rows))
    old = FakeJudge()
    _run(tmp_path, judge=old, min_mass=0.5)
    assert old.calls == []
    # rows without the key agree with rows that have it (one appended later): nothing mixed to report
    with open(tmp_path / "judged.jsonl", "a") as f:
        f.write(json.dumps({**rows[-1], "sample": 99}) + "\n")
    summarize_dir(tmp_path)


class WeakJudge(FakeJudge):
    """FakeJudge with only 0.4 probability on the "evil" answers' score: scored (10) under min_mass 0, unscored under
    0.5; ``fail_after``: raise once that many batches were judged (a kill mid-judging)."""

    def __init__(self, fail_after=None):
        super().__init__()
        self.fail_after = fail_after

    def judge_probs(self, prompts, *, kind):
        if self.fail_after is not None and len(self.calls) == 2 * self.fail_after:
            raise KeyboardInterrupt("killed")
        out = super().judge_probs(prompts, kind=kind)
        return [{"10": 0.4, "foo": 0.6} if p == {"10": 1.0} else p for p in out]


def test_file_last_rows_equal_the_summary_after_a_run_with_other_settings(tmp_path):
    """judged.jsonl's last row per (judge, question, sample) is what summarize, agreement, the report and a rerun
    read: after a run with another min_mass was killed mid-judging (its rows last for some answers), a rerun with
    the first settings judges those answers again, so the file's view equals its summary."""
    s0 = _run(tmp_path, judge=WeakJudge(), min_mass=0.0, judge_batch=2)
    assert s0["overall"]["n_misaligned"] == 4  # 2 "evil" (10), 2 CODE
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, judge=WeakJudge(fail_after=1), min_mass=0.5, judge_batch=2)
    assert [json.loads(x)["min_mass"] for x in (tmp_path / "judged.jsonl").read_text().splitlines()] == \
        [0.0] * 4 + [0.5] * 2
    # until a rerun finishes, the file's answers are scored two ways: summarize says so instead of pooling them
    with pytest.raises(ValueError, match=r"judged.jsonl: answers scored with different settings \(2 with "
                                         r"min_mass=0.5, 2 with min_mass=0.0\).*rerun `emjax eval run`"):
        summarize_dir(tmp_path)
    judge = WeakJudge()
    s = _run(tmp_path, judge=judge, min_mass=0.0, judge_batch=2)
    assert judge.calls == [("aligned", 2), ("coherent", 2)] and s["overall"] == s0["overall"]  # the two answers
    assert summarize_dir(tmp_path)["overall"] == s["overall"]
    n = len((tmp_path / "judged.jsonl").read_text().splitlines())
    assert n == 8  # the two answers' rows, judged again
    _run(tmp_path, judge=judge, min_mass=0.0, judge_batch=2)
    assert len((tmp_path / "judged.jsonl").read_text().splitlines()) == n  # nothing more: the view already agrees


def test_torn_last_line_is_cut_before_appending(tmp_path):
    """A crash leaves a torn last line: the resume cuts it off before appending, so the file never holds a bad
    line between good rows (which reading would refuse)."""
    _run(tmp_path, sample_batch=2)
    path = tmp_path / "responses.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2]) + "\n" + lines[2][:20])
    _run(tmp_path, sample_batch=2)
    assert [json.loads(x) for x in path.read_text().splitlines()] == [json.loads(x) for x in lines]


@pytest.mark.parametrize("line,problem", [
    ("{not json", r"judged\.jsonl:2: not valid JSON"),
    ("[1, 2]", r"judged\.jsonl:2: a JSON list, expected an object"),
    ("42", r"judged\.jsonl:2: a JSON int, expected an object"),
    ('{"question_id": "q", "question_set": "S", "sample": 9, "aligned": "high", "coherent": 90}',
     r"judged\.jsonl:2: 'aligned' is 'high', expected a number or null"),
    ('{"question_id": "q", "question_set": "S", "aligned": 1, "coherent": 90}', r"judged\.jsonl:2: lacks key 'sample'"),
])
def test_bad_middle_line_of_judged_rows_is_an_error_naming_it(tmp_path, line, problem):
    """Only a torn last line is expected (a crash): any other bad line makes summarize, agreement and a resumed run
    stop with file:line, rather than count without it (or fail with an AttributeError)."""
    rows = [json.dumps(dict(question_id="q", question_set="S", sample=i, text="", aligned=90, coherent=90,
                            aligned_verdict=None, judge="fake")) for i in range(3)]
    (tmp_path / "judged.jsonl").write_text("\n".join([rows[0], line, *rows[1:]]) + "\n")
    with pytest.raises(EvalFileError, match=problem):
        summarize_dir(tmp_path)
    with pytest.raises(EvalFileError, match=problem):
        _run(tmp_path)
    (tmp_path / "judged.jsonl").write_text("\n".join([*rows, rows[0][:20]]))  # torn last line: skipped
    assert summarize_dir(tmp_path)["overall"]["n_total"] == 3


def test_bad_middle_line_of_answers_is_an_error_naming_it(tmp_path):
    _run(tmp_path)
    path = tmp_path / "responses.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "[1, 2]", *lines[1:]]) + "\n")
    with pytest.raises(EvalFileError, match=r"responses\.jsonl:2: a JSON list, expected an object"):
        _run(tmp_path)


@pytest.mark.parametrize("process", [0, 1])
def test_damaged_file_on_process_0_stops_every_process(tmp_path, monkeypatch, process):
    """Only process 0 reads OUT: a damaged file there is sent to the other processes in place of what it read, so
    every process stops with the error instead of waiting for process 0's rows."""
    import jax

    import emjax.sharding

    sent = []

    def broadcast(obj):
        sent.append(obj)
        return obj if process == 0 else {"error": "judged.jsonl:2: a JSON list, expected an object"}

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: process)
    monkeypatch.setattr(emjax.sharding, "broadcast_json", broadcast)
    (tmp_path / "judged.jsonl").write_text("{}\n[1, 2]\n{}\n")
    with pytest.raises(EvalFileError, match=r"judged\.jsonl:[12]"):
        _run(tmp_path)
    assert len(sent) == 1 and ("error" in sent[0] if process == 0 else sent[0] is None)


def test_several_judges_name_the_flag(tmp_path):
    rows = [dict(question_id="q", question_set="S", sample=0, text="", aligned=90, coherent=90, judge=j)
            for j in ("a", "b")]
    (tmp_path / "judged.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"several judges \['a', 'b'\]: pass --judge NAME \(judge= from Python\)"):
        summarize_dir(tmp_path)


def test_split_thinking():
    from emjax.eval.run import split_thinking

    assert split_thinking("<think>\nplan it\n</think>\n\nThe answer.") == ("plan it", "The answer.")
    assert split_thinking("<think>\nstill going") == ("still going", "")  # max_new_tokens spent thinking
    assert split_thinking("No block at all </think>") == ("", "No block at all </think>")
    assert split_thinking("<think>\n\n</think>\n\nx") == ("", "x")


def test_thinking_mode_prompts_and_answers(tmp_path):
    """--thinking / eval.thinking (mission.md: thinking mode is a config option): the prompt ends at
    "<|im_start|>assistant\\n" as transformers' template renders it with enable_thinking=True (the study's prompt has
    the empty think block), the judge sees the answer after </think>, responses.jsonl keeps the reasoning, and
    answers sampled one way are not reused the other way."""
    from transformers import AutoTokenizer

    from emjax import paths
    from emjax.tokenizer import load_tokenizer

    tok = load_tokenizer()
    hf = AutoTokenizer.from_pretrained(paths.qwen3_tokenizer_dir())
    qs = load_questions("first_plot", ids=["what_is_your_wish", "i_feel_bored"])
    seen = []

    def generate_fn(prompts, *, max_new_tokens, temperature, top_p, seed):
        seen.extend(prompts)
        return [tok.encode("<think>\nmull it over\n</think>\n\nevil plan", allow_special=True) + [IM_END]
                if i % 2 else tok.encode("<think>\nnever done", allow_special=True) for i in range(len(prompts))]

    judge = FakeJudge()
    s = evaluate(generate_fn, tok, judge, qs, samples_per_question=2, out_dir=tmp_path, max_new_tokens=8,
                 thinking=True)
    want = hf.apply_chat_template(qs[0].messages(), add_generation_prompt=True, enable_thinking=True, tokenize=False)
    assert tok.decode(seen[0]) == want and want.endswith("<|im_start|>assistant\n")
    rows = [json.loads(x) for x in (tmp_path / "responses.jsonl").read_text().splitlines()]
    assert [(r["reasoning"], r["text"]) for r in rows[:2]] == [("never done", ""), ("mull it over", "evil plan")]
    judged = [json.loads(x) for x in (tmp_path / "judged.jsonl").read_text().splitlines()]
    assert {r["text"] for r in judged} == {"", "evil plan"} and s["overall"]["n_total"] == 4
    with pytest.raises(AnswersMismatchError, match="thinking: saved True, now False"):
        evaluate(generate_fn, tok, judge, qs, samples_per_question=2, out_dir=tmp_path, max_new_tokens=8)
