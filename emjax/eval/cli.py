"""``emjax eval``: sample answers to the EM questions and judge them, fetch the question files, re-summarise.

    emjax eval run --model CKPT [--adapter DIR] --out DIR [--judge openai|local --judge-model ...]
    emjax eval fetch-questions [--dest DIR]
    emjax eval summarize DIR [--judge NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
from pathlib import Path

from emjax import paths
from emjax.eval.questions import DEFAULT_SETS, QUESTION_SETS, check_set_name

DEFAULT_API_JUDGE = "gpt-4o-2024-08-06"


def _set_arg(name: str) -> str:
    try:
        return check_set_name(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="emjax eval", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="sample, judge and summarise one model (+ adapter, or several adapters)")
    r.add_argument("--model", required=True,
                   help="Hugging Face Qwen3 / Qwen3-MoE / Llama 3 / Gemma 3 checkpoint dir or hub id (the base model; "
                        "its tokenizer files pick the chat format)")
    r.add_argument("--adapter", action="append",
                   help="PEFT adapter dir to apply (absent: evaluate the base model); repeat it to evaluate several "
                        "adapters of one base, sampled together in one program (each then writes OUT/<its dir name>, "
                        "or OUT/<run> for a run's RUN/adapter)")
    r.add_argument("--out", required=True, help="output dir (responses.jsonl, judged.jsonl, summary.json)")
    r.add_argument("--sets", nargs="+", default=list(DEFAULT_SETS), type=_set_arg, metavar="SET",
                   help=f"question sets: {', '.join(QUESTION_SETS)} (default: all three), or the path of a YAML "
                        "file of your own in their format (its set is named by the file's stem)")
    r.add_argument("--ids", nargs="+", help="only these question ids")
    r.add_argument("--limit", type=int, help="only the first N questions of each set (cheap runs)")
    r.add_argument("--em-dir", help="root holding betley2025/ and turner2025/ (default: emjax.paths.em_dir())")
    r.add_argument("--samples", type=int, default=10, help="answers per question (paper: 10; 32 at checkpoints)")
    r.add_argument("--max-new-tokens", type=int, default=600)
    r.add_argument("--thinking", action="store_true",
                   help="Qwen3's thinking mode: no empty think block in the prompt, the model reasons first; the "
                        "judge sees the answer after </think> (responses.jsonl keeps the reasoning); give it more "
                        "--max-new-tokens (default: the study's non-thinking format)")
    r.add_argument("--temperature", type=float, default=1.0)
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--sample-batch", type=int, default=64, help="prompts per generate call")
    r.add_argument("--adapters-per-call", type=int, default=8,
                   help="several --adapter: at most this many sampled in one program (each with --sample-batch rows)")
    r.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    r.add_argument("--mesh", type=_mesh_arg, default={},
                   help="with several devices (always used then), the mesh shape as in training, e.g. data=-1 "
                        "(weights whole on every device: the fastest sampling when the model fits one) or fsdp=-1 "
                        "(weights sharded: the default, for models that do not fit); rows split over data x fsdp; "
                        "devices=N spans the first N devices only (devices=1: no mesh)")
    r.add_argument("--coordinator", help="several hosts (GPU clusters): jax.distributed coordinator host:port "
                                         "(default $EMJAX_COORDINATOR; TPU pods need nothing); every host runs "
                                         "the same command, process 0 writes OUT and calls the API judge")
    r.add_argument("--num-processes", type=int, help="with --coordinator (default $EMJAX_NUM_PROCESSES)")
    r.add_argument("--process-id", type=int, help="with --coordinator (default $EMJAX_PROCESS_ID)")
    r.add_argument("--judge", default="openai", choices=["openai", "local"])
    r.add_argument("--judge-model", help=f"openai: model name (default {DEFAULT_API_JUDGE}); "
                                         "local: checkpoint dir (required)")
    r.add_argument("--judge-base-url", help="OpenAI-compatible base URL (default $OPENAI_BASE_URL or OpenAI)")
    r.add_argument("--judge-concurrency", type=int, default=16, help="parallel API requests")
    r.add_argument("--judge-batch-size", type=int,
                   help="answers judged between appends to judged.jsonl (what a stop can lose), and the local judge's "
                        "prompts per forward pass (default: 8 local; 64 openai, whose cache keeps each reply anyway)")
    r.add_argument("--judge-cache", help="API judge cache dir (default: <cache>/judge)")
    r.add_argument("--judge-top-k", type=int, default=20,
                   help="local judge: first-token candidates read, like the API's top_logprobs (0 = all tokens)")
    r.add_argument("--judge-min-mass", type=float, default=0.25,
                   help="below this probability on number tokens a verdict is CODE/REFUSAL/unscored (the EM work's "
                        "0.25; a random-weight test judge needs 0)")

    f = sub.add_parser("fetch-questions", help="download the question YAMLs from their pinned upstream commits")
    f.add_argument("--dest", help="em root to write into (default: ~/.cache/emjax/em or $EMJAX_CACHE_DIR/em)")
    f.add_argument("--force", action="store_true")

    s = sub.add_parser("summarize", help="recompute summary.json from DIR/judged.jsonl")
    s.add_argument("dir")
    s.add_argument("--judge", help="judge name when several judges wrote to DIR")

    a = sub.add_parser("agreement", help="how two judges that scored the same answers in DIR agree (the local judge "
                                         "against the API one): writes DIR/judge_agreement.json")
    a.add_argument("dir")
    a.add_argument("--judges", nargs=2, metavar=("A", "B"), help="the two judges (needed when more wrote to DIR)")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "run":
        if args.judge == "local" and not args.judge_model:
            parser.error("--judge local needs --judge-model CHECKPOINT_DIR")
        if args.judge == "openai" and args.judge_model is None:
            args.judge_model = DEFAULT_API_JUDGE
        if args.judge_batch_size is None:
            args.judge_batch_size = 8 if args.judge == "local" else 64
        for name in ("samples", "max_new_tokens", "sample_batch", "judge_concurrency", "judge_batch_size",
                     "adapters_per_call"):
            if getattr(args, name) < 1:
                parser.error(f"--{name.replace('_', '-')} must be >= 1")
        if args.judge_top_k < 0:
            parser.error("--judge-top-k must be >= 0")
        if not 0.0 <= args.judge_min_mass <= 1.0:
            parser.error("--judge-min-mass must be in [0, 1]")
        if args.limit is not None and args.limit < 1:
            parser.error("--limit must be >= 1")
        try:
            paths.local_dir(args.out, "--out")
        except ValueError as e:
            parser.error(str(e))
        if not 0.0 < args.top_p <= 1.0:
            parser.error("--top-p must be in (0, 1]")
        if args.temperature < 0:
            parser.error("--temperature must be >= 0")
        names = [adapter_name(a) for a in args.adapter or []]
        if len(set(names)) != len(names):
            parser.error(f"--adapter: several adapters write to OUT/<name>, so their names must differ: {names}")
    return args


def _mesh_arg(text: str) -> dict[str, int]:
    """``data=2,fsdp=-1`` -> {"data": 2, "fsdp": -1}; the keys are training's (``mesh.*`` in a config)."""
    from emjax.sharding import MESH_AXES

    shape = {}
    for item in filter(None, text.split(",")):
        axis, eq, size = item.partition("=")
        ok = re.fullmatch(r"-?\d+", size) is not None and (int(size) > 0 or (int(size) == -1 and axis != "devices"))
        if not eq or axis not in (*MESH_AXES, "devices") or not ok:
            raise argparse.ArgumentTypeError(f"{item!r}: expected AXIS=SIZE with AXIS one of {', '.join(MESH_AXES)} "
                                             "and SIZE a positive number or -1, or devices=N (the first N devices)")
        shape[axis] = int(size)
    return shape


