#!/usr/bin/env bash
# One command for a GPU session (issue 11): build with ptxas resource usage, run the CUDA tests, the GPU
# benchmarks, a profile of the fused loss and compute-sanitizer (memcheck, racecheck, synccheck) over
# every CUDA op, then print a summary. Every step runs even when an earlier one fails; the exit status
# is 1 if any failed. Each step has a timeout, and all of them share one deadline (GPU_CHECK_DEADLINE
# seconds, default 570) so that the summary is always written inside a 600 s device call.
#
# From the repo root, on the GPU machine (python3 with torch, cupy, pytest there; no network):
#   bash benchmarks/gpu_check.sh
# With the device tool: first, here, `bash benchmarks/gpu_wheels.sh` (the wheels the GPU image lacks,
# into the git-ignored .whl/), then run(command="bash benchmarks/gpu_check.sh", carry=[".whl"],
# timeout_s=600). What comes back in $OUT (6 files): build.log (pip -v output with the ptxas lines and
# the per-kernel table), tests.log (CUDA tests + GPU benchmarks), profile.log, sanitize.log,
# results.tar.gz (the benchmarks/results/*gpu* files this call wrote, junit XML, ptxas JSON) and summary.txt (the step
# table, test counts, sanitizer summaries, the ptxas table and benchmarks/gpu_summary.py's figures).
#
# Knobs: GPU_CHECK_MAXFAIL (CUDA tests stop after this many failures; default 1, as -x),
# GPU_CHECK_BENCHES (bench files; default loss, postprocess, rle), GPU_CHECK_BENCH_TIMEOUT (seconds for
# the benchmark step; default 180), GPU_CHECK_STEPS (which of build,tests,benches,sanitize,profile to
# run; default all: a second call on the same warm machine can run e.g. "build,benches" alone, the build
# then being incremental), GPU_CHECK_DEADLINE, PYTHON.
#
# The models/training/pipeline benchmarks (issues 8, 9, 10) in one call after the kernel checks:
#   GPU_CHECK_STEPS=build,benches GPU_CHECK_BENCH_TIMEOUT=500 PNEUMOSEG_BENCH_GPU_SECONDS=200 \
#   GPU_CHECK_BENCHES="benchmarks/bench_models.py benchmarks/bench_train.py benchmarks/bench_pipeline.py" \
#   bash benchmarks/gpu_check.sh
# (bench_models.py measures only what benchmarks/results/models_gpu.json lacks for this GPU model and
# merges into that file, so repeated calls go on where the last stopped; gpu_session.sh gives it a step
# of its own right after the kernel checks.)
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-$(mktemp -d /tmp/gpu-check-out.XXXX)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
DEADLINE=${GPU_CHECK_DEADLINE:-570}
MAXFAIL=${GPU_CHECK_MAXFAIL:-1}
BENCHES=${GPU_CHECK_BENCHES:-benchmarks/bench_loss.py benchmarks/bench_postprocess.py benchmarks/bench_rle.py}
BENCH_TIMEOUT=${GPU_CHECK_BENCH_TIMEOUT:-180}
STEPS=",${GPU_CHECK_STEPS:-build,tests,benches,sanitize,profile},"
wanted() { [[ $STEPS == *",$1,"* ]]; }
WORK=$(mktemp -d /tmp/gpu-check.XXXX)
mkdir -p "$WORK/junit"
export PYTHONUNBUFFERED=1
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
START=$SECONDS

STEP_NAMES=() STEP_STATUS=() STEP_SECONDS=()
record() {  # name rc seconds
  local status=PASS
  case $2 in
    0) ;;
    124|137) status="FAIL (timeout)" ;;
    skip) status="SKIPPED (no time left)" ;;
    *) status="FAIL (rc $2)" ;;
  esac
  STEP_NAMES+=("$1") STEP_STATUS+=("$status") STEP_SECONDS+=("$3")
  echo "=== step '$1': $status after $3 s (elapsed $((SECONDS - START)) s) ===" >&2
}

# run_step NAME TIMEOUT LOG CMD...: runs CMD with min(TIMEOUT, time left before the deadline, keeping
# 15 s for the summary), output appended to LOG; skipped when under 20 s would be left.
run_step() {
  local name=$1 limit=$2 log=$3
  shift 3
  local left=$((DEADLINE - (SECONDS - START) - 15))
  if ((left < 20)); then
    echo "=== $name: skipped, ${left}s left before the deadline ===" >>"$log"
    record "$name" skip 0
    return 1
  fi
  ((limit > left)) && limit=$left
  local t=$SECONDS
  echo "=== $name (timeout ${limit}s): $* ===" >>"$log"
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t)) s ===" >>"$log"
  record "$name" "$rc" $((SECONDS - t))
  return $rc
}

# ---- wheels the image lacks (pydicom, pycocotools), carried in .whl/ -------------------------------
if compgen -G ".whl/*.whl" >/dev/null; then
  if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      >"$WORK/wheels.log" 2>&1; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    record "wheels (.whl)" 0 0
  else
    cat "$WORK/wheels.log" >&2
    record "wheels (.whl)" 1 0
  fi
else
  echo "no .whl/ carried: tests needing pydicom or pycocotools will fail or skip" >&2
fi

# ---- (a) build, with -Xptxas -v --------------------------------------------------------------------
wanted build && run_step "build (pip -e, sm_90, ptxas -v)" 300 "$OUT/build.log" \
  $PY -m pip install -v --no-build-isolation --no-deps -e . \
  -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90 -Ccmake.define.PNEUMOSEG_PTXAS_VERBOSE=ON
