#!/usr/bin/env bash
# A whole GPU session's checks in ONE device call (about 10 minutes: run it with timeout_s=600), packed so that they come back:
# the device tool returns at most 8 files from $OUT, and two gpu_check.sh runs write 12 (the H200
# session of 2026-11-27 lost its training and pipeline JSONs that way). Steps, in this order:
#   1. kernels: benchmarks/gpu_check.sh, every step: build, CUDA tests, kernel benchmarks,
#      compute-sanitizer, the loss and post-processing profiles (GPU_SESSION_KERNEL_SECONDS, default 270;
#      issue 11, always first);
#   2. models: benchmarks/bench_models.py's GPU comparison (issue 8) with what is left, up to
#      GPU_SESSION_MODEL_SECONDS (default 420). It measures only what benchmarks/results/models_gpu.json
#      lacks for this GPU model and merges into that file after every model, so two H200 runs' 85-90 s
#      on the same first encoders no longer repeat: about 12 s per model, 31 models (372 s) were
#      missing on an H200 and 34 (408 s) on any other GPU. It comes before issue 10's profiles because
#      those had their runs and issue 8's figures never got one;
#   3. profile: benchmarks/gpu_profile_pipeline.py, where the Predictor's batch-1 time goes (70 s at
#      most), then 4. ablate: its --ablate table, batch-1 latency with BatchNorm folding and the
#      sub-pixel decoder each off and on, in one process (60 s at most);
#   5. compile: the same with the backend's torch.compile option, classifier + segmenter only (150 s
#      at most): issue 10's 3 ms target needs compiled networks;
#   6. apps: gpu_check.sh's benchmark step over GPU_SESSION_BENCHES (default the pipeline and model
#      benchmarks, issues 10 and 8; add benchmarks/bench_train.py for issue 9's) with what is left;
#      bench_models there goes on with what step 2 did not reach.
# GPU_SESSION_STEPS picks steps (default kernels,models,profile,ablate,compile,apps). Every step's
# limit is also cut to what is left of GPU_SESSION_SECONDS (default 585) less 15 s for the summary, and
# a step that would get less than its minimum is skipped and named in summary.txt, with the command for
# a second call (on the same warm machine: its build is incremental).
# Comes back in $OUT: summary.txt (the summaries, the pipeline profile's headline, the segmenters'
# table and what is still to measure), gpu_session.tar.gz (every log, results tarball and profile) and,
# when this call measured segmenters, models_gpu.json and models_gpu.png: copy them into
# benchmarks/results/ and commit them (the next session then measures only what is still missing).
# GPU_SESSION_DRY_RUN=1 prints each step's command and limit instead of running it, counting every
# step as taking its whole limit (the CPU test of this schedule).
#
# Here, first: `bash benchmarks/gpu_wheels.sh` (pydicom and pycocotools wheels into the ignored .whl/).
# Then: run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600).
set -uo pipefail
cd "$(dirname "$0")/.."

FINAL=${OUT:-$(mktemp -d /tmp/gpu-session-out.XXXX)}
mkdir -p "$FINAL"
WORK=$(mktemp -d /tmp/gpu-session.XXXX)
BUDGET=${GPU_SESSION_SECONDS:-585}
STEPS=",${GPU_SESSION_STEPS:-kernels,models,profile,ablate,compile,apps},"
wanted() { [[ $STEPS == *",$1,"* ]]; }
BENCHES=${GPU_SESSION_BENCHES:-benchmarks/bench_pipeline.py benchmarks/bench_models.py}
DRY=${GPU_SESSION_DRY_RUN:-}
RESERVE=15  # seconds kept for the summary and the tarball
START=$SECONDS
SKIPPED=()
touch "$WORK/start"

# limit_for STEP CAP MIN: LIMIT = min(CAP, seconds left less RESERVE); fails (and notes STEP as
# skipped) when that is under MIN.
limit_for() {
  LIMIT=$((BUDGET - (SECONDS - START) - RESERVE))
  ((LIMIT > $2)) && LIMIT=$2
  if ((LIMIT < $3)); then
    SKIPPED+=("$1")
    echo "$1: skipped, ${LIMIT}s left (needs $3)"
    return 1
  fi
  return 0
}

# run_step NAME LOG CMD...: CMD's output appended to LOG.
run_step() {
  local name=$1 log=$2
  shift 2
  if [ -n "$DRY" ]; then
    echo "dry run: $name (limit ${LIMIT}s): $*"
    SECONDS=$((SECONDS + LIMIT))
    return 0
  fi
  "$@" >>"$log" 2>&1
  echo "$name: exit $? after $((SECONDS - START)) s"
}

if wanted kernels; then
  limit_for kernels "${GPU_SESSION_KERNEL_SECONDS:-270}" 60 &&
    run_step "gpu_check.sh (kernels)" "$WORK/kernels.out" env OUT="$WORK/kernels" \
      GPU_CHECK_MAXFAIL="${GPU_CHECK_MAXFAIL:-40}" GPU_CHECK_DEADLINE="$LIMIT" bash benchmarks/gpu_check.sh
else  # the other steps need the build and the wheels
  limit_for build 180 30 &&
    run_step "gpu_check.sh (build)" "$WORK/kernels.out" env OUT="$WORK/kernels" GPU_CHECK_STEPS=build \
      GPU_CHECK_DEADLINE="$LIMIT" bash benchmarks/gpu_check.sh
