#!/usr/bin/env bash
# Fetch, HERE (a machine with network), the wheels that benchmarks/gpu_check.sh installs on the GPU
# machine, which has no network. That machine's image already holds torch, cupy, numpy, scipy, pytest,
# pytest-benchmark, hypothesis, onnx(runtime/script), opencv, Pillow, safetensors, PyYAML, tqdm,
# matplotlib and scikit-learn; what pneumoseg's deps and tests need beyond them is listed below.
# Python 3.12, x86-64 manylinux; a few MB, carried as `.whl` (git-ignored) with the device tool.
#
#   bash benchmarks/gpu_wheels.sh      # from the repo root; then carry: [".whl"]
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"

# Versions pinned to what the dev venv tests with; one version of each (two stop the install there).
WHEELS=(
  pydicom==3.0.2      # core dependency (DICOM reading; imported lazily by the data layer and its tests)
  pycocotools==2.0.11 # tests' second opinion for RLE
)

grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
for spec in "${WHEELS[@]}"; do
  name=${spec%%==*}
  if ls .whl/ | grep -qi "^${name//-/_}-${spec##*==}-"; then
    continue
  fi
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "$spec"
done
ls -l .whl
du -sh .whl
