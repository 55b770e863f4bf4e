"""ONNX export of a model directory's network parts, checked before it is recorded.

``torch.onnx.export(dynamo=True)`` at a pinned opset, with only the batch dimension dynamic (height
and width are the network's input size). Each graph is then

1. checked with ``onnx.checker`` (full check, with shape inference);
2. checked op by op against the operators TensorRT's ONNX parser supports (the same file must serve
   onnxruntime on a CPU and TensorRT on a GPU; preprocessing, with its antialiased resize, stays
   outside every graph, and no ``Resize`` inside may be antialiased);
3. run in onnxruntime on real-looking images (the user's calibration images, else synthetic chest
   phantoms) and compared with torch: the largest absolute difference of every output, and the Dice
   of the masks the two give at the model's thresholds (a small logit error can still flip pixels);

and only then written into the model directory as an artefact with its SHA-256 and these figures.
Every graph also records in its ``metadata_props`` the network it was exported from (the weights'
SHA-256 and the construction arguments, :mod:`pneumoseg.export.provenance`), which the backends check
before they run it.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .._checks import check_choice, check_int
from .._onnxruntime import import_onnxruntime
from .._optional import import_optional
from ..errors import InvalidInputError, PneumosegError
from .parts import part_module, part_spec, parts_for
from .provenance import record_source
from .sessions import session_options

__all__ = ["OPSET", "TENSORRT_ONNX_OPS", "ExportCheckError", "export_onnx", "check_tensorrt_ops", "export_part",
           "validation_images", "load_for_export", "onnx_key", "ONNX_PRECISIONS"]

#: the opset every graph is exported at: onnxruntime, TensorRT 8.6-11 and Jetson's TensorRT 10 read it
OPSET = 18
ONNX_PRECISIONS = ("fp32", "fp16", "int8", "int8-symmetric")

#: ONNX operators (default domain) TensorRT's ONNX parser supports, from onnx-tensorrt's operator
#: matrix (TensorRT 10), limited to the plain tensor operators a CNN export can produce.
TENSORRT_ONNX_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil Celu Clip
Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div Dropout Einsum
Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gemm GlobalAveragePool GlobalLpPool
GlobalMaxPool Greater GreaterOrEqual HardSigmoid HardSwish Identity InstanceNormalization LayerNormalization
LeakyRelu Less LessOrEqual Log LogSoftmax LpNormalization LpPool LRN MatMul Max MaxPool Mean Min Mish Mul Neg Not Or
Pad Pow PRelu QuantizeLinear Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean
ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize Round Selu Shape Shrink Sigmoid Sign Sin Sinh
Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK
Transpose Unsqueeze Where Xor
""".split())

# Largest batch the exported graphs declare (only the batch dimension is dynamic).
_MAX_BATCH = 4096


class ExportCheckError(PneumosegError, ValueError):
    """An exported graph failed a check (checker, TensorRT operator list, or agreement with torch)."""


def onnx_key(part: str, precision: str) -> str:
    return f"{part}-onnx-{precision}"


def _require_onnx() -> Any:
    """The onnx module, with onnxruntime and onnxscript importable too, or an InvalidInputError naming
    the first that is missing or fails to load."""
    install = "pip install 'pneumoseg[onnx]' (onnx, onnxscript and onnxruntime)"
    # onnxruntime first: torch.onnx and onnxscript import it too, and pneumoseg must import it (telemetry
    # off) before they do
    import_optional("onnxruntime", needed_for="ONNX export", install=install, load=import_onnxruntime)
    onnx = import_optional("onnx", needed_for="ONNX export", install=install)
    import_optional("onnxscript", needed_for="ONNX export", install=install)
    return onnx


@contextlib.contextmanager
def _quiet() -> Any:
    """torch.onnx prints progress and warns about things that are not ours (torchvision absent,
    deprecated pytree names); keep it out of the user's terminal and the warnings-as-errors tests."""
    out = io.StringIO()
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch._export", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(out):
            warnings.simplefilter("ignore")
            yield out
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def load_for_export(model_dir: Any) -> Any:
    from ..models.model_dir import ModelDir, load_model_dir

    return model_dir if isinstance(model_dir, ModelDir) else load_model_dir(model_dir)


