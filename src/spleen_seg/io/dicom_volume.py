"""Read one CT volume that ``io.dicom.find_series`` found: the array and its geometry.

A volume is read only if it is a clean 3D CT volume (one orientation, one pixel grid,
evenly spaced slices on a straight line), otherwise ``InputImageError`` names the
series, the folder and what is wrong. Irregular spacing (a missing slice, uneven gaps)
is refused, a gantry tilt gives a sheared affine: see ``io.dicom`` for why.

Axis convention everywhere: arrays are (X, Y, Z) = (columns, rows, slices), slices in
increasing position along the slice normal (row direction x column direction), and
``Geometry.affine_ras`` maps (i, j, k, 1) to RAS+ millimetres (DICOM's LPS patient
coordinates with x and y negated).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, generate_uid

from spleen_seg.errors import InputImageError, ResourceError, format_bytes, library_message
from spleen_seg.io.dicom import DicomSeries
from spleen_seg.io.dicom_files import (
    DICOM_READ_ERRORS,
    DIRECTION_TOLERANCE,
    SLICE_GAP_MIN_TOLERANCE_MM,
    gap_tolerance_mm,
    read_dataset,
    slice_hu,
    sop_class_uid,
    sop_instance_uid,
    sort_key,
    uid_value,
)
from spleen_seg.io.nifti import Geometry

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
SPACING_TOLERANCE_MM = 1e-3  # PixelSpacing
# A multi-frame volume's frame positions must land on its grid this closely (in voxels).
FRAME_ON_GRID_TOLERANCE = 0.01
# What highdicom raises for a multi-frame file it cannot make a volume of.
HIGHDICOM_ERRORS = (ValueError, RuntimeError, KeyError, AttributeError, TypeError, IndexError, NotImplementedError)


def _where(series: DicomSeries) -> str:
    return series.label


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
    tolerance = gap_tolerance_mm(spacing)
    for index, gap in enumerate(gaps):
        where = f"positions {positions[index]:.2f} and {positions[index + 1]:.2f} mm"
        if gap < tolerance:
            raise InputImageError(f"{_where(series)}: duplicate slice position at {where} "
                                  f"({series.files[index].name}, {series.files[index + 1].name}); remove the duplicate files")
        if abs(gap - spacing) > tolerance:
            ratio = gap / spacing
            kind = "missing slice" if ratio > 1 and abs(ratio - round(ratio)) * spacing <= tolerance else "uneven slice spacing"
            raise InputImageError(f"{_where(series)}: {kind}: gap of {gap:.1f} mm between {where} where spacing is "
                                  f"{spacing:.1f} mm (irregular spacing is refused, not resampled); export the complete series")
    return spacing


def _read_file(path: Path, series: DicomSeries, *, stop_before_pixels: bool) -> Dataset:
    try:
        return read_dataset(path, stop_before_pixels=stop_before_pixels)
    except DICOM_READ_ERRORS as err:
        raise InputImageError(f"{_where(series)}: cannot read {path} ({err.__class__.__name__}: {library_message(err)})") from err


def _load_datasets(series: DicomSeries, stop_before_pixels: bool) -> list[Dataset]:
    if series.error:
        raise InputImageError(series.error)
    if not series.files:
        raise InputImageError(f"{_where(series)}: no files")
    return [_read_file(path, series, stop_before_pixels=stop_before_pixels) for path in series.files]


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
                              f"ImagePositionPatient, PixelSpacing, Rows, Columns): {library_message(err)}") from err
    malformed = [path.name for path, p in zip(series.files, positions, strict=True) if p.shape != (3,)]
    if malformed:
        raise InputImageError(f"{_where(series)}: ImagePositionPatient is not three numbers in {', '.join(malformed)}")
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
    if residual.max() > gap_tolerance_mm(spacing):
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
    order = sorted(range(len(datasets)), key=lambda n: sort_key(datasets[n], series.files[n]))
    return [datasets[n] for n in order], replace(series, files=tuple(series.files[n] for n in order))


def _check_volume(array: np.ndarray, series: DicomSeries) -> None:
    if not np.isfinite(array).all():
        raise InputImageError(f"{_where(series)}: image contains NaN or infinite values")
    if array.min() == array.max():
        raise InputImageError(f"{_where(series)}: image is constant ({array.flat[0]:g} everywhere), nothing to segment")


def _allocate(shape: tuple[int, int, int], series: DicomSeries) -> np.ndarray:
    try:
        return np.empty(shape, dtype=np.float32)
    except MemoryError as err:
        raise ResourceError(f"{_where(series)}: reading needs ~{format_bytes(np.dtype(np.float32).itemsize * math.prod(shape))} "
                            f"({'x'.join(map(str, shape))} voxels as float32), more than this machine can allocate") from err


def read_series(series: DicomSeries, *, check_geometry: Callable[[Geometry], object] | None = None
                ) -> tuple[np.ndarray, Geometry]:
    """Read a CT volume in Hounsfield units.

    Returns ``(array, geometry)``: ``array`` is float32 of shape (X, Y, Z) =
    (columns, rows, slices), slices in increasing position along the slice normal,
    values ``stored * RescaleSlope + RescaleIntercept`` per slice.
    ``geometry.affine_ras`` maps (i=column, j=row, k=slice, 1) to RAS+ mm; for a
    standard axial series (ImageOrientationPatient 1,0,0,0,1,0) its axis codes are LPS.
    The headers are read first (a Deflated file's only as far as its pixel data) and
    ``check_geometry``, when given, is called with the geometry they declare before the
    volume is allocated or any pixel decoded (the caller's memory bound raises there);
    then the files are decoded one at a time into the volume.
    Raises ``InputImageError`` for the error ``find_series`` recorded, a single slice,
    mixed orientations or pixel grids, duplicate or missing slices, uneven spacing,
    undecodable pixels or a constant image; ``ResourceError`` when the volume cannot be
    allocated.
    """
    if series.multiframe:
        return _read_multiframe(series, check_geometry)
    headers, series = _sorted(_load_datasets(series, stop_before_pixels=True), series)
    shape, affine_ras = _series_geometry(headers, series)
    geometry = Geometry(shape=shape, affine_ras=affine_ras)
    if check_geometry is not None:
        check_geometry(geometry)
    del headers
    array = _allocate(shape, series)
    for k, path in enumerate(series.files):
        pixels = slice_hu(_read_file(path, series, stop_before_pixels=False), path, _where(series))
        if pixels.shape != (shape[1], shape[0]):
            raise InputImageError(f"{_where(series)}: {path} decodes to {pixels.shape} pixels, its header says "
                                  f"{(shape[1], shape[0])} (rows, columns)")
        array[:, :, k] = pixels.T
    _check_volume(array, series)
    return array, geometry


# --- multi-frame (enhanced) CT ---------------------------------------------------------


def _functional_item(ds: Dataset, frame_item: Dataset, keyword: str) -> Dataset:
    """The first item of a functional group sequence, per-frame first, else shared."""
    sequence = frame_item.get(keyword)
    if not sequence:
        shared = ds.get("SharedFunctionalGroupsSequence")
        sequence = shared[0].get(keyword) if shared else None
    if not sequence:
        raise KeyError(f"{keyword} missing from the per-frame and shared functional groups")
    return sequence[0]


def multiframe_slice_index(ds: Dataset) -> list[int]:
    """For each frame of a multi-frame CT, its slice index k in the volume ``read_series`` returns.

    Slices are ordered by increasing position along the frames' normal; raises
    ``KeyError`` or ``ValueError`` when the frames carry no geometry or share positions.
    """
    frames = ds.PerFrameFunctionalGroupsSequence
    positions = []
    for item in frames:
        orientation = np.asarray(_functional_item(ds, item, "PlaneOrientationSequence").ImageOrientationPatient, float)
        position = np.asarray(_functional_item(ds, item, "PlanePositionSequence").ImagePositionPatient, float)
        positions.append(float(np.dot(np.cross(orientation[:3], orientation[3:]), position)))
    order = np.argsort(positions, kind="stable")
    if (np.diff(np.asarray(positions)[order]) < SLICE_GAP_MIN_TOLERANCE_MM).any():
        raise ValueError("several frames share one position (a 4D or multi-acquisition object)")
    index = np.empty(len(positions), dtype=int)
    index[order] = np.arange(len(positions))
    return index.tolist()


def _lps_affine(volume_affine: np.ndarray, depth: int) -> tuple[np.ndarray, bool]:
    """highdicom's (slices, rows, columns) affine to LPS as ours: (columns, rows, slices), slices in
    increasing position along row x column direction; and whether the slices must be reversed for it."""
    affine_lps = np.eye(4)
    affine_lps[:3, 0], affine_lps[:3, 1], affine_lps[:3, 2] = volume_affine[:3, 2], volume_affine[:3, 1], volume_affine[:3, 0]
    affine_lps[:3, 3] = volume_affine[:3, 3]
    reverse = bool(np.dot(np.cross(affine_lps[:3, 0], affine_lps[:3, 1]), affine_lps[:3, 2]) < 0)
    if reverse:
        affine_lps[:3, 3] += affine_lps[:3, 2] * (depth - 1)
        affine_lps[:3, 2] *= -1
    return affine_lps, reverse


def _not_one_volume(series: DicomSeries, path: Path, why: str) -> InputImageError:
    return InputImageError(f"{_where(series)}: cannot read the multi-frame CT {path} as one volume ({why}); "
                           "export the series as single-frame CT images")


def _multiframe_geometry(header: Dataset, series: DicomSeries) -> Geometry:
    """The geometry a multi-frame CT's header declares (its functional groups), no frame decoded."""
    import highdicom as hd

    path = series.files[0]
    try:
        volume = hd.Image.from_dataset(header, copy=False).get_volume_geometry()
    except HIGHDICOM_ERRORS as err:
        raise _not_one_volume(series, path, f"{err.__class__.__name__}: {library_message(err)}") from err
    if volume is None or len(volume.spatial_shape) != 3:
        raise _not_one_volume(series, path, "its frames are not a regularly spaced volume")
    depth, rows, columns = (int(n) for n in volume.spatial_shape)
    affine_lps, _ = _lps_affine(volume.affine, depth)
    return Geometry(shape=(columns, rows, depth), affine_ras=LPS_TO_RAS @ affine_lps)


def _read_multiframe(series: DicomSeries, check_geometry: Callable[[Geometry], object] | None
                     ) -> tuple[np.ndarray, Geometry]:
    """An enhanced CT file through highdicom, then put into our axis convention and checked frame by frame."""
    import highdicom as hd

    if check_geometry is not None:  # the header alone (per-frame groups can be MBs): read only to check it
        (header,) = _load_datasets(series, stop_before_pixels=True)
        check_geometry(_multiframe_geometry(header, series))
        del header
    (dataset,) = _load_datasets(series, stop_before_pixels=False)
    path = series.files[0]
    try:
        volume = hd.Image.from_dataset(dataset, copy=False).get_volume(dtype=np.float32)
        index = multiframe_slice_index(dataset)
    except HIGHDICOM_ERRORS as err:
        raise _not_one_volume(series, path, f"{err.__class__.__name__}: {library_message(err)}") from err
    if volume.array.ndim != 3 or volume.spatial_shape[0] != len(index):
        raise InputImageError(f"{_where(series)}: the multi-frame CT {path} has {len(index)} frames but makes a volume "
                              f"of shape {volume.spatial_shape}; export the series as single-frame CT images")
    # highdicom: (slices, rows, columns), affine to LPS. Ours: (columns, rows, slices), RAS.
    array = np.ascontiguousarray(volume.array.transpose(2, 1, 0))
    affine_lps, reverse = _lps_affine(volume.affine, array.shape[2])
    if reverse:
        array = np.ascontiguousarray(array[:, :, ::-1])
    affine_ras = LPS_TO_RAS @ affine_lps
    # Frame f must lie on slice index[f] of this grid: the SEG writer relies on it.
    inverse = np.linalg.inv(affine_lps)
    for frame, (item, k) in enumerate(zip(dataset.PerFrameFunctionalGroupsSequence, index, strict=True)):
        position = np.asarray(_functional_item(dataset, item, "PlanePositionSequence").ImagePositionPatient, float)
        voxel = inverse[:3, :3] @ position + inverse[:3, 3]
        if np.abs(voxel - (0.0, 0.0, k)).max() > FRAME_ON_GRID_TOLERANCE:
            raise InputImageError(f"{_where(series)}: frame {frame + 1} of {path} does not lie on slice {k} of the "
                                  f"volume (voxel {voxel.round(3).tolist()}); export the series as single-frame CT images")
    _check_volume(array, series)
    return array, Geometry(shape=tuple(int(n) for n in array.shape), affine_ras=affine_ras)  # type: ignore[arg-type]


# --- headers for the SEG -----------------------------------------------------------------


def series_headers(series: DicomSeries) -> list[Dataset]:
    """Headers of the volume's files in volume order, with UIDs the files lack filled in (derived, deterministic).

    One multi-frame data set for an enhanced CT (see ``source_slice_index``).
    """
    datasets, series = _sorted(_load_datasets(series, stop_before_pixels=True), series)
    study_uid = generate_uid(entropy_srcs=["StudyInstanceUID", series.series_uid])
    for path, ds in zip(series.files, datasets, strict=True):
        ds.SOPInstanceUID = sop_instance_uid(ds) or generate_uid(entropy_srcs=["SOPInstanceUID", series.series_uid, path.name])
        ds.SOPClassUID = sop_class_uid(ds) or CTImageStorage
        ds.SeriesInstanceUID = series.series_uid
        ds.StudyInstanceUID = uid_value(ds, "StudyInstanceUID") or study_uid
    return datasets


def source_slice_index(series: DicomSeries, datasets: list[Dataset]) -> list[int]:
    """For each source frame of ``series_headers(series)`` (each file, or each frame of a
    multi-frame file), the slice index k of the volume ``read_series`` returns."""
    if not series.multiframe:
        return list(range(len(datasets)))
    try:
        return multiframe_slice_index(datasets[0])
    except HIGHDICOM_ERRORS as err:
        raise InputImageError(f"{_where(series)}: the frames of {series.files[0]} carry no usable geometry ({library_message(err)})") from err