def adapter_name(path) -> str:
    """Where several adapters' results go under OUT: the directory's name, or for a trained run's ``RUN/adapter``
    the run's."""
    p = Path(path).resolve()
    return p.parent.name if p.name == "adapter" else p.name


def evaluate_kwargs(args: argparse.Namespace) -> dict:
    """``evaluate``'s settings from ``emjax eval run``'s arguments."""
    return {"samples_per_question": args.samples, "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed, "sample_batch": args.sample_batch,
            "judge_batch": args.judge_batch_size, "min_mass": args.judge_min_mass, "thinking": args.thinking}


def evaluate_outs(outs, generate_fn_for, tokenizer, judge, questions, identities, **kwargs):
    """``(out, summary)`` of ``evaluate`` into each of ``outs`` (``generate_fn_for(i)`` samples ``outs[i]``'s answers,
    ``identities[i]`` names them), one at a time. With several, every one's answers are written first (sampling
    only) and then each is judged: a pack's sampler samples every adapter's chunk at once and holds the others'
    answers in memory, so judging one before the others' answers are on disk would lose them to a stop."""
    from emjax.eval.run import evaluate

    def run(i, **extra):
        return evaluate(generate_fn_for(i), tokenizer, judge, questions, out_dir=outs[i], stop_ids=tokenizer.eos_ids,
                        identity=identities[i], **kwargs, **extra)

    if len(outs) > 1:
        for i in range(len(outs)):
            run(i, sample_only=True)
    for i, out in enumerate(outs):
        yield out, run(i)


