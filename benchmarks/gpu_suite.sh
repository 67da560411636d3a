#!/usr/bin/env bash
# The one command for a bare GPU machine (device tool): install, GPU tests, benchmark sweep, results under $OUT.
#
#   bash benchmarks/gpu_suite.sh [PART]      PART = 1 (default): GPU tests + the logprobs sweep
#                                            PART = 2: DPO, GRPO, attention, end-to-end DPO/GRPO steps
#                                            PART = all: everything in one call (needs more than 9 minutes)
#
# Each part stays under ~9 minutes: pytest has its own timeout and the sweep a --time-budget (cases past it are
# recorded as "skipped: time budget"; results are written after every case). Needs the wheels in ./.whl
# (bash benchmarks/fetch_wheels.sh, then carry=[".whl"]); without them liger/trl rows say "unavailable".
# Writes to $OUT (at most 8 files come back): env.txt, install.log, pytest-gpu.log (part 1), bench-PART.log,
# results-PART.tgz (benchmarks/results/<device>/ of this part), summary-PART.md.
set -uo pipefail
PART=${1:-1}
OUT=${OUT:-/tmp/fastpref-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
cd "$(dirname "$0")/.."
PY=python3

# 1. carried wheels (liger-kernel, trl, datasets, dill, multiprocess), then the project itself (editable, so
#    benchmarks/ imports as fastpref.benchmarks)
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  echo "gpu_suite: no .whl/ carried: liger/trl providers will be unavailable" | tee -a "$OUT/env.txt"
fi
if [ -z "${FASTPREF_SUITE_SKIP_INSTALL:-}" ]; then  # set it for a dry run where the package is installed
  $PY -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
    || { echo "gpu_suite: editable install failed, see install.log" | tee -a "$OUT/env.txt"; exit 1; }
fi

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true; \
  $PY -m fastpref.cli info; } >>"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

left() {  # seconds left of a 480 s part
  echo $(( 480 - ($(date +%s) - T0) ))
}

run_bench() {  # run_bench SECONDS OP: one op, no new case after SECONDS (or after the part's end)
  local b=$1 l
  l=$(left)
  (( l < b )) && b=$l
  (( b < 5 )) && { echo "gpu_suite: no time left for $2" | tee -a "$OUT/bench-$PART.log"; return; }
  $PY -m fastpref.cli bench --update-repo --op "$2" --time-budget "$b" 2>&1 | tee -a "$OUT/bench-$PART.log"
}

gpu_tests() {
  timeout 150 $PY -m pytest -m gpu -q -p no:cacheprovider tests/ 2>&1 | tee "$OUT/pytest-gpu.log" | tail -25
}

case "$PART" in
  1) gpu_tests; run_bench 480 logprobs ;;
  2) run_bench 100 dpo; run_bench 100 grpo; run_bench 80 attention; run_bench 60 e2e-dpo; run_bench 60 e2e-grpo ;;
  all) gpu_tests; run_bench 300 logprobs; run_bench 100 dpo; run_bench 100 grpo; run_bench 80 attention
       run_bench 60 e2e-dpo; run_bench 60 e2e-grpo ;;
  *) echo "gpu_suite: PART must be 1, 2 or all, got $PART" >&2; exit 2 ;;
esac

SLUG=$($PY -c "import torch; from fastpref.benchmarks.measure import device_slug
print(device_slug(torch.device('cuda' if torch.cuda.is_available() else 'cpu')))")
tar czf "$OUT/results-$PART.tgz" -C benchmarks/results "$SLUG"
cp "benchmarks/results/$SLUG/summary.md" "$OUT/summary-$PART.md" 2>/dev/null
echo "gpu_suite: part $PART done in $(( $(date +%s) - T0 )) s; results in \$OUT/results-$PART.tgz ($SLUG)"
