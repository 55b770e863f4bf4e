#!/usr/bin/env bash
# The core install's two promises, which CI's main venv (Python 3.11 with torch) cannot see broken:
# pyproject's requires-python floor (3.10), and "the core needs no torch": `import pneumoseg`, the data
# and evaluation commands and their tests run with the required dependencies only. A fresh venv without
# torch and without CUDA runs the non-slow suite there; the tests that need torch skip.
# Also runs alone, from a clone's root or anywhere: bash .ci/core_py310.sh
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

echo
echo "=== core install: Python 3.10 (the floor), no torch, no CUDA ==="

# python3.10 on PATH may be a pyenv shim that exits 127 when 3.10 is not selected: ask each candidate.
is_py310() { "$1" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info[:2] != (3, 10))' 2>/dev/null; }
python=""
for candidate in "$(command -v python3.10 || true)" $(ls -d /root/.pyenv/versions/3.10*/bin/python3.10 2>/dev/null | sort -rV); do
  if [ -n "$candidate" ] && is_py310 "$candidate"; then python=$candidate; break; fi
done
if [ -z "$python" ]; then
  # The torch-free promise is still worth checking on the Python the rest of CI uses.
  python=python3
  echo "no Python 3.10 found: checking the torch-free install on $($python -V 2>&1) instead"
fi
echo "using $python ($($python -V 2>&1))"

work=$(mktemp -d "${TMPDIR:-/tmp}/core-py310.XXXXXX")
trap 'rm -rf "$work"' EXIT
"$python" -m venv "$work/venv"
venv_python="$work/venv/bin/python"
"$venv_python" -m pip install -q --upgrade pip
# Editable, as the main venv (tests start subprocesses from the clone's root); the build folder is
# this script's, so the clone's build/ and the main venv's build stay as they were.
PNEUMOSEG_CUDA=OFF "$venv_python" -m pip install -q -Cbuild-dir="$work/build" -e .

# Nothing may bring torch in: the checks would then test the torch install, not the core.
no_torch() {
  local installed
  installed=$("$venv_python" -m pip list --format=freeze)  # a failing pip fails the step, not passes it
  if grep -iE '^torch==' <<<"$installed"; then
    echo "FAIL: torch is installed in the core venv ($1 pulled it in)" >&2
    exit 1
  fi
}
no_torch "pneumoseg's required dependencies"

# The core as a user gets it, before any test dependency is there.
cd "$work"  # the installed package, not a folder that happens to be named pneumoseg
"$venv_python" -c "import pneumoseg, sys; assert 'torch' not in sys.modules, 'import pneumoseg loaded torch'"
"$venv_python" -c "import pneumoseg._native as n; assert not n._C.built_with_cuda(), 'PNEUMOSEG_CUDA=OFF built CUDA'"
# A torch-free command from the console script to its report: a perfect submission scores Dice 1.
"$work/venv/bin/pneumoseg" data synth --out "$work/synth" --n 8 --size 64 --no-progress
"$work/venv/bin/pneumoseg" evaluate --pred "$work/synth/train-rle.csv" --truth "$work/synth/train-rle.csv" \
  --bootstrap 50 --out "$work/eval"
"$venv_python" -c "import json, sys; d = json.load(open(sys.argv[1]))['kaggle_dice']; assert d == 1.0, d" \
  "$work/eval/metrics.json"

# The dev extra's packages that the torch-free tests use. Left out, their tests skip: onnx, onnxscript and
# onnxruntime (export and its backend need torch; a handful of their import and metadata tests run in the
# main venv), and what only the benchmarks and the main venv's type check use (opencv, pycocotools,
# pytest-benchmark, mypy). On Python 3.10 pytest brings tomli, which test_dependency_floors reads pyproject with.
"$venv_python" -m pip install -q "pytest>=7.4" "hypothesis>=6.90" "scipy>=1.10" "scikit-learn>=1.3" \
  "matplotlib>=3.7" "highdicom>=0.24" "pynetdicom>=3.0" "pyflakes>=3" "scikit-build-core>=0.10" "pybind11>=2.12"
no_torch "the test dependencies"

cd "$repo"
"$venv_python" -m pytest -p no:cacheprovider -q -m "not slow"
echo "=== core install: passed on $($python -V 2>&1) in ${SECONDS} s ==="
