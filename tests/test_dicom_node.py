"""pneumoseg.serve.DicomNode and `pneumoseg listen`: a DICOM node in the test process on a free port, fed
by a pynetdicom SCU, its answers checked against Predictor.predict on the same files."""

from __future__ import annotations

import csv
import io
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("highdicom")
pynetdicom = pytest.importorskip("pynetdicom")

import pydicom  # noqa: E402
from pynetdicom import AE, evt  # noqa: E402

from pneumoseg.cli import main  # noqa: E402
from pneumoseg.errors import InvalidInputError  # noqa: E402
from pneumoseg.infer import Predictor  # noqa: E402
from pneumoseg.infer.dicom_overlay import SECONDARY_CAPTURE_STORAGE  # noqa: E402
from pneumoseg.infer.dicom_seg import SEGMENTATION_STORAGE  # noqa: E402
from pneumoseg.serve import RESULTS, DicomNode, parse_forward  # noqa: E402
from pneumoseg.serve.node import FORWARD_COLUMNS, FORWARDED, INCOMING, RESULT_COLUMNS, tls_server_context  # noqa: E402

from factories import write_dicom  # noqa: E402
from infer_helpers import model_dir, phantom_images  # noqa: E402

SIIM = Path(__file__).resolve().parents[2] / "shared" / "data" / "siim-sample"
CR = "1.2.840.10008.5.1.4.1.1.1"
SC = "1.2.840.10008.5.1.4.1.1.7"
CT = "1.2.840.10008.5.1.4.1.1.2"
SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.50"]


