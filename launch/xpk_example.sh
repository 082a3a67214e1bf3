#!/usr/bin/env bash
# xpk (GKE) example: submit one emjax command as a workload on an existing xpk cluster of TPU slices.
# xpk builds a container from this checkout on top of --base-image (or runs --image as is) and starts the command
# on every host of the slice(s); jax.distributed initialises itself from the TPU/GKE environment.
#
#   launch/xpk_example.sh --cluster C --workload W --tpu-type T [--num-slices N] [--project P] [--zone Z]
#                         [--base-image IMG | --image IMG] [--max-restarts K] [--dry-run] -- COMMAND [ARGS...]
#
#   launch/xpk_example.sh --cluster em --workload em-reg-adam --tpu-type v5p-32 --zone us-east5-a \
#       -- sweep sweeps/regulariser_8b --only optim=adam --root /mnt/em/sweeps/regulariser_8b
#   launch/xpk_example.sh --dry-run --cluster em --workload w1 --tpu-type v6e-8 -- train tiny
#
# Create the cluster once with `xpk cluster create --cluster C --tpu-type T --num-slices N`.
# --workload     lowercase letters, digits and '-', at most 40 characters (a Kubernetes name)
# --max-restarts restarts after preemption or failure (default 3); emjax resumes from its checkpoints and a
#                sweep skips finished runs, so restarts are cheap — keep work directories on a shared disk
#                every host mounts (Filestore, NFS; emjax refuses gs:// paths).
set -euo pipefail

usage() {  # the comment block at the top, up to the first line of code
  awk 'NR == 1 { next } !/^#/ || /^#SBATCH/ { exit } { sub(/^# ?/, ""); print }' "$0"
}
die() { echo "xpk_example.sh: $*" >&2; exit 2; }

DRY=0; CLUSTER=""; WORKLOAD=""; TPU=""; SLICES=1; PROJECT=""; ZONE=""; BASE="python:3.11-slim"; IMAGE=""; RESTARTS=3
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
need() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --cluster) need "$@"; CLUSTER="$2"; shift 2 ;;
    --workload) need "$@"; WORKLOAD="$2"; shift 2 ;;
    --tpu-type) need "$@"; TPU="$2"; shift 2 ;;
    --num-slices) need "$@"; SLICES="$2"; shift 2 ;;
    --project) need "$@"; PROJECT="$2"; shift 2 ;;
    --zone) need "$@"; ZONE="$2"; shift 2 ;;
    --base-image) need "$@"; BASE="$2"; shift 2 ;;
    --image) need "$@"; IMAGE="$2"; shift 2 ;;
    --max-restarts) need "$@"; RESTARTS="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (the emjax command goes after --; see --help)" ;;
  esac
done
[[ -n "$CLUSTER" ]] || die "--cluster is required (an existing xpk cluster)"
[[ -n "$WORKLOAD" ]] || die "--workload is required (a name for this job)"
[[ -n "$TPU" ]] || die "--tpu-type is required (e.g. v5p-32)"
[[ "$WORKLOAD" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ && ${#WORKLOAD} -le 40 ]] \
  || die "--workload '$WORKLOAD': lowercase letters, digits and '-', starting with a letter, at most 40 characters"
[[ "$TPU" =~ ^v[0-9]+[a-z]*(litepod)?-[0-9]+$ ]] \
  || die "--tpu-type '$TPU': expected e.g. v4-8, v5p-32, v5litepod-16, v6e-8"
[[ "$SLICES" =~ ^[1-9][0-9]*$ ]] || die "--num-slices '$SLICES': expected a positive integer"
[[ "$RESTARTS" =~ ^[0-9]+$ ]] || die "--max-restarts '$RESTARTS': expected a non-negative integer"
[[ $# -ge 1 ]] || die "missing the emjax command after -- (e.g. -- train tiny)"
case "$1" in
  train|sweep|report|eval|data|demo) ;;
  *) die "unknown emjax command '$1' (use train, sweep, report, eval, data or demo)" ;;
esac

ARGS=(xpk workload create --cluster="$CLUSTER" --workload="$WORKLOAD" --tpu-type="$TPU" --num-slices="$SLICES"
      --max-restarts="$RESTARTS")
[[ -n "$PROJECT" ]] && ARGS+=(--project="$PROJECT")
[[ -n "$ZONE" ]] && ARGS+=(--zone="$ZONE")
if [[ -n "$IMAGE" ]]; then
  ARGS+=(--docker-image="$IMAGE")   # an image that already has emjax installed
  CMD="emjax$(printf ' %q' "$@")"
else
  ARGS+=(--base-docker-image="$BASE" --script-dir="$REPO")  # xpk copies this checkout into the image
  CMD="pip install --quiet -e . 'jax[tpu]' && emjax$(printf ' %q' "$@")"
fi
ARGS+=(--command="$CMD")
printf '+'; printf ' %q' "${ARGS[@]}"; printf '\n'
if [[ $DRY -eq 0 ]]; then
  command -v xpk >/dev/null || die "xpk not found: pip install xpk"
  "${ARGS[@]}"
fi
