#!/usr/bin/env bash
# The GPU tests, each test file in its own process (a failed CUDA-graph capture leaves the CUDA context broken,
# which fails every later test of the same process), then one summary line; exit 1 if any failed.
# Then scripts/bench_decode.py --check on the embedded default's shape (random weights) against the step costs
# recorded in docs/step_costs.json (STEP_COSTS=FILE for another file, STEP_COSTS= for none): it fails when a
# decoding step is slower than recorded by more than 25% (the check that would have caught the slower draft step).
# GPU_TEST_JOBS=N runs N files at once (default 1; the files fit one GPU together, and the whole run took 9.5 min
# one at a time on an H100); the summary lines keep the files' order.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
logs=${GPU_TEST_LOGS:-/tmp/specforge-gpu-tests}
mkdir -p "$logs"
files=$(grep -l "needs CUDA\|mark.gpu" tests/test_*.py)
for f in $files; do  # each file in its own process, at most GPU_TEST_JOBS at once
  while [ "$(jobs -rp | wc -l)" -ge "${GPU_TEST_JOBS:-1}" ]; do wait -n; done
  name=$(basename "$f" .py); rm -f "$logs/$name.rc"
  ( $PY -m pytest -q -p no:cacheprovider "$f" > "$logs/$name.log" 2>&1; echo $? > "$logs/$name.rc" ) &
done
wait
passed=0; failed=0; bad=()
for f in $files; do
  name=$(basename "$f" .py)
  rc=$(cat "$logs/$name.rc" 2>/dev/null || echo 1)
  line=$(grep -E "^[0-9]+ (passed|failed)|(passed|failed|error).* in [0-9.]+s" "$logs/$name.log" | tail -1)
  p=$(echo "$line" | grep -oE "[0-9]+ passed" | grep -oE "[0-9]+" || true)
  x=0
  for c in $(echo "$line" | grep -oE "[0-9]+ (failed|errors?)" | grep -oE "^[0-9]+"); do x=$((x + c)); done
  passed=$((passed + ${p:-0})); failed=$((failed + x))
  if [ "$rc" -ne 0 ]; then bad+=("$name"); [ "$x" -eq 0 ] && failed=$((failed + 1)); fi
  echo "$name: ${line:-no summary (rc $rc)}"
done
STEP_COSTS=${STEP_COSTS-docs/step_costs.json}  # empty: no check
if [ -n "$STEP_COSTS" ] && [ -f "$STEP_COSTS" ]; then
  $PY scripts/bench_decode.py --shape smollm2-135m --check "$STEP_COSTS" > "$logs/step_costs.log" 2>&1
  rc=$?
  tail -1 "$logs/step_costs.log"
  [ "$rc" -ne 0 ] && bad+=("step costs") && failed=$((failed + 1))
fi
echo "gpu tests: $passed passed, $failed failed${bad:+ (in: ${bad[*]})}; logs in $logs"
[ ${#bad[@]} -eq 0 ]
