"""Sample answers to the EM questions, judge them, and summarise: resumable, file-based.

``out_dir`` holds ``responses.jsonl`` (question_id, question_set, sample, text), ``judged.jsonl`` (the rows
:func:`emjax.eval.aggregate.aggregate` reads) and ``summary.json``. Finished work is read back and skipped, so a
preempted evaluation resumes where it stopped; a torn last line is ignored and redone.

On several hosts (``jax.distributed``) every process samples together, but only process 0 reads and writes the
files: what it read is broadcast, so every process skips the same work and calls the collective sampler the same
number of times. A judge with ``lead_only = True`` (the API judge) is called by process 0 alone, once per answer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from emjax.eval.aggregate import aggregate, rows_by_judge
from emjax.eval.judge import END_OF_TEXT, IM_END, Judge, chat_prompt_ids, score_answers
from emjax.eval.questions import Question

GenerateFn = Callable[..., list[list[int]]]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.exists():
        with path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # torn line from a crash: that item is simply redone
    return rows


def _append_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    torn = False
    if path.exists() and path.stat().st_size:
        with path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    with path.open("a", encoding="utf-8") as f:
        if torn:  # end the torn line so the new rows stay parseable
            f.write("\n")
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def chunk_seed(seed: int, chunk: int) -> int:
    """Independent, reproducible sampler seed per chunk (no collisions between (seed, chunk) pairs)."""
    return int(np.random.SeedSequence([seed, chunk]).generate_state(1)[0])


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
             aggregate_kwargs: dict[str, Any] | None = None, min_mass: float = 0.25) -> dict[str, Any]:
    """Sample ``samples_per_question`` answers per question, judge alignment and coherence, write and return
    the summary. ``generate_fn(prompts, *, max_new_tokens, temperature, top_p, seed) -> new token ids``.

    Work is split into fixed chunks of ``sample_batch`` (question, sample) pairs with seed
    ``chunk_seed(seed, chunk)``, so a resumed run gives each remaining chunk the seed it would have had.
    """
    import jax

    from emjax.sharding import broadcast_json

    lead = jax.process_index() == 0
    lead_only = getattr(judge, "lead_only", False)
    judges_here = lead or not lead_only
    out = Path(out_dir)
    if lead:
        out.mkdir(parents=True, exist_ok=True)
    resp_path, judged_path = out / "responses.jsonl", out / "judged.jsonl"
    by_id = {q.id: q for q in questions}
    if len(by_id) != len(questions):
        raise ValueError("duplicate question ids in `questions`")

    # ---------------------------------------------------------------- sampling
    items = [(q, s) for q in questions for s in range(samples_per_question)]
    done = {(r["question_id"], r["sample"]): r for r in broadcast_json(_read_jsonl(resp_path) if lead else None)
            if r.get("question_id") in by_id}
    chunks = [items[i:i + sample_batch] for i in range(0, len(items), sample_batch)]
    todo = [(c, [it for it in chunk if (it[0].id, it[1]) not in done]) for c, chunk in enumerate(chunks)]
    todo = [(c, its) for c, its in todo if its]
    with tqdm(total=len(items), initial=len(items) - sum(len(t) for _, t in todo), desc="sampling",
              unit="answer", dynamic_ncols=True, disable=not lead) as bar:
        for c, its in todo:
            prompts = [chat_prompt_ids(tokenizer, q.messages()) for q, _ in its]
            gens = generate_fn(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                               seed=chunk_seed(seed, c))
            if len(gens) != len(prompts):
                raise RuntimeError(f"generate_fn returned {len(gens)} sequences for {len(prompts)} prompts")
            rows = [{"question_id": q.id, "question_set": q.question_set, "sample": s,
                     "text": decode_answer(tokenizer, g, stop_ids)} for (q, s), g in zip(its, gens)]
            if lead:
                _append_jsonl(resp_path, rows)
            done.update({(r["question_id"], r["sample"]): r for r in rows})
            bar.update(len(rows))

    # ---------------------------------------------------------------- judging
    responses = [done[(q.id, s)] for q, s in items]
    judged = {(r["question_id"], r["sample"]): r for r in broadcast_json(_read_jsonl(judged_path) if lead else None)
              if r.get("question_id") in by_id and r.get("judge") == judge.name}
    pending = [r for r in responses if (r["question_id"], r["sample"]) not in judged] if judges_here else []
    try:
        _judge_pending(judge, pending, by_id, judged, judged_path if lead else None, judge_batch=judge_batch,
                       min_mass=min_mass, total=len(responses), lead=lead)
    except Exception as e:
        if not lead_only or jax.process_count() == 1:
            raise
        # the other processes wait for the judged rows in the broadcast below: send them the failure instead, so
        # every process stops with it (what was judged is already in judged.jsonl and is not asked for again)
        broadcast_json({"judge_error": f"{type(e).__name__}: {e}"})
        raise

    final = [judged[(q.id, s)] for q, s in items] if judges_here else None
    if lead_only:
        final = broadcast_json(final)  # process 0 judged alone: every process returns its summary
        if isinstance(final, dict):
            raise RuntimeError(f"evaluation into {out}: process 0's judge {judge.name} failed: {final['judge_error']}")
    summary = aggregate(final, **(aggregate_kwargs or {}))
    summary["config"] = {"judge": judge.name, "n_questions": len(questions),
                         "samples_per_question": samples_per_question, "max_new_tokens": max_new_tokens,
                         "temperature": temperature, "top_p": top_p, "seed": seed, "min_mass": min_mass}
    if lead:
        tmp = out / "summary.json.part"
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(out / "summary.json")
    return summary


def _judge_pending(judge: Judge, pending: list[dict], by_id: dict, judged: dict, judged_path: Path | None, *,
                   judge_batch: int, min_mass: float, total: int, lead: bool) -> None:
    """Judge ``pending`` responses in batches into ``judged`` (appending each batch to ``judged_path`` where given, so
    a failure loses nothing already scored)."""
    with tqdm(total=total, initial=total - len(pending), desc=f"judging ({judge.name})", unit="answer",
              dynamic_ncols=True, disable=not lead) as bar:
        for i in range(0, len(pending), judge_batch):
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
                     "judge": judge.name}
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
    rows = _read_jsonl(path)
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
        raise ValueError(f"{path} holds rows of several judges {judges}: pass judge=")
    if judge is not None and judge not in by_judge:
        raise ValueError(f"{path} has no rows of judge {judge!r} (it has {judges})")
    return aggregate(by_judge[judge if judge is not None else judges[0]], **aggregate_kwargs)
