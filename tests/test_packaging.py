"""What a user gets from the sdist and the wheel, not from this checkout's editable install: the sdist
carries every source the build and the package need (and no build output), the wheel built from that
sdist carries every package file and the native module and runs from outside the tree, the native
module needs neither libcudart nor libtorch, and a command that needs an optional extra says which
before it does any work.

The sdist is built by calling scikit-build-core (the build backend, in the dev extra) directly, so the
`build` front end is not needed; the wheel test builds CPU-only and is marked slow (~75 s on 2 cores).
"""

from __future__ import annotations

import email
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import pneumoseg

ROOT = Path(__file__).resolve().parents[1]
# What the build reads (CMake and the C++/CUDA sources) and what the package reads at run time
# (pneumoseg/**, its YAML recipes included): a tracked file here missing from the sdist breaks
# `pip install pneumoseg-X.tar.gz` or the installed package, never the editable install.
BUILD_FILES = ("CMakeLists.txt", "pyproject.toml", "README.md")
BUILD_FOLDERS = ("csrc/", "pneumoseg/")
# README (the sdist's long description) links into docs/ for its reference: the pages go with it.
DOC_FOLDERS = ("docs/",)
# Build outputs, virtual environments and caches a developer's tree holds (.gitignore keeps them out).
NOT_SHIPPED = re.compile(r"(^|/)(build|dist|\.venv|\.ci-venv|\.git|__pycache__|\.pytest_cache|\.hypothesis)/"
                         r"|\.(so|pyc|o)$|\.egg-info(/|$)")


