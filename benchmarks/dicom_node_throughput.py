"""`pneumoseg listen`'s node end to end: images/s received and predicted for N images sent by one SCU in
one association (C-STORE of each, in turn, as fast as the node acknowledges), and the latency from each
C-STORE's success to its row in results.csv (p50 / p95), against Predictor.predict on the same files
(what a folder-based CLI run costs). The sender's socket is measured as pynetdicom leaves it (Nagle's
algorithm on: each C-STORE's data set waits for the delayed ACK of its command, about 40 ms on Linux)
and with TCP_NODELAY. Each run is a fresh node in a fresh folder; interleaved, medians of --repeats.

    python benchmarks/dicom_node_throughput.py [--n 64] [--size 256] [--repeats 3] [--model DIR] [--no-seg]

The default model is the tests' tiny one (resnet_tiny U-Net at 64 px with a 96 px classifier, random
weights sharpened so that about half the images are positive and get a SEG); the images are
synthetic SIIM-like studies (Secondary Capture, JPEG baseline) of --size pixels."""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--no-seg", action="store_true")
    args = parser.parse_args()

    import pydicom
    import torch
    from pynetdicom import AE, evt

    from pneumoseg.data import make_synthetic_siim
    from pneumoseg.infer import Predictor
    from pneumoseg.serve import DicomNode

    scratch = Path(tempfile.mkdtemp(prefix="pneumoseg-node-bench-"))
    make_synthetic_siim(scratch / "studies", n_images=args.n, size=args.size, positive_fraction=0.5, seed=0)
    files = sorted((scratch / "studies").rglob("*.dcm"))
    datasets = [pydicom.dcmread(f) for f in files]  # read once: the SCU's reading is not the node's cost
    if args.model is None:
        from infer_helpers import model_dir

        args.model = model_dir("classifier")
    predictor = Predictor.from_dir(args.model, backend="torch", device="cpu", batch_size=args.batch_size)
    predictor.predict([str(f) for f in files[:args.batch_size]])  # warm up

    def no_delay(event):
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def through_node(folder: Path, scu_no_delay: bool) -> tuple[float, float, float, float]:
        """(images/s end to end, C-STOREs acknowledged per s, latency p50, p95 in s) of one fresh node."""
        node = DicomNode(predictor, folder, port=0, batch_size=args.batch_size, write_seg=not args.no_seg,
                         log_every_s=1e6).start()
        ae = AE(ae_title="BENCH")
        for syntax in ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.1"):
            ae.add_requested_context("1.2.840.10008.5.1.4.1.1.7", syntax)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="PNEUMOSEG",
                             evt_handlers=[(evt.EVT_CONN_OPEN, no_delay)] if scu_no_delay else [])
        start = time.perf_counter()
        statuses = [int(assoc.send_c_store(ds).Status) for ds in datasets]
        sent = time.perf_counter() - start
        assoc.release()
        ae.shutdown()
        assert node.wait_idle(600) and statuses == [0] * len(files), statuses
        done = time.perf_counter() - start
        latencies = np.array(node.latencies())
        node.stop()
        return (len(files) / done, len(files) / sent, float(np.percentile(latencies, 50)),
                float(np.percentile(latencies, 95)))

    runs: dict[str, list[tuple[float, float, float, float]]] = {"Nagle on (pynetdicom's default)": [],
                                                                "TCP_NODELAY": []}
    direct_rates, positives = [], []
    for r in range(args.repeats):  # interleaved: the machine's load drifts alike for all three
        start = time.perf_counter()
        preds = predictor.predict([str(f) for f in files], return_masks=not args.no_seg)
        direct_rates.append(len(files) / (time.perf_counter() - start))
        positives.append(sum(p.positive for p in preds))
        for i, name in enumerate(runs):
            runs[name].append(through_node(scratch / f"node{r}-{i}", scu_no_delay=i == 1))

    med = statistics.median
    print(f"{args.n} images {args.size}x{args.size} (JPEG baseline SC), model {Path(args.model).name}, batch "
          f"{args.batch_size}, SEGs {'off' if args.no_seg else 'on'} ({med(positives)} positives), "
          f"torch {torch.__version__} on CPU, {torch.get_num_threads()} threads; medians of {args.repeats}")
    for name, results in runs.items():
        rates, acks, p50, p95 = (list(x) for x in zip(*results))
        print(f"  node, sender's socket {name}: {med(rates):.1f} images/s end to end (first C-STORE to last "
              f"result row; runs {', '.join(f'{x:.1f}' for x in rates)}), C-STOREs acknowledged "
              f"{med(acks):.1f}/s, latency C-STORE success -> result row p50 {med(p50) * 1e3:.0f} ms, "
              f"p95 {med(p95) * 1e3:.0f} ms")
    print(f"  Predictor.predict on the same files (already on disk): {med(direct_rates):.1f} images/s "
          f"(runs {', '.join(f'{x:.1f}' for x in direct_rates)})")


if __name__ == "__main__":
    main()
