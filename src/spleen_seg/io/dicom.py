"""DICOM CT series in: find the series in a folder and read one as a volume with its geometry.

``find_series`` and ``read_series`` are the boundary where DICOM folders enter: a
series is read only if it is a clean 3D CT volume (one orientation, one pixel grid,
evenly spaced slices), otherwise ``InputImageError`` names the series, the folder and
what is wrong. Anonymised files often lack their UIDs; missing Series/Study/SOP
Instance UIDs are derived deterministically (same files -> same UIDs) and listed in
``DicomSeries.missing_uids`` so the caller can record it.

Axis convention everywhere: arrays are (X, Y, Z) = (columns, rows, slices), slices in
increasing position along the slice normal (row direction x column direction), and
``Geometry.affine_ras`` maps (i, j, k, 1) to RAS+ millimetres (DICOM's LPS patient
coordinates with x and y negated).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, generate_uid

from spleen_seg.errors import InputImageError
from spleen_seg.io.nifti import Geometry

logger = logging.getLogger(__name__)

DICM_MAGIC = b"DICM"
PREAMBLE_BYTES = 128
FILES_TO_PROBE = 32  # is_dicom_folder looks at no more files than this
DIRECTION_TOLERANCE = 1e-4  # ImageOrientationPatient components (unit vectors)
SPACING_TOLERANCE_MM = 1e-3  # PixelSpacing
SLICE_GAP_RELATIVE_TOLERANCE = 0.01  # of the slice spacing...
SLICE_GAP_MIN_TOLERANCE_MM = 0.01  # ...but at least this
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class DicomSeries:
    """One CT series found on disk.

    ``files`` are sorted along the slice normal (increasing position). ``missing_uids``
    names the UID attributes the files lack (anonymisation), which were derived
    deterministically instead: ``series_uid`` is then a derived UID.
    """

    series_uid: str
    modality: str
    files: tuple[Path, ...]
    description: str
    missing_uids: tuple[str, ...] = ()

    @property
    def folder(self) -> Path:
        return Path(os.path.commonpath([str(f.parent) for f in self.files])) if self.files else Path()


# --- finding series -------------------------------------------------------------------


def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(PREAMBLE_BYTES)
            return handle.read(len(DICM_MAGIC)) == DICM_MAGIC
    except OSError:
        return False


def _walk_files(folder: Path):
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            yield Path(root) / name


def is_dicom_folder(path: str | Path) -> bool:
    """True if ``path`` is a folder holding a DICOM file among its first few files (any depth)."""
    path = Path(path)
    if not path.is_dir():
        return False
    for count, file in enumerate(_walk_files(path)):
        if count >= FILES_TO_PROBE:
            return False
        if _has_dicom_magic(file):
            return True
    return False


def _uid(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


def _sop_instance_uid(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    return _uid(ds, "SOPInstanceUID") or (_uid(meta, "MediaStorageSOPInstanceUID") if meta is not None else "")


def _sop_class_uid(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    return _uid(ds, "SOPClassUID") or (_uid(meta, "MediaStorageSOPClassUID") if meta is not None else "")


def _series_key(ds: Dataset, path: Path) -> tuple[str, ...]:
    series_uid = _uid(ds, "SeriesInstanceUID")
    if series_uid:
        return (series_uid,)
    # No SeriesInstanceUID (anonymised): files of one folder sharing study, frame of
    # reference, modality, series number and description are taken as one series.
    return (
        "",
        _uid(ds, "StudyInstanceUID"),
        _uid(ds, "FrameOfReferenceUID"),
        str(ds.get("Modality", "")),
        str(ds.get("SeriesNumber", "")),
        str(ds.get("SeriesDescription", "")),
        str(path.parent),
    )


def _slice_position(ds: Dataset) -> float:
    """Position along the slice normal; NaN when the geometry tags are missing."""
    try:
        orientation = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
        position = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
        return float(np.dot(np.cross(orientation[:3], orientation[3:]), position))
    except (AttributeError, TypeError, ValueError, IndexError):
        return float("nan")


def _sort_key(ds: Dataset, path: Path) -> tuple[float, int, str]:
    position = _slice_position(ds)
    instance = ds.get("InstanceNumber")
    return (position if np.isfinite(position) else np.inf, int(instance) if instance is not None else 0, str(path))


def _read_headers(folder: Path) -> tuple[dict[tuple[str, ...], list[tuple[Path, Dataset]]], list[str]]:
    groups: dict[tuple[str, ...], list[tuple[Path, Dataset]]] = {}
    messages: list[str] = []
    for path in _walk_files(folder):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=False)
        except InvalidDicomError:
            continue  # not DICOM at all: notes, thumbnails, .DS_Store
        except (OSError, EOFError, ValueError, KeyError, TypeError) as err:
            messages.append(f"skipped file {path}: unreadable DICOM ({err.__class__.__name__})")
            continue
        if "Rows" not in ds:
            continue  # DICOMDIR, structured reports, presentation states: no image
        groups.setdefault(_series_key(ds, path), []).append((path, ds))
    return groups, messages


def _not_ct_reason(ds: Dataset) -> str | None:
    modality = str(ds.get("Modality", ""))
    sop_class = _sop_class_uid(ds)
    if modality != "CT":
        return "not CT"
    if sop_class == EnhancedCTImageStorage:
        return "enhanced multi-frame CT is not supported, export the series as single-frame CT images"
    if sop_class and sop_class != CTImageStorage:
        return f"not a CT image (SOP class {sop_class}, e.g. a secondary capture)"
    return None


def _make_series(key: tuple[str, ...], members: list[tuple[Path, Dataset]]) -> tuple[DicomSeries, list[str]]:
    members = sorted(members, key=lambda member: _sort_key(member[1], member[0]))
    messages: list[str] = []
    first = members[0][1]
    missing = []
    series_uid = key[0]
    if not series_uid:
        missing.append("SeriesInstanceUID")
        series_uid = generate_uid(entropy_srcs=["SeriesInstanceUID", *key])
    if not _uid(first, "StudyInstanceUID"):
        missing.append("StudyInstanceUID")
    seen: dict[str, Path] = {}
    kept: list[Path] = []
    for path, ds in members:
        sop_uid = _sop_instance_uid(ds)
        if not sop_uid:
            if "SOPInstanceUID" not in missing:
                missing.append("SOPInstanceUID")
        elif sop_uid in seen:
            messages.append(f"ignored file {path}: same SOPInstanceUID as {seen[sop_uid]} (duplicate copy)")
            continue
        else:
            seen[sop_uid] = path
        kept.append(path)
    series = DicomSeries(
        series_uid=series_uid,
        modality=str(first.get("Modality", "")),
        files=tuple(kept),
        description=str(first.get("SeriesDescription", "")),
        missing_uids=tuple(missing),
    )
    return series, messages


def find_series(folder: str | Path) -> tuple[list[DicomSeries], list[str]]:
    """Find the CT series under ``folder`` (searched recursively, any file names).

    Returns ``(ct_series, messages)``: the CT series, each with its files sorted along
    the slice normal, and one line per thing left out (non-CT series such as MR, SEG or
    secondary captures, unreadable DICOM files, duplicate copies). Files that are not
    DICOM are ignored silently. Raises ``InputImageError`` if the folder holds no DICOM
    image at all, or no CT series.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputImageError(f"{folder}: not a folder; pass the folder holding the DICOM series")
    groups, messages = _read_headers(folder)
    if not groups:
        raise InputImageError(f"{folder}: no DICOM image files found (searched all subfolders); pass a folder of CT DICOM files")
    ct_series: list[DicomSeries] = []
    for key, members in groups.items():
        series, series_messages = _make_series(key, members)
        first = members[0][1]
        reason = _not_ct_reason(first)
        if reason is not None:
            messages.append(f"skipped series {series.series_uid} ({series.modality or 'no modality'}, "
                            f"{series.description!r}): {reason}")
            continue
        messages.extend(series_messages)
        if series.missing_uids:
            logger.warning("series %s in %s: files lack %s (anonymised?); derived UIDs are used instead",
                           series.series_uid, series.folder, ", ".join(series.missing_uids))
        ct_series.append(series)
    if not ct_series:
        raise InputImageError(f"{folder}: no CT series found ({'; '.join(messages)}); pass a folder holding a CT series")
    ct_series.sort(key=lambda s: (str(s.folder), s.description, s.series_uid))
    return ct_series, messages