if wanted build; then
  $PY benchmarks/ptxas_report.py --log "$OUT/build.log" --json "$WORK/ptxas.json" >"$WORK/ptxas.txt" 2>&1
  cat "$WORK/ptxas.txt" >>"$OUT/build.log"
fi
$PY - >>"$OUT/build.log" 2>&1 <<'EOF'
import pneumoseg
print("pneumoseg imported from", pneumoseg.__file__, "cuda_available:", pneumoseg.cuda_available())
EOF

# ---- (b) the machine -------------------------------------------------------------------------------
{
  nvidia-smi -L
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  $PY - <<'EOF'
import sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "|", torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, "SMs")
try:
    import cupy
    print("cupy", cupy.__version__)
except Exception as exc:
    print("cupy: not importable:", exc)
EOF
  SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer /usr/local/cuda*/compute-sanitizer/compute-sanitizer 2>/dev/null | head -1)
  echo "compute-sanitizer: ${SANITIZER:-not found}"
  [ -n "$SANITIZER" ] && "$SANITIZER" --version | tail -1
} >"$WORK/machine.txt" 2>&1
cat "$WORK/machine.txt" | tee -a "$OUT/tests.log"
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer /usr/local/cuda*/compute-sanitizer/compute-sanitizer 2>/dev/null | head -1)

# ---- (c) CUDA tests --------------------------------------------------------------------------------
# The GPU benchmarks are cuda-marked tests too; they run in (d), once.
wanted tests && run_step "CUDA tests (pytest -m cuda tests)" 180 "$OUT/tests.log" \
  $PY -m pytest -m cuda tests --maxfail="$MAXFAIL" -q -p no:cacheprovider -rfE \
  --junitxml="$WORK/junit/tests.xml"

# ---- (d) GPU benchmarks (write benchmarks/results/*_gpu.json) ---------------------------------------
# Only what this call writes is packed and summarised (the committed results of earlier runs stay).
touch "$WORK/benches-start"
# shellcheck disable=SC2086
wanted benches && run_step "GPU benchmarks (pytest -m cuda)" "$BENCH_TIMEOUT" "$OUT/tests.log" \
  $PY -m pytest -m cuda $BENCHES -q -p no:cacheprovider -rfE --junitxml="$WORK/junit/benchmarks.xml"

# ---- (f) compute-sanitizer over every CUDA op --------------------------------------------------------
if ! wanted sanitize; then
  :
elif [ -z "$SANITIZER" ]; then
  echo "compute-sanitizer not found" >>"$OUT/sanitize.log"
  record "compute-sanitizer" 1 0
else
  for tool in memcheck racecheck synccheck; do
    if [ $tool = synccheck ] && ((DEADLINE - (SECONDS - START) < 120)); then
      echo "=== synccheck skipped: under 120 s left ===" >>"$OUT/sanitize.log"
      record "sanitizer $tool" skip 0
      continue
    fi
    run_step "sanitizer $tool" 150 "$OUT/sanitize.log" \
      env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool $tool --error-exitcode 1 --print-limit 20 $PY benchmarks/gpu_sanitize.py
  done
fi

# ---- (e) loss profile ------------------------------------------------------------------------------
wanted profile && run_step "loss profile (torch.profiler)" 90 "$OUT/profile.log" $PY benchmarks/gpu_profile_loss.py
# 16x1024 bf16: the shape whose fused time (0.232 ms) was above fp32's (0.177 ms) for half the bytes.
wanted profile && run_step "loss profile, 16x1024 bf16" 90 "$OUT/profile.log" \
  $PY benchmarks/gpu_profile_loss.py --shape 16,1,1024,1024 --dtype bfloat16 --steps 10
wanted profile && run_step "post-processing profile (torch.profiler)" 90 "$OUT/profile.log" $PY benchmarks/gpu_profile_postprocess.py

# ---- (g) results and summary -----------------------------------------------------------------------
mkdir -p "$WORK/pack/results"
find benchmarks/results -maxdepth 1 -name '*gpu*' -newer "$WORK/benches-start" -exec cp {} "$WORK/pack/results/" \;
cp "$WORK"/junit/*.xml "$WORK/ptxas.json" "$WORK/machine.txt" "$WORK/pack/" 2>/dev/null
tar -czf "$OUT/results.tar.gz" -C "$WORK/pack" .

{
  echo "# gpu_check summary ($(date -u +%FT%TZ), $((SECONDS - START)) s)"
  head -3 "$WORK/machine.txt"
  echo
  printf '%-48s %-24s %s\n' step status seconds
  for i in "${!STEP_NAMES[@]}"; do
    printf '%-48s %-24s %s\n' "${STEP_NAMES[$i]}" "${STEP_STATUS[$i]}" "${STEP_SECONDS[$i]}"
  done
  echo
  echo "## pytest"
  grep -E "^(=+ )?[0-9]+ (passed|failed|error|skipped|deselected)|^FAILED|^ERROR" "$OUT/tests.log" | head -30
  echo
  echo "## sanitizers"
  grep -E "^=== sanitizer|ERROR SUMMARY|RACECHECK SUMMARY|checks passed|^FAIL " "$OUT/sanitize.log" 2>/dev/null | head -30
  echo
  echo "## ptxas (worst template instance per kernel)"
  cat "$WORK/ptxas.txt" 2>/dev/null || echo "(no build in this call)"
  echo
  echo "## loss profile"
  grep -E "per step|host overhead" "$OUT/profile.log" 2>/dev/null
  echo
  echo "## GPU benchmark figures"
  $PY benchmarks/gpu_summary.py "$WORK/pack/results" 2>&1
} >"$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"

failed=0
for s in "${STEP_STATUS[@]}"; do
  [ "$s" = PASS ] || failed=1
done
rm -rf "$WORK"
exit $failed