@pytest.fixture(scope="module")
def predictor():
    return Predictor.from_dir(model_dir("classifier"), backend="torch", device="cpu")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Six 16-bit CR phantoms (half with a pneumothorax), and the SIIM files where ../shared has them."""
    folder = tmp_path_factory.mktemp("sources")
    files = [write_dicom(folder / f"{i}.dcm", (img.astype(np.uint16) * 16), StudyInstanceUID=pydicom.uid.generate_uid(),
                         SeriesInstanceUID=pydicom.uid.generate_uid()) for i, img in enumerate(phantom_images(6))]
    files += sorted(SIIM.glob("*.dcm")) if SIIM.is_dir() else []
    return files


def send(port, paths, *, calling="SCU", contexts=((CR, SYNTAXES), (SC, SYNTAXES))):
    """C-STORE each file (a path or a Dataset) in one association; the status codes."""
    ae = AE(ae_title=calling)
    for sop_class, syntaxes in contexts:
        for syntax in syntaxes:  # one context per syntax, as a PACS proposes them: each file goes as it is
            ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="PNEUMOSEG")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(p if isinstance(p, pydicom.Dataset) else pydicom.dcmread(p)).Status)
                for p in paths]
    finally:
        assoc.release()
        ae.shutdown()


def rows(out):
    with open(out / RESULTS, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == RESULT_COLUMNS
        return list(reader)


def forwarded(out):
    with open(out / FORWARDED, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == FORWARD_COLUMNS
        return list(reader)


class Held:
    """A predictor that waits for ``release`` before each batch: the queue fills behind it."""

    def __init__(self, inner):
        self.inner, self.release, self.started = inner, threading.Event(), threading.Event()
        self.backend, self.model_dir = inner.backend, inner.model_dir

    def predict(self, *args, **kwargs):
        self.started.set()
        assert self.release.wait(30)
        return self.inner.predict(*args, **kwargs)


def test_results_and_segs_are_the_predictors_and_echo_answers(predictor, sources, tmp_path):
    out = tmp_path / "node"
    with DicomNode(predictor, out, port=0, batch_size=4) as node:
        ae = AE(ae_title="SCU")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", node.port, ae_title="PNEUMOSEG")
        assert int(assoc.send_c_echo().Status) == 0
        assoc.release()
        assert send(node.port, sources) == [0] * len(sources)
        assert node.wait_idle(60)
    got = {r["ImageId"]: r for r in rows(out)}
    want = predictor.predict([str(p) for p in sources], return_masks=True, name_by="uid")
    assert sorted(got) == sorted(p.image_id for p in want)
    positives = 0
    for p in want:
        row = got[p.image_id]
        assert row["Status"] == "ok" and row["Caller"] == "SCU" and row["Error"] == ""
        assert float(row["Score"]) == pytest.approx(p.score, rel=1e-5, abs=1e-6)
        assert row["EncodedPixels"] == p.rle
        assert (row["Positive"], int(row["Components"])) == (str(int(p.positive)), p.n_components)
        assert row["Received"] <= row["Done"]
        seg_path = out / "seg" / f"{p.image_id}.dcm"
        assert seg_path.is_file() == p.positive and row["Seg"] == (f"seg/{p.image_id}.dcm" if p.positive else "")
        if p.positive:
            positives += 1
            seg = pydicom.dcmread(seg_path)
            assert seg.SOPClassUID == SEGMENTATION_STORAGE
            ref = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
            assert ref == p.image_id
            assert np.array_equal(seg.pixel_array.astype(bool), p.mask.astype(bool))
    assert 0 < positives < len(want)
    assert list((out / INCOMING).iterdir()) == []  # every image, once its row is written, is removed


def test_forward_sends_exactly_the_segs_and_a_failed_forward_is_recorded(predictor, sources, tmp_path):
    received = []

    def on_store(event):
        received.append(event.dataset)
        return 0

    pacs = AE(ae_title="PACS")
    pacs.add_supported_context(SEGMENTATION_STORAGE, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    server = pacs.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        port = server.server_address[1]
        out = tmp_path / "node"
        with DicomNode(predictor, out, port=0, forward=f"PACS@127.0.0.1:{port}") as node:
            send(node.port, sources[:6])
            assert node.wait_idle(60)
    finally:
        pacs.shutdown()
    segs = {pydicom.dcmread(p).SOPInstanceUID for p in (out / "seg").iterdir()}
    assert segs and {ds.SOPInstanceUID for ds in received} == segs and len(received) == len(segs)
    assert {r["Forwarded"] for r in rows(out) if r["Seg"]} == {"queued"}
    assert {r["Forwarded"] for r in rows(out) if not r["Seg"]} == {""}
    sent = forwarded(out)
    assert sorted((r["ImageId"], r["Predicted"], r["Seg"]) for r in sent) == sorted(
        (r["ImageId"], r["Done"], r["Seg"]) for r in rows(out) if r["Seg"])
    assert {r["Forwarded"] for r in sent} == {"yes"}

    # nobody listens there now: each SEG stays on disk, its row says it was not sent
    out2 = tmp_path / "node2"
    with DicomNode(predictor, out2, port=0, forward=f"PACS@127.0.0.1:{port}", forward_attempts=2,
                   forward_backoff_s=0.0) as node:
        send(node.port, sources[:6])
        assert node.wait_idle(60)
    sent = forwarded(out2)
    assert len(sent) == len([r for r in rows(out2) if r["Seg"]]) > 0
    assert all(r["Forwarded"] == "no" and r["Error"].startswith("cannot connect") and (out2 / r["Seg"]).is_file()
               for r in sent)


def test_other_sop_classes_and_callers_are_refused_at_association(predictor, sources, tmp_path):
    with DicomNode(predictor, tmp_path / "node", port=0, allowed_callers=["PACS"]) as node:
        ae = AE(ae_title="PACS")
        ae.add_requested_context(CT, SYNTAXES)
        ae.add_requested_context(CR, SYNTAXES)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="PNEUMOSEG")
        assert assoc.is_established
        # a CT image cannot be sent: its presentation context is refused (abstract syntax not supported)
        assert [c.abstract_syntax for c in assoc.accepted_contexts] == [CR]
        assert [(c.abstract_syntax, c.result) for c in assoc.rejected_contexts] == [(CT, 3)]
        ct = pydicom.dcmread(sources[0])
        ct.SOPClassUID = CT
        with pytest.raises(ValueError, match="No presentation context"):
            assoc.send_c_store(ct)
        assoc.release()
        ae.shutdown()
        other = AE(ae_title="OTHER")
        other.add_requested_context(CR, SYNTAXES)
        assoc = other.associate("127.0.0.1", node.port, ae_title="PNEUMOSEG")
        assert assoc.is_rejected
        other.shutdown()
        assert send(node.port, sources[:1], calling="PACS") == [0]
        assert node.wait_idle(60)
    assert len(rows(tmp_path / "node")) == 1


def test_a_damaged_instance_is_refused_or_recorded_and_the_node_goes_on(predictor, sources, tmp_path):
    no_rows = pydicom.dcmread(sources[0])
    no_rows.SOPInstanceUID = pydicom.uid.generate_uid()
    del no_rows.Rows
    truncated = pydicom.dcmread(sources[1])
    truncated.SOPInstanceUID = pydicom.uid.generate_uid()
    truncated.PixelData = truncated.PixelData[:100]
    rgb = pydicom.dcmread(sources[2])
    rgb.SOPInstanceUID = pydicom.uid.generate_uid()
    rgb.PhotometricInterpretation = "RGB"
    out = tmp_path / "node"
    with DicomNode(predictor, out, port=0) as node:
        statuses = send(node.port, [no_rows, truncated, rgb, sources[3]])
        assert node.wait_idle(60)
    # the header says pneumoseg cannot read it: Cannot Understand; a cut pixel data is found when predicted
    assert statuses == [0xC000, 0, 0xC000, 0]
    got = {r["ImageId"]: r for r in rows(out)}
    assert set(got) == {truncated.SOPInstanceUID, pydicom.dcmread(sources[3]).SOPInstanceUID}
    assert got[truncated.SOPInstanceUID]["Status"] == "failed" and "truncated" in got[truncated.SOPInstanceUID]["Error"]
    assert list((out / INCOMING).iterdir()) == []


def test_a_full_queue_answers_out_of_resources_and_a_resend_is_predicted_once(predictor, sources, tmp_path):
    held = Held(predictor)
    out = tmp_path / "node"
    with DicomNode(held, out, port=0, max_queue=2, batch_size=1, batch_wait_s=0.0) as node:
        assert send(node.port, sources[:1]) == [0]
        assert held.started.wait(30)  # the first is in the worker's batch; two more may wait
        assert send(node.port, sources[1:4]) == [0, 0, 0xA700]
        assert send(node.port, sources[1:2]) == [0]  # sent again while it waits: acknowledged, predicted once
        held.release.set()
        assert node.wait_idle(60)
    assert len(rows(out)) == 3


def test_stop_leaves_the_queue_in_incoming_and_a_restart_predicts_it(predictor, sources, tmp_path):
    held = Held(predictor)
    out = tmp_path / "node"
    node = DicomNode(held, out, port=0, batch_size=1, batch_wait_s=0.0).start()
    assert send(node.port, sources[:3]) == [0, 0, 0]
    assert held.started.wait(30)
    threading.Timer(0.5, held.release.set).start()
    node.stop(timeout_s=0.1)  # the batch being predicted ends; the two behind it stay on disk
    assert len(rows(out)) == 1
    assert len(list((out / INCOMING).glob("*.dcm"))) == 2
    with DicomNode(predictor, out, port=0) as again:
        assert again.stats["resumed"] == 2
        assert again.wait_idle(60)
    want = {pydicom.dcmread(p).SOPInstanceUID for p in sources[:3]}
    assert {r["ImageId"] for r in rows(out)} == want and len(rows(out)) == 3
    assert list((out / INCOMING).iterdir()) == []


def test_a_restart_after_a_kill_predicts_incoming_and_mends_results(predictor, sources, tmp_path):
    out = tmp_path / "node"
    with DicomNode(predictor, out, port=0):
        pass
    uids = [pydicom.dcmread(p).SOPInstanceUID for p in sources[:2]]
    (out / INCOMING).mkdir(exist_ok=True)
    for uid, p in zip(uids, sources):
        shutil.copy(p, out / INCOMING / f"{uid}.dcm")
    # what a SIGKILL leaves: a cut row, a temporary file, and a file whose row was written
    with open(out / RESULTS, "a") as f:
        f.write(f"{uids[1]},SCU,2026-01-01T00:00:00+00:00,2026-01-01T00:00:01+00:00,ok,0.1,0,0,-1,,,\n{uids[0]},SC")
    (out / INCOMING / f".{uids[0]}.dcm.pneumoseg-abcdefgh.tmp").write_bytes(b"half")
    with DicomNode(predictor, out, port=0) as node:
        assert node.stats["resumed"] == 1
        assert node.wait_idle(60)
    assert [r["ImageId"] for r in rows(out)] == [uids[1], uids[0]]
    assert list((out / INCOMING).iterdir()) == []


def test_a_results_csv_saved_without_its_final_newline_while_stopped_keeps_its_last_row_at_restart(
        predictor, sources, tmp_path):
    out = tmp_path / "node"
    with DicomNode(predictor, out, port=0, batch_size=1) as node:
        assert send(node.port, sources[:2]) == [0, 0]
        assert node.wait_idle(60)
    uids = [pydicom.dcmread(p).SOPInstanceUID for p in sources[:3]]
    # what an editor does to both files while the node is stopped: whole rows, no final newline
    with open(out / RESULTS, "rb+") as f:
        f.truncate(len(f.read()) - 1)
    with open(out / FORWARDED, "w", encoding="utf-8", newline="") as f:
        f.write(",".join(FORWARD_COLUMNS) + f"\n{uids[0]},2026-01-01T00:00:01+00:00,seg/{uids[0]}.dcm,"
                f"2026-01-01T00:00:02+00:00,no,\"Association rejected, twice\",")
    with DicomNode(predictor, out, port=0, batch_size=1) as node:
        assert node.stats.get("resumed", 0) == 0
        assert send(node.port, sources[2:3]) == [0]
        assert node.wait_idle(60)
    assert [r["ImageId"] for r in rows(out)] == uids and all(r["Status"] == "ok" for r in rows(out))
    assert (out / RESULTS).read_bytes().endswith(b"\n") and b"\n\n" not in (out / RESULTS).read_bytes()
    assert [(r["ImageId"], r["Error"]) for r in forwarded(out)] == [(uids[0], "Association rejected, twice")]


def test_a_row_cut_by_a_kill_is_removed_at_restart_even_with_all_its_fields(predictor, sources, tmp_path):
    out = tmp_path / "node"
    with DicomNode(predictor, out, port=0):
        pass
    uid = pydicom.dcmread(sources[0]).SOPInstanceUID
    (out / INCOMING).mkdir(exist_ok=True)
    shutil.copy(sources[0], out / INCOMING / f"{uid}.dcm")
    # cut inside the last field (Overlay): every field is there, but its image was not yet removed
    with open(out / RESULTS, "a") as f:
        f.write(f"{uid},SCU,2026-01-01T00:00:00+00:00,2026-01-01T00:00:01+00:00,ok,0.9,1,1,1 2,seg/{uid}.dcm,,,"
                f"dicom-overlay/{uid[:5]}")
    with DicomNode(predictor, out, port=0) as node:
        assert node.stats["resumed"] == 1
        assert node.wait_idle(60)
    assert [(r["ImageId"], r["Caller"]) for r in rows(out)] == [(uid, "")]  # predicted again, the cut row gone
    assert list((out / INCOMING).iterdir()) == []
    header = ",".join(FORWARD_COLUMNS)
    # forwarded.csv cut inside the overlay's path, or inside a quoted Error
    for cut in (f"{uid},2026-01-01T00:00:01+00:00,,2026-01-01T00:00:02+00:00,yes,,dicom-overlay/{uid[:5]}",
                f"{uid},2026-01-01T00:00:01+00:00,seg/{uid}.dcm,2026-01-01T00:00:02+00:00,no,\"refused, an"):
        (out / FORWARDED).write_text(f"{header}\n{cut}", encoding="utf-8")
        with DicomNode(predictor, out, port=0):
            pass
        assert (out / FORWARDED).read_text(encoding="utf-8") == header + "\n"


def test_the_node_logs_and_records_no_patient_data(predictor, tmp_path, caplog):
    from test_phi_canary import canaries, canary_dicom

    raw = (phantom_images(1)[0].astype(np.uint16) * 16)
    good = canary_dicom(tmp_path / "good.dcm", raw)
    bad = pydicom.dcmread(canary_dicom(tmp_path / "bad.dcm", raw))
    bad.PixelData = bad.PixelData[:100]
    no_rows = pydicom.dcmread(canary_dicom(tmp_path / "norows.dcm", raw, Rows=None))
    out = tmp_path / "node"
    with caplog.at_level(logging.DEBUG, logger="pneumoseg"), \
            DicomNode(predictor, out, port=0, forward="PACS@127.0.0.1:9", forward_attempts=1, log_every_s=0) as node:
        send(node.port, [good, bad, no_rows])
        assert node.wait_idle(60)
    assert len(rows(out)) == 2 and caplog.records
    assert canaries((out / RESULTS).read_bytes()) == set()
    assert canaries("\n".join(r.getMessage() for r in caplog.records).encode()) == set()


def test_bad_arguments():
    with pytest.raises(InvalidInputError, match="AET@HOST:PORT"):
        parse_forward("PACS:104")
    assert parse_forward("PACS@10.0.0.5:104") == ("PACS", "10.0.0.5", 104)
    for kwargs in ({"ae_title": "X" * 17}, {"allowed_callers": []}, {"max_queue": 0}, {"forward": "a@b:70000"},
                   {"forward": "A@h:1", "write_seg": False}):
        with pytest.raises(InvalidInputError):
            DicomNode(object(), "unused", **kwargs)
    # the peer bounds: each named, a ValueError (InvalidInputError); 0 is no "unlimited" here
    for name, value in (("max_associations", 0), ("max_associations", 1025), ("max_associations", 2.5),
                        ("acse_timeout_s", 0), ("acse_timeout_s", float("nan")), ("network_timeout_s", -1),
                        ("network_timeout_s", float("inf")), ("dimse_timeout_s", 0.05), ("dimse_timeout_s", "30"),
                        ("max_pdu_bytes", 0), ("max_pdu_bytes", 1024), ("max_pdu_bytes", 1 << 30)):
        with pytest.raises(InvalidInputError, match=name) as caught:
            DicomNode(object(), "unused", **{name: value})
        assert isinstance(caught.value, ValueError)
    node = DicomNode(object(), "unused")
    assert (node.max_associations, node.acse_timeout_s, node.network_timeout_s, node.dimse_timeout_s,
            node.max_pdu_bytes) == (4, 30.0, 60.0, 30.0, 16382)


def test_cli_argument_errors_are_one_line(tmp_path, capsys):
    model = str(model_dir("classifier"))
    base = ["listen", "--model", model, "--out", str(tmp_path / "o"), "--device", "cpu", "--backend", "torch"]
    for extra, message in ((["--forward", "PACS"], "AET@HOST:PORT"), (["--ae-title", "A" * 17], "AE title"),
                           (["--allow", "A,,B"], "AE title"), (["--port", "70000"], "--port"),
                           (["--no-seg", "--forward", "P@h:1"], "--no-seg"),
                           (["--max-associations", "0"], "--max-associations"), (["--acse-timeout", "0"], "--acse-timeout"),
                           (["--network-timeout", "nan"], "--network-timeout"), (["--dimse-timeout", "x"], "--dimse-timeout"),
                           (["--max-pdu-size", "0"], "--max-pdu-size")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("pneumoseg: error: ") and err.count("\n") == 1 and message in err
    with socket.socket() as taken:  # a port in use is the user's to change
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(base + ["--port", str(taken.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert "cannot listen on 127.0.0.1" in err and err.count("\n") == 1
    assert not any((tmp_path / "o").glob("incoming/*"))


def test_listen_gives_the_node_its_peer_bounds(tmp_path, monkeypatch, capsys):
    from pneumoseg.serve import node as node_module

    given = {}

    class Recorded:
        def __init__(self, predictor, out, **kwargs):
            given.update(kwargs)
            raise node_module.NodeError("recorded")

    monkeypatch.setattr(node_module, "DicomNode", Recorded)
    base = ["listen", "--model", str(model_dir("classifier")), "--out", str(tmp_path / "o"), "--device", "cpu",
            "--backend", "torch"]
    assert main(base) == 2
    keys = ("max_associations", "acse_timeout_s", "network_timeout_s", "dimse_timeout_s", "max_pdu_bytes")
    assert [given[k] for k in keys] == [4, 30.0, 60.0, 30.0, 16382]  # DicomNode's own defaults
    assert main(base + ["--max-associations", "9", "--acse-timeout", "2.5", "--network-timeout", "7",
                        "--dimse-timeout", "11", "--max-pdu-size", "65536"]) == 2
    assert [given[k] for k in keys] == [9, 2.5, 7.0, 11.0, 65536]
    assert "recorded" in capsys.readouterr().err


def test_cli_listens_until_sigint(sources, tmp_path):
    out = tmp_path / "o"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pneumoseg", "listen", "--model", str(model_dir("classifier")),
                             "--out", str(out), "--port", "0", "--device", "cpu", "--backend", "torch"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        port = None
        deadline = time.monotonic() + 60
        lines = []
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            if line.startswith("listening as PNEUMOSEG on 127.0.0.1:"):
                port = int(line.split("127.0.0.1:")[1].split()[0].rstrip(";"))
            assert line or proc.poll() is None, lines
        assert port, lines
        assert send(port, sources[:1]) == [0]
        while time.monotonic() < deadline and len(rows(out)) < 1:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert [r["ImageId"] for r in rows(out)] == [pydicom.dcmread(sources[0]).SOPInstanceUID]
    assert "stopped: received 1, predicted 1" in err


# -- hostile peers ------------------------------------------------------------------------------------
def closed_within(sock, seconds):
    """Whether the node closes ``sock`` within ``seconds`` (whatever it sends first: an A-ABORT, a reject)."""
    sock.settimeout(seconds)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except (TimeoutError, socket.timeout):
        return False
    except ConnectionResetError:
        return True
    return False


def test_silent_half_garbage_and_huge_pdus_are_dropped_and_the_node_goes_on(predictor, sources, tmp_path):
    out = tmp_path / "node"
    with DicomNode(predictor, out, port=0, acse_timeout_s=0.5, network_timeout_s=1.0, max_associations=2) as node:
        peers = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(5)]
        silent, half, garbage, huge, flood = peers
        half.sendall(b"\x01\x00\x00\x00\x00\x64" + b"\x00" * 10)  # an A-ASSOCIATE-RQ of 100 bytes, 10 sent
        garbage.sendall(bytes(range(256)) * 4)
        huge.sendall(b"\x04\x00\xff\xff\xff\xff" + b"\x00" * 1000)  # a P-DATA-TF declaring 4 GiB
        flood.sendall(b"\x01\x00\x00\x00\x00\x64")
        start = time.monotonic()
        assert all(closed_within(p, 10) for p in peers)
        assert time.monotonic() - start < 8  # each by its timeout (0.5 s, 1 s), none by the test's
        for p in peers:
            p.close()
        # more peers than max_associations were connected at once; once their threads have ended (a
        # request before that may meet the limit: rejected, the PACS tries again) the next real one is served
        assert until_acceptors(node, 0)
        assert send(node.port, sources[:1]) == [0]
        assert node.wait_idle(60)
        deadline = time.monotonic() + 10
        while node._ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        assert node._ae.active_associations == []
    assert len(rows(out)) == 1


def test_an_instance_streamed_past_the_size_limit_drops_the_association_before_it_is_all_in_memory(
        predictor, sources, tmp_path):
    from pneumoseg import limits

    big = pydicom.dcmread(sources[0])
    big.SOPInstanceUID = pydicom.uid.generate_uid()
    big.add_new(0x00091010, "OB", b"\x00" * (3 << 20))  # 3 MiB of private bytes: over 64 KiB + the slack
    out = tmp_path / "node"
    with limits.override(max_dicom_bytes=64 << 10), DicomNode(predictor, out, port=0) as node:
        ae = AE(ae_title="SCU")
        ae.add_requested_context(CR, SYNTAXES)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="PNEUMOSEG")
        assert assoc.is_established
        status = assoc.send_c_store(big)
        ae.shutdown()
        assoc.dul.socket.socket.close()  # pynetdicom's requestor leaves its socket open when the peer drops it
        assert "Status" not in status  # no answer: the connection was dropped mid-instance
        assert not assoc.is_established
        assert node.stats["refused"] == 1
        # a small one still goes through, and one just over the limit is answered Out of Resources
        over = pydicom.dcmread(sources[1])
        over.add_new(0x00091010, "OB", b"\x00" * (96 << 10))
        assert send(node.port, [over, sources[2]]) == [0xA700, 0]
        assert node.wait_idle(60)
    assert len(rows(out)) == 1
    assert not list((out / INCOMING).iterdir())


def trickle(sock, data, every_s, stop):
    """Send ``data`` on ``sock`` a piece at a time (bytes, or whole PDUs from a list) every ``every_s``
    until ``stop`` is set or the node closes the connection."""
    for piece in (data if isinstance(data, list) else [data[i:i + 1] for i in range(len(data))]):
        try:
            sock.sendall(piece)
        except OSError:
            return
        if stop.wait(every_s):
            return


def test_silent_and_trickling_peers_are_dropped_within_their_timeouts_while_a_real_one_stores(
        predictor, sources, tmp_path):
    """A raw TCP peer that connects and sends nothing, or sends its association request a byte each 0.5 s
    (each byte well within the socket's timeout), is disconnected within acse_timeout_s; an association
    whose PDU comes a byte at a time, or whose DIMSE message comes as tiny whole PDUs (each in time, so
    the idle timer never fires), is aborted within network_timeout_s. Meanwhile a real C-STORE from
    another client succeeds."""
    out = tmp_path / "node"
    stop = threading.Event()
    threads = []
    with DicomNode(predictor, out, port=0, acse_timeout_s=1.0, network_timeout_s=1.5, max_pdu_bytes=4096,
                   max_associations=6) as node:
        silent = socket.create_connection(("127.0.0.1", node.port))
        slow_request = socket.create_connection(("127.0.0.1", node.port))
        # two associations that then trickle: a P-DATA-TF a byte at a time, and a command set one byte
        # per whole PDU (context 1, a command fragment that is not the last), one PDU each 0.3 s
        ae = AE(ae_title="SCU")
        ae.add_requested_context(CR, SYNTAXES)
        slow_pdu, tiny_pdus = (ae.associate("127.0.0.1", node.port, ae_title="PNEUMOSEG") for _ in range(2))
        assert slow_pdu.is_established and tiny_pdus.is_established
        context = tiny_pdus.accepted_contexts[0].context_id
        one_byte_pdu = b"\x04\x00\x00\x00\x00\x07" + b"\x00\x00\x00\x03" + bytes([context, 0x01]) + b"\x00"
        start = time.monotonic()
        for sock, data, every in ((slow_request, b"\x01\x00\x00\x00\x00\x44" + b"\x00" * 68, 0.5),
                                  (slow_pdu.dul.socket.socket, b"\x04\x00\x00\x00\x00\x64" + b"\x00" * 100, 0.4),
                                  (tiny_pdus.dul.socket.socket, [one_byte_pdu] * 100, 0.3)):
            threads.append(threading.Thread(target=trickle, args=(sock, data, every, stop), daemon=True))
            threads[-1].start()
        try:
            assert send(node.port, sources[:1]) == [0]  # a real peer is served meanwhile
            assert closed_within(silent, 5) and closed_within(slow_request, 5)
            raw_closed = time.monotonic() - start
            deadline = time.monotonic() + 6
            while (slow_pdu.is_established or tiny_pdus.is_established) and time.monotonic() < deadline:
                time.sleep(0.05)
            assoc_closed = time.monotonic() - start
            assert not slow_pdu.is_established and not tiny_pdus.is_established
        finally:
            stop.set()
            for t in threads:
                t.join(5)
            for sock in (silent, slow_request):
                sock.close()
            ae.shutdown()
            for assoc in (slow_pdu, tiny_pdus):  # pynetdicom's requestor leaves its socket open when the peer drops it
                sock = getattr(assoc.dul.socket, "socket", None)
                if sock is not None:
                    sock.close()
        assert raw_closed < 3.5, raw_closed  # acse_timeout_s (1 s) and some; the request needed 37 s
        assert assoc_closed < 4.5, assoc_closed  # network_timeout_s (1.5 s) and some
        assert node.wait_idle(60)
        assert node.stats["refused"] >= 3  # the slow request, the slow PDU, the tiny PDUs: each logged
    assert len(rows(out)) == 1


def until_acceptors(node, n, timeout_s=10):
    """Whether the node's open connections (association threads) come to ``n`` within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sum(1 for a in node._ae.active_associations if a.is_acceptor) == n:
            return True
        time.sleep(0.02)
    return False


def test_the_association_over_max_associations_is_rejected_while_the_others_are_held(predictor, sources, tmp_path):
    """With N associations held, the (N+1)-th is rejected (A-ASSOCIATE-RJ, transient, local limit exceeded)
    and a connection beyond 2N that has requested nothing is closed at once (not after acse_timeout_s);
    once one is released a new one is served."""
    out = tmp_path / "node"
    ae = AE(ae_title="SCU")
    ae.add_requested_context(CR, SYNTAXES)
    with DicomNode(predictor, out, port=0, max_associations=2, acse_timeout_s=5.0) as node:
        held = [ae.associate("127.0.0.1", node.port, ae_title="PNEUMOSEG") for _ in range(2)]
        try:
            assert all(a.is_established for a in held)
            over = ae.associate("127.0.0.1", node.port, ae_title="PNEUMOSEG")
            assert over.is_rejected and not over.is_established
            assert (over.acceptor.primitive.result, over.acceptor.primitive.result_source,
                    over.acceptor.primitive.diagnostic) == (0x02, 0x03, 0x02)
            assert until_acceptors(node, 2)  # the rejected one's thread has ended
            idle = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(2)]
            assert until_acceptors(node, 4)  # 2N open now
            extra = socket.create_connection(("127.0.0.1", node.port))
            try:
                start = time.monotonic()
                assert closed_within(extra, 3) and time.monotonic() - start < 2  # not the 5 s acse_timeout_s
                assert not any(closed_within(s, 0.2) for s in idle)  # those wait out their own timeout
            finally:
                for sock in (*idle, extra):
                    sock.close()
            assert int(held[0].send_c_store(pydicom.dcmread(sources[0])).Status) == 0  # the held ones still work
        finally:
            for assoc in held:
                assoc.release()
        assert until_acceptors(node, 0)
        assert send(node.port, sources[1:2]) == [0]
        assert node.wait_idle(60)
    ae.shutdown()
    assert len(rows(out)) == 2


