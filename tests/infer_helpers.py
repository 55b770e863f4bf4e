"""Small model directories for the inference, export and CLI tests (and the pipeline benchmark),
built once per process and copied where a test changes them, plus an independent reference of the
two-stage pipeline written from its definition."""

from __future__ import annotations

import atexit
import functools
import hashlib
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from reference import ref_encode, ref_remove_small, ref_triplet

_ROOT = Path(tempfile.mkdtemp(prefix="pneumoseg-infer-tests-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)

#: segmenter input size of the tiny model directories
SIZE = 64
#: the thresholds they are saved with
THRESHOLDS = {"gate": 0.5, "top": 0.6, "min_area": 20, "bottom": 0.45, "min_component_area": 4}
KINDS = ("classifier", "aux", "plain")


def _sharpen(module, factor: float) -> None:
    """Scale a final layer so random-weight outputs spread over both sides of the thresholds (a
    freshly initialised head gives logits near 0: every pixel would sit on the same side)."""
    import torch

    with torch.no_grad():
        module.weight.mul_(factor)
        if module.bias is not None:
            module.bias.zero_()


def tiny_networks(kind: str, seed: int = 0) -> dict:
    """``kind``: "classifier" (classifier + plain segmenter, classifier at 96x96), "aux" (one segmenter
    with a classification head) or "plain" (a segmenter alone, no gate)."""
    import torch

    from pneumoseg.models import create_classifier, create_segmenter

    torch.manual_seed(seed)
    seg = create_segmenter("unet", "resnet_tiny", in_channels=1, decoder_channels=(16, 16, 8, 8, 8),
                           aux_classifier=kind == "aux")
    networks = {"segmenter": seg}
    if kind == "classifier":
        networks["classifier"] = create_classifier("resnet_tiny", num_classes=1, in_channels=1)
    for net in networks.values():  # give the batch norms real statistics
        net.train()
        with torch.no_grad():
            for _ in range(2):
                net(torch.randn(4, 1, SIZE, SIZE))
        net.eval()
    _sharpen(seg.segmentation_head[0], 40.0)
    if seg.classification_head is not None:
        _sharpen(seg.classification_head[3], 30.0)
    if "classifier" in networks:
        _sharpen(networks["classifier"].fc, 30.0)
        with torch.no_grad():  # centre its scores on the gate, so that the gate splits the test images
            networks["classifier"].fc.bias.fill_(-0.75)
    return networks


def build_in_place(target: Path, build: Callable[[Path], object]) -> Path:
    """``build(folder)`` into a fresh folder beside ``target``, renamed to ``target`` once it returns.
    A build that fails leaves nothing behind: the next test that asks builds again and shows the same
    first error, instead of a FileExistsError on a half-built folder that hid it."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-building-", dir=target.parent))
    try:
        build(staging / target.name)
        os.rename(staging / target.name, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@functools.lru_cache(maxsize=None)
def model_dir(kind: str) -> Path:
    """A model directory of ``kind`` (do not change it: copy it with :func:`copy_model_dir`)."""
    from pneumoseg.models.model_dir import save_model_dir

    def build(folder: Path) -> None:
        networks = tiny_networks(kind)
        sizes = {"segmenter": SIZE, "classifier": 96}
        save_model_dir(folder, networks, input_sizes={k: sizes[k] for k in networks}, thresholds=THRESHOLDS)

    return build_in_place(_ROOT / kind, build)


@functools.lru_cache(maxsize=None)
def exported_model_dir(kind: str) -> Path:
    """:func:`model_dir` with its fp32 ONNX parts exported (do not change it)."""
    from pneumoseg.export.onnx import export_onnx

    def build(folder: Path) -> None:
        shutil.copytree(model_dir(kind), folder)
        export_onnx(folder, "fp32", validation=phantom_images(3, seed=7))

    return build_in_place(_ROOT / f"{kind}-onnx", build)


def assert_latency_session_options(predictor, threads):
    """Every onnxruntime session of ``predictor`` runs with the latency options (pool threads that do not
    spin after a run: they would take the cores the torch pre- and post-processing needs next)."""
    for session in predictor.backend._sessions.values():
        options = session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert (options.intra_op_num_threads, options.inter_op_num_threads) == (threads, 1)


def copy_model_dir(kind: str, dest: Path, *, exported: bool = False) -> Path:
    source = exported_model_dir(kind) if exported else model_dir(kind)
    shutil.copytree(source, dest)
    return dest


def phantom_images(n: int = 6, seed: int = 0, shapes=((80, 96), (64, 64), (100, 72))) -> list[np.ndarray]:
    """Chest phantoms of assorted sizes (uint8), half with a pneumothorax."""
    from pneumoseg.data import chest_phantom

    out = []
    for i in range(n):
        h, w = shapes[i % len(shapes)]
        img, _ = chest_phantom(max(h, w), np.random.default_rng([seed, i]), bool(i % 2))
        out.append(np.ascontiguousarray(img[:h, :w]))
    return out


def file_digests(folder: Path) -> dict[str, tuple[str, int]]:
    """path -> (SHA-256, mtime_ns) of every file under ``folder``, to prove nothing was changed."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            out[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


def reference_predict(path: Path, images: list, thresholds: dict | None = None, tta: bool = False) -> list[dict]:
    """The two-stage pipeline from its definition, one image at a time, in float64 where it decides:
    preprocess -> gate score -> (if it passes) segmenter logits (with TTA the log-odds of the mean of the
    image's and the flipped image's probabilities) resized bilinearly to the image -> probabilities ->
    triplet rule and small-component removal (areas scaled from the input size) -> RLE. Independent of
    pneumoseg.infer (the networks and the resize are torch's)."""
    import torch
    import torch.nn.functional as F

    from pneumoseg.data import chest_crop, preprocess
    from pneumoseg.models.model_dir import load_model_dir

    md = load_model_dir(path)
    t = {**THRESHOLDS, **(thresholds or {})}
    seg = md.build("segmenter")
    cls = md.build("classifier") if "classifier" in md.networks else None
    size = tuple(md.networks["segmenter"].input_size)
    out = []
    with torch.no_grad():
        for img in images:
            h, w = img.shape
            x = preprocess(img, size)
            seg_out = seg(x)
            logits = seg_out[0] if isinstance(seg_out, tuple) else seg_out
            if tta:
                flipped = seg(x.flip(-1))
                mirrored = (flipped[0] if isinstance(flipped, tuple) else flipped).flip(-1)
                probs_small = (torch.sigmoid(logits.double()) + torch.sigmoid(mirrored.double())) / 2
            else:
                probs_small = torch.sigmoid(logits.double())
            if cls is not None:
                cls_size = tuple(md.networks["classifier"].input_size)
                xc = preprocess(img, cls_size)
                if md.networks["classifier"].crop == "chest":  # the chest's box, resized back to the input size
                    r0, r1, c0, c1 = chest_crop(xc[0, 0].numpy())
                    xc = F.interpolate(xc[:, :, r0:r1, c0:c1], size=cls_size, mode="bilinear", align_corners=False,
                                       antialias=True)
                score = float(torch.sigmoid(cls(xc).double()))
            elif isinstance(seg_out, tuple):
                score = float(torch.sigmoid(seg_out[1].double()))
            else:
                score = float(probs_small.max())
            gated_out = (cls is not None or isinstance(seg_out, tuple)) and score < t["gate"]
            scale = h * w / (size[0] * size[1])
            if gated_out:
                mask = np.zeros((h, w), np.uint8)
            else:
                # TTA's mean probability is resized as log-odds, as the logits are without TTA;
                # log(p / (1 - p)) takes 1 - p from the sigmoids of -logits (p rounds to 1 past ~37)
                if tta:
                    rest = (torch.sigmoid(-logits.double()) + torch.sigmoid(-mirrored.double())) / 2
                    small = (torch.log(probs_small) - torch.log(rest)).float()
                else:
                    small = logits
                up = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
                probs = torch.sigmoid(up.double())
                p = probs[0, 0].double().numpy()
                mask = ref_triplet(p[None], t["top"], int(round(t["min_area"] * scale)), t["bottom"])
                mask = ref_remove_small(mask, int(round(t["min_component_area"] * scale)), 8)[0]
            out.append({"score": score, "mask": mask, "rle": ref_encode(mask), "gated_out": gated_out})
    return out


def logit(p: float) -> float:
    return math.log(p / (1 - p))
