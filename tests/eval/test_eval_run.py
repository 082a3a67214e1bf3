"""evaluate() end to end with a fake sampler and a fake judge: files, rows, summary, and resume."""

import json

import pytest

from emjax.eval.judge import format_judge_prompt
from emjax.eval.questions import load_questions
from emjax.eval.run import chunk_seed, evaluate, summarize_dir
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
                  sample_batch=5, judge_batch=4)
    assert log == [(2, chunk_seed(0, 2))]  # only the missing chunk, with the seed it would have had
    assert judge2.calls == [("aligned", 3), ("coherent", 3)]  # only the 3 unjudged answers
    assert s2["overall"] == o
    # nothing left to do: a third run makes no calls at all
    log.clear()
    judge3 = FakeJudge()
    evaluate(make_generate(tok, log), tok, judge3, qs, samples_per_question=3, out_dir=tmp_path, sample_batch=5)
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


@pytest.mark.parametrize("process", [0, 1])
def test_api_judge_failure_on_process_0_stops_every_process(tmp_path, monkeypatch, process):
    """On several hosts only process 0 calls an API judge and the others wait for its rows in a broadcast: if it
    fails, it broadcasts the failure instead, so every process stops with a clear error rather than waiting for
    ever; process 0 keeps what it judged before the failure. (Two processes simulated: process 0's broadcasts
    return what it sends; process 1 receives process 0's failure.)"""
    import jax

    import emjax.sharding

    sent = []

    def broadcast(obj):
        sent.append(obj)
        if process == 0:
            return obj
        # process 1: the responses and the judged rows process 0 read (none yet), then process 0's failure
        return [] if len(sent) <= 2 else {"judge_error": "RuntimeError: HTTP 401"}

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: process)
    monkeypatch.setattr(emjax.sharding, "broadcast_json", broadcast)
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
        assert "process 0's judge fake failed: RuntimeError: HTTP 401" in str(err.value)
        assert not (tmp_path / "judged.jsonl").exists()
