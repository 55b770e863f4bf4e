"""``pneumoseg predict``: a submission, overlays and a summary for DICOM files and folders."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from typing import Optional

from .types import add_backend_options, add_no_progress, int_in, path, probability

SUBMISSION = "submission.csv"
SCORES = "scores.csv"
SUMMARY = "summary.json"
OVERLAYS = "overlays"
SEGS = "seg"
DICOM_OVERLAYS = "dicom-overlay"
# why the DICOM outputs are opt-in (--help of each)
_IDENTITY = ("its source's patient and study identity (name, ID and its issuer, birth date, sex, study date and time, "
             "study ID, accession number, referring physician), which is what files it into the study; the CSV, "
             "JSON and PNG outputs copy none of it. Needs highdicom: pip install 'pneumoseg[pacs]'")
# why a positive image gets no picture, SEG or DICOM overlay when its file now holds another image
_ANOTHER_IMAGE = "the file changed since it was predicted: it now holds another image (its SOPInstanceUID changed)"


_PROBABILITY_THRESHOLDS = ("gate", "top", "bottom")
_AREA_THRESHOLDS = ("min_area", "min_component_area")


def threshold_overrides(text: str) -> dict:
    """``KEY=VALUE[,KEY=VALUE...]`` over the model's thresholds for one run: gate, top (or ``none``, no
    triplet rule), bottom (probabilities in [0, 1]), min_area, min_component_area (pixels at the
    segmenter's input size, integers >= 0)."""
    out: dict = {}
    for part in text.split(","):
        key, sep, value = (x.strip() for x in part.partition("="))
        if not sep or key not in _PROBABILITY_THRESHOLDS + _AREA_THRESHOLDS:
            raise argparse.ArgumentTypeError(
                f"must be KEY=VALUE pairs separated by commas, KEY among {', '.join(_PROBABILITY_THRESHOLDS + _AREA_THRESHOLDS)}; "
                f"got {part.strip()!r}")
        if key in out:
            raise argparse.ArgumentTypeError(f"{key} is given twice")
        if key == "top" and value.lower() == "none":
            out[key] = None
        elif key in _PROBABILITY_THRESHOLDS:
            try:
                out[key] = probability(value)
            except argparse.ArgumentTypeError as exc:
                raise argparse.ArgumentTypeError(f"{key}: {exc}") from None
        else:
            try:
                out[key] = int_in(0, name=key)(value)
            except argparse.ArgumentTypeError as exc:
                raise argparse.ArgumentTypeError(f"{key}: {exc}") from None
    return out


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "predict", help="two-stage inference on DICOM files or folders: submission.csv, overlays, summary.json",
        description="Predict every DICOM given (files, folders searched recursively, the Kaggle test layout, PACS "
                    "exports: files with or without the .dcm suffix; a DICOMDIR is skipped). "
                    "Writes submission.csv (ImageId,EncodedPixels; -1 when empty; one row per image), scores.csv, "
                    "a PNG overlay per positive image (and, with --dicom-seg, a DICOM Segmentation; with "
                    "--dicom-overlay, a DICOM Secondary Capture overlay) and "
                    "summary.json. Unreadable or non-DICOM files are reported and skipped.")
    p.add_argument("inputs", nargs="+", type=path, metavar="INPUT", help="DICOM files or folders")
    p.add_argument("--model", type=path, required=True, help="model directory (from `pneumoseg train`)")
    p.add_argument("--out", type=path, required=True, help="output folder (new, or pneumoseg's own earlier output)")
    add_backend_options(p, batch_size_help="images per network call (default 8)")
    p.add_argument("--tta", action="store_true", help="average with the horizontally flipped image")
    p.add_argument("--segment", choices=("gated", "all"), default="gated",
                   help="segment only the images the gate passes (default) or all (same answers)")
    p.add_argument("--name-by", choices=("file", "uid"), default="file",
                   help="each image's ImageId: file, its file name without .dcm (default; the Kaggle layout, where "
                        "the file name is the SOPInstanceUID), or uid, the SOPInstanceUID in its DICOM header (PACS "
                        "exports and DICOM media, whose files are IM0001 ... in every series folder)")
    p.add_argument("--workers", type=int_in(1, 64), default=2, help="threads reading DICOMs (default 2)")
    p.add_argument("--gate", type=probability, default=None, metavar="T",
                   help="this run's gate threshold in [0, 1] instead of the model's (e.g. one `pneumoseg tune` "
                        "chose); recorded in summary.json")
    # appended: a second --thresholds adds its keys (argparse's default kept only the last one's)
    p.add_argument("--thresholds", type=threshold_overrides, action="append", default=None, metavar="KEY=VALUE[,...]",
                   help="this run's post-processing thresholds instead of the model's: top (or none), bottom, "
                        "min_area, min_component_area (and gate); recorded in summary.json")
    p.add_argument("--no-overlays", action="store_true", help="do not write the overlay pictures")
    p.add_argument("--dicom-seg", action="store_true",
                   help=f"also write {SEGS}/<ImageId>.dcm, a DICOM Segmentation of each positive image that a PACS files "
                        f"beside its source and a viewer draws over it. Opt-in because each SEG copies {_IDENTITY}")
    p.add_argument("--dicom-overlay", action="store_true",
                   help=f"also write {DICOM_OVERLAYS}/<ImageId>.dcm, a DICOM Secondary Capture of each positive image: "
                        "the PNG overlay's picture (the mask outlined in red) captioned with the score and NOT FOR "
                        "DIAGNOSTIC USE, in a new series of the source's study, for PACS viewers that do not draw "
                        "SEGs. Opt-in because each copies " + _IDENTITY)
    p.add_argument("--force", action="store_true",
                   help="replace an existing submission.csv / write into a folder holding other files")
    add_no_progress(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from .._fs import OutputKind, check_output_folder, prepare_output_folder, safe_file_names
    from ..data.siim import check_csv_image_ids
    from ..errors import InvalidInputError, OutputError
    from ..infer import Predictor

    if args.dicom_seg or args.dicom_overlay:  # a missing highdicom is refused before the model loads
        from ..infer._dicom_derived import require_highdicom

        require_highdicom("DICOM Segmentation output" if args.dicom_seg else "DICOM overlay output")
    # Refused before any work: an existing submission is never replaced without --force (even one
    # pneumoseg wrote: a submission is the thing people hand in).
    overrides: dict = {}
    for given in args.thresholds or ():
        twice = sorted(set(given) & set(overrides))
        if twice:
            raise InvalidInputError(f"--thresholds: {', '.join(twice)} is given twice")
        overrides.update(given)
    if args.gate is not None:
        if "gate" in overrides and overrides["gate"] != args.gate:
            raise InvalidInputError(f"--gate {args.gate:g} and --thresholds gate={overrides['gate']:g} disagree; give one")
        overrides["gate"] = args.gate
    inputs = (*args.inputs, args.model)
    check_output_folder(args.out, overwrite=args.force, what=OutputKind.PREDICTION, inputs=inputs,
                        never_replace=(SUBMISSION,))
    predictor = Predictor.from_dir(args.model, backend=args.backend, device=args.device, precision=args.precision,
                                   tta=args.tta, segment=args.segment, batch_size=args.batch_size,
                                   thresholds=overrides or None)
    if "gate" in overrides and predictor.parts["gate"] is None:
        # silently ignored, it would read as a gate that lets every image through
        given = "--gate" if args.gate is not None else "--thresholds gate"
        raise InvalidInputError(f"{given}: {args.model} has no gate (no classifier, and its segmenter has no classification "
                         "head): every image is segmented")
    pictures = args.dicom_overlay or not args.no_overlays  # each positive's file is read again for display
    stream = predictor.predict_iter([str(p) for p in args.inputs], return_masks=args.dicom_seg or pictures,
                                    on_error="skip", progress=not args.no_progress, workers=args.workers,
                                    name_by=args.name_by)
    # Every ImageId is checked before anything is written: it is a row of the CSVs and names an overlay.
    for source in stream.sources:
        _check_utf8_image_id(source)  # first: its message says what to do in this command
        check_csv_image_ids([source.image_id], what=f"{source.path}: its ImageId")
    names = safe_file_names([s.image_id for s in stream.sources], ".png")
    dicom = args.dicom_seg or args.dicom_overlay
    dcm_names = safe_file_names([s.image_id for s in stream.sources], ".dcm") if dicom else {}
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
        dicom_overlays = 0
        no_dicom_overlays: list[dict[str, str]] = []
        # closed however the loop ends (a failed write, Ctrl-C): the reader threads stop and the progress
        # bar ends its line before the one-line message, instead of whenever the stream is collected
        with contextlib.closing(stream):
            for pred in stream:
                image = read_for_display(pred) if pred.positive and pictures else None  # once for both pictures
                if pred.positive and not args.no_overlays:
                    overlays += write_overlay(folder, names[pred.image_id], pred, image)
                if pred.positive and args.dicom_seg:
                    reason = write_segmentation(folder, dcm_names[pred.image_id], pred, predictor)
                    segs += reason is None
                    if reason is not None:
                        no_segs.append({"image_id": pred.image_id, "reason": reason})
                if pred.positive and args.dicom_overlay:
                    reason = write_dicom_overlay(folder, dcm_names[pred.image_id], pred, image)
                    dicom_overlays += reason is None
                    if reason is not None:
                        no_dicom_overlays.append({"image_id": pred.image_id, "reason": reason})
                pred.mask = image = None  # memory stays bounded: the mask is in its overlays, its SEG and its RLE
                predictions.append(pred)
        seconds = time.perf_counter() - start
        for where, reason in stream.skipped:
            print(f"pneumoseg: skipped {where}: {reason}", file=sys.stderr)
        if not predictions:
            raise OutputError("no image could be read; nothing was predicted (see the messages above)")
        write_predictions(folder, predictions, stream.skipped, predictor, seconds, overlays,
                          (segs, no_segs) if args.dicom_seg else None,
                          (dicom_overlays, no_dicom_overlays) if args.dicom_overlay else None,
                          overrides=overrides or None)
    positives = sum(p.positive for p in predictions)
    skipped = f", {len(stream.skipped)} skipped" if stream.skipped else ""
    noun = "image" if len(predictions) == 1 else "images"
    print(f"predicted {len(predictions)} {noun} ({positives} with pneumothorax{skipped}) in {seconds:.1f} s "
          f"({len(predictions) / max(seconds, 1e-9):.1f} images/s) with {predictor.backend.name} "
          f"{predictor.backend.precision} on {predictor.backend.device}")
    extras = ([f"{overlays} overlays in {OVERLAYS}/"] * bool(overlays) + [f"{segs} DICOM SEGs in {SEGS}/"] * bool(segs)
              + [f"{dicom_overlays} DICOM overlays in {DICOM_OVERLAYS}/"] * bool(dicom_overlays))
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
                      segs: Optional[tuple[int, list[dict[str, str]]]] = None,
                      dicom_overlays: Optional[tuple[int, list[dict[str, str]]]] = None,
                      overrides: Optional[dict] = None) -> None:
    """submission.csv (ImageId,EncodedPixels, one row per image in order), scores.csv and summary.json;
    with --dicom-seg, ``segs`` is (SEGs written, the positive images without one and why), with
    --dicom-overlay ``dicom_overlays`` the same for the Secondary Capture overlays; ``overrides`` are
    the thresholds --gate / --thresholds set for the run, recorded with the model's own."""
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
        "predictor": predictor.describe(),  # its thresholds are the ones the run used
        # only with --gate / --thresholds: without them summary.json is as it was
        **({"threshold_overrides": {key: {"value": value, "model": getattr(predictor.model_dir.thresholds, key)}
                                    for key, value in overrides.items()}} if overrides else {}),
        "timings_ms": summarise_timings(predictions),
        "outputs": {"submission": SUBMISSION, "scores": SCORES, "overlays": OVERLAYS if overlays else None,
                    "overlay_count": overlays,
                    # only with --dicom-seg / --dicom-overlay: without them summary.json is as it was
                    **_counted("dicom_seg", SEGS, segs), **_counted("dicom_overlay", DICOM_OVERLAYS, dicom_overlays)},
        # per image without its RLE (that is in the submission) and its batch's timings (summarised above)
        "images_detail": [{k: v for k, v in p.to_dict().items() if k not in ("timings", "rle")} for p in predictions],
    }
    with folder.open(SUMMARY, mode="w") as f:
        json.dump(summary, f, indent=2, allow_nan=False)
        f.write("\n")


