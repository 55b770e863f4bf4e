#!/usr/bin/env bash
# A whole GPU session's checks in ONE device call (about 10 minutes: run it with timeout_s=600), packed so that they come back:
# the device tool returns at most 8 files from $OUT, and two gpu_check.sh runs write 12 (the H200
# session of 2026-11-27 lost its training and pipeline JSONs that way).
#   1. benchmarks/gpu_check.sh, every step: build, CUDA tests, kernel benchmarks, compute-sanitizer,
#      the loss and post-processing profiles (GPU_SESSION_KERNEL_SECONDS, default 270);
#   2. benchmarks/gpu_profile_pipeline.py: where the Predictor's batch-1 time goes (70 s at most),
#      then its --ablate table: batch-1 latency with BatchNorm folding and the sub-pixel decoder each
#      off and on, in one process (60 s at most; both rewrites came after the last GPU run);
#   3. the same with the backend's torch.compile option, classifier + segmenter only (150 s at most):
#      issue 10's 3 ms target needs compiled networks (the CUDA-graph path measured 5.67 ms on an H200);
#   4. gpu_check.sh's benchmark step over GPU_SESSION_BENCHES (default the pipeline and model
#      benchmarks, issues 10 and 8; add benchmarks/bench_train.py for issue 9's) with what is left of
#      GPU_SESSION_SECONDS (default 585); bench_models gets the time the pipeline leaves
#      (PNEUMOSEG_BENCH_GPU_SECONDS) and lists the models it did not reach.
# GPU_SESSION_STEPS picks steps (default kernels,profile,ablate,compile,apps). Each step stops at its
# limit, so the benchmarks get what the others leave; where summary.txt says they were skipped, a
# second call with GPU_SESSION_STEPS=apps (it rebuilds first: about 2 minutes) runs them.
# Comes back in $OUT: summary.txt (both summaries and the pipeline profile's headline) and
# gpu_session.tar.gz (every log, results tarball and profile).
#
# Here, first: `bash benchmarks/gpu_wheels.sh` (pydicom and pycocotools wheels into the ignored .whl/).
# Then: run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600).
set -uo pipefail
cd "$(dirname "$0")/.."

FINAL=${OUT:-$(mktemp -d /tmp/gpu-session-out.XXXX)}
mkdir -p "$FINAL"
WORK=$(mktemp -d /tmp/gpu-session.XXXX)
BUDGET=${GPU_SESSION_SECONDS:-585}
STEPS=",${GPU_SESSION_STEPS:-kernels,profile,ablate,compile,apps},"
wanted() { [[ $STEPS == *",$1,"* ]]; }
BENCHES=${GPU_SESSION_BENCHES:-benchmarks/bench_pipeline.py benchmarks/bench_models.py}
START=$SECONDS

if wanted kernels; then
  OUT=$WORK/kernels GPU_CHECK_MAXFAIL=${GPU_CHECK_MAXFAIL:-40} GPU_CHECK_DEADLINE=${GPU_SESSION_KERNEL_SECONDS:-270} \
    bash benchmarks/gpu_check.sh >"$WORK/kernels.out" 2>&1
  echo "gpu_check.sh (kernels): exit $? after $((SECONDS - START)) s"
else  # the other steps need the build and the wheels
  OUT=$WORK/kernels GPU_CHECK_STEPS=build bash benchmarks/gpu_check.sh >"$WORK/kernels.out" 2>&1
fi

[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
if wanted profile; then
  timeout --kill-after=5 70 python3 benchmarks/gpu_profile_pipeline.py --reps 30 >"$WORK/pipeline_profile.log" 2>&1
  echo "gpu_profile_pipeline.py: exit $? after $((SECONDS - START)) s"
fi
if wanted ablate; then
  timeout --kill-after=5 60 python3 benchmarks/gpu_profile_pipeline.py --reps 30 --ablate \
    >>"$WORK/pipeline_profile.log" 2>&1
  echo "gpu_profile_pipeline.py --ablate: exit $? after $((SECONDS - START)) s"
fi
if wanted compile; then
  timeout --kill-after=5 150 python3 benchmarks/gpu_profile_pipeline.py --reps 30 --compile --only two \
    >>"$WORK/pipeline_profile.log" 2>&1
  echo "gpu_profile_pipeline.py --compile: exit $? after $((SECONDS - START)) s"
fi

left=$((BUDGET - (SECONDS - START)))
if ! wanted apps; then
  :
elif ((left > 120)); then
  OUT=$WORK/apps GPU_CHECK_STEPS=benches GPU_CHECK_DEADLINE=$left GPU_CHECK_BENCH_TIMEOUT=$((left - 20)) \
    PNEUMOSEG_BENCH_GPU_SECONDS=$((left - 110 > 60 ? left - 110 : 60)) GPU_CHECK_BENCHES="$BENCHES" \
    bash benchmarks/gpu_check.sh >"$WORK/apps.out" 2>&1
  echo "gpu_check.sh ($BENCHES): exit $? after $((SECONDS - START)) s"
else
  echo "benchmarks ($BENCHES) skipped: ${left}s left" | tee "$WORK/apps.out"
fi

{
  cat "$WORK/kernels/summary.txt" 2>/dev/null || tail -40 "$WORK/kernels.out"
  echo
  echo "# ---- pipeline profile (benchmarks/gpu_profile_pipeline.py)"
  grep -E "^==|stage timings|part |device time|compiled for|x plain" "$WORK/pipeline_profile.log" 2>/dev/null
  echo
  echo "# ---- pipeline, training and model benchmarks"
  sed -n '/## pytest/,/## sanitizers/p;/## GPU benchmark figures/,$p' "$WORK/apps/summary.txt" 2>/dev/null \
    || tail -20 "$WORK/apps.out"
} >"$FINAL/summary.txt"
tar -czf "$FINAL/gpu_session.tar.gz" -C "$WORK" .
cat "$FINAL/summary.txt"
rm -rf "$WORK"
