"""``pneumoseg predict``: a submission, overlays and a summary for DICOM files and folders."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from typing import Optional

from .types import add_no_progress, int_in, path

SUBMISSION = "submission.csv"
SCORES = "scores.csv"
SUMMARY = "summary.json"
OVERLAYS = "overlays"
SEGS = "seg"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "predict", help="two-stage inference on DICOM files or folders: submission.csv, overlays, summary.json",
        description="Predict every DICOM given (files, folders searched recursively, the Kaggle test layout, PACS "
                    "exports: files with or without the .dcm suffix; a DICOMDIR is skipped). "
                    "Writes submission.csv (ImageId,EncodedPixels; -1 when empty; one row per image), scores.csv, "
                    "a PNG overlay per positive image (and, with --dicom-seg, a DICOM Segmentation) and "
                    "summary.json. Unreadable or non-DICOM files are reported and skipped.")
    p.add_argument("inputs", nargs="+", type=path, metavar="INPUT", help="DICOM files or folders")
    p.add_argument("--model", type=path, required=True, help="model directory (from `pneumoseg train`)")
    p.add_argument("--out", type=path, required=True, help="output folder (new, or pneumoseg's own earlier output)")
    p.add_argument("--backend", choices=("auto", "torch", "onnxruntime", "tensorrt"), default="auto",
                   help="default auto: torch on CUDA; on a CPU onnxruntime when the model has been exported "
                        "(`pneumoseg export MODEL --format onnx`), else torch")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N (default auto)")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default=None,
                   help="default: fp16 on CUDA, fp32 on a CPU")
    p.add_argument("--batch-size", type=int_in(1, 4096), default=8, help="images per network call (default 8)")
    p.add_argument("--tta", action="store_true", help="average with the horizontally flipped image")
    p.add_argument("--segment", choices=("gated", "all"), default="gated",
                   help="segment only the images the gate passes (default) or all (same answers)")
    p.add_argument("--name-by", choices=("file", "uid"), default="file",
                   help="each image's ImageId: file, its file name without .dcm (default; the Kaggle layout, where "
                        "the file name is the SOPInstanceUID), or uid, the SOPInstanceUID in its DICOM header (PACS "
                        "exports and DICOM media, whose files are IM0001 ... in every series folder)")
    p.add_argument("--workers", type=int_in(1, 64), default=2, help="threads reading DICOMs (default 2)")
    p.add_argument("--no-overlays", action="store_true", help="do not write the overlay pictures")
    p.add_argument("--dicom-seg", action="store_true",
                   help=f"also write {SEGS}/<ImageId>.dcm, a DICOM Segmentation of each positive image that a PACS files "
                        "beside its source and a viewer draws over it. Opt-in because each SEG copies its source's "
                        "patient and study identity (name, ID and its issuer, birth date, sex, study date and time, "
                        "study ID, accession number, referring physician), which is what files it into the study; "
                        "no other output holds patient data. Needs highdicom: pip install 'pneumoseg[pacs]'")
    p.add_argument("--force", action="store_true",
                   help="replace an existing submission.csv / write into a folder holding other files")
    add_no_progress(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from .._fs import OutputKind, check_output_folder, prepare_output_folder, safe_file_names
    from ..data.siim import check_csv_image_ids
    from ..errors import OutputError
    from ..infer import Predictor

    if args.dicom_seg:  # a missing highdicom is refused before the model loads
        from ..infer.dicom_seg import require_highdicom

        require_highdicom()
    # Refused before any work: an existing submission is never replaced without --force (even one
    # pneumoseg wrote: a submission is the thing people hand in).
    inputs = (*args.inputs, args.model)
    check_output_folder(args.out, overwrite=args.force, what=OutputKind.PREDICTION, inputs=inputs,
                        never_replace=(SUBMISSION,))
    predictor = Predictor.from_dir(args.model, backend=args.backend, device=args.device, precision=args.precision,
                                   tta=args.tta, segment=args.segment, batch_size=args.batch_size)
    stream = predictor.predict_iter([str(p) for p in args.inputs], return_masks=args.dicom_seg or not args.no_overlays,
                                    on_error="skip", progress=not args.no_progress, workers=args.workers,
                                    name_by=args.name_by)
    # Every ImageId is checked before anything is written: it is a row of the CSVs and names an overlay.
    for source in stream.sources:
        _check_utf8_image_id(source)  # first: its message says what to do in this command
        check_csv_image_ids([source.image_id], what=f"{source.path}: its ImageId")
    names = safe_file_names([s.image_id for s in stream.sources], ".png")
    seg_names = safe_file_names([s.image_id for s in stream.sources], ".dcm") if args.dicom_seg else {}
    # the submission is checked again once the folder is held: another predict into it may have
    # finished while this one loaded the model
    # The with block is the run: an error or a stop inside it removes what it wrote and puts the folder's
    # earlier output back, as it was (see pneumoseg._fs).
    with prepare_output_folder(args.out, overwrite=args.force, what=OutputKind.PREDICTION, inputs=inputs,
                               never_replace=(SUBMISSION,)) as folder:
        start = time.perf_counter()
        predictions = []
        overlays = 0
        segs = 0
        no_segs: list[dict[str, str]] = []  # positives without a SEG, and why (summary.json)
        # closed however the loop ends (a failed write, Ctrl-C): the reader threads stop and the progress
        # bar ends its line before the one-line message, instead of whenever the stream is collected
        with contextlib.closing(stream):
            for pred in stream:
                if pred.positive and not args.no_overlays:
                    overlays += write_overlay(folder, names[pred.image_id], pred)
                if pred.positive and args.dicom_seg:
                    reason = write_segmentation(folder, seg_names[pred.image_id], pred, predictor, args.name_by)
                    segs += reason is None
                    if reason is not None:
                        no_segs.append({"image_id": pred.image_id, "reason": reason})
                pred.mask = None  # memory stays bounded: the mask is in its overlay, its SEG and its RLE
                predictions.append(pred)
        seconds = time.perf_counter() - start
        for where, reason in stream.skipped:
            print(f"pneumoseg: skipped {where}: {reason}", file=sys.stderr)
        if not predictions:
            raise OutputError("no image could be read; nothing was predicted (see the messages above)")
        write_predictions(folder, predictions, stream.skipped, predictor, seconds, overlays,
                          (segs, no_segs) if args.dicom_seg else None)
    positives = sum(p.positive for p in predictions)
    skipped = f", {len(stream.skipped)} skipped" if stream.skipped else ""
    noun = "image" if len(predictions) == 1 else "images"
    print(f"predicted {len(predictions)} {noun} ({positives} with pneumothorax{skipped}) in {seconds:.1f} s "
          f"({len(predictions) / max(seconds, 1e-9):.1f} images/s) with {predictor.backend.name} "
          f"{predictor.backend.precision} on {predictor.backend.device}")
    extras = [f"{overlays} overlays in {OVERLAYS}/"] * bool(overlays) + [f"{segs} DICOM SEGs in {SEGS}/"] * bool(segs)
    print(f"wrote {folder.path / SUBMISSION}, {SCORES}, {SUMMARY}" + (f" and {' and '.join(extras)}" if extras else ""))
    return 0


def _check_utf8_image_id(source) -> None:
    """A file name that is not UTF-8 (an old Latin-1 archive) comes from the file system as surrogate
    escapes: the CSVs, written as UTF-8, failed on it with a traceback after every image was predicted."""
    from ..errors import OutputError

    try:
        source.image_id.encode("utf-8")
    except UnicodeEncodeError:
        where = ascii(str(source.path)) if source.path is not None else "an in-memory image"
        raise OutputError(f"{where}: its ImageId {ascii(source.image_id)} is not valid UTF-8 text (a file name in "
                          "another encoding), so it cannot be written to submission.csv; rename the file, or name "
                          "the images by their DICOM header with --name-by uid") from None


def write_predictions(folder, predictions, skipped, predictor, seconds: float, overlays: int,
                      segs: Optional[tuple[int, list[dict[str, str]]]] = None) -> None:
    """submission.csv (ImageId,EncodedPixels, one row per image in order), scores.csv and summary.json;
    with --dicom-seg, ``segs`` is (SEGs written, the positive images without one and why)."""
    from .. import __version__
    from ..infer.predictor import summarise_timings

    with folder.open(SUBMISSION, mode="w") as f:
        f.write("ImageId,EncodedPixels\n")
        f.writelines(f"{p.image_id},{p.rle}\n" for p in predictions)
    with folder.open(SCORES, mode="w") as f:
        f.write("ImageId,Score\n")
        # every digit (repr round-trips): 6 decimals wrote the gate's 0.49999997 as 0.500000 and tied
        # a confident classifier's 0.9999996 and 0.9999999
        f.writelines(f"{p.image_id},{float(p.score)!r}\n" for p in predictions)
    summary = {
        "pneumoseg_version": __version__,
        "images": len(predictions),
        "positives": sum(p.positive for p in predictions),
        "skipped": [{"path": where, "reason": reason} for where, reason in skipped],
        "seconds": round(seconds, 3),
        "images_per_second": round(len(predictions) / seconds, 3) if seconds > 0 else None,
        "predictor": predictor.describe(),
        "timings_ms": summarise_timings(predictions),
        "outputs": {"submission": SUBMISSION, "scores": SCORES, "overlays": OVERLAYS if overlays else None,
                    "overlay_count": overlays,
                    # only with --dicom-seg: without it summary.json is as it was
                    **({"dicom_seg": SEGS if segs[0] else None, "dicom_seg_count": segs[0], "dicom_seg_missing": segs[1]}
                       if segs is not None else {})},
        # per image without its RLE (that is in the submission) and its batch's timings (summarised above)
        "images_detail": [{k: v for k, v in p.to_dict().items() if k not in ("timings", "rle")} for p in predictions],
    }
    with folder.open(SUMMARY, mode="w") as f:
        json.dump(summary, f, indent=2, allow_nan=False)
        f.write("\n")


def write_overlay(folder, name: str, pred) -> bool:
    """overlays/<name>: the radiograph (through its own window / VOI LUT) with the mask in red; False
    when the file can no longer be read."""
    from ..data.dicom import read_dicom
    from ..errors import DicomError, PneumosegError
    from ..infer.inputs import skip_reason
    from ..infer.overlay import display_pixels, overlay

    try:
        image = read_dicom(pred.path)  # read again for display (its VOI LUT / window)
    except (PneumosegError, OSError) as exc:
        # deleted or replaced since its pixels were read (an export being cleaned up while the run went
        # on): the prediction stands, only its picture is lost
        print(f"pneumoseg: no overlay for {pred.path}: {skip_reason(exc, str(pred.path))}", file=sys.stderr)
        return False
    if tuple(image.pixels.shape) != tuple(pred.shape):
        print(f"pneumoseg: no overlay for {pred.path}: the file changed since it was predicted (now "
              f"{image.pixels.shape[0]}x{image.pixels.shape[1]} pixels)", file=sys.stderr)
        return False
    try:
        grey = display_pixels(image.window())
    except DicomError as exc:  # a broken display window must not cost the predictions: show the full range
        print(f"pneumoseg: overlay of {pred.path} drawn over the full pixel range: {exc}", file=sys.stderr)
        grey = display_pixels(image.pixels)
    folder.write_png(OVERLAYS, name, image=overlay(grey, pred.mask))
    return True


def write_segmentation(folder, name: str, pred, predictor, name_by: str = "file") -> Optional[str]:
    """seg/<name>: a DICOM Segmentation of ``pred``'s mask over its source file. None when written; else
    (also printed to stderr) why not: no source file, or it can no longer be read as the image predicted.
    With ``name_by="uid"`` the ImageId is the SOPInstanceUID the file held when listed: a file that now
    holds another is another image (perhaps another patient's), whose SEG this mask must not become."""
    from pathlib import Path

    from ..errors import PneumosegError
    from ..infer.dicom_seg import build_dicom_seg, save_dicom_seg
    from ..infer.inputs import skip_reason

    if pred.path is None:  # an in-memory image has no DICOM header to file a SEG under
        reason = "it was not read from a DICOM file"
        print(f"pneumoseg: no DICOM SEG for {pred.image_id}: {reason}", file=sys.stderr)
        return reason
    backend = predictor.backend
    try:
        seg = build_dicom_seg(pred.mask, pred.path, algorithm_parameters={
            "model": Path(predictor.model_dir.path).name, "backend": backend.name, "precision": backend.precision})
    except PneumosegError as exc:
        # deleted, replaced or resized since its pixels were read: the prediction stands, only its SEG is lost
        reason = skip_reason(exc, str(pred.path))
        print(f"pneumoseg: no DICOM SEG for {pred.path}: {reason}", file=sys.stderr)
        return reason
    referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
    if name_by == "uid" and referenced != pred.image_id:
        reason = "the file now holds another image (its SOPInstanceUID changed since it was listed)"
        print(f"pneumoseg: no DICOM SEG for {pred.path}: {reason}", file=sys.stderr)
        return reason
    with folder.open(SEGS, name) as f:
        save_dicom_seg(seg, f)
    return None
