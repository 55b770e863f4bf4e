"""ONNX export: graphs checked, recorded with fingerprints, equal to torch in onnxruntime (max-abs and
masks), on TensorRT's operator list; fp16 and int8 variants; the checks themselves."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from onnx import TensorProto, helper  # noqa: E402

from pneumoseg.errors import InvalidInputError  # noqa: E402
from pneumoseg.export.onnx import (  # noqa: E402
    OPSET, TENSORRT_ONNX_OPS, ExportCheckError, check_tensorrt_ops, compare_outputs, export_onnx, mask_agreement,
)
from pneumoseg.infer import Predictor  # noqa: E402
from pneumoseg.models.model_dir import load_model_dir  # noqa: E402

from infer_helpers import assert_latency_session_options, copy_model_dir, exported_model_dir, phantom_images  # noqa: E402


@pytest.mark.parametrize("kind, parts", [("aux", {"encoder", "decoder"}), ("classifier", {"classifier", "segmenter"})])
def test_exported_parts_are_checked_and_recorded(kind, parts):
    md = load_model_dir(exported_model_dir(kind))
    keys = {f"{p}-onnx-fp32" for p in parts}
    assert keys <= set(md.artefacts)
    for key in keys:
        art = md.artefacts[key]
        path = md.artefact_path(key)  # the fingerprint is checked on the way
        data = path.read_bytes()
        assert art.sha256 == hashlib.sha256(data).hexdigest() and art.format == "onnx" and art.precision == "fp32"
        model = onnx.load_from_string(data)
        onnx.checker.check_model(model, full_check=True)
        assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {OPSET}
        assert {n.op_type for n in model.graph.node} <= TENSORRT_ONNX_OPS
        _assert_plain_conv_weights(model)
        for value in model.graph.input:  # only the batch is dynamic
            dims = value.type.tensor_type.shape.dim
            assert dims[0].dim_param and all(d.dim_value > 0 for d in dims[1:])
            assert art.meta["input_shapes"][value.name] == [d.dim_value for d in dims[1:]]
        v = art.meta["validation"]
        assert max(v["max_abs"].values()) < 1e-4
        if "mask_dice" in v:
            assert v["mask_dice"] >= 0.99


def _assert_plain_conv_weights(model):
    """The sub-pixel decoder blocks were exported frozen: every convolution's weight is an initializer
    (no MatMul/Reshape/Transpose chain deriving the phase weights at run time)."""
    assert not any(n.op_type == "MatMul" for n in model.graph.node)
    initializers = {i.name for i in model.graph.initializer}
    assert all(n.input[1] in initializers for n in model.graph.node if n.op_type == "Conv")


def test_exported_graphs_take_any_batch_and_equal_torch():
    md = load_model_dir(exported_model_dir("classifier"))
    session = ort.InferenceSession(str(md.artefact_path("segmenter-onnx-fp32")), providers=["CPUExecutionProvider"])
    seg = md.build("segmenter")
    for n in (1, 3):
        x = torch.randn(n, 1, 64, 64)
        got = session.run(None, {"image": x.numpy()})[0]
        with torch.no_grad():
            want = seg(x).numpy()
        assert got.shape == (n, 1, 64, 64)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_fp32_decoder_upsamples_at_full_resolution_and_sub_pixel_convolves_below():
    """The fp32 graph's block without skip features is exported as nearest Resize + Conv (onnxruntime
    reorders layouts around DepthToSpace and Slice, which costs more there than the sub-pixel form
    saves), every other block as a sub-pixel convolution; the graph still equals torch's sub-pixel path."""
    md = load_model_dir(exported_model_dir("aux"))
    art = md.artefacts["decoder-onnx-fp32"]
    model = onnx.load(str(md.artefact_path("decoder-onnx-fp32")))
    blocks = md.build("segmenter").decoder.blocks
    assert [b.has_skip for b in blocks] == [True] * (len(blocks) - 1) + [False]
    resizes = [n for n in model.graph.node if n.op_type == "Resize"]
    assert len(resizes) == 1 and {a.name: a.s for a in resizes[0].attribute}.get("mode", b"nearest") == b"nearest"
    assert sum(n.op_type == "DepthToSpace" for n in model.graph.node) == len(blocks) - 1
    assert art.meta["validation"]["max_abs"]["mask_logits"] < 1e-4 and art.meta["validation"]["mask_dice"] >= 0.99