def send_under(port, path, request_uid, tmp_path, monkeypatch):
    """C-STORE the data set in ``path`` under another Affected SOP Instance UID (pynetdicom's chunked
    sending takes the request's UID from the file meta and the data set's bytes from the file)."""
    ds = pydicom.dcmread(path)
    forged = tmp_path / f"forged-{len(list(tmp_path.glob('forged-*')))}.dcm"
    with warnings.catch_warnings():  # pydicom warns of a UID that is not one: that is the point
        warnings.simplefilter("ignore")
        ds.file_meta.MediaStorageSOPInstanceUID = request_uid
        ds.save_as(forged, enforce_file_format=False)
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _send_path(port, forged)
    finally:
        monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", False)


def _send_path(port, path):
    ae = AE(ae_title="SCU")
    ae.add_requested_context(CR, SYNTAXES)
    assoc = ae.associate("127.0.0.1", port, ae_title="PNEUMOSEG")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(path).Status)
    finally:
        assoc.release()
        ae.shutdown()


def test_a_request_uid_unlike_the_headers_or_not_a_uid_is_refused_and_names_no_file(predictor, sources, tmp_path,
                                                                                      monkeypatch):
    out = tmp_path / "node"
    header_uid = pydicom.dcmread(sources[0]).SOPInstanceUID
    with DicomNode(predictor, out, port=0) as node:
        assert send_under(node.port, sources[0], pydicom.uid.generate_uid(), tmp_path, monkeypatch) == 0xC000
        # (pynetdicom's requestor will not send a UID over 64 characters or an empty one)
        for bad in ("../../escaped", "1.2/../../3", "1.2.3.", "1.02.3 "):
            assert send_under(node.port, sources[0], bad, tmp_path, monkeypatch) == 0xC000, bad
        assert send_under(node.port, sources[0], header_uid, tmp_path, monkeypatch) == 0  # the control
        assert node.wait_idle(60)
    assert [r["ImageId"] for r in rows(out)] == [header_uid]
    assert sorted(p.name for p in out.rglob("*") if p.is_file() and "escaped" in str(p)) == []
    assert not (tmp_path / "escaped").exists() and not list((out / INCOMING).iterdir())


