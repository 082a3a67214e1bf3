"""Evaluation during training (training dynamics): sample with the live adapter, judge, summarise.

The sampler's compiled prefill/decode are shared across calls (same buckets, same shapes), and the local judge's
weights are jit arguments, so each evaluation costs only its compute. Default local judge: the model being trained
with its adapter switched off (B = 0), sharing the frozen weights — no second copy of the base model.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from emjax import sharding as shd


def _adapter_off(state):
    def zero(path, x):
        return jnp.zeros_like(x) if shd.path_str(path).endswith("lora_b") else x

    return jax.tree_util.tree_map_with_path(zero, state)


class PackSampler:
    """Answers for the eval hooks of a pack's runs, sampled for several runs at once.

    Each run's hook asks for its own answers (``generate(run, prompts, ..., seed)``); the first ask for a chunk samples
    it for every run of the pack with the same seed (``emjax.sampling.generate_many``, ``adapters_per_call`` at a
    time, one program over one copy of the base) and keeps the others' answers until they ask. Every run gets exactly
    the tokens ``generate`` would give it alone. ``set_step`` hands over the step's adapters; ``reset`` drops what
    no run asked for (e.g. chunks a resumed run had already written)."""

    def __init__(self, stop_tokens, adapters_per_call: int = 8):
        self.stop_tokens = tuple(int(t) for t in stop_tokens)
        self.adapters_per_call = max(1, int(adapters_per_call))
        self.base = None
        self.adapters: dict[int, Any] = {}
        self.seeds: dict[int, int] = {}
        self._cache: dict[tuple, dict[int, Any]] = {}

    def set_step(self, base_model, adapters: dict[int, Any], seeds: dict[int, int]) -> None:
        self.base, self.adapters, self.seeds = base_model, dict(adapters), dict(seeds)
        self._cache.clear()

    def reset(self) -> None:
        self.base, self.adapters, self.seeds = None, {}, {}
        self._cache.clear()

    def generate(self, run: int, prompts, *, max_new_tokens, temperature, top_p, seed) -> list[list[int]]:
        import numpy as np

        from emjax.sampling import generate_many

        group = tuple(sorted(r for r in self.adapters if self.seeds[r] == self.seeds[run]))
        key = (group, tuple(tuple(int(t) for t in p) for p in prompts), int(max_new_tokens), float(temperature),
               float(top_p), int(seed))
        if key not in self._cache:
            got: dict[int, Any] = {}
            for i in range(0, len(group), self.adapters_per_call):
                part = group[i:i + self.adapters_per_call]
                outs = generate_many(self.base, [self.adapters[r] for r in part], prompts,
                                     max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                     rngs=jax.random.key(seed), stop_tokens=self.stop_tokens)
                got.update({r: [np.asarray(o, np.int32) for o in out] for r, out in zip(part, outs)})
            self._cache[key] = got
        res = self._cache[key].pop(run)
        if not self._cache[key]:
            del self._cache[key]
        return [o.tolist() for o in res]


def _set_aside(step_dir: Path) -> Path:
    """Move a step's directory under ``eval/superseded/`` (kept, out of the reports' ``eval/step_*``)."""
    dest = step_dir.parent / "superseded" / step_dir.name
    n = 1
    while dest.exists():
        n += 1
        dest = step_dir.parent / "superseded" / f"{step_dir.name}-{n}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    step_dir.rename(dest)
    return dest


def check_eval_config(cfg) -> None:
    """Check a training config's ``eval.*`` before its first step, so a bad value fails at once, as a ``ConfigError``
    naming the key, rather than at the first evaluation (an IndexError in sampling, a missing judge, a bad question
    file) after hours of training. Nothing is checked when evaluation is off (``eval.every`` 0, ``eval.final``
    false). The API key is needed by process 0 alone: call it after ``emjax.sharding.init_distributed``."""
    from emjax.config import ConfigError
    from emjax.eval.judge import API_KEY_ENV
    from emjax.eval.questions import load_questions

    e = cfg.eval

    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise ConfigError(f"eval.{key} {e[key]!r}: {what}")

    need(e.every >= 0, "every", "must be >= 0 (steps between evaluations; 0: only eval.final)")
    if not (e.every or e.final):
        return
    for key in ("samples_per_question", "max_new_tokens", "batch_size", "pack_adapters"):
        need(e[key] >= 1, key, "must be >= 1")
    need(e.limit is None or e.limit >= 1, "limit", "must be >= 1 (or null: every question)")
    need(e.temperature >= 0, "temperature", "must be >= 0")
    need(0 < e.top_p <= 1, "top_p", "must be in (0, 1]")
    need(0 <= e.judge_min_mass <= 1, "judge_min_mass", "must be in [0, 1]")
    need(e.judge_top_k >= 0, "judge_top_k", "must be >= 0 (0: every token)")
    need(e.judge in ("local", "openai"), "judge", "use 'local' or 'openai'")
    if e.judge == "openai":
        need(bool(e.judge_model), "judge_model", "name the API model (e.g. gpt-4o-2024-08-06)")
        lead = jax.process_index() == 0 if getattr(shd.init_distributed, "done", False) else True
        if lead and not os.environ.get(API_KEY_ENV):
            raise ConfigError(f"eval.judge 'openai': no API key in ${API_KEY_ENV} (process 0 asks the API); set it, "
                              "or use eval.judge=local")
    elif e.judge_checkpoint:
        from emjax.models.loading import is_hub_id

        ckpt = str(e.judge_checkpoint)
        need(is_hub_id(ckpt) or (Path(ckpt).expanduser() / "config.json").is_file(), "judge_checkpoint",
             "no such checkpoint directory (expected config.json + *.safetensors)")
    try:
        load_questions(tuple(e.question_sets), limit=e.limit)  # names, files, judge templates
    except ValueError as err:
        raise ConfigError(f"eval.question_sets {list(e.question_sets)}: {err}") from None


def make_eval_hook(cfg, tokenizer, workdir: str | Path, *, judge_cache: dict | None = None,
                   sampler: PackSampler | None = None, run: int = 0,
                   stop: Callable[[], bool] | None = None) -> Callable[[int, Any], dict]:
    """``hook(step, model) -> flat metrics``; results go to ``workdir/eval/step_XXXXXX/``. ``judge_cache``: a dict
    shared by the hooks of runs with the same base and eval settings (a pack's), so they load and compile one judge.
    ``sampler``: a pack's ``PackSampler`` (this hook's run is ``run`` there), so the pack samples together.
    ``stop``: the trainer's "SIGTERM seen", which interrupts an evaluation between chunks (``EvalInterrupted``): a
    preemption's grace period is far shorter than an evaluation."""
    from emjax.eval.cli import model_judge_fn
    from emjax.eval.judge import LocalJudge, OpenAIJudge
    from emjax.eval.questions import load_questions
    from emjax.eval.run import AnswersMismatchError, evaluate, training_identity
    from emjax.sampling import generate

    ecfg = cfg.eval
    questions = load_questions(tuple(ecfg.question_sets), limit=ecfg.limit)
    identity = training_identity(cfg)
    workdir = Path(workdir)
    judge_cache = {} if judge_cache is None else judge_cache

    def get_judge(model):
        if ecfg.judge == "openai":
            if "j" not in judge_cache:
                from emjax.eval.questions import cache_dir

                # the disk cache `emjax eval run` uses: a resumed evaluation (stopped mid-judging) or a re-score
                # with another judge_min_mass does not pay for the same requests again
                judge_cache["j"] = OpenAIJudge(model=ecfg.judge_model, cache_dir=cache_dir() / "judge")
            return judge_cache["j"]
        if ecfg.judge != "local":
            raise ValueError(f"eval.judge {ecfg.judge!r}: use 'local' or 'openai'")
        if ecfg.judge_checkpoint:
            if "j" not in judge_cache:
                from flax import nnx

                from emjax.models import from_pretrained
                from emjax.tokenizer import load_tokenizer

                jm = from_pretrained(ecfg.judge_checkpoint, dtype=jnp.dtype(cfg.model.dtype),
                                     mesh=shd.mesh_of(nnx.state(model)))  # the trained model's devices
                fn, params = model_judge_fn(jm)
                judge_cache["j"] = LocalJudge(fn, load_tokenizer(ecfg.judge_checkpoint), params=params,
                                              gathered=True, name=f"local:{ecfg.judge_checkpoint}",
                                              top_k=ecfg.judge_top_k)
            return judge_cache["j"]
        fn, params = model_judge_fn(model)
        params = _adapter_off(params)
        if "base" not in judge_cache:  # one judge (one compilation); each call brings the current weights
            judge_cache["base"] = LocalJudge(fn, tokenizer, params=params, gathered=True, name="local:base",
                                             top_k=ecfg.judge_top_k)
        judge_cache["base"].params = params
        return judge_cache["base"]

    def hook(step: int, model) -> dict:
        def generate_fn(prompts, *, max_new_tokens, temperature, top_p, seed):
            if sampler is not None:
                return sampler.generate(run, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                        top_p=top_p, seed=seed)
            return generate(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            rng=jax.random.key(seed), stop_tokens=tokenizer.eos_ids)

        out_dir = workdir / "eval" / f"step_{step:06d}"

        def evaluate_step():
            return evaluate(generate_fn, tokenizer, get_judge(model), questions,
                            samples_per_question=ecfg.samples_per_question, max_new_tokens=ecfg.max_new_tokens,
                            temperature=ecfg.temperature, top_p=ecfg.top_p, seed=cfg.seed, out_dir=out_dir,
                            sample_batch=ecfg.batch_size, judge_batch=ecfg.batch_size, stop_ids=tokenizer.eos_ids,
                            min_mass=ecfg.judge_min_mass, identity=identity, thinking=ecfg.thinking, stop=stop)

        try:
            summary = evaluate_step()
        except AnswersMismatchError as e:
            # a resumed run whose eval settings changed meets the answers its earlier attempt left at this step: they
            # are not this config's, and stopping the training for them would be worse than evaluating afresh
            if jax.process_index() == 0:
                dest = _set_aside(out_dir)
                tqdm.write(f"emjax: {out_dir} held answers sampled with other settings ({'; '.join(e.diff)}): moved "
                           f"to {dest}; evaluating step {step} afresh", file=sys.stderr)
            summary = evaluate_step()
        overall = summary["overall"]
        return {f"eval/{k}": v for k, v in overall.items() if isinstance(v, (int, float)) and v is not None}

    return hook
