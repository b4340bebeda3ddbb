"""DICOM files, one at a time: recognise, read, decode, place along the slice normal.

The layer under ``io.dicom`` (finding volumes) and ``io.dicom_volume`` (reading them).
``read_dataset`` reads a file with or without its 128-byte preamble, but forces pydicom
only on a file whose first bytes look like a DICOM data set, so that other files are never
read as DICOM; it decodes every element up front, so a damaged file fails there, with one
of ``DICOM_READ_ERRORS``, and not later, anywhere. ``slice_hu`` decodes pixels through the
decoder plugin named per transfer syntax (``DECODER_BY_SYNTAX``), so the result does not
depend on which other decoders happen to be installed.

**Deflated data sets are inflated only as far as they are read** (``read_deflated``).
pydicom 3 inflates a Deflated Explicit VR Little Endian data set whole before it parses
a byte of it (``zlib.decompress`` in ``filereader.read_partial``; ``stop_before_pixels``
and ``defer_size`` act only afterwards), and the header it returns keeps the inflated
buffer: a 128 KiB file of 8192 x 8192 zero pixels cost 128 MiB per header read, held
for as long as the header. Here the stream is inflated on demand under pydicom's own
parser: a header costs what precedes its PixelData (at most
``DEFLATED_HEADER_MAX_BYTES``), and the pixels are inflated only up to what the header
declares (Rows x Columns x frames x samples x bits), once that passed the caller's bound.
Refusing Deflated files above a ratio of declared to compressed size instead would not
do: that bomb is within what deflate can really expand (1024:1 of at most 1032:1,
``DEFLATE_MAX_RATIO``), a lower ratio refuses real files, and the ratio needs the
header, which pydicom inflates everything to read. The ratio is still checked: a header
that declares more than its deflated bytes can hold is refused as corrupt.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.filereader import read_dataset as read_encoded_dataset
from pydicom.filereader import read_preamble
from pydicom.pixels import get_decoder
from pydicom.pixels.utils import get_expected_length
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from spleen_seg.errors import InputImageError, format_bytes, library_message
from spleen_seg.io.nifti import DEFLATE_MAX_RATIO

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
# truncated element, an undecodable string; zlib's for damaged deflated data (InflateError,
# a ValueError, for one that inflates beyond its bound). ``read_dataset`` meets them up front.
DICOM_READ_ERRORS = (InvalidDicomError, BytesLengthException, OSError, EOFError, ValueError, KeyError, TypeError,
                     IndexError, AttributeError, NotImplementedError, OverflowError, struct.error, zlib.error)
# A Deflated data set's elements before its pixel data: real CT headers, private groups
# included, take kilobytes (an enhanced CT's per-frame groups a few megabytes).
DEFLATED_HEADER_MAX_BYTES = 16 << 20
# ...and after them (DataSetTrailingPadding, a digital signature): the pixel data's element
# header and this much beyond what the header declares may be inflated, nothing more.
DEFLATED_TRAILER_MAX_BYTES = 1 << 20
PIXEL_ELEMENT_HEADER_BYTES = 12  # tag, VR, reserved, 4-byte length (explicit VR OB/OW)
INFLATE_STEP_BYTES = 64 << 10  # compressed bytes read, and inflated bytes made, per step
PIXEL_DATA_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # Float, Double Float, PixelData


class InflateError(ValueError):
    """A deflated data set that inflates beyond its bound, declares more than it can hold, or is cut short."""


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


# --- deflated data sets ----------------------------------------------------------------------


class _InflatingReader:
    """The inflated bytes of a raw deflate stream as a seekable, read-only file for pydicom's parser.

    Inflates only as far as it is read, and never beyond ``max_bytes``
    (``InflateError``); keeps what it inflated, since pydicom seeks back a few bytes
    (to the start of the element that stopped it, within undefined-length values).
    """

    def __init__(self, compressed: BinaryIO, max_bytes: int, name: str):
        self.name = name  # pydicom names the stream in its messages
        self._compressed = compressed
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._data = bytearray()
        self._position = 0
        self._max_bytes = max_bytes

    def set_limit(self, max_bytes: int) -> None:
        """Let the stream inflate up to ``max_bytes`` from now on (once its header declared how much it holds)."""
        self._max_bytes = max_bytes

    def _inflate_step(self, inflated: int) -> bytes:
        """The next inflated bytes (at most ``INFLATE_STEP_BYTES``), ``inflated`` bytes having been made so far."""
        pending = self._inflater.unconsumed_tail or self._compressed.read(INFLATE_STEP_BYTES)
        if not pending:
            raise InflateError(f"the deflated data set is cut short after {format_bytes(inflated)} (truncated file)")
        chunk = self._inflater.decompress(pending, min(self._max_bytes + 1 - inflated, INFLATE_STEP_BYTES))
        if inflated + len(chunk) > self._max_bytes:
            raise InflateError(f"the deflated data set inflates beyond {format_bytes(self._max_bytes)}, "
                               "more than its header declares")
        return chunk

    def _inflate_to(self, end: int) -> None:
        while len(self._data) < end and not self._inflater.eof:
            self._data += self._inflate_step(len(self._data))

    def drain(self) -> None:
        """Inflate the rest of the stream within the limit, counting the bytes and dropping them."""
        inflated = len(self._data)
        while not self._inflater.eof:
            inflated += len(self._inflate_step(inflated))

    def read(self, size: int | None = -1) -> bytes:
        end = self._max_bytes + 1 if size is None or size < 0 else self._position + size
        self._inflate_to(end)
        with memoryview(self._data) as view:  # one copy, not a bytearray slice and then bytes of it
            chunk = bytes(view[self._position : end])
        self._position += len(chunk)
        return chunk

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position}.get(whence)
        if base is None:  # the end is where inflating stops: never asked for, so not offered
            raise OSError(f"{self.name}: a deflated data set cannot be sought from its end")
        self._position = max(base + offset, 0)
        return self._position

    def tell(self) -> int:
        return self._position


def _at_pixel_data(tag: BaseTag, vr: str | None, length: int) -> bool:
    return int(tag) in PIXEL_DATA_TAGS


def declared_pixel_bytes(ds: Dataset) -> int:
    """Bytes of pixel data the header declares (Rows x Columns x frames x samples x bits); 0 without an image."""
    try:
        return max(int(get_expected_length(ds, unit="bytes")), 0)
    except (AttributeError, KeyError, TypeError, ValueError):
        return 0


def _parse(reader: _InflatingReader, *, stop_before_pixels: bool) -> Dataset:
    """The data set ``reader`` inflates, from its first byte (what was inflated before is kept, not made again)."""
    reader.seek(0)
    return read_encoded_dataset(reader, is_implicit_VR=False, is_little_endian=True,  # type: ignore[arg-type]
                                stop_when=_at_pixel_data if stop_before_pixels else None)


def _read_header(stream: BinaryIO, name: str) -> tuple[_InflatingReader, Dataset]:
    """The reader of the deflated data set in ``stream`` from its position, and its header (no pixel data)."""
    reader = _InflatingReader(stream, DEFLATED_HEADER_MAX_BYTES, name)
    return reader, _parse(reader, stop_before_pixels=True)


def _allow_declared(reader: _InflatingReader, header: Dataset, compressed_bytes: int,
                    max_pixel_bytes: int | None) -> None:
    """Let ``reader`` inflate what ``header`` declares (and its trailer), once checked.

    Raises ``InflateError`` when the header declares more pixel data than
    ``max_pixel_bytes`` or than its compressed bytes can hold.
    """
    header_bytes = reader.tell()  # the parser stopped at the pixel data's element
    declared = declared_pixel_bytes(header)
    described = (f"the header declares {header.get('Rows', '?')} x {header.get('Columns', '?')} pixels x "
                 f"{header.get('NumberOfFrames', 1) or 1} frames of {header.get('BitsAllocated', '?')} bits "
                 f"({format_bytes(declared)} of pixel data)")
    if max_pixel_bytes is not None and declared > max_pixel_bytes:
        raise InflateError(f"{described}, more than the {format_bytes(max_pixel_bytes)} allowed")
    if header_bytes + declared > DEFLATE_MAX_RATIO * compressed_bytes:
        raise InflateError(f"{described} in {format_bytes(compressed_bytes)}, which deflate cannot expand beyond "
                           f"{format_bytes(DEFLATE_MAX_RATIO * compressed_bytes)}: truncated or corrupt")
    reader.set_limit(header_bytes + PIXEL_ELEMENT_HEADER_BYTES + declared + DEFLATED_TRAILER_MAX_BYTES)


def _compressed_bytes(stream: BinaryIO) -> int:
    """Bytes from the stream's position to its end; the position is kept."""
    start = stream.tell()
    end = stream.seek(0, os.SEEK_END)
    stream.seek(start)
    return end - start


