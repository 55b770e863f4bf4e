"""Backends: what runs the network parts (see :mod:`pneumoseg.export.parts`) for the Predictor.

Every backend takes and returns torch tensors on the predictor's device (float32 images in, float32
logits out; the encoder's features in the backend's own type) and is safe to call from several
threads at once.

- ``torch``: the networks themselves, in channels_last memory format (the layout oneDNN's and cuDNN's
  convolutions run in; ``channels_last=False`` keeps NCHW). On a CPU fp32 eager; on CUDA fp16 (or
  fp32), each part captured as CUDA graphs, one per batch bucket, at load time (or ``torch.compile``). By
  default each eval-mode BatchNorm that directly follows a convolution is first folded into it
  (:mod:`pneumoseg.models.fuse`; on the backend's own copy of the networks, never the saved weights),
  and the sub-pixel decoder blocks' derived weights are computed once
  (:func:`pneumoseg.models.decoders.blocks.freeze_subpixel_weights`), not on every forward.
- ``onnxruntime``: the exported ONNX parts (``pneumoseg export``), one session per part, reused,
  threads set for latency; ``precision="int8"`` runs the statically quantised parts. Each part must
  have been exported from the directory's own network (its weights' SHA-256 and construction
  arguments, recorded in the graph: :mod:`pneumoseg.export.provenance`); parts exported by a pneumoseg
  that did not record them yet still load, with an INFO log line.
- ``tensorrt``: engines built from the ONNX parts (:mod:`pneumoseg.infer.tensorrt`).
"""

from __future__ import annotations

import threading
from typing import Any, Optional, Sequence

from ..errors import DataFormatError, InvalidInputError
from ..models.model_dir import CONFIG_NAME
from ..export.parts import part_module, part_spec
from ..export.provenance import check_source
from ..export.sessions import import_onnxruntime, physical_cores, session_options
from .buckets import BucketedRunner, CudaGraphRunner, make_buckets

__all__ = ["Backend", "TorchBackend", "OnnxRuntimeBackend", "physical_cores", "session_options", "BACKENDS",
           "PRECISIONS", "onnx_artefact_key"]

BACKENDS = ("torch", "onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")


def onnx_artefact_key(part: str, precision: str) -> str:
    """The model-directory key of an exported ONNX part (``pneumoseg export`` writes them)."""
    return f"{part}-onnx-{precision}"


class Backend:
    """Runs parts by name: ``run(part, *inputs) -> tuple of outputs`` (torch tensors)."""

    name = "backend"
    #: batches of a new size that :meth:`pneumoseg.Predictor.warmup` runs before that size costs what it will
    warmup_runs = 1

    def __init__(self, device: Any, precision: str) -> None:
        import torch

        self.device = torch.device(device)
        self.precision = precision

    def run(self, part: str, *inputs: Any) -> tuple:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "device": str(self.device), "precision": self.precision}


