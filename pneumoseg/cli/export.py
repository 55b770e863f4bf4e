"""``pneumoseg export``: ONNX parts and TensorRT engines, recorded in the model directory."""

from __future__ import annotations

import argparse
import sys

from .types import int_in, path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export a model directory to ONNX (onnxruntime) or TensorRT engines",
        description="Export every network part of a model directory, check it against torch (max-abs and the "
                    "thresholded masks' Dice) and against TensorRT's ONNX operators, and record it in the "
                    "directory with its fingerprint. int8 needs --calibrate: a folder of your own DICOMs.")
    p.add_argument("model", type=path, metavar="MODEL_DIR", help="model directory (from `pneumoseg train`)")
    p.add_argument("--format", choices=("onnx", "tensorrt"), default="onnx",
                   help="onnx (onnxruntime, CPU) or tensorrt (NVIDIA GPU engines) (default onnx)")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default=None,
                   help="onnx: fp32 (default), fp16 or int8 (onnxruntime's CPU flavour); tensorrt: fp16 (default), "
                        "fp32 or int8")
    p.add_argument("--batch", default=None, metavar="MIN,OPT,MAX",
                   help="TensorRT optimisation profile for the batch size (default 1,8,32)")
    p.add_argument("--calibrate", type=path, default=None, metavar="DIR",
                   help="DICOM folder to calibrate int8 with (and to check the export on)")
    p.add_argument("--max-calibration-images", type=int_in(1, 100_000), default=64,
                   help="at most this many --calibrate images are used (default 64)")
    p.add_argument("--device", default=None, help="CUDA device for TensorRT (default cuda)")
    p.add_argument("--engine-cache", type=path, default=None, help="engine cache folder (default MODEL_DIR/tensorrt)")
    p.set_defaults(run=run)


def _describe(meta: dict) -> str:
    v = meta.get("validation", {})
    parts = []
    if v.get("max_abs"):
        parts.append(f"max |diff| {max(v['max_abs'].values()):.2e}")
    if "mask_dice" in v:
        parts.append(f"mask Dice {v['mask_dice']:.4f}")
    if "score_max_abs" in v:
        parts.append(f"score max |diff| {v['score_max_abs']:.2e}")
    return ", ".join(parts)


def run(args: argparse.Namespace) -> int:
    from ..errors import InvalidInputError
    from ..models.model_dir import load_model_dir

    md = load_model_dir(args.model)
    if args.format == "onnx":
        from ..export.onnx import export_onnx

        if args.batch is not None:
            raise InvalidInputError("--batch applies to --format tensorrt (ONNX graphs take any batch)")
        for option, value in (("--device", args.device), ("--engine-cache", args.engine_cache)):
            if value is not None:
                raise InvalidInputError(f"{option} applies to --format tensorrt (ONNX export runs on the CPU)")
        precision = args.precision or "fp32"
        if precision == "int8" and args.calibrate is None:
            raise InvalidInputError("--precision int8 needs --calibrate DIR (a folder of your own DICOMs)")
        written = export_onnx(md, precision, calibrate=args.calibrate,
                              max_calibration_images=args.max_calibration_images)
        key = lambda part: f"{part}-onnx-{precision}"  # noqa: E731
    else:
        from ..export.tensorrt import export_tensorrt, parse_batch_profile, tensorrt_artefact_key

        profile = parse_batch_profile(args.batch)  # a typo is named here, not hidden behind a missing TensorRT
        precision = args.precision or "fp16"
        if precision == "int8" and args.calibrate is None and not any(
                k.endswith("-onnx-int8-symmetric") for k in md.artefacts):
            raise InvalidInputError("--precision int8 needs --calibrate DIR (a folder of your own DICOMs)")
        written = export_tensorrt(md, precision, batch=profile, calibrate=args.calibrate, device=args.device or "cuda",
                                  engine_cache=args.engine_cache)
        key = lambda part: tensorrt_artefact_key(part, precision)  # noqa: E731
    md = load_model_dir(args.model)
    for part, file in written.items():
        art = md.artefacts.get(key(part))
        detail = f" ({_describe(art.meta)})" if art is not None else ""
        print(f"{part}: {file}{detail}")
    if args.format == "onnx" and precision == "int8" and "classifier" in md.networks and "classifier" not in written:
        print("classifier: kept in fp32 (its int8 graph was not faster on this CPU)", file=sys.stderr)
    return 0