def read_deflated(stream: BinaryIO, name: str, *, stop_before_pixels: bool, max_pixel_bytes: int | None = None) -> Dataset:
    """The Deflated Explicit VR Little Endian data set that ``stream`` holds from its position, inflated no further than needed.

    The header (what precedes the pixel data) is read first, inflating at most
    ``DEFLATED_HEADER_MAX_BYTES``. With ``stop_before_pixels`` that is all. Otherwise
    the pixel data the header declares is checked against ``max_pixel_bytes`` (when
    given) and against what the compressed bytes can hold (``DEFLATE_MAX_RATIO``), and
    only then inflated, up to the declared size plus ``DEFLATED_TRAILER_MAX_BYTES``; the
    header is inflated once. ``name`` names the stream in pydicom's messages (ours leave
    naming it to the caller). Raises ``InflateError`` (a ValueError) for a stream beyond
    a bound, declaring more than it can hold, or cut short.
    """
    compressed_bytes = _compressed_bytes(stream)
    reader, header = _read_header(stream, name)
    if stop_before_pixels:
        return header
    _allow_declared(reader, header, compressed_bytes, max_pixel_bytes)
    return _parse(reader, stop_before_pixels=False)


def check_deflated(stream: BinaryIO, name: str, *, max_pixel_bytes: int) -> Dataset:
    """The header of the deflated data set in ``stream``, once the whole stream inflated within its bounds.

    As ``read_deflated`` without ``stop_before_pixels``, but what is inflated beyond the
    header is counted and dropped, ``INFLATE_STEP_BYTES`` at a time: whatever the data set
    holds, checking it costs the header's memory. Raises ``InflateError``.
    """
    compressed_bytes = _compressed_bytes(stream)
    reader, header = _read_header(stream, name)
    _allow_declared(reader, header, compressed_bytes, max_pixel_bytes)
    reader.drain()
    return header


