"""Serving predictions where the images are: :class:`DicomNode`, a DICOM node (pynetdicom, the ``pacs``
extra) that a PACS sends chest radiographs to and that sends DICOM Segmentations back. A layer above
:mod:`pneumoseg.infer`; nothing in the package below imports it."""

from .node import CHEST_XRAY_STORAGE, RESULTS, DicomNode, parse_forward, require_pynetdicom

__all__ = ["DicomNode", "CHEST_XRAY_STORAGE", "RESULTS", "parse_forward", "require_pynetdicom"]