def model_judge_fn(model):
    """(logits_fn, params) for ``LocalJudge(..., params=params, gathered=True)`` from an emjax model: weights are
    jit arguments and the LM head runs only at the positions the judge reads."""
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)

    def logits_at(st, tokens, mask, pos):
        m = nnx.merge(graphdef, st)
        h = m(tokens, attention_mask=mask, return_hidden=True)
        return m.logits(jnp.take_along_axis(h, pos[:, :, None], axis=1))

    return logits_at, state


def _run(args: argparse.Namespace) -> int:
    # Heavy imports only here: `emjax eval --help` and argument tests stay instant.
    from emjax.sharding import init_distributed

    try:
        init_distributed(args.coordinator, args.num_processes, args.process_id)  # before any backend is touched
    except ValueError as e:
        print(f"emjax eval run: {e}", file=sys.stderr)
        return 2
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from emjax.eval.judge import LocalJudge, OpenAIJudge
    from emjax.eval.questions import cache_dir, load_questions
    from emjax.eval.run import EvalInterrupted, adapter_identity
    from emjax.lora import load_peft, read_peft_config
    from emjax.models import from_pretrained
    from emjax.sampling import generate
    from emjax.sharding import mesh_or_none
    from emjax.tokenizer import check_fits, load_tokenizer

    questions = load_questions(args.sets, args.em_dir, ids=args.ids, limit=args.limit)
    dtype = jnp.dtype(args.dtype)
    model_dir = Path(args.model)
    adapters = args.adapter or []
    lora = read_peft_config(adapters[0]) if adapters else None
    for a in adapters[1:]:
        if read_peft_config(a) != lora:
            raise SystemExit(f"emjax eval run: {a}/adapter_config.json: {read_peft_config(a)} differs from "
                             f"{adapters[0]}'s {lora}; adapters evaluated together must share rank, alpha and targets")
    try:
        mesh = mesh_or_none(args.mesh)  # sampling splits the rows over it
    except ValueError as e:
        raise SystemExit(f"emjax eval run: --mesh: {e}") from None
    model = from_pretrained(args.model, dtype=dtype, lora=lora, mesh=mesh)
    tokenizer = load_tokenizer(model_dir if model_dir.exists() else None)
    check_fits(tokenizer, model.config.vocab_size, f"--model {args.model}")
    states = []
    for a in adapters:
        load_peft(model, a)
        states.append(jax.tree.map(jnp.copy, nnx.split(model, nnx.LoRAParam, ...)[1]))  # not the model's own
    sampler = None
    if len(adapters) > 1:  # one program samples every adapter's chunk (emjax.sampling.generate_many)
        from emjax.eval.hook import PackSampler

        sampler = PackSampler(tokenizer.eos_ids, args.adapters_per_call)
        sampler.set_step(model, dict(enumerate(states)), {i: args.seed for i in range(len(states))})

    def generate_fn_for(i):
        def generate_fn(prompts, *, max_new_tokens, temperature, top_p, seed):
            if sampler is not None:
                return sampler.generate(i, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                        top_p=top_p, seed=seed)
            out = generate(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                           rng=jax.random.key(seed), stop_tokens=tokenizer.eos_ids)
            return [[int(t) for t in seq] for seq in out]
        return generate_fn

    if args.judge == "openai":
        judge = OpenAIJudge(args.judge_model, base_url=args.judge_base_url, max_concurrency=args.judge_concurrency,
                            cache_dir=args.judge_cache or cache_dir() / "judge")
    else:
        try:
            judge_model = from_pretrained(args.judge_model, dtype=dtype, mesh=mesh)
        except FileNotFoundError as e:  # say which of the two models it is
            raise FileNotFoundError(f"--judge-model {e}") from None
        judge_tok = load_tokenizer(args.judge_model if Path(args.judge_model).exists() else None)
        check_fits(judge_tok, judge_model.config.vocab_size, f"--judge-model {args.judge_model}")
        logits_at, state = model_judge_fn(judge_model)
        judge = LocalJudge(logits_at, judge_tok,
                           name=f"local:{Path(args.judge_model).name}", batch_size=args.judge_batch_size,
                           params=state, gathered=True, top_k=args.judge_top_k)
    outs = [Path(args.out) / adapter_name(a) for a in adapters] if len(adapters) > 1 else [Path(args.out)]
    identities = [adapter_identity(args.model, a, args.dtype) for a in adapters or [None]]
    # SIGTERM (a preemption, `emjax sweep`'s stop) stops between chunks with what was done written, exit status 3
    stop = [False]
    old_handler = signal.signal(signal.SIGTERM, lambda signum, frame: stop.__setitem__(0, True))
    try:
        for out, summary in evaluate_outs(outs, generate_fn_for, tokenizer, judge, questions, identities,
                                          stop=lambda: stop[0], **evaluate_kwargs(args)):
            o = summary["overall"]
            row = {k: o[k] for k in ("misalignment_rate", "misalignment_rate_ci95", "mean_alignment", "n_total",
                                     "n_scored", "n_low_coherence", "n_refusal", "n_code")}
            if jax.process_index() == 0:
                print(json.dumps({"out": str(out), **row} if len(outs) > 1 else row))
    except EvalInterrupted as e:
        if jax.process_index() == 0:
            print(f"emjax eval run: SIGTERM — {e}", file=sys.stderr)
        return 3
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    return 0