def test_results_csv_deleted_or_saved_by_an_editor_while_running_keeps_whole_rows(predictor, sources, tmp_path):
    out = tmp_path / "node"
    with DicomNode(predictor, out, port=0, batch_size=1) as node:
        (out / RESULTS).unlink()  # a user clearing it
        assert send(node.port, sources[:1]) == [0]
        assert node.wait_idle(60)
        assert len(rows(out)) == 1  # rows() checks the header
        with open(out / RESULTS, "rb+") as f:  # an editor saving without the final newline
            f.truncate(len(f.read()) - 1)
        assert send(node.port, sources[1:2]) == [0]
        assert node.wait_idle(60)
    uids = [pydicom.dcmread(p).SOPInstanceUID for p in sources[:2]]
    assert [r["ImageId"] for r in rows(out)] == uids and all(r["Status"] == "ok" for r in rows(out))


def test_a_failing_disk_answers_out_of_resources_and_the_pacs_can_send_again(predictor, sources, tmp_path,
                                                                             monkeypatch):
    import errno

    from pneumoseg import _fs

    real = _fs.atomic_open

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = tmp_path / "node"
    with DicomNode(predictor, out, port=0) as node:
        monkeypatch.setattr(_fs, "atomic_open", full)
        assert send(node.port, sources[:1]) == [0xA700]
        monkeypatch.setattr(_fs, "atomic_open", real)
        shutil.rmtree(out / INCOMING)  # the folder deleted under it: made again
        assert send(node.port, sources[:1]) == [0]
        assert node.wait_idle(60)
    assert len(rows(out)) == 1


def test_a_debug_run_with_pynetdicoms_own_log_shows_no_patient_data(predictor, tmp_path, caplog):
    from test_phi_canary import canaries, canary_dicom

    good = canary_dicom(tmp_path / "good.dcm", phantom_images(1)[0].astype(np.uint16) * 16)
    pynetdicom_logger = logging.getLogger("pynetdicom")
    before = (pynetdicom_logger.level, list(pynetdicom_logger.handlers))
    with caplog.at_level(logging.DEBUG):  # the root logger: a user's basicConfig(level=DEBUG)
        with DicomNode(predictor, tmp_path / "node", port=0, log_every_s=0) as node:
            assert (pynetdicom_logger.level, pynetdicom_logger.handlers) == before  # the node never turns it on
            assert send(node.port, [good]) == [0]
            assert node.wait_idle(60)
    names = {r.name.split(".")[0] for r in caplog.records}
    assert {"pneumoseg", "pynetdicom"} <= names and any(r.levelno == logging.DEBUG and r.name.startswith("pynetdicom")
                                                        for r in caplog.records)
    assert canaries("\n".join(r.getMessage() for r in caplog.records).encode()) == set()


def test_a_forward_destination_that_takes_a_c_store_and_never_answers_is_given_up_after_dimse_timeout_s(
        predictor, sources, tmp_path):
    held = threading.Event()
    pacs = AE(ae_title="PACS")
    pacs.add_supported_context(SEGMENTATION_STORAGE, ["1.2.840.10008.1.2.1"])
    server = pacs.start_server(("127.0.0.1", 0), block=False,
                               evt_handlers=[(evt.EVT_C_STORE, lambda e: held.wait(20) and 0)])
    try:
        out = tmp_path / "node"
        with DicomNode(predictor, out, port=0, forward=f"PACS@127.0.0.1:{server.server_address[1]}",
                       forward_attempts=1, dimse_timeout_s=1.0) as node:
            start = time.monotonic()
            assert send(node.port, sources[:6]) == [0] * 6
            assert node.wait_idle(15)
            took = time.monotonic() - start
    finally:
        held.set()
        pacs.shutdown()
    queued = [r for r in rows(out) if r["Forwarded"] == "queued"]
    sent = forwarded(out)
    assert queued and len(sent) == len(queued) and {r["Forwarded"] for r in sent} == {"no"}
    assert any(r["Error"].startswith("no answer") for r in sent)
    assert took < 10, took  # each association given up after 1 s, not pynetdicom's 30


def test_a_forward_destination_that_never_answers_delays_no_prediction_nor_the_stop(predictor, sources, tmp_path):
    hole = socket.create_server(("127.0.0.1", 0))  # accepts (the kernel does) and never answers
    received = []
    pacs = AE(ae_title="PACS")
    pacs.add_supported_context(SEGMENTATION_STORAGE, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    try:
        out = tmp_path / "node"
        node = DicomNode(predictor, out, port=0, forward=f"PACS@127.0.0.1:{hole.getsockname()[1]}",
                         forward_backoff_s=0.0).start()
        try:
            assert send(node.port, sources[:6]) == [0] * 6
            deadline = time.monotonic() + 20
            while len(rows(out)) < 6 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(rows(out)) == 6  # predicted while the first SEG waits for an answer (30 s)
            queued = [r for r in rows(out) if r["Forwarded"] == "queued"]
            assert queued and not (out / FORWARDED).exists()
        finally:
            start = time.monotonic()
            node.stop(timeout_s=0.2)
            assert time.monotonic() - start < 5
        # the next start sends what the stopped one had not, once
        server = pacs.start_server(("127.0.0.1", 0), block=False,
                                   evt_handlers=[(evt.EVT_C_STORE, lambda e: received.append(e.dataset) or 0)])
        with DicomNode(predictor, out, port=0, forward=f"PACS@127.0.0.1:{server.server_address[1]}") as again:
            assert again.wait_idle(60)
    finally:
        pacs.shutdown()
        hole.close()
    assert sorted(r["ImageId"] for r in forwarded(out)) == sorted(r["ImageId"] for r in queued)
    assert {r["Forwarded"] for r in forwarded(out)} == {"yes"} and len(received) == len(queued)


EXPLICIT_LE = "1.2.840.10008.1.2.1"


class Pacs:
    """An in-test storage SCP for SEGs and Secondary Captures in Explicit VR Little Endian only: what it
    received, under which context, in which association."""

    def __init__(self):
        self.received = []  # (SOPInstanceUID, SOPClassUID, context's SOP class, its transfer syntax, association)
        ae = AE(ae_title="PACS")
        for sop_class in (SEGMENTATION_STORAGE, SECONDARY_CAPTURE_STORAGE):
            ae.add_supported_context(sop_class, [EXPLICIT_LE])
        self.ae = ae
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self.on_store)])
        self.forward = f"PACS@127.0.0.1:{self.server.server_address[1]}"

    def on_store(self, event):
        ds = event.dataset
        self.received.append((ds.SOPInstanceUID, ds.SOPClassUID, event.context.abstract_syntax,
                              event.context.transfer_syntax, id(event.assoc)))
        return 0

    def close(self):
        self.ae.shutdown()


def referenced(ds):
    return ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID


