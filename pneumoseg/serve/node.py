"""A DICOM node beside a PACS: it receives chest radiographs over the DICOM network (C-STORE), predicts
them in small batches and sends a DICOM Segmentation of each positive image back (or to another node).

Built on pynetdicom (the ``pacs`` extra). The output folder (``out``) holds:

- ``incoming/<SOPInstanceUID>.dcm``: each received image, written atomically before C-STORE answers
  success, and removed once its result row is written; what is left there at a start (a node killed
  mid-batch) is predicted then, so nothing acknowledged is lost;
- ``results.csv``: one row per image (:data:`RESULT_COLUMNS`), appended and fsync'ed as each is done;
- ``seg/<SOPInstanceUID>.dcm``: the SEG of each positive image (``write_seg``), kept whether or not
  forwarding it succeeded;
- ``dicom-overlay/<SOPInstanceUID>.dcm``: the mask burned into the radiograph as a captioned Secondary
  Capture (``write_overlay``, as ``pneumoseg predict --dicom-overlay`` writes it), for viewers that draw
  no SEG; forwarded with the SEG;
- ``forwarded.csv``: one row per object forwarded or given up on (:data:`FORWARD_COLUMNS`).

Privacy: the node logs and records SOP Instance UIDs, calling AE titles, counts and reasons only;
patient data stays in the received files and in the SEGs and overlays (which must carry it to be filed;
an overlay also shows the source's pixels).
"""

from __future__ import annotations

import collections
import contextlib
import csv
import datetime as _dt
import functools
import io
import logging
import os
import re
import shutil
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from .. import limits
from .._checks import check_bool, check_int, check_path, check_real, show
from ..errors import DicomError, InvalidInputError, PneumosegError

__all__ = ["DicomNode", "NodeError", "CHEST_XRAY_STORAGE", "RESULTS", "RESULT_COLUMNS", "FORWARDED",
           "FORWARD_COLUMNS", "INCOMING", "SEGS", "DICOM_OVERLAYS", "MAX_ASSOCIATIONS", "TIMEOUT_S", "MAX_PDU_BYTES",
           "parse_forward", "require_pynetdicom", "tls_server_context", "tls_client_context"]

log = logging.getLogger("pneumoseg.serve")

#: The storage SOP classes a chest radiograph comes in; any other is refused at association.
CHEST_XRAY_STORAGE = {
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",  # the SIIM files
}
VERIFICATION = "1.2.840.10008.1.1"

# Transfer syntaxes offered, each only where pydicom has a working decoder for it here (JPEG Lossless
# and the JPEG 2000 / JPEG-LS ones come with the dicom-codecs extra): the uncompressed ones, deflated,
# RLE, and the JPEG family.
_SYNTAXES = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired; old modalities)
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (the SIIM files)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
)

INCOMING = "incoming"
SEGS = "seg"
DICOM_OVERLAYS = "dicom-overlay"  # as pneumoseg predict --dicom-overlay names it
RESULTS = "results.csv"
#: results.csv's columns. Status is ok or failed (Error says why); Seg is the SEG's path under the
#: output folder, or empty (negative, --no-seg, or it could not be written: Error says so, "no SEG:
#: ..."); Overlay the same for the Secondary Capture overlay (empty without write_overlay; "no overlay:
#: ..." in Error); Forwarded is ``queued`` (what the row names was handed to the forwarder:
#: forwarded.csv has each outcome) / empty (nothing to send). New columns go at the end, so that readers
#: of an earlier node's columns keep working; a results.csv an earlier node began gets the new header
#: at the next start (its old rows read with Overlay empty).
RESULT_COLUMNS = ("ImageId", "Caller", "Received", "Done", "Status", "Score", "Positive", "Components",
                  "EncodedPixels", "Seg", "Forwarded", "Error", "Overlay")
FORWARDED = "forwarded.csv"
#: forwarded.csv's columns, one row per object sent or given up on: Seg is the SEG's path in a SEG's row
#: (empty in an overlay's), Overlay the overlay's in an overlay's row (empty in a SEG's); Predicted is
#: its results.csv row's Done (ImageId and Predicted name that row), Forwarded is yes / no (not sent
#: after every attempt; the file stays on disk and Error says why). An object of a ``queued`` row
#: without its row here is sent at the next start.
FORWARD_COLUMNS = ("ImageId", "Predicted", "Seg", "Done", "Forwarded", "Error", "Overlay")
# The columns of an earlier node (before the overlay), whose files get the new header at a start
_EARLIER_COLUMNS = {RESULTS: (RESULT_COLUMNS[:-1], RESULT_COLUMNS), FORWARDED: (FORWARD_COLUMNS[:-1], FORWARD_COLUMNS)}
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_FORWARD_BATCH = 32  # objects sent in one association at most
# The forwarder's ACSE, network and connection timeouts, and the timeout of each read on its socket
_FORWARD_TIMEOUT_S = 30.0

_SUCCESS = 0x0000
_OUT_OF_RESOURCES = 0xA700
_CANNOT_UNDERSTAND = 0xC000
_STORED_STATUSES = (0x0000, 0xB000, 0xB006, 0xB007)  # success, and the warnings that still store it
_FORWARD = re.compile(r"(?P<aet>[^@]{1,16})@(?P<host>[^:@\s]+|\[[0-9A-Fa-f:.]+\]):(?P<port>[0-9]{1,5})")
_INSTALL = "pip install 'pneumoseg[pacs]'"

#: The ranges DicomNode (and ``pneumoseg listen``) take its peer bounds in: concurrent associations;
#: each timeout, in seconds; the largest PDU the node tells its peers it receives (the
#: P-DATA-TF maximum length it offers), in bytes: 0 (unlimited) is refused, as anything unbounded.
MAX_ASSOCIATIONS = (1, 1024)
TIMEOUT_S = (0.1, 3600.0)
MAX_PDU_BYTES = (4096, 64 << 20)


class NodeError(PneumosegError, RuntimeError):
    """The node cannot run (its port taken, say)."""


def require_pynetdicom() -> Any:
    """The pynetdicom module, or an :class:`pneumoseg.InvalidInputError` saying how to install it (or,
    where it is installed and fails to import, why)."""
    from .._optional import import_optional

    return import_optional("pynetdicom", needed_for="the DICOM node", install=_INSTALL)


def check_ae_title(title: Any, name: str = "ae_title") -> str:
    """An application entity title: 1 to 16 printable ASCII characters, no backslash, not all spaces."""
    if (not isinstance(title, str) or not 1 <= len(title) <= 16 or not title.strip()
            or any(not " " <= ch <= "~" or ch == "\\" for ch in title)):
        raise InvalidInputError(f"{name} must be an AE title: 1 to 16 printable ASCII characters without '\\', "
                                f"not all spaces; got {show(title)}")
    return title.strip()


def parse_forward(text: Any) -> tuple[str, str, int]:
    """``"AET@host:port"`` as (AE title, host, port); an IPv6 host in brackets."""
    match = _FORWARD.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise InvalidInputError(f"forward must be AET@HOST:PORT (e.g. PACS@10.0.0.5:104), got {show(text)}")
    port = int(match["port"])
    if not 1 <= port <= 65535:
        raise InvalidInputError(f"forward's port must be in [1, 65535], got {port}")
    return check_ae_title(match["aet"], "forward's AE title"), match["host"].strip("[]"), port


class _LazyHandshake(ssl.SSLContext):
    """A server context whose sockets do their TLS handshake when first used, not when wrapped.
    pynetdicom wraps each accepted socket in its accept loop, where the handshake would wait (with no
    timeout) on a peer that connects and sends nothing: no other connection would be accepted. The node
    does the handshake in the connection's own thread instead, bounded by acse_timeout_s."""

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(sock, *args, **kwargs)


def _no_password() -> bytes:
    raise InvalidInputError("the key is protected by a password, which the node cannot ask for: give a key "
                            "without one (readable by the node's user only)")


def _load_chain(context: ssl.SSLContext, cert: Path, key: Path, names: str) -> None:
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except OSError as exc:  # ssl.SSLError too: a file that is not PEM, a key not the certificate's
        raise InvalidInputError(f"{names}: cannot load {cert} with {key} ({exc.strerror or exc})") from None


def _load_ca(context: ssl.SSLContext, ca: Path, name: str) -> None:
    try:
        context.load_verify_locations(cafile=ca)
    except OSError as exc:
        raise InvalidInputError(f"{name}: cannot load {ca} ({exc.strerror or exc})") from None


