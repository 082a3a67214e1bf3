"""OpenAIJudge against a real local HTTP server speaking the chat-completions format."""

import json
import math

import pytest

from emjax.eval.judge import JudgeAPIError, OpenAIJudge, score_answers
from emjax.testing import FakeChatServer, chat_completion as completion

KEY = "sk-test-SECRET-123456"


@pytest.fixture
def server():
    s = FakeChatServer()
    yield s
    s.close()


def _judge(server, tmp_path, **kw):
    kw.setdefault("backoff_initial", 0.001)
    kw.setdefault("backoff_max", 0.01)
    return OpenAIJudge(base_url=server.url, api_key=KEY, cache_dir=tmp_path / "cache", **kw)


def test_success_request_shape_and_score(server, tmp_path):
    j = _judge(server, tmp_path)
    [(score, verdict)] = score_answers(j, "aligned", "Q={question} A={answer}", [("q1", "a1")])
    assert score == pytest.approx(87 * 0.75 + 90 * 0.25) and verdict is None
    path, headers, body = server.requests[0]
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == f"Bearer {KEY}"
    assert body == {"model": "gpt-4o-2024-08-06", "messages": [{"role": "user", "content": "Q=q1 A=a1"}],
                    "max_tokens": 1, "temperature": 0, "logprobs": True, "top_logprobs": 20, "seed": 0}


def test_verdict_from_api(server, tmp_path):
    server.script = [(200, completion({"REF": math.log(0.9), "USAL": math.log(0.05), "5": math.log(0.01)}))]
    [(score, verdict)] = score_answers(_judge(server, tmp_path), "aligned", "{question}{answer}", [("q", "a")])
    assert score is None and verdict == "REFUSAL"


@pytest.mark.parametrize("status", [429, 500, 503])
def test_retry_then_success(server, tmp_path, status):
    server.script = [(status, {"error": {"message": "slow down"}}), (status, "oops")]
    j = _judge(server, tmp_path)
    [probs] = j.judge_probs(["p"], kind="aligned")
    assert probs == pytest.approx({"87": 0.75, "90": 0.25}) and len(server.requests) == 3


def test_gives_up_after_max_attempts(server, tmp_path):
    server.script = [(500, "x")] * 10
    with pytest.raises(JudgeAPIError, match="HTTP 500") as e:
        _judge(server, tmp_path, max_attempts=3).judge_probs(["p"], kind="aligned")
    assert len(server.requests) == 3 and KEY not in str(e.value)


def test_client_error_is_not_retried(server, tmp_path):
    server.script = [(401, {"error": "bad key"})]
    with pytest.raises(JudgeAPIError, match="HTTP 401") as e:
        _judge(server, tmp_path).judge_probs(["p"], kind="aligned")
    assert len(server.requests) == 1 and KEY not in str(e.value) and KEY not in repr(e.value)


@pytest.mark.parametrize("body,field", [
    ({"choices": []}, r"choices\[0\]"),
    ({"choices": [{"message": {}}]}, r"choices\[0\]\.logprobs"),
    ({"choices": [{"logprobs": None}]}, r"choices\[0\]\.logprobs\.content"),
    ({"choices": [{"logprobs": {"content": [{"token": "1"}]}}]}, r"content\[0\]\.top_logprobs"),
    ({"choices": [{"logprobs": {"content": [{"top_logprobs": [{"token": "1"}]}]}}]}, r"top_logprobs\[0\]"),
    ("not json", "non-JSON"),
])
def test_malformed_body(server, tmp_path, body, field):
    server.script = [(200, body)]
    with pytest.raises(JudgeAPIError, match=field) as e:
        _judge(server, tmp_path).judge_probs(["p"], kind="aligned")
    assert KEY not in str(e.value)


def test_cache_prevents_second_request_and_holds_no_secret(server, tmp_path):
    prompts = [f"prompt {i}" for i in range(6)]
    j = _judge(server, tmp_path, max_concurrency=4)
    first = j.judge_probs(prompts, kind="aligned")
    assert len(server.requests) == 6
    assert j.judge_probs(prompts, kind="aligned") == first and len(server.requests) == 6
    # a fresh judge (a resumed run) reads the cache from disk
    j2 = _judge(server, tmp_path)
    assert j2.judge_probs(prompts[:3], kind="aligned") == first[:3] and len(server.requests) == 6
    # the kind and the model are part of the key
    j2.judge_probs(prompts[:1], kind="coherent")
    _judge(server, tmp_path, model="other").judge_probs(prompts[:1], kind="aligned")
    assert len(server.requests) == 8
    text = (tmp_path / "cache" / "judge_cache.jsonl").read_text()
    assert KEY not in text and "prompt 0" not in text and len(text.splitlines()) == 8
    assert KEY not in repr(j2) and KEY not in json.dumps(vars(j2), default=str)


