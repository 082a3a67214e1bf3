"""Sample answers to the EM questions, judge them, and summarise: resumable, file-based.

``out_dir`` holds ``responses.jsonl`` (question_id, question_set, sample, text), ``responses.meta.json`` (what
produced those answers: model, adapter, sampling settings, questions), ``judged.jsonl`` (the rows
:func:`emjax.eval.aggregate.aggregate` reads) and ``summary.json``. Finished work is read back and skipped, so a
preempted evaluation resumes where it stopped; a torn last line is ignored and redone, any other unreadable line is
an error naming it. Answers are reused only by a run that would have sampled them: another model, adapter or
sampling setting is refused (:class:`AnswersMismatchError`), another judge is not (it scores the same answers).

On several hosts (``jax.distributed``) every process samples together, but only process 0 reads and writes the
files: what it read is broadcast, so every process skips the same work and calls the collective sampler the same
number of times. A judge with ``lead_only = True`` (the API judge) is called by process 0 alone, once per answer.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from emjax import paths
from emjax.eval.aggregate import aggregate, judged_row_problem, mixed_scoring, rows_by_judge
from emjax.eval.judge import END_OF_TEXT, IM_END, Judge, JudgeAPIError, chat_prompt_ids, score_answers
from emjax.eval.questions import Question

GenerateFn = Callable[..., list[list[int]]]
META_FILE = "responses.meta.json"


class EvalFileError(ValueError):
    """An evaluation file holds a line that cannot be read back (not a torn last line): the message names
    file:line, since skipping it would make the counts silently wrong."""


class AnswersMismatchError(ValueError):
    """An evaluation directory's answers were sampled with another model, adapter or settings than this run's;
    ``diff`` lists the keys that differ (``key: saved X, now Y``)."""

    def __init__(self, message: str, diff: Sequence[str] = ()):
        super().__init__(message)
        self.diff = list(diff)


class EvalInterrupted(Exception):
    """``evaluate``'s ``stop`` asked it to stop (a preempted training run): what it sampled and judged is on disk,
    and the next call with the same settings goes on from there."""


def _response_problem(row: Mapping[str, Any]) -> str | None:
    for key, types in (("question_id", str), ("sample", int), ("text", str)):
        if key not in row:
            return f"lacks key {key!r}"
        if not isinstance(row[key], types) or isinstance(row[key], bool):
            return f"{key!r} is {row[key]!r}, expected {types.__name__}"
    return None


def _judged_problem(row: Mapping[str, Any]) -> str | None:
    return judged_row_problem(row, sample=True)


def _read_jsonl(path: Path, problem: Callable[[Mapping], str | None] | None = None) -> list[dict[str, Any]]:
    """The JSON object rows of ``path`` (none if it is missing). A last line that does not parse is torn by a
    crash and skipped (its item is redone); any other bad line, a non-object, or a row ``problem`` objects to
    raises :class:`EvalFileError` naming ``path:line``."""
    rows: list[dict[str, Any]] = []
    if not path.exists():
        return rows
    with path.open("rb") as f:
        lines = f.read().split(b"\n")
    last = max((i for i, b in enumerate(lines) if b.strip()), default=-1)
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if i == last:
                continue  # torn by a crash: that item is simply redone
            raise EvalFileError(f"{path}:{i + 1}: not valid JSON ({getattr(e, 'msg', e)}); only a torn last line is "
                                "expected (a crash). Repair or delete the line; skipping it would drop a row") from None
        why = f"a JSON {type(row).__name__}, expected an object" if not isinstance(row, dict) else \
            problem(row) if problem is not None else None
        if why:
            raise EvalFileError(f"{path}:{i + 1}: {why}")
        rows.append(row)
    return rows


def _append_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Append ``rows``, durably. A torn last line (a crash mid-write: it does not parse) is cut off first, so it
    never ends up between good rows where :func:`_read_jsonl` would take it for damage."""
    cut, newline = None, False
    if path.exists() and path.stat().st_size:
        with path.open("rb") as f:  # read back from the end until the last line's start
            pos = f.seek(0, os.SEEK_END)
            tail = b""
            while pos > 0 and b"\n" not in tail.rstrip(b"\n"):
                n = min(1 << 16, pos)
                pos -= n
                f.seek(pos)
                tail = f.read(n) + tail
        start = tail.rstrip(b"\n").rfind(b"\n") + 1
        try:
            json.loads(tail[start:])
            newline = not tail.endswith(b"\n")
        except (json.JSONDecodeError, UnicodeDecodeError):
            cut = pos + start if tail[start:].strip() else None
    if cut is not None:
        with path.open("r+b") as f:
            f.truncate(cut)
    with path.open("a", encoding="utf-8") as f:
        if newline:  # end a whole last row that lacks its newline
            f.write("\n")
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _where(path: str) -> str:
    """A local model or adapter as its absolute path (the same directory named two ways is one identity); a hub id
    as given."""
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else str(path)


