"""Cases of the ONNX provenance record worked out by hand, added by the mutation audit (round 2)
where a planted bug passed the provenance tests."""

from __future__ import annotations

from types import SimpleNamespace

from pneumoseg.export.provenance import source_metadata, source_summary


def _model_dir(config: dict) -> SimpleNamespace:
    return SimpleNamespace(networks={"segmenter": SimpleNamespace(sha256="ab" * 32, config=config)})


def test_the_recorded_config_does_not_depend_on_the_order_of_its_fields():
    # the same construction arguments written in another order (a pneumoseg.json rewritten by a tool
    # or by hand) describe the same network: one canonical JSON, keys sorted, no spaces
    one = source_metadata(_model_dir({"encoder": "resnet34", "arch": "unet", "classes": 1}), "segmenter", "fp32")
    other = source_metadata(_model_dir({"classes": 1, "arch": "unet", "encoder": "resnet34"}), "segmenter", "fp32")
    assert one == other
    assert one["pneumoseg.config"] == '{"arch":"unet","classes":1,"encoder":"resnet34"}'
    assert source_summary(one) == source_summary(other)


def _field(number: int, payload: bytes) -> bytes:
    # a length-delimited protobuf field (wire type 2) whose tag and length fit one byte each
    assert number < 16 and len(payload) < 128
    return bytes([number << 3 | 2, len(payload)]) + payload


def test_a_field_written_twice_reads_as_its_last_value(tmp_path):
    # protobuf: a non-repeated field met twice takes its last value. A metadata entry whose key is
    # written twice ('old', then 'pneumoseg.part') is read as the protobuf library reads it.
    import pytest

    onnx = pytest.importorskip("onnx")
    from pneumoseg.export.provenance import read_onnx_metadata

    entry = _field(1, b"old") + _field(1, b"pneumoseg.part") + _field(2, b"decoder")
    data = _field(2, b"pneumoseg-test") + _field(14, entry)  # producer_name, then metadata_props
    path = tmp_path / "model.onnx"
    path.write_bytes(data)
    parsed = onnx.load_from_string(data)
    assert [(p.key, p.value) for p in parsed.metadata_props] == [("pneumoseg.part", "decoder")]
    assert read_onnx_metadata(path) == {"pneumoseg.part": "decoder"}


def test_recording_the_source_replaces_an_earlier_record_and_keeps_other_entries():
    # an int8 graph quantised from the fp32 one carries the fp32 record: recording the int8 source
    # must leave one entry per key (no fp32 precision beside the int8 one) and keep foreign entries
    import pytest

    onnx = pytest.importorskip("onnx")
    from pneumoseg.export.provenance import record_source

    model = onnx.ModelProto()
    for key, value in [("pneumoseg.precision", "fp32"), ("pneumoseg.part", "segmenter"), ("author", "me")]:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    record_source(model, _model_dir({"arch": "unet"}), "segmenter", "int8")
    keys = [p.key for p in model.metadata_props]
    assert len(keys) == len(set(keys))
    props = {p.key: p.value for p in model.metadata_props}
    assert props["pneumoseg.precision"] == "int8"
    assert props["author"] == "me"