def _file_meta(handle: BinaryIO) -> FileMetaDataset:
    """The file meta group (0002) at the handle's position; the handle is left after it."""
    return FileMetaDataset(read_encoded_dataset(handle, is_implicit_VR=False, is_little_endian=True,
                                                stop_when=lambda tag, vr, length: tag >> 16 != 2))


def _read_deflated_file(path: Path, *, stop_before_pixels: bool, force: bool) -> FileDataset | None:
    """``path`` read through ``read_deflated`` if its file meta names the Deflated syntax, else None."""
    with open(path, "rb") as handle:
        try:
            preamble = read_preamble(handle, force)
            file_meta = _file_meta(handle)
        except DICOM_READ_ERRORS:
            return None  # pydicom's own reader says what is wrong with it
        if file_meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            return None
        dataset = read_deflated(handle, str(path), stop_before_pixels=stop_before_pixels)
    ds = FileDataset(str(path), dataset, preamble=preamble, file_meta=file_meta, is_implicit_VR=False,
                     is_little_endian=True)
    ds.set_original_encoding(False, True, dataset.original_character_set)
    return ds


def read_dataset(path: Path, *, stop_before_pixels: bool) -> Dataset:
    """Read one DICOM file (with or without preamble), every element decoded now.

    Raises ``InvalidDicomError`` for a file that is not DICOM, one of
    ``DICOM_READ_ERRORS`` for a damaged one: pydicom decodes elements when first
    used, so a damaged element would otherwise fail later, anywhere. A data set
    written without file meta gets the TransferSyntaxUID pydicom detected its encoding
    as, so that its pixels can be decoded. A Deflated one is inflated no further than
    it is read (``read_deflated``): its header costs what precedes the pixel data.
    """
    kind = dicom_kind(path)
    if not kind:
        raise InvalidDicomError(f"{path}: not a DICOM file")
    ds = (_read_deflated_file(path, stop_before_pixels=stop_before_pixels, force=kind == "headless")
          or pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=kind == "headless"))
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
