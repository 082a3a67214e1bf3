"""Sweeps of training runs: ``emjax sweep SWEEP.yaml [--dry-run|--print-commands] [--jobs N] [--only S] [k=v ...]``.

A sweep file is a run config (or a reference to one) plus a ``sweep:`` section::

    # top-level keys: an inline base config (TrainConfig keys), like any file in configs/
    steps: 100
    sweep:
      base: tiny                 # optional: a config in configs/ (or a path) the inline keys are laid over
      root: runs/sweeps/example  # output root (default runs/sweeps/<file stem>); --root overrides
      set: {eval.final: true}    # overrides for every run (not part of run names)
      points:                    # explicit runs, each a dict of dotted overrides
        - {optim.name: adam, optim.learning_rate: 1.0e-5}
        - {optim.name: muon, optim.learning_rate: 2.0e-2}
      grid:                      # full product of axes (a list of such mappings = union of products)
        data.dataset: [insecure, extreme_sports]
        seed: [0, 1]

An axis value that is a mapping sets several keys at once (``{optim.name: muon, optim.learning_rate: 2e-2}``),
so an optimiser and its learning rate vary together. With both ``points`` and ``grid`` every point is crossed with
the grid; with one of them it alone defines the runs. Each run's work directory is ``root/<name>`` where the name
is its overrides, ``key=value`` joined by commas (``/`` -> ``_``; a hash is appended only if names would collide or
exceed 150 characters; a ``_name`` must be a string or number, and not ``.`` or ``..``). Every run is
``emjax train CONFIG OVERRIDES workdir=root/<name>``, whether run here (a subprocess each) or printed for an
external launcher (with absolute paths, to run from anywhere), so both paths build the same config.

``--pack N`` trains up to N runs at once as one *pack* (``emjax train CONFIG --run ... --run ...``): runs that differ
only in optimiser, ``spectral.weight``, work directory and, on a checkpoint base, seed (``emjax.config.pack_key``) and
can resume from one step (all new, or with a checkpoint step in common: after a kill during a pack's save, the
newest step they all have, as ``emjax train`` resumes such a pack) share one copy of the frozen base in one compiled
program, and each still writes its own work directory, so resuming, skipping and ``emjax report`` see no difference.
An optimiser × λ grid on one chip is a few packs.

Re-running a sweep skips runs with a ``DONE`` marker and resumes partial ones from their checkpoints (the trainer
does that). A failing run leaves ``FAILED`` (the error) in its directory and the sweep goes on; the exit status is
0 if every selected run finished, 1 if any failed, 2 for a bad sweep file or arguments, 3 if a run was preempted.
SIGTERM (or SIGINT) to the sweep is passed on to the running runs, which save a checkpoint and stop; no new run
starts, the sweep waits for them and exits with 3 (rerun it to resume).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from omegaconf import OmegaConf

from emjax import config as cfglib
from emjax import paths
from emjax.cli import PREEMPTED, exit_status, user_error

MAX_NAME = 150
SWEEP_KEYS = ("base", "root", "set", "grid", "points")

# Model families the trainer cannot load yet. Their runs stay in the study's sweep files (so the sweeps are
# complete and run once support lands) but fail fast here with this message instead of downloading weights first.
# Remove a line when its family is supported.
UNSUPPORTED: tuple[tuple[re.Pattern, str], ...] = ()  # every family of the study's sweeps is supported now
SUPPORTED_MODEL_TYPES = ("qwen3", "qwen3_moe", "llama", "gemma3", "gemma3_text")  # = emjax.models.loading.FAMILIES


class SweepError(ValueError):
    """A bad sweep file or argument; the message names the file and key."""


class UnsupportedModel(RuntimeError):
    pass


@dataclass
class Run:
    name: str
    overrides: dict[str, Any]  # this run's own overrides (what names it)
    args: list[str]  # all key=value overrides after the config file, workdir last
    config_file: str
    workdir: Path
    cfg: Any = field(default=None, repr=False)  # resolved OmegaConf TrainConfig

    @property
    def status(self) -> str:
        """done | failed | partial | new (from the files in the work directory). Partial means it would resume: a
        checkpoint step and no DONE; a run stopped before its first checkpoint (an empty ``checkpoints/``, only
        ``config.yaml``) starts afresh, so it is new."""
        if (self.workdir / "DONE").exists():
            return "done"
        if (self.workdir / "FAILED").exists():
            return "failed"
        return "partial" if resume_step(self.workdir) > 0 else "new"

    def command(self, program: Sequence[str] = ("emjax",)) -> str:
        return shlex.join(pack_command([self], program))


@dataclass
class Sweep:
    path: Path
    root: Path
    runs: list[Run]


# ---------------------------------------------------------------------------------------------------------------
# Expansion


def format_value(v: Any) -> str:
    """A value as a ``key=value`` override string that OmegaConf parses back to the same value."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(format_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        raise SweepError(f"value {v!r}: nested mappings are not override values")
    return str(v)