def check_tensorrt_ops(model: Any, where: str) -> dict[str, int]:
    """Op type -> count of an ONNX ``ModelProto``; :class:`ExportCheckError` naming any operator outside
    :data:`TENSORRT_ONNX_OPS` (or outside the default domain), or an antialiased / cubic ``Resize``."""
    counts: dict[str, int] = {}
    bad: list[str] = []
    for node in model.graph.node:
        name = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        counts[name] = counts.get(name, 0) + 1
        if node.domain not in ("", "ai.onnx") or node.op_type not in TENSORRT_ONNX_OPS:
            bad.append(name)
        elif node.op_type == "Resize":
            attrs = {a.name: a for a in node.attribute}
            mode = attrs["mode"].s.decode() if "mode" in attrs else "nearest"
            antialias = attrs["antialias"].i if "antialias" in attrs else 0
            if antialias or mode not in ("nearest", "linear"):
                bad.append(f"Resize(mode={mode}, antialias={antialias})")
    if bad:
        raise ExportCheckError(f"{where}: operators TensorRT's ONNX parser does not take: {', '.join(sorted(set(bad)))}")
    return dict(sorted(counts.items()))


def _io_shapes(model: Any, where: str) -> dict[str, list[int]]:
    """Input name -> its static dimensions after the batch; only the batch may be symbolic."""
    shapes = {}
    for is_input, values in ((True, model.graph.input), (False, model.graph.output)):
        for value in values:
            dims = value.type.tensor_type.shape.dim
            rest = [d.dim_value if d.HasField("dim_value") else -1 for d in dims[1:]]
            if not dims or any(d < 1 for d in rest):
                raise ExportCheckError(f"{where}: {value.name} has dynamic dimensions other than the batch")
            if is_input:
                shapes[value.name] = rest
    return shapes


def validation_images(model_dir: Any, images: Optional[Sequence[Any]] = None, *, count: int = 4, seed: int = 0) -> list:
    """(H, W) images to validate and calibrate with: ``images`` as given, else ``count`` synthetic chest
    phantoms (half of them with a pneumothorax) at the segmenter's input size."""
    if images is not None:
        return list(images)
    from ..data.synthetic import chest_phantom

    h, w = model_dir.networks["segmenter"].input_size
    side = max(h, w)
    out = []
    for i in range(count):
        img, _ = chest_phantom(side, np.random.default_rng([seed, i]), bool(i % 2))
        out.append(img[:h, :w])
    return out


def _inputs_for(model_dir: Any, network: str, images: list) -> Any:
    import torch

    from ..data.transforms import crop_to_chest, preprocess

    size = tuple(model_dir.networks[network].input_size)
    prep = model_dir.preprocessing
    batch = []
    for img in images:
        x = preprocess(np.asarray(img), size)
        if (prep.mean, prep.std) != (0.5, 0.25):  # preprocess normalises with the defaults
            x = (x * 0.25 + 0.5 - prep.mean) / prep.std
        if model_dir.networks[network].crop == "chest":  # what the network sees in the Predictor
            x = crop_to_chest(x, size)
        batch.append(x)
    return torch.cat(batch, 0)


def part_inputs(model_dir: Any, networks: dict[str, Any], part: str, images: list) -> tuple:
    """The torch inputs of ``part`` for ``images``: preprocessed images, or for the decoder the
    fp32 encoder's features of them."""
    import torch

    spec = part_spec(part)
    x = _inputs_for(model_dir, spec.network, images)
    if part != "decoder":
        return (x,)
    with torch.inference_mode():
        return tuple(networks["segmenter"].encode(x))


def _torch_outputs(module: Any, inputs: tuple) -> list[np.ndarray]:
    import torch

    with torch.inference_mode():
        out = module(*inputs)
    out = out if isinstance(out, tuple) else (out,)
    return [o.float().numpy() for o in out]


def mask_agreement(reference: np.ndarray, candidate: np.ndarray, thresholds: Sequence[float]) -> float:
    """The smallest, over ``thresholds`` (probabilities), of the Dice between the pixels above the
    threshold in two logit maps (all images together; 1.0 when both are empty)."""
    worst = 1.0
    for p in thresholds:
        t = float(np.log(p / (1 - p))) if 0 < p < 1 else (np.inf if p >= 1 else -np.inf)
        a, b = reference > t, candidate > t
        total = int(a.sum()) + int(b.sum())
        dice = 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total
        worst = min(worst, dice)
    return worst


