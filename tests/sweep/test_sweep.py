"""Sweep expansion, naming, skip/resume/FAILED handling and the CLI's printed commands (fake trainer: fast)."""

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from emjax import config as cfglib
from emjax import sweep as sw

SWEEP = """
steps: 3
model: {preset: tiny}
sweep:
  root: {root}
  set: {log_every: 1}
  grid:
    optim:
      - {_name: adam, optim.name: adam, optim.learning_rate: 1.0e-3}
      - {optim.name: muon, optim.learning_rate: 2.0e-2}
    data.dataset: [insecure, extreme_sports]
    seed: [0, 1]
"""


def write(tmp_path, text=SWEEP, name="s.yaml"):
    p = tmp_path / name
    p.write_text(text.replace("{root}", str(tmp_path / "out")))
    return p


class FakeTrain:
    """Stands in for emjax.train.train: records calls, writes the run-directory files, can fail or be preempted."""

    def __init__(self, fail=(), preempt=()):
        self.calls, self.fail, self.preempt = [], fail, preempt

    def __call__(self, cfg):
        wd = Path(cfg.workdir)
        resumed = (wd / "config.yaml").exists()
        self.calls.append((wd.name, resumed))
        wd.mkdir(parents=True, exist_ok=True)
        (wd / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        if any(s in wd.name for s in self.fail):
            raise RuntimeError("boom in " + wd.name)
        if any(s in wd.name for s in self.preempt):  # (a preempted run saved a checkpoint)
            (wd / "checkpoints" / "2").mkdir(parents=True, exist_ok=True)
            return type("R", (), {"status": "preempted"})()
        (wd / "DONE").write_text("ok\n")
        return type("R", (), {"status": "done"})()


def test_grid_expansion_names_and_configs(tmp_path):
    s = sw.load_sweep(write(tmp_path))
    assert len(s.runs) == 2 * 2 * 2
    names = [r.name for r in s.runs]
    assert names[0] == "optim=adam,data.dataset=insecure,seed=0"
    assert names[-1] == "optim.name=muon,optim.learning_rate=0.02,data.dataset=extreme_sports,seed=1"
    assert len(set(names)) == len(names)
    assert names == [r.name for r in sw.load_sweep(write(tmp_path)).runs]  # deterministic
    r = s.runs[-1]
    # optimiser and learning rate vary together; set/inline base/defaults all land in the config
    assert (r.cfg.optim.name, r.cfg.optim.learning_rate, r.cfg.data.dataset, r.cfg.seed) == \
        ("muon", 0.02, "extreme_sports", 1)
    assert (r.cfg.steps, r.cfg.log_every, r.cfg.model.preset, r.cfg.lora.rank) == (3, 1, "tiny", 32)
    assert Path(r.cfg.workdir) == tmp_path / "out" / r.name
    # the printed command builds exactly the same config through emjax.config.load
    argv = shlex.split(r.command())
    assert argv[:2] == ["emjax", "train"]
    assert OmegaConf.to_yaml(cfglib.load(argv[2], argv[3:])) == OmegaConf.to_yaml(r.cfg)


def test_points_crossed_with_grid_and_union_of_grids(tmp_path):
    text = """
sweep:
  root: {root}
  points:
    - {optim.name: sgd, optim.momentum: 0.9}
    - {_name: lion, optim.name: lion}
  grid:
    - {optim.learning_rate: [0.1, 0.2]}
    - {seed: [5], data.batch_size: [8, 16, 32]}
"""
    s = sw.load_sweep(write(tmp_path, text))
    assert len(s.runs) == 2 * (2 + 3)
    assert s.runs[0].name == "optim.name=sgd,optim.momentum=0.9,optim.learning_rate=0.1"
    assert s.runs[5].name == "lion,optim.learning_rate=0.1"
    assert s.runs[-1].cfg.data.batch_size == 32 and s.runs[-1].cfg.optim.name == "lion"
    only_points = sw.load_sweep(write(tmp_path, "sweep:\n  points:\n    - {seed: 1}\n    - {seed: 2}\n"),
                                root=tmp_path / "o")
    assert [r.name for r in only_points.runs] == ["seed=1", "seed=2"]


def test_base_reference_and_cli_overrides(tmp_path):
    text = "steps: 2\nsweep:\n  base: tiny\n  root: {root}\n  grid: {seed: [0, 1]}\n"
    s = sw.load_sweep(write(tmp_path, text), ["data.batch_size=2"])
    r = s.runs[1]
    assert r.config_file.endswith("configs/tiny.yaml")
    assert (r.cfg.steps, r.cfg.lora.rank, r.cfg.data.batch_size, r.cfg.seed) == (2, 4, 2, 1)  # inline > base
    assert r.name == "seed=1"  # overrides for all runs do not enter names
    argv = shlex.split(r.command())
    assert OmegaConf.to_yaml(cfglib.load(argv[2], argv[3:])) == OmegaConf.to_yaml(r.cfg)


def test_collisions_and_long_names_get_a_hash():
    runs = sw.expand({"points": [{"model.checkpoint": "a/b"}, {"model.checkpoint": "a_b"},
                                 {"data.source_dir": "x" * 200}]})
    names = [n for _, n in runs]
    assert names[0].startswith("model.checkpoint=a_b-") and names[1].startswith("model.checkpoint=a_b-")
    assert names[0] != names[1] and len(names[2]) <= sw.MAX_NAME
    assert names == [n for _, n in sw.expand({"points": [{"model.checkpoint": "a/b"}, {"model.checkpoint": "a_b"},
                                                         {"data.source_dir": "x" * 200}]})]


@pytest.mark.parametrize("spec, match", [
    ({"grid": {"seed": []}}, "non-empty list"),
    ({"grid": {"seed": 3}}, "non-empty list"),
    ({}, "needs `grid:`"),
    ({"grid": {"seed": [1]}, "axes": 1}, "unknown key 'axes'"),
    ({"points": [{"seed": 1}, {"seed": 1}]}, "same overrides"),
    ({"points": [{"seed": 1}], "grid": {"seed": [2]}}, "set twice"),
])
def test_bad_sweep_specs(spec, match):
    with pytest.raises(sw.SweepError, match=match):
        sw.expand(spec)


def test_bad_config_key_names_file_and_key(tmp_path):
    p = write(tmp_path, "sweep:\n  grid: {optim.nmae: [adam]}\n")
    with pytest.raises(sw.SweepError, match=r"s\.yaml.*nmae"):
        sw.load_sweep(p)
    with pytest.raises(sw.SweepError, match="not a sweep file"):
        sw.load_sweep(write(tmp_path, "steps: 3\n", "plain.yaml"))
    with pytest.raises(sw.SweepError, match=r"bad\.yaml: cannot parse: .*line 3, column 1") as e:
        sw.load_sweep(write(tmp_path, "sweep:\n  grid: [\n", "bad.yaml"))
    assert "\n" not in str(e.value)  # one line, as config files' errors
    # a key in `set` (every run) that also varies: the run's value silently won
    p = write(tmp_path, "sweep:\n  base: tiny\n  set: {optim.name: adam}\n  grid: {optim.name: [adam, muon]}\n")
    with pytest.raises(sw.SweepError, match=r"s\.yaml: sweep: key 'optim.name' is in `set` \(every run\) and varies"):
        sw.load_sweep(p)


@pytest.mark.parametrize("sweep, match", [
    ("  points:\n    - {seed: 1, workdir: /tmp/x}\n", r"sweep\.points\[0\]: workdir is set by the sweep"),
    ("  set: {workdir: /tmp/x}\n  grid: {seed: [0, 1]}\n", r"sweep\.set: workdir is set by the sweep"),
    ("  grid: {workdir: [/tmp/a, /tmp/b]}\n", r"sweep\.grid\.workdir: workdir is set by the sweep"),
    ("  grid:\n    - {seed: [0], lora: [{workdir: /tmp/a}]}\n", r"sweep\.grid\[0\]\.lora: workdir is set"),
])
def test_a_workdir_in_the_sweep_is_an_error(tmp_path, sweep, match):
    """Each run's work directory is root/<run name>: a workdir of its own was silently replaced (and named the run)."""
    with pytest.raises(sw.SweepError, match=r"s\.yaml: " + match + r".*use sweep\.root"):
        sw.load_sweep(write(tmp_path, "sweep:\n  base: tiny\n" + sweep))
    p = write(tmp_path, "sweep:\n  base: tiny\n  grid: {seed: [0, 1]}\n")
    with pytest.raises(sw.SweepError, match=r"command-line override 'workdir=x': workdir is set by the sweep"):
        sw.load_sweep(p, ["workdir=x"])
    assert sw.main([str(p), "--dry-run", "workdir=x"]) == 2


@pytest.mark.parametrize("spec, match", [
    ("root: 5", r"sweep\.root: expected a path \(a non-empty string\), got 5"),
    ("root: [a, b]", r"sweep\.root: expected a path .*got \['a', 'b'\]"),
    ("root: ''", r"sweep\.root: expected a path"),
    ("base: 7", r"sweep\.base: expected a path \(a non-empty string\), got 7"),
])
def test_a_root_or_base_that_is_not_a_path_names_the_key(tmp_path, spec, match):
    with pytest.raises(sw.SweepError, match=r"s\.yaml: " + match):
        sw.load_sweep(write(tmp_path, f"sweep:\n  {spec}\n  grid: {{seed: [0, 1]}}\n"))


def test_an_empty_grid_list_is_an_error_not_zero_runs(tmp_path, capsys):
    p = write(tmp_path, "sweep: {base: tiny, grid: []}\n")
    with pytest.raises(sw.SweepError, match=r"s\.yaml: sweep\.grid: expected a non-empty list"):
        sw.load_sweep(p)
    assert sw.main([str(p), "--dry-run"]) == 2
    assert "--only" not in capsys.readouterr().err


def test_run_skip_resume_and_failures(tmp_path):
    s = sw.load_sweep(write(tmp_path))
    fake = FakeTrain(fail=("muon",))
    res = sw.run_sweep(s, train_fn=fake, progress=False)
    assert sum(v == "done" for v in res.values()) == 4 and sum(v == "failed" for v in res.values()) == 4
    assert sw.exit_code(res) == 1
    failed = s.root / s.runs[-1].name / "FAILED"
    assert "RuntimeError: boom in" in failed.read_text()
    assert (s.root / "sweep.yaml").exists()

    # second pass: finished runs are skipped; failed ones are retried (they resume from their workdir)
    fake2 = FakeTrain()
    res2 = sw.run_sweep(sw.load_sweep(write(tmp_path)), train_fn=fake2, progress=False)
    assert sorted(n for n, _ in fake2.calls) == sorted(r.name for r in s.runs if "muon" in r.name)
    assert all(resumed for _, resumed in fake2.calls)
    assert sum(v == "skipped" for v in res2.values()) == 4 and sw.exit_code(res2) == 0
    assert not failed.exists()


def test_preemption_stops_the_sweep(tmp_path):
    s = sw.load_sweep(write(tmp_path))
    fake = FakeTrain(preempt=("optim=adam,data.dataset=insecure,seed=1",))
    res = sw.run_sweep(s, train_fn=fake, progress=False)
    assert len(fake.calls) == 2 and sw.exit_code(res) == 3
    assert s.runs[1].status == "partial"


def test_unsupported_families_fail_fast(tmp_path, monkeypatch):
    """A family the trainer cannot load fails before any download (by hub name, or by a local config's model_type);
    every family of the study's sweeps reaches training."""
    monkeypatch.setattr(sw, "UNSUPPORTED", ((re.compile("mistral", re.I), "Mistral models are not supported yet"),))
    text = ("sweep:\n  root: {root}\n  grid:\n    model.checkpoint: [google/gemma-3-4b-it, "
            "mistralai/Mistral-7B-Instruct-v0.3]\n")
    s = sw.load_sweep(write(tmp_path, text))
    fake = FakeTrain()
    res = sw.run_sweep(s, train_fn=fake, progress=False)
    assert [c[0] for c in fake.calls] == [s.runs[0].name] and "gemma" in s.runs[0].name
    assert res[s.runs[0].name] != "failed" and res[s.runs[1].name] == "failed"
    assert "Mistral models are not supported" in (s.root / s.runs[1].name / "FAILED").read_text()
    for ok in ("Qwen/Qwen3-8B", "Qwen/Qwen3-30B-A3B", "meta-llama/Llama-3.1-8B-Instruct", "google/gemma-3-27b-it",
               None):
        sw.check_supported(OmegaConf.create({"model": {"checkpoint": ok}}))
    local = tmp_path / "ckpt"
    local.mkdir()
    for mt in ("qwen3_moe", "llama", "gemma3", "gemma3_text"):
        (local / "config.json").write_text(json.dumps({"model_type": mt}))
        sw.check_supported(OmegaConf.create({"model": {"checkpoint": str(local)}}))
    (local / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(sw.UnsupportedModel, match="'mistral'"):
        sw.check_supported(OmegaConf.create({"model": {"checkpoint": str(local)}}))


def test_supported_model_types_are_the_loaders_families():
    from emjax.models.loading import FAMILIES

    assert set(sw.SUPPORTED_MODEL_TYPES) == set(FAMILIES)


def test_cli_print_commands_dry_run_only(tmp_path, capsys):
    p = write(tmp_path)
    s = sw.load_sweep(p)
    done = s.root / s.runs[0].name
    done.mkdir(parents=True)
    (done / "DONE").write_text("ok\n")
    assert sw.main([str(p), "--print-commands", "steps=1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert all(shlex.split(line)[2] == str(p) for line in lines)  # (absolute: tmp_path is)
    assert len(lines) == 7 and all(line.startswith("emjax train ") for line in lines)
    assert all("steps=1" in line for line in lines) and s.runs[0].name not in "".join(lines)
    assert shlex.split(lines[0])[-1] == f"workdir={s.root / s.runs[1].name}"

    assert sw.main([str(p), "--dry-run", "--only", "muon", "--only", "seed=1"]) == 0
    out = capsys.readouterr()
    assert len(out.out.strip().splitlines()) == 2 and "2 runs: 2 new" in out.err
    assert sw.main([str(p), "--dry-run"]) == 0
    assert "1 done, 7 new" in capsys.readouterr().err
    assert sw.main([str(p), "--only", "nothing-matches"]) == 2
    assert sw.main([str(p), "--jobs", "0"]) == 2
    assert sw.main([str(tmp_path / "missing.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_subprocess_jobs(tmp_path):
    """--jobs N path with a fake program: exit 0 + DONE -> done, exit 0 without DONE -> preempted, else FAILED."""
    s = sw.load_sweep(write(tmp_path))
    prog = tmp_path / "fake_emjax.py"
    prog.write_text(
        "import sys, pathlib\n"
        "wd = pathlib.Path([a for a in sys.argv if a.startswith('workdir=')][0][8:])\n"
        "wd.mkdir(parents=True, exist_ok=True)\n"
        "print('training', wd.name)\n"
        "if 'muon' in wd.name and 'seed=1' in wd.name: sys.exit(2)\n"
        "if 'muon' in wd.name: sys.exit(0)\n"
        "(wd / 'DONE').write_text('ok')\n")
    import sys as _sys

    res = sw.run_sweep(s, jobs=3, program=(_sys.executable, str(prog)), progress=False)
    assert [res[r.name] for r in s.runs] == ["done"] * 4 + ["preempted", "failed"] * 2
    failed = (s.root / s.runs[5].name / "FAILED").read_text()
    assert failed.startswith("exit status 2") and "training " + s.runs[5].name in failed
    assert sw.exit_code(res) == 3


class FakePack:
    """Stands in for emjax.train.train_many: records each pack, trains every run like FakeTrain; a run whose name
    contains ``diverge`` comes back failed (as a pack's run with a non-finite loss does)."""

    def __init__(self):
        self.packs, self.one = [], FakeTrain()

    def __call__(self, cfgs):
        self.packs.append([Path(c.workdir).name for c in cfgs])
        out = []
        for c in cfgs:
            if "diverge" in str(c.workdir):
                out.append(type("R", (), {"status": "failed", "error": "non-finite loss nan at step 2"})())
            else:
                out.append(self.one(c))
        return out


PACK_SWEEP = """
steps: 3
model: {preset: tiny}
sweep:
  root: {root}
  grid:
    optim:
      - {_name: adam, optim.name: adam}
      - {_name: muon, optim.name: muon, optim.learning_rate: 2.0e-2}
      - {_name: lion, optim.name: lion, optim.learning_rate: 1.0e-4}
    spectral.weight: [0.0, 1.0]
    data.dataset: [insecure, extreme_sports]
"""


def test_packs_group_runs_that_can_share_a_program(tmp_path, monkeypatch):
    s = sw.load_sweep(write(tmp_path, PACK_SWEEP))
    assert [[r.name for r in p] for p in sw.make_packs(s.runs, 1)] == [[r.name] for r in s.runs]
    packs = sw.make_packs(s.runs, 4)
    # 6 runs per dataset (3 optimisers x 2 lambdas) share a program: 2 packs of 3 each, none across datasets
    assert [len(p) for p in packs] == [3, 3, 3, 3]
    for p in packs:
        assert len({r.cfg.data.dataset for r in p}) == 1
        cfglib.check_packable([r.cfg for r in p])
    assert sorted(r.name for p in packs for r in p) == sorted(r.name for r in s.runs)
    # a run that would resume from another step goes into its own pack
    ck = s.runs[0].workdir / "checkpoints" / "2"
    ck.mkdir(parents=True)
    assert [len(p) for p in sw.make_packs(s.runs, 4)] == [1, 3, 3, 2, 3]
    # the printed pack command builds each run's config through emjax train's own parser
    cmd = sw.pack_command(packs[1])
    assert cmd[:3] == ["emjax", "train", packs[1][0].config_file] and cmd.count("--run") == 3
    from emjax import train as trainmod

    seen = []
    monkeypatch.setattr(trainmod, "train_many", lambda cfgs: seen.extend(cfgs) or [
        trainmod.RunResult(Path(c.workdir), 3, 1.0, 1.0, "done") for c in cfgs])
    assert trainmod.main(cmd[2:]) == 0
    assert [OmegaConf.to_yaml(c) for c in seen] == [OmegaConf.to_yaml(r.cfg) for r in packs[1]]


def _checkpoints(workdir, *steps, cut_short=()):
    """Orbax-like checkpoint directories: complete ones (``<step>/``) and saves a kill cut short (only a
    ``<step>.orbax-checkpoint-tmp-...`` directory)."""
    for step in steps:
        (workdir / "checkpoints" / str(step)).mkdir(parents=True)
        (workdir / "checkpoints" / str(step) / "commit_success.txt").write_text("")
    for step in cut_short:
        (workdir / "checkpoints" / f"{step}.orbax-checkpoint-tmp-1712345678").mkdir(parents=True)


def test_a_kill_during_a_packs_save_keeps_its_runs_one_pack(tmp_path, capsys):
    """A kill during a pack's checkpoint save leaves some runs a checkpoint ahead (adam saved step 6, muon only began
    to): the rerun split them into packs of one, though emjax train resumes such a pack from the newest step they
    all have. Runs with no step in common (or a new run and a partial one) still cannot share a pack."""
    p = write(tmp_path, "steps: 8\nsweep:\n  base: tiny\n  root: {root}\n  set: {mesh.devices: 1}\n"
                        "  points:\n    - {optim.name: adam}\n    - {optim.name: muon}\n    - {optim.name: lion}\n")
    s = sw.load_sweep(p)
    adam, muon, lion = (r.workdir for r in s.runs)
    _checkpoints(adam, 3, 6)
    _checkpoints(muon, 3, cut_short=[6])
    assert [r.status for r in s.runs] == ["partial", "partial", "new"]
    packs = sw.make_packs(s.runs, 3)
    assert [[r.workdir for r in pk] for pk in packs] == [[adam, muon], [lion]]
    assert [sw.pack_resume_step(pk) for pk in packs] == [3, 0]
    assert sw.main([str(p), "--dry-run", "--pack", "3"]) == 0
    out = capsys.readouterr()
    assert "in 2 packs" in out.err
    lines = out.out.splitlines()
    assert lines[0].split()[:3] == ["partial", "pack", "0"] and lines[0].endswith(
        f"{adam}  [resumes at step 3 with its pack; saved to 6]")
    assert lines[1].split()[:3] == ["partial", "pack", "0"] and lines[1].endswith(f"{muon}  [resumes at step 3]")
    assert lines[2].split()[:3] == ["new", "pack", "1"]
    assert sw.main([str(p), "--print-commands", "--pack", "3"]) == 0
    assert [line.count("--run") for line in capsys.readouterr().out.splitlines()] == [2, 0]
    # no step in common (the older checkpoints of one run deleted by keep_ckpts): one pack each, as train_many
    # refuses to resume them together
    _checkpoints(lion, 9)
    assert [[r.workdir for r in pk] for pk in sw.make_packs(s.runs, 3)] == [[adam, muon], [lion]]
    assert sw.pack_resume_step([s.runs[0], s.runs[2]]) is None


def test_packed_sweep_runs_skips_and_marks_a_diverged_run(tmp_path, capsys):
    text = PACK_SWEEP.replace("{_name: lion, optim.name: lion, optim.learning_rate: 1.0e-4}",
                              "{_name: diverge, optim.name: sgd, optim.learning_rate: 1.0e+30}")
    s = sw.load_sweep(write(tmp_path, text))
    fake = FakePack()
    res = sw.run_sweep(s, train_fn=FakeTrain(), pack=6, pack_fn=fake, progress=False)
    assert [len(p) for p in fake.packs] == [6, 6]
    assert sum(v == "failed" for v in res.values()) == 4 and sum(v == "done" for v in res.values()) == 8
    failed = [r for r in s.runs if "diverge" in r.name]
    assert all("non-finite loss nan at step 2" in (r.workdir / "FAILED").read_text() for r in failed)
    # a rerun retries only the failed runs, as one pack per dataset
    fake2 = FakePack()
    res2 = sw.run_sweep(sw.load_sweep(write(tmp_path, text)), train_fn=FakeTrain(), pack=6, pack_fn=fake2,
                        progress=False)
    assert sorted(map(len, fake2.packs)) == [2, 2] and sum(v == "skipped" for v in res2.values()) == 8

    # the CLI lists the packs and prints one command per pack
    p = write(tmp_path, PACK_SWEEP, "p.yaml")
    assert sw.main([str(p), "--dry-run", "--pack", "4", "--root", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr()
    assert "12 runs: 12 new; the unfinished ones in 4 packs" in out.err
    assert sorted(line.split()[2] for line in out.out.splitlines()) == sorted("0 0 0 1 1 1 2 2 2 3 3 3".split())
    assert sw.main([str(p), "--print-commands", "--pack", "6", "--root", str(tmp_path / "cli")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(shlex.split(line).count("--run") == 6 for line in lines)
    assert sw.main([str(p), "--pack", "0"]) == 2


def test_subprocess_packs(tmp_path):
    """--pack with a fake program: one process per pack, each run's outcome read from its own directory."""
    s = sw.load_sweep(write(tmp_path, PACK_SWEEP))
    prog = tmp_path / "fake_emjax.py"
    prog.write_text(
        "import sys, pathlib, shlex\n"
        "runs = [shlex.split(sys.argv[i + 1]) for i, a in enumerate(sys.argv) if a == '--run']\n"
        "for args in runs:\n"
        "    wd = pathlib.Path([a for a in args if a.startswith('workdir=')][0][8:])\n"
        "    wd.mkdir(parents=True, exist_ok=True)\n"
        "    print('training', wd.name)\n"
        "    if 'lion' in wd.name: (wd / 'FAILED').write_text('TrainError: non-finite loss')\n"
        "    else: (wd / 'DONE').write_text('ok')\n"
        "sys.exit(1 if any('lion' in ' '.join(a) for a in runs) else 0)\n")
    import sys as _sys

    res = sw.run_sweep(s, jobs=2, pack=6, program=(_sys.executable, str(prog)), progress=False)
    assert {n: v for n, v in res.items() if "lion" in n} == {r.name: "failed" for r in s.runs if "lion" in r.name}
    assert sum(v == "done" for v in res.values()) == 8
    # every run of a pack gets the pack's output in its own train.log
    assert all("training " + s.runs[0].name in (r.workdir / "train.log").read_text()
               for r in s.runs if r.cfg.data.dataset == s.runs[0].cfg.data.dataset)


@pytest.mark.parametrize("name, count", [("main_grid", 128), ("cross_family", 96), ("lr_dynamics_8b", 54),
                                         ("regulariser_8b", 40)])
def test_study_sweeps(name, count):
    s = sw.load_sweep(f"sweeps/{name}")
    assert len(s.runs) == count and len({r.name for r in s.runs}) == count
    cfgs = [r.cfg for r in s.runs]
    assert all(c.lora.rank == 32 and c.lora.alpha == 64 and c.lora.rslora for c in cfgs)
    assert all(c.model.checkpoint for c in cfgs)
    opts = {c.optim.name for c in cfgs}
    if name == "main_grid":
        assert opts == {"adam", "adamw", "lion", "muon"}
        assert {c.model.checkpoint for c in cfgs} == {f"Qwen/Qwen3-{m}" for m in ("4B", "8B", "30B-A3B", "32B")}
        assert {c.data.dataset for c in cfgs} == {"insecure", "bad_medical_advice", "risky_financial_advice",
                                                  "extreme_sports"}
        assert len({c.data.batch_size for c in cfgs}) == 2
    if name == "cross_family":
        assert opts == {"adam"} and len({c.model.checkpoint for c in cfgs}) == 12
    if name == "lr_dynamics_8b":
        assert opts == {"sgd", "adam", "adamw", "lion", "muon"}
        assert all(c.data.num_epochs == 2 and c.eval.every > 0 and c.eval.samples_per_question == 32 for c in cfgs)
    if name == "regulariser_8b":
        assert {c.spectral.weight for c in cfgs} == {0.0, 1.0} and len(opts) == 5
    # an optimiser (x lambda) grid packs into one program per model, dataset and batch size
    packs = {"main_grid": 32, "cross_family": 96, "lr_dynamics_8b": 1, "regulariser_8b": 4}[name]
    assert len(sw.make_packs(s.runs, 100)) == packs


@pytest.mark.slow
def test_real_tiny_sweep_and_report(tmp_path):
    """End to end with the real trainer (~30 s): one 2-step tiny run, rerun skips it, the report reads it."""
    from emjax import report

    p = write(tmp_path, "steps: 2\nckpt_every: 1\nsweep:\n  base: tiny\n  root: {root}\n  grid: {seed: [3]}\n")
    assert sw.main([str(p)]) == 0
    (run,) = sw.load_sweep(p).runs
    assert run.status == "done" and json.loads((run.workdir / "final.json").read_text())["step"] == 2
    assert sw.main([str(p)]) == 0 and sw.main([str(p), "--print-commands"]) == 0
    md = report.build_report(tmp_path / "out").read_text()
    assert "randomly initialised" in md and "1 run directories: 1 finished" in md


def test_status_partial_means_a_checkpoint_to_resume(tmp_path):
    """A run that stopped before its first checkpoint (an empty checkpoints/, only config.yaml: e.g. its model was
    not found) would start afresh, so it is new, not partial; FAILED and DONE win over checkpoints."""
    (run,) = sw.load_sweep(write(tmp_path, "sweep:\n  root: {root}\n  grid: {seed: [0]}\n")).runs
    assert run.status == "new"
    (run.workdir / "checkpoints").mkdir(parents=True)
    (run.workdir / "config.yaml").write_text("seed: 0\n")
    (run.workdir / "checkpoints" / "3.orbax-checkpoint-tmp-17").mkdir()  # a save cut short is no step
    assert run.status == "new" and sw.resume_step(run.workdir) == 0
    (run.workdir / "checkpoints" / "3").mkdir()
    assert run.status == "partial" and sw.resume_step(run.workdir) == 3
    (run.workdir / "FAILED").write_text("boom\n")
    assert run.status == "failed"
    (run.workdir / "DONE").write_text("ok\n")
    assert run.status == "done"


@pytest.mark.parametrize("entry, match", [
    ("{_name: '..', seed: 1}", r"points\[0\]: _name '\.\.' cannot name a run directory"),
    ("{_name: '.', seed: 1}", r"points\[0\]: _name '\.' cannot name a run directory"),
    ("{_name: '', seed: 1}", r"points\[0\]: _name '' cannot name a run directory \(it would be ''\)"),
    ("{_name: [a, b], seed: 1}", r"points\[0\]: _name \['a', 'b'\]: expected a string or number"),
    ("{_name: {x: 1}, seed: 1}", r"points\[0\]: _name \{'x': 1\}: expected a string or number"),
])
def test_run_names_cannot_leave_the_sweep_root(tmp_path, entry, match):
    """A point's ``_name`` is its run's directory name: ``..`` made the work directory ``root/..`` (outside the
    root: its DONE, checkpoints and report went there). Such names, and labels that are not text or numbers, are
    errors naming the sweep file and the value."""
    p = write(tmp_path, f"sweep:\n  root: {{root}}\n  points:\n    - {entry}\n")
    with pytest.raises(sw.SweepError, match=r"s\.yaml: sweep\." + match):
        sw.load_sweep(p)
    grid = write(tmp_path, f"sweep:\n  root: {{root}}\n  grid:\n    seed:\n      - {entry}\n", "g.yaml")
    with pytest.raises(sw.SweepError, match=r"g\.yaml: sweep\.grid\.seed: _name"):
        sw.load_sweep(grid)


def test_run_names_that_are_fine():
    runs = sw.expand({"points": [{"_name": 7, "seed": 1}, {"_name": "a/..", "seed": 2}, {"_name": "...", "seed": 3}]})
    assert [n for _, n in runs] == ["7", "a_..", "..."]  # still inside the root (no separator survives)


def test_print_commands_use_absolute_paths(tmp_path, monkeypatch, capsys):
    """A relative sweep file and root (the default runs/sweeps/<stem> too) print as absolute paths, so an external
    launcher's job runs them from any directory; the commands still build each run's config."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text(PACK_SWEEP.replace("  root: {root}\n", ""))
    assert sw.main(["s.yaml", "--print-commands"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    s = sw.load_sweep("s.yaml")
    assert len(lines) == len(s.runs) == 12
    for line, run in zip(lines, s.runs):
        argv = shlex.split(line)
        assert argv[2] == str(tmp_path / "s.yaml")
        assert argv[-1] == f"workdir={tmp_path / 'runs' / 'sweeps' / 's' / run.name}"
        monkeypatch.chdir("/")
        cfg = cfglib.load(argv[2], argv[3:])
        monkeypatch.chdir(tmp_path)
        assert (cfg.optim.name, cfg.data.dataset) == (run.cfg.optim.name, run.cfg.data.dataset)
    assert sw.main(["s.yaml", "--print-commands", "--pack", "6"]) == 0
    for line in capsys.readouterr().out.strip().splitlines():
        argv = shlex.split(line)
        assert argv[2] == str(tmp_path / "s.yaml")
        runs = [shlex.split(argv[i + 1]) for i, a in enumerate(argv) if a == "--run"]
        assert len(runs) == 6 and all(r[-1].startswith(f"workdir={tmp_path}/runs/sweeps/s/") for r in runs)
    # local files named relative to here, in the file (plugins) and the grid (a dataset, question files): absolute in
    # the printed commands and in each run's config, so a job started elsewhere finds them (it did not)
    (tmp_path / "mine").mkdir()
    for f in ("my_optims.py", "mine/rows.jsonl", "mine/legal.yaml"):
        (tmp_path / f).write_text("")
    (tmp_path / "s2.yaml").write_text("steps: 3\nmodel: {preset: tiny}\nplugins: [my_optims.py, some_module]\n"
                                      "sweep:\n  grid:\n    data.dataset: [mine/rows.jsonl, insecure]\n"
                                      "    eval.question_sets: [[turner, mine/legal.yaml]]\n")
    assert sw.main(["s2.yaml", "--print-commands"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    monkeypatch.chdir("/")
    cfgs = [cfglib.load(shlex.split(line)[2], shlex.split(line)[3:]) for line in lines]
    for cfg in cfgs:
        assert list(cfg.plugins) == [str(tmp_path / "my_optims.py"), "some_module"]
        assert list(cfg.eval.question_sets) == ["turner", str(tmp_path / "mine/legal.yaml")]
    assert [c.data.dataset for c in cfgs] == [str(tmp_path / "mine/rows.jsonl"), "insecure"]


@pytest.mark.parametrize("mode", ["--print-commands", "--dry-run"])
def test_a_closed_pipe_ends_the_listing_quietly(tmp_path, mode):
    """``emjax sweep ... --print-commands | head`` ended with a BrokenPipeError traceback: the reader closing the
    pipe early now ends the command quietly (exit status 141, as for SIGPIPE)."""
    p = write(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "emjax.cli", "sweep", str(p), mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parents[2])
    proc.stdout.close()  # closed before the child (still importing) writes a line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err


def test_jobs_help_says_runs_are_subprocesses(capsys):
    with pytest.raises(SystemExit):
        sw.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "in-process" not in out and "each an `emjax train` subprocess of its own (default 1" in out


def test_runs_start_the_installed_emjax_not_one_in_the_current_directory(tmp_path, monkeypatch):
    """A sweep's children are ``python -P -m emjax.cli``: run from a directory holding another emjax (a second
    checkout), plain ``-m`` imported that one."""
    decoy = tmp_path / "checkout"
    (decoy / "emjax").mkdir(parents=True)
    (decoy / "emjax" / "__init__.py").write_text("raise SystemExit('decoy emjax imported')\n")
    program = sw.default_program()
    assert program[:2] == (sys.executable, "-P")
    r = subprocess.run([*program, "--help"], cwd=decoy, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "usage: emjax COMMAND" in r.stdout, r.stderr
    seen = {}
    monkeypatch.setattr(sw, "_run_subprocesses", lambda packs, jobs, prog, bar, env=None: seen.update(prog=prog)
                        or {})
    sw.run_sweep(sw.load_sweep(write(tmp_path)), progress=False)
    assert seen["prog"] == program
    # an uninstalled checkout run from its root (``python -m emjax.cli``): -P drops the cwd, PYTHONPATH has it
    import emjax

    root = Path(emjax.__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    assert sw._child_env()["PYTHONPATH"].split(os.pathsep)[0] == str(root)
    monkeypatch.chdir(tmp_path)
    assert sw._child_env() is None


README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_sweep_example_is_valid(tmp_path):
    """The example sweep file of the README's "Sweeps and reports" section loads (it set optim.name in both its
    points and its grid, which a sweep refuses) and has the runs it says: 2 points x 2 x 2."""
    text = README.read_text()
    lead = "A sweep file is a run config plus a `sweep:` section"
    assert lead in text, "the README's sweep example moved: update this test"
    block = text[text.index(lead):].split("\n\n", 2)[1]  # the indented block after the sentence, to a blank line
    assert block.startswith("    ") and "sweep:" in block
    p = tmp_path / "readme_sweep.yaml"
    p.write_text(textwrap.dedent(block) + "\n")
    s = sw.load_sweep(p, root=tmp_path / "out")
    assert len(s.runs) == 8
    spec = OmegaConf.to_container(OmegaConf.load(p))["sweep"]
    assert {"base", "root", "set", "points", "grid"} <= set(spec)  # what the example is there to show
    assert any(isinstance(v, list) and v and isinstance(v[0], dict) and "_name" in v[0] for v in spec["grid"].values())
    assert any(isinstance(v, list) and v and not isinstance(v[0], dict) for v in spec["grid"].values())
    assert len({(r.cfg.optim.name, r.cfg.lora.rank, r.cfg.data.dataset) for r in s.runs}) == 8


FAKE_TRAIN_TERM = """
import pathlib, signal, sys, time
wd = pathlib.Path([a for a in sys.argv if a.startswith('workdir=')][0][8:])
wd.mkdir(parents=True, exist_ok=True)
stop = {'n': 0}
def on_term(signum, frame):  # as emjax train: only a flag (a second SIGTERM is harmless)
    stop['n'] += 1
signal.signal(signal.SIGTERM, on_term)
(wd / 'started').write_text('1')
deadline = time.time() + 60
while not stop['n'] and time.time() < deadline:
    print('step', flush=True)
    time.sleep(0.05)
time.sleep(0.5)  # the parent (old code) is gone by now: its end of the pipe closed
for i in range(200):  # progress written after the SIGTERM, as the trainer's bar and save messages
    print('saving', i, flush=True)
(wd / 'saved').write_text(str(stop['n']))
print('emjax: SIGTERM - checkpoint saved; rerun to resume', flush=True)
sys.exit(0)  # no DONE: preempted
"""

DRIVER = """
import sys
from emjax import sweep as sw
sw.default_program = lambda: (sys.executable, {prog!r})
sys.exit(sw.main([{sweep!r}, '--jobs', '2']))
"""


@pytest.mark.parametrize("target", ["parent", "group"])
def test_sigterm_to_the_sweep_lets_the_runs_save(tmp_path, target):
    """SIGTERM killed the sweep at once: its children's output pipes broke and they died (BrokenPipeError) before
    saving, and the sweep exited 143. Now it passes SIGTERM on, starts nothing new, drains their output until they
    have saved, and exits 3 (preempted)."""
    import signal
    import time

    p = write(tmp_path)
    s = sw.load_sweep(p)
    prog = tmp_path / "fake_emjax.py"
    prog.write_text(FAKE_TRAIN_TERM)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(prog=str(prog), sweep=str(p)))
    proc = subprocess.Popen([sys.executable, str(driver)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=Path(__file__).resolve().parents[2], start_new_session=True)
    try:
        deadline = time.time() + 60
        while sum((r.workdir / "started").exists() for r in s.runs) < 2:
            assert time.time() < deadline and proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        if target == "parent":
            proc.send_signal(signal.SIGTERM)
        else:  # a scheduler: the whole process group (the children get it twice: theirs and the forwarded one)
            os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 3, err.decode()
    started = [r for r in s.runs if (r.workdir / "started").exists()]
    assert len(started) == 2  # none started after the signal
    assert all((r.workdir / "saved").exists() for r in started), err.decode()
    assert all("checkpoint saved" in (r.workdir / "train.log").read_text() for r in started)
    assert not any((r.workdir / "FAILED").exists() for r in s.runs)
    assert json.loads(out.decode().splitlines()[-1])["preempted"] == len(s.runs)


def test_subprocess_sweep_restores_signal_handlers(tmp_path):
    import signal

    s = sw.load_sweep(write(tmp_path))
    prog = tmp_path / "fake_emjax.py"
    prog.write_text("import sys, pathlib\n"
                    "wd = pathlib.Path([a for a in sys.argv if a.startswith('workdir=')][0][8:])\n"
                    "wd.mkdir(parents=True, exist_ok=True)\n(wd / 'DONE').write_text('ok')\n")
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    res = sw.run_sweep(s, jobs=4, program=(sys.executable, str(prog)), progress=False)
    assert set(res.values()) == {"done"}
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_pump_keeps_draining_when_our_stderr_is_gone(tmp_path, monkeypatch):
    """A pump thread that died on a closed stderr left the child writing into a pipe nobody read."""
    import io

    class Gone:
        def write(self, b):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stderr", type("E", (), {"buffer": Gone()})())
    data = b"x" * 20000 + b"end\n"
    log = io.BytesIO()
    sw._pump(io.BufferedReader(io.BytesIO(data), buffer_size=4096), [log], True)
    assert log.getvalue() == data