def tls_server_context(cert: Any = None, key: Any = None, ca: Any = None, *,
                       names: tuple[str, str, str] = ("tls_cert", "tls_key", "tls_ca")) -> Optional[ssl.SSLContext]:
    """The node's TLS context (TLS 1.2 or later) from a PEM certificate (chain) and its key, without a
    password; with ``ca`` (PEM certificates), a caller must present a certificate that ``ca`` signed. None
    without ``cert``. Bad arguments or files are an InvalidInputError naming them (by ``names``)."""
    cert_name, key_name, ca_name = names
    if cert is None and key is None:
        if ca is not None:
            raise InvalidInputError(f"{ca_name} asks callers for certificates over TLS, which needs {cert_name} "
                                    f"and {key_name}")
        return None
    if cert is None or key is None:
        raise InvalidInputError(f"TLS needs both {cert_name} and {key_name} (the node's certificate and its "
                                "private key)")
    context = _LazyHandshake(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # a TLS 1.2 peer asking for handshake after handshake costs the node CPU for nothing a C-STORE needs
    context.options |= ssl.OP_NO_RENEGOTIATION
    _load_chain(context, check_path(cert, cert_name), check_path(key, key_name), f"{cert_name} / {key_name}")
    if ca is not None:
        _load_ca(context, check_path(ca, ca_name), ca_name)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def tls_client_context(ca: Any, cert: Any = None, key: Any = None, *,
                       names: tuple[str, str, str] = ("forward_tls_ca", "tls_cert", "tls_key")) -> ssl.SSLContext:
    """A TLS context (TLS 1.2 or later) for the forwarder: the destination's certificate verified
    against ``ca`` (PEM) and its host name; ``cert`` and ``key`` (the node's own, as
    :func:`tls_server_context`) presented where the destination asks for one."""
    ca_name, cert_name, key_name = names
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_ca(context, check_path(ca, ca_name), ca_name)
    if cert is not None and key is not None:
        _load_chain(context, check_path(cert, cert_name), check_path(key, key_name), f"{cert_name} / {key_name}")
    return context


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


@dataclass
class _Item:
    uid: str
    path: Path
    caller: str
    received: str  # ISO time, UTC
    received_at: float  # time.monotonic(), for the latency


class DicomNode:
    """A DICOM node (application entity) that a PACS sends chest radiographs to.

    It is a Verification SCP (C-ECHO) and a Storage SCP for :data:`CHEST_XRAY_STORAGE` in every transfer
    syntax pneumoseg can decode here; other SOP classes are refused at association, so a CT series
    sent to it is refused, not silently dropped. Each C-STORE is answered:

    - success (0x0000) once the instance is on disk in ``incoming/`` (atomically) and queued (an
      instance sent again while it waits or is predicted is acknowledged and predicted once; sent again
      after its row, it is predicted again and gets another row);
    - 0xA700 Out of Resources when ``max_queue`` images already wait, the instance is larger than
      ``limits.max_dicom_bytes``, the disk write fails, or the node is stopping (the PACS retries later);
    - 0xC000 Cannot Understand when its header already shows pneumoseg cannot predict it: a SOP Instance
      UID that is not a UID (it names the file) or differs from the one the request was sent under, a
      damaged header, not one grey-level image, an image larger than the limits. Pixel data that fails
      to decode is found only when predicted: that image gets a failed row in results.csv.

    A worker thread takes queued images in batches of up to ``batch_size``, waiting at most
    ``batch_wait_s`` after the first for more, predicts them with ``predictor`` (a
    :class:`pneumoseg.infer.Predictor`) and, for each, writes ``seg/<ImageId>.dcm`` if positive (with
    ``write_seg``) and ``dicom-overlay/<ImageId>.dcm`` (with ``write_overlay``: a captioned Secondary
    Capture), appends a row to ``results.csv`` and hands what it wrote to a forwarding thread, which
    C-STOREs it to ``forward`` (``"AET@host:port"``; each object under its own SOP class, the objects
    waiting sent in one association; ``forward_attempts`` tries, ``forward_backoff_s`` doubling between
    them). An image that
    cannot be read or predicted gets a failed row; the node goes on.

    ``allowed_callers`` (calling AE titles) refuses every other caller at association. ``host`` is
    127.0.0.1 by default: a PACS on another machine needs ``0.0.0.0`` or the interface's address.
    ``port=0`` picks a free port (:attr:`port`).

    Peers that are broken or hostile are bounded (each bound a keyword argument, in the ranges
    :data:`MAX_ASSOCIATIONS`, :data:`TIMEOUT_S`, :data:`MAX_PDU_BYTES`):

    - ``max_associations`` concurrent associations (pynetdicom holds one instance per association in
      memory while it arrives): the next association request is rejected (A-ASSOCIATE-RJ, transient,
      local limit exceeded: a PACS tries again later), and connections beyond twice that number that
      have requested nothing yet are closed at once;
    - ``acse_timeout_s``: a connection whose association request is not whole that long after it
      opened (silent, or sent a byte at a time) is closed; so is an association waiting that long for
      a release answer;
    - ``network_timeout_s``: an association silent that long is aborted, as is one whose PDU has begun
      and is not whole that long after (a peer stopped or trickling mid-PDU), or whose DIMSE message
      arrives at less than one maximum PDU per ``network_timeout_s`` (one sent as tiny PDUs, each in time);
    - ``dimse_timeout_s``: how long the node waits for a DIMSE answer: the forward destination's
      answer to each C-STORE (a C-STORE unanswered counts as not sent, tried again as any other);
    - ``max_pdu_bytes``: the maximum PDU length the node offers (default 16382, pynetdicom's); a PDU
      declared over 4 MiB (or ``max_pdu_bytes`` if larger) is refused before it is read.

    TLS (DICOM's secure transport, TLS 1.2 or later): with ``tls_cert`` and ``tls_key`` (PEM files, the
    key without a password) the node takes TLS connections only, each handshake done within
    ``acse_timeout_s`` in the connection's own thread (a peer that connects and says nothing holds up no
    other); with ``tls_ca`` too, a caller must present a certificate that ``tls_ca`` signed. With
    ``forward_tls_ca`` the forwarder sends over TLS, verifying the destination's certificate against it
    and its host name, and presents ``tls_cert`` where the destination asks for one. Bad or unreadable
    files are an InvalidInputError at construction.

    ``start()`` / ``stop()``, or a ``with`` block. ``stop()`` stops accepting, predicts what is queued
    for up to ``drain_timeout_s`` and leaves the rest in ``incoming/``, predicted at the next start
    into the same folder (as is anything a killed node left there)."""

    def __init__(self, predictor: Any, out_dir: Union[str, Path], *, ae_title: str = "PNEUMOSEG",
                 host: str = "127.0.0.1", port: int = 11112, forward: Optional[str] = None,
                 allowed_callers: Optional[Iterable[str]] = None, max_queue: int = 256, batch_size: int = 8,
                 batch_wait_s: float = 0.05, write_seg: bool = True, write_overlay: bool = False,
                 max_associations: int = 4,
                 forward_attempts: int = 3, forward_backoff_s: float = 1.0, drain_timeout_s: float = 60.0,
                 log_every_s: float = 60.0, acse_timeout_s: float = 30.0, network_timeout_s: float = 60.0,
                 dimse_timeout_s: float = 30.0, max_pdu_bytes: int = 16382, tls_cert: Optional[Union[str, Path]] = None,
                 tls_key: Optional[Union[str, Path]] = None, tls_ca: Optional[Union[str, Path]] = None,
                 forward_tls_ca: Optional[Union[str, Path]] = None) -> None:
        self.predictor = predictor
        self.out_dir = check_path(out_dir, "out_dir")
        self.ae_title = check_ae_title(ae_title)
        if not isinstance(host, str) or not host:
            raise InvalidInputError(f"host must be a host name or address, got {show(host)}")
        self.host = host
        self._port = check_int(port, "port", low=0, high=65535)
        self.forward = parse_forward(forward) if forward is not None else None
        if allowed_callers is not None:
            if isinstance(allowed_callers, str):
                allowed_callers = [allowed_callers]
            self.allowed_callers: Optional[list[str]] = [check_ae_title(t, "allowed_callers' titles")
                                                         for t in allowed_callers]
            if not self.allowed_callers:
                raise InvalidInputError("allowed_callers must name at least one AE title (None allows any)")
        else:
            self.allowed_callers = None
        self.max_queue = check_int(max_queue, "max_queue", low=1, high=1 << 20)
        self.batch_size = check_int(batch_size, "batch_size", low=1, high=4096)
        self.batch_wait_s = check_real(batch_wait_s, "batch_wait_s", low=0.0, high=3600.0)
        self.write_seg = check_bool(write_seg, "write_seg")
        self.write_overlay = check_bool(write_overlay, "write_overlay")
        self.max_associations = check_int(max_associations, "max_associations", low=MAX_ASSOCIATIONS[0],
                                          high=MAX_ASSOCIATIONS[1])
        self.forward_attempts = check_int(forward_attempts, "forward_attempts", low=1, high=100)
        self.forward_backoff_s = check_real(forward_backoff_s, "forward_backoff_s", low=0.0, high=3600.0)
        self.drain_timeout_s = check_real(drain_timeout_s, "drain_timeout_s", low=0.0, high=1e6)
        self.log_every_s = check_real(log_every_s, "log_every_s", low=0.0, high=1e6)
        self.acse_timeout_s = check_real(acse_timeout_s, "acse_timeout_s", low=TIMEOUT_S[0], high=TIMEOUT_S[1])
        self.network_timeout_s = check_real(network_timeout_s, "network_timeout_s", low=TIMEOUT_S[0],
                                            high=TIMEOUT_S[1])
        self.dimse_timeout_s = check_real(dimse_timeout_s, "dimse_timeout_s", low=TIMEOUT_S[0], high=TIMEOUT_S[1])
        self.max_pdu_bytes = check_int(max_pdu_bytes, "max_pdu_bytes", low=MAX_PDU_BYTES[0], high=MAX_PDU_BYTES[1])
        self._tls = tls_server_context(tls_cert, tls_key, tls_ca)
        self._forward_tls: Optional[ssl.SSLContext] = None
        if forward_tls_ca is not None:
            if self.forward is None:
                raise InvalidInputError("forward_tls_ca verifies the forward destination, which needs forward")
            self._forward_tls = tls_client_context(forward_tls_ca, tls_cert, tls_key)
        if self.forward is not None and not (self.write_seg or self.write_overlay):
            raise InvalidInputError("forward sends the SEGs (and overlays), so it needs write_seg=True or "
                                    "write_overlay=True")
        self._cond = threading.Condition()
        self._queue: collections.deque[_Item] = collections.deque()
        self._queued: set[str] = set()  # UIDs waiting or in the batch being predicted
        self._reserved = 0  # C-STOREs being written to disk, counted against max_queue
        self._stopping = False
        self._abandon = threading.Event()
        self._results_lock = threading.Lock()
        self._folder: Any = None
        self._ae: Any = None
        self._server: Any = None
        self._worker: Optional[threading.Thread] = None
        # objects to send, (ImageId, its row's Done, SEGS or DICOM_OVERLAYS, path): a thread of their own,
        # so that a forward destination that is down or slow (3 tries, 30 s timeouts) never delays the
        # next predictions
        self._forwards: collections.deque[tuple[str, str, str, Path]] = collections.deque()
        self._forwarding = 0  # 1 while objects are being sent
        self._forwarder: Optional[threading.Thread] = None
        self._sending: Any = None  # the association sending, cut by a stop that gives up
        self._reachable = False  # the forward destination took the last association requested
        self._handshaking: set[ssl.SSLSocket] = set()  # TLS connections in their handshake (_handshake)
        self._connecting = 0  # connections in _on_connect (their handshake included): no association thread yet
        self.stats = {"received": 0, "predicted": 0, "failed": 0, "refused": 0, "segs": 0, "overlays": 0,
                      "forwarded": 0, "not_forwarded": 0, "resumed": 0}
        self._latencies: collections.deque[float] = collections.deque(maxlen=10000)

    # -- life cycle -------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        """The port listened on (the one picked, after ``start()`` with ``port=0``)."""
        return int(self._server.server_address[1]) if self._server is not None else self._port

    @property
    def running(self) -> bool:
        return self._server is not None

    def __enter__(self) -> "DicomNode":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> "DicomNode":
        if self._server is not None:
            raise NodeError("the node is already running")
        pynetdicom = require_pynetdicom()
        from .._fs import MANIFEST_NAME, OutputKind, prepare_output_folder

        # The same command's earlier output is continued (results appended, incoming/ predicted), never
        # replaced; anything else in the folder is refused as prepare_output_folder refuses it.
        resume = (self.out_dir / MANIFEST_NAME).is_file()
        self._folder = prepare_output_folder(self.out_dir, what=OutputKind.DICOM_NODE, resume=resume)
        try:
            self._stopping = False
            self._abandon.clear()
            self._reachable = False  # a destination may have gone down while the node was stopped
            self._repair_results()
            self._resume_incoming()
            self._resume_forwards()
            self._ae = self._make_ae(pynetdicom)
            handlers = [(pynetdicom.evt.EVT_C_STORE, self._on_store),
                        (pynetdicom.evt.EVT_C_ECHO, lambda event: _SUCCESS),
                        (pynetdicom.evt.EVT_REJECTED, self._on_rejected),
                        (pynetdicom.evt.EVT_CONN_OPEN, self._on_connect)]
            try:
                self._server = self._ae.start_server((self.host, self._port), block=False, evt_handlers=handlers,
                                                     ssl_context=self._tls)
            except OSError as exc:
                raise NodeError(f"cannot listen on {self.host}:{self._port}: {exc.strerror or exc}"
                                + (" (another program, or another node, uses that port; choose another --port)"
                                   if exc.errno in (98, 48) else "")) from None
            self._worker = threading.Thread(target=self._work, name="pneumoseg-node-worker", daemon=True)
            self._worker.start()
            if self.forward is not None:
                self._forwarder = threading.Thread(target=self._forward_loop, name="pneumoseg-node-forwarder",
                                                   daemon=True)
                self._forwarder.start()
        except BaseException:
            self._ae = None
            self._folder.close(failed=False)
            self._folder = None
            raise
        log.info("DICOM node %s listening on %s:%d (storage: %d SOP classes, %d transfer syntaxes; %s); "
                 "writing to %s", self.ae_title, self.host, self.port, len(CHEST_XRAY_STORAGE),
                 len(self._syntaxes), "callers " + ",".join(self.allowed_callers) if self.allowed_callers
                 else "any caller", self.out_dir)
        return self

    def stop(self, timeout_s: Optional[float] = None) -> None:
        """Stop accepting, predict what is queued (for up to ``timeout_s``, default ``drain_timeout_s``),
        and leave what is left in ``incoming/`` for the next start. Nothing is left half written."""
        if self._server is None:
            return
        timeout = self.drain_timeout_s if timeout_s is None else check_real(timeout_s, "timeout_s", low=0.0)
        with self._cond:
            self._stopping = True  # C-STOREs still arriving are answered Out of Resources
            self._cond.notify_all()
            handshaking = list(self._handshaking)
        for tls in handshaking:  # a TLS peer that connected and says nothing: its handshake ends now
            with contextlib.suppress(OSError, ValueError):
                tls.shutdown(socket.SHUT_RDWR)
        # a peer's half-sent PDU would hold pynetdicom's shutdown for network_timeout_s: its reads end now
        # (nothing being received was acknowledged; the PACS sends it again)
        _end_reads(self._ae)
        self._server.shutdown()
        self._ae.shutdown()
        deadline = time.monotonic() + timeout
        for thread in (self._worker, self._forwarder):  # the forwarder ends once the worker has
            if thread is None:
                continue
            thread.join(max(deadline - time.monotonic(), 0.0))
            if thread.is_alive():
                self._abandon.set()  # the batch being predicted ends; the queues stay on disk
                with self._cond:
                    self._cond.notify_all()
                sending = self._sending
                if sending is not None:  # a destination that accepted and never answers: its reads end now
                    with contextlib.suppress(Exception):
                        sending.dul.socket.socket.shutdown(socket.SHUT_RD)
                thread.join()
        if self._forwards:
            log.warning("%d objects not forwarded before the stop; they are sent at the next start", len(self._forwards))
        self._forwards.clear()
        left = len(self._queue)
        self._log_throughput(final=True)
        if left:
            log.warning("%d received images not predicted before the stop; they stay in %s/ and are "
                        "predicted at the next start", left, INCOMING)
        self._queue.clear()
        self._queued.clear()
        self._server = None
        self._ae = None
        self._worker = None
        self._forwarder = None
        self._folder.close()
        self._folder = None

    def wait_idle(self, timeout_s: float = 60.0) -> bool:
        """Wait until nothing is queued, being received or predicted; False on timeout (for tests and scripts)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._queued or self._reserved or self._forwards or self._forwarding:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.05))
        return True

    def latencies(self) -> list[float]:
        """Seconds from each C-STORE's success to its result row (the latest 10 000)."""
        return list(self._latencies)

    # -- association ----------------------------------------------------------------------------
    def _make_ae(self, pynetdicom: Any) -> Any:
        from pydicom.pixels import get_decoder

        self._syntaxes = [uid for uid in _SYNTAXES if _decodable(get_decoder, uid)]
        ae = pynetdicom.AE(ae_title=self.ae_title)
        ae.maximum_associations = self.max_associations
        ae.maximum_pdu_size = self.max_pdu_bytes
        # Set here, not left to pynetdicom's defaults: a caller that connects and sends nothing is dropped
        # after acse_timeout_s (ARTIM), one that idles in an association after network_timeout_s, so no
        # association thread waits forever on a silent peer (a trickling one: _ReadGuard's deadlines)
        ae.acse_timeout = self.acse_timeout_s
        ae.dimse_timeout = self.dimse_timeout_s
        ae.network_timeout = self.network_timeout_s
        if self.allowed_callers is not None:
            ae.require_calling_aet = list(self.allowed_callers)
        ae.add_supported_context(VERIFICATION)
        for sop_class in CHEST_XRAY_STORAGE:
            ae.add_supported_context(sop_class, self._syntaxes)
        return ae

    def _on_connect(self, event: Any) -> None:
        # pynetdicom rejects associations over maximum_associations only once each has sent its request:
        # until then (acse_timeout_s) every connection holds a thread. Past twice the limit a new one is
        # closed at once (its reads and writes shut: pynetdicom sees the peer gone). Counted: the
        # association threads, and the connections still here (in their TLS handshake, or about to start
        # their thread), which pynetdicom lists nowhere
        opened = time.monotonic()
        acceptors = sum(1 for a in event.assoc.ae.active_associations if a.is_acceptor)  # this one not yet
        with self._cond:
            open_now = acceptors + self._connecting
            self._connecting += 1
        try:
            self._open(event, open_now, opened)
        finally:
            with self._cond:
                self._connecting -= 1

    def _open(self, event: Any, open_now: int, opened: float) -> None:
        _no_delay(event)
        try:
            sock = event.assoc.dul.socket
            if open_now >= 2 * self.max_associations:
                self._on_overrun(_caller_address(event), f"{open_now} connections already open, twice "
                                 f"max_associations ({self.max_associations})")
                with contextlib.suppress(OSError):
                    sock.socket.shutdown(socket.SHUT_RDWR)
                _end_at_once(event.assoc)
                return
            if isinstance(sock.socket, ssl.SSLSocket) and not self._handshake(sock.socket, event):
                _end_at_once(event.assoc)
                return
            # pynetdicom sets network_timeout on the listening socket only, and Python's accept() makes a
            # socket without a timeout: a peer that stops mid-PDU held its thread in recv() for ever, and
            # stop() (pynetdicom's shutdown joins that thread) with it
            sock.socket.settimeout(self.network_timeout_s)
            sock.recv = _ReadGuard(sock, event.assoc.dul, limits.current().max_dicom_bytes + _MESSAGE_SLACK,
                                   functools.partial(self._on_overrun, _caller_address(event)),
                                   max_pdu=max(_MAX_PDU_BYTES, self.max_pdu_bytes), offered_pdu=self.max_pdu_bytes,
                                   # from the connection, not after its TLS handshake: both in acse_timeout_s
                                   request_s=self.acse_timeout_s - (time.monotonic() - opened),
                                   pdu_s=self.network_timeout_s)
        except AttributeError:  # another pynetdicom layout: unguarded, the size is still checked once received
            log.warning("cannot bound the memory of an association in this pynetdicom version")

    def _handshake(self, tls: ssl.SSLSocket, event: Any) -> bool:
        """The TLS handshake of a new connection (see :class:`_LazyHandshake`), within acse_timeout_s; a
        peer that fails it (plain TCP, no certificate the node's tls_ca signed, silence) is closed."""
        with self._cond:
            stopping = self._stopping
            self._handshaking.add(tls)  # a stop cuts it short: pynetdicom's shutdown waits for this thread
        try:
            if stopping:
                raise ConnectionAbortedError("the node is stopping")
            tls.settimeout(self.acse_timeout_s)
            tls.do_handshake()
            return True
        except (OSError, ValueError) as exc:  # ssl.SSLError, a timeout, the peer gone, a stop
            self._on_overrun(_caller_address(event), f"no TLS handshake ({type(exc).__name__}: "
                                                     f"{str(exc).splitlines()[0][:120] if str(exc) else 'timed out'})")
            with contextlib.suppress(OSError, ValueError):
                tls.shutdown(socket.SHUT_RDWR)
            tls.close()  # pynetdicom then sees the connection closed (a stopping node's may never look)
            return False
        finally:
            with self._cond:
                self._handshaking.discard(tls)

    def _on_overrun(self, address: str, reason: str) -> None:
        with self._cond:
            self.stats["refused"] += 1
        log.warning("dropped the connection from %s: %s", address, reason)

    def _on_rejected(self, event: Any) -> None:
        log.warning("refused an association from %s (%s:%s)", _caller(event), *event.assoc.requestor.address[:2])

    def _on_store(self, event: Any) -> Any:
        """The C-STORE handler (pynetdicom's association thread): on disk and queued, or a failure status."""
        caller = _caller(event)
        from ..infer._dicom_derived import is_uid

        uid = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")
        if not is_uid(uid):
            return self._refuse(_CANNOT_UNDERSTAND, "?", caller, "its SOP Instance UID is not a UID")
        with self._cond:
            if self._stopping:
                return self._refuse(_OUT_OF_RESOURCES, uid, caller, "the node is stopping")
            if uid in self._queued:
                # a PACS resending an image still waiting or being predicted (a timeout on its side): one
                # SOP Instance UID is one image, so the copy on disk is the one predicted, once
                self.stats["received"] += 1
                log.debug("received %s from %s again while it is queued", uid, caller)
                return _SUCCESS
            if len(self._queue) + self._reserved >= self.max_queue:
                return self._refuse(_OUT_OF_RESOURCES, uid, caller, f"{self.max_queue} images already wait")
            self._reserved += 1
        try:
            return self._receive(event, uid, caller)
        finally:
            with self._cond:
                self._reserved -= 1
                self._cond.notify_all()

    def _receive(self, event: Any, uid: str, caller: str) -> Any:
        from .._fs import atomic_open

        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception as exc:  # pynetdicom could not assemble it (a damaged stream)
            return self._refuse(_CANNOT_UNDERSTAND, uid, caller, f"the data set cannot be encoded ({type(exc).__name__})")
        if len(data) > limits.current().max_dicom_bytes:
            return self._refuse(_OUT_OF_RESOURCES, uid, caller, f"{len(data):,} bytes, over the max_dicom_bytes limit")
        target = self._folder.file(INCOMING, uid + ".dcm")
        checked: list[Path] = []

        def check(tmp: Path) -> None:  # the complete file, before it takes the image's name
            checked.append(tmp)
            _check_received(tmp, uid)

        try:
            with atomic_open(target, "wb", before_rename=check) as f:
                f.write(data)
            try:
                # the rename is the folder's change: until the folder is on disk, a power cut after the
                # success answer could leave the image under its temporary name, which the next start
                # removes as a write never acknowledged (and the PACS has let the image go)
                _fsync_folder(target.parent)
            except OSError:
                with contextlib.suppress(OSError):
                    target.unlink()  # answered Out of Resources: the PACS sends it again
                raise
        except DicomError as exc:
            from ..infer.inputs import skip_reason

            reason = skip_reason(exc, str(checked[0])) if checked else str(exc)
            return self._refuse(_CANNOT_UNDERSTAND, uid, caller, reason)
        except OSError as exc:  # a full disk: the PACS keeps the image and tries again later
            return self._refuse(_OUT_OF_RESOURCES, uid, caller, f"cannot be written ({exc.strerror or exc})")
        item = _Item(uid, target, caller, _now(), time.monotonic())
        with self._cond:
            self.stats["received"] += 1
            if uid not in self._queued:  # two associations sending it at once: queued once
                self._queue.append(item)
                self._queued.add(uid)
                self._cond.notify_all()
        log.debug("received %s from %s", uid, caller)
        return _SUCCESS

    def _refuse(self, status: int, uid: str, caller: str, reason: str) -> Any:
        from pydicom.dataset import Dataset

        with self._cond:
            self.stats["refused"] += 1
        log.warning("refused %s from %s (status 0x%04X): %s", uid, caller, status, reason)
        answer = Dataset()
        answer.Status = status
        answer.ErrorComment = reason[:64]  # LO
        return answer

    # -- recovery -------------------------------------------------------------------------------
    def _results_path(self) -> Path:
        return self.out_dir / RESULTS

    def _repair_results(self) -> None:
        """A last line without its newline is either a row cut short by a killed node, removed (its image
        is still in incoming/, its object still unrecorded in forwarded.csv), or a whole row a user's
        editor saved without the final newline, kept (see :meth:`_whole_last_row`); the header is written
        to a new results.csv."""
        from .._fs import _LEFTOVER_FILE

        # a kill while a CSV's header was upgraded, or a SEG or overlay written, left a temporary file
        # (the target whole as it was); the folder is this node's alone (prepare_output_folder's lock)
        for folder, prefixes in ((self.out_dir, (f".{RESULTS}.", f".{FORWARDED}.")), (self.out_dir / SEGS, (".",)),
                                 (self.out_dir / DICOM_OVERLAYS, (".",))):
            if folder.is_dir():
                for entry in folder.iterdir():
                    if (entry.name.startswith(prefixes) and _LEFTOVER_FILE.fullmatch(entry.name)
                            and entry.is_file() and not entry.is_symlink()):
                        entry.unlink()
        for name in (RESULTS, FORWARDED):
            if (self.out_dir / name).is_file():
                # before any repair: a header the node does not write is refused with the file untouched
                upgrade = _header_needs_upgrade(self.out_dir / name, *_EARLIER_COLUMNS[name])
                with open(self.out_dir / name, "rb+") as f:
                    data = f.read()
                    if data and not data.endswith(b"\n"):
                        if self._whole_last_row(name, data):
                            f.write(b"\n")
                            f.flush()
                            os.fsync(f.fileno())
                            log.info("%s: the last row had no final newline (saved by an editor?); kept", name)
                        else:
                            f.truncate(data.rfind(b"\n") + 1)
                            log.warning("%s ended in a cut-short row (a node stopped while writing it); removed",
                                        name)
                if upgrade:
                    _upgrade_header(self.out_dir / name, *_EARLIER_COLUMNS[name])
        path = self._results_path()
        if not path.is_file() or path.stat().st_size == 0:
            with open(path, "w", encoding="utf-8", newline="") as f:
                csv.writer(f, lineterminator="\n").writerow(RESULT_COLUMNS)
                f.flush()
                os.fsync(f.fileno())

    def _whole_last_row(self, name: str, data: bytes) -> bool:
        """Whether the last line of ``data`` (results.csv or forwarded.csv, without its newline) is a
        whole row. A row is one write, fsync'ed, so a kill leaves at most its last row cut short; what
        tells a cut row from one an editor saved without the final newline:

        - results.csv: the row has the header's number of fields, names a UID, and that image is no
          longer in incoming/ (removed only after its row is on disk; a row cut inside its last field
          still has every field, but its image is still there);
        - forwarded.csv (no file marks a row written there): the header's number of fields, Forwarded
          yes or no, and the object's path (``seg/<ImageId>.dcm`` or ``dicom-overlay/<ImageId>.dcm``) whole
          in Seg or Overlay, the other empty: a cut inside the path, Forwarded or Error leaves a field
          short or the path cut. A row wrongly taken for cut costs a second send (at least once)."""
        from ..infer._dicom_derived import is_uid

        header, _, rest = data.partition(b"\n")
        last = data[data.rfind(b"\n") + 1:]
        if not rest or not last:  # the header alone, or nothing
            return False
        try:
            fields = next(csv.reader([header.decode("utf-8-sig").rstrip("\r")]))  # an editor may add a BOM
            row = next(csv.reader([last.decode("utf-8")], strict=True))
        except (UnicodeDecodeError, csv.Error, StopIteration):
            return False
        if len(row) != len(fields) or fields[0] != "ImageId":
            return False
        uid = row[0]
        if not is_uid(uid):
            return False
        if name == RESULTS:
            return not (self.out_dir / INCOMING / f"{uid}.dcm").exists()
        got = dict(zip(fields, row))
        objects = {got.get("Seg", ""), got.get("Overlay", "")}
        return got.get("Forwarded") in ("yes", "no") and (
            objects == {f"{SEGS}/{uid}.dcm", ""} or objects == {f"{DICOM_OVERLAYS}/{uid}.dcm", ""})

    def _done_ids(self) -> set[str]:
        with open(self._results_path(), encoding="utf-8-sig", newline="") as f:
            return {row[0] for row in csv.reader(f) if row and row[0] != RESULT_COLUMNS[0]}

    def _resume_incoming(self) -> None:
        from ..data.dicom import _UID_TEXT

        folder = self.out_dir / INCOMING
        if not folder.is_dir():
            return
        done = self._done_ids()
        for entry in sorted(folder.iterdir(), key=lambda p: p.stat().st_mtime_ns):
            name = entry.name
            if name.startswith(".") and ".pneumoseg-" in name and name.endswith(".tmp"):
                entry.unlink()  # a write cut short: its C-STORE was never answered success
                continue
            uid = name[:-4] if name.endswith(".dcm") else ""
            if not entry.is_file() or not _UID_TEXT.fullmatch(uid):
                continue  # not the node's: left alone
            if uid in done:  # its row was written, the node stopped before removing it
                entry.unlink()
                continue
            received = _dt.datetime.fromtimestamp(entry.stat().st_mtime, _dt.timezone.utc).isoformat(timespec="microseconds")
            self._queue.append(_Item(uid, entry, "", received, time.monotonic()))
            self._queued.add(uid)
        if self._queue:
            self.stats["resumed"] = len(self._queue)
            log.info("%d images received before the last stop are queued again", len(self._queue))

    # -- prediction -----------------------------------------------------------------------------
    def _next_batch(self) -> Optional[list[_Item]]:
        with self._cond:
            while not self._queue:
                if self._stopping or self._abandon.is_set():
                    return None
                self._cond.wait(max(min(self.log_every_s, 1.0), 0.05))
                self._log_throughput()
            if self._abandon.is_set():
                return None
            batch = [self._queue.popleft()]
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.batch_size:
                if self._queue:
                    batch.append(self._queue.popleft())
                    continue
                remaining = deadline - time.monotonic()
                if self._stopping or remaining <= 0:
                    break
                self._cond.wait(remaining)
            return batch

    def _work(self) -> None:
        self._last_log = (time.monotonic(), 0)
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._process(batch)
            except Exception as exc:  # a bug, or results.csv cannot be written: logged, and the node goes on
                log.error("a batch of %d images failed: %s: %s", len(batch), type(exc).__name__, exc)
            finally:
                with self._cond:
                    for item in batch:
                        self._queued.discard(item.uid)
                    self._cond.notify_all()
            self._log_throughput()

    def _predict(self, batch: list[_Item]) -> dict[str, Any]:
        """ImageId -> Prediction, or the reason it has none."""
        from ..infer.inputs import skip_reason

        try:
            predictions = self.predictor.predict([str(i.path) for i in batch],
                                                 return_masks=self.write_seg or self.write_overlay,
                                                 on_error="skip", name_by="file", workers=1)
        except Exception as exc:
            if len(batch) > 1:  # one image's fault: the others are predicted alone
                out: dict[str, Any] = {}
                for item in batch:
                    out.update(self._predict([item]))
                return out
            return {batch[0].uid: f"{type(exc).__name__}: {skip_reason(exc, str(batch[0].path))}"}
        out = {Path(where).stem: reason for where, reason in predictions.skipped}
        out.update({p.image_id: p for p in predictions})
        return out

    def _process(self, batch: list[_Item]) -> None:
        results = self._predict(batch)
        for item in batch:
            result = results.get(item.uid, "not predicted")
            row: dict[str, Any] = {"ImageId": item.uid, "Caller": item.caller, "Received": item.received, "Seg": "",
                                   "Forwarded": "", "Error": "", "Overlay": ""}
            if isinstance(result, str):
                row.update(Status="failed", Error=result)
                log.warning("could not predict %s: %s", item.uid, result)
            else:
                row.update(Status="ok", Score=repr(float(result.score)), Positive=int(result.positive),
                           Components=result.n_components, EncodedPixels=result.rle)
                if result.positive:
                    self._derive(item, result, row)
                result.mask = None
            row["Done"] = _now()
            self._append(row)
            if row["Forwarded"] == "queued":  # after its row: an object sent is always one results.csv names
                with self._cond:
                    for kind, column in ((SEGS, "Seg"), (DICOM_OVERLAYS, "Overlay")):
                        if row[column]:
                            self._forwards.append((item.uid, row["Done"], kind, self.out_dir / row[column]))
                    self._cond.notify_all()
            with contextlib.suppress(FileNotFoundError):
                item.path.unlink()
            with self._cond:
                self.stats["failed" if row["Status"] == "failed" else "predicted"] += 1
                self._latencies.append(time.monotonic() - item.received_at)

    def _derive(self, item: _Item, pred: Any, row: dict[str, Any]) -> None:
        """The SEG and / or the overlay of a positive image, each recorded in ``row`` (its path, or in
        Error why it has none: the prediction stands, only that file is lost)."""
        from ..infer import dicom_overlay, dicom_seg

        backend = self.predictor.backend
        made = []
        try:
            seg_source, overlay_source = self._derive_sources(item)
        except (PneumosegError, OSError) as exc:  # deleted or damaged since predicted: neither can be made
            for what in ("SEG",) * self.write_seg + ("overlay",) * self.write_overlay:
                self._record_missing(item, row, what, exc)
            return
        if self.write_seg:
            made.append(self._write_derived(item, row, SEGS, "Seg", "SEG", lambda: dicom_seg.build_dicom_seg(
                pred.mask, seg_source, expect_sop_instance_uid=item.uid, algorithm_parameters={
                    "model": Path(self.predictor.model_dir.path).name, "backend": backend.name,
                    "precision": backend.precision}), dicom_seg.save_dicom_seg))
        if self.write_overlay:
            made.append(self._write_derived(item, row, DICOM_OVERLAYS, "Overlay", "overlay",
                                            lambda: dicom_overlay.build_dicom_overlay(
                                                pred.mask, overlay_source, score=float(pred.score),
                                                expect_sop_instance_uid=item.uid),
                                            dicom_overlay.save_dicom_overlay))
        if self.forward is not None and any(made):
            row["Forwarded"] = "queued"  # handed over once the row is written (_process)

    def _derive_sources(self, item: _Item) -> tuple[Any, Any]:
        """(what the SEG is built from, what the overlay is built from). With the overlay, the received
        file is read once, pixels and all, and both are built from that one read (the SEG from its
        header): one parse instead of two, and both outputs describe the same bytes. Without it, the
        SEG reads the header alone (no pixel decoding)."""
        if not self.write_overlay:
            return item.path, None
        from ..data.dicom import read_dicom

        image = read_dicom(item.path)
        return image._dataset, image

    def _write_derived(self, item: _Item, row: dict[str, Any], subfolder: str, column: str, what: str,
                       build: Any, save: Any) -> bool:
        from ..infer._dicom_derived import write_atomically

        target = self._folder.file(subfolder, item.uid + ".dcm")
        try:
            # the builders refuse a file that now holds another image than the one received under its
            # name (perhaps another patient's), whatever its size: this mask must not be filed under it
            write_atomically(target, build, save)
        except (PneumosegError, OSError) as exc:
            self._record_missing(item, row, what, exc)
            return False
        row[column] = f"{subfolder}/{target.name}"
        with self._cond:
            self.stats["segs" if subfolder == SEGS else "overlays"] += 1
        return True

    def _record_missing(self, item: _Item, row: dict[str, Any], what: str, exc: BaseException) -> None:
        """Why ``what`` (SEG, overlay) of ``item`` was not written, in its row's Error and the log."""
        from ..errors import AnotherImageError
        from ..infer.inputs import skip_reason

        if isinstance(exc, AnotherImageError):
            reason = "the file now holds another image (its SOPInstanceUID is not the one it was received under)"
        else:  # a builder given the file's dataset names it "source dataset <path>"
            reason = skip_reason(exc, str(item.path)).removeprefix(f"source dataset {item.path}: ")
        row["Error"] = "; ".join(filter(None, (row["Error"], f"no {what}: {reason}")))
        log.warning("no %s for %s: %s", what, item.uid, reason)

    def _forward_loop(self) -> None:
        while True:
            with self._cond:
                while not self._forwards:
                    if self._abandon.is_set() or (self._stopping and not self._worker_alive()):
                        return
                    self._cond.wait(0.1)
                if self._abandon.is_set():
                    return
                # what waits goes in one association (a SEG and its overlay, or a backlog)
                batch = [self._forwards.popleft() for _ in range(min(len(self._forwards), _FORWARD_BATCH))]
                self._forwarding = 1
            try:
                outcomes = self._send([path for _, _, _, path in batch])
                for (uid, predicted, kind, path), (sent, reason) in zip(batch, outcomes):
                    if not sent and self._abandon.is_set():
                        continue  # stopped mid-send: not recorded, so sent at the next start
                    where = f"{kind}/{path.name}"
                    self._append({"ImageId": uid, "Predicted": predicted, "Seg": where if kind == SEGS else "",
                                  "Overlay": where if kind == DICOM_OVERLAYS else "", "Done": _now(),
                                  "Forwarded": "yes" if sent else "no", "Error": reason}, FORWARDED, FORWARD_COLUMNS)
                    with self._cond:
                        self.stats["forwarded" if sent else "not_forwarded"] += 1
                    if not sent:
                        log.warning("%s of %s not forwarded to %s: %s (it stays in %s/)",
                                    "SEG" if kind == SEGS else "overlay", uid, self._forward_name(), reason, kind)
            except Exception as exc:  # forwarded.csv cannot be written: what it lacks is sent again at the next start
                log.error("forwarding %d objects failed: %s: %s", len(batch), type(exc).__name__, exc)
            finally:
                with self._cond:
                    self._forwarding = 0
                    self._cond.notify_all()

    def _on_forward_open(self, event: Any) -> None:
        _no_delay(event)
        # pynetdicom's requestor clears its socket's timeout once connected: a destination that stopped
        # mid-PDU (hung, or the network cut with no reset) held its reader in recv() for ever, and
        # associate() / the C-STORE with it (its kill waits for that reader), so nothing more was
        # forwarded until a stop. Each read now ends within the forwarder's timeout (the association
        # then ends as if the destination closed it: tried again, or recorded as not sent)
        with contextlib.suppress(Exception):
            event.assoc.dul.socket.socket.settimeout(_FORWARD_TIMEOUT_S)
        # kept from the connection on: pynetdicom negotiates the association in associate()'s caller
        # (this thread), waiting acse_timeout for a silent destination, before the association is listed
        self._sending = event.assoc

    def _forward_name(self) -> str:
        return "%s@%s:%d" % self.forward if self.forward is not None else ""

    def _worker_alive(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def _resume_forwards(self) -> None:
        """The objects of results.csv rows queued for forwarding that forwarded.csv does not answer (a node
        stopped or killed before sending them) are queued again, where the file is still there."""
        from ..data.dicom import _UID_TEXT

        if self.forward is None:
            return
        done: set[tuple[str, str, str]] = set()
        forwarded = self.out_dir / FORWARDED
        if forwarded.is_file():
            with open(forwarded, encoding="utf-8-sig", newline="") as f:
                done = {(r.get("ImageId") or "", r.get("Predicted") or "", SEGS if r.get("Seg") else DICOM_OVERLAYS)
                        for r in csv.DictReader(f)}
        with open(self._results_path(), encoding="utf-8-sig", newline="") as f:
            for r in csv.DictReader(f):
                if r.get("Forwarded") != "queued":
                    continue
                predicted = r.get("Done") or ""
                for kind, column in ((SEGS, "Seg"), (DICOM_OVERLAYS, "Overlay")):
                    name = r.get(column) or ""
                    if not name or (r["ImageId"], predicted, kind) in done:
                        continue
                    path = self.out_dir / name
                    if name.startswith(kind + "/") and _UID_TEXT.fullmatch(path.stem) and path.is_file():
                        self._forwards.append((r["ImageId"], predicted, kind, path))
        if self._forwards:
            log.info("%d objects not forwarded before the last stop are queued again", len(self._forwards))

    def _send(self, paths: list[Path]) -> list[tuple[bool, str]]:
        """C-STORE each of ``paths`` (SEGs and overlays) to the forward node, in one association, the ones
        not yet stored tried again in a new one up to ``forward_attempts`` times; (sent, why not) each."""
        from pynetdicom import AE, evt

        from ..infer.dicom_overlay import SECONDARY_CAPTURE_STORAGE
        from ..infer.dicom_seg import SEGMENTATION_STORAGE

        assert self.forward is not None
        aet, host, port = self.forward
        outcomes = [(False, "")] * len(paths)
        for attempt in range(self.forward_attempts):
            left = [i for i, (sent, _) in enumerate(outcomes) if not sent]
            if not left:
                break
            if attempt and self._abandon.wait(self.forward_backoff_s * 2 ** (attempt - 1)):
                return [o if o[0] else (False, f"{o[1]}; the node stopped before trying again") for o in outcomes]
            if not self._reachable:
                # pynetdicom 3.0.4 leaves its socket to the garbage collector (a ResourceWarning) when the
                # connection is refused (it shuts the unconnected socket down, which fails, and so never
                # closes it): a destination not known up is tried with a bare connection first. Only
                # then: a pynetdicom destination holds each such connection as an association for its
                # ARTIM timeout (30 s), and one per batch filled its association limit (10), which then
                # refused the node's own associations (SEGs recorded as not forwarded)
                try:
                    socket.create_connection((host, port), timeout=10).close()
                except OSError as exc:
                    for i in left:
                        outcomes[i] = (False, f"cannot connect ({exc.strerror or exc})")
                    continue
            ae = AE(ae_title=self.ae_title)
            ae.acse_timeout = ae.network_timeout = _FORWARD_TIMEOUT_S
            ae.dimse_timeout = self.dimse_timeout_s
            # the TCP connect and, with forward_tls_ca, the TLS handshake (none by default)
            ae.connection_timeout = _FORWARD_TIMEOUT_S
            # each object under its own SOP class; the writers make Explicit VR Little Endian (Implicit is
            # offered too, for a destination that takes only that: pynetdicom converts between the two)
            for sop_class in (SEGMENTATION_STORAGE, SECONDARY_CAPTURE_STORAGE):
                ae.add_requested_context(sop_class, [_EXPLICIT_LE, "1.2.840.10008.1.2"])
            try:
                if self._abandon.is_set():
                    return [o if o[0] else (False, "the node stopped before sending it") for o in outcomes]
                assoc = ae.associate(host, port, ae_title=aet, evt_handlers=[(evt.EVT_CONN_OPEN, self._on_forward_open)],
                                     tls_args=(self._forward_tls, host) if self._forward_tls is not None else None)
                self._reachable = assoc.is_established
                if not assoc.is_established:
                    for i in left:
                        outcomes[i] = (False, "association refused or failed")
                    continue
                try:
                    for i in left:
                        # a stop that gives up has cut the association, but pynetdicom may not have seen it
                        # end yet: a C-STORE sent now waits out dimse_timeout (30 s) for an answer, and the
                        # stop with it
                        if self._abandon.is_set():
                            outcomes[i] = (False, "the node stopped before sending it")
                            continue
                        if not assoc.is_established:
                            outcomes[i] = (False, "the association ended before it was sent")
                            continue
                        try:
                            status = assoc.send_c_store(paths[i])
                        except Exception as exc:  # no context accepted for its SOP class, a file gone
                            outcomes[i] = (False, f"{type(exc).__name__}: {exc}")
                            continue
                        code = getattr(status, "Status", None)
                        outcomes[i] = ((True, "") if code in _STORED_STATUSES else
                                       (False, "no answer" if code is None else f"status 0x{int(code):04X}"))
                finally:
                    assoc.release()
            except Exception as exc:
                self._reachable = False
                for i in left:
                    if not outcomes[i][0]:
                        outcomes[i] = (False, f"{type(exc).__name__}: {exc}")
                continue
            finally:
                self._sending = None
                ae.shutdown()
        return [o if o[0] else (False, f"{o[1]} ({self.forward_attempts} attempts)") for o in outcomes]

    def _append(self, row: dict[str, Any], name: str = RESULTS, columns: tuple[str, ...] = RESULT_COLUMNS) -> None:
        """One row, flushed to disk before its incoming file is removed."""
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow([row.get(c, "") for c in columns])
        text = buffer.getvalue()
        with self._results_lock, open(self.out_dir / name, "a+b") as f:
            # results.csv is the user's to open while the node runs: one deleted (or emptied) gets its
            # header again, and one saved by an editor without a final newline does not take this row
            # onto its last line
            if f.seek(0, os.SEEK_END) == 0:
                header = io.StringIO()
                csv.writer(header, lineterminator="\n").writerow(columns)
                text = header.getvalue() + text
            else:
                f.seek(-1, os.SEEK_END)
                if f.read(1) not in (b"\n", b"\r"):
                    text = "\n" + text
            f.write(text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())

    def _log_throughput(self, final: bool = False) -> None:
        now = time.monotonic()
        last_time, last_done = getattr(self, "_last_log", (now, 0))
        done = self.stats["predicted"] + self.stats["failed"]
        if not final and (now - last_time < self.log_every_s or done == last_done):
            return
        self._last_log = (now, done)
        rate = (done - last_done) / max(now - last_time, 1e-9)
        log.info("%sreceived %d, predicted %d (%.2f images/s lately), failed %d, refused %d, waiting %d, "
                 "SEGs %d, overlays %d, forwarded %d, not forwarded %d", "stopped: " if final else "",
                 self.stats["received"], self.stats["predicted"], rate, self.stats["failed"], self.stats["refused"],
                 len(self._queue), self.stats["segs"], self.stats["overlays"], self.stats["forwarded"],
                 self.stats["not_forwarded"])


def _header(path: Path) -> Optional[tuple[str, ...]]:
    """The column names on the first line of ``path`` (a BOM and a CRLF, as Excel saves, read through);
    None where its first line is not CSV text; () where it has no whole first line (empty, or the header
    cut by a kill as it was written: the repair empties the file)."""
    with open(path, "rb") as f:
        first = f.readline()
    if not first.endswith(b"\n"):
        return ()
    try:
        names = next(csv.reader([first.decode("utf-8-sig").rstrip("\r\n")], strict=True), None)
    except (UnicodeDecodeError, csv.Error):
        return None
    return tuple(names) if names and any(names) else None


def _header_needs_upgrade(path: Path, earlier: tuple[str, ...], columns: tuple[str, ...]) -> bool:
    """Whether a CSV the node appends to has an earlier node's header (``earlier``, to be upgraded); its
    own (``columns``, perhaps with a user's columns after them) is fine. Any other header is refused: the
    node appends its columns in its own order, so rows would land under other names (reordered columns),
    or an upgrade would put Overlay where a user's column is (an earlier header with columns added)."""
    header = _header(path)
    if header == ():
        return False  # given its header when the first row is written
    if header is not None and header[:len(columns)] == columns:
        return False
    if header == earlier:
        return True
    raise NodeError(f"{path}: its header is not the node's columns ({','.join(columns)}), nor an earlier "
                    f"node's; it starts {show(','.join(header or ())[:120])}. The node appends rows in its own "
                    "column order: restore the header, or move the file aside and start again")


def _upgrade_header(path: Path, earlier: tuple[str, ...], columns: tuple[str, ...]) -> None:
    """A CSV an earlier node began with ``earlier`` columns gets the header ``columns`` (which adds
    columns at the end), replaced atomically (a kill leaves the old file and a temporary file that the
    next start removes): its rows stay as they are, byte for byte, read with the new columns empty."""
    from .._fs import atomic_open

    with open(path, "rb") as f, atomic_open(path, "wb") as out:
        f.readline()  # the old header (with any BOM)
        out.write((",".join(columns) + "\n").encode("utf-8"))
        shutil.copyfileobj(f, out)  # results.csv may be large: not read into memory whole
    log.info("%s: the columns %s added to an earlier node's header", path.name, ", ".join(columns[len(earlier):]))


def _decodable(get_decoder: Any, uid: str) -> bool:
    try:
        return bool(get_decoder(uid).is_available)
    except Exception:  # no decoder for it in this pydicom
        return False


def _fsync_folder(folder: Path) -> None:
    """Put ``folder``'s entries (a file just renamed into it) on disk; a no-op where folders cannot be
    opened (Windows, whose renames are journaled by NTFS)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except (PermissionError, IsADirectoryError):
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _no_delay(event: Any) -> None:
    """TCP_NODELAY on an association's socket. pynetdicom leaves Nagle's algorithm on: a C-STORE is
    written as a command PDU then the data set's, and the second waited for the peer's delayed ACK of
    the first (40 ms on Linux), 50 ms an image where the node's own handling takes 5 ms. This sets it
    for the node's answers and its forwards; a sender that keeps Nagle on still pays it per image."""
    with contextlib.suppress(Exception):  # a socket type without it (TLS wrapper, another platform)
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _end_at_once(assoc: Any) -> None:
    """Let the thread of a connection the node dropped (not yet started) end at once: pynetdicom's
    acceptor waits acse_timeout for an association request whether or not its connection is still
    there, and its thread counts against the connection cap and max_associations meanwhile."""
    with contextlib.suppress(Exception):
        assoc.acse_timeout = 0


def _end_reads(ae: Any) -> None:
    """End the reads of ``ae``'s associations: pynetdicom's shutdown joins each association's reader,
    which otherwise waits out its timeout (for an association request: acse_timeout) on a silent peer."""
    for assoc in ae.active_associations:
        with contextlib.suppress(Exception):
            assoc.dul.socket.socket.shutdown(socket.SHUT_RD)


def _caller_address(event: Any) -> str:
    try:
        return "%s:%s" % tuple(event.address[:2])
    except Exception:
        return "?"


#: Read-ahead bounds per association. A PDU over _MAX_PDU_BYTES (or the max_pdu_bytes offered, if
#: larger) is refused before it is read (the node offers pynetdicom's 16 KiB maximum by default; an
#: association request with many contexts, or a peer sending a little over the maximum, stays well under
#: this). The DIMSE message being received may reach max_dicom_bytes plus _MESSAGE_SLACK (its command
#: set). At most _QUEUED_MESSAGES whole DIMSE messages (pynetdicom 3 assembles them in the reader thread,
#: into dimse.msg_queue) and _QUEUED_PDUS other primitives (its to_user_queue: association, release,
#: abort) wait for the association's thread, which is busy while an instance is written: a peer that
#: sends C-STOREs without waiting for the answers then waits on TCP instead of filling memory.
_MAX_PDU_BYTES = 4 << 20
_MESSAGE_SLACK = 1 << 20
_QUEUED_PDUS = 16
_QUEUED_MESSAGES = 1


class _ReadGuard:
    """An association socket's ``recv``, bounding what pynetdicom's reader thread takes in, and for how
    long. pynetdicom reads each PDU as ``recv(6)`` (type and length) then ``recv(length)``, trusting the
    length, and reassembles a DIMSE message from any number of fragments: a peer declaring a 4 GiB PDU,
    or sending fragments without end, would have it all in memory before any handler sees it. And its
    timers run between PDUs only: a peer sending a PDU a byte at a time, each byte within the socket's
    timeout, held the association's thread (and one of max_associations) for as long as it liked. So:

    - the first PDU (the association request) must be whole ``request_s`` after the connection opened,
      every later one ``pdu_s`` after its first byte;
    - a DIMSE message (command set, then data set) must arrive at one ``offered_pdu`` or more per
      ``pdu_s``: a peer sending tiny PDUs, each in time, is refused too (a real sender is thousands of
      times faster);
    - time spent waiting for the node's own thread (the _QUEUED_PDUS bound) counts against neither.

    An overrun raises OSError, which pynetdicom treats as the connection closing: the association ends,
    nothing is stored and nothing was acknowledged."""

    def __init__(self, sock: Any, dul: Any, max_message: int, on_overrun: Any, *, max_pdu: int = _MAX_PDU_BYTES,
                 offered_pdu: int = 16382, request_s: float = 30.0, pdu_s: float = 60.0) -> None:
        self._sock, self._dul, self.max_message, self._on_overrun = sock, dul, max_message, on_overrun
        self.max_pdu, self.offered_pdu, self.pdu_s = max_pdu, offered_pdu, pdu_s
        self._pdu_type: Optional[int] = None  # the type of the PDU whose body comes next
        self.message = 0  # bytes of the DIMSE message being received
        self._message_start: Optional[float] = None  # when its first fragment came (time.monotonic())
        self._first = True  # the association request is next
        self._deadline = time.monotonic() + request_s  # for the PDU being read
        self._late = "no whole association request within acse_timeout_s of connecting"

    def _refuse(self, reason: str) -> None:
        self._on_overrun(reason)
        raise OSError(reason)

    def _backlog(self) -> bool:
        """Whether the association's thread has enough waiting for it."""
        dimse = getattr(self._dul.assoc, "dimse", None)
        return (self._dul.to_user_queue.qsize() >= _QUEUED_PDUS
                or (dimse is not None and dimse.msg_queue.qsize() >= _QUEUED_MESSAGES))

    def _ended(self) -> bool:
        """Whether the association is over: its thread takes nothing more, and its end (an abort, a stop:
        pynetdicom's kill) waits for this reader to return, which a wait for that thread would never do."""
        assoc = self._dul.assoc
        return bool(self._dul._kill_thread or getattr(assoc, "_kill", False) or getattr(assoc, "is_aborted", False)
                    or not assoc.is_alive())

    def _read(self, nr_bytes: int) -> bytearray:
        """Up to ``nr_bytes`` from the socket (fewer where the peer closed it) by the PDU's deadline, as
        pynetdicom's own recv reads them; each wait on the socket ends by then too."""
        raw = self._sock.socket
        data = bytearray()
        try:
            while len(data) < nr_bytes:
                left = self._deadline - time.monotonic()
                if left <= 0:
                    self._refuse(self._late)
                raw.settimeout(min(left, self.pdu_s))
                try:
                    chunk = raw.recv(min(nr_bytes - len(data), 65536))
                except TimeoutError:
                    if time.monotonic() >= self._deadline:
                        self._refuse(self._late)
                    raise
                if not chunk:
                    break
                data.extend(chunk)
        finally:
            with contextlib.suppress(OSError):
                raw.settimeout(self.pdu_s)  # the node's answers are sent on it too
        return data

    def __call__(self, nr_bytes: int) -> Any:
        if self._pdu_type is None:  # a PDU header next
            waited = time.monotonic()
            while self._backlog() and not self._ended():
                time.sleep(0.002)
            now = time.monotonic()
            if self._message_start is not None:  # the node's own delay is not the peer's
                self._message_start += now - waited
            if not self._first:
                self._deadline = now + self.pdu_s
                self._late = f"a PDU not whole {self.pdu_s:g} s after it began"
            data = self._read(nr_bytes)
            if len(data) == 6:
                length = int.from_bytes(data[2:6], "big")
                if length > self.max_pdu:
                    self._refuse(f"a PDU of {length:,} bytes declared, over {self.max_pdu:,}")
                self._pdu_type = data[0]
            return data
        pdu_type, self._pdu_type, self._first = self._pdu_type, None, False
        data = self._read(nr_bytes)
        if pdu_type == 0x04:  # P-DATA-TF: items of (length, context, control header, fragment)
            at = 0
            while at + 6 <= len(data):
                length = int.from_bytes(data[at:at + 4], "big")
                now = time.monotonic()
                if self._message_start is None:
                    self._message_start = now
                self.message += max(length - 2, 0)
                if self.message > self.max_message:
                    self._refuse(f"a DIMSE message over {self.max_message:,} bytes (the max_dicom_bytes limit)")
                if now - self._message_start > self.pdu_s * (1 + self.message // self.offered_pdu):
                    self._refuse(f"a DIMSE message arriving at under {self.offered_pdu:,} bytes per "
                                 f"{self.pdu_s:g} s ({self.message:,} bytes in {now - self._message_start:.1f} s)")
                if data[at + 5] & 0b10:  # the last fragment of a command set or data set: counted afresh
                    self.message = 0
                    self._message_start = None
                at += 4 + length
        return data


def _caller(event: Any) -> str:
    try:
        return str(event.assoc.requestor.ae_title).strip()
    except Exception:
        return "?"


def _check_received(path: Path, uid: str) -> None:
    """A received file's header, before it is renamed into incoming/: one grey-level 2-D image within
    the limits, naming itself with the UID it was sent under. Any problem is a DicomError."""
    from ..data.dicom import _damaged_header_errors, _declared_shape, _header_text, _open_dicom, _read_dataset, _refuse_dicomdir

    with _open_dicom(path) as f:
        ds = _read_dataset(f, path, stop_before_pixels=True)
    with _damaged_header_errors(path):
        _refuse_dicomdir(ds, path)
        _declared_shape(ds, path)  # a grey-level image within the limits
        if _header_text(ds, "SOPInstanceUID") != uid:
            raise DicomError(f"{path}: its SOPInstanceUID is not the one it was sent under")
        frames = _header_text(ds, "NumberOfFrames")
        if frames not in (None, "1"):
            raise DicomError(f"{path}: expected a single 2-D image, it has {show(frames)} frames")