def _counted(key: str, subfolder: str, written: Optional[tuple[int, list[dict[str, str]]]]) -> dict:
    """summary.json's keys for an opt-in output: its folder (None when empty), count and the positive
    images without one and why; none without the option."""
    if written is None:
        return {}
    return {key: subfolder if written[0] else None, f"{key}_count": written[0], f"{key}_missing": written[1]}


def read_for_display(pred):
    """``pred``'s file read again for display (its VOI LUT / window) as a DicomImage, or why it cannot be:
    deleted or replaced since its pixels were read (an export being cleaned up while the run went on)."""
    from ..data.dicom import read_dicom
    from ..errors import PneumosegError
    from ..infer.inputs import skip_reason

    if pred.path is None:
        return "it was not read from a DICOM file"
    try:
        image = read_dicom(pred.path)
    except (PneumosegError, OSError) as exc:
        return skip_reason(exc, str(pred.path))
    # identity before size: a file replaced by another image (perhaps another patient's) is that, whatever its size
    if pred.source_uid is not None and image.sop_instance_uid != pred.source_uid:
        return _ANOTHER_IMAGE
    if tuple(image.pixels.shape) != tuple(pred.shape):
        return f"the file changed since it was predicted (now {image.pixels.shape[0]}x{image.pixels.shape[1]} pixels)"
    return image