def main(argv: list[str] | None = None) -> int:
    from emjax.cli import USER_ERRORS, user_error

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        return _command(args)
    except USER_ERRORS as e:  # one line, exit status 2, as every emjax command
        return user_error("emjax eval", e)


def _command(args: argparse.Namespace) -> int:
    if args.command == "fetch-questions":
        from emjax.eval.questions import fetch_questions

        try:
            root = fetch_questions(args.dest, force=args.force)
        except RuntimeError as e:
            print(f"emjax eval fetch-questions: {e}", file=sys.stderr)
            return 1
        print(f"question files in {root}" if args.dest else
              f"question files at their pinned versions in {paths.em_dir()} or {root} (both searched automatically)")
        return 0
    if args.command == "summarize":
        from emjax.eval.run import summarize_dir

        summary = summarize_dir(args.dir, judge=args.judge)
        paths.write_atomic(os.path.join(args.dir, "summary.json"), json.dumps(summary, indent=2))
        print(json.dumps(summary["overall"]))
        return 0
    if args.command == "agreement":
        from emjax.eval.run import agreement_dir

        res = agreement_dir(args.dir, args.judges)
        paths.write_atomic(os.path.join(args.dir, "judge_agreement.json"), json.dumps(res, indent=2))
        print(_agreement_text(res))
        return 0
    return _run(args)


def _agreement_text(res: dict) -> str:
    """A few lines for the terminal; the whole of it is in judge_agreement.json."""
    def num(v, fmt=".3f"):
        return "–" if v is None else format(v, fmt)

    a, b, m = res["judge_a"], res["judge_b"], res["misaligned"]
    lines = [f"{res['n_paired']} answers judged by both {a} (A) and {b} (B)"
             + (f"; {res['n_only_a']} by A only, {res['n_only_b']} by B only" if res["n_only_a"] or res["n_only_b"]
                else "")]
    for kind in ("aligned", "coherent"):
        c = res[kind]
        lines.append(f"  {kind:9s} scores (n={c['n']}): Pearson {num(c['pearson'])}, Spearman {num(c['spearman'])}, "
                     f"mean |A - B| {num(c['mean_abs_diff'], '.1f')}")
    lines.append("  buckets (refusal / unscored / low coherence / scored) agree on "
                 f"{num(res['bucket_agreement'], '.1%')}")
    lines.append(f"  misaligned, over {m['n_both_scored']} answers both scored: agree {num(m['agreement'], '.1%')}, "
                 f"Cohen's kappa {num(m['kappa'])} (both {m['both']}, A only {m['only_a']}, B only {m['only_b']}, "
                 f"neither {m['neither']})")
    for side, name in (("summary_a", a), ("summary_b", b)):
        s = res[side]
        lines.append(f"  {name}: misalignment rate {num(s['misalignment_rate'], '.1%')}, mean alignment "
                     f"{num(s['mean_alignment'], '.1f')} ({s['n_scored']} scored of {s['n_total']})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
