"""int8 parts: onnxruntime's static quantisation (QDQ, per-channel weights), calibrated on the user's
own images, checked against torch fp32 before anything is recorded.

Two flavours of the same graph:

- for onnxruntime on a CPU (``precision="int8"``): unsigned 8-bit activations and signed per-channel
  weights (U8S8, the fast path of onnxruntime's x86 kernels, VNNI where the CPU has it), after
  onnxruntime's own pre-processing (shape inference, graph optimisation). The classifier is kept in
  fp32 unless its int8 graph measures faster here: small networks at low resolution often lose more
  to the quantise / dequantise steps than they gain.
- for TensorRT (``precision="int8-symmetric"``): signed symmetric activations and weights (zero points
  0, as TensorRT requires), no onnxruntime-specific rewriting, every operator on TensorRT's list.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .._onnxruntime import import_onnxruntime
from .onnx import (
    ExportCheckError, _reference_path_blocks, _torch_outputs, check_tensorrt_ops, compare_outputs, export_part, onnx_key, part_inputs,
)
from .parts import part_module, part_spec
from .provenance import StaleArtefactError, record_source, verified_onnx_artefact
from .sessions import session_options

__all__ = ["export_int8", "quantize_part", "CALIBRATION_BATCH"]

CALIBRATION_BATCH = 8
# keep an int8 classifier only when it is at least this much faster than fp32
_CLASSIFIER_SPEEDUP = 1.1


@contextlib.contextmanager
def _quiet_quantisation() -> Any:
    root = logging.getLogger()
    level = root.level
    try:
        root.setLevel(logging.ERROR)  # onnxruntime.quantization logs advice through the root logger
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


class _Feeds:
    """onnxruntime's CalibrationDataReader protocol over a list of feed dicts."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = list(feeds)
        self._next = 0

    def get_next(self) -> Optional[dict[str, np.ndarray]]:
        if self._next >= len(self._feeds):
            return None
        self._next += 1
        return self._feeds[self._next - 1]

    def rewind(self) -> None:
        self._next = 0


def _feeds(part: str, inputs: tuple) -> list[dict[str, np.ndarray]]:
    spec = part_spec(part)
    n = inputs[0].shape[0]
    return [{name: np.ascontiguousarray(x[s:s + CALIBRATION_BATCH].float().numpy()) for name, x in zip(spec.inputs, inputs)}
            for s in range(0, n, CALIBRATION_BATCH)]


def quantize_part(fp32: bytes, part: str, calibration: list[dict[str, np.ndarray]], *, symmetric: bool) -> bytes:
    """The int8 QDQ graph of one fp32 part (see the module documentation for the two flavours)."""
    import_onnxruntime()  # telemetry off before onnxruntime.quantization loads onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="pneumoseg-quantize-") as tmp, _quiet_quantisation():
        folder = Path(tmp)
        source = folder / f"{part}.fp32.onnx"
        source.write_bytes(fp32)
        if not symmetric:
            prepared = folder / f"{part}.prepared.onnx"
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            source = prepared
        target = folder / f"{part}.int8.onnx"
        quantize_static(
            str(source), str(target), _Feeds(calibration), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True},
        )
        return target.read_bytes()


def _median_ms(session: Any, feed: dict[str, np.ndarray], repeats: int = 5) -> float:
    session.run(None, feed)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def _fp32_bytes(md: Any, networks: dict[str, Any], part: str, images: list) -> bytes:
    """The part's fp32 ONNX: the recorded artefact, or exported (and recorded) now where there is none
    or the recorded one was exported from another network (it could serve no backend either)."""
    key = onnx_key(part, "fp32")
    if key in md.artefacts:
        try:
            return verified_onnx_artefact(md, key, part).read_bytes()
        except StaleArtefactError:
            pass
    data, meta = export_part(md, networks, part, "fp32", images)
    md.add_artefact(key, f"onnx/{part}.fp32.onnx", data, format="onnx", network=part_spec(part).network,
                    precision="fp32", meta=meta)
    return md.artefact_path(key).read_bytes()