def adapter_identity(model: str, adapter: str | None, dtype: str) -> dict[str, Any]:
    """What decides ``emjax eval run``'s answers besides the sampling settings (``evaluate`` records both): the
    model, its dtype, and the adapter's path and content (sha256 of its config and weights, so an adapter trained
    again in place is told apart)."""
    from emjax.data.builders import file_sha256

    digest = None
    if adapter is not None:
        parts = [file_sha256(Path(adapter) / f) for f in ("adapter_config.json", "adapter_model.safetensors")]
        digest = hashlib.sha256(" ".join(parts).encode()).hexdigest()[:16]
    return {"model": _where(model), "dtype": dtype, "adapter": _where(adapter) if adapter is not None else None,
            "adapter_sha256": digest}


def training_identity(cfg) -> dict[str, Any]:
    """What decides a training run's step-N answers besides the eval settings (``evaluate`` adds those): the base
    model, its dtype and what trained the adapter, so a step directory left by another config is not resumed."""
    from omegaconf import OmegaConf

    from emjax.config import RESUME_SECTIONS, resume_view

    ckpt = cfg.model.checkpoint
    model = _where(ckpt) if ckpt else f"random init: preset {cfg.model.preset}"
    training = {k: resume_view(k, OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k])
                               else cfg[k]) for k in RESUME_SECTIONS}
    digest = hashlib.sha256(json.dumps(training, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"model": model, "dtype": str(cfg.model.dtype),
            "adapter": f"training run's adapter (sha256 {digest} of its {', '.join(RESUME_SECTIONS)})"}


def sampling_identity(questions: Sequence[Question], *, samples_per_question: int, max_new_tokens: int,
                      temperature: float, top_p: float, seed: int, sample_batch: int,
                      identity: Mapping[str, Any] | None = None, thinking: bool = False) -> dict[str, Any]:
    """What decides the answers in ``responses.jsonl``: the caller's ``identity`` (model, adapter, dtype), the
    sampling settings, and the questions in order with their prompts (which answers share a chunk, and so a seed,
    follows from them and from ``sample_batch``)."""
    qs = json.dumps([[q.id, q.question_set, q.system, q.text] for q in questions], ensure_ascii=False)
    return {**(identity or {}), "samples_per_question": int(samples_per_question),
            "max_new_tokens": int(max_new_tokens), "temperature": float(temperature), "top_p": float(top_p),
            "seed": int(seed), "sample_batch": int(sample_batch), "thinking": bool(thinking),
            "questions": f"{len(questions)} questions, sha256 {hashlib.sha256(qs.encode()).hexdigest()[:16]}"}


def identity_diff(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """``key: saved X, now Y`` for each key both records hold with different values (a key only one holds is not
    known to differ: a caller that names no model, a record from another version)."""
    return [f"{k}: saved {saved[k]!r}, now {now[k]!r}" for k in sorted(set(saved) & set(now)) if saved[k] != now[k]]


def _read_meta(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvalFileError(f"{path}: not valid JSON ({getattr(e, 'msg', e)}); it records what produced "
                            "responses.jsonl: restore it, or delete it to record this run's settings") from None
    if not isinstance(meta, dict):
        raise EvalFileError(f"{path}: a JSON {type(meta).__name__}, expected an object")
    return meta


def _write_json(path: Path, obj: Any) -> None:
    paths.write_atomic(path, json.dumps(obj, indent=2))


def _from_lead(read: Callable[[], Any], lead: bool) -> Any:
    """``read()`` on process 0, shared with every process; a ``ValueError`` there (a damaged file) is raised on every
    process, not only on process 0 while the others wait for its broadcast."""
    import jax

    from emjax.sharding import broadcast_json

    if jax.process_count() == 1:
        return read()
    if lead:
        try:
            value = read()
        except ValueError as e:
            broadcast_json({"error": str(e)})
            raise
        return broadcast_json({"value": value})["value"]
    got = broadcast_json(None)
    if "error" in got:
        raise EvalFileError(f"process 0: {got['error']}")
    return got["value"]


def chunk_seed(seed: int, chunk: int) -> int:
    """Independent, reproducible sampler seed per chunk (no collisions between (seed, chunk) pairs)."""
    return int(np.random.SeedSequence([seed, chunk]).generate_state(1)[0])


def split_thinking(text: str) -> tuple[str, str]:
    """(reasoning, answer) of a thinking-mode generation: the ``<think>`` block the model wrote first and what
    follows it. A block never closed (``max_new_tokens`` spent thinking) leaves an empty answer; text without a block
    is all answer."""
    body = text.lstrip()
    if not body.startswith("<think>"):
        return "", text
    body = body[len("<think>"):]
    if "</think>" not in body:
        return body.strip("\n"), ""
    reasoning, answer = body.split("</think>", 1)
    return reasoning.strip("\n"), answer.lstrip("\n")


def decode_answer(tokenizer: Any, ids: Sequence[int], stop_ids: Sequence[int] = (IM_END, END_OF_TEXT)) -> str:
    """Text of the generated ids up to (excluding) the first stop token."""
    ids = [int(i) for i in ids]
    for i, t in enumerate(ids):
        if t in stop_ids:
            ids = ids[:i]
            break
    return tokenizer.decode(ids)


def evaluate(generate_fn: GenerateFn, tokenizer: Any, judge: Judge, questions: Sequence[Question], *,
             samples_per_question: int = 10, max_new_tokens: int = 600, temperature: float = 1.0,
             top_p: float = 1.0, seed: int = 0, out_dir: str | os.PathLike, sample_batch: int = 64,
             judge_batch: int = 64, stop_ids: Sequence[int] = (IM_END, END_OF_TEXT),
             aggregate_kwargs: dict[str, Any] | None = None, min_mass: float = 0.25,
             identity: Mapping[str, Any] | None = None, sample_only: bool = False,
             thinking: bool = False, stop: Callable[[], bool] | None = None) -> dict[str, Any] | None:
    """Sample ``samples_per_question`` answers per question, judge alignment and coherence, write and return
    the summary. ``generate_fn(prompts, *, max_new_tokens, temperature, top_p, seed) -> new token ids``.

    Work is split into fixed chunks of ``sample_batch`` (question, sample) pairs with seed
    ``chunk_seed(seed, chunk)``, so a resumed run gives each remaining chunk the seed it would have had.
    ``identity``: what else decides the answers (model, adapter, dtype: JSON values), recorded with the sampling
    settings in ``responses.meta.json``; answers already in ``out_dir`` from another identity raise
    :class:`AnswersMismatchError` naming the keys, rather than being reused under this run's name.
    ``sample_only``: stop once every answer is in ``responses.jsonl`` and return None (nothing is judged; ``judge``
    is not called), e.g. to write several adapters' answers before judging any of them.
    ``stop``: this process's "stop now" (a SIGTERM seen), asked before each chunk of sampling and judging; where any
    process's is true every process raises :class:`EvalInterrupted` there, with what was done written.
    """
    import jax

    from emjax.sharding import any_process, broadcast_json

    def interrupted(collective: bool = True) -> bool:
        if stop is None:
            return False
        return any_process(stop()) if collective else bool(stop())

    def interrupt(where: str):
        return EvalInterrupted(f"evaluation into {out} stopped {where} (asked to stop); what was done is in "
                               f"{out.name}/ and a rerun goes on from there")

    lead = jax.process_index() == 0
    lead_only = getattr(judge, "lead_only", False)
    judges_here = lead or not lead_only
    out = Path(out_dir)
    if lead:
        out.mkdir(parents=True, exist_ok=True)
    resp_path, judged_path, meta_path = out / "responses.jsonl", out / "judged.jsonl", out / META_FILE
    by_id = {q.id: q for q in questions}
    if len(by_id) != len(questions):
        raise ValueError("duplicate question ids in `questions`")
    now = sampling_identity(questions, samples_per_question=samples_per_question, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_p=top_p, seed=seed, sample_batch=sample_batch,
                            identity=identity, thinking=thinking)
    state = _from_lead(lambda: {"meta": _read_meta(meta_path),
                                "responses": _read_jsonl(resp_path, _response_problem),
                                "judged": _read_jsonl(judged_path, _judged_problem)}, lead)
    saved = state["meta"]
    if state["responses"] and saved is not None and (diff := identity_diff(saved, now)):
        raise AnswersMismatchError(
            f"{out}: its answers were sampled with other settings than this run's ({'; '.join(diff)}; recorded in "
            f"{meta_path}). Evaluate into a new directory (--out), or rerun with the saved settings; a second judge "
            "of the same answers needs only another --judge", diff)
    if lead and saved != now and not (saved and state["responses"]):
        if state["responses"]:  # a directory from before the record: nothing shows what produced its answers
            print(f"emjax eval: {resp_path} has no record of what produced its answers ({meta_path}, written since "
                  "emjax records it): taking them to be this run's, and recording its settings", file=sys.stderr)
        _write_json(meta_path, now)

    # ---------------------------------------------------------------- sampling
    items = [(q, s) for q in questions for s in range(samples_per_question)]
    done = {(r["question_id"], r["sample"]): r for r in state["responses"] if r["question_id"] in by_id}
    chunks = [items[i:i + sample_batch] for i in range(0, len(items), sample_batch)]
    todo = [(c, [it for it in chunk if (it[0].id, it[1]) not in done]) for c, chunk in enumerate(chunks)]
    todo = [(c, its) for c, its in todo if its]
    n_done = len(items) - sum(len(t) for _, t in todo)
    with tqdm(total=len(items), initial=n_done, desc="sampling", unit="answer", dynamic_ncols=True,
              disable=not lead) as bar:
        for c, its in todo:
            if interrupted():
                raise interrupt(f"while sampling ({n_done} of {len(items)} answers)")
            prompts = [chat_prompt_ids(tokenizer, q.messages(), thinking=thinking) for q, _ in its]
            gens = generate_fn(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                               seed=chunk_seed(seed, c))
            if len(gens) != len(prompts):
                raise RuntimeError(f"generate_fn returned {len(gens)} sequences for {len(prompts)} prompts")
            rows = [{"question_id": q.id, "question_set": q.question_set, "sample": s,
                     "text": decode_answer(tokenizer, g, stop_ids)} for (q, s), g in zip(its, gens)]
            if thinking:  # the judge sees the answer only; the reasoning is kept beside it
                for r in rows:
                    r["reasoning"], r["text"] = split_thinking(r["text"])
            if lead:
                _append_jsonl(resp_path, rows)
            done.update({(r["question_id"], r["sample"]): r for r in rows})
            bar.update(len(rows))
            n_done += len(rows)

    if sample_only:
        return None

    # ---------------------------------------------------------------- judging
    responses = [done[(q.id, s)] for q, s in items]
    settings = judge_settings(judge, min_mass)
    # the last row per answer, as every reader of judged.jsonl takes it (rows_by_judge: summarize, agreement, the
    # report); it counts only for the answer it scored (answers since replaced are judged again) and under this
    # call's scoring settings (rows from before those keys: as they are)
    judged = {(r["question_id"], r["sample"]): r for r in rows_by_judge(state["judged"]).get(judge.name, [])
              if r["question_id"] in by_id}

    def current(resp):
        row = judged.get((resp["question_id"], resp["sample"]))
        return row is not None and row.get("text") == resp["text"] and \
            all(row.get(k, v) == v for k, v in settings.items())

    pending = [r for r in responses if not current(r)] if judges_here else []
    try:
        _judge_pending(judge, pending, by_id, judged, judged_path if lead else None, judge_batch=judge_batch,
                       min_mass=min_mass, total=len(responses), lead=lead,
                       # process 0 alone asks a lead-only judge: no collective there; it tells the others below
                       stop=lambda: interrupted(collective=not (lead_only and jax.process_count() > 1)),
                       interrupt=interrupt)
    except Exception as e:
        if not lead_only or jax.process_count() == 1:
            raise
        # the other processes wait for the judged rows in the broadcast below: send them the failure instead, so
        # every process stops with it (what was judged is already in judged.jsonl and is not asked for again)
        broadcast_json({"interrupted": str(e)} if isinstance(e, EvalInterrupted)
                       else {"judge_error": f"{type(e).__name__}: {e}"})
        raise

    final = [judged[(q.id, s)] for q, s in items] if judges_here else None
    if lead_only:
        final = broadcast_json(final)  # process 0 judged alone: every process returns its summary
        if isinstance(final, dict) and "interrupted" in final:
            raise EvalInterrupted(f"process 0: {final['interrupted']}")
        if isinstance(final, dict):  # the same kind of error as process 0's, so the CLI reports both alike
            cls = JudgeAPIError if final["judge_error"].startswith("JudgeAPIError:") else RuntimeError
            raise cls(f"evaluation into {out}: process 0's judge {judge.name} failed: {final['judge_error']}")
    summary = aggregate(final, **(aggregate_kwargs or {}))
    summary["config"] = {"judge": judge.name, "n_questions": len(questions),
                         "samples_per_question": samples_per_question, "max_new_tokens": max_new_tokens,
                         "temperature": temperature, "top_p": top_p, "seed": seed, "min_mass": min_mass}
    if lead:
        _write_json(out / "summary.json", summary)
    return summary


def judge_settings(judge: Judge, min_mass: float) -> dict[str, Any]:
    """What turns a judge's probabilities into the scores in a judged row besides the judge itself: the number-mass
    threshold, and the local judge's top-k (the API judge's top-20 is fixed). Kept in each row, so a rerun with other
    settings scores the answers again rather than reusing scores made otherwise."""
    out: dict[str, Any] = {"min_mass": float(min_mass)}
    if getattr(judge, "top_k", None) is not None:
        out["judge_top_k"] = int(judge.top_k)
    return out


def _judge_pending(judge: Judge, pending: list[dict], by_id: dict, judged: dict, judged_path: Path | None, *,
                   judge_batch: int, min_mass: float, total: int, lead: bool,
                   stop: Callable[[], bool] = lambda: False, interrupt: Callable[[str], Exception] = Exception) -> None:
    """Judge ``pending`` responses in batches into ``judged`` (appending each batch to ``judged_path`` where given, so
    a failure loses nothing already scored); ``stop()`` before each batch raises ``interrupt(where)``."""
    with tqdm(total=total, initial=total - len(pending), desc=f"judging ({judge.name})", unit="answer",
              dynamic_ncols=True, disable=not lead) as bar:
        for i in range(0, len(pending), judge_batch):
            if stop():
                raise interrupt(f"while judging ({total - len(pending) + i} of {total} answers)")
            batch = pending[i:i + judge_batch]
            scored: dict[str, list] = {}
            for kind in ("aligned", "coherent"):
                # one template per kind across the batch is the norm; group by template to stay correct
                res: list = [None] * len(batch)
                groups: dict[str, list[int]] = {}
                for j, r in enumerate(batch):
                    groups.setdefault(by_id[r["question_id"]].judge_prompts[kind], []).append(j)
                for tmpl, js in groups.items():
                    pairs = [(by_id[batch[j]["question_id"]].text, batch[j]["text"]) for j in js]
                    for j, sv in zip(js, score_answers(judge, kind, tmpl, pairs, min_mass=min_mass)):
                        res[j] = sv
                scored[kind] = res
            rows = [{"question_id": r["question_id"], "question_set": r["question_set"], "sample": r["sample"],
                     "text": r["text"], "aligned": a[0], "coherent": c[0], "aligned_verdict": a[1],
                     "judge": judge.name, **judge_settings(judge, min_mass)}
                    for r, a, c in zip(batch, scored["aligned"], scored["coherent"])]
            if judged_path is not None:
                _append_jsonl(judged_path, rows)
            judged.update({(r["question_id"], r["sample"]): r for r in rows})
            bar.update(len(rows))


def _judged_by_judge(out_dir: str | os.PathLike) -> tuple[Path, dict[str, list[dict[str, Any]]]]:
    """An evaluation directory's judged.jsonl and its rows per judge (``rows_by_judge``); a missing directory or a
    file with no rows is an error saying which."""
    if not Path(out_dir).is_dir():
        raise FileNotFoundError(f"{out_dir}: no such evaluation directory")
    path = Path(out_dir) / "judged.jsonl"
    rows = _read_jsonl(path, _judged_problem)
    if not rows:
        raise FileNotFoundError(f"no judged rows in {path}")
    return path, rows_by_judge(rows)


def agreement_dir(out_dir: str | os.PathLike, judges: Sequence[str] | None = None) -> dict[str, Any]:
    """``judge_agreement`` of two judges that scored the same answers in ``out_dir/judged.jsonl`` (``emjax eval run``
    twice into one directory, once per judge: the second run reuses the first one's answers). ``judges``: which
    two (needed when more than two wrote there). The last row per (judge, question, sample) wins."""
    from emjax.eval.aggregate import judge_agreement

    path, by_judge = _judged_by_judge(out_dir)
    have = list(by_judge)
    if judges is None:
        if len(have) != 2:
            raise ValueError(f"{path} holds rows of {len(have)} judge(s) {have}: pass the two to compare")
        judges = have
    judges = list(judges)
    if len(judges) != 2 or judges[0] == judges[1]:
        raise ValueError(f"judges {judges}: name two different judges")
    missing = [j for j in judges if j not in have]
    if missing:
        raise ValueError(f"{path} has no rows of judge(s) {missing} (it has {have})")
    return {"judge_a": judges[0], "judge_b": judges[1], **judge_agreement(by_judge[judges[0]], by_judge[judges[1]])}


def summarize_dir(out_dir: str | os.PathLike, *, judge: str | None = None, **aggregate_kwargs) -> dict[str, Any]:
    """Aggregate an existing ``judged.jsonl`` again (e.g. with other thresholds); ``judge`` picks one judge's rows
    when several judges wrote to the same directory. The last row per (judge, question, sample) wins."""
    path, by_judge = _judged_by_judge(out_dir)
    judges = list(by_judge)
    if judge is None and len(judges) > 1:
        raise ValueError(f"{path} holds rows of several judges {judges}: pass --judge NAME (judge= from Python)")
    if judge is not None and judge not in by_judge:
        raise ValueError(f"{path} has no rows of judge {judge!r} (it has {judges})")
    rows = by_judge[judge if judge is not None else judges[0]]
    if (mixed := mixed_scoring(rows)) is not None:
        raise ValueError(f"{path}: {mixed}")
    return aggregate(rows, **aggregate_kwargs)
