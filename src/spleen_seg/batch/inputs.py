"""Batch inputs: NIfTI files, folders of them and DICOM folders expanded into cases with ids."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np

from spleen_seg.errors import InputImageError
from spleen_seg.io.nifti import Geometry, case_id, is_nifti, read_geometry, read_volume

if TYPE_CHECKING:
    from spleen_seg.io.dicom import DicomSeries


@dataclass(frozen=True)
class FailedInput:
    """A command-line input that could not be expanded into cases (a folder with no image, no CT series...).

    It stays in the batch as one case that fails with ``error``, so that it gets its
    error line and ``failed`` row in input order instead of stopping the batch.
    """

    path: Path
    error: Exception


# A NIfTI file, one DICOM CT series, or an input whose expansion failed.
InputItem = Union[Path, "DicomSeries", FailedInput]

logger = logging.getLogger(__name__)
# Case folder names keep letters, digits, '.', '_' and '-'; a DICOM series adds its number or this much UID.
UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
SHORT_UID_CHARS = 8
NOT_FOLDER_NAMES = ("", ".", "..")


def collect_inputs(inputs: list[str | Path]) -> list[InputItem]:
    """Expand folders into the NIfTI files they hold (sorted); keep files as given.

    A folder holding DICOM files becomes one input per CT volume in it (searched
    recursively; a series split by acquisition gives several); what is not an axial CT
    volume is skipped with one logged line each (``io.dicom.find_series``). Missing
    paths are kept so that the batch reports them as failures one by one; a folder that
    cannot be expanded (no NIfTI file, no CT series, unreadable) becomes a :class:`FailedInput`.
    """
    found: list[InputItem] = []
    for item in map(Path, inputs):
        try:
            found.extend(_expand(item))
        # Any exception: one bad input never stops the batch; the error is reported as
        # that input's failure (KeyboardInterrupt and SystemExit are not Exceptions).
        except Exception as err:
            found.append(FailedInput(item, err))
    return found


def _expand(item: Path) -> list[InputItem]:
    if item.is_dir():
        from spleen_seg.io.dicom import find_series, is_dicom_folder

        if is_dicom_folder(item):
            series, notices = find_series(item)
            for notice in notices:
                logger.log(notice.level, "%s: %s", item, notice.text)
            return list(series)
        files = sorted(p for p in item.iterdir() if p.is_file() and is_nifti(p) and not p.name.startswith("."))
        if not files:
            raise InputImageError(f"{item}: folder holds no .nii or .nii.gz files")
        return list(files)
    return [item]


def _safe_name(text: str) -> str:
    return UNSAFE_NAME_CHARS.sub("_", text).strip("._") or "case"


def input_source(item: InputItem) -> Path:
    """The path an input came from: the NIfTI file, the DICOM series' folder, or the failed input's path."""
    if isinstance(item, FailedInput):
        return item.path
    return item if isinstance(item, Path) else item.folder


def input_case_id(item: InputItem) -> str:
    """Output folder name: NIfTI file name without extension; for DICOM, the folder name,
    ``s<SeriesNumber>`` (or a short UID) and the part of a split series (``_a2``: AcquisitionNumber 2)."""
    if isinstance(item, FailedInput):
        return _safe_name(case_id(item.path))
    if isinstance(item, Path):
        return case_id(item)
    suffix = f"s{item.series_number}" if item.series_number else item.series_uid.replace(".", "")[-SHORT_UID_CHARS:]
    part = f"_{item.part}" if item.part else ""
    return _safe_name(f"{item.folder.name}_{suffix}{part}")


def unique_case_ids(items: list[InputItem]) -> list[str]:
    """:func:`input_case_id` for each input, with ``_2``, ``_3``... appended to repeats."""
    ids: list[str] = []
    for item in items:
        try:
            base = input_case_id(item)
        # The id of a DICOM series comes from a file header: a file that went bad since the
        # series was found must fail that case when it is read, not stop the batch here.
        except Exception as err:
            logger.debug("case id of %s from its path: %r", input_source(item), err)
            base = _safe_name(input_source(item).name)
        if base in NOT_FOLDER_NAMES:  # ".nii.gz" or "..nii" would name the output folder itself
            base = _safe_name(base)
        name, count = base, 1
        while name in ids:
            count += 1
            name = f"{base}_{count}"
        ids.append(name)
    return ids


def load_input(source: InputItem) -> tuple[np.ndarray, Geometry]:
    """(X, Y, Z) float32 HU and geometry of a NIfTI file or a DICOM series; a failed input raises its error.

    A NIfTI case whose estimated peak (``pipeline.memory``) does not fit in the memory
    free now is refused before its voxels are read (``ResourceError``, naming both).
    """
    if isinstance(source, FailedInput):
        raise source.error
    if isinstance(source, Path):
        from spleen_seg.pipeline.memory import available_bytes, require_case_memory

        geometry = read_geometry(source)
        require_case_memory(geometry.shape, geometry.affine_ras, source, volume_loaded=False)
        return read_volume(source, max_bytes=available_bytes())
    from spleen_seg.io.dicom_volume import read_series

    return read_series(source)


def input_shape(source: InputItem) -> tuple[int, int, int] | None:
    """(X, Y, Z) voxels an input declares, from headers alone; None when they cannot be read."""
    try:
        if isinstance(source, Path):
            return read_geometry(source).shape
        if isinstance(source, FailedInput):
            return None
        import pydicom

        first = pydicom.dcmread(source.files[0], stop_before_pixels=True, force=True)
        frames = int(first.get("NumberOfFrames", 0) or 0) if source.multiframe else 0
        return int(first.Columns), int(first.Rows), frames or len(source.files)
    # Headers the reader will refuse anyway: the shape is simply unknown here.
    except Exception:
        return None