# --- reading a series -----------------------------------------------------------------


def _where(series: DicomSeries) -> str:
    return f"series {series.series_uid} in {series.folder}"


def _check_same(values: list[np.ndarray], name: str, tolerance: float, series: DicomSeries) -> np.ndarray:
    reference = values[0]
    for index, value in enumerate(values):
        if value.shape != reference.shape or not np.allclose(value, reference, atol=tolerance, rtol=0):
            raise InputImageError(f"{_where(series)}: inconsistent {name} across slices ({reference.tolist()} in the "
                                  f"first slice, {value.tolist()} in slice {index}); pass a series with one image grid")
    return reference


def _check_spacing(positions: np.ndarray, series: DicomSeries) -> float:
    """Slice spacing along the normal; raises for duplicates, missing slices, uneven gaps."""
    gaps = np.diff(positions)
    spacing = float(np.median(gaps))
    tolerance = max(SLICE_GAP_MIN_TOLERANCE_MM, SLICE_GAP_RELATIVE_TOLERANCE * spacing)
    for index, gap in enumerate(gaps):
        where = f"positions {positions[index]:.2f} and {positions[index + 1]:.2f} mm"
        if gap < tolerance:
            raise InputImageError(f"{_where(series)}: duplicate slice position at {where} "
                                  f"({series.files[index].name}, {series.files[index + 1].name}); remove the duplicate files")
        if abs(gap - spacing) > tolerance:
            ratio = gap / spacing
            kind = "missing slice" if ratio > 1 and abs(ratio - round(ratio)) * spacing <= tolerance else "uneven slice spacing"
            raise InputImageError(f"{_where(series)}: {kind}: gap of {gap:.1f} mm between {where} where spacing is "
                                  f"{spacing:.1f} mm; export the complete series")
    return spacing