def _graph(nodes, inputs, outputs, initializers=()):
    return helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(initializers)),
                             opset_imports=[helper.make_opsetid("", OPSET)])


def test_tensorrt_operator_check():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])
    good = _graph([helper.make_node("Relu", ["x"], ["y"]), ], [x], [y])
    assert check_tensorrt_ops(good, "g") == {"Relu": 1}
    nonzero = _graph([helper.make_node("NonZero", ["x"], ["y"])], [x], [y])
    with pytest.raises(ExportCheckError, match="NonZero"):
        check_tensorrt_ops(nonzero, "g")
    contrib = _graph([helper.make_node("FusedConv", ["x"], ["y"], domain="com.microsoft")], [x], [y])
    with pytest.raises(ExportCheckError, match="com.microsoft::FusedConv"):
        check_tensorrt_ops(contrib, "g")
    sizes = helper.make_tensor("sizes", TensorProto.INT64, [4], [1, 1, 2, 2])
    resize = _graph([helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="linear", antialias=1)], [x], [y], [sizes])
    with pytest.raises(ExportCheckError, match="antialias=1"):
        check_tensorrt_ops(resize, "g")
    cubic = _graph([helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="cubic")], [x], [y], [sizes])
    with pytest.raises(ExportCheckError, match="mode=cubic"):
        check_tensorrt_ops(cubic, "g")


def test_mask_agreement_is_dice_at_each_threshold():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(2, 1, 16, 16)).astype(np.float32)
    assert mask_agreement(ref, ref.copy(), (0.3, 0.5)) == 1.0
    assert mask_agreement(np.full_like(ref, -9), np.full_like(ref, -8), (0.5,)) == 1.0  # both empty
    other = ref.copy()
    other[0, 0, 0, :4] = np.where(ref[0, 0, 0, :4] > 0, -1.0, 1.0)  # flip four pixels at p = 0.5
    a, b = ref > 0, other > 0
    assert mask_agreement(ref, other, (0.5,)) == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_compare_outputs_refuses_drift():
    ref = np.full((1, 1, 8, 8), -3.0, np.float32)
    ref[..., :4] = 3.0
    near = ref + 1e-5
    report = compare_outputs("segmenter", [ref], [near], "fp32", (0.5,), "w")
    assert report["mask_dice"] == 1.0 and report["max_abs"]["mask_logits"] == pytest.approx(1e-5, rel=1e-2)
    with pytest.raises(ExportCheckError, match="differs from torch by up to"):
        compare_outputs("segmenter", [ref], [ref + 0.5], "fp32", (0.5,), "w")
    flipped = ref.copy()
    flipped[..., :4] = -3.0
    with pytest.raises(ExportCheckError, match="Dice 0.0000"):
        compare_outputs("segmenter", [ref], [flipped], "int8", (0.5,), "w")
    with pytest.raises(ExportCheckError, match="NaN"):
        compare_outputs("segmenter", [ref], [ref * np.nan], "fp32", (0.5,), "w")
    with pytest.raises(ExportCheckError, match="shape"):
        compare_outputs("segmenter", [ref], [ref[0]], "fp32", (0.5,), "w")


