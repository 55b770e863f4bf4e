#!/usr/bin/env bash
# Coverage-guided fuzzing of the torch-free CPU core (csrc/rle, csrc/postprocess, csrc/loss) with
# libFuzzer + AddressSanitizer + UBSan, in one command:
#   bash fuzz/run.sh [seconds per harness, default 60] [harness ...]
# Harnesses: rle_decode rle_encode components loss (all by default); each checks the core against a
# reference written in the harness, and counts as a finding any sanitizer report, any exception
# other than the core's InputError (bad input, a clear error), and any disagreement (see
# fuzz/fuzz_util.h). Needs clang with libFuzzer (Debian 12: apt-get install clang-14
# libclang-rt-14-dev); no Python, no torch, and the installed extension is left alone.
# The corpora grow in FUZZ_WORK (default /tmp/pneumoseg-fuzz-$USER), seeded from fuzz/corpus/
# (regenerate those with python3 fuzz/seeds.py); crashes are written there as crash-<harness>-*.
# Reproduce one: fuzz/build/fuzz_<harness> <crash file>  (FUZZ_DEBUG=1 prints the loss's inputs).
# Not part of CI: it needs clang, and a useful run takes minutes per harness. One fuzzing process at
# a time, in the foreground (libFuzzer's default; -jobs=1 -workers=1 would use the same one core but
# from a child process logging to ./fuzz-0.log): the machines this runs on are shared.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SECONDS_EACH=${1:-60}
shift || true
HARNESSES=${*:-"rle_decode rle_encode components loss"}
WORK=${FUZZ_WORK:-/tmp/pneumoseg-fuzz-${USER:-$(id -u)}}

make -C "$HERE" -j2 --no-print-directory >"$WORK.build.log" 2>&1 || { cat "$WORK.build.log"; echo "fuzz: build failed"; exit 1; }
mkdir -p "$WORK"

status=0
for h in $HARNESSES; do
  corpus=$WORK/corpus/$h
  mkdir -p "$corpus"
  dict=()
  [ -f "$HERE/$h.dict" ] && dict=(-dict="$HERE/$h.dict")
  echo "== $h: ${SECONDS_EACH}s"
  # -rss_limit_mb: ASan's quarantine plus the references' vectors stay far below this; more means a leak.
  "$HERE/build/fuzz_$h" "$corpus" "$HERE/corpus/$h" "${dict[@]}" -max_total_time="$SECONDS_EACH" \
    -rss_limit_mb=2048 -max_len=4096 -print_final_stats=1 -artifact_prefix="$WORK/crash-$h-" \
    >"$WORK/$h.log" 2>&1
  rc=$?
  if [ "$h" = loss ] && [ $rc -eq 0 ]; then
    # The AVX2 loops ran (on a CPU that has them); the baseline loops get every input found, replayed.
    PNEUMOSEG_DISABLE_AVX2=1 "$HERE/build/fuzz_loss" -runs=0 "$corpus" "$HERE/corpus/$h" \
      -artifact_prefix="$WORK/crash-$h-baseline-" >"$WORK/$h-baseline.log" 2>&1 || { rc=1; cat "$WORK/$h-baseline.log" >>"$WORK/$h.log"; }
  fi
  grep -E "^#[0-9]+[[:space:]]+DONE|stat::number_of_executed_units|stat::new_units_added" "$WORK/$h.log" | sed 's/^/   /'
  if [ $rc -ne 0 ]; then
    status=1
    grep -m3 -E "FUZZ FINDING|ERROR: AddressSanitizer|runtime error:|ERROR: libFuzzer" "$WORK/$h.log" | sed 's/^/   /'
    grep -m1 "Test unit written to" "$WORK/$h.log" | sed 's/^/   /'
  fi
done
if [ $status -ne 0 ]; then
  echo "fuzz: FINDINGS (logs and crash files in $WORK)"
else
  echo "fuzz: OK, no finding (logs in $WORK)"
fi
exit $status