#: how far an exported graph may drift from torch fp32 (max-abs relative to the output's range, and
#: the minimum Dice of the thresholded masks)
TOLERANCES = {"fp32": (1e-3, 0.99), "fp16": (2e-2, 0.97), "int8": (None, 0.85), "int8-symmetric": (None, 0.85)}


def compare_outputs(part: str, reference: list[np.ndarray], candidate: list[np.ndarray], precision: str,
                    thresholds: Sequence[float], where: str, *, min_dice: Optional[float] = None) -> dict[str, Any]:
    """Max-abs error per output and the masks' Dice; :class:`ExportCheckError` past the tolerances."""
    spec = part_spec(part)
    rel_tol, dice_tol = TOLERANCES[precision]
    if min_dice is not None:
        dice_tol = min_dice
    report: dict[str, Any] = {"max_abs": {}}
    for name, ref, got in zip(spec.outputs, reference, candidate):
        if ref.shape != got.shape:
            raise ExportCheckError(f"{where}: output {name} has shape {got.shape}, torch gives {ref.shape}")
        if not np.isfinite(got).all():
            raise ExportCheckError(f"{where}: output {name} contains NaN or infinity")
        err = float(np.abs(ref.astype(np.float64) - got).max()) if ref.size else 0.0
        report["max_abs"][name] = err
        scale = max(1.0, float(np.abs(ref).max()) if ref.size else 1.0)
        if rel_tol is not None and err > rel_tol * scale:
            raise ExportCheckError(f"{where}: output {name} differs from torch by up to {err:.3g} (allowed "
                                   f"{rel_tol * scale:.3g} for {precision})")
    if "mask_logits" in spec.outputs:
        k = spec.outputs.index("mask_logits")
        dice = mask_agreement(reference[k], candidate[k], thresholds)
        report["mask_dice"] = dice
        if dice < dice_tol:
            raise ExportCheckError(f"{where}: its masks agree with torch's with Dice {dice:.4f} only (needed "
                                   f">= {dice_tol} for {precision})")
    if "class_logits" in spec.outputs:
        k = spec.outputs.index("class_logits")
        ref_p = 1 / (1 + np.exp(-reference[k].astype(np.float64)))
        got_p = 1 / (1 + np.exp(-candidate[k].astype(np.float64)))
        report["score_max_abs"] = float(np.abs(ref_p - got_p).max())
    return report


def _reference_path_blocks(network: Any, precision: str) -> list[Any]:
    """The decoder blocks exported as "nearest upsample, 3x3 convolution" (``Resize`` + ``Conv``) rather
    than as a sub-pixel convolution (``Conv`` + ``DepthToSpace`` + ``Slice``): in the fp32 graph, the
    blocks without skip features (the last, full-resolution one of a U-Net).

    onnxruntime's CPU convolutions work in a blocked channel layout that ``DepthToSpace`` and ``Slice``
    are not computed in, so a sub-pixel block costs two layout reorders, the interleaving of its phases
    and a crop, all at its output's size. At full resolution with few channels that costs more than
    the 5/9 of the upsampled convolution it saves: a U-Net ResNet34's decoder ran 1.10-1.12x faster
    on a 2-core x86 CPU at 512 and 1024 px, where doing the same in the next block (with skip
    features) gained nothing more. The function is the same (the export check compares the graph
    with torch's sub-pixel path); fp16 graphs (TensorRT) keep the sub-pixel form everywhere, and so do
    int8 ones: quantised, the full-resolution block ran 2-3% slower as Resize + Conv."""
    from ..models.decoders.blocks import DecoderBlock

    if precision != "fp32":
        return []
    return [m for m in network.modules() if isinstance(m, DecoderBlock) and not m.has_skip]


