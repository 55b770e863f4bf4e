"""README.md and docs/*.md as a newcomer reads them: their Python examples run as printed (on tiny
inputs where the page leaves the arrays to the reader), every option they give a `pneumoseg` command
exists, and every script, test or results file they name is in the tree. A renamed option, function or
file fails here instead of in a user's first minutes. An example is found by its section's heading on
whichever page holds it (tests/doc_pages.py)."""

from __future__ import annotations

import re

import numpy as np
import pytest

import pneumoseg
from doc_pages import PAGES, ROOT, TEXT, section


def _code_blocks(heading: str, language: str) -> list[str]:
    """The ```language blocks of the ``## `` section whose title starts with ``heading``."""
    return re.findall(rf"^```{language}\n(.*?)^```", section(heading), flags=re.MULTILINE | re.DOTALL)


def _run_python(heading: str, namespace: dict, index: int = 0) -> dict:
    blocks = _code_blocks(heading, "python")
    assert blocks, f"section {heading!r} shows no Python"
    page = next(p for p, text in PAGES.items() if blocks[index] in text)
    exec(compile(blocks[index], f"{page} ({heading})", "exec"), namespace)  # noqa: S102 (our own docs)
    return namespace


# --- the Python examples ----------------------------------------------------------------------------


def test_rle_example_runs_and_prints_what_its_comments_say():
    ns = _run_python("SIIM-ACR run-length encoding", {})
    assert ns["text"].startswith("205100 120 904 120 ")
    assert ns["union"].shape == (1024, 1024) and ns["batch"].shape == (2, 1024, 1024)
    assert ns["strings"] == [ns["text"]] * 2
    assert ns["rle"].encode(np.zeros((4, 4), np.uint8)) == "-1"


def test_metrics_example_runs():
    rng = np.random.default_rng(0)
    probs = rng.random((3, 32, 32)).astype(np.float32)
    truths = (rng.random((3, 32, 32)) > 0.8).astype(np.uint8)
    truths[0] = 0
    ns = _run_python("Metrics", {"probs": probs, "truths": truths,
                                 "labels": np.array([0, 1, 1, 0]), "scores": np.array([0.1, 0.8, 0.4, 0.3])})
    assert ns["masks"].shape == probs.shape
    assert ns["metrics"].dice_per_image(probs, truths, threshold=0.5).shape == (3,)


def test_postprocess_example_runs():
    rng = np.random.default_rng(1)
    ns = _run_python("Mask post-processing", {
        "mask": (rng.random((48, 40)) > 0.7).astype(np.uint8),
        "probs": rng.random((2, 48, 40)).astype(np.float32),
        "logits": rng.normal(size=(2, 48, 40)).astype(np.float32),
        "classifier_scores": np.array([0.2, 0.9], np.float32),
    })
    assert isinstance(ns["strings"], list) and len(ns["strings"]) == 2


def test_loss_example_runs_and_gives_one_scalar_with_per_image():
    torch = pytest.importorskip("torch")
    logits = torch.randn(2, 1, 16, 16, requires_grad=True)
    ns = _run_python("Fused segmentation loss", {"logits": logits, "masks": (torch.rand(2, 1, 16, 16) > 0.5).float()})
    assert ns["loss"].shape == ()  # README: one scalar, per_image=True or not
    assert logits.grad is not None and logits.grad.shape == logits.shape


@pytest.mark.slow
def test_model_directory_example_runs(tmp_path, monkeypatch):
    """Packaging a network trained elsewhere: an smp-style U-Net checkpoint (same keys) loads strictly."""
    pytest.importorskip("torch")
    import torch

    from pneumoseg.models import create_segmenter

    monkeypatch.chdir(tmp_path)
    torch.save(create_segmenter("unet", encoder="resnet34", aux_classifier=True).state_dict(), "my-smp-unet34.pth")
    _run_python("Packaging a network trained elsewhere", {})
    assert pneumoseg.Predictor.from_dir("my-model").describe()["gate"] == "encoder"