class TorchBackend(Backend):
    """The model directory's networks in PyTorch."""

    name = "torch"

    def __init__(self, model_dir: Any, parts: Sequence[str], device: Any = "cpu", precision: str = "fp32", *,
                 cuda_graphs: Optional[bool] = None, compile: bool = False, max_batch: int = 32,
                 buckets: Optional[Sequence[int]] = None, fuse_batchnorm: bool = True,
                 freeze_subpixel: bool = True, channels_last: bool = True) -> None:
        import torch

        from ..models.decoders.blocks import freeze_subpixel_weights
        from ..models.fuse import fuse_batchnorm as fold_batchnorm

        super().__init__(device, precision)
        cuda = self.device.type == "cuda"
        if precision == "int8":
            raise InvalidInputError("the torch backend runs fp32 or fp16; for int8 use backend='onnxruntime' "
                                    "(after `pneumoseg export DIR --format onnx --precision int8 --calibrate IMAGES`) "
                                    "or backend='tensorrt'")
        if precision == "fp16" and not cuda:
            raise InvalidInputError("fp16 with the torch backend needs device='cuda' (CPU half-precision "
                                    "convolutions are slower than fp32); use precision='fp32' on a CPU")
        if cuda_graphs and not cuda:
            raise InvalidInputError("cuda_graphs=True needs device='cuda'")
        if not isinstance(fuse_batchnorm, bool):
            raise InvalidInputError(f"fuse_batchnorm must be True or False, got {fuse_batchnorm!r}")
        if not isinstance(freeze_subpixel, bool):
            raise InvalidInputError(f"freeze_subpixel must be True or False, got {freeze_subpixel!r}")
        if not isinstance(channels_last, bool):
            raise InvalidInputError(f"channels_last must be True or False, got {channels_last!r}")
        #: the networks' memory format. On a CPU too: oneDNN converts NCHW activations to its blocked
        #: layout and back around every convolution, and NCHW max pooling is slow (U-Net ResNet34 at
        #: 512, batch 1, one thread: 1.2x less time)
        self.channels_last = channels_last
        self.cuda_graphs = bool(cuda) if cuda_graphs is None else bool(cuda_graphs)
        self.compiled = bool(compile)
        self.fuse_batchnorm = fuse_batchnorm
        #: network -> number of BatchNorms folded into their convolutions
        self.batchnorms_folded: dict[str, int] = {}
        self.freeze_subpixel = freeze_subpixel
        #: network -> number of sub-pixel decoder blocks whose derived weights were precomputed
        self.subpixel_blocks_frozen: dict[str, int] = {}
        self.buckets = make_buckets(max_batch, buckets)
        dtype = torch.float16 if precision == "fp16" else None
        networks: dict[str, Any] = {}
        self._modules: dict[str, Any] = {}
        for part in parts:
            spec = part_spec(part)
            if spec.network not in networks:
                network = model_dir.build(spec.network)  # weights checked against the config
                if fuse_batchnorm:
                    # before the fp16 cast and the graph capture / compile, which must see the folded weights
                    folded = fold_batchnorm(network, inplace=True, dtype=dtype).folded
                    self.batchnorms_folded[spec.network] = len(folded)
                networks[spec.network] = network
            module = part_module(part, networks[spec.network], dtype=dtype).to(self.device)
            if channels_last:
                module = module.to(memory_format=torch.channels_last)
            self._modules[part] = module
        if freeze_subpixel:
            # after folding, the cast, the move and channels_last of every part (each replaces conv1's
            # weight: freezing before would fall back to computing) and before the graph capture / compile
            for name, network in networks.items():
                self.subpixel_blocks_frozen[name] = freeze_subpixel_weights(network)
        self.input_sizes = {part: tuple(model_dir.networks[part_spec(part).network].input_size) for part in parts}
        self._runners: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._build_runners(parts)

    def _eager(self, part: str):
        import torch

        module = self._modules[part]
        channels_last = self.channels_last

        def run(*inputs):
            if channels_last:
                inputs = [x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x for x in inputs]
            out = module(*inputs)
            return out if isinstance(out, tuple) else (out,)

        return run

    def _example_inputs(self, part: str, rows: int) -> list:
        import torch

        h, w = self.input_sizes[part]
        image = torch.zeros((rows, 1, h, w), device=self.device)
        if part != "decoder":
            return [image]
        with torch.inference_mode():
            encoded = self._eager("encoder")(image)
        return [f.clone() for f in encoded[1:]]

    def _build_runners(self, parts: Sequence[str]) -> None:
        import torch

        for part in parts:
            fn = self._eager(part)
            if self.compiled:
                # Fixed shapes per bucket: one compiled specialisation each, made now rather than on
                # the first request. On CUDA "reduce-overhead" also graphs the compiled code.
                mode = "reduce-overhead" if self.device.type == "cuda" else "default"
                compiled = torch.compile(fn, mode=mode, dynamic=False)
                lock = self._lock

                def run_compiled(*inputs, _compiled=compiled, _lock=lock):
                    with _lock:  # compiled graphs (and their CUDA graph trees) are not re-entrant
                        out = _compiled(*inputs)
                        return tuple(o.clone() for o in out)

                runner = BucketedRunner(run_compiled, self.buckets, pad=True)
                with torch.inference_mode():
                    for b in self.buckets:
                        runner(*self._example_inputs(part, b))
            elif self.cuda_graphs:
                def examples(b: int, _p: str = part) -> list:  # _p: this part, not the loop's last
                    return self._example_inputs(_p, b)

                graphs = CudaGraphRunner(fn, examples, self.buckets, self.device)
                runner = BucketedRunner(graphs, self.buckets, pad=False)
            else:
                runner = fn
            self._runners[part] = runner

    def run(self, part: str, *inputs: Any) -> tuple:
        import torch

        with torch.inference_mode():
            return tuple(self._runners[part](*inputs))

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update(cuda_graphs=self.cuda_graphs, compile=self.compiled, fuse_batchnorm=self.fuse_batchnorm,
                   channels_last=self.channels_last)
        if self.fuse_batchnorm:
            out["batchnorms_folded"] = dict(self.batchnorms_folded)
        out["freeze_subpixel"] = self.freeze_subpixel
        if self.freeze_subpixel:
            out["subpixel_blocks_frozen"] = dict(self.subpixel_blocks_frozen)
        if self.cuda_graphs or self.compiled:
            out["batch_buckets"] = list(self.buckets)
        return out


