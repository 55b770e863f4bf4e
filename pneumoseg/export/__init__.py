"""Export (needs torch, and the ``onnx`` extra): the model directory's networks as ONNX parts
(fp32, fp16, int8 quantised for onnxruntime or TensorRT) and TensorRT engines, each recorded in the
model directory with its fingerprint."""

from .parts import PART_NAMES, PartSpec, part_module, parts_for

__all__ = ["PART_NAMES", "PartSpec", "part_module", "parts_for", "export_onnx", "export_tensorrt", "OPSET"]


def __getattr__(name: str):
    # onnx / onnxruntime load on first use, so `import pneumoseg.export` needs torch alone.
    if name in ("export_onnx", "OPSET"):
        from . import onnx as _onnx

        return getattr(_onnx, name)
    if name == "export_tensorrt":
        from .tensorrt import export_tensorrt

        return export_tensorrt
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
