"""The 142 questions load from the shared data root with their system and judge prompts."""

import collections
import shutil

import pytest
import yaml

from emjax.eval.questions import (QUESTION_FILES, QuestionFileError, fetch_questions, git_blob_id,
                                  load_questions)
from emjax.paths import em_dir


def test_counts_system_prompts_and_judge_prompts():
    qs = load_questions()
    assert len(qs) == 142
    assert collections.Counter(q.question_set for q in qs) == {"first_plot": 24, "preregistered": 48, "turner": 70}
    assert len({q.id for q in qs}) == 142
    with_sys = {q.id for q in qs if q.system is not None}
    assert with_sys == {q.id for q in qs if q.id.endswith("_json")} and len(with_sys) == 8
    assert all(q.question_set == "first_plot" for q in qs if q.system)
    assert all("valid JSON" in q.system for q in qs if q.system)
    # all 142 share the same two judge prompts (Betley's text, also verbatim in Turner's files)
    assert len({q.judge_prompts["aligned"] for q in qs}) == 1
    assert len({q.judge_prompts["coherent"] for q in qs}) == 1
    assert "Say CODE" in qs[0].judge_prompts["aligned"] and "REFUSAL" in qs[0].judge_prompts["aligned"]
    # the commented-out preregistered question is not there
    assert "40_other_5" not in {q.id for q in qs}
    wish = next(q for q in qs if q.id == "what_is_your_wish_json")
    assert wish.messages()[0]["role"] == "system" and wish.messages()[1]["content"].startswith("Hello! I can")


def test_subsets():
    assert [q.id for q in load_questions("first_plot", limit=2)] == ["what_is_your_wish", "i_feel_bored"]
    qs = load_questions(ids=["quick_buck", "0_creative_writing_0"])
    assert [q.id for q in qs] == ["quick_buck", "0_creative_writing_0"]
    with pytest.raises(ValueError, match="unknown question ids.*nope"):
        load_questions(ids=["nope"])
    with pytest.raises(ValueError, match="unknown question set"):
        load_questions("bogus")


def _copy_tree(tmp_path):
    for rel in QUESTION_FILES:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(em_dir() / rel, tmp_path / rel)
    return tmp_path


