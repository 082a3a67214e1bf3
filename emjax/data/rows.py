"""Reading and validating chat JSONL files (one ``{"messages": [...]}`` object per line).

Why strict: a silently dropped or mis-parsed row changes what the model is trained on. Every problem is an
error naming the file and line; ``skip_bad_rows=True`` turns them into one warning with the count.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path


def is_file_dataset(name: str) -> bool:
    """``data.dataset`` may name a chat JSONL file of your own instead of one of the study's sets."""
    return str(name).endswith(".jsonl")


def dataset_label(name: str) -> str:
    """How tables name a dataset: a file of your own by its stem (``runs/bad_legal.jsonl`` -> ``bad_legal``)."""
    return Path(name).stem if is_file_dataset(name) else str(name)


class BadRowError(ValueError):
    """A malformed JSONL row, with the file and 1-based line number in the message."""

    def __init__(self, path: str | os.PathLike, line: int, problem: str):
        self.path, self.line, self.problem = str(path), line, problem
        super().__init__(f"{path}:{line}: {problem}")


def check_messages(messages) -> str | None:
    """Problem with one conversation, or None: optional system, then user/assistant alternating, ending assistant."""
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"messages[{i}] is not an object"
        if "role" not in m or "content" not in m:
            return f"messages[{i}] lacks 'role' or 'content'"
        if not isinstance(m["content"], str):
            return f"messages[{i}] ({m['role']}): content is {type(m['content']).__name__}, not a string"
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles[0] == "system" else roles
    if not body:
        return "no user/assistant turns"
    for i, r in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if r != want:
            return f"roles {roles}: expected [system], user, assistant, user, ... (turn {i + len(roles) - len(body)} is {r!r})"
    if body[-1] != "assistant":
        return f"roles {roles}: the last turn must be an assistant answer"
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            return f"messages[{i}]: empty assistant turn"
    return None


def _parse_row(raw: bytes, path: Path, lineno: int) -> list[dict] | BadRowError:
    """One line's messages, or what is wrong with it (naming the file and line)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadRowError(path, lineno, f"not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return BadRowError(path, lineno, f"invalid JSON ({e.msg} at column {e.colno})")
    if not isinstance(obj, dict) or "messages" not in obj:
        return BadRowError(path, lineno, "row is not an object with a 'messages' key")
    problem = check_messages(obj["messages"])
    return BadRowError(path, lineno, problem) if problem else obj["messages"]


def read_jsonl(path: str | os.PathLike, *, skip_bad_rows: bool = False) -> list[tuple[int, list[dict]]]:
    """[(line_number, messages)] for every row; blank lines are not rows. Bad rows raise or are counted; a file
    with no rows left is an error (a build of it would fail deep in TFDS)."""
    path = Path(path)
    rows: list[tuple[int, list[dict]]] = []
    bad: list[BadRowError] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            row = _parse_row(raw, path, lineno)
            if not isinstance(row, BadRowError):
                rows.append((lineno, row))
            elif skip_bad_rows:
                bad.append(row)
            else:
                raise row
    if bad:
        msg = f"{path}: skipped {len(bad)} malformed row(s) (skip_bad_rows=True); first: {bad[0]}"
        warnings.warn(msg, stacklevel=2)
    if not rows:
        raise ValueError(f"{path}: no rows" + (f" left ({len(bad)} malformed, skipped)" if bad else
                                               ' (a chat JSONL file has one {"messages": [...]} per line)'))
    return rows
