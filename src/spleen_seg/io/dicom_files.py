"""DICOM files, one at a time: recognise, read, decode, place along the slice normal.

The layer under ``io.dicom`` (finding volumes) and ``io.dicom_volume`` (reading them).
``read_dataset`` reads a file with or without its 128-byte preamble, but forces pydicom
only on a file whose first bytes look like a DICOM data set, so that other files are never
read as DICOM; it decodes every element up front, so a damaged file fails there, with one
of ``DICOM_READ_ERRORS``, and not later, anywhere. ``slice_hu`` decodes pixels through the
decoder plugin named per transfer syntax (``DECODER_BY_SYNTAX``), so the result does not
depend on which other decoders happen to be installed.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from spleen_seg.errors import InputImageError, library_message

DICM_MAGIC = b"DICM"
PREAMBLE_BYTES = 128
# A file without preamble is read only if it starts with an element of the file meta
# (group 0002) or of the identifying group 0008, so that other files are never forced.
HEADLESS_FIRST_GROUPS = (0x0002, 0x0008)
HEADLESS_MAX_FIRST_ELEMENT = 0x0100
EXPLICIT_VRS = frozenset(b"AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN "
                         b"UR US UT UV".split())
DIRECTION_TOLERANCE = 1e-4  # ImageOrientationPatient components (unit vectors)
SLICE_GAP_RELATIVE_TOLERANCE = 0.01  # of the slice spacing...
SLICE_GAP_MIN_TOLERANCE_MM = 0.01  # ...but at least this
# Which of pydicom's decoder plugins decodes a syntax: pylibjpeg (its libjpeg and openjpeg
# plugins) wherever it applies, except RLE, which pydicom's own decoder reads: pylibjpeg-rle
# panics on damaged data (a Rust panic surfaces as a BaseException no error handler catches)
# where pydicom's raises ValueError.
PREFERRED_DECODER = "pylibjpeg"
DECODER_BY_SYNTAX = {RLELossless: "pydicom"}
# What pydicom raises for a damaged file: an unknown VR, a value of the wrong length, a
# truncated element, an undecodable string. ``read_dataset`` meets them all up front.
DICOM_READ_ERRORS = (InvalidDicomError, BytesLengthException, OSError, EOFError, ValueError, KeyError, TypeError,
                     IndexError, AttributeError, NotImplementedError, OverflowError, struct.error)


def _looks_headless(head: bytes) -> bool:
    """True if ``head`` starts like a DICOM data set written without preamble."""
    if len(head) < 8:
        return False
    group, element = struct.unpack("<HH", head[:4])
    if group not in HEADLESS_FIRST_GROUPS or element >= HEADLESS_MAX_FIRST_ELEMENT:
        return False
    if head[4:6] in EXPLICIT_VRS:
        return True
    # Implicit VR: a 4-byte length follows the tag; a first element is short.
    (length,) = struct.unpack("<I", head[4:8])
    return length < 0x10000


def dicom_kind(path: Path) -> str:
    """"part10" (preamble and DICM), "headless" (a data set without preamble) or "" (not DICOM)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(PREAMBLE_BYTES + len(DICM_MAGIC))
    except OSError:
        return ""
    if head[PREAMBLE_BYTES:] == DICM_MAGIC:
        return "part10"
    return "headless" if _looks_headless(head) else ""


def read_dataset(path: Path, *, stop_before_pixels: bool) -> Dataset:
    """Read one DICOM file (with or without preamble), every element decoded now.

    Raises ``InvalidDicomError`` for a file that is not DICOM, one of
    ``DICOM_READ_ERRORS`` for a damaged one: pydicom decodes elements when first
    used, so a damaged element would otherwise fail later, anywhere. A data set
    written without file meta gets the TransferSyntaxUID pydicom detected its encoding
    as, so that its pixels can be decoded.
    """
    kind = dicom_kind(path)
    if not kind:
        raise InvalidDicomError(f"{path}: not a DICOM file")
    ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=kind == "headless")
    ds.file_meta.walk(lambda dataset, element: None)
    ds.walk(lambda dataset, element: None)
    if not ds.file_meta.get("TransferSyntaxUID"):
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                          ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return ds