def _load_datasets(series: DicomSeries, stop_before_pixels: bool) -> list[Dataset]:
    if not series.files:
        raise InputImageError(f"{_where(series)}: no files")
    datasets: list[Dataset] = []
    for path in series.files:
        try:
            datasets.append(pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=False))
        except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as err:
            raise InputImageError(f"{_where(series)}: cannot read {path} ({err.__class__.__name__}: {err})") from err
    return datasets


def _series_geometry(datasets: list[Dataset], series: DicomSeries) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape (X, Y, Z) and RAS affine of a sorted series; checks everything that makes it a volume."""
    if len(datasets) < 2:
        raise InputImageError(f"{_where(series)}: a single slice is not a 3D volume; pass a series of axial slices")
    try:
        orientations = [np.asarray(ds.ImageOrientationPatient, dtype=np.float64) for ds in datasets]
        positions = [np.asarray(ds.ImagePositionPatient, dtype=np.float64) for ds in datasets]
        pixel_spacings = [np.asarray(ds.PixelSpacing, dtype=np.float64) for ds in datasets]
        grids = [np.asarray([int(ds.Rows), int(ds.Columns), int(ds.get("SamplesPerPixel", 1))]) for ds in datasets]
    except (AttributeError, TypeError, ValueError) as err:
        raise InputImageError(f"{_where(series)}: missing or malformed geometry tags (ImageOrientationPatient, "
                              f"ImagePositionPatient, PixelSpacing, Rows, Columns): {err}") from err
    orientation = _check_same(orientations, "ImageOrientationPatient", DIRECTION_TOLERANCE, series)
    pixel_spacing = _check_same(pixel_spacings, "PixelSpacing", SPACING_TOLERANCE_MM, series)
    rows, columns, samples = (int(v) for v in _check_same(grids, "Rows/Columns/SamplesPerPixel", 0, series))
    if samples != 1 or orientation.shape != (6,) or pixel_spacing.shape != (2,) or (pixel_spacing <= 0).any():
        raise InputImageError(f"{_where(series)}: not a greyscale image grid (SamplesPerPixel {samples}, "
                              f"PixelSpacing {pixel_spacing.tolist()}, ImageOrientationPatient {orientation.tolist()})")
    row_direction, column_direction = orientation[:3], orientation[3:]
    normal = np.cross(row_direction, column_direction)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise InputImageError(f"{_where(series)}: ImageOrientationPatient {orientation.tolist()} is not two orthogonal unit vectors")
    along_normal = np.array([float(np.dot(normal, p)) for p in positions])
    spacing = _check_spacing(along_normal, series)
    # The slice step is taken from the first and last positions so a gantry tilt
    # (positions not along the normal) gives the true, sheared, affine.
    step = (positions[-1] - positions[0]) / (len(positions) - 1)
    residual = np.array([np.linalg.norm(p - (positions[0] + k * step)) for k, p in enumerate(positions)])
    if residual.max() > max(SLICE_GAP_MIN_TOLERANCE_MM, SLICE_GAP_RELATIVE_TOLERANCE * spacing):
        raise InputImageError(f"{_where(series)}: slice positions do not lie on a straight line "
                              f"(off by up to {residual.max():.2f} mm); pass a single, regular series")
    affine_lps = np.eye(4)
    # DICOM PixelSpacing is (between rows, between columns): column index i moves
    # along the row direction by the column spacing, row index j along the column direction.
    affine_lps[:3, 0] = row_direction * pixel_spacing[1]
    affine_lps[:3, 1] = column_direction * pixel_spacing[0]
    affine_lps[:3, 2] = step
    affine_lps[:3, 3] = positions[0]
    return (columns, rows, len(datasets)), LPS_TO_RAS @ affine_lps


def _sorted(datasets: list[Dataset], series: DicomSeries) -> tuple[list[Dataset], DicomSeries]:
    order = sorted(range(len(datasets)), key=lambda n: _sort_key(datasets[n], series.files[n]))
    files = tuple(series.files[n] for n in order)
    return [datasets[n] for n in order], DicomSeries(series.series_uid, series.modality, files,
                                                     series.description, series.missing_uids)


def read_series(series: DicomSeries) -> tuple[np.ndarray, Geometry]:
    """Read a CT series as a volume in Hounsfield units.

    Returns ``(array, geometry)``: ``array`` is float32 of shape (X, Y, Z) =
    (columns, rows, slices), slices in increasing position along the slice normal,
    values ``stored * RescaleSlope + RescaleIntercept`` per slice.
    ``geometry.affine_ras`` maps (i=column, j=row, k=slice, 1) to RAS+ mm; for a
    standard axial series (ImageOrientationPatient 1,0,0,0,1,0) its axis codes are LPS.
    Raises ``InputImageError`` for a single slice, mixed orientations or pixel grids,
    duplicate or missing slices, uneven spacing, undecodable pixels or a constant image.
    """
    datasets, series = _sorted(_load_datasets(series, stop_before_pixels=False), series)
    shape, affine_ras = _series_geometry(datasets, series)
    array = np.empty(shape, dtype=np.float32)
    for k, (path, ds) in enumerate(zip(series.files, datasets, strict=True)):
        try:
            pixels = ds.pixel_array
        except (AttributeError, NotImplementedError, RuntimeError, ValueError) as err:
            syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
            raise InputImageError(f"{_where(series)}: cannot decode the pixels of {path} (transfer syntax {syntax}: "
                                  f"{err}); install a pydicom pixel decoder (pylibjpeg, gdcm) or decompress the files") from err
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        array[:, :, k] = pixels.T.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    if not np.isfinite(array).all():
        raise InputImageError(f"{_where(series)}: image contains NaN or infinite values")
    if array.min() == array.max():
        raise InputImageError(f"{_where(series)}: image is constant ({array.flat[0]:g} everywhere), nothing to segment")
    return array, Geometry(shape=shape, affine_ras=affine_ras)


def series_headers(series: DicomSeries) -> list[Dataset]:
    """Headers of the series in volume order, with UIDs the files lack filled in (derived, deterministic)."""
    datasets, series = _sorted(_load_datasets(series, stop_before_pixels=True), series)
    study_uid = generate_uid(entropy_srcs=["StudyInstanceUID", series.series_uid])
    for path, ds in zip(series.files, datasets, strict=True):
        ds.SOPInstanceUID = _sop_instance_uid(ds) or generate_uid(entropy_srcs=["SOPInstanceUID", series.series_uid, path.name])
        ds.SOPClassUID = _sop_class_uid(ds) or CTImageStorage
        ds.SeriesInstanceUID = series.series_uid
        ds.StudyInstanceUID = _uid(ds, "StudyInstanceUID") or study_uid
    return datasets
