#!/usr/bin/env bash
# TPU VM slice: create it (or reuse it if it exists), install emjax on every worker, run one emjax command on all
# workers at once (`--worker=all`). jax.distributed initialises itself from the TPU environment, so every worker
# runs the same command; only process 0 writes logs, metrics and the adapter.
#
#   launch/tpu_pod.sh --name NAME --zone ZONE --type ACCEL [--project P] [--version V] [--spot] [--dry-run] \
#                     [--repo URL] [--ref REF] [--delete-after] -- COMMAND [ARGS...]
#
#   launch/tpu_pod.sh --name em-v5p --zone us-east5-a --type v5p-32 -- train configs/qwen3_8b.yaml workdir=/mnt/em/r
#   launch/tpu_pod.sh --name em-v6e --zone us-east5-b --type v6e-8 --spot -- sweep sweeps/regulariser_8b
#   launch/tpu_pod.sh --dry-run --name t --zone us-central2-b --type v4-8 -- train tiny   # print commands only
#
# --type       accelerator type, e.g. v4-8, v5p-32, v5litepod-16, v6e-8
# --version    TPU VM runtime (default: chosen from the type: tpu-ubuntu2204-base, v2-alpha-tpuv5[-lite],
#              v2-alpha-tpuv6e)
# --repo/--ref what every worker clones (default: this checkout's origin URL and HEAD commit)
# --spot       create a Spot (preemptible) slice; sweeps resume after preemption when rerun
# Work directories must be on a disk every worker mounts (Filestore, NFS; e.g. /mnt/em), or runs stay on worker 0;
# emjax refuses gs:// paths (copy results to a bucket afterwards: gcloud storage rsync -r /mnt/em gs://b/em).
set -euo pipefail

usage() {  # the comment block at the top, up to the first line of code
  awk 'NR == 1 { next } !/^#/ || /^#SBATCH/ { exit } { sub(/^# ?/, ""); print }' "$0"
}
die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

DRY=0; NAME=""; ZONE=""; TYPE=""; PROJECT=""; VERSION=""; SPOT=0; REPO_URL=""; REF=""; DELETE=0
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
need() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --name) need "$@"; NAME="$2"; shift 2 ;;
    --zone) need "$@"; ZONE="$2"; shift 2 ;;
    --type) need "$@"; TYPE="$2"; shift 2 ;;
    --project) need "$@"; PROJECT="$2"; shift 2 ;;
    --version) need "$@"; VERSION="$2"; shift 2 ;;
    --repo) need "$@"; REPO_URL="$2"; shift 2 ;;
    --ref) need "$@"; REF="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --delete-after) DELETE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (the emjax command goes after --; see --help)" ;;
  esac
done
[[ -n "$NAME" ]] || die "--name is required (the TPU VM name)"
[[ -n "$ZONE" ]] || die "--zone is required (e.g. us-east5-a)"
[[ -n "$TYPE" ]] || die "--type is required (e.g. v5p-32)"
[[ "$NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name '$NAME': lowercase letters, digits and '-' only"
[[ "$TYPE" =~ ^v[0-9]+[a-z]*(litepod)?-[0-9]+$ ]] \
  || die "--type '$TYPE': expected e.g. v4-8, v5p-32, v5litepod-16, v6e-8"
[[ $# -ge 1 ]] || die "missing the emjax command after -- (e.g. -- train tiny)"
case "$1" in
  train|sweep|report|eval|data|demo) ;;
  *) die "unknown emjax command '$1' (use train, sweep, report, eval, data or demo)" ;;
esac
if [[ -z "$VERSION" ]]; then
  case "$TYPE" in
    v4-*) VERSION=tpu-ubuntu2204-base ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v5litepod-*|v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    *) die "--version is required for accelerator type '$TYPE'" ;;
  esac
fi
if [[ -z "$REPO_URL" ]]; then
  REPO_URL="$(git -C "$REPO" remote get-url origin 2>/dev/null || true)"
  [[ -n "$REPO_URL" ]] || die "--repo is required (this checkout has no 'origin' remote to clone on the workers)"
fi
if [[ -z "$REF" ]]; then REF="$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo main)"; fi

G=(gcloud compute tpus tpu-vm)
LOC=(--zone="$ZONE"); [[ -n "$PROJECT" ]] && LOC+=(--project="$PROJECT")
run() { printf '+'; printf ' %q' "$@"; printf '\n'; if [[ $DRY -eq 0 ]]; then "$@"; fi; }

# 1. create the slice unless it exists (in a dry run we cannot ask, so we show both steps)
if [[ $DRY -eq 1 ]]; then
  echo "# if '$NAME' does not exist yet (checked with: ${G[*]} describe $NAME ${LOC[*]}):"
  CREATE=1
elif "${G[@]}" describe "$NAME" "${LOC[@]}" >/dev/null 2>&1; then
  echo "tpu_pod.sh: reusing existing TPU VM '$NAME'" >&2; CREATE=0
else
  CREATE=1
fi
if [[ $CREATE -eq 1 ]]; then
  SPOTARG=(); [[ $SPOT -eq 1 ]] && SPOTARG=(--spot)
  run "${G[@]}" create "$NAME" "${LOC[@]}" --accelerator-type="$TYPE" --version="$VERSION" "${SPOTARG[@]}"
fi

# 2. install on every worker (idempotent: clone once, then fetch + checkout the requested ref)
INSTALL="set -e; if [ ! -d emjax ]; then git clone $(printf %q "$REPO_URL") emjax; fi; cd emjax; \
git fetch --quiet origin; git checkout --quiet $(printf %q "$REF"); \
python3 -m venv ~/emjax-venv; ~/emjax-venv/bin/pip install --quiet --upgrade pip; \
~/emjax-venv/bin/pip install --quiet -e . 'jax[tpu]'"
run "${G[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command="$INSTALL"

# 3. the same command on every worker
CMD="cd ~/emjax && ~/emjax-venv/bin/emjax$(printf ' %q' "$@")"
run "${G[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command="$CMD"

if [[ $DELETE -eq 1 ]]; then
  run "${G[@]}" delete "$NAME" "${LOC[@]}" --quiet
fi