NAME_KEY = "_name"  # in a mapping value: the label used in run names instead of its key=value pairs


def _label(label: Any, where: str) -> str | None:
    """A ``_name`` as text for a run name (None: none given). It becomes (part of) a directory name under the
    sweep root, so it must be a string or number that sanitises to a usable name: not empty, ``.`` or ``..``
    (``root/..`` is outside the root)."""
    if label is None:
        return None
    if isinstance(label, bool) or not isinstance(label, (str, int, float)):
        raise SweepError(f"{where}: {NAME_KEY} {label!r}: expected a string or number (a label for run names)")
    if _sanitize(str(label)) in ("", ".", ".."):
        raise SweepError(f"{where}: {NAME_KEY} {label!r} cannot name a run directory (it would be "
                         f"{_sanitize(str(label))!r}); use letters or digits")
    return str(label)


def _overrides_of(value: Any, axis: str, where: str) -> tuple[dict[str, Any], str]:
    """One axis value -> ({dotted key: value}, name fragment). A mapping sets several keys at once."""
    if isinstance(value, Mapping):
        value = dict(value)
        label = _label(value.pop(NAME_KEY, None), where)
        if not value:
            raise SweepError(f"{where}: axis {axis!r} has an empty mapping as a value")
        ov = cfglib.flatten(value)
        return ov, (f"{axis}={label}" if label is not None else ",".join(f"{k}={format_value(v)}"
                                                                         for k, v in ov.items()))
    return {axis: value}, f"{axis}={format_value(value)}"


def _sanitize(s: str) -> str:
    s = s.replace("/", "_")
    return re.sub(r"[^A-Za-z0-9._=,+\-]", "_", s)


def _hash(overrides: Mapping[str, Any]) -> str:
    canon = json.dumps({k: overrides[k] for k in sorted(overrides)}, sort_keys=True, default=str)
    return hashlib.sha1(canon.encode()).hexdigest()[:8]


def _merge(parts: Sequence[tuple[dict[str, Any], str]], where: str) -> tuple[dict[str, Any], str]:
    merged: dict[str, Any] = {}
    for ov, _ in parts:
        for k in ov:
            if k in merged:
                raise SweepError(f"{where}: key {k!r} is set twice for one run (by two axes, or a point and the grid)")
        merged.update(ov)
    return merged, ",".join(f for _, f in parts if f)


def _check_no_workdir(ov: Mapping[str, Any], where: str) -> None:
    """Each run's work directory is ``root/<run name>``: a ``workdir`` override would be silently replaced by it
    (and end up in the run name)."""
    if any(k == "workdir" or k.startswith("workdir.") for k in ov):
        raise SweepError(f"{where}: workdir is set by the sweep (sweep.root/<run name>); use sweep.root")


def _expand_grid(grid: Any, where: str) -> list[tuple[dict[str, Any], str]]:
    if isinstance(grid, list) and not grid:
        raise SweepError(f"{where}: expected a non-empty list (of mappings axis -> list of values) or mapping")
    blocks = grid if isinstance(grid, list) else [grid]
    out = []
    for bi, block in enumerate(blocks):
        bwhere = f"{where}[{bi}]" if isinstance(grid, list) else where
        if not isinstance(block, Mapping) or not block:
            raise SweepError(f"{bwhere}: expected a non-empty mapping axis -> list of values")
        axes = []
        for axis, values in block.items():
            if not isinstance(values, list) or not values:
                raise SweepError(f"{bwhere}.{axis}: expected a non-empty list of values, got {values!r}")
            axes.append([_overrides_of(v, axis, f"{bwhere}.{axis}") for v in values])
            for ov, _ in axes[-1]:
                _check_no_workdir(ov, f"{bwhere}.{axis}")
        out += [_merge(combo, bwhere) for combo in itertools.product(*axes)]
    return out


