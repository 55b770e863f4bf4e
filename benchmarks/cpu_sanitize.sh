#!/usr/bin/env bash
# The CPU kernels (csrc/) under AddressSanitizer + UBSan, in one command:
#   bash benchmarks/cpu_sanitize.sh [extra pytest args]
# Builds a CPU-only extension with -DPNEUMOSEG_SANITIZE=ON from a fresh worktree of HEAD in a temp
# folder (the checkout's build/ and installed extension are left alone), into a venv of its own
# (CPU_SANITIZE_VENV, default /tmp/asan-venv, reused when present), runs the tests that call the
# native ops, prints a summary and exits non-zero on any sanitizer report or failed test.
# Not part of CI: the sanitized build alone takes about 10 minutes on 2 cores.
set -uo pipefail

REPO=$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)
VENV=${CPU_SANITIZE_VENV:-/tmp/asan-venv}
LOGS=${CPU_SANITIZE_LOGS:-/tmp/pneumoseg-cpu-sanitize-logs}
TESTS=${CPU_SANITIZE_TESTS:-"tests/test_rle.py tests/test_rle_properties.py tests/test_losses.py tests/test_loss_hostile.py
  tests/test_postprocess.py tests/test_hostile_native.py tests/test_hostile_metrics_rle.py tests/test_metrics.py
  tests/test_hostile_inputs.py tests/test_data.py tests/test_geometry_oracle.py tests/test_labelling_tile_model.py
  tests/test_hostile_data_review.py tests/test_cache.py tests/test_native_alignment.py"}
START=$(date +%s)
WORK=$(mktemp -d /tmp/pneumoseg-cpu-sanitize.XXXXXX)
TREE=$WORK/tree

cleanup() {
  git -C "$REPO" worktree remove --force "$TREE" >/dev/null 2>&1
  git -C "$REPO" worktree prune
  rm -rf "$WORK"
}
trap cleanup EXIT

git -C "$REPO" worktree add --detach "$TREE" HEAD >/dev/null || exit 1
# The tests find the shared sample data at ../shared, as in the checkout.
[ -d "$REPO/../shared" ] && ln -s "$(cd "$REPO/../shared" && pwd)" "$WORK/shared"

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  python3 -m venv "$VENV" || exit 1
  "$VENV/bin/pip" install -q torch==2.13.0 numpy scipy pytest hypothesis pydicom pillow pyyaml safetensors tqdm \
    scikit-build-core pybind11 cmake ninja || exit 1
fi

echo "== building the sanitized CPU extension ($(git -C "$REPO" rev-parse --short HEAD))"
# RelWithDebInfo: pybind11 strips Release modules, and a report needs symbols (the flags' -O3 still wins).
if ! PNEUMOSEG_CUDA=OFF "$VENV/bin/pip" install --no-build-isolation --no-deps -e "$TREE" \
    -Ccmake.define.PNEUMOSEG_SANITIZE=ON -Ccmake.define.PNEUMOSEG_CUDA=OFF -Ccmake.build-type=RelWithDebInfo \
    -Cinstall.strip=false -Cbuild-dir="$WORK/build" > "$WORK/build.log" 2>&1; then
  tail -40 "$WORK/build.log"
  echo "cpu_sanitize: the build failed"
  exit 1
fi
BUILT=$(date +%s)

rm -rf "$LOGS" && mkdir -p "$LOGS"
cp "$WORK/build.log" "$LOGS/"
# Python is not sanitized: libasan must be loaded first, and libstdc++ with it, or ASan cannot find
# the real __cxa_throw when the module throws (python does not link libstdc++).
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so.6)"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
ASAN_BASE="detect_leaks=0:abort_on_error=1:symbolize=1"
REPORTS='ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer|AddressSanitizer: CHECK failed'

run_pytest() {  # $1: log name, $2: extra ASAN_OPTIONS, rest: pytest args
  local log=$1 extra=$2
  shift 2
  (cd "$TREE" && ASAN_OPTIONS="$ASAN_BASE:log_path=$LOGS/asan$extra" \
    "$VENV/bin/python" -m pytest -q -o cache_dir="$WORK/cache" "$@") > "$LOGS/$log" 2>&1
}

echo "== pass 1: $(echo $TESTS | wc -w) test files under ASan + UBSan"
# shellcheck disable=SC2086
run_pytest pass1.log "" $TESTS "$@"
PASS1=$?
tail -3 "$LOGS/pass1.log"
status=0
reports=$(cat "$LOGS"/asan* 2>/dev/null; grep -E "$REPORTS" "$LOGS/pass1.log")
if [ "$PASS1" -ne 0 ]; then
  # Tests that cap their address space (tests/isolated.py limit_memory) run out of it under ASan's
  # quarantine of freed memory, an artefact of the sanitizer. Out-of-memory reports alone: the failed
  # tests run again without the quarantine and must pass cleanly.
  if [ -n "$reports" ] && ! echo "$reports" | grep -E "$REPORTS" | grep -qv "allocator is out of memory" \
      && ! grep -q "runtime error:" "$LOGS/pass1.log"; then
    echo "== pass 2: the failed tests again without ASan's quarantine (address-space-limited tests)"
    mkdir -p "$LOGS/pass2" && mv "$LOGS"/asan* "$LOGS/pass2/" 2>/dev/null
    run_pytest pass2.log ":quarantine_size_mb=0" --lf $TESTS "$@"
    PASS2=$?
    tail -3 "$LOGS/pass2.log"
    if [ "$PASS2" -ne 0 ] || ls "$LOGS"/asan* >/dev/null 2>&1 || grep -qE "$REPORTS" "$LOGS/pass2.log"; then
      status=1
    fi
  else
    status=1
  fi
elif [ -n "$reports" ]; then
  status=1  # a report in a child process whose failure a test tolerated
fi

END=$(date +%s)
echo "== cpu_sanitize summary"
echo "build $((BUILT - START)) s, tests $((END - BUILT)) s; logs in $LOGS"
grep -hE "$REPORTS" "$LOGS"/*.log "$LOGS"/asan* 2>/dev/null | sort | uniq -c | head -20
if [ "$status" -ne 0 ]; then
  echo "cpu_sanitize: FAILED (sanitizer report or failed test; see $LOGS)"
else
  echo "cpu_sanitize: OK, no sanitizer report"
fi
exit $status