fi

[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
# bench_models starts no model that would end (at its mean seconds per model) within 25 s of the limit
# (pytest's start, a slow model's overrun); a kill at the limit still leaves every finished model in
# models_gpu.json.
if wanted models && limit_for models "${GPU_SESSION_MODEL_SECONDS:-420}" 90; then
  run_step "bench_models.py (segmenters, issue 8)" "$WORK/models.log" env PNEUMOSEG_BENCH_GPU_SECONDS=$((LIMIT - 25)) \
    timeout --kill-after=5 $((LIMIT - 5)) python3 -m pytest -m cuda benchmarks/bench_models.py -q -s -p no:cacheprovider -rfE
fi
if wanted profile && limit_for profile 70 30; then
  run_step "gpu_profile_pipeline.py" "$WORK/pipeline_profile.log" \
    timeout --kill-after=5 "$LIMIT" python3 benchmarks/gpu_profile_pipeline.py --reps 30
fi
if wanted ablate && limit_for ablate 60 30; then
  run_step "gpu_profile_pipeline.py --ablate" "$WORK/pipeline_profile.log" \
    timeout --kill-after=5 "$LIMIT" python3 benchmarks/gpu_profile_pipeline.py --reps 30 --ablate
fi
if wanted compile && limit_for compile 150 90; then
  run_step "gpu_profile_pipeline.py --compile" "$WORK/pipeline_profile.log" \
    timeout --kill-after=5 "$LIMIT" python3 benchmarks/gpu_profile_pipeline.py --reps 30 --compile --only two
fi
if wanted apps && limit_for apps 600 120; then
  run_step "gpu_check.sh ($BENCHES)" "$WORK/apps.out" env OUT="$WORK/apps" GPU_CHECK_STEPS=benches \
    GPU_CHECK_DEADLINE="$LIMIT" GPU_CHECK_BENCH_TIMEOUT=$((LIMIT - 20)) \
    PNEUMOSEG_BENCH_GPU_SECONDS=$((LIMIT - 110 > 60 ? LIMIT - 110 : 60)) GPU_CHECK_BENCHES="$BENCHES" \
    bash benchmarks/gpu_check.sh
fi

MODELS_JSON=benchmarks/results/models_gpu.json
[ -n "$(find "$MODELS_JSON" -newer "$WORK/start" 2>/dev/null)" ] && MEASURED=1 || MEASURED=
AGAIN=("${SKIPPED[@]}")  # what a second call should run: the skipped steps, and models while some are missing
still=$(python3 -c 'import json, sys; print(len(json.load(open(sys.argv[1])).get("still_to_measure", [])))' \
  "$MODELS_JSON" 2>/dev/null || echo 0)
if wanted models && ((still > 0)) && [[ " ${SKIPPED[*]} " != *" models "* ]]; then
  AGAIN=(models "${AGAIN[@]}")
fi
{
  cat "$WORK/kernels/summary.txt" 2>/dev/null || tail -40 "$WORK/kernels.out" 2>/dev/null
  echo
  echo "# ---- segmenters (issue 8): $MODELS_JSON$([ -n "$MEASURED" ] && echo ", merged by this call: copy it from \$OUT and commit it")"
  grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed|skipped)" "$WORK/models.log" 2>/dev/null
  python3 - "$MODELS_JSON" <<'EOF' 2>&1
import json, sys
sys.path.insert(0, "benchmarks")
import gpu_summary
data = json.load(open(sys.argv[1]))
gpu_summary.models(data)
if data.get("model_s_this_run"):
    print(f"  seconds per model, last run: {data['model_s_this_run']}")
print(f"  still to measure on {data['device']}: {len(data.get('still_to_measure', []))} case(s)")
for line in data.get("still_to_measure", []):
    print(f"    {line}")
EOF
  echo
  echo "# ---- pipeline profile (benchmarks/gpu_profile_pipeline.py)"
  grep -E "^==|stage timings|part |device time|compiled for|x plain" "$WORK/pipeline_profile.log" 2>/dev/null
  echo
  echo "# ---- pipeline, training and model benchmarks"
  sed -n '/## pytest/,/## sanitizers/p;/## GPU benchmark figures/,$p' "$WORK/apps/summary.txt" 2>/dev/null \
    || tail -20 "$WORK/apps.out" 2>/dev/null
  if ((${#AGAIN[@]})); then
    echo
    echo "# ---- left for a second call (skipped for time: ${SKIPPED[*]:-none}; segmenter cases still to measure: $still)."
    echo "# On the same warm machine, after copying models_gpu.json from \$OUT into benchmarks/results/:"
    echo "# (GPU_SESSION_SECONDS: the call's timeout_s less 15, when less device time than a full call is left)"
    echo "#   run(command=\"GPU_SESSION_STEPS=$(IFS=,; echo "${AGAIN[*]}" | sed 's/build,\?//') bash benchmarks/gpu_session.sh\", carry=[\".whl\"], timeout_s=...)"
  fi
} >"$FINAL/summary.txt"
[ -n "$MEASURED" ] && cp benchmarks/results/models_gpu.json benchmarks/results/models_gpu.png "$FINAL/" 2>/dev/null
tar -czf "$FINAL/gpu_session.tar.gz" -C "$WORK" .
cat "$FINAL/summary.txt"
rm -rf "$WORK"