def test_the_overlay_is_written_per_positive_forwarded_with_the_seg_and_a_left_over_one_sent_at_restart(
        predictor, sources, tmp_path):
    pacs = Pacs()
    try:
        out = tmp_path / "node"
        with DicomNode(predictor, out, port=0, forward=pacs.forward, write_overlay=True) as node:
            assert send(node.port, sources[:6]) == [0] * 6
            assert node.wait_idle(60)
        results = rows(out)
        positives = [r for r in results if r["Positive"] == "1"]
        assert 0 < len(positives) < 6 and all(r["Error"] == "" for r in results)
        written = {}
        for r in results:
            path = out / "dicom-overlay" / f"{r['ImageId']}.dcm"
            assert path.is_file() == (r["Positive"] == "1")
            assert r["Overlay"] == (f"dicom-overlay/{r['ImageId']}.dcm" if path.is_file() else "")
            if path.is_file():
                sc = pydicom.dcmread(path)
                assert sc.SOPClassUID == SECONDARY_CAPTURE_STORAGE and referenced(sc) == r["ImageId"]
                assert sc.file_meta.TransferSyntaxUID == EXPLICIT_LE
                written[sc.SOPInstanceUID] = SECONDARY_CAPTURE_STORAGE
                seg = pydicom.dcmread(out / r["Seg"])
                written[seg.SOPInstanceUID] = SEGMENTATION_STORAGE
        # each object under its own SOP class, in Explicit VR Little Endian; an image's two in one association
        assert sorted((uid, cls) for uid, cls, *_ in pacs.received) == sorted(written.items())
        assert all(cls == context and syntax == EXPLICIT_LE for _, cls, context, syntax, _ in pacs.received)
        assert len({assoc for *_, assoc in pacs.received}) <= len(positives)
        sent = forwarded(out)
        assert len(sent) == 2 * len(positives) and {r["Forwarded"] for r in sent} == {"yes"}
        assert sorted((r["ImageId"], r["Predicted"], r["Seg"], r["Overlay"]) for r in sent) == sorted(
            [(r["ImageId"], r["Done"], r["Seg"], "") for r in positives]
            + [(r["ImageId"], r["Done"], "", r["Overlay"]) for r in positives])

        # killed after sending one overlay and before its row: the next start sends that overlay (only)
        lost = next(r for r in sent if r["Overlay"])
        with open(out / FORWARDED, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, FORWARD_COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(r for r in sent if r is not lost)
        before = len(pacs.received)
        with DicomNode(predictor, out, port=0, forward=pacs.forward, write_overlay=True) as again:
            assert again.wait_idle(60)
        again_sent = pacs.received[before:]
        assert [cls for _, cls, *_ in again_sent] == [SECONDARY_CAPTURE_STORAGE]
        assert again_sent[0][0] == pydicom.dcmread(out / lost["Overlay"]).SOPInstanceUID
        assert len(forwarded(out)) == len(sent) and forwarded(out)[-1]["Overlay"] == lost["Overlay"]
    finally:
        pacs.close()


def test_no_seg_with_the_overlay_forwards_the_overlays_only(predictor, sources, tmp_path):
    pacs = Pacs()
    try:
        out = tmp_path / "node"
        with DicomNode(predictor, out, port=0, forward=pacs.forward, write_seg=False, write_overlay=True) as node:
            assert send(node.port, sources[:6]) == [0] * 6
            assert node.wait_idle(60)
    finally:
        pacs.close()
    results = rows(out)
    overlays = [r["Overlay"] for r in results if r["Positive"] == "1"]
    assert overlays and all(overlays) and not (out / "seg").exists() and {r["Seg"] for r in results} == {""}
    assert {r["Forwarded"] for r in results if r["Overlay"]} == {"queued"}
    assert sorted(cls for _, cls, *_ in pacs.received) == [SECONDARY_CAPTURE_STORAGE] * len(overlays)
    assert sorted(r["Overlay"] for r in forwarded(out)) == sorted(overlays)
    with pytest.raises(InvalidInputError, match="write_overlay"):
        DicomNode(object(), "unused", forward=pacs.forward, write_seg=False)


def test_an_overlay_that_cannot_be_written_is_recorded_and_the_seg_still_sent(predictor, sources, tmp_path,
                                                                            monkeypatch):
    from pneumoseg.errors import DicomError
    from pneumoseg.infer import dicom_overlay

    def broken(*args, **kwargs):
        raise DicomError("cannot draw it")

    monkeypatch.setattr(dicom_overlay, "build_dicom_overlay", broken)
    out = tmp_path / "node"
    with DicomNode(predictor, out, port=0, write_overlay=True) as node:
        assert send(node.port, sources[:6]) == [0] * 6
        assert node.wait_idle(60)
    positives = [r for r in rows(out) if r["Positive"] == "1"]
    assert positives and all(r["Status"] == "ok" and r["Seg"] and r["Overlay"] == "" and
                             r["Error"].startswith("no overlay: ") and "cannot draw it" in r["Error"] for r in positives)
    assert not any((out / "dicom-overlay").glob("*"))


class Replacing:
    """A predictor that, once the batch is predicted, puts another image (a new SOPInstanceUID, another
    patient, 8 x 8 pixels) in the first positive image's file: what a file swapped on disk between the
    prediction and its SEG looks like."""

    def __init__(self, inner):
        self.inner, self.replaced = inner, []
        self.backend, self.model_dir = inner.backend, inner.model_dir

    def predict(self, *args, **kwargs):
        predictions = self.inner.predict(*args, **kwargs)
        for p in predictions:
            if p.positive and not self.replaced:
                write_dicom(p.path, np.arange(64, dtype=np.uint16).reshape(8, 8), PatientName="Other^Patient")
                self.replaced.append(p.image_id)
        return predictions


def test_a_received_file_replaced_before_its_seg_gets_no_seg_nor_overlay(predictor, sources, tmp_path):
    """The node builds the SEG and the overlay only over the image received under that SOPInstanceUID:
    one whose file now holds another image, of another size, gets neither, each refused as another
    image (not as a size mismatch); the other positives get both."""
    replacing = Replacing(predictor)
    out = tmp_path / "node"
    with DicomNode(replacing, out, port=0, write_overlay=True) as node:
        assert send(node.port, sources[:6]) == [0] * 6
        assert node.wait_idle(60)
    results = {r["ImageId"]: r for r in rows(out)}
    assert len(replacing.replaced) == 1
    row = results[replacing.replaced[0]]
    assert row["Status"] == "ok" and row["Positive"] == "1" and row["Seg"] == row["Overlay"] == ""
    another = "the file now holds another image (its SOPInstanceUID is not the one it was received under)"
    assert row["Error"] == f"no SEG: {another}; no overlay: {another}"
    others = [r for uid, r in results.items() if r["Positive"] == "1" and uid not in replacing.replaced]
    assert others and all(r["Seg"] and r["Overlay"] and not r["Error"] for r in others)
    for path in [*(out / "seg").glob("*.dcm"), *(out / "dicom-overlay").glob("*.dcm")]:
        assert b"Other^Patient" not in path.read_bytes()


def test_both_outputs_are_built_from_one_read_of_the_received_file(predictor, sources, tmp_path, monkeypatch):
    """With the SEG and the overlay, a positive image's file is parsed once more than a negative's (for
    the prediction): once for both outputs, not once each."""
    from pneumoseg.data import dicom

    reads = []
    real = dicom._read_dataset

    def counted(f, path, **kwargs):
        reads.append(Path(path).name)
        return real(f, path, **kwargs)

    monkeypatch.setattr(dicom, "_read_dataset", counted)
    out = tmp_path / "node"
    with DicomNode(predictor, out, port=0, write_overlay=True) as node:
        assert send(node.port, sources[:6]) == [0] * 6
        assert node.wait_idle(60)
    results = rows(out)
    positive = {r["ImageId"] for r in results if r["Positive"] == "1"}
    assert 0 < len(positive) < 6 and all(r["Seg"] and r["Overlay"] for r in results if r["ImageId"] in positive)
    counts = {r["ImageId"]: reads.count(f"{r['ImageId']}.dcm") for r in results}
    negatives = {counts[uid] for uid in counts if uid not in positive}
    assert len(negatives) == 1 and {counts[uid] for uid in positive} == {negatives.pop() + 1}


def test_an_earlier_nodes_csv_files_get_the_new_columns_and_keep_their_rows(predictor, tmp_path):
    out = tmp_path / "node"
    with DicomNode(predictor, out, port=0):
        pass
    old = {RESULTS: RESULT_COLUMNS[:-1], FORWARDED: FORWARD_COLUMNS[:-1]}
    for name, columns in old.items():  # as a node before the overlay wrote them
        (out / name).write_text(",".join(columns) + "\n" + ",".join(f"{name}-{c}" for c in columns) + "\n")
    with DicomNode(predictor, out, port=0):
        pass
    assert rows(out) == [{**{c: f"{RESULTS}-{c}" for c in old[RESULTS]}, "Overlay": None}]
    assert forwarded(out) == [{**{c: f"{FORWARDED}-{c}" for c in old[FORWARDED]}, "Overlay": None}]


def test_listen_out_the_model_directory_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """--out MODEL_DIR made the model directory a node folder (its manifest relabelled), after which a
    save or export into it was refused as another command's output."""
    from infer_helpers import copy_model_dir, file_digests

    model = copy_model_dir("classifier", tmp_path / "model")
    before = file_digests(model)
    monkeypatch.setattr(Predictor, "from_dir", lambda *a, **k: pytest.fail("the model was loaded"))
    for out in (model, model / "node"):
        assert main(["listen", "--model", str(model), "--out", str(out), "--no-seg"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"DICOM node folder {out}" in err and "an input of this command" in err
    assert file_digests(model) == before and not (model / "node").exists()


def test_listen_dicom_overlay_without_highdicom_says_so_before_the_model_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "highdicom", None)
    monkeypatch.setattr(Predictor, "from_dir", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "o"
    assert main(["listen", "--model", str(tmp_path), "--out", str(out), "--no-seg", "--dicom-overlay"]) == 2
    err = capsys.readouterr().err
    assert err == ("pneumoseg: error: DICOM overlay output needs highdicom, which is not installed: "
                   "pip install 'pneumoseg[pacs]'\n")
    assert not out.exists()


@pytest.mark.parametrize("package, require, needed_for", [
    ("highdicom", "pneumoseg.infer._dicom_derived:require_highdicom", "DICOM Segmentation output"),
    ("pynetdicom", "pneumoseg.serve.node:require_pynetdicom", "the DICOM node")])
def test_a_missing_or_broken_highdicom_or_pynetdicom(tmp_path, monkeypatch, package, require, needed_for):
    import importlib

    module, name = require.split(":")
    require = getattr(importlib.import_module(module), name)
    monkeypatch.setitem(sys.modules, package, None)  # `import <package>`: ModuleNotFoundError for it
    with pytest.raises(InvalidInputError) as info:
        require()
    assert str(info.value) == f"{needed_for} needs {package}, which is not installed: pip install 'pneumoseg[pacs]'"

    # installed, and failing while it loads (a dependency of its own missing): not called missing
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("import pneumoseg_no_such_dependency\n")
    monkeypatch.delitem(sys.modules, package)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(InvalidInputError) as info:
        require()
    message = str(info.value)
    assert message.startswith(f"{needed_for} needs {package}, which is installed but failed to import (")
    assert "pneumoseg_no_such_dependency" in message and "not installed" not in message
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


def excel(path, columns):
    """``path`` saved as Excel's "CSV UTF-8" saves it: a BOM, CRLF line ends, only ``columns``."""
    with open(path, encoding="utf-8", newline="") as f:
        table = [{c: r.get(c) or "" for c in columns} for r in csv.DictReader(f)]
    with open(path, "w", encoding="utf-8-sig", newline="") as f:
        writer = csv.DictWriter(f, columns, lineterminator="\r\n")
        writer.writeheader()
        writer.writerows(table)
    return table


def test_csv_files_an_excel_saved_with_a_bom_and_crlf_are_read_and_upgraded_and_nothing_sent_twice(
        predictor, sources, tmp_path):
    pacs = Pacs()
    try:
        out = tmp_path / "node"
        with DicomNode(predictor, out, port=0, forward=pacs.forward) as node:
            assert send(node.port, sources[:6]) == [0] * 6
            assert node.wait_idle(60)
        sent = len(pacs.received)
        assert sent > 0
        # an earlier node's files (no Overlay column), then opened and saved in Excel while stopped
        results = excel(out / RESULTS, RESULT_COLUMNS[:-1])
        done = excel(out / FORWARDED, FORWARD_COLUMNS[:-1])
        with DicomNode(predictor, out, port=0, forward=pacs.forward) as node:
            assert node.wait_idle(60)
        assert len(pacs.received) == sent  # forwarded.csv's rows still answer the queued ones
        for name, columns, table in ((RESULTS, RESULT_COLUMNS, results), (FORWARDED, FORWARD_COLUMNS, done)):
            with open(out / name, encoding="utf-8-sig", newline="") as f:
                reader = csv.DictReader(f)
                assert tuple(reader.fieldnames) == columns
                assert [{c: r[c] for c in columns[:-1]} for r in reader] == table
    finally:
        pacs.close()


def test_a_csv_header_the_node_does_not_write_is_refused_at_start_and_the_file_left_as_it_was(predictor, tmp_path):
    from pneumoseg.serve.node import NodeError

    out = tmp_path / "node"
    with DicomNode(predictor, out, port=0):
        pass
    row = ",".join(f"v{i}" for i in range(len(RESULT_COLUMNS)))
    for header in (",".join(reversed(RESULT_COLUMNS)),  # reordered: appended rows would land under other names
                   ",".join(RESULT_COLUMNS[:-1] + ("Notes",)),  # an earlier node's, with a column of the user's
                   ",".join(RESULT_COLUMNS[:3])):
        text = f"{header}\n{row}\n".encode()
        (out / RESULTS).write_bytes(text)
        with pytest.raises(NodeError, match="results.csv.*header"):
            DicomNode(predictor, out, port=0).start()
        assert (out / RESULTS).read_bytes() == text
    # the node's columns with one of the user's after them: kept, and the node's rows go on
    (out / RESULTS).write_text(",".join(RESULT_COLUMNS + ("Notes",)) + "\n", encoding="utf-8")
    with DicomNode(predictor, out, port=0):
        pass
    with open(out / RESULTS, encoding="utf-8", newline="") as f:
        assert tuple(csv.DictReader(f).fieldnames) == RESULT_COLUMNS + ("Notes",)
    # a header cut by a kill as it was written is still emptied and written again, not refused
    (out / RESULTS).write_bytes(b"ImageId,Cal")
    # a kill during an earlier header's upgrade: the old file whole, and the upgrade's temporary file
    (out / FORWARDED).write_text(",".join(FORWARD_COLUMNS[:-1]) + "\n1.2,t,seg/1.2.dcm,t,yes,\n", encoding="utf-8")
    (out / f".{FORWARDED}.pneumoseg-abcdefgh.tmp").write_text(",".join(FORWARD_COLUMNS) + "\n1.2,t,se")
    (out / "seg").mkdir(exist_ok=True)  # and a SEG's, killed while it was written
    (out / "seg" / ".1.2.dcm.pneumoseg-abcdefgh.tmp").write_bytes(b"DICM")
    with DicomNode(predictor, out, port=0):
        pass
    assert rows(out) == [] and forwarded(out) == [{**dict.fromkeys(FORWARD_COLUMNS, ""), "ImageId": "1.2",
                                                   "Predicted": "t", "Seg": "seg/1.2.dcm", "Done": "t",
                                                   "Forwarded": "yes", "Overlay": None}]
    assert not list(out.glob(f".{FORWARDED}.*.tmp")) and not list((out / "seg").iterdir())



class PickyPacs(Pacs):
    """A Pacs that takes ``classes`` only (the others' contexts rejected at association), answers 0xA700
    to its first C-STORE (``fail_first``), and keeps each association it accepted."""

    def __init__(self, classes=(SEGMENTATION_STORAGE,), fail_first=False):
        self.received, self.tries, self.associations, self.connections = [], [], [], []
        self.fail_first = fail_first
        ae = AE(ae_title="PACS")
        ae.acse_timeout = 2  # a connection that requests no association is dropped after it (30 s by default)
        for sop_class in classes:
            ae.add_supported_context(sop_class, [EXPLICIT_LE])
        self.ae = ae
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[
            (evt.EVT_C_STORE, self.on_store), (evt.EVT_ACCEPTED, lambda e: self.associations.append(e.assoc)),
            (evt.EVT_CONN_OPEN, lambda e: self.connections.append(e.address))])
        self.forward = f"PACS@127.0.0.1:{self.server.server_address[1]}"

    def on_store(self, event):
        self.tries.append(event.request.AffectedSOPInstanceUID)
        if self.fail_first and len(self.tries) == 1:
            return 0xA700
        return super().on_store(event)


def test_a_destination_that_refuses_the_overlays_class_and_fails_one_seg_once(predictor, sources, tmp_path):
    pacs = PickyPacs(fail_first=True)
    try:
        out = tmp_path / "node"
        with DicomNode(predictor, out, port=0, forward=pacs.forward, write_overlay=True, forward_attempts=3,
                       forward_backoff_s=0.0) as node:
            assert send(node.port, sources[:6]) == [0] * 6
            assert node.wait_idle(60)  # not stuck on the refused class
    finally:
        pacs.close()
    positives = [r for r in rows(out) if r["Positive"] == "1"]
    seg_uids = {pydicom.dcmread(out / r["Seg"]).SOPInstanceUID for r in positives}
    assert positives and len(seg_uids) == len(positives)
    sent = forwarded(out)
    segs, overlays = [r for r in sent if r["Seg"]], [r for r in sent if r["Overlay"]]
    assert len(segs) == len(overlays) == len(positives)
    assert {r["Forwarded"] for r in segs} == {"yes"} and {r["Forwarded"] for r in overlays} == {"no"}
    # recorded as not sent, saying it was its class, after every attempt; the file kept
    assert all("Secondary Capture" in r["Error"] and r["Error"].endswith("(3 attempts)") for r in overlays)
    assert all((out / r["Overlay"]).is_file() for r in overlays)
    # every SEG stored once; only the one answered 0xA700 was sent twice
    assert sorted(uid for uid, *_ in pacs.received) == sorted(seg_uids)
    assert len(pacs.tries) == len(seg_uids) + 1 and pacs.tries.count(pacs.tries[0]) == 2


def open_fds():
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files through /proc")
def test_a_backlog_goes_32_objects_an_association_and_threads_and_files_stay_flat(predictor, sources, tmp_path):
    pacs = PickyPacs(classes=(SEGMENTATION_STORAGE, SECONDARY_CAPTURE_STORAGE))
    try:
        out = tmp_path / "node"
        with DicomNode(predictor, out, port=0, forward=pacs.forward, batch_size=6) as node:
            baseline, fds = None, None
            for _ in range(8):  # each round: the images again, predicted again, their SEGs forwarded again
                assert send(node.port, sources[:6]) == [0] * 6
                assert node.wait_idle(60)
                # no thread left behind once the associations have ended (the destination's too: a bare
                # probe connection per batch held one of its 10 for its ARTIM timeout, and soon it refused
                # the node); the first round starts pynetdicom's and torch's own
                deadline = time.monotonic() + 5
                while ((pacs.ae.active_associations or node._ae.active_associations or baseline is not None
                        and set(threading.enumerate()) - baseline) and time.monotonic() < deadline):
                    time.sleep(0.01)
                if baseline is None:
                    baseline, fds = set(threading.enumerate()), open_fds()
                assert not set(threading.enumerate()) - baseline and open_fds() <= fds
        # one probe connection at the first batch (the destination not yet known up), then associations only
        assert len(pacs.connections) == len(pacs.associations) + 1
        assert len(pacs.received) == 8 * len([r for r in rows(out)[:6] if r["Positive"] == "1"]) > 0
        # 40 SEGs left queued by a stopped node: sent 32 in one association, then 8
        seg = out / rows(out)[[r["Positive"] for r in rows(out)].index("1")]["Seg"]
        with open(out / RESULTS, "a", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, RESULT_COLUMNS, lineterminator="\n")
            for i in range(40):
                uid = f"2.25.{i + 1}"
                shutil.copy(seg, out / "seg" / f"{uid}.dcm")
                writer.writerow({"ImageId": uid, "Done": "t", "Status": "ok", "Positive": 1, "Seg": f"seg/{uid}.dcm",
                                 "Forwarded": "queued"})
        pacs.received.clear()
        before = len(pacs.associations)
        with DicomNode(predictor, out, port=0, forward=pacs.forward) as node:
            assert node.wait_idle(60)
        assert len(pacs.received) == 40 and len(pacs.associations) - before == 2
        assert len([r for r in forwarded(out) if r["ImageId"].startswith("2.25.")]) == 40
    finally:
        pacs.close()


def queued_copies(out, seg, n):
    """``n`` results.csv rows queued for forwarding, each naming its own copy of ``seg``: what a node
    stopped with a backlog leaves."""
    uids = [f"2.25.{i + 1}" for i in range(n)]
    with open(out / RESULTS, "a", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, RESULT_COLUMNS, lineterminator="\n")
        for uid in uids:
            shutil.copy(seg, out / "seg" / f"{uid}.dcm")
            writer.writerow({"ImageId": uid, "Done": "t", "Status": "ok", "Positive": 1, "Seg": f"seg/{uid}.dcm",
                             "Forwarded": "queued"})
    return uids


def test_a_stop_while_a_batch_is_half_sent_records_what_was_stored_and_the_next_start_sends_the_rest(
        predictor, sources, tmp_path):
    pacs = PickyPacs()
    hold, held = threading.Event(), threading.Event()
    try:
        out = tmp_path / "node"
        with DicomNode(predictor, out, port=0, forward=pacs.forward) as node:
            assert send(node.port, sources[:6]) == [0] * 6
            assert node.wait_idle(60)
        seg = out / next(r["Seg"] for r in rows(out) if r["Seg"])
        uids = queued_copies(out, seg, 6)
        stored = len(pacs.received)
        original = pacs.on_store

        def third_waits(event):  # the destination answers the backlog's third C-STORE only after the stop
            if len(pacs.tries) == stored + 2:
                held.set()
                hold.wait(30)
            return original(event)
        pacs.server.unbind(evt.EVT_C_STORE, original)
        pacs.server.bind(evt.EVT_C_STORE, third_waits)
        node = DicomNode(predictor, out, port=0, forward=pacs.forward).start()
        assert held.wait(30)
        start = time.monotonic()
        node.stop(timeout_s=0.2)
        assert time.monotonic() - start < 5
        done = [r for r in forwarded(out) if r["ImageId"] in uids]
        assert [(r["ImageId"], r["Forwarded"]) for r in done] == [(u, "yes") for u in uids[:2]]  # none recorded 'no'
        hold.set()
        with DicomNode(predictor, out, port=0, forward=pacs.forward) as node:
            assert node.wait_idle(60)
        done = [r for r in forwarded(out) if r["ImageId"] in uids]
        assert sorted(r["ImageId"] for r in done) == sorted(uids) and {r["Forwarded"] for r in done} == {"yes"}
    finally:
        hold.set()
        pacs.close()


# -- TLS ------------------------------------------------------------------------------------------------
def self_signed(folder, name="node"):
    """(certificate, key) PEM files of a self-signed certificate for localhost / 127.0.0.1 (its own CA),
    made with the cryptography package or the openssl command; the test is skipped without either."""
    cert, key = folder / f"{name}-cert.pem", folder / f"{name}-key.pem"
    try:
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        openssl = shutil.which("openssl")
        if openssl is None:
            pytest.skip("neither the cryptography package nor the openssl command to make a certificate")
        subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={name}",
                        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                        "-addext", "basicConstraints=critical,CA:TRUE"], check=True, capture_output=True)
        return cert, key
    private = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    import ipaddress

    built = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(private.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
             .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
             .sign(private, hashes.SHA256()))
    cert.write_bytes(built.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return cert, key


def echo(port, tls=None):
    """A C-ECHO's status, or None where no association was established."""
    ae = AE(ae_title="SCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 5
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="PNEUMOSEG", tls_args=tls)
        if not assoc.is_established:
            sock = getattr(assoc.dul.socket, "socket", None)
            if sock is not None:  # pynetdicom's requestor leaves its socket open when the peer drops it
                sock.close()
            return None
        try:
            return int(assoc.send_c_echo().Status)
        finally:
            assoc.release()
    finally:
        ae.shutdown()


def test_tls_echo_and_store_succeed_and_plain_tcp_fails_and_a_silent_peer_holds_up_no_one(
        predictor, sources, tmp_path):
    import ssl

    cert, key = self_signed(tmp_path)
    client = ssl.create_default_context(cafile=str(cert))
    out = tmp_path / "node"
    with DicomNode(predictor, out, port=0, tls_cert=cert, tls_key=key, acse_timeout_s=2.0) as node:
        silent = socket.create_connection(("127.0.0.1", node.port))  # no handshake: waits in its own thread
        try:
            start = time.monotonic()
            assert echo(node.port, (client, "localhost")) == 0
            assert time.monotonic() - start < 1.5  # not behind the silent peer's handshake
            assert echo(node.port) is None  # plain TCP: the node takes TLS only
            assert closed_within(silent, 5)  # its handshake given up after acse_timeout_s
        finally:
            silent.close()
        # a C-STORE over TLS goes through the read guard as any other
        ae = AE(ae_title="SCU")
        ae.add_requested_context(CR, SYNTAXES)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="PNEUMOSEG", tls_args=(client, "localhost"))
        assert assoc.is_established
        try:
            assert int(assoc.send_c_store(pydicom.dcmread(sources[0])).Status) == 0
        finally:
            assoc.release()
            ae.shutdown()
        assert node.wait_idle(60)
    assert [r["ImageId"] for r in rows(out)] == [pydicom.dcmread(sources[0]).SOPInstanceUID]


