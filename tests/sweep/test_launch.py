"""launch/ scripts in --dry-run mode: the printed commands, and clear errors for bad arguments.

A fake gcloud/xpk/srun/pip/python3 on PATH records any call, so a dry run that executed something would fail.
"""

import os
import shlex
import subprocess
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[2] / "launch"
TOOLS = ("gcloud", "xpk", "srun", "sbatch", "scontrol", "python3", "pip")


@pytest.fixture
def env(tmp_path):
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    calls = tmp_path / "calls"
    for t in TOOLS:
        (bin_ / t).write_text(f"#!/bin/sh\necho {t} \"$@\" >> {calls}\nexit 1\n")
        (bin_ / t).chmod(0o755)
    e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    e["PATH"] = f"{bin_}:/usr/bin:/bin"
    return e, calls


def sh(script, *args, env):
    r = subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True, env=env[0], timeout=30)
    assert not env[1].exists(), f"dry run executed: {env[1].read_text()}"
    return r


def plus_lines(out):
    return [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]


def test_gpu_local_dry_run(env, tmp_path):
    r = sh("gpu_local.sh", "--dry-run", "--venv", str(tmp_path / "v"), "--", "sweep", "sweeps/main_grid",
           "--only", "optim=muon", env=env)
    assert r.returncode == 0, r.stderr
    cmds = plus_lines(r.stdout)
    assert cmds[0] == ["python3", "-m", "venv", str(tmp_path / "v")]
    assert cmds[2][:3] == [str(tmp_path / "v/bin/pip"), "install", "-e"] and "jax[cuda12]" in cmds[2]
    assert cmds[-1] == [str(tmp_path / "v/bin/emjax"), "sweep", "sweeps/main_grid", "--only", "optim=muon"]
    r = sh("gpu_local.sh", "--dry-run", "--no-install", "--", "train", "tiny", "steps=2", env=env)
    assert plus_lines(r.stdout)[-1][1:] == ["train", "tiny", "steps=2"] and len(plus_lines(r.stdout)) == 1


def test_tpu_pod_dry_run(env):
    r = sh("tpu_pod.sh", "--dry-run", "--name", "em-pod", "--zone", "us-east5-a", "--type", "v5p-32", "--spot",
           "--project", "proj", "--repo", "https://example.com/emjax.git", "--ref", "abc123", "--",
           "train", "tiny", "workdir=gs://b/run 1", env=env)
    assert r.returncode == 0, r.stderr
    create, install, run = plus_lines(r.stdout)
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "em-pod"]
    assert {"--zone=us-east5-a", "--project=proj", "--accelerator-type=v5p-32", "--version=v2-alpha-tpuv5",
            "--spot"} <= set(create)
    for c in (install, run):
        assert c[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "em-pod"] and "--worker=all" in c
    inst = [a for a in install if a.startswith("--command=")][0]
    assert "git clone https://example.com/emjax.git" in inst and "checkout --quiet abc123" in inst
    assert "jax[tpu]" in inst
    cmd = [a for a in run if a.startswith("--command=")][0][len("--command="):]
    assert shlex.split(cmd.split("&&", 1)[1]) == ["~/emjax-venv/bin/emjax", "train", "tiny",
                                                  "workdir=gs://b/run 1"]
    assert "does not exist yet" in r.stdout  # the reuse check is explained, not run


def test_xpk_dry_run(env):
    r = sh("xpk_example.sh", "--dry-run", "--cluster", "em", "--workload", "em-reg-1", "--tpu-type", "v6e-8",
           "--num-slices", "2", "--zone", "us-east5-b", "--", "sweep", "sweeps/regulariser_8b", env=env)
    assert r.returncode == 0, r.stderr
    (cmd,) = plus_lines(r.stdout)
    assert cmd[:3] == ["xpk", "workload", "create"]
    assert {"--cluster=em", "--workload=em-reg-1", "--tpu-type=v6e-8", "--num-slices=2", "--zone=us-east5-b",
            "--max-restarts=3"} <= set(cmd)
    inner = [a for a in cmd if a.startswith("--command=")][0][len("--command="):]
    assert inner.endswith("emjax sweep sweeps/regulariser_8b") and "jax[tpu]" in inner
    r = sh("xpk_example.sh", "--dry-run", "--cluster", "em", "--workload", "w", "--tpu-type", "v4-8",
           "--image", "gcr.io/p/emjax:1", "--", "train", "tiny", env=env)
    (cmd,) = plus_lines(r.stdout)
    assert "--docker-image=gcr.io/p/emjax:1" in cmd and "--command=emjax train tiny" in cmd


def test_slurm_dry_run(env):
    e = (dict(env[0], EMJAX_DRY_NODES="3", EMJAX_DRY_HEAD="gpu07", EMJAX_PORT="23456", EMJAX_VENV="/opt/v"), env[1])
    r = sh("slurm_gpu.sbatch", "--dry-run", "train", "tiny", "workdir=/shared/r", env=e)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("+ [task")]
    assert len(lines) == 3
    for i, line in enumerate(lines):
        assert f"EMJAX_COORDINATOR=gpu07:23456 EMJAX_NUM_PROCESSES=3 EMJAX_PROCESS_ID={i} " in line
        assert line.endswith("/opt/v/bin/emjax train tiny workdir=/shared/r")
    e1 = (dict(e[0], EMJAX_DRY_NODES="1"), env[1])
    r = sh("slurm_gpu.sbatch", "--dry-run", "sweep", "sweeps/regulariser_8b", env=e1)
    assert r.stdout.strip() == "+ /opt/v/bin/emjax sweep sweeps/regulariser_8b"