def _check_image_input(session: Any, path: Any, part: str, size: tuple[int, int]) -> None:
    """The graph's fixed image size must be the one pneumoseg.json gives the network, which is what
    the images are resized to: onnxruntime would refuse every batch (an exported graph of another
    size, or a description edited after the export)."""
    for value in session.get_inputs():
        if value.name != "image":
            continue
        fixed = [d if isinstance(d, int) else None for d in value.shape[1:]]
        want = [1, *size]
        if len(fixed) != 3 or any(d is not None and d != w for d, w in zip(fixed, want)):
            raise DataFormatError(f"{path}: the {part} graph takes images of shape {list(value.shape)}, but {CONFIG_NAME} gives "
                                  f"the network an input size of {list(size)}; export the directory again")


class OnnxRuntimeBackend(Backend):
    """The exported ONNX parts in onnxruntime (CPU), one session per part, made once and reused
    (``InferenceSession.run`` is thread-safe)."""

    name = "onnxruntime"
    # A session plans its memory on the first run at an input shape and allocates that plan on the
    # second: one warm-up batch left about 1 GB of fresh pages (U-Net ResNet34 512, batch 16, fp32 and
    # int8) and a second or more to the first real batch of that size.
    warmup_runs = 2

    def __init__(self, model_dir: Any, parts: Sequence[str], device: Any = "cpu", precision: str = "fp32", *,
                 threads: Optional[int] = None) -> None:
        super().__init__(device, precision)
        ort = import_onnxruntime()
        if self.device.type != "cpu":
            raise InvalidInputError("the onnxruntime backend runs on the CPU here; on a GPU use backend='torch' or "
                                    "backend='tensorrt'")
        if precision == "fp16":
            raise InvalidInputError("onnxruntime on a CPU has no fast fp16 convolutions; use precision='fp32' or 'int8'")
        options = session_options(threads)
        self.threads = options.intra_op_num_threads
        self._sessions: dict[str, Any] = {}
        self.artefacts: dict[str, str] = {}
        for part in parts:
            key = wanted = onnx_artefact_key(part, precision)
            if precision == "int8" and key not in model_dir.artefacts and part == "classifier":
                key = onnx_artefact_key(part, "fp32")  # export keeps the classifier fp32 where int8 was slower
            if key not in model_dir.artefacts:
                flags = " --precision int8 --calibrate IMAGES" if precision == "int8" else ""
                named = repr(key) if key == wanted else f"{wanted!r}, or {key!r} where export kept it fp32"
                raise DataFormatError(f"{model_dir.path}: no exported {part} for onnxruntime {precision} (artefact "
                                      f"{named}); run `pneumoseg export {model_dir.path} --format onnx{flags}` first")
            path = model_dir.artefact_path(key)  # fingerprint checked
            try:
                session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
            except Exception as exc:  # onnxruntime raises its own exception types for damaged models
                raise DataFormatError(f"{path}: onnxruntime cannot load it ({type(exc).__name__}: {exc})") from None
            # the graph's record of the network it was exported from, read from the session already open
            check_source(model_dir, key, part, path, session.get_modelmeta().custom_metadata_map)
            spec = part_spec(part)
            names = [i.name for i in session.get_inputs()]
            outs = [o.name for o in session.get_outputs()]
            if tuple(names) != spec.inputs or tuple(outs) != spec.outputs:
                raise DataFormatError(f"{path}: inputs {names} / outputs {outs} are not those of the {part} part "
                                      f"({list(spec.inputs)} / {list(spec.outputs)})")
            _check_image_input(session, path, part, model_dir.networks[spec.network].input_size)
            self._sessions[part] = session
            self.artefacts[part] = key

    def run(self, part: str, *inputs: Any) -> tuple:
        import numpy as np
        import torch

        session = self._sessions[part]
        spec = part_spec(part)
        feed = {name: np.ascontiguousarray(x.detach().numpy(), dtype=np.float32) for name, x in zip(spec.inputs, inputs)}
        return tuple(torch.from_numpy(o) for o in session.run(list(spec.outputs), feed))

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update(threads=self.threads, artefacts=dict(self.artefacts))
        return out