def test_a_stop_is_not_held_by_a_peer_in_its_tls_handshake(predictor, tmp_path):
    cert, key = self_signed(tmp_path)
    node = DicomNode(predictor, tmp_path / "node", port=0, tls_cert=cert, tls_key=key).start()  # acse_timeout_s 30
    silent = socket.create_connection(("127.0.0.1", node.port))
    try:
        deadline = time.monotonic() + 5
        while not node._handshaking and time.monotonic() < deadline:
            time.sleep(0.02)
        assert node._handshaking  # the handshake has begun, in the connection's thread
        start = time.monotonic()
        node.stop()
        assert time.monotonic() - start < 5  # 30 s (acse_timeout_s) before: pynetdicom's shutdown joined it
        assert closed_within(silent, 2)
    finally:
        silent.close()
        node.stop()


def test_tls_ca_requires_a_client_certificate_it_signed(predictor, tmp_path):
    import ssl

    cert, key = self_signed(tmp_path)
    caller_cert, caller_key = self_signed(tmp_path, "caller")
    stranger_cert, stranger_key = self_signed(tmp_path, "stranger")
    with DicomNode(predictor, tmp_path / "node", port=0, tls_cert=cert, tls_key=key, tls_ca=caller_cert) as node:
        def client(chain=None):
            context = ssl.create_default_context(cafile=str(cert))
            if chain is not None:
                context.load_cert_chain(*chain)
            return context, "localhost"

        assert echo(node.port, client((caller_cert, caller_key))) == 0
        assert echo(node.port, client()) is None  # no certificate
        assert echo(node.port, client((stranger_cert, stranger_key))) is None  # one tls_ca did not sign


