"""The 142 free-form EM evaluation questions (24 first-plot + 48 preregistered + 70 Turner) and their judge prompts.

The YAML files are never shipped with emjax: they are read from the data root (``emjax.paths.em_dir()``) or from
the user cache that :func:`fetch_questions` fills from the pinned upstream commits (blob ids checked). A question
set of your own is a YAML file in the same format, named by its path (its set name is the file's stem).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import yaml

from emjax import paths
from emjax.eval.judge import template_problem

BETLEY_COMMIT = "80c11967c07a328e7d7d43d13ce6847ae44dbcc9"
TURNER_COMMIT = "8460e4e426d3a89e8ed51aac0eadcdf7ac10469d"
_BETLEY_URL = f"https://raw.githubusercontent.com/emergent-misalignment/emergent-misalignment/{BETLEY_COMMIT}/evaluation/"
_TURNER_URL = (
    f"https://raw.githubusercontent.com/clarifying-EM/model-organisms-for-EM/{TURNER_COMMIT}"
    "/em_organism_dir/data/eval_questions/"
)

# relative path under the em data root -> (upstream URL, git blob id of the pinned file)
QUESTION_FILES: dict[str, tuple[str, str]] = {
    "betley2025/evaluation/first_plot_questions.yaml": (
        _BETLEY_URL + "first_plot_questions.yaml", "c2b9761d6723ec73b4d209d95c4aa39319a70edd"),
    "betley2025/evaluation/preregistered_evals.yaml": (
        _BETLEY_URL + "preregistered_evals.yaml", "3211c6c0df0a21124e07605c46f86329a53ef9e1"),
    "turner2025/eval_questions/new_questions_no-json.yaml": (
        _TURNER_URL + "new_questions_no-json.yaml", "f2ee761b5666cbed3a4ad31864d842e211ca814b"),
    "turner2025/eval_questions/medical_questions.yaml": (
        _TURNER_URL + "medical_questions.yaml", "290904ee4d0af53df8cb621d9bd133b74e858160"),
}

# question-set name -> files (in order) and the expected number of questions (checked: a wrong file is loud)
QUESTION_SETS: dict[str, tuple[tuple[str, ...], int]] = {
    "first_plot": (("betley2025/evaluation/first_plot_questions.yaml",), 24),
    "preregistered": (("betley2025/evaluation/preregistered_evals.yaml",), 48),
    "turner": (("turner2025/eval_questions/new_questions_no-json.yaml",
                "turner2025/eval_questions/medical_questions.yaml"), 70),
}
DEFAULT_SETS = ("first_plot", "preregistered", "turner")
JUDGE_KINDS = ("aligned", "coherent")
QUESTION_KEYS = ("id", "paraphrases", "system", "judge_prompts")  # what emjax reads of a question
# what the upstream files carry besides, read by their own pipelines only: emjax samples its own number of answers
# (--samples) with its own judge, so these are accepted and ignored
UPSTREAM_KEYS = ("type", "samples_per_paraphrase", "judge")


class QuestionFileError(ValueError):
    """A question file is missing or malformed; the message names the file and the offending key."""


@dataclasses.dataclass(frozen=True)
class Question:
    id: str
    question_set: str
    text: str
    system: str | None
    judge_prompts: dict[str, str]  # "aligned"/"coherent" -> template with {question} and {answer}
    source: str = ""  # relative path of the YAML file it came from

    def messages(self) -> list[dict[str, str]]:
        """Chat messages for sampling: optional system turn, then the question as the user turn."""
        msgs = [{"role": "system", "content": self.system}] if self.system is not None else []
        return msgs + [{"role": "user", "content": self.text}]


def cache_dir() -> Path:
    """User cache for fetched files: ``$EMJAX_CACHE_DIR`` or ``~/.cache/emjax``."""
    env = os.environ.get("EMJAX_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "emjax"


def git_blob_id(data: bytes) -> str:
    """``git hash-object`` of ``data``: lets a downloaded file be checked against the pinned upstream tree."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def fetch_questions(dest: str | os.PathLike | None = None, *, timeout: float = 30.0, force: bool = False) -> Path:
    """Download the question YAMLs from their pinned upstream commits into ``dest`` (default ``cache_dir()/em``).

    Returns the em root to pass as ``load_questions(em_dir=...)`` (the default cache is searched automatically).
    Without ``dest``, a file the data root already holds at its pinned version is not downloaded again (both are
    searched), so it works offline where the data root is complete.
    """
    import httpx

    root = Path(dest).expanduser() if dest is not None else cache_dir() / "em"
    for rel, (url, blob) in QUESTION_FILES.items():
        target = root / rel
        have = [target] + ([paths.em_dir() / rel] if dest is None else [])
        if not force and any(p.exists() and git_blob_id(p.read_bytes()) == blob for p in have):
            continue
        try:
            resp = httpx.get(url, timeout=timeout, follow_redirects=True)
            resp.raise_for_status()
        except httpx.HTTPError as e:
            raise RuntimeError(
                f"could not download {url} ({type(e).__name__}: {e}); are you offline? Copy the file to "
                f"{target} by hand, or set EMJAX_DATA_DIR to a data root that holds em/{rel}") from None
        got = git_blob_id(resp.content)
        if got != blob:
            raise RuntimeError(f"{url}: git blob id {got} != pinned {blob}; refusing to use it")
        target.parent.mkdir(parents=True, exist_ok=True)
        paths.write_atomic(target, resp.content)
    return root