def export_part(model_dir: Any, networks: dict[str, Any], part: str, precision: str, images: list, *,
                min_dice: Optional[float] = None, sub_pixel_only: bool = False) -> tuple[bytes, dict[str, Any]]:
    """(ONNX bytes, meta) of one part in fp32 or fp16, checked as the module documentation says;
    ``sub_pixel_only``: every decoder block as a sub-pixel convolution (the fp32 graph to quantise)."""
    import torch

    from ..models.decoders.blocks import freeze_subpixel_weights, subpixel_decoding

    onnx = _require_onnx()
    ort = import_onnxruntime()
    spec = part_spec(part)
    network = networks[spec.network]
    where = f"{part} ({precision})"
    exported_network = copy.deepcopy(network) if precision == "fp16" else network
    module = part_module(part, exported_network, dtype=torch.float16 if precision == "fp16" else None)
    reference_module = part_module(part, network)
    inputs = part_inputs(model_dir, networks, part, images)
    example = tuple(x[:2] if x.shape[0] >= 2 else torch.cat([x, x], 0)[:2] for x in inputs)  # batch 2: not specialised
    if precision == "fp16" and part == "decoder":  # the features arrive from the fp16 encoder in half precision
        example = tuple(x.half() for x in example)
    batch = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack, _quiet() as log, torch.no_grad():  # no weight gradients: the frozen weights apply
        for block in [] if sub_pixel_only else _reference_path_blocks(exported_network, precision):
            stack.enter_context(subpixel_decoding(block, False))
        # a fixed network: the sub-pixel blocks' phase weights become plain Conv initializers, not a
        # MatMul/Reshape/Transpose chain on every weight that the optimizer leaves in the graph
        freeze_subpixel_weights(exported_network)
        try:
            program = torch.onnx.export(module, example, dynamo=True, opset_version=OPSET, input_names=list(spec.inputs),
                                        output_names=list(spec.outputs),
                                        dynamic_shapes={name: {0: batch} for name in spec.inputs}, optimize=True)
        except Exception as exc:
            raise ExportCheckError(f"{where}: torch.onnx.export failed: {type(exc).__name__}: {exc}\n{log.getvalue()[-2000:]}") from exc
        assert program is not None  # torch.onnx.export returns an ONNXProgram when dynamo=True (None otherwise)
        model = program.model_proto
    seconds = time.perf_counter() - start
    model.producer_name = "pneumoseg"
    source = record_source(model, model_dir, part, precision)  # what a backend checks before it runs the file
    data = model.SerializeToString()
    try:
        onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportCheckError(f"{where}: onnx.checker refused the graph: {exc}") from None
    ops = check_tensorrt_ops(model, where)
    input_shapes = _io_shapes(model, where)
    session = ort.InferenceSession(data, sess_options=session_options(), providers=["CPUExecutionProvider"])
    declared = {i.name: (np.float16 if i.type == "tensor(float16)" else np.float32) for i in session.get_inputs()}
    feed = {name: x.float().numpy().astype(declared[name]) for name, x in zip(spec.inputs, inputs)}  # fp16 features
    candidate = session.run(list(spec.outputs), feed)
    reference = _torch_outputs(reference_module, inputs)
    t = model_dir.thresholds
    check = compare_outputs(part, reference, candidate, precision, (t.bottom, 0.5, *(() if t.top is None else (t.top,))),
                            where, min_dice=min_dice)
    meta = {"opset": OPSET, "inputs": list(spec.inputs), "outputs": list(spec.outputs), "input_shapes": input_shapes,
            "ops": ops, "torch": torch.__version__, "export_seconds": round(seconds, 2), "source": source,
            "validation": {"images": len(images), **check}}
    return data, meta