def test_the_forwarder_sends_to_a_tls_destination(predictor, sources, tmp_path):
    import ssl

    cert, key = self_signed(tmp_path, "pacs")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    received = []
    pacs = AE(ae_title="PACS")
    pacs.add_supported_context(SEGMENTATION_STORAGE, [EXPLICIT_LE])
    server = pacs.start_server(("127.0.0.1", 0), block=False, ssl_context=context,
                               evt_handlers=[(evt.EVT_C_STORE, lambda e: received.append(e.dataset.SOPInstanceUID) or 0)])
    try:
        out = tmp_path / "node"
        with DicomNode(predictor, out, port=0, forward=f"PACS@localhost:{server.server_address[1]}",
                       forward_tls_ca=cert) as node:
            assert send(node.port, sources[:6]) == [0] * 6
            assert node.wait_idle(60)
    finally:
        pacs.shutdown()
    segs = sorted(pydicom.dcmread(out / r["Seg"]).SOPInstanceUID for r in rows(out) if r["Seg"])
    assert segs and sorted(received) == segs and {r["Forwarded"] for r in forwarded(out)} == {"yes"}


def test_tls_arguments_are_checked_at_construction_and_by_listen_before_the_model_loads(tmp_path, capsys):
    cert, key = self_signed(tmp_path)
    other_cert, other_key = self_signed(tmp_path, "other")
    (tmp_path / "notes.pem").write_text("not a certificate")
    for kwargs, message in (({"tls_cert": cert}, "both tls_cert and tls_key"), ({"tls_ca": cert}, "tls_ca asks"),
                            ({"tls_cert": cert, "tls_key": other_key}, "tls_cert / tls_key: cannot load"),
                            ({"tls_cert": tmp_path / "notes.pem", "tls_key": key}, "cannot load"),
                            ({"tls_cert": cert, "tls_key": key, "tls_ca": tmp_path / "missing.pem"}, "tls_ca: cannot load"),
                            ({"forward_tls_ca": cert}, "needs forward"),
                            ({"forward": "P@h:1", "forward_tls_ca": tmp_path / "notes.pem"}, "forward_tls_ca: cannot load")):
        with pytest.raises(InvalidInputError, match=message):
            DicomNode(object(), "unused", **kwargs)
    context = tls_server_context(cert, key)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2 and context.options & ssl.OP_NO_RENEGOTIATION
    base = ["listen", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "o")]
    for extra, message in ((["--tls-cert", str(cert)], "--tls-cert and --tls-key"),
                           (["--tls-cert", str(cert), "--tls-key", str(other_key)], "--tls-cert / --tls-key"),
                           (["--forward-tls-ca", str(cert)], "give --forward")):
        assert main(base + extra) == 2  # refused before the (missing) model is looked for
        err = capsys.readouterr().err
        assert err.startswith("pneumoseg: error: ") and err.count("\n") == 1 and message in err, err