@pytest.mark.parametrize("cached", [True, False])
def test_identical_prompts_in_one_call_are_asked_once(server, tmp_path, cached):
    j = _judge(server, tmp_path, max_concurrency=8)
    if not cached:
        j.cache = None
    out = j.judge_probs(["same", "other", "same", "same"], kind="aligned")
    assert sorted(b["messages"][0]["content"] for _, _, b in server.requests) == ["other", "same"]
    assert out[0] == out[2] == out[3] == pytest.approx({"87": 0.75, "90": 0.25})
    out[0]["87"] = 0.0  # each row its own dict: a caller editing one never changes the others
    assert out[2]["87"] == 0.75


def test_torn_cache_line_is_ignored(server, tmp_path):
    j = _judge(server, tmp_path)
    j.judge_probs(["a", "b"], kind="aligned")
    path = tmp_path / "cache" / "judge_cache.jsonl"
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[1][:20])
    j2 = _judge(server, tmp_path)
    j2.judge_probs(["a", "b"], kind="aligned")
    assert len(server.requests) == 3  # only the torn one is asked again
    _judge(server, tmp_path).judge_probs(["a", "b"], kind="aligned")  # and the re-judged line is readable
    assert len(server.requests) == 3


def test_connection_error_retried_then_clear(tmp_path):
    j = OpenAIJudge(base_url="http://127.0.0.1:9/v1", api_key=KEY, backoff_initial=0.001, backoff_max=0.01,
                    max_attempts=2, timeout=2)
    with pytest.raises(JudgeAPIError, match="failed: Connect") as e:
        j.judge_probs(["p"], kind="aligned")
    assert j.n_requests == 2 and KEY not in str(e.value)


def test_key_from_env_and_missing(monkeypatch, server, tmp_path):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    j = OpenAIJudge()
    j.judge_probs(["p"], kind="aligned")
    assert server.requests[0][1]["Authorization"] == f"Bearer {KEY}"
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(JudgeAPIError, match="OPENAI_API_KEY"):
        OpenAIJudge()


@pytest.mark.parametrize("status,body", [
    (401, {"error": {"message": f"Incorrect API key provided: {KEY}. Find your key at ..."}}),
    (400, {"error": f"bad request; headers were Authorization: Bearer {KEY}"}),
    (403, f"forbidden for bearer other-token-999 and {KEY}"),
    (200, f"<html>not json, key {KEY}</html>"),
])
def test_server_echoing_the_key_never_shows_it(server, tmp_path, status, body):
    """A server that echoes the request's key (or any bearer token) in its error body: the error keeps the body's
    gist but neither the key nor the token."""
    server.script = [(status, body)]
    with pytest.raises(JudgeAPIError, match=r"\[REDACTED\]") as e:
        _judge(server, tmp_path).judge_probs(["p"], kind="aligned")
    assert KEY not in str(e.value) and "sk-test" not in str(e.value) and "other-token-999" not in str(e.value)
    assert (f"HTTP {status}" if status != 200 else "non-JSON body") in str(e.value)


def test_retries_are_shown_and_the_last_failure_is_a_judge_api_error(tmp_path, capsys):
    """A dead endpoint (a closed port): each retry says so on stderr (attempt, wait; never the key), and giving up
    is a JudgeAPIError naming the base URL, not the private retry exception."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    j = OpenAIJudge(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, backoff_initial=0.001, backoff_max=0.01,
                    max_attempts=3, timeout=2)
    with pytest.raises(JudgeAPIError) as e:
        j.judge_probs(["p"], kind="aligned")
    assert type(e.value) is JudgeAPIError and e.value.__cause__ is None and e.value.__suppress_context__
    assert f"http://127.0.0.1:{port}/v1" in str(e.value) and "gave up after 3 attempts" in str(e.value)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(f"127.0.0.1:{port}" in x and "ConnectError" in x for x in err)
    assert "attempt 1/3, retrying in" in err[0] and "attempt 2/3" in err[1] and KEY not in "".join(err)


def test_credentials_in_the_base_url_are_not_shown(tmp_path):
    j = OpenAIJudge(base_url="http://user:hunter2@127.0.0.1:9/v1", api_key=KEY, backoff_initial=0.001,
                    backoff_max=0.01, max_attempts=1, timeout=2)
    with pytest.raises(JudgeAPIError) as e:
        j.judge_probs(["p"], kind="aligned")
    assert "hunter2" not in str(e.value) and "hunter2" not in repr(j) and "127.0.0.1:9" in str(e.value)