def write_overlay(folder, name: str, pred, image=None) -> bool:
    """overlays/<name>: the radiograph (through its own window / VOI LUT) with the mask in red; False
    when the file can no longer be read. ``image`` is what :func:`read_for_display` gave, if called."""
    from ..infer.overlay import display_grey, overlay

    image = read_for_display(pred) if image is None else image
    if isinstance(image, str):  # the prediction stands, only its picture is lost
        print(f"pneumoseg: no overlay for {pred.path}: {image}", file=sys.stderr)
        return False
    grey, problem = display_grey(image)
    if problem is not None:  # a broken display window must not cost the predictions: shown over the full range
        print(f"pneumoseg: overlay of {pred.path} drawn over the full pixel range: {problem}", file=sys.stderr)
    folder.write_png(OVERLAYS, name, image=overlay(grey, pred.mask))
    return True


def write_segmentation(folder, name: str, pred, predictor) -> Optional[str]:
    """seg/<name>: a DICOM Segmentation of ``pred``'s mask over its source file. None when written; else
    (also printed to stderr) why not: no source file, or it can no longer be read as the image predicted.
    A file that now holds another SOPInstanceUID than it did when its pixels were read (``pred.source_uid``)
    is another image (perhaps another patient's), whose SEG this mask must not become."""
    from pathlib import Path

    from ..infer.dicom_seg import build_dicom_seg, save_dicom_seg

    backend = predictor.backend
    return _write_derived(folder, SEGS, name, pred, "DICOM SEG", lambda: build_dicom_seg(
        pred.mask, pred.path, expect_sop_instance_uid=pred.source_uid, algorithm_parameters={
            "model": Path(predictor.model_dir.path).name, "backend": backend.name, "precision": backend.precision}),
        save_dicom_seg)


