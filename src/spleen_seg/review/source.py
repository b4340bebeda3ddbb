"""A case's CT and, for a DICOM case, its series: read again through the project's readers.

The report names the input (``source``: a NIfTI file, or the DICOM series' folder, usually
outside the output folder). It is read only through ``io.nifti``/``io.dicom_volume``, and
used only when it is a CT volume on the grid of the case's mask (same shape, same affine):
a report edited to point at another file cannot make the app serve that file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spleen_seg.errors import InputImageError
from spleen_seg.io.dicom import DicomSeries
from spleen_seg.io.nifti import Geometry, is_nifti, read_geometry, read_volume
from spleen_seg.outputs.report import CaseReport
from spleen_seg.outputs.review_state import AFFINE_TOLERANCE_MM
from spleen_seg.review.cases import CaseEntry, case_file


@dataclass(frozen=True)
class CaseSource:
    """The case's CT (X, Y, Z float32 HU, the mask's voxel order) and its DICOM series (None for NIfTI)."""

    image_hu: np.ndarray
    geometry: Geometry
    series: DicomSeries | None


def _referenced_series_uid(entry: CaseEntry) -> str | None:
    """The series the model's SEG references (the series the case was computed from)."""
    import pydicom

    from spleen_seg.batch.case import SEG_FILENAME

    path = case_file(entry, SEG_FILENAME)
    if path is None:
        return None
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)
    except (OSError, AttributeError, IndexError, KeyError, ValueError):
        return None


def find_case_series(entry: CaseEntry, report: CaseReport) -> DicomSeries:
    """The DICOM series of a DICOM case: in the report's source folder, the one its SEG references,
    on the mask's grid; ``InputImageError`` when it is gone."""
    from spleen_seg.batch.inputs import input_case_id
    from spleen_seg.io.dicom import find_series

    folder = Path(report.source)
    if not folder.is_dir():
        raise InputImageError(f"{entry.case}: its DICOM series folder {folder} is gone (moved, or purged by the node)")
    found, _notices = find_series(folder)
    uid = _referenced_series_uid(entry)
    candidates = [s for s in found if uid is None or s.series_uid == uid] or found
    if not candidates:
        raise InputImageError(f"{entry.case}: no CT series left in {folder}")
    # A series split in parts: the part whose case id the batch gave this case (``<folder>_s<N>_a2``).
    named = [s for s in candidates if entry.case == input_case_id(s) or entry.case.startswith(input_case_id(s) + "_")]
    return (named or candidates)[0]


def read_case_source(entry: CaseEntry, report: CaseReport, mask_geometry: Geometry) -> CaseSource:
    """The case's CT on the mask's grid; ``InputImageError`` naming the case when it cannot be had."""
    from spleen_seg.batch.inputs import load_input

    source = Path(report.source)
    series = None
    if is_nifti(source):
        from spleen_seg.pipeline.memory import available_bytes

        header = read_geometry(source)
        _check_grid(entry, source, header, mask_geometry)
        image, geometry = read_volume(source, max_bytes=available_bytes())
    else:  # a series' grid is known once its slices are read
        series = find_case_series(entry, report)
        image, geometry = load_input(series)
        _check_grid(entry, source, geometry, mask_geometry)
    return CaseSource(image_hu=image, geometry=geometry, series=series)


def _check_grid(entry: CaseEntry, source: Path, geometry: Geometry, mask_geometry: Geometry) -> None:
    if tuple(geometry.shape) != tuple(mask_geometry.shape) or not np.allclose(
            geometry.affine_ras, mask_geometry.affine_ras, atol=AFFINE_TOLERANCE_MM):
        raise InputImageError(f"{entry.case}: its source {source} is not on the grid of its mask (shape "
                              f"{tuple(geometry.shape)} vs {tuple(mask_geometry.shape)}): the input changed since "
                              "it was segmented")


def seg_writer(entry: CaseEntry, report: CaseReport):
    """For a DICOM case, ``write(mask, path)`` writing the corrected SEG; None for a NIfTI case."""
    if is_nifti(report.source) or "dicom_seg" not in report.outputs:
        return None
    from spleen_seg import __version__
    from spleen_seg.batch.case import ALGORITHM_NAME
    from spleen_seg.io.seg import AlgorithmInfo, write_dicom_seg

    series = find_case_series(entry, report)
    algorithm = AlgorithmInfo(name=str(report.model.get("name") or ALGORITHM_NAME),
                              version=str(report.model.get("version") or __version__),
                              weights_sha256=str(report.model.get("weights_sha256", "")))

    def write(mask: np.ndarray, dest: Path) -> Path:
        return write_dicom_seg(mask, series, dest, algorithm, corrected=True)

    return write