def _tracked_files() -> list[str]:
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: no list of the project's files to compare with")
    listing = subprocess.run([git, "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    # a file deleted in the work tree but not yet from the index cannot be packaged, and is not expected to be
    return sorted(p for p in listing.decode().split("\0") if p and (ROOT / p).is_file())


def _backend(call: str, out: Path, cwd: Path, settings: dict[str, str] | None = None) -> Path:
    """Run scikit-build-core's PEP 517 hook `call` in a child process (it changes directory and reads
    the environment) and return the file it wrote into `out`."""
    if importlib.util.find_spec("scikit_build_core") is None:
        pytest.skip("scikit-build-core is not installed (it comes with the dev extra)")
    out.mkdir(parents=True, exist_ok=True)
    code = (f"import sys; from scikit_build_core.build import {call}; "
            f"print({call}(sys.argv[1], config_settings={settings or {}!r}))")
    env = {k: v for k, v in os.environ.items() if k != "PNEUMOSEG_CUDA"}  # the settings decide
    done = subprocess.run([sys.executable, "-c", code, str(out)], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{call} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return out / done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    return _backend("build_sdist", tmp_path_factory.mktemp("sdist"), ROOT)


def _sdist_names(path: Path) -> set[str]:
    with tarfile.open(path) as tar:
        top = f"pneumoseg-{pneumoseg.__version__}/"
        names = {m.name for m in tar.getmembers() if m.isfile()}
    assert all(n.startswith(top) for n in names), f"sdist entries outside {top}"
    return {n[len(top):] for n in names}


def test_sdist_carries_every_build_source_and_package_file(sdist):
    tracked = _tracked_files()
    needed = {p for p in tracked if p in BUILD_FILES or p.startswith(BUILD_FOLDERS + DOC_FOLDERS)}
    assert any(p.endswith(".yaml") for p in needed), "no packaged recipe found: the comparison would prove little"
    names = _sdist_names(sdist)
    assert sorted(needed - names) == []
    assert "PKG-INFO" in names


def test_sdist_carries_the_typed_marker(sdist):
    # PEP 561: without pneumoseg/py.typed, users' type checkers ignore the installed package's annotations
    assert "pneumoseg/py.typed" in _sdist_names(sdist)


def test_sdist_leaves_out_build_outputs_and_environments(sdist):
    assert sorted(n for n in _sdist_names(sdist) if NOT_SHIPPED.search(n)) == []


def test_sdist_metadata_carries_the_package_version_and_extras(sdist):
    with tarfile.open(sdist) as tar:
        info = email.message_from_bytes(tar.extractfile(f"pneumoseg-{pneumoseg.__version__}/PKG-INFO").read())
    assert info["Version"] == pneumoseg.__version__
    assert info["Requires-Python"]
    # the extras README and the command line's messages name
    assert {"onnx", "train", "tensorrt", "cuda", "dicom-codecs", "pacs", "dev"} <= set(info.get_all("Provides-Extra"))
    # the kernels are built with CUDA 13 (README: driver 580+): CuPy for another major looks for
    # libraries a CUDA 13 environment does not have
    cupy = [r for r in info.get_all("Requires-Dist") if r.replace("'", '"').endswith('extra == "cuda"')]
    assert cupy and all(r.startswith("cupy-cuda13x") for r in cupy), cupy
    # `pneumoseg listen` and `predict --dicom-seg` name the pacs extra: it brings both DICOM libraries
    pacs = {re.split(r"[<>=!~ ;]", r, maxsplit=1)[0] for r in info.get_all("Requires-Dist")
            if r.replace("'", '"').endswith('extra == "pacs"')}
    assert pacs == {"highdicom", "pynetdicom"}, pacs


@pytest.mark.slow
def test_wheel_built_from_sdist_runs_outside_the_tree(sdist, tmp_path):
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not on PATH")
    with tarfile.open(sdist) as tar:
        # the "data" filter (Python 3.10.12+, 3.11.4+) refuses links and paths out of the folder
        tar.extractall(tmp_path / "src", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    source = tmp_path / "src" / f"pneumoseg-{pneumoseg.__version__}"
    wheel = _backend("build_wheel", tmp_path / "wheel", source, {"cmake.define.PNEUMOSEG_CUDA": "OFF"})

    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        dist_info = f"pneumoseg-{pneumoseg.__version__}.dist-info/"
        metadata = email.message_from_bytes(zf.read(dist_info + "METADATA"))
        entry_points = zf.read(dist_info + "entry_points.txt").decode()
        zf.extractall(tmp_path / "site")
    package_files = {p for p in _tracked_files() if p.startswith("pneumoseg/")}
    assert sorted(package_files - names) == []
    assert len([n for n in names if re.fullmatch(r"pneumoseg/_C\..*\.so", n)]) == 1
    assert "pneumoseg/py.typed" in names  # PEP 561, as in the sdist
    assert metadata["Version"] == pneumoseg.__version__
    assert "pneumoseg = pneumoseg.cli:main" in entry_points

    # Import the unpacked wheel, not this checkout: the editable install's finder is dropped and the
    # child runs in an empty folder; the recipes are read through importlib.resources from the wheel.
    site = tmp_path / "site"
    code = ("import sys; "
            "sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith('_editable')]; "
            f"sys.path.insert(0, {str(site)!r}); "
            "import pneumoseg, pneumoseg._native as n; from pneumoseg.train import list_recipes, load_recipe; "
            "names = sorted(list_recipes()); [load_recipe(x) for x in names]; "
            "print(pneumoseg.__file__); print(n._C.built_with_cuda()); print(' '.join(names))")
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    done = subprocess.run([sys.executable, "-c", code], cwd=empty, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    where, built_with_cuda, recipes = done.stdout.strip().splitlines()
    assert Path(where).is_relative_to(site)
    assert built_with_cuda == "False"
    assert recipes.split() == sorted(Path(p).stem for p in package_files if p.startswith("pneumoseg/train/recipes/"))


def test_native_module_needs_neither_cudart_nor_torch():
    """cudart is linked statically and the core knows no torch (README, Building): a shared libcudart or
    libtorch dependency would tie the extension to one CUDA or torch installation."""
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf is not on PATH")
    from pneumoseg import _native

    dynamic = subprocess.run([readelf, "-d", _native._C.__file__], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic)
    assert needed, "readelf listed no NEEDED entries: the pattern no longer matches its output"
    assert [n for n in needed if re.match(r"lib(cudart|torch|c10|cuda)", n)] == []


# What a manylinux wheel may take from the system: the C and C++ runtime (PEP 600's policies list these;
# libpthread, libdl and librt are parts of libc since glibc 2.34). Any other NEEDED library (libgomp,
# libcuda, a shared cudart) is one `auditwheel repair` would copy into every wheel, or one a user lacks.
MANYLINUX_SYSTEM_LIBS = re.compile(
    r"(libc|libm|libstdc\+\+|libgcc_s|libpthread|libdl|librt|ld-linux-x86-64|ld-linux-aarch64)\.so\.\d+")


def test_native_module_needs_only_the_c_and_cxx_runtime():
    """tools/build_wheels.sh's check, on this build: a wheel of it needs no library grafted, and the
    import needs no NVIDIA driver (cudart, static, opens libcuda at the first CUDA call)."""
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf is not on PATH")
    from pneumoseg import _native

    dynamic = subprocess.run([readelf, "-d", _native._C.__file__], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic)
    assert "libc.so.6" in needed, f"readelf's NEEDED list is not what this test expects: {needed}"
    assert [n for n in needed if not MANYLINUX_SYSTEM_LIBS.fullmatch(n)] == []


def test_release_cuda_architectures_are_ones_this_nvcc_builds():
    """The release default of tools/build_wheels.sh against `nvcc --list-gpu-arch`: an nvcc that drops
    an architecture (CUDA 13 dropped sm_50..sm_72) fails the release build after its first minutes."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH")
    script = (ROOT / "tools" / "build_wheels.sh").read_text(encoding="utf-8")
    archs = re.search(r'PNEUMOSEG_CUDA_ARCHS:-"([^"]+)"', script).group(1).split(";")
    known = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, check=True).stdout.split()
    assert len(archs) > 3 and "compute_90" in known, (archs, known)
    assert [a for a in archs if f"compute_{re.match(r'[0-9]+', a).group()}" not in known] == []


def test_demo_without_the_onnx_extra_stops_before_any_work(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    from pneumoseg.cli import main

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 2
    assert "pip install 'pneumoseg[onnx]'" in capsys.readouterr().err
    assert not out.exists()  # no study written, no minute of training spent