@pytest.mark.parametrize("script, args, message", [
    ("gpu_local.sh", ["--dry-run"], "missing the emjax command"),
    ("gpu_local.sh", ["--dry-run", "--", "fly"], "unknown emjax command 'fly'"),
    ("gpu_local.sh", ["--bogus", "--", "train"], "unknown option '--bogus'"),
    ("gpu_local.sh", ["--venv"], "--venv needs a directory"),
    ("tpu_pod.sh", ["--dry-run", "--zone", "z", "--type", "v4-8", "--", "train"], "--name is required"),
    ("tpu_pod.sh", ["--dry-run", "--name", "p", "--type", "v4-8", "--", "train"], "--zone is required"),
    ("tpu_pod.sh", ["--dry-run", "--name", "p", "--zone", "z", "--type", "a100", "--repo", "r", "--", "train"],
     "--type 'a100'"),
    ("tpu_pod.sh", ["--dry-run", "--name", "Bad_Name", "--zone", "z", "--type", "v4-8", "--", "train"],
     "--name 'Bad_Name'"),
    ("tpu_pod.sh", ["--dry-run", "--name", "p", "--zone", "--type", "v4-8"], "--zone needs a value"),
    ("xpk_example.sh", ["--dry-run", "--workload", "w", "--tpu-type", "v4-8", "--", "train"], "--cluster is required"),
    ("xpk_example.sh", ["--dry-run", "--cluster", "c", "--workload", "w", "--tpu-type", "v4-8", "--num-slices",
                        "0", "--", "train"], "--num-slices '0'"),
    ("xpk_example.sh", ["--dry-run", "--cluster", "c", "--workload", "x" * 41, "--tpu-type", "v4-8", "--",
                        "train"], "at most 40 characters"),
    ("slurm_gpu.sbatch", ["train", "tiny"], "not inside a SLURM job"),
    ("slurm_gpu.sbatch", ["--dry-run", "bogus"], "unknown emjax command 'bogus'"),
])
def test_argument_errors(env, script, args, message):
    r = sh(script, *args, env=env)
    assert r.returncode == 2 and message in r.stderr, (r.returncode, r.stderr)


def header(script):
    """The comment block at the top of a script (after the #! line, up to its first line of code or #SBATCH)."""
    out = []
    for line in (LAUNCH / script).read_text().splitlines()[1:]:
        if not line.startswith("#") or line.startswith("#SBATCH"):
            break
        out.append(line[2:] if line.startswith("# ") else line[1:])
    return out


def test_help_and_executable(env):
    """--help prints the comment header and nothing after it (it printed `set -euo pipefail`, or the #SBATCH
    directives, from line ranges that had drifted)."""
    for script in ("gpu_local.sh", "tpu_pod.sh", "xpk_example.sh", "slurm_gpu.sbatch"):
        assert os.access(LAUNCH / script, os.X_OK)
        r = sh(script, "--help", env=env)
        assert r.returncode == 0 and "--dry-run" in r.stdout, script
        assert r.stdout.splitlines() == header(script) and len(header(script)) > 8, script
        assert "set -euo" not in r.stdout and "SBATCH" not in r.stdout, script


ARGS = ["train", "tiny", "lora.targets=[down]", "workdir=runs/a b", "--run", "optim.name=adam workdir='runs/x y'",
        'name="q"', "*", "$HOME"]


@pytest.fixture
def slurm_job(tmp_path, env):
    """A pretend SLURM job: a fake emjax in a venv that prints its arguments one per line (and its process id),
    a fake scontrol, and a fake srun that runs its command once per task."""
    venv, bin_ = tmp_path / "venv" / "bin", tmp_path / "slurm_bin"
    venv.mkdir(parents=True)
    bin_.mkdir()
    (venv / "emjax").write_text('#!/bin/bash\necho "coordinator ${EMJAX_COORDINATOR:-none}"\n'
                                'for a in "$@"; do printf "task${EMJAX_PROCESS_ID:--}:<%s>\\n" "$a"; done\n')
    (bin_ / "scontrol").write_text("#!/bin/sh\necho gpu01; echo gpu02\n")
    (bin_ / "srun").write_text('#!/bin/bash\nn=${1#--ntasks=}; shift 2\n'
                               'for ((i = 0; i < n; i++)); do SLURM_PROCID=$i "$@" || exit; done\n')
    for f in (venv / "emjax", bin_ / "scontrol", bin_ / "srun"):
        f.chmod(0o755)
    e = dict(env[0], PATH=f"{bin_}:{env[0]['PATH']}", SLURM_JOB_ID="42", SLURM_JOB_NODELIST="gpu[01-02]",
             SLURM_SUBMIT_DIR=str(tmp_path), EMJAX_VENV=str(tmp_path / "venv"), HOME="/home/u")
    return e


def test_slurm_passes_arguments_unchanged(slurm_job):
    """Brackets, spaces, quotes and glob characters reach emjax as given, on one node and on several: the
    one-node branch ran `exec $CMD` on a %q-quoted string nothing parsed again, so `lora.targets=[down]` arrived
    as `lora.targets=\\[down\\]` and `workdir=runs/a b` as two arguments."""
    for nodes in ("1", "2"):
        r = subprocess.run(["bash", str(LAUNCH / "slurm_gpu.sbatch"), *ARGS], capture_output=True, text=True,
                           env=dict(slurm_job, SLURM_JOB_NUM_NODES=nodes), timeout=30)
        assert r.returncode == 0, r.stderr
        got = [line for line in r.stdout.splitlines() if line.startswith("task")]
        tasks = ["-"] if nodes == "1" else ["0", "1"]
        assert got == [f"task{t}:<{a}>" for t in tasks for a in ARGS], r.stdout
        coordinators = {line for line in r.stdout.splitlines() if line.startswith("coordinator")}
        assert coordinators == {"coordinator none" if nodes == "1" else "coordinator gpu01:12355"}