def expand(spec: Mapping[str, Any], where: str = "sweep") -> list[tuple[dict[str, Any], str]]:
    """The ``sweep:`` section -> (overrides, readable name) per run: points × grid, in file order.

    Names are ``key=value`` fragments joined by commas (a mapping value with ``_name: L`` gives ``axis=L``),
    sanitised for file systems; duplicates are errors; colliding or over-long names get a hash suffix."""
    unknown = sorted(set(spec) - set(SWEEP_KEYS))
    if unknown:
        raise SweepError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(SWEEP_KEYS)})")
    points, grid = spec.get("points"), spec.get("grid")
    if points is None and grid is None:
        raise SweepError(f"{where}: needs `grid:` (full product of axes) and/or `points:` (explicit runs)")
    if points is not None:
        if not isinstance(points, list) or not points:
            raise SweepError(f"{where}.points: expected a non-empty list of override mappings")
        pts = []
        for i, p in enumerate(points):
            if not isinstance(p, Mapping) or not p:
                raise SweepError(f"{where}.points[{i}]: expected a mapping of overrides, got {p!r}")
            ov, frag = _overrides_of(p, "point", f"{where}.points[{i}]")
            _check_no_workdir(ov, f"{where}.points[{i}]")
            label = _label(p.get(NAME_KEY), f"{where}.points[{i}]")
            pts.append((ov, frag if label is None else label))
    else:
        pts = [({}, "")]
    cells = _expand_grid(grid, f"{where}.grid") if grid is not None else [({}, "")]
    runs = [_merge([p, c], where) for p in pts for c in cells]

    seen: dict[str, int] = {}
    for i, (ov, _) in enumerate(runs):
        key = json.dumps(ov, sort_keys=True, default=str)
        if key in seen:
            raise SweepError(f"{where}: runs {seen[key]} and {i} have the same overrides {ov}")
        seen[key] = i
    names = [_sanitize(frag) for _, frag in runs]  # (_label keeps them directory names under the root)
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    out = []
    for n, (ov, _) in zip(names, runs):
        if counts[n] > 1 or len(n) > MAX_NAME:
            n = f"{n[:MAX_NAME - 9]}-{_hash(ov)}"
        out.append((ov, n))
    return out


