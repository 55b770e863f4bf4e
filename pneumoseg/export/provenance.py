"""What an exported ONNX part was exported from, written into the graph and checked before it runs.

``pneumoseg.json`` fingerprints each artefact file, but a fingerprint only says that the file is the
one listed, not that it is this directory's network: another model's ``segmenter.onnx`` copied in,
with its fingerprint edited to match, would run a different network than the folder's weights and
config describe, and answer wrongly without a word. So every ONNX part pneumoseg writes (fp32, fp16,
both int8 flavours) carries in its ``metadata_props``:

==============================  ===================================================================
``pneumoseg.provenance``        the format of these entries (:data:`PROVENANCE_FORMAT`)
``pneumoseg.version``           the pneumoseg that exported it (not checked)
``pneumoseg.network``           the network it was cut from ("segmenter", "classifier")
``pneumoseg.part``              the part (:mod:`pneumoseg.export.parts`)
``pneumoseg.precision``         "fp32", "fp16", "int8" or "int8-symmetric"
``pneumoseg.weights_sha256``    the SHA-256 of the network's weights file, as ``pneumoseg.json`` lists it
``pneumoseg.config``            the network's construction arguments, canonical JSON
==============================  ===================================================================

and the artefact's entry in ``pneumoseg.json`` repeats them under ``meta.source`` (the config as its
SHA-256). The onnxruntime and TensorRT backends compare them with the directory's own description
before they run or build anything, and refuse a part exported from anything else with
:class:`StaleArtefactError` (a :class:`pneumoseg.DataFormatError`) naming the file, the network, what
differs and the command that exports it again.

Parts exported before this record existed (no ``pneumoseg.provenance`` in the file and no
``meta.source`` in ``pneumoseg.json``) still load, as their fingerprint vouches for them, with one
INFO log line saying how to get them checked; a part whose ``pneumoseg.json`` entry has a source
record but whose file has none was replaced after export, and is refused.

Reading the entries does not parse the graph: :func:`read_onnx_metadata` walks the file's top-level
protobuf fields and skips the graph (and its weights) by its length, so TensorRT's parser remains the
only one to load it (and the ``tensorrt`` extra needs no ``onnx``); the onnxruntime backend reads them
from the session it opens anyway (``get_modelmeta().custom_metadata_map``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

from .. import __version__
from ..errors import DataFormatError

__all__ = ["PROVENANCE_FORMAT", "StaleArtefactError", "source_metadata", "source_summary", "record_source",
           "read_onnx_metadata", "check_source", "verified_onnx_artefact", "reexport_command"]

logger = logging.getLogger(__name__)

#: the format of the ``pneumoseg.*`` entries this pneumoseg writes and reads
PROVENANCE_FORMAT = 1
_PREFIX = "pneumoseg."
_FORMAT_KEY = _PREFIX + "provenance"
_CHECKED = ("network", "part", "precision", "weights_sha256", "config")

# ModelProto.metadata_props and StringStringEntryProto's key / value (onnx.proto)
_METADATA_FIELD = 14
_ENTRY_KEY, _ENTRY_VALUE = 1, 2


class StaleArtefactError(DataFormatError):
    """An exported artefact was made from another network (other weights or construction arguments)
    than the one the model directory describes, or lost its record of what it was made from."""


def _canonical_config(config: Mapping[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=True)


def source_metadata(model_dir: Any, part: str, precision: str) -> dict[str, str]:
    """The ``pneumoseg.*`` metadata entries of ``part`` exported at ``precision`` from ``model_dir``."""
    from .parts import part_spec

    network = part_spec(part).network
    entry = model_dir.networks[network]
    return {_FORMAT_KEY: str(PROVENANCE_FORMAT), _PREFIX + "version": __version__, _PREFIX + "network": network,
            _PREFIX + "part": part, _PREFIX + "precision": precision, _PREFIX + "weights_sha256": entry.sha256,
            _PREFIX + "config": _canonical_config(entry.config)}


def source_summary(metadata: Mapping[str, str]) -> dict[str, Any]:
    """The ``meta.source`` record of an artefact in ``pneumoseg.json`` (the config as its SHA-256)."""
    return {"provenance": int(metadata[_FORMAT_KEY]),
            **{k: metadata[_PREFIX + k] for k in ("network", "part", "precision", "weights_sha256")},
            "config_sha256": hashlib.sha256(metadata[_PREFIX + "config"].encode("ascii")).hexdigest()}


def record_source(model: Any, model_dir: Any, part: str, precision: str) -> dict[str, Any]:
    """Write the source entries into an ONNX ``ModelProto`` (replacing any ``pneumoseg.*`` entries it
    has, e.g. those of the fp32 graph an int8 one was quantised from); returns :func:`source_summary`."""
    metadata = source_metadata(model_dir, part, precision)
    kept = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith(_PREFIX)]
    del model.metadata_props[:]
    for key, value in [*kept, *metadata.items()]:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return source_summary(metadata)


# -------------------------------------------------------------------------------------------------
# reading the entries without parsing the graph

def _varint(read: Any, where: str) -> int:
    value = shift = 0
    while True:
        byte = read(1)
        if not byte:
            raise DataFormatError(f"{where}: not an ONNX model (the file ends inside a field header)")
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7
        if shift > 63:
            raise DataFormatError(f"{where}: not an ONNX model (a field header is malformed)")


def _fields(stream: Any, size: int, where: str, wanted: int) -> list[bytes]:
    """The bytes of the length-delimited fields numbered ``wanted`` at the top level of
    the protobuf message in ``stream`` (``size`` bytes from its current position); every other field
    is skipped by seeking over it, never read."""
    start = stream.tell()
    end = start + size
    out = []
    while stream.tell() < end:
        tag = _varint(stream.read, where)
        field, wire = tag >> 3, tag & 7
        if field == 0:
            raise DataFormatError(f"{where}: not an ONNX model (field number 0)")
        if wire == 0:
            _varint(stream.read, where)
        elif wire in (1, 5):
            stream.seek(8 if wire == 1 else 4, io.SEEK_CUR)
        elif wire == 2:
            length = _varint(stream.read, where)
            if stream.tell() + length > end:
                raise DataFormatError(f"{where}: not an ONNX model (a field runs past the end of the file; truncated?)")
            if field == wanted:
                out.append(stream.read(length))
            else:
                stream.seek(length, io.SEEK_CUR)
        else:  # groups (3, 4) are not used by onnx.proto; 6 and 7 do not exist
            raise DataFormatError(f"{where}: not an ONNX model (protobuf wire type {wire})")
    if stream.tell() != end:
        raise DataFormatError(f"{where}: not an ONNX model (a field runs past the end of the file; truncated?)")
    return out


def read_onnx_metadata(path: Path) -> dict[str, str]:
    """An ONNX file's ``metadata_props`` as a dict, read without parsing the graph (a few hundred
    bytes read whatever the model's size; see the module documentation). A file that is not a
    well-formed protobuf message: :class:`pneumoseg.DataFormatError` naming it."""
    where = str(path)
    out: dict[str, str] = {}
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for data in _fields(f, size, where, _METADATA_FIELD):
            entry = io.BytesIO(data)
            key = value = ""
            for number in (_ENTRY_KEY, _ENTRY_VALUE):
                entry.seek(0)
                found = _fields(entry, len(data), where, number)
                text = found[-1] if found else b""
                try:
                    decoded = text.decode("utf-8")
                except UnicodeDecodeError:
                    raise DataFormatError(f"{where}: not an ONNX model (a metadata entry is not UTF-8)") from None
                if number == _ENTRY_KEY:
                    key = decoded
                else:
                    value = decoded
            out[key] = value
    return out


# -------------------------------------------------------------------------------------------------
# the check

def reexport_command(model_dir: Any, precision: str, format: str = "onnx") -> str:
    """The ``pneumoseg export`` command that writes the artefact of ``precision`` again."""
    if precision == "int8-symmetric":  # only the TensorRT export makes the symmetric graphs
        format, precision = "tensorrt", "int8"
    flags = {"fp32": "", "fp16": " --precision fp16", "int8": " --precision int8 --calibrate IMAGES"}.get(precision, "")
    if format == "tensorrt" and precision == "fp32":
        flags = " --precision fp32"
    return f"pneumoseg export {model_dir.path} --format {format}{flags}"


def _short(value: str) -> str:
    return value[:12] + "..." if len(value) > 15 else value


def _config_difference(recorded: str, expected: str) -> str:
    try:
        got, want = json.loads(recorded), json.loads(expected)
    except (ValueError, RecursionError):
        return "its construction arguments are unreadable"
    if not isinstance(got, dict) or not isinstance(want, dict):
        return "its construction arguments differ"
    keys = sorted(k for k in set(got) | set(want) if got.get(k, "<absent>") != want.get(k, "<absent>"))
    shown = ", ".join(f"{k}={json.dumps(got.get(k))} in the file, {json.dumps(want.get(k))} in the folder" for k in keys[:3])
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    return f"other construction arguments ({shown}{more})"


def check_source(model_dir: Any, key: str, part: str, path: Path, metadata: Mapping[str, str], *,
                 command_format: str = "onnx") -> None:
    """Refuse (:class:`StaleArtefactError`) the ONNX file of artefact ``key`` when ``metadata`` (its
    ``metadata_props``) says it was exported from another network, part or precision than
    ``model_dir`` describes; a file from before the record existed passes with an INFO log line (see
    the module documentation). ``command_format`` picks the export command the message suggests."""
    from ..models.model_dir import CONFIG_NAME

    art = model_dir.artefacts[key]
    network = art.network
    command = reexport_command(model_dir, art.precision, command_format)
    if _FORMAT_KEY not in metadata:
        if isinstance(art.meta.get("source"), dict):
            raise StaleArtefactError(
                f"{path}: the {network} {part} graph has no record of the network it was exported from, but "
                f"{CONFIG_NAME} says it was written with one: the file was replaced after export, and may be "
                f"another model's; export it again: `{command}`")
        logger.info("%s: exported by a pneumoseg without a record of its source network; it is used as %s lists "
                    "it (its fingerprint matches). Export it again to have it checked: `%s`", path, CONFIG_NAME, command)
        return
    version = metadata[_FORMAT_KEY]
    # isascii too: str.isdigit() also takes '²' and other digits int() rejects (a bare ValueError)
    if not (version.isascii() and version.isdigit()) or int(version) < 1:
        raise StaleArtefactError(f"{path}: its source record {_FORMAT_KEY}={version!r} is malformed; export it again: `{command}`")
    if int(version) > PROVENANCE_FORMAT:
        raise StaleArtefactError(f"{path}: exported by pneumoseg {metadata.get(_PREFIX + 'version', '?')} with a newer "
                                 f"source record (format {version}; this pneumoseg {__version__} reads "
                                 f"{PROVENANCE_FORMAT}): upgrade pneumoseg, or export it again: `{command}`")
    expected = source_metadata(model_dir, part, art.precision)
    differences = []
    for name in _CHECKED:
        got, want = metadata.get(_PREFIX + name), expected[_PREFIX + name]
        if got == want:
            continue
        if got is None:
            differences.append(f"no {name} in its record")
        elif name == "weights_sha256":
            weights = model_dir.networks[network].weights
            differences.append(f"weights with SHA-256 {_short(got)}, not those of {weights} ({_short(want)})")
        elif name == "config":
            differences.append(_config_difference(got, want))
        else:
            differences.append(f"{name} {got!r}, not {want!r}")
    if differences:
        raise StaleArtefactError(
            f"{path}: this ONNX file was exported from another network than the {network} {CONFIG_NAME} describes "
            f"({'; '.join(differences)}); it would run that network instead of this folder's. Export it again: "
            f"`{command}`")


def verified_onnx_artefact(model_dir: Any, key: str, part: str, *, command_format: str = "onnx") -> Path:
    """The file of ONNX artefact ``key``, its fingerprint checked (``ModelDir.artefact_path``) and its
    source record (:func:`check_source`, read with :func:`read_onnx_metadata`): for paths that hand the
    file to something other than onnxruntime (TensorRT's parser, the quantiser)."""
    path = model_dir.artefact_path(key)
    check_source(model_dir, key, part, path, read_onnx_metadata(path), command_format=command_format)
    return path