@pytest.mark.slow
def test_models_example_runs(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from pneumoseg.models import create_classifier

    monkeypatch.chdir(tmp_path)
    torch.save(create_classifier("resnet34", num_classes=1000).state_dict(), "resnet34-imagenet.pth")
    ns = _run_python("Models", {})
    assert ns["masks"].shape == (2, 1, 256, 256) and ns["class_logits"].shape == (2, 1)
    assert ns["result"].adapted_keys == ("conv1.weight",) and len(ns["result"].loaded_keys) > 100


# --- the command line -------------------------------------------------------------------------------


def _subparsers(parser) -> dict:
    import argparse

    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return actions[0].choices if actions else {}


def _readme_commands() -> list[str]:
    """Every `pneumoseg ...` command README.md and docs/*.md show, in code blocks (with continuation
    lines joined) and in inline code, without comments."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", TEXT, flags=re.MULTILINE | re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            commands.append(line.split(" #")[0])
    commands += re.findall(r"`([^`\n]*pneumoseg [^`\n]*)`", TEXT)
    found = []
    for text in commands:
        match = re.search(r"(?:^|\s|-m )pneumoseg ([a-z].*)", text)
        if match:
            found.append(match.group(1))
    return found


def test_readme_command_table_lists_exactly_the_commands():
    from pneumoseg.cli import build_parser

    table = set(re.findall(r"^\| `pneumoseg ([a-z]+)", section("Command line"), flags=re.MULTILINE))
    assert table == set(_subparsers(build_parser()))


def test_every_option_readme_gives_a_command_exists():
    from pneumoseg.cli import build_parser

    commands = _subparsers(build_parser())
    checked = 0
    for text in _readme_commands():
        words = text.split()
        parser = commands.get(words[0])
        if parser is None:  # `pneumoseg COMMAND --help`, `pneumoseg.json` ...
            continue
        sub = _subparsers(parser)
        if sub and len(words) > 1 and words[1] in sub:
            parser = sub[words[1]]
        for option in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text):
            assert option in parser._option_string_actions, f"docs: `pneumoseg {text}`: {option} does not exist"
            checked += 1
    assert checked > 40  # the parsing above still finds the pages' commands


def test_every_file_readme_names_exists():
    path = r"(?<![\w/.-])((?:benchmarks|tests|csrc|pneumoseg)/[\w./-]+\.(?:py|sh|txt|json|png|h|cuh|cu|cpp))\b"
    names = set(re.findall(path, TEXT))
    names.add(".ci/run")
    assert len(names) > 20
    missing = sorted(n for n in names if not (ROOT / n).exists())
    assert not missing, f"README.md or docs/*.md name files that are not in the tree: {missing}"


def test_every_dotted_pneumoseg_name_in_readme_resolves():
    pytest.importorskip("torch")
    import importlib

    names = set(re.findall(r"\bpneumoseg(?:\.[A-Za-z_]\w*)+", TEXT)) - {"pneumoseg.json"}
    for name in sorted(names):
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            for attr in parts[cut:]:
                assert hasattr(obj, attr), f"docs name {name}, but {attr!r} is not there"
                obj = getattr(obj, attr)
            break


def test_a_command_that_needs_torch_says_so_in_one_line_where_torch_is_missing(tmp_path):
    """README: torch is not a dependency of the core package, and a user error is one line and exit 2.
    Without torch, `pneumoseg evaluate` (and predict, demo, data cache ...) ended in a traceback. The
    command here is `data cache`, whose resizing is torch's own: evaluate needs torch only through
    pneumoseg.infer's package imports, which may become lazy."""
    import subprocess
    import sys

    (tmp_path / "images").mkdir()
    script = ("import sys; sys.modules['torch'] = None; from pneumoseg.cli import main; "
              "sys.exit(main(['data', 'cache', '--root', 'images', '--out', 'cache']))")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pneumoseg: error: ") and "torch" in lines[0], done.stderr