# -- review of the peer bounds (each failed before its fix) ---------------------------------------------
def test_a_forward_destination_that_stops_mid_pdu_is_given_up_and_the_forwarder_goes_on(
        predictor, sources, tmp_path, monkeypatch):
    """A destination that answers the association request with part of a PDU and then nothing (a
    peer that hung, or a network cut mid-answer with no reset). pynetdicom's requestor clears its
    socket's timeout once connected, so its reader waited in recv() for ever: the association never
    ended and no later object was forwarded (nor recorded) until a stop."""
    from pneumoseg.serve import node as node_module

    monkeypatch.setattr(node_module, "_FORWARD_TIMEOUT_S", 1.0, raising=False)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    done, held = threading.Event(), []

    def stall():
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            held.append(conn)
            conn.settimeout(2)
            try:
                if conn.recv(65536):  # the A-ASSOCIATE-RQ (the reachability probe sends nothing)
                    conn.sendall(b"\x02\x00\x00\x00\x00\x64" + b"\x00" * 10)  # an A-ASSOCIATE-AC, 10 of 100 bytes
            except OSError:
                pass

    thread = threading.Thread(target=stall, daemon=True)
    thread.start()
    out = tmp_path / "node"
    try:
        with DicomNode(predictor, out, port=0, forward=f"PACS@127.0.0.1:{listener.getsockname()[1]}",
                       forward_attempts=1) as node:
            assert send(node.port, sources[:6]) == [0] * 6
            assert node.wait_idle(8)  # every object given up on, each within the forwarder's timeout
    finally:
        done.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()
    queued = [r for r in rows(out) if r["Forwarded"] == "queued"]
    assert queued and {r["Forwarded"] for r in forwarded(out)} == {"no"} and len(forwarded(out)) == len(queued)


def test_tls_connections_in_their_handshake_count_against_the_connection_cap(predictor, tmp_path):
    """Connections beyond twice max_associations are closed at once, TLS ones too: a connection in its
    TLS handshake has no association thread yet, so it was not counted, and any number of silent TLS
    peers each held a thread for acse_timeout_s."""
    cert, key = self_signed(tmp_path)
    with DicomNode(predictor, tmp_path / "node", port=0, tls_cert=cert, tls_key=key, max_associations=1,
                   acse_timeout_s=5.0) as node:
        first = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(2)]  # 2N in their handshake
        extra = []
        try:
            deadline = time.monotonic() + 5
            while len(node._handshaking) < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert len(node._handshaking) == 2
            extra = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(4)]
            start = time.monotonic()
            assert all(closed_within(s, 3) for s in extra) and time.monotonic() - start < 2.5  # not acse_timeout_s
            assert not any(closed_within(s, 0.2) for s in first)  # those wait out their own timeout
            assert len(node._handshaking) == 2
        finally:
            for s in first + extra:
                s.close()


def test_c_stores_sent_without_waiting_for_answers_wait_on_tcp_not_in_memory(predictor, sources, tmp_path):
    """A peer that sends C-STOREs without waiting for the answers while the node's thread is busy: the
    complete DIMSE messages waiting for it stay bounded (the peer then waits on TCP). The read guard
    counted pynetdicom's to_user_queue, which takes no P-DATA in pynetdicom 3 (the DIMSE messages are
    assembled in the reader thread and queued in dimse.msg_queue): all 40 were held in memory."""
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode

    from pneumoseg.serve import node as node_module

    ds = pydicom.dcmread(sources[0])
    data = encode(ds, False, True)
    out = tmp_path / "node"
    with DicomNode(predictor, out, port=0) as node:
        release, busiest = threading.Event(), [0]
        receive = node._receive

        def slow_receive(*args):
            release.wait(10)
            return receive(*args)

        node._receive = slow_receive
        ae = AE(ae_title="SCU")
        ae.add_requested_context(CR, EXPLICIT_LE)
        ae.dimse_timeout = 10
        assoc = ae.associate("127.0.0.1", node.port, ae_title="PNEUMOSEG")
        assert assoc.is_established
        context = assoc.accepted_contexts[0].context_id
        assoc._reactor_checkpoint.clear()  # as pynetdicom's send_* do: the answers are this thread's to take
        while not assoc._is_paused:
            time.sleep(0.001)
        try:
            for i in range(40):
                req = C_STORE()
                req.MessageID, req.Priority = i + 1, 2
                req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
                req.DataSet = io.BytesIO(data)
                assoc.dimse.send_msg(req, context)
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                for a in node._ae.active_associations:
                    if a.is_acceptor:
                        busiest[0] = max(busiest[0], a.dimse.msg_queue.qsize())
                time.sleep(0.01)
            release.set()
            answers = [assoc.dimse.get_msg(True)[1] for _ in range(40)]
            assert all(a is not None and int(a.Status) == 0 for a in answers)
        finally:
            release.set()
            assoc._reactor_checkpoint.set()
            assoc.release()
            ae.shutdown()
        assert node.wait_idle(30)
    assert busiest[0] <= node_module._QUEUED_MESSAGES, busiest[0]
    assert {r["ImageId"] for r in rows(out)} == {ds.SOPInstanceUID}  # once, or again once its row was written


def test_a_stop_is_not_held_by_a_reader_waiting_for_a_busy_association(predictor, sources, tmp_path):
    """The read guard's wait for the association's thread ends when the association does: pynetdicom's
    abort (the stop's) waits for the reader to return, so a reader waiting on a full queue for a thread
    that takes nothing more would have held the stop for ever."""
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode

    ds = pydicom.dcmread(sources[0])
    data = encode(ds, False, True)
    node = DicomNode(predictor, tmp_path / "node", port=0).start()
    release = threading.Event()
    receive = node._receive
    node._receive = lambda *args: release.wait(10) and receive(*args)
    ae = AE(ae_title="SCU")
    ae.add_requested_context(CR, EXPLICIT_LE)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PNEUMOSEG")
    try:
        assert assoc.is_established
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.001)
        for i in range(8):
            req = C_STORE()
            req.MessageID, req.Priority = i + 1, 2
            req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
            req.DataSet = io.BytesIO(data)
            assoc.dimse.send_msg(req, assoc.accepted_contexts[0].context_id)
        time.sleep(1)  # the node's reader now waits for its association's thread, busy in the first C-STORE
        start = time.monotonic()
        node.stop(timeout_s=0.5)
        assert time.monotonic() - start < 5
    finally:
        release.set()
        node.stop()
        assoc._reactor_checkpoint.set()
        ae.shutdown()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names fsync'ed descriptors through /proc")
def test_a_c_store_is_answered_success_only_once_its_file_and_its_name_are_on_disk(predictor, sources, tmp_path,
                                                                                   monkeypatch):
    """The rename into incoming/ is a change to the folder: until the folder is fsync'ed, a power cut
    after the success answer can leave the image under its temporary name, which the next start
    removes as a write never acknowledged. The PACS, told success, has let it go."""
    out = tmp_path / "node"
    synced, answered = [], []
    fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return fsync(fd)

    original = DicomNode._on_store

    def answer(self, event):  # the C-STORE handler: what was fsync'ed when it answers
        status = original(self, event)
        answered.append(list(synced))
        return status

    monkeypatch.setattr(DicomNode, "_on_store", answer)
    with DicomNode(predictor, out, port=0) as node:
        monkeypatch.setattr(os, "fsync", recording_fsync)
        assert send(node.port, sources[:1]) == [0]
        monkeypatch.setattr(os, "fsync", fsync)
        assert node.wait_idle(60)
    at_answer = answered[-1]
    incoming = str((out / INCOMING).resolve())
    assert incoming in at_answer, at_answer  # the folder, after the file (fsync'ed under its temporary name)
    assert at_answer.index(incoming) > max(i for i, p in enumerate(at_answer) if p.endswith(".tmp"))


def test_a_connection_the_node_drops_frees_its_place_at_once(predictor, tmp_path):
    """A connection closed at the cap, or one that fails its TLS handshake, ends its association thread at
    once. pynetdicom's acceptor thread waits acse_timeout_s for an association request whether or not
    its connection is still there, and each such thread counts against the cap: 2N connections within
    acse_timeout_s (a PACS retrying, TCP health checks) then kept every later connection dropped, each
    drop holding its place for acse_timeout_s again (a TLS node under a flood refused every caller for
    over a minute after it ended)."""
    with DicomNode(predictor, tmp_path / "plain", port=0, max_associations=1, acse_timeout_s=5.0) as node:
        idle = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(2)]
        try:
            assert until_acceptors(node, 2)
            for _ in range(4):
                extra = socket.create_connection(("127.0.0.1", node.port))
                assert closed_within(extra, 2)
                extra.close()
            assert until_acceptors(node, 2, timeout_s=1.5)  # the dropped ones' threads have ended (not after 5 s)
        finally:
            for sock in idle:
                sock.close()
    cert, key = self_signed(tmp_path)
    with DicomNode(predictor, tmp_path / "tls", port=0, tls_cert=cert, tls_key=key, acse_timeout_s=5.0) as node:
        assert echo(node.port) is None  # plain TCP: its handshake fails at once
        assert until_acceptors(node, 0, timeout_s=1.5)


def test_a_tls_peer_has_acse_timeout_s_from_its_connection_for_handshake_and_request_together(predictor, tmp_path):
    """acse_timeout_s bounds a connection's association request from the moment it opened, its TLS
    handshake included: the request's deadline began only after the handshake, so a TLS peer could hold
    its place for twice acse_timeout_s (a slow handshake, then a trickled request)."""
    import ssl

    cert, key = self_signed(tmp_path)
    client = ssl.create_default_context(cafile=str(cert))
    with DicomNode(predictor, tmp_path / "node", port=0, tls_cert=cert, tls_key=key, acse_timeout_s=2.0) as node:
        raw = socket.create_connection(("127.0.0.1", node.port))
        start = time.monotonic()
        time.sleep(1.5)  # the handshake begins late, and ends in time
        tls = client.wrap_socket(raw, server_hostname="localhost")
        tls.settimeout(0.3)
        closed = None
        try:
            for byte in b"\x01\x00\x00\x00\x00\x44" + b"\x00" * 68:  # the request, a byte each 0.3 s
                tls.sendall(bytes([byte]))
                try:
                    if not tls.recv(1):
                        closed = time.monotonic() - start
                        break
                except (TimeoutError, socket.timeout):
                    continue
                except (OSError, ssl.SSLError):
                    closed = time.monotonic() - start
                    break
        except OSError:
            closed = time.monotonic() - start
        finally:
            tls.close()
    assert closed is not None and closed < 3.0, closed  # acse_timeout_s (2 s) and some, not 1.5 s + 2 s