def export_int8(md: Any, networks: dict[str, Any], parts: Sequence[str], images: list, *, symmetric: bool,
                validation: Optional[Sequence[Any]] = None, min_dice: Optional[float] = None) -> dict[str, Path]:
    """Quantise every part on ``images`` and record the int8 graphs (see :func:`pneumoseg.export.export_onnx`)."""
    import onnx

    ort = import_onnxruntime()
    precision = "int8-symmetric" if symmetric else "int8"
    check_images = list(validation) if validation is not None else images[:16]
    t = md.thresholds
    thresholds = (t.bottom, 0.5, *(() if t.top is None else (t.top,)))
    written: dict[str, Path] = {}
    for part in parts:
        spec = part_spec(part)
        where = f"{part} ({precision})"
        fp32 = _fp32_bytes(md, networks, part, check_images)
        if part in ("segmenter", "decoder") and _reference_path_blocks(networks[spec.network], "fp32"):
            # the recorded fp32 graph upsamples at full resolution (faster in fp32); quantised, the
            # sub-pixel form is the faster one, so that is what is quantised
            fp32 = export_part(md, networks, part, "fp32", check_images, sub_pixel_only=True)[0]
        calibration = _feeds(part, part_inputs(md, networks, part, images))
        start = time.perf_counter()
        data = quantize_part(fp32, part, calibration, symmetric=symmetric)
        seconds = time.perf_counter() - start
        model = onnx.load_from_string(data)
        source = record_source(model, md, part, precision)  # replaces the fp32 graph's record it inherited
        data = model.SerializeToString()
        try:
            onnx.checker.check_model(model, full_check=True)
        except onnx.checker.ValidationError as exc:
            raise ExportCheckError(f"{where}: onnx.checker refused the quantised graph: {exc}") from None
        ops = check_tensorrt_ops(model, where) if symmetric else None
        if symmetric:
            _check_zero_points(model, where)
        session = ort.InferenceSession(data, sess_options=session_options(), providers=["CPUExecutionProvider"])
        inputs = part_inputs(md, networks, part, check_images)
        feed = {name: x.float().numpy() for name, x in zip(spec.inputs, inputs)}
        candidate = session.run(list(spec.outputs), feed)
        reference = _torch_outputs(part_module(part, networks[spec.network]), inputs)
        check = compare_outputs(part, reference, candidate, precision, thresholds, where, min_dice=min_dice)
        meta: dict[str, Any] = {"inputs": list(spec.inputs), "outputs": list(spec.outputs),
                                "input_shapes": {name: list(x.shape[1:]) for name, x in zip(spec.inputs, inputs)},
                                "calibration_images": len(images), "calibration": "MinMax, QDQ, per-channel weights",
                                "activations": "int8 symmetric" if symmetric else "uint8", "quantise_seconds": round(seconds, 2),
                                "source": source,
                                "validation": {"images": len(check_images), **check}}
        if ops is not None:
            meta["ops"] = ops
        if part == "classifier" and not symmetric:
            one = {name: v[:1] for name, v in feed.items()}
            fp32_session = ort.InferenceSession(fp32, sess_options=session_options(), providers=["CPUExecutionProvider"])
            fp32_ms, int8_ms = _median_ms(fp32_session, one), _median_ms(session, one)
            meta["latency_ms_batch1"] = {"fp32": round(fp32_ms, 3), "int8": round(int8_ms, 3)}
            if int8_ms * _CLASSIFIER_SPEEDUP > fp32_ms:
                continue  # the fp32 classifier stays in use (the backend falls back to it)
        written[part] = md.add_artefact(onnx_key(part, precision), f"onnx/{part}.{precision}.onnx", data, format="onnx",
                                        network=spec.network, precision=precision, meta=meta)
    return written


def _check_zero_points(model: Any, where: str) -> None:
    """TensorRT takes Q/DQ nodes with zero points of 0 only."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2 and node.input[2]:
            zp = inits.get(node.input[2])
            if zp is None or np.any(numpy_helper.to_array(zp) != 0):
                raise ExportCheckError(f"{where}: node {node.name} has a non-zero or non-constant zero point; "
                                       "TensorRT needs symmetric quantisation")