def test_fp16_graphs_have_half_weights_and_float_image_io(tmp_path):
    path = copy_model_dir("aux", tmp_path / "m")
    written = export_onnx(path, "fp16")
    md = load_model_dir(path)
    for part in ("encoder", "decoder"):
        art = md.artefacts[f"{part}-onnx-fp16"]
        assert written[part] == md.artefact_path(f"{part}-onnx-fp16")
        model = onnx.load(str(written[part]))
        types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)}
        # the image and the logits stay float32; the features between the parts travel in half precision
        assert types.pop("image", TensorProto.FLOAT) == TensorProto.FLOAT
        assert types.pop("class_logits", TensorProto.FLOAT) == types.pop("mask_logits", TensorProto.FLOAT) == TensorProto.FLOAT
        assert set(types.values()) == {TensorProto.FLOAT16}
        conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
        assert {i.data_type for i in model.graph.initializer if i.name in conv_weights} == {TensorProto.FLOAT16}
        _assert_plain_conv_weights(model)
        assert {n.op_type for n in model.graph.node} <= TENSORRT_ONNX_OPS
        assert not any(n.op_type == "Resize" for n in model.graph.node)  # sub-pixel blocks throughout (TensorRT)
        assert art.meta["validation"].get("mask_dice", 1.0) >= 0.97


def test_int8_needs_calibration_images(tmp_path):
    with pytest.raises(InvalidInputError, match="calibration images"):
        export_onnx(exported_model_dir("aux"), "int8")


@pytest.mark.slow
def test_int8_export_for_onnxruntime_and_for_tensorrt(tmp_path):
    path = copy_model_dir("classifier", tmp_path / "m", exported=True)
    calibration = phantom_images(8, seed=11)
    written = export_onnx(path, "int8", calibrate=calibration, min_dice=0.8)
    md = load_model_dir(path)
    seg = md.artefacts["segmenter-onnx-int8"]
    assert "segmenter" in written and seg.meta["calibration_images"] == 8 and seg.meta["validation"]["mask_dice"] >= 0.8
    model = onnx.load(str(md.artefact_path("segmenter-onnx-int8")))
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) > 10
    assert not any(n.op_type == "MatMul" for n in model.graph.node)  # the phase weights are quantised initializers
    # quantised, every decoder block stays a sub-pixel convolution (faster there), unlike the fp32 graph's last one
    ops = {n.op_type for n in model.graph.node}
    assert "Resize" not in ops and "DepthToSpace" in ops
    assert "Resize" in {n.op_type for n in onnx.load(str(md.artefact_path("segmenter-onnx-fp32"))).graph.node}
    # the classifier is int8 only where that measured faster; the backend falls back to fp32 otherwise
    predictor = Predictor.from_dir(path, backend="onnxruntime", precision="int8", threads=2)
    assert_latency_session_options(predictor, 2)  # the int8 sessions' pool threads do not spin either
    used = predictor.describe()["artefacts"]
    assert used["segmenter"] == "segmenter-onnx-int8"
    assert used["classifier"] == ("classifier-onnx-int8" if "classifier" in written else "classifier-onnx-fp32")
    images = phantom_images(6, seed=12)
    fp32 = Predictor.from_dir(path, backend="onnxruntime").predict(images, return_masks=True)
    int8 = predictor.predict(images, return_masks=True)
    both = [(a, b) for a, b in zip(fp32, int8) if a.segmented and b.segmented]
    assert both
    overlap = sum(int((a.mask & b.mask).sum()) for a, b in both)
    total = sum(int(a.mask.sum() + b.mask.sum()) for a, b in both)
    assert 2 * overlap / max(total, 1) > 0.8
    export_onnx(path, "int8-symmetric", calibrate=calibration, min_dice=0.8)
    md = load_model_dir(path)
    for part in ("classifier", "segmenter"):
        sym = onnx.load(str(md.artefact_path(f"{part}-onnx-int8-symmetric")))
        assert {n.op_type for n in sym.graph.node} <= TENSORRT_ONNX_OPS
        zero_points = {n.input[2] for n in sym.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2}
        for init in sym.graph.initializer:
            if init.name in zero_points:
                assert not onnx.numpy_helper.to_array(init).any() and init.data_type == TensorProto.INT8
