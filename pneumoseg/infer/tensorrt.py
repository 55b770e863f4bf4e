"""The TensorRT backend: engines from the model directory's ONNX parts, built once per GPU and
TensorRT version and cached (:mod:`pneumoseg.export.tensorrt`), run on torch's current CUDA stream.

Per call: ``set_input_shape`` for the batch, ``set_tensor_address`` for the inputs and for freshly
allocated outputs (a result never aliases the next call's), ``execute_async_v3`` on the caller's
stream (the Predictor always runs on a non-default stream of its own). One execution context per
thread, so threads never share a context's shapes or addresses.

Before an engine is looked up or built, its ONNX part's record of the network it was exported from
is checked against the model directory (:mod:`pneumoseg.export.provenance`), read without parsing
the graph.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from ..errors import DataFormatError, InvalidInputError
from ..export.parts import part_spec
from ..export.provenance import verified_onnx_artefact
from ..export.tensorrt import (
    BatchProfile, EngineCache, EngineRunner, ProfileRunner, build_engine, deserialize_engine, engine_key_fields,
    environment, import_tensorrt, parse_batch_profile, tensorrt_artefact_key, tensorrt_onnx_key, timing_cache_path,
)
from .backends import Backend

__all__ = ["TensorRTBackend", "default_engine_cache", "available"]


def default_engine_cache(model_dir: Any) -> Path:
    """``<model dir>/tensorrt`` when the model directory is writable, else a per-user cache folder."""
    inside = Path(model_dir.path) / "tensorrt"
    if os.access(model_dir.path, os.W_OK) and (not inside.exists() or os.access(inside, os.W_OK)):
        return inside
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    import hashlib

    tag = hashlib.sha256(str(Path(model_dir.path).resolve()).encode()).hexdigest()[:16]
    return base / "pneumoseg" / "tensorrt" / tag


class TensorRTBackend(Backend):
    """Engines for the parts, from the model directory's ONNX artefacts (built here on first use)."""

    name = "tensorrt"

    def __init__(self, model_dir: Any, parts: Sequence[str], device: Any = "cuda", precision: str = "fp16", *,
                 batch_profile: Union[str, Sequence[int], BatchProfile, None] = None,
                 engine_cache: Union[str, Path, None] = None) -> None:
        import torch

        super().__init__(device, precision)
        import_tensorrt()
        if self.device.type != "cuda":
            raise InvalidInputError("the tensorrt backend needs device='cuda'")
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", index)
        env = environment(index)
        self.cache = EngineCache(engine_cache if engine_cache is not None else default_engine_cache(model_dir))
        self.engines: dict[str, dict[str, Any]] = {}
        self._runners: dict[str, Any] = {}
        for part in parts:
            onnx_key = tensorrt_onnx_key(part, precision)
            if onnx_key not in model_dir.artefacts:
                flags = " --precision int8 --calibrate IMAGES" if precision == "int8" else f" --precision {precision}"
                raise DataFormatError(f"{model_dir.path}: no ONNX {part} for a {precision} engine (artefact {onnx_key!r}); "
                                      f"run `pneumoseg export {model_dir.path} --format tensorrt{flags}` first")
            # checked on every load, not only before a build: a shared engine cache holds the engine of
            # whatever network an ONNX file of that hash came from
            onnx_path = verified_onnx_artefact(model_dir, onnx_key, part, command_format="tensorrt")
            art = model_dir.artefacts[onnx_key]
            profile = batch_profile
            if profile is None:
                built = model_dir.artefacts.get(tensorrt_artefact_key(part, precision))
                profile = built.meta.get("profile") if built is not None else None
                profile = _recorded_profile(profile, model_dir.path, tensorrt_artefact_key(part, precision))
            profile = parse_batch_profile(profile)
            shapes = art.meta.get("input_shapes")
            if not isinstance(shapes, dict):
                raise DataFormatError(f"{model_dir.path}: artefact {onnx_key!r} has no input_shapes; export it again")
            fields = engine_key_fields(art.sha256, precision, profile, shapes, env)
            timing = timing_cache_path(self.cache.folder, env)
            with torch.cuda.device(self.device):
                result = self.cache.get(fields, lambda: build_engine(onnx_path, profile, timing_cache=timing),
                                        deserialize_engine)
            self.engines[part] = {"path": str(result.path), "status": result.status, "reason": result.reason,
                                  "seconds": round(result.seconds, 3), "profile": [profile.min, profile.opt, profile.max]}
            runner = EngineRunner(result.engine, part_spec(part), self.device, profile)
            self._runners[part] = ProfileRunner(runner, profile)

    def run(self, part: str, *inputs: Any) -> tuple:
        import torch

        with torch.cuda.device(self.device):
            return tuple(self._runners[part](*inputs))

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["engines"] = self.engines
        return out


def available() -> Optional[str]:
    """None when TensorRT imports, else why not (for skip messages)."""
    try:
        import_tensorrt()
    except InvalidInputError as exc:
        return str(exc)
    return None


def _recorded_profile(profile: Any, where: Any, key: str) -> Optional[BatchProfile]:
    """The batch profile recorded in an engine artefact's metadata (None when there is none); a
    hand-edited one is a DataFormatError naming the artefact, not a TypeError from the dataclass."""
    if not isinstance(profile, dict):
        return None
    if set(profile) != {"min", "opt", "max"}:
        raise DataFormatError(f"{where}: artefact {key!r} records a batch profile with fields "
                              f"{sorted(map(str, profile))}; it must have min, opt and max")
    try:
        return BatchProfile(**profile)
    except InvalidInputError as exc:
        raise DataFormatError(f"{where}: artefact {key!r}: {exc}") from None