def load_sweep(path: str | Path, overrides: Sequence[str] = (), *, root: str | Path | None = None) -> Sweep:
    """Parse, expand and validate a sweep file: every run's config is built (bad keys fail here, by name)."""
    path = cfglib.find_config(path)
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:  # YAML syntax errors carry their own line numbers: one line
        raise SweepError(f"{path}: cannot parse: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("sweep"), dict):
        raise SweepError(f"{path}: no `sweep:` mapping — not a sweep file")
    spec = raw.pop("sweep")
    where = f"{path}: sweep"
    for key in ("base", "root"):
        value = spec.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise SweepError(f"{where}.{key}: expected a path (a non-empty string), got {value!r}")
    cells = expand(spec, where)

    base_args: list[str] = []
    if spec.get("base") is not None:
        try:
            config_file = str(cfglib.find_config(spec["base"]))
        except cfglib.ConfigError as e:
            raise SweepError(f"{where}.base: {e}") from None
        base_args += [f"{k}={format_value(v)}" for k, v in cfglib.flatten(raw).items()]  # inline keys over the base
    else:
        config_file = str(path)  # cfglib.load pops `sweep:` itself
    set_ = spec.get("set") or {}
    if not isinstance(set_, Mapping):
        raise SweepError(f"{where}.set: expected a mapping of overrides")
    set_flat = cfglib.flatten(set_)
    _check_no_workdir(set_flat, f"{where}.set")
    varied = sorted({k for ov, _ in cells for k in ov} & set(set_flat))
    if varied:  # `set` is for every run: a run's own value would silently win
        raise SweepError(f"{where}: key {varied[0]!r} is in `set` (every run) and varies in the points or grid; "
                         "keep it in one place")
    base_args += [f"{k}={format_value(v)}" for k, v in set_flat.items()]
    for ov in overrides:
        if "=" not in ov:
            raise SweepError(f"command-line override {ov!r}: expected key=value")
        if ov.split("=", 1)[0].strip().lstrip("+~") == "workdir":
            raise SweepError(f"command-line override {ov!r}: workdir is set by the sweep (root/<run name>); "
                             "use --root")
    try:
        root = paths.local_dir(root, "--root") if root is not None else \
            paths.local_dir(spec.get("root") or Path("runs/sweeps") / path.stem, f"{path}: sweep.root")
    except ValueError as e:
        raise SweepError(str(e)) from None

    try:
        base = cfglib.load(config_file, base_args)
    except cfglib.ConfigError as e:
        raise SweepError(f"{where}: {e}") from None
    out = []
    for ov, name in cells:
        workdir = root / name
        run_args = [*(f"{k}={format_value(v)}" for k, v in ov.items()), *overrides, f"workdir={workdir}"]
        try:  # one merge per run (what cfglib.load does override by override, ~50x faster for big grids)
            cfg = OmegaConf.merge(base, OmegaConf.from_dotlist(run_args))
            cfglib.absolute_paths(cfg)
        except Exception:
            try:  # cfglib.load names the offending key
                cfg = cfglib.load(config_file, [*base_args, *run_args])
            except cfglib.ConfigError as e:
                raise SweepError(f"{where}: run {name}: {e}") from None
        out.append(Run(name, ov, [*base_args, *run_args], config_file, workdir, cfg))
    return Sweep(path, root, out)


# ---------------------------------------------------------------------------------------------------------------
# Running


def check_supported(cfg) -> None:
    """Fail fast (before any download) for model families the trainer cannot load yet."""
    ckpt = cfg.model.checkpoint
    if not ckpt:
        return
    local = Path(ckpt) / "config.json"
    if local.is_file():
        mt = json.loads(local.read_text()).get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModel(f"model.checkpoint {ckpt}: model_type {mt!r} is not supported yet "
                                   f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        return
    for pat, msg in UNSUPPORTED:
        if pat.search(str(ckpt)):
            raise UnsupportedModel(f"model.checkpoint {ckpt}: {msg} (emjax trains Qwen3, Qwen3-MoE, Llama 3 "
                                   "and Gemma 3 only); the run is kept in the sweep so it runs once support lands")


def _mark_failed(run: Run, message: str) -> None:
    run.workdir.mkdir(parents=True, exist_ok=True)
    (run.workdir / "FAILED").write_text(message if message.endswith("\n") else message + "\n")


def checkpoint_steps(workdir: Path) -> frozenset[int]:
    """The steps a run has a complete checkpoint of (``checkpoints/<step>``; a save a kill cut short is only a
    ``<step>.orbax-checkpoint-tmp...`` directory, not a step)."""
    ckpts = Path(workdir) / "checkpoints"
    return frozenset(int(p.name) for p in ckpts.iterdir() if p.name.isdecimal()) if ckpts.is_dir() else frozenset()


def resume_step(workdir: Path) -> int:
    """The step a run alone would resume from: its latest checkpoint (0 for none)."""
    return max(checkpoint_steps(workdir), default=0)


def pack_resume_step(pack: Sequence[Run]) -> int | None:
    """The step a pack resumes from, as ``emjax.train.train_many`` picks it: the newest checkpoint step all its runs
    have (a kill during a pack's save leaves some runs a checkpoint ahead), 0 when none has a checkpoint (a fresh
    start), None when they have no step in common (train_many refuses such a pack)."""
    steps = [checkpoint_steps(r.workdir) for r in pack]
    if not any(steps):
        return 0
    return max(frozenset.intersection(*steps), default=None)


def make_packs(runs: Sequence[Run], size: int) -> list[list[Run]]:
    """Runs in groups that can train as one pack (equal ``emjax.config.pack_key``, and a step to resume from
    together: ``pack_resume_step`` — all new, or with a checkpoint step in common, so runs a kill during a pack's
    save left at different steps stay one pack), at most ``size`` each, in sweep order (a group of 10 with ``size``
    4: 3, 3 and 4, not 4, 4 and 2); ``size`` 1: one run each."""
    if size <= 1:
        return [[r] for r in runs]
    groups: list[tuple[str, frozenset[int], list[Run]]] = []  # (pack key, steps all its runs have, runs)
    for r in runs:
        key = json.dumps(cfglib.pack_key(r.cfg), sort_keys=True, default=str)
        steps = checkpoint_steps(r.workdir)
        best, best_step = None, -1
        for i, (k, common, _) in enumerate(groups):
            if k != key or bool(steps) != bool(common):  # a new run never packs with a partial one
                continue
            shared = steps & common
            if (shared or not steps) and max(shared, default=0) > best_step:  # the group it loses least in
                best, best_step = i, max(shared, default=0)
        if best is None:
            groups.append((key, steps, [r]))
        else:
            k, common, members = groups[best]
            groups[best] = (k, common & steps, [*members, r])
    packs = []
    for _, _, g in groups:  # as few packs as the size allows, of sizes differing by at most one
        k = -(-len(g) // size)
        cuts = [len(g) * i // k for i in range(k + 1)]
        packs += [g[a:b] for a, b in zip(cuts, cuts[1:])]
    return packs


def _absolute_args(run: Run) -> list[str]:
    """``run.args`` with its work directory (``workdir=root/<name>``, the last) as an absolute path, after the
    local paths its config holds (plugins, datasets, question files, checkpoints: ``cfglib.absolute_paths``, from
    the file or the overrides alike) restated as absolute overrides."""
    from omegaconf import OmegaConf

    own = f"workdir={run.workdir}"
    args = [a for a in run.args if a != own]
    for key in (*cfglib.PATH_DIRS, *cfglib.PATH_FILES):
        v = OmegaConf.select(run.cfg, key)
        v = OmegaConf.to_container(v) if OmegaConf.is_config(v) else v
        if any(isinstance(x, str) and x.startswith("/") for x in (v if isinstance(v, list) else [v])):
            args.append(f"{key}={format_value(v)}")
    return [*args, f"workdir={os.path.abspath(run.workdir)}"]


def pack_command(pack: Sequence[Run], program: Sequence[str] = ("emjax",), absolute: bool = False) -> list[str]:
    """``emjax train`` for one run, or for a pack: each run's overrides as one ``--run`` argument. ``absolute``:
    the config file and work directories as absolute paths, so that a printed command works from any directory
    (an external launcher's jobs rarely start in this one)."""
    config_file = os.path.abspath(pack[0].config_file) if absolute else pack[0].config_file
    args = [_absolute_args(r) if absolute else r.args for r in pack]
    if len(pack) == 1:
        return [*program, "train", config_file, *args[0]]
    return [*program, "train", config_file, *[a for r in args for a in ("--run", shlex.join(r))]]


def default_program() -> tuple[str, ...]:
    """How a sweep starts ``emjax``: this interpreter with ``-P``, so the current directory is not put first on the
    child's ``sys.path`` (run from a directory holding another emjax checkout, ``-m`` would import that one)."""
    return (sys.executable, "-P", "-m", "emjax.cli")


def _child_env() -> dict[str, str] | None:
    """The environment of the ``default_program`` children: this one's, plus, where this process imported emjax
    from the current directory (an uninstalled checkout: ``python -m emjax.cli`` from its root), that directory on
    PYTHONPATH, as ``-P`` leaves it out. None (inherit) otherwise."""
    import emjax

    root = Path(emjax.__file__).resolve().parent.parent
    try:
        if root != Path.cwd().resolve():
            return None
    except OSError:  # no current directory (removed under us): nothing to import from it either
        return None
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _run_inprocess(pack: Sequence[Run], train_fn: Callable, pack_fn: Callable | None) -> dict[str, str]:
    """One run (``train_fn(cfg)``) or pack (``pack_fn(cfgs)``) in this process -> {name: done | failed | preempted}."""
    try:
        for run in pack:
            check_supported(run.cfg)
        results = [train_fn(pack[0].cfg)] if len(pack) == 1 else pack_fn([r.cfg for r in pack])
    except Exception as e:  # one bad run must not stop the sweep
        for run in pack:
            _mark_failed(run, f"{type(e).__name__}: {e}\n\n{traceback.format_exc()}")
        return {run.name: "failed" for run in pack}
    out = {}
    for run, result in zip(pack, results):
        status = getattr(result, "status", "done")
        if status == "failed":  # a pack's run whose loss went non-finite
            _mark_failed(run, f"TrainError: {getattr(result, 'error', None) or 'failed'}")
        elif status == "done" and not (run.workdir / "DONE").exists():
            _mark_failed(run, "the trainer returned without writing DONE")
            status = "failed"
        out[run.name] = status
    return out


def _pump(src, logs, echo) -> None:
    """Copy a child's output to its runs' train.log and, for a single job, to our stderr (live progress bars). Reads
    to the end whatever happens to the copies (a closed stderr, a full disk): a reader that stopped would leave the
    child blocked on, or killed by, a full or broken pipe before it saves its checkpoint."""
    for chunk in iter(lambda: src.read1(4096), b""):
        for log in logs:
            try:
                log.write(chunk)
                log.flush()
            except (OSError, ValueError):
                pass
        if echo:
            try:
                sys.stderr.buffer.write(chunk)
                sys.stderr.buffer.flush()
            except (OSError, ValueError, AttributeError):  # our stderr went away: keep draining the child
                echo = False


class _Stop:
    """While children run: SIGTERM (a scheduler's preemption, ``kill -TERM -PGID``) or SIGINT (Ctrl-C) to the sweep
    is passed on to each running child as SIGTERM (``emjax train`` then saves a checkpoint and exits, and a second
    SIGTERM, e.g. when the whole group was signalled, only sets its flag again); no new run starts, and the sweep
    keeps reading the children's output until they exit, instead of dying and breaking their pipes. The previous
    handlers come back on exit. Outside the main thread (no signal handlers there) it does nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.stopped = False
        self.procs: list[subprocess.Popen] = []
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame):
        self.stopped = True
        for proc in list(self.procs):
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                except OSError:
                    pass

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def popen(self, *args, **kwargs) -> subprocess.Popen:
        """``subprocess.Popen`` with SIGINT ignored in the child: a Ctrl-C reaches the child as our SIGTERM (a
        checkpoint), not as a KeyboardInterrupt that kills it unsaved."""
        old = signal.signal(signal.SIGINT, signal.SIG_IGN) if self._old else None
        try:
            proc = subprocess.Popen(*args, **kwargs)
        finally:
            if old is not None:
                signal.signal(signal.SIGINT, old)
        self.procs.append(proc)
        if self.stopped:  # a signal came while it started
            self._handler(signal.SIGTERM, None)
        return proc


def _run_subprocesses(packs: list[list[Run]], jobs: int, program: Sequence[str], bar,
                      env: dict[str, str] | None = None) -> dict[str, str]:
    """Up to ``jobs`` runs or packs at once as ``emjax train`` subprocesses (each gets a fresh process: no state,
    memory or compiled programs leak between them); output to each run's ``<workdir>/train.log``, echoed live when
    ``jobs == 1``. On SIGTERM or SIGINT (``_Stop``) the running children are told to save and stop and no run starts
    any more; a run that SIGTERM kept from starting, or killed before the trainer could handle it, is preempted."""
    import threading

    results: dict[str, str] = {}
    pending = list(packs)
    active: list[tuple[list[Run], subprocess.Popen, list]] = []
    with _Stop() as stop:
        while (pending and not stop.stopped) or active:
            while pending and len(active) < jobs and not stop.stopped:
                pack = []
                for run in pending.pop(0):
                    try:
                        check_supported(run.cfg)
                    except UnsupportedModel as e:
                        _mark_failed(run, str(e))
                        results[run.name] = "failed"
                        bar.update(1)
                        continue
                    pack.append(run)
                if not pack:
                    continue
                logs = []
                for run in pack:
                    run.workdir.mkdir(parents=True, exist_ok=True)
                    logs.append(open(run.workdir / "train.log", "ab"))
                proc = stop.popen(pack_command(pack, program), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  env=env)
                pump = threading.Thread(target=_pump, args=(proc.stdout, logs, jobs == 1), daemon=True)
                pump.start()
                proc.pump = pump
                active.append((pack, proc, logs))
            still = []
            for pack, proc, logs in active:
                rc = proc.poll()
                if rc is None:
                    still.append((pack, proc, logs))
                    continue
                proc.pump.join()
                for log in logs:
                    log.close()
                for run in pack:
                    if (run.workdir / "DONE").exists():
                        results[run.name] = "done"
                    elif (run.workdir / "FAILED").exists():  # the trainer stopped this run of a pack; the rest went on
                        results[run.name] = "failed"
                    elif rc in (0, PREEMPTED) or rc == -signal.SIGTERM or (stop.stopped and rc == -signal.SIGINT):
                        results[run.name] = "preempted"  # (killed by SIGTERM: before the trainer's handler was set)
                    else:
                        tail = (run.workdir / "train.log").read_text(errors="replace")[-4000:]
                        _mark_failed(run, f"exit status {rc}: {shlex.join(proc.args)}\n\n"
                                          f"--- end of train.log ---\n{tail}")
                        results[run.name] = "failed"
                    bar.update(1)
            active = still
            if active:
                time.sleep(0.2)
    if stop.stopped:
        for pack in pending:  # never started: rerunning the sweep runs them
            for run in pack:
                results[run.name] = "preempted"
    return results


def run_sweep(sweep: Sweep, *, jobs: int = 1, train_fn: Callable | None = None,
              program: Sequence[str] | None = None, progress: bool = True, pack: int = 1,
              pack_fn: Callable | None = None) -> dict[str, str]:
    """Run every unfinished run, ``pack`` at a time where they can share a program (``make_packs``);
    {name: done | skipped | failed | preempted}. Stops after a preemption. An injected ``train_fn`` (tests,
    notebooks) runs in this process, with ``pack_fn`` (default ``emjax.train.train_many``) for packs."""
    from tqdm.auto import tqdm

    sweep.root.mkdir(parents=True, exist_ok=True)
    (sweep.root / "sweep.yaml").write_text(sweep.path.read_text())  # what produced this directory
    results = {r.name: "skipped" for r in sweep.runs if r.status == "done"}
    todo = [r for r in sweep.runs if r.status != "done"]
    for r in todo:
        (r.workdir / "FAILED").unlink(missing_ok=True)  # a retry starts clean
    packs = make_packs(todo, pack)
    bar = tqdm(total=len(todo), desc=f"sweep {sweep.path.stem}", unit="run", disable=not progress)
    try:
        if jobs > 1 or train_fn is None:
            results.update(_run_subprocesses(packs, jobs, program or default_program(), bar,
                                             None if program else _child_env()))
        else:
            if pack_fn is None:
                from emjax.train import train_many as pack_fn
            for group in packs:
                bar.set_postfix_str(group[0].name[-60:] + (f" +{len(group) - 1}" if len(group) > 1 else ""))
                statuses = _run_inprocess(group, train_fn, pack_fn)
                results.update(statuses)
                bar.update(len(group))
                if "preempted" in statuses.values():
                    break
    finally:
        bar.close()
    return results


def exit_code(results: Mapping[str, str]) -> int:
    return exit_status(results.values())


def select(runs: list[Run], only: Sequence[str]) -> list[Run]:
    """Runs whose name contains every ``--only`` substring."""
    return [r for r in runs if all(s in r.name for s in only)]


def _list_runs(runs: Sequence[Run], pack: int) -> None:
    """``--dry-run``: each run's status (and pack) and work directory, and for a partial run the step it resumes
    from (a pack's: the newest step all its runs have); a count by status on stderr."""
    counts: dict[str, int] = {}
    packs = make_packs([r for r in runs if r.status != "done"], pack)
    pack_of = {r.name: i for i, p in enumerate(packs) for r in p}
    start = {r.name: pack_resume_step(p) for p in packs for r in p}  # the pack's step, not each run's newest
    for r in runs:
        counts[r.status] = counts.get(r.status, 0) + 1
        note = ""
        if r.status == "partial":
            own = resume_step(r.workdir)
            at = start.get(r.name, own)
            note = f"  [resumes at step {at}" + (f" with its pack; saved to {own}]" if at != own else "]")
        try:
            check_supported(r.cfg)
        except UnsupportedModel as e:
            note += f"  [unsupported: {e}]"
        where = f"pack {pack_of[r.name]:<3d} " if pack > 1 and r.name in pack_of else ""
        print(f"{r.status:8s} {where}{r.workdir}{note}")
    summary = f"{len(runs)} runs: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    if pack > 1 and pack_of:
        n_packs = len(set(pack_of.values()))
        summary += f"; the unfinished ones in {n_packs} pack{'s' if n_packs != 1 else ''}"
    print(summary, file=sys.stderr)


def _print_commands(runs: Sequence[Run], pack: int) -> None:
    """``--print-commands``: one ``emjax train`` command per unfinished run or pack, with absolute paths."""
    todo = []
    for r in runs:
        if r.status == "done":
            continue
        try:
            check_supported(r.cfg)
        except UnsupportedModel as e:
            print(f"emjax sweep: skipping {r.name}: {e}", file=sys.stderr)
            continue
        todo.append(r)
    for p in make_packs(todo, pack):
        print(shlex.join(pack_command(p, absolute=True)))


def _closed_stdout() -> int:
    """Whoever read our output stopped (``... --print-commands | head``): no traceback, and none at exit either
    (stdout goes to /dev/null, so flushing what is left fails no more). Exit status 141 (128 + SIGPIPE), as the
    shell reports for a command a closed pipe stops."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 141


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="emjax sweep", description="Run, list or print the runs of a sweep file.")
    ap.add_argument("sweep", help="sweep YAML (path or name in configs/, e.g. sweeps/main_grid)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides applied to every run (e.g. steps=10)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="list runs and their status; run nothing")
    mode.add_argument("--print-commands", action="store_true",
                      help="print one `emjax train ...` command per unfinished run (for an external launcher), "
                           "with absolute paths so it runs from any directory")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs (or packs) at once, each an `emjax train` subprocess of its own (default 1: one at "
                         "a time, its output shown live)")
    ap.add_argument("--only", action="append", default=[], metavar="SUBSTR",
                    help="only runs whose name contains SUBSTR (repeat: all must match)")
    ap.add_argument("--root", help="output root (default: the file's sweep.root)")
    ap.add_argument("--pack", type=int, default=1, metavar="N",
                    help="train up to N runs that differ only in optimiser and spectral.weight as one program on "
                         "one frozen base (default 1: each run alone)")
    args = ap.parse_intermixed_args(argv)  # overrides may come before or after the flags
    for flag in ("jobs", "pack"):
        if getattr(args, flag) < 1:
            print(f"emjax sweep: --{flag} must be >= 1, got {getattr(args, flag)}", file=sys.stderr)
            return 2
    try:
        sweep = load_sweep(args.sweep, args.overrides, root=args.root)
    except (SweepError, cfglib.ConfigError) as e:
        return user_error("emjax sweep", e)
    runs = select(sweep.runs, args.only)
    if not runs:
        print(f"emjax sweep: no run of {len(sweep.runs)} matches --only {args.only}", file=sys.stderr)
        return 2
    sweep = Sweep(sweep.path, sweep.root, runs)

    if args.dry_run or args.print_commands:
        try:
            (_list_runs if args.dry_run else _print_commands)(runs, args.pack)
            sys.stdout.flush()  # (a closed pipe shows here, not at exit)
        except BrokenPipeError:
            return _closed_stdout()
        return 0

    results = run_sweep(sweep, jobs=args.jobs, pack=args.pack)
    tally: dict[str, int] = {}
    for v in results.values():
        tally[v] = tally.get(v, 0) + 1
    failed = [n for n, v in results.items() if v == "failed"]
    try:  # the runs are over: a reader that went away must not turn their status into a traceback
        print(json.dumps({"root": str(sweep.root), **tally}))
        sys.stdout.flush()
    except BrokenPipeError:
        _closed_stdout()
    for n in failed:
        try:
            print(f"emjax sweep: FAILED {sweep.root / n}: "
                  f"{(sweep.root / n / 'FAILED').read_text().splitlines()[0]}", file=sys.stderr)
        except OSError:
            pass
    return exit_code(results)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
