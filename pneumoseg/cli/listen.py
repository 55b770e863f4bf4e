"""``pneumoseg listen``: a DICOM node beside a PACS (see :mod:`pneumoseg.serve`), until Ctrl-C."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from ..serve.node import MAX_ASSOCIATIONS, MAX_PDU_BYTES, TIMEOUT_S
from .types import add_backend_options, int_in, path, real_in


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "listen", help="a DICOM node beside a PACS: receive radiographs (C-STORE), predict, send SEGs back",
        description="Run a DICOM node (Verification and Storage SCP for CR, DX and Secondary Capture images) "
                    "until Ctrl-C or SIGTERM. Each image received is written to OUT/incoming/ before it is "
                    "acknowledged, predicted in small batches, recorded in OUT/results.csv (ImageId = its "
                    "SOPInstanceUID, score, RLE, times; no patient data) and, when positive, written as a DICOM "
                    "Segmentation OUT/seg/<ImageId>.dcm, which carries its source's patient and study identity "
                    "so that the PACS files it (--forward sends it there); with --dicom-overlay also a captioned Secondary "
                    "Capture OUT/dicom-overlay/<ImageId>.dcm, for viewers that draw no SEG. Other SOP classes (a CT series) are "
                    "refused at association. A stop predicts what is queued; a restart into the same OUT "
                    "predicts what an earlier node left in incoming/. Needs pynetdicom and highdicom: "
                    "pip install 'pneumoseg[pacs]'")
    p.add_argument("--model", type=path, required=True, help="model directory (from `pneumoseg train`)")
    p.add_argument("--out", type=path, required=True,
                   help="output folder (new, or an earlier `pneumoseg listen`'s, which is continued)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; a PACS on another machine "
                        "needs 0.0.0.0 or this machine's address on its network)")
    p.add_argument("--port", type=int_in(0, 65535), default=11112, help="TCP port (default 11112; 0 picks a free one)")
    p.add_argument("--ae-title", default="PNEUMOSEG", help="this node's AE title (default PNEUMOSEG)")
    p.add_argument("--forward", metavar="AET@HOST:PORT", default=None,
                   help="send each SEG (and overlay) to this node (the PACS's storage AE), retrying 3 times, from a "
                        "thread of its own (a destination that is down never delays predictions); OUT/forwarded.csv records each "
                        "outcome, a file that cannot be sent stays where it was written, and one not yet sent at a "
                        "stop is sent at the next start")
    p.add_argument("--allow", metavar="AET,...", default=None,
                   help="accept associations only from these calling AE titles (default: any caller)")
    add_backend_options(p, batch_size_help="at most this many images per batch (default 8)")
    p.add_argument("--batch-wait", type=real_in(0.0, 60.0), default=0.05, metavar="SECONDS",
                   help="how long the first image of a batch waits for others (default 0.05)")
    p.add_argument("--max-queue", type=int_in(1, 1 << 20), default=256,
                   help="images waiting at most; more are answered Out of Resources (0xA700) (default 256)")
    p.add_argument("--no-seg", action="store_true", help="write no SEGs (results.csv only, or with --dicom-overlay)")
    p.add_argument("--dicom-overlay", action="store_true",
                   help="also write OUT/dicom-overlay/<ImageId>.dcm per positive image, as predict --dicom-overlay: "
                        "the mask burned into the radiograph as a captioned DICOM Secondary Capture in the source's "
                        "study, for PACS viewers that draw no SEG (it carries the patient's identity and pixels, as "
                        "the SEG does; sent by --forward too)")
    bounds = p.add_argument_group("peer bounds", "against broken or hostile peers: none may hang the node, hold it "
                                  "or fill its memory")
    bounds.add_argument("--max-associations", type=int_in(*MAX_ASSOCIATIONS), default=4, metavar="N",
                        help="concurrent associations; the next request is rejected (transient: a PACS tries "
                             "again later) (default 4)")
    bounds.add_argument("--acse-timeout", type=real_in(*TIMEOUT_S), default=30.0, metavar="SECONDS",
                        help="a connection whose association request is not whole this long after it opened "
                             "(silent, or trickling) is closed (default 30)")
    bounds.add_argument("--network-timeout", type=real_in(*TIMEOUT_S), default=60.0, metavar="SECONDS",
                        help="an association silent this long, or whose PDU is not whole this long after it began, "
                             "is aborted (default 60)")
    bounds.add_argument("--dimse-timeout", type=real_in(*TIMEOUT_S), default=30.0, metavar="SECONDS",
                        help="how long the node waits for a DIMSE answer: --forward's destination's to each "
                             "C-STORE (default 30)")
    bounds.add_argument("--max-pdu-size", type=int_in(*MAX_PDU_BYTES), default=16382, metavar="BYTES",
                        help="the largest PDU the node offers to receive (default 16382)")
    tls = p.add_argument_group("TLS", "DICOM over TLS (1.2 or later); PEM files, the key without a password")
    tls.add_argument("--tls-cert", type=path, default=None, metavar="PEM",
                     help="this node's certificate (chain): with --tls-key, callers must use TLS")
    tls.add_argument("--tls-key", type=path, default=None, metavar="PEM", help="the private key of --tls-cert")
    tls.add_argument("--tls-ca", type=path, default=None, metavar="PEM",
                     help="callers must present a certificate these CA certificates signed (needs --tls-cert)")
    tls.add_argument("--forward-tls-ca", type=path, default=None, metavar="PEM",
                     help="--forward over TLS, the destination's certificate verified against these CA "
                          "certificates and its host name (--tls-cert is presented if it asks for one)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import InvalidInputError
    from ..serve.node import (DicomNode, check_ae_title, parse_forward, require_pynetdicom, tls_client_context,
                              tls_server_context)

    # every argument and the optional packages are checked before the model loads
    require_pynetdicom()
    if not args.no_seg or args.dicom_overlay:
        from ..infer.dicom_seg import require_highdicom

        require_highdicom("DICOM Segmentation output" if not args.no_seg else "DICOM overlay output")
    check_ae_title(args.ae_title, "--ae-title")
    if args.forward is not None:
        parse_forward(args.forward)
        if args.no_seg and not args.dicom_overlay:
            raise InvalidInputError("--forward sends the SEGs, which --no-seg turns off")
    # the files read as the node reads them, their errors naming the options
    tls_server_context(args.tls_cert, args.tls_key, args.tls_ca, names=("--tls-cert", "--tls-key", "--tls-ca"))
    if args.forward_tls_ca is not None:
        if args.forward is None:
            raise InvalidInputError("--forward-tls-ca verifies the --forward destination: give --forward")
        tls_client_context(args.forward_tls_ca, args.tls_cert, args.tls_key,
                           names=("--forward-tls-ca", "--tls-cert", "--tls-key"))
    allowed = None
    if args.allow is not None:
        allowed = [check_ae_title(t, "--allow's titles") for t in args.allow.split(",")]

    # --out the model directory (or inside it) would make it a node folder, and saves and exports into
    # it would then be refused as another command's output
    from .._fs import OutputKind, refuse_output_among_inputs

    refuse_output_among_inputs(args.out, (args.model,), OutputKind.DICOM_NODE)
    from ..infer import Predictor

    predictor = Predictor.from_dir(args.model, backend=args.backend, device=args.device, precision=args.precision,
                                   batch_size=args.batch_size)
    _log_to_stderr()
    node = DicomNode(predictor, args.out, ae_title=args.ae_title, host=args.host, port=args.port,
                     forward=args.forward, allowed_callers=allowed, max_queue=args.max_queue,
                     batch_size=args.batch_size, batch_wait_s=args.batch_wait, write_seg=not args.no_seg,
                     write_overlay=args.dicom_overlay, max_associations=args.max_associations,
                     acse_timeout_s=args.acse_timeout, network_timeout_s=args.network_timeout,
                     dimse_timeout_s=args.dimse_timeout, max_pdu_bytes=args.max_pdu_size, tls_cert=args.tls_cert,
                     tls_key=args.tls_key, tls_ca=args.tls_ca, forward_tls_ca=args.forward_tls_ca)
    node.start()
    print(f"listening as {node.ae_title} on {node.host}:{node.port} with {predictor.backend.name} "
          f"{predictor.backend.precision} on {predictor.backend.device}; writing to {args.out}; Ctrl-C stops",
          file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:  # Ctrl-C and SIGTERM (the CLI raises it for both): the way a node stops
        print("pneumoseg: stopping (predicting what is queued)", file=sys.stderr, flush=True)
    finally:
        node.stop()
    return 0


def _log_to_stderr() -> None:
    """pneumoseg.serve's log lines (counts, throughput, refusals; no patient data) on stderr; pynetdicom's
    and highdicom's own stay at their defaults (nothing shown)."""
    logger = logging.getLogger("pneumoseg")
    if not any(getattr(h, "_pneumoseg_listen", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handler._pneumoseg_listen = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
