#!/usr/bin/env bash
# Local GPU machine: make a venv, install emjax with CUDA 12 JAX, then run one emjax command.
#
#   launch/gpu_local.sh [--dry-run] [--venv DIR] [--no-install] -- COMMAND [ARGS...]
#
#   launch/gpu_local.sh -- train tiny workdir=runs/tiny
#   launch/gpu_local.sh -- sweep sweeps/regulariser_8b --only optim=adam
#   launch/gpu_local.sh -- sweep sweeps/regulariser_8b --pack 10       # up to 10 adapters per program
#   launch/gpu_local.sh --dry-run -- report runs/sweeps/main_grid     # print the commands, run nothing
#
# COMMAND is an emjax sub-command: train | sweep | report | eval | data | demo.
# --venv DIR      virtual environment to create or reuse (default .venv-gpu in the repo root)
# --no-install    reuse the venv as is (no pip calls)
# --python BIN    interpreter used to create the venv (default python3)
# Needs an NVIDIA driver recent enough for CUDA 12 (`nvidia-smi`); the pip wheels bring CUDA itself.
set -euo pipefail

usage() {  # the comment block at the top, up to the first line of code
  awk 'NR == 1 { next } !/^#/ || /^#SBATCH/ { exit } { sub(/^# ?/, ""); print }' "$0"
}
die() { echo "gpu_local.sh: $*" >&2; exit 2; }

DRY=0; VENV=""; INSTALL=1; PY=python3
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --venv) [[ $# -ge 2 && -n "$2" ]] || die "--venv needs a directory"; VENV="$2"; shift 2 ;;
    --no-install) INSTALL=0; shift ;;
    --python) [[ $# -ge 2 && -n "$2" ]] || die "--python needs an interpreter"; PY="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (the emjax command goes after --; see --help)" ;;
  esac
done
[[ $# -ge 1 ]] || die "missing the emjax command after -- (e.g. -- train tiny)"
case "$1" in
  train|sweep|report|eval|data|demo) ;;
  *) die "unknown emjax command '$1' (use train, sweep, report, eval, data or demo)" ;;
esac
VENV="${VENV:-$REPO/.venv-gpu}"

run() {  # print, and execute unless --dry-run
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [[ $DRY -eq 0 ]]; then "$@"; fi
}

if [[ $INSTALL -eq 1 ]]; then
  [[ -d "$VENV" ]] || run "$PY" -m venv "$VENV"
  run "$VENV/bin/pip" install --upgrade pip
  run "$VENV/bin/pip" install -e "$REPO" "jax[cuda12]"
elif [[ $DRY -eq 0 && ! -x "$VENV/bin/emjax" ]]; then
  die "--no-install: $VENV/bin/emjax not found (run once without --no-install)"
fi
cd "$REPO"
run "$VENV/bin/emjax" "$@"
