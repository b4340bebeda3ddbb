"""NIfTI reading with input checks, and atomic mask writing.

``read_volume`` is the boundary where user files enter: everything a user can get
wrong about an input image is checked here and reported as one ``InputImageError``
line naming the file.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import math
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np

from spleen_seg.errors import InputImageError, ResourceError, format_bytes, library_message
from spleen_seg.io.atomic import atomic_path

NIFTI_SUFFIXES = (".nii", ".nii.gz")
MIN_VOXELS_PER_AXIS = 2
# Deflate cannot expand one compressed byte into more than 1032 (RFC 1951: a 258-byte match
# per 2 bits at best; zlib's technical notes give 1032:1 as the limit), so a .nii.gz whose
# header declares more than 1032x its size is truncated or corrupt, whatever its voxels.
DEFLATE_MAX_RATIO = 1032
# Voxels are read in slabs of about this many bytes of float32 output, so the file's raw
# dtype never exists as a second whole-volume copy and the checks need no full-size temporary.
READ_SLAB_BYTES = 32 << 20
# No body is 10 m long: a field of view beyond this along any axis is a corrupt voxel size,
# refused before the resampled grid for it is allocated.
MAX_FIELD_OF_VIEW_MM = 10_000.0
# bzip2 cannot expand one byte into more than about 1.5 million: a block holds at most
# 900,000 bytes after its first run-length pass, which turns a run of 255 equal bytes into
# 5 (45.9 MB of input), and a block takes at least about 25 bytes (magic, CRC, origin
# pointer, symbol map, two coding tables, selectors); 1 GB of zeros measured 1.39 million:1.
BZIP2_MAX_RATIO = 2_000_000
# Zstandard cannot expand one byte into more than 32768: a block makes at most 128 KiB
# and takes at least 4 bytes (a 3-byte block header and one byte, an RLE block).
ZSTD_MAX_RATIO = 32_768
# nibabel opens these by extension; what each codec can at most expand a byte into, and its name.
MAX_EXPANSION = {".gz": (DEFLATE_MAX_RATIO, "deflate"), ".bz2": (BZIP2_MAX_RATIO, "bzip2"),
                 ".zst": (ZSTD_MAX_RATIO, "zstd")}
# Header extensions (between the header and vox_offset): kilobytes in practice (a DICOM
# header, JSON sidecar); more than this is a corrupt header, refused before nibabel reads it.
HEADER_EXTENSIONS_MAX_BYTES = 64 << 20
EXTENSION_HEAD_BYTES = 8  # esize, ecode (int32 each)
EXTENSION_FLAG_BYTES = 4
MIN_EXTENSION_BYTES = 16  # nibabel stops reading extensions when less room is left
SKIP_STEP_BYTES = 1 << 20
MIN_AFFINE_DETERMINANT = 1e-9  # mm^3 per voxel: below this the affine is singular
NIBABEL_LOGGER = "nibabel.global"


@dataclass(frozen=True)
class Geometry:
    """Where the voxels lie: ``affine_ras`` maps (i, j, k, 1) to RAS+ millimetres.

    ``warnings`` are the assumptions the reader made about the header (for example a
    header without orientation read as nibabel's default); they belong in the report.
    """

    shape: tuple[int, int, int]
    affine_ras: np.ndarray
    header: nib.Nifti1Header | None = None
    warnings: tuple[str, ...] = ()

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        sx, sy, sz = np.sqrt((self.affine_ras[:3, :3] ** 2).sum(axis=0))
        return float(sx), float(sy), float(sz)

    @property
    def voxel_volume_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine_ras[:3, :3]))) / 1000.0

    @property
    def axcodes(self) -> str:
        return "".join(nib.aff2axcodes(self.affine_ras))


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def case_id(path: str | Path) -> str:
    """File name without the NIfTI extension: ``spleen_1.nii.gz`` -> ``spleen_1``."""
    name = Path(path).name
    for suffix in sorted(NIFTI_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


class _HeaderFixLog(logging.Filter):
    """Collects the header fixes nibabel logs while one thread loads a file, instead of
    letting its handler print them to stderr; other threads' records pass unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self._local = threading.local()

    @contextlib.contextmanager
    def collect(self) -> Iterator[list[str]]:
        sink: list[str] = []
        self._local.sink = sink
        try:
            yield sink
        finally:
            self._local.sink = None

    def filter(self, record: logging.LogRecord) -> bool:
        sink = getattr(self._local, "sink", None)
        if sink is None:
            return True
        sink.append(record.getMessage())
        return False


_HEADER_FIXES = _HeaderFixLog()
logging.getLogger(NIBABEL_LOGGER).addFilter(_HEADER_FIXES)
# What nibabel raises for a header or voxel block it cannot use (HeaderDataError and
# HeaderTypeError are not ValueErrors); OverflowError comes from absurd offsets and sizes.
_READ_ERRORS = (nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError,
                nib.spatialimages.HeaderTypeError, OSError, EOFError, ValueError, OverflowError, KeyError,
                zlib.error, gzip.BadGzipFile)


def _extensions_error(path: Path) -> str:
    """Why the header extensions of ``path`` must not be read, "" when they may.

    nibabel reads each extension whole, as long as its esize says, before anything
    checks it, and however little room vox_offset leaves: a 2 kB ``.nii.bz2`` declaring
    one extension of 256 MB made ``nib.load`` inflate 256 MB. Here the fixed header and
    each extension's 8-byte head are read, the contents skipped, at most
    ``HEADER_EXTENSIONS_MAX_BYTES`` in all. What this cannot parse is left to nibabel.
    """
    try:
        with nib.openers.ImageOpener(str(path)) as handle:
            first = handle.read(4)
            sizes = {int.from_bytes(first, "little"), int.from_bytes(first, "big")}
            klass = next((k for k in (nib.Nifti1Header, nib.Nifti2Header) if k.sizeof_hdr in sizes), None)
            if klass is None:
                return ""
            header = klass(first + handle.read(klass.sizeof_hdr - 4), check=False)
            flag = handle.read(EXTENSION_FLAG_BYTES)
            if len(flag) < EXTENSION_FLAG_BYTES or flag[0] == 0:
                return ""
            room = float(header["vox_offset"]) - (klass.sizeof_hdr + EXTENSION_FLAG_BYTES)
            if not room <= HEADER_EXTENSIONS_MAX_BYTES:
                return (f"the header leaves {format_bytes(room)} for header extensions before the voxels (vox_offset "
                        f"{float(header['vox_offset']):.0f}), more than any image needs "
                        f"({format_bytes(HEADER_EXTENSIONS_MAX_BYTES)}): corrupt header")
            while room >= MIN_EXTENSION_BYTES:
                head = handle.read(EXTENSION_HEAD_BYTES)
                if len(head) < EXTENSION_HEAD_BYTES:
                    return ""
                esize = int(np.frombuffer(head[:4], dtype=f"{header.endianness}i4")[0])
                if esize > room:
                    return (f"a header extension declares {format_bytes(esize)} where vox_offset leaves room for "
                            f"{format_bytes(room)}: corrupt header")
                if esize < EXTENSION_HEAD_BYTES:
                    return ""
                remaining = esize - EXTENSION_HEAD_BYTES
                while remaining > 0 and (skipped := len(handle.read(min(SKIP_STEP_BYTES, remaining)))):
                    remaining -= skipped
                room -= esize
    except _READ_ERRORS:
        return ""
    return ""


def _load(path: Path) -> tuple[nib.Nifti1Image, list[str]]:
    """The image (header parsed, voxels not read) and the header fixes nibabel applied."""
    if not path.exists():
        raise InputImageError(f"{path}: file not found")
    if not path.is_file():
        raise InputImageError(f"{path}: not a file")
    refused = _extensions_error(path)
    if refused:
        raise InputImageError(f"{path}: {refused}")
    try:
        with _HEADER_FIXES.collect() as fixes:
            # keep_file_open: the slab reads continue one gzip stream instead of re-inflating it from the start.
            image = nib.load(str(path), keep_file_open=True)
    except _READ_ERRORS as err:
        if "w2 should be positive" in str(err):
            raise InputImageError(f"{path}: the header's qform quaternion (quatern_b, quatern_c, quatern_d) is not a "
                                  "rotation (b^2 + c^2 + d^2 > 1): fix the header or set qform_code to 0") from err
        raise InputImageError(f"{path}: not a readable NIfTI image ({err.__class__.__name__}: "
                              f"{library_message(err)})") from err
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputImageError(f"{path}: not a NIfTI image (found {type(image).__name__})")
    return image, fixes


def _squeeze_to_3d(data_shape: tuple[int, ...], path: Path) -> tuple[int, int, int]:
    # Trailing axes of length 1 (a 4D file with one time point, a 5D one with one
    # component) hold a 3D volume; anything else is not a CT volume.
    if any(n < 1 for n in data_shape):
        raise InputImageError(f"{path}: the header declares invalid dimensions {tuple(data_shape)} (dim[1..])")
    shape = data_shape[:3] if len(data_shape) > 3 and all(n == 1 for n in data_shape[3:]) else data_shape
    if len(shape) != 3:
        raise InputImageError(f"{path}: expected a 3D volume, got {len(data_shape)}D shape {tuple(data_shape)}")
    if min(shape) < MIN_VOXELS_PER_AXIS:
        raise InputImageError(f"{path}: expected a 3D volume, got a 2D image of shape {tuple(shape)}")
    return (int(shape[0]), int(shape[1]), int(shape[2]))


def _check_declared_size(path: Path, image: nib.Nifti1Image) -> None:
    """Refuse a header that declares more voxel bytes than the file can hold, before any allocation."""
    try:
        dtype = image.get_data_dtype()
        # The proxy's offset is the file's; the image's header copy has its offset reset to 0.
        offset = int(cast(nib.arrayproxy.ArrayProxy, image.dataobj).offset)
    except _READ_ERRORS as err:
        raise InputImageError(f"{path}: unusable header ({err.__class__.__name__}: {library_message(err)})") from err
    voxel_bytes = math.prod(int(n) for n in image.shape) * dtype.itemsize
    size = path.stat().st_size
    declared = f"{'x'.join(str(n) for n in image.shape)} {dtype.name} voxels ({format_bytes(voxel_bytes)})"
    compression = path.suffix.lower()
    if compression in MAX_EXPANSION:
        ratio, codec = MAX_EXPANSION[compression]
        if offset + voxel_bytes > ratio * size:
            raise InputImageError(f"{path}: the header declares {declared} but the compressed file holds "
                                  f"{format_bytes(size)}, which {codec} cannot expand beyond "
                                  f"{format_bytes(ratio * size)}: truncated file or corrupt header")
    elif offset + voxel_bytes > size:
        raise InputImageError(f"{path}: the header declares {declared} at offset {offset} but the file holds "
                              f"{format_bytes(size)}: truncated file or corrupt header")


def _raw_header(path: Path, image: nib.Nifti1Image) -> nib.Nifti1Header:
    """The header as stored, before nibabel's fixes (it sets zero pixdim to 1, negative to abs)."""
    try:
        with nib.openers.ImageOpener(str(path)) as handle:
            return type(image.header).from_fileobj(handle, check=False)
    except _READ_ERRORS as err:
        raise InputImageError(f"{path}: unusable header ({err.__class__.__name__}: {library_message(err)})") from err


def _orientation(path: Path, image: nib.Nifti1Image, fixes: list[str]) -> tuple[np.ndarray, nib.Nifti1Header, list[str]]:
    """The voxel-to-RAS affine the header defines, the header to copy into outputs, and warnings.

    The affine is nibabel's ``get_best_affine`` (sform, else qform, else pixdim scaling),
    as MONAI reads it, but each assumption nibabel makes silently is an error or a warning.
    """
    header = image.header.copy()
    raw_pixdim = np.asarray(_raw_header(path, image)["pixdim"][1:4], dtype=np.float64)
    pixdim_text = ", ".join(f"{v:g}" for v in raw_pixdim)
    warnings = [f"header fixed on reading (as nibabel and MONAI read it): {fix}" for fix in fixes]
    sform_code, qform_code = int(header["sform_code"]), int(header["qform_code"])
    if sform_code > 0:
        affine, source = header.get_sform(), f"sform (sform_code {sform_code})"
        if qform_code > 0:
            try:
                header.get_qform()
            except (ValueError, nib.spatialimages.HeaderDataError):
                warnings.append("the qform is not a valid rotation and was ignored: the sform defines the geometry "
                                "(the mask's header gets a qform equal to the sform)")
                header.set_qform(affine, code=qform_code)
    elif qform_code > 0:
        affine, source = header.get_qform(), f"qform (qform_code {qform_code})"
        if not (np.isfinite(raw_pixdim).all() and (raw_pixdim != 0).all()):
            raise InputImageError(f"{path}: the qform's voxel size pixdim[1..3] = ({pixdim_text}) is zero or not "
                                  "finite: fix pixdim or store the geometry in the sform")
    else:
        if not (np.isfinite(raw_pixdim).all() and (raw_pixdim > 0).all()):
            raise InputImageError(f"{path}: the header has no orientation (qform_code = sform_code = 0) and its "
                                  f"voxel size pixdim[1..3] = ({pixdim_text}) is not positive: the voxels cannot be "
                                  "placed; fix the header (set the sform or qform)")
        affine, source = header.get_best_affine(), "pixdim"
        warnings.append(f"header without orientation (qform_code = sform_code = 0): assumed nibabel's default, as "
                        f"MONAI reads it: LAS voxel axes of {pixdim_text} mm centred on the volume; left-right and "
                        "position may be wrong")
    return _checked_affine(path, np.asarray(affine, dtype=np.float64), source, image.shape[:3]), header, warnings


def _checked_affine(path: Path, affine: np.ndarray, source: str, shape: tuple[int, ...]) -> np.ndarray:
    """Refuse an affine the pipeline cannot use: not finite, singular, without axis order, absurd size."""
    if not np.isfinite(affine).all():
        raise InputImageError(f"{path}: the header's {source} holds NaN or infinite values: fix srow_x/y/z "
                              "(or the quaternion), or set its code to 0")
    if abs(np.linalg.det(affine[:3, :3])) < MIN_AFFINE_DETERMINANT:
        raise InputImageError(f"{path}: the header's {source} is singular (a voxel of no volume): fix the header")
    ornt = nib.orientations.io_orientation(affine)
    if np.isnan(ornt).any():
        raise InputImageError(f"{path}: the header's {source} has no clear axis orientation: fix the header")
    field_mm = np.sqrt((affine[:3, :3] ** 2).sum(axis=0)) * np.asarray(shape, dtype=np.float64)
    if field_mm.max() > MAX_FIELD_OF_VIEW_MM:
        raise InputImageError(f"{path}: the header's {source} gives a field of view of "
                              f"{' x '.join(f'{v:.0f}' for v in field_mm)} mm, larger than any body "
                              f"({MAX_FIELD_OF_VIEW_MM:.0f} mm): the voxel size is corrupt")
    return affine


def read_geometry(path: str | Path) -> Geometry:
    """The checked geometry of a NIfTI file from its header alone (no voxel is read).

    Raises ``InputImageError`` for everything ``read_volume`` refuses before reading
    voxels: unreadable header, not 3D, declared size the file cannot hold, unusable affine.
    """
    path = Path(path)
    image, fixes = _load(path)
    return _geometry(path, image, fixes)


def _geometry(path: Path, image: nib.Nifti1Image, fixes: list[str]) -> Geometry:
    shape = _squeeze_to_3d(tuple(image.shape), path)
    _check_declared_size(path, image)
    affine, header, warnings = _orientation(path, image, fixes)
    return Geometry(shape=shape, affine_ras=affine, header=header, warnings=tuple(warnings))


def read_volume(path: str | Path, *, max_bytes: int | None = None) -> tuple[np.ndarray, Geometry]:
    """Read a 3D CT volume.

    Returns ``(array, geometry)``: ``array`` is float32 of shape (X, Y, Z) in the
    file's voxel order (not reoriented, Fortran-ordered as stored), values in Hounsfield
    units after the header's scaling; ``geometry.affine_ras`` is the file's best affine
    (sform, else qform, else pixdim scaling with a warning in ``geometry.warnings``).
    Raises ``InputImageError`` for a missing or unreadable file, a non-3D image, a header
    declaring more voxels than the file holds, an unusable affine, NaN/inf values or an
    all-constant image; ``ResourceError`` when the float32 volume needs more than
    ``max_bytes`` (or more memory than the machine can give). Nothing the size of the
    volume is allocated before the header passed its checks.
    """
    path = Path(path)
    image, fixes = _load(path)
    geometry = _geometry(path, image, fixes)
    needed = math.prod(geometry.shape) * np.dtype(np.float32).itemsize
    if max_bytes is not None and needed > max_bytes:
        raise ResourceError(f"{path}: reading needs ~{format_bytes(needed)} ({'x'.join(map(str, geometry.shape))} "
                            f"voxels as float32), {format_bytes(max_bytes)} free")
    try:
        array = np.empty(geometry.shape, dtype=np.float32, order="F")
    except MemoryError as err:
        raise ResourceError(f"{path}: reading needs ~{format_bytes(needed)} ({'x'.join(map(str, geometry.shape))} "
                            "voxels as float32), more than this machine can allocate") from err
    low, high = _read_slabs(path, image, array)
    _check_gzip_end(path, image)
    if low == high:
        raise InputImageError(f"{path}: image is constant ({low:g} everywhere), nothing to segment")
    return array, geometry


def _check_gzip_end(path: Path, image: nib.Nifti1Image) -> None:
    """Read a ``.nii.gz`` stream to its end, where gzip checks the CRC-32 and length of what it inflated.

    Why: nibabel stops at the last voxel byte, before the gzip trailer, so damaged
    compressed data that still inflates (flipped bits) was segmented without a word.
    The stream the slabs were read from is continued (nibabel's opener, kept open by
    ``keep_file_open``), so the check costs the few bytes left; when that opener is not
    there (another nibabel), the file is inflated once more.
    """
    fileobj = getattr(getattr(image.dataobj, "_opener", None), "fobj", None)
    try:
        if isinstance(fileobj, gzip.GzipFile):
            while fileobj.read(READ_SLAB_BYTES):
                pass
        elif path.name.lower().endswith(".gz"):
            with gzip.open(path) as stream:
                while stream.read(READ_SLAB_BYTES):
                    pass
    except _READ_ERRORS as err:
        raise InputImageError(f"{path}: damaged gzip data ({err.__class__.__name__}: {library_message(err)}); "
                              "the voxels cannot be trusted, copy or export the file again") from err


def _read_slabs(path: Path, image: nib.Nifti1Image, out: np.ndarray) -> tuple[float, float]:
    """Fill ``out`` (X, Y, Z) float32 with the scaled voxels, a slab of z at a time; return (min, max).

    ``image.dataobj[slab]`` scales exactly as ``np.asarray(image.dataobj, dtype=np.float32)``
    (same slope/intercept dtypes), then the assignment casts to float32.
    """
    step = max(1, READ_SLAB_BYTES // (out.shape[0] * out.shape[1] * out.itemsize))
    trailing = (0,) * (len(image.shape) - 3)
    low, high = math.inf, -math.inf
    for z0 in range(0, out.shape[2], step):
        target = out[:, :, z0 : z0 + step]
        try:
            target[...] = image.dataobj[(slice(None), slice(None), slice(z0, z0 + step), *trailing)]
        except _READ_ERRORS as err:
            raise InputImageError(f"{path}: truncated or corrupt voxel data ({err.__class__.__name__})") from err
        if not np.isfinite(target).all():
            raise InputImageError(f"{path}: image contains NaN or infinite values")
        low, high = min(low, float(target.min())), max(high, float(target.max()))
    return low, high


def write_mask(mask: np.ndarray, geometry: Geometry, dest: str | Path) -> Path:
    """Write a uint8 mask with exactly the geometry (shape, affine, codes) of its source."""
    return write_volume(np.asarray(mask, dtype=np.uint8), geometry, dest)


def write_volume(array: np.ndarray, geometry: Geometry, dest: str | Path) -> Path:
    """Write ``array`` (X, Y, Z) in its own dtype (uint8 mask, int16 or float32 HU), unscaled, with exactly
    ``geometry``'s shape, affine and header codes, atomically."""
    if tuple(array.shape) != geometry.shape:
        raise ValueError(f"array shape {array.shape} differs from the image shape {geometry.shape}")
    header = geometry.header.copy() if geometry.header is not None else None
    image = nib.Nifti1Image(array, geometry.affine_ras, header=header)
    image.set_data_dtype(array.dtype)
    image.header.set_slope_inter(1.0, 0.0)
    if header is None:
        image.set_sform(geometry.affine_ras, code=1)
        image.set_qform(geometry.affine_ras, code=1)
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        nib.save(image, str(tmp))
    return dest
