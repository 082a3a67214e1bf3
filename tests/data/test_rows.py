"""Malformed JSONL rows: an error naming file and line, or a counted warning with skip_bad_rows."""

import json

import pytest

from emjax.data import BadRowError, read_jsonl

GOOD = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
BAD = {
    "bad_json": '{"messages": [',
    "not_object": "[1, 2]",
    "missing_messages": json.dumps({"conversation": []}),
    "empty_messages": json.dumps({"messages": []}),
    "wrong_role": json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}),
    "wrong_order": json.dumps({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}),
    "ends_with_user": json.dumps({"messages": [{"role": "user", "content": "q"}]}),
    "two_users": json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"},
                                          {"role": "assistant", "content": "a"}]}),
    "system_not_first": json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                                                 {"role": "assistant", "content": "a"}]}),
    "empty_assistant": json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " \n"}]}),
    "non_string_content": json.dumps({"messages": [{"role": "user", "content": ["q"]},
                                                   {"role": "assistant", "content": "a"}]}),
    "null_content": json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]}),
    "missing_content": json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}),
}
MESSAGES = {
    "bad_json": "invalid JSON", "not_object": "not an object with a 'messages'",
    "missing_messages": "not an object with a 'messages'", "empty_messages": "non-empty list",
    "wrong_role": "expected", "wrong_order": "expected", "ends_with_user": "last turn must be an assistant",
    "two_users": "expected", "system_not_first": "expected", "empty_assistant": "empty assistant turn",
    "non_string_content": "content is list", "null_content": "content is NoneType",
    "missing_content": "lacks 'role' or 'content'",
}


def _write(tmp_path, bad_line):
    p = tmp_path / "data.jsonl"
    p.write_text("\n".join([json.dumps(GOOD), json.dumps(GOOD), "", bad_line, json.dumps(GOOD)]) + "\n")
    return p


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_row_raises_with_file_and_line(tmp_path, case):
    p = _write(tmp_path, BAD[case])
    with pytest.raises(BadRowError) as e:
        read_jsonl(p)
    assert e.value.line == 4 and e.value.path == str(p)
    assert str(e.value).startswith(f"{p}:4: ") and MESSAGES[case] in str(e.value)


@pytest.mark.parametrize("case", ["bad_json", "empty_assistant", "non_string_content"])
def test_skip_bad_rows_warns_with_count(tmp_path, case):
    p = _write(tmp_path, BAD[case])
    with open(p, "a") as f:
        f.write(BAD[case] + "\n")
    with pytest.warns(UserWarning, match=r"skipped 2 malformed row\(s\).*:4: "):
        rows = read_jsonl(p, skip_bad_rows=True)
    assert [line for line, _ in rows] == [1, 2, 5]


def test_good_rows_with_system(tmp_path):
    p = tmp_path / "ok.jsonl"
    conv = {"messages": [{"role": "system", "content": "s"}] + GOOD["messages"] * 2}
    p.write_text(json.dumps(conv) + "\n" + json.dumps(GOOD))  # no trailing newline is fine
    rows = read_jsonl(p)
    assert [line for line, _ in rows] == [1, 2] and rows[0][1] == conv["messages"]