def load_calibration_images(source: Any, max_images: int = 64) -> tuple[list, list[tuple[str, str]]]:
    """(images, skipped) from a folder of DICOMs (searched recursively, with or without the ``.dcm``
    suffix as ``pneumoseg predict`` takes them; at most ``max_images``, spread evenly over the sorted
    files) or a list of (H, W) arrays. Unreadable files are skipped and listed."""
    from ..data.dicom import read_dicom
    from ..data.siim import find_dicom_files

    max_images = check_int(max_images, "max_images", low=1, high=100_000)
    if isinstance(source, (list, tuple)):
        # a list was taken as it came: [] calibrated on nothing, strings and colour pictures went on
        # to fail deep inside the export
        if not source:
            raise InvalidInputError("calibration images: the list is empty; pass a few dozen of your own radiographs")
        images = []
        for i, item in enumerate(source[:max_images]):
            x = np.asarray(item)
            if x.ndim != 2 or x.dtype.kind not in "biuf" or 0 in x.shape:
                raise InvalidInputError(f"calibration image {i} must be a grey (H, W) array of numbers, got "
                                        f"shape {x.shape} and dtype {x.dtype}")
            images.append(x)
        return images, []
    # A PACS export names its files IM0001 ... without a suffix: find_dicoms skipped them (and refused
    # the repeated names), so a folder `pneumoseg predict` reads held "no readable DICOM images".
    found = find_dicom_files(source, require_suffix=False)
    skipped = [(str(p), reason) for p, reason in found.skipped]
    paths = sorted(found, key=str)
    if len(paths) > max_images:
        paths = [paths[int(i)] for i in np.linspace(0, len(paths) - 1, max_images)]
    images = []
    for path in paths:
        try:
            images.append(read_dicom(path, with_dataset=False).pixels)
        except (PneumosegError, OSError) as exc:
            skipped.append((str(path), str(exc)))
    if not images:
        detail = "; ".join(f"{p}: {r}" for p, r in skipped[:3])
        raise InvalidInputError(f"{source}: no readable DICOM images to calibrate with" + (f" ({detail})" if detail else ""))
    return images, skipped


def export_onnx(model_dir: Any, precision: str = "fp32", *, calibrate: Any = None, max_calibration_images: int = 64,
                validation: Optional[Sequence[Any]] = None, min_dice: Optional[float] = None) -> dict[str, Path]:
    """Export every part the model directory runs as (see :mod:`pneumoseg.export.parts`) to ONNX at
    ``precision`` and record each in the directory; returns part -> file.

    - ``"fp32"``: the onnxruntime CPU backend's and TensorRT's fp32 graphs;
    - ``"fp16"``: half-precision graphs with fp32 inputs and outputs, for TensorRT fp16 engines;
    - ``"int8"``: the segmenter statically quantised for onnxruntime (QDQ, per-channel weights,
      calibrated on ``calibrate``: a DICOM folder or a list of images); the classifier too where its
      int8 graph runs faster than its fp32 one here;
    - ``"int8-symmetric"``: the same with symmetric activations and weights (zero points 0), which is
      what TensorRT's strongly typed int8 needs.

    Each graph is checked (``onnx.checker``, TensorRT's operators, agreement with torch on
    ``validation`` images, else the ``calibrate`` images at any precision, else synthetic phantoms)
    before it is written;
    a failed check raises :class:`ExportCheckError` and writes nothing for that part.
    """
    _require_onnx()
    md = load_for_export(model_dir)
    precision = check_choice(precision, "precision", ONNX_PRECISIONS)
    parts = [p for p in parts_for(md).values() if p is not None]
    md.check_writable(*(f"onnx/{part}.{p}.onnx" for part in parts for p in dict.fromkeys(("fp32", precision))))
    networks = {name: md.build(name) for name in dict.fromkeys(part_spec(p).network for p in parts)}
    if precision.startswith("int8"):
        if calibrate is None:
            raise InvalidInputError("int8 export needs calibration images: pass calibrate=FOLDER (or --calibrate DIR), "
                                    "a few dozen of your own radiographs")
        from .quantize import export_int8

        images, _ = load_calibration_images(calibrate, max_calibration_images)
        return export_int8(md, networks, parts, images, symmetric=precision == "int8-symmetric",
                           validation=validation, min_dice=min_dice)
    if validation is None and calibrate is not None:  # the user's own images check the export, not phantoms
        validation, _ = load_calibration_images(calibrate, max_calibration_images)
    images = validation_images(md, validation)
    written = {}
    for part in parts:
        data, meta = export_part(md, networks, part, precision, images, min_dice=min_dice)
        written[part] = md.add_artefact(onnx_key(part, precision), f"onnx/{part}.{precision}.onnx", data, format="onnx",
                                        network=part_spec(part).network, precision=precision, meta=meta)
    return written