def write_dicom_overlay(folder, name: str, pred, image=None) -> Optional[str]:
    """dicom-overlay/<name>: a DICOM Secondary Capture of ``pred``'s mask burned into its source, captioned
    with its score. None when written; else (also printed to stderr) why not, as :func:`write_segmentation`.
    ``image`` is what :func:`read_for_display` gave, if called."""
    from ..infer.dicom_overlay import build_dicom_overlay, save_dicom_overlay

    image = read_for_display(pred) if image is None else image
    return _write_derived(folder, DICOM_OVERLAYS, name, pred, "DICOM overlay",
                          lambda: build_dicom_overlay(pred.mask, image, score=float(pred.score),
                                                      expect_sop_instance_uid=pred.source_uid), save_dicom_overlay,
                          unreadable=image if isinstance(image, str) else None)


def _write_derived(folder, subfolder: str, name: str, pred, what: str, build, save,
                   unreadable: Optional[str] = None) -> Optional[str]:
    """``subfolder``/<name>: the DICOM ``build()`` makes of ``pred`` over its source file, written with
    ``save``. None when written; else (also printed to stderr) why not: ``unreadable`` (the source could
    not be read again), no source file, or it can no longer be read as the image predicted (another
    size, or another SOPInstanceUID than ``pred.source_uid``)."""
    from ..errors import PneumosegError
    from ..errors import AnotherImageError
    from ..infer.inputs import skip_reason

    def missing(reason: str) -> str:
        print(f"pneumoseg: no {what} for {pred.path if pred.path is not None else pred.image_id}: {reason}",
              file=sys.stderr)
        return reason

    if pred.path is None:  # an in-memory image has no DICOM header to file it under
        return missing("it was not read from a DICOM file")
    if unreadable is not None:
        return missing(unreadable)
    if pred.source_uid is None:  # nothing to tell the image predicted from another now in its file
        return missing("its header had no SOPInstanceUID when its pixels were read")
    try:
        # The file read again must still hold the image predicted: one that now holds another (perhaps
        # another patient's, of any size) would have this mask filed under it. pred.source_uid is what
        # the header held when the pixels were read, in either naming (with --name-by uid the Predictor
        # has already refused pixels whose UID is not the ImageId listed, so it is that ImageId); the
        # builders check it before the size, so a replaced file is called that whatever its size.
        ds = build()
    except AnotherImageError:
        return missing(_ANOTHER_IMAGE)
    except PneumosegError as exc:
        # deleted or resized since its pixels were read: the prediction stands, only this file is lost
        return missing(skip_reason(exc, str(pred.path)))
    with folder.open(subfolder, name) as f:
        save(ds, f)
    return None