def uid_value(ds: Dataset, keyword: str) -> str:
    """A UID attribute as a stripped string, "" when absent or empty."""
    return str(ds.get(keyword, "") or "").strip()


def sop_instance_uid(ds: Dataset) -> str:
    return uid_value(ds, "SOPInstanceUID") or uid_value(ds.file_meta, "MediaStorageSOPInstanceUID")


def sop_class_uid(ds: Dataset) -> str:
    return uid_value(ds, "SOPClassUID") or uid_value(ds.file_meta, "MediaStorageSOPClassUID")


def decoding_plugin(ds: Dataset) -> str:
    """The pixel decoder plugin for ``ds`` (see ``DECODER_BY_SYNTAX``); "" lets pydicom choose."""
    syntax = ds.file_meta.TransferSyntaxUID
    try:
        available = get_decoder(syntax).available_plugins
    except NotImplementedError:
        return ""
    plugin = DECODER_BY_SYNTAX.get(syntax, PREFERRED_DECODER)
    return plugin if plugin in available else ""


def slice_hu(ds: Dataset, path: Path, where: str) -> np.ndarray:
    """(rows, columns) float32 Hounsfield units of a single-frame image: stored * slope + intercept."""
    try:
        ds.pixel_array_options(decoding_plugin=decoding_plugin(ds))
        pixels = ds.pixel_array
    except (AttributeError, NotImplementedError, RuntimeError, ValueError, KeyError, TypeError) as err:
        syntax = str(ds.file_meta.get("TransferSyntaxUID") or "unknown")
        name = UID(syntax).name if syntax != "unknown" else syntax
        raise InputImageError(f"{where}: cannot decode the pixels of {path} (transfer syntax {syntax}, {name}: {library_message(err)}); "
                              f"install the pydicom pixel decoders (pylibjpeg with its libjpeg, openjpeg and rle "
                              f"plugins) or decompress the files") from err
    if pixels.ndim != 2:
        raise InputImageError(f"{where}: {path} holds an image of shape {pixels.shape}, expected one greyscale slice")
    try:
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    except (TypeError, ValueError) as err:
        raise InputImageError(f"{where}: malformed RescaleSlope or RescaleIntercept in {path} ({library_message(err)})") from err
    return pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)


# --- positions ---------------------------------------------------------------------------


def slice_normal(ds: Dataset) -> np.ndarray | None:
    """Unit normal (row direction x column direction) of a single-frame image; None without the tag."""
    try:
        orientation = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
        return np.cross(orientation[:3], orientation[3:]) if orientation.shape == (6,) else None
    except (AttributeError, TypeError, ValueError):
        return None


def slice_position(ds: Dataset) -> float:
    """Position along the slice normal; NaN when the geometry tags are missing."""
    normal = slice_normal(ds)
    try:
        position = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
        return float(np.dot(normal, position)) if normal is not None and position.shape == (3,) else float("nan")
    except (AttributeError, TypeError, ValueError):
        return float("nan")


def sort_key(ds: Dataset, path: Path) -> tuple[float, int, str]:
    position = slice_position(ds)
    try:
        instance = int(ds.get("InstanceNumber") or 0)
    except (TypeError, ValueError):
        instance = 0
    return (position if np.isfinite(position) else np.inf, instance, str(path))


def gap_tolerance_mm(spacing_mm: float) -> float:
    """How far two slice gaps may differ (and how close two positions are the same position)."""
    return max(SLICE_GAP_MIN_TOLERANCE_MM, SLICE_GAP_RELATIVE_TOLERANCE * abs(spacing_mm))