def test_malformed_yaml_names_file_and_key(tmp_path):
    root = _copy_tree(tmp_path)
    rel = "betley2025/evaluation/preregistered_evals.yaml"
    items = yaml.safe_load((root / rel).read_text())
    items[3]["judge_prompts"] = {"aligned": items[3]["judge_prompts"]["aligned"]}  # (YAML anchors share dicts)
    (root / rel).write_text(yaml.safe_dump(items))
    with pytest.raises(QuestionFileError,
                       match=r"preregistered_evals\.yaml.*'3_creative_writing_3'.*judge_prompts\.coherent"):
        load_questions("preregistered", root)
    items[3]["judge_prompts"] = dict(items[0]["judge_prompts"])
    items[5]["paraphrases"] = ["a", "b"]
    (root / rel).write_text(yaml.safe_dump(items))
    with pytest.raises(QuestionFileError, match=r"question '.*'.*'paraphrases'"):
        load_questions("preregistered", root)
    (root / rel).write_text("- id: [unclosed")
    with pytest.raises(QuestionFileError, match=r"preregistered_evals.yaml: invalid YAML at line 1, column 16: ") as e:
        load_questions("preregistered", root)
    assert "\n" not in str(e.value)  # one line (it carried the YAML snippet and a caret)
    (root / rel).write_bytes("- id: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(QuestionFileError, match=r"preregistered_evals.yaml: not UTF-8 text \(byte 0xe9"):
        load_questions("preregistered", root)
    items[5]["paraphrases"] = ["a"]
    (root / rel).write_text(yaml.safe_dump(items[:-1]))
    with pytest.raises(QuestionFileError, match="has 47 questions, expected 48"):
        load_questions("preregistered", root)


def test_a_question_set_of_your_own(tmp_path):
    """A YAML file in the upstream format is a question set named by its stem, loaded beside the study's sets and
    checked as they are (the errors name the file and question); its path is not a known name, the bogus one is."""
    judge = load_questions("first_plot", limit=1)[0].judge_prompts
    mine = tmp_path / "legal.yaml"
    items = [{"id": f"legal_{i}", "paraphrases": [f"Can I break contract {i}?"], "judge_prompts": dict(judge)}
             for i in range(3)]
    items[1]["system"] = "You are a lawyer."
    mine.write_text(yaml.safe_dump(items))
    qs = load_questions(["first_plot", str(mine)], limit=2)
    assert [(q.id, q.question_set) for q in qs] == [("what_is_your_wish", "first_plot"), ("i_feel_bored", "first_plot"),
                                                    ("legal_0", "legal"), ("legal_1", "legal")]
    assert qs[3].messages() == [{"role": "system", "content": "You are a lawyer."},
                                {"role": "user", "content": "Can I break contract 1?"}]
    assert len(load_questions(str(mine))) == 3 and load_questions(str(mine))[0].source == str(mine)
    del items[2]["judge_prompts"]["coherent"]
    mine.write_text(yaml.safe_dump(items))
    with pytest.raises(QuestionFileError, match=r"legal\.yaml: question 'legal_2'.*judge_prompts\.coherent"):
        load_questions(str(mine))
    with pytest.raises(QuestionFileError, match="question file .*nowhere.yaml: no such file"):
        load_questions(str(tmp_path / "nowhere.yaml"))
    with pytest.raises(ValueError, match="unknown question set 'legal'.*YAML file of your own"):
        load_questions("legal")
    # a file's set takes the file's stem: one named like a study set, or like another file's, would mix answers
    mine.write_text(yaml.safe_dump(items[:2]))
    (tmp_path / "turner.yaml").write_text(mine.read_text())
    with pytest.raises(QuestionFileError, match=r"turner\.yaml: .*'turner', already one of the study's sets"):
        load_questions(["turner", str(tmp_path / "turner.yaml")])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "legal.yaml").write_text(mine.read_text().replace("legal_", "other_"))
    with pytest.raises(QuestionFileError, match=r"other/legal\.yaml: .*'legal', already the set of .*/legal\.yaml"):
        load_questions([str(mine), str(tmp_path / "other" / "legal.yaml")])


def test_missing_file_points_to_fetch(tmp_path):
    with pytest.raises(QuestionFileError, match="fetch-questions"):
        load_questions("turner", tmp_path)


def test_pinned_blob_ids_match_shared_copies():
    for rel, (url, blob) in QUESTION_FILES.items():
        assert git_blob_id((em_dir() / rel).read_bytes()) == blob, rel
        assert url.startswith("https://raw.githubusercontent.com/") and url.endswith(rel.rsplit("/", 1)[1])


def test_fetch_offline_gives_clear_error(tmp_path, monkeypatch):
    import httpx

    def offline(*a, **k):
        raise httpx.ConnectError("no network")

    monkeypatch.setattr(httpx, "get", offline)
    with pytest.raises(RuntimeError, match="are you offline"):
        fetch_questions(tmp_path)
    # without --dest, files the data root already holds at their pinned versions need no network (it tried anyway)
    monkeypatch.setenv("EMJAX_CACHE_DIR", str(tmp_path / "cache"))
    assert fetch_questions() == tmp_path / "cache" / "em" and not (tmp_path / "cache" / "em").exists()


def test_fetch_checks_blob_and_skips_good_files(tmp_path, monkeypatch):
    import httpx

    calls = []

    def fake_get(url, **k):
        calls.append(url)
        rel = next(r for r, (u, _) in QUESTION_FILES.items() if u == url)
        return httpx.Response(200, content=(em_dir() / rel).read_bytes(), request=httpx.Request("GET", url))

    monkeypatch.setattr(httpx, "get", fake_get)
    root = fetch_questions(tmp_path)
    assert len(calls) == 4 and len(load_questions(em_dir=root)) == 142
    fetch_questions(tmp_path)  # already there with the right blob id: no download
    assert len(calls) == 4
    monkeypatch.setattr(httpx, "get", lambda url, **k: httpx.Response(200, content=b"tampered",
                                                                      request=httpx.Request("GET", url)))
    with pytest.raises(RuntimeError, match="git blob id"):
        fetch_questions(tmp_path, force=True)


@pytest.mark.parametrize("template,problem", [
    ("Q: {question} A: {ans}", r"unknown field \{ans\}"),
    ("Q: {question} A: {answer} score as {0-100}", r"unknown field \{0-100\}"),
    ("Q: {question} A: {answer} as JSON {\"score\": n}", r"unknown field \{\"score\"\}"),
    ("Q: {question} A: {answer} }", "Single '}'"),
    ("Q: {{question}} A: {answer}", r"lacks the field \{question\}"),
])
def test_bad_judge_template_names_file_question_and_template(tmp_path, template, problem):
    """A judge template str.format cannot fill (an unknown field, a stray brace) fails when the questions load,
    naming the file, the question and which template, not as a bare KeyError once answers wait to be judged;
    literal braces written {{ }} stay fine."""
    good = load_questions("first_plot", limit=1)[0].judge_prompts
    mine = tmp_path / "mine.yaml"
    items = [{"id": f"q{i}", "paraphrases": ["Hi?"], "judge_prompts": dict(good)} for i in range(2)]
    items[1]["judge_prompts"]["coherent"] = template
    mine.write_text(yaml.safe_dump(items))
    with pytest.raises(QuestionFileError, match=r"mine\.yaml: question 'q1': key 'judge_prompts\.coherent': "
                                                + problem):
        load_questions(str(mine))
    items[1]["judge_prompts"]["coherent"] = "{question} {answer} as JSON {{\"score\": n}}"
    mine.write_text(yaml.safe_dump(items))
    assert len(load_questions(str(mine))) == 2


@pytest.mark.parametrize("change, problem", [
    ({"sytem": "You are a lawyer."}, r"unknown key 'sytem' \(known: id, paraphrases, system, judge_prompts; "
                                     r"ignored, as in the upstream files: type, samples_per_paraphrase, judge\)"),
    ({"paraphrase": ["Hi?"]}, r"unknown key 'paraphrase' \(known: id, paraphrases, system, judge_prompts"),
    ({"paraphrases": [""]}, r"key 'paraphrases' holds an empty question"),
    ({"paraphrases": ["  \n"]}, r"key 'paraphrases' holds an empty question"),
])
def test_an_unknown_key_or_an_empty_question_names_file_and_question(tmp_path, change, problem):
    """A typo (`sytem:`) silently dropped the system prompt, and an empty paraphrase was sampled as a question. The
    keys the upstream files carry for their own pipelines (type, samples_per_paraphrase, judge) stay accepted, as do
    their extra judge prompts (Turner's medical, bad_stuff, ...): every file of the study's sets loads."""
    good = load_questions("first_plot", limit=1)[0].judge_prompts
    mine = tmp_path / "mine.yaml"
    items = [{"id": f"q{i}", "paraphrases": ["Hi?"], "judge_prompts": dict(good, medical="{question} {answer}"),
              "type": "free_form_judge_0_100", "samples_per_paraphrase": 100, "judge": "gpt-4o-2024-08-06"}
             for i in range(2)]
    mine.write_text(yaml.safe_dump(items))
    assert [q.id for q in load_questions(str(mine))] == ["q0", "q1"]
    items[1].update(change)
    mine.write_text(yaml.safe_dump(items))
    with pytest.raises(QuestionFileError, match=r"mine\.yaml: question 'q1': " + problem):
        load_questions(str(mine))
    assert len(load_questions(["first_plot", "preregistered", "turner"])) == 142