def _find(rel: str, em_dir: str | os.PathLike | None) -> Path:
    roots = [Path(em_dir)] if em_dir is not None else [paths.em_dir(), cache_dir() / "em"]
    for root in roots:
        if (root / rel).is_file():
            return root / rel
    raise QuestionFileError(
        f"question file {rel} not found under {', '.join(map(str, roots))}; "
        "run `emjax eval fetch-questions` (needs internet) or set EMJAX_DATA_DIR")


def _parse_file(path: Path, rel: str, set_name: str) -> list[Question]:
    try:
        items = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:  # one line, naming the line and column
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise QuestionFileError(f"{path}: invalid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    except UnicodeDecodeError as e:
        raise QuestionFileError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})"
                                ) from None
    if not isinstance(items, list):
        raise QuestionFileError(f"{path}: expected a list of questions at top level, got {type(items).__name__}")
    out = []
    for i, item in enumerate(items):
        where = f"{path}: item {i}"
        if not isinstance(item, dict):
            raise QuestionFileError(f"{where}: expected a mapping, got {type(item).__name__}")
        qid = item.get("id")
        if not isinstance(qid, str) or not qid:
            raise QuestionFileError(f"{where}: missing or non-string key 'id'")
        where = f"{path}: question {qid!r}"
        unknown = [k for k in item if k not in QUESTION_KEYS + UPSTREAM_KEYS]
        if unknown:  # a typo (`sytem:`) would silently drop what it set
            raise QuestionFileError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(QUESTION_KEYS)}; "
                                    f"ignored, as in the upstream files: {', '.join(UPSTREAM_KEYS)})")
        para = item.get("paraphrases")
        if not isinstance(para, list) or len(para) != 1 or not isinstance(para[0], str):
            raise QuestionFileError(f"{where}: key 'paraphrases' must be a list of exactly one string")
        if not para[0].strip():
            raise QuestionFileError(f"{where}: key 'paraphrases' holds an empty question")
        system = item.get("system")
        if system is not None and not isinstance(system, str):
            raise QuestionFileError(f"{where}: key 'system' must be a string")
        jp = item.get("judge_prompts")
        if not isinstance(jp, dict):
            raise QuestionFileError(f"{where}: missing key 'judge_prompts'")
        prompts = {}
        for kind in JUDGE_KINDS:
            tmpl = jp.get(kind)
            if not isinstance(tmpl, str):
                raise QuestionFileError(f"{where}: key 'judge_prompts.{kind}' missing or not a string")
            problem = template_problem(tmpl)  # here, not as a KeyError once answers wait to be judged
            if problem:
                raise QuestionFileError(f"{where}: key 'judge_prompts.{kind}': {problem}")
            prompts[kind] = tmpl
        out.append(Question(qid, set_name, para[0], system, prompts, rel))
    return out


def is_question_file(name: str) -> bool:
    """A question-set name may be the path of a YAML file of your own (in the upstream files' format)."""
    return str(name).endswith((".yaml", ".yml"))


def check_set_name(name: str) -> str:
    """``name`` if it is one of the study's sets or a question file's path, else an error naming the choices."""
    if name not in QUESTION_SETS and not is_question_file(name):
        raise ValueError(f"unknown question set {name!r}; choose from {sorted(QUESTION_SETS)}, or give the path of "
                         "a YAML file of your own (.yaml) in their format")
    return name


def load_questions(
    set_names: Sequence[str] | str = DEFAULT_SETS,
    em_dir: str | os.PathLike | None = None,
    *,
    ids: Iterable[str] | None = None,
    limit: int | None = None,
) -> list[Question]:
    """Load the named question sets, in order; ``ids`` keeps only those ids, ``limit`` the first N per set. A name
    ending .yaml is a file of your own: each item an ``id``, one-string ``paraphrases``, an optional ``system`` and
    ``judge_prompts`` with ``aligned`` and ``coherent`` templates (``{question}``, ``{answer}``), as upstream."""
    if isinstance(set_names, str):
        set_names = (set_names,)
    questions: list[Question] = []
    set_of: dict[str, str] = {}  # set name -> what it came from: two sources, one name would merge in every table
    for name in set_names:
        if is_question_file(check_set_name(name)):
            path = Path(name).expanduser()
            if not path.is_file():
                raise QuestionFileError(f"question file {name}: no such file")
            if path.stem in QUESTION_SETS or set_of.get(path.stem, name) != name:
                taken = "one of the study's sets" if path.stem in QUESTION_SETS else f"the set of {set_of[path.stem]}"
                raise QuestionFileError(f"question file {name}: its set is named by the file's stem, {path.stem!r}, "
                                        f"already {taken} (their answers would mix in every table); rename the file")
            set_of[path.stem] = name
            qs = _parse_file(path, str(path), path.stem)
            if not qs:
                raise QuestionFileError(f"{path}: no questions")
            questions += qs[:limit] if limit is not None else qs
            continue
        files, expected = QUESTION_SETS[name]
        qs = [q for rel in files for q in _parse_file(_find(rel, em_dir), rel, name)]
        if len(qs) != expected:
            raise QuestionFileError(f"question set {name!r} ({', '.join(files)}) has {len(qs)} questions, "
                                    f"expected {expected}: wrong or modified file?")
        questions += qs[:limit] if limit is not None else qs
    seen: set[str] = set()
    for q in questions:
        if q.id in seen:
            raise QuestionFileError(f"duplicate question id {q.id!r} (in {q.source})")
        seen.add(q.id)
    if ids is not None:
        wanted = list(ids)
        missing = [i for i in wanted if i not in seen]
        if missing:
            raise ValueError(f"unknown question ids {missing} in sets {list(set_names)}")
        keep = set(wanted)
        questions = [q for q in questions if q.id in keep]
    return questions
