"""Batch inputs: NIfTI files, folders of them, DICOM folders and manifests expanded into cases with ids;
the parts of a job array.

A *manifest* is a CSV file with a ``path`` column (a NIfTI file, a folder of them or a DICOM
folder, relative to the manifest's folder) and an optional ``case_id`` column, so that a
cohort of 100,000 scans needs no shell globbing. *Parts* split the cases of one command
among the tasks of a job array: case ids are assigned over all inputs first, so a case keeps
its id (and output folder) whatever the number of parts.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np

from spleen_seg.errors import ConfigError, InputImageError
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
# The batch's own files in the output folder (batch.summary, batch.case, outputs.cohort): no
# case folder may take their names (tests/unit/batch/test_cohort_inputs.py holds this list to them).
BATCH_FILE_NAME = re.compile(r"^(?:summary\.csv|summary\.journal\.csv|summary\.part-.*|index\.html|run_info\.json)$")
# File systems allow 255 bytes per name; a case's hidden work folder adds ".partial-<pid>".
MAX_CASE_ID_BYTES = 200
MANIFEST_PATH_COLUMN = "path"
MANIFEST_CASE_COLUMN = "case_id"


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


@dataclass(frozen=True)
class ManifestRow:
    """One row of a manifest: the input's path (resolved against the manifest's folder) and its
    case id (None: derived from the path as for a command-line input)."""

    path: Path
    case_id: str | None
    line: int


def read_manifest(manifest: Path) -> list[ManifestRow]:
    """The rows of a manifest CSV (header row with ``path``, optionally ``case_id``; other columns ignored).

    Relative paths are taken from the manifest's folder, so a job array finds them whatever its
    working directory. Raises ``ConfigError`` (one line naming the manifest) for an unreadable
    file, no ``path`` column, no rows, an empty path, a case id that cannot name a folder or a
    duplicate case id: a bad manifest fails before any model loads. A path that does not exist
    is not an error here: that case fails in the batch and the others run.
    """
    try:
        # utf-8-sig: spreadsheet programs write a byte-order mark before the header.
        with manifest.open(newline="", encoding="utf-8-sig") as file:
            reader = csv.reader(file)
            header = [name.strip() for name in next(reader, [])]
            records = [(reader.line_num, record) for record in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ConfigError(f"{manifest}: cannot read the manifest ({type(err).__name__}: {err}); "
                          "it must be a UTF-8 CSV file with a header row") from None
    if MANIFEST_PATH_COLUMN not in header:
        raise ConfigError(f"{manifest}: no '{MANIFEST_PATH_COLUMN}' column (header: {', '.join(header) or 'empty'}); "
                          f"the manifest's first row must name a '{MANIFEST_PATH_COLUMN}' column and optionally "
                          f"'{MANIFEST_CASE_COLUMN}'")
    path_at = header.index(MANIFEST_PATH_COLUMN)
    case_at = header.index(MANIFEST_CASE_COLUMN) if MANIFEST_CASE_COLUMN in header else None
    rows: list[ManifestRow] = []
    seen: dict[str, int] = {}
    for line, record in records:
        if not any(cell.strip() for cell in record):
            continue  # blank line
        cell = record[path_at].strip() if path_at < len(record) else ""
        if not cell:
            raise ConfigError(f"{manifest}: line {line} has an empty '{MANIFEST_PATH_COLUMN}'; give every row a path")
        case = record[case_at].strip() if case_at is not None and case_at < len(record) else ""
        if case:
            _check_case_id(case, manifest, line)
            if case in seen:
                raise ConfigError(f"{manifest}: case_id '{case}' on lines {seen[case]} and {line}; "
                                  "case ids name output folders and must be unique")
            seen[case] = line
        path = Path(cell).expanduser()
        rows.append(ManifestRow(path if path.is_absolute() else manifest.parent / path, case or None, line))
    if not rows:
        raise ConfigError(f"{manifest}: the manifest lists no inputs (a header row and one row per input expected)")
    return rows


def _check_case_id(case: str, manifest: Path, line: int) -> None:
    problem = None
    if "/" in case or "\\" in case:
        problem = "holds a path separator"
    elif case.startswith("."):
        problem = "starts with '.' (hidden folders are the batch's work folders)"
    elif any(ord(char) < 32 or ord(char) == 127 for char in case):
        problem = "holds a control character"
    elif len(case.encode("utf-8")) > MAX_CASE_ID_BYTES:
        problem = f"is longer than {MAX_CASE_ID_BYTES} bytes"
    elif BATCH_FILE_NAME.match(case):
        problem = "is the name of one of the batch's own files"
    if problem:
        raise ConfigError(f"{manifest}: line {line}: case_id {case!r} cannot name an output folder: it {problem}")


def collect_cases(inputs: Sequence[str | Path], manifest: Sequence[ManifestRow] = ()) -> tuple[list[InputItem], list[str]]:
    """:func:`collect_inputs` over command-line inputs then manifest rows, with every case's id.

    A manifest row's ``case_id`` names its case; when its path expands to several cases (a
    folder of NIfTI files, several CT series) they are ``<case_id>_<their own id>``. Other
    cases are named as :func:`unique_case_ids` names them, never taking a manifest's id.
    """
    entries = [(Path(path), None) for path in inputs] + [(row.path, row.case_id) for row in manifest]
    return _collect(entries, frozenset())


def collect_part(inputs: Sequence[str | Path], manifest: Sequence[ManifestRow],
                 part: Part) -> tuple[list[InputItem], list[str]]:
    """The inputs and case ids of ``part``: :func:`collect_cases` then :func:`select_part`, or cheaper.

    When every input is a manifest row with a ``case_id``, the ids are known without looking at
    the files: the rows are dealt out by case id and only this part's rows are expanded, so a
    DICOM folder is searched for its series by one task of the array instead of by all of
    them. A row of several cases (``<case_id>_<own id>``) then stays in one part. Either way a
    case's id does not depend on the number of parts.
    """
    if inputs or not manifest or any(row.case_id is None for row in manifest):
        items, cases = collect_cases(inputs, manifest)
        return select_part(items, cases, part)
    mine = sorted(manifest, key=lambda row: str(row.case_id))[part.index::part.count]
    mine.sort(key=lambda row: row.line)
    return _collect([(row.path, row.case_id) for row in mine],
                    frozenset(str(row.case_id) for row in manifest))


def _collect(entries: Sequence[tuple[Path, str | None]], reserved: frozenset[str]) -> tuple[list[InputItem], list[str]]:
    """Expand ``(path, case_id or None)`` entries into inputs and ids; ``reserved``: ids of other entries."""
    items: list[InputItem] = []
    bases: list[str] = []
    chosen: list[bool] = []
    for path, case in entries:
        expanded = collect_inputs([path])
        for item in expanded:
            items.append(item)
            chosen.append(case is not None and len(expanded) == 1)
            base = _base_case_id(item)
            if case is None:
                bases.append(base)
            else:
                bases.append(case if len(expanded) == 1 else f"{case}_{base}")
    return items, _assign_ids(bases, chosen, reserved)


@dataclass(frozen=True)
class Part:
    """Part ``index`` (0-based) of ``count``: every ``count``-th case in case-id order, from ``index``."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ConfigError(f"part id {self.index} is not one of 0..{self.count - 1} (--num-parts {self.count}); "
                              "array task ids must run from 0 to the number of parts minus 1")

    @property
    def label(self) -> str:
        return f"part-{self.index}-of-{self.count}"


def select_part(items: Sequence[InputItem], cases: Sequence[str], part: Part) -> tuple[list[InputItem], list[str]]:
    """The inputs and case ids of ``part``, in input order.

    Cases are ordered by case id (code points: the same on every machine) and dealt out in
    turn, so the parts cover every case exactly once, and neighbours in id order (often one
    site or scanner) spread over the parts, which keeps their run times alike.
    """
    by_id = sorted(range(len(cases)), key=cases.__getitem__)
    mine = sorted(by_id[part.index::part.count])
    return [items[i] for i in mine], [cases[i] for i in mine]


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


def unique_case_ids(items: Sequence[InputItem]) -> list[str]:
    """:func:`input_case_id` for each input, with ``_2``, ``_3``... appended to repeats."""
    return _assign_ids([_base_case_id(item) for item in items], [False] * len(items))


def _base_case_id(item: InputItem) -> str:
    try:
        base = input_case_id(item)
    # The id of a DICOM series comes from a file header: a file that went bad since the
    # series was found must fail that case when it is read, not stop the batch here.
    except Exception as err:
        logger.debug("case id of %s from its path: %r", input_source(item), err)
        base = _safe_name(input_source(item).name)
    if base in NOT_FOLDER_NAMES:  # ".nii.gz" or "..nii" would name the output folder itself
        base = _safe_name(base)
    return base


def _assign_ids(bases: Sequence[str], chosen: Sequence[bool], reserved: frozenset[str] = frozenset()) -> list[str]:
    """``bases[i]`` as is where ``chosen[i]`` (a manifest's id, unique); others get ``_2``, ``_3``...
    when their name is taken (by an earlier case, a chosen or ``reserved`` id, one of the batch's files)."""
    taken = set(reserved) | {base for base, fixed in zip(bases, chosen, strict=True) if fixed}
    # The next suffix to try per base: 100,000 DICOM folders all named "CT" cost one lookup each, not 100,000.
    next_count: dict[str, int] = {}
    ids: list[str] = []
    for base, fixed in zip(bases, chosen, strict=True):
        count = 1 if fixed else next_count.get(base, 1)
        name = base if count == 1 else f"{base}_{count}"
        while not fixed and (name in taken or BATCH_FILE_NAME.match(name)):
            count += 1
            name = f"{base}_{count}"
        next_count[base] = count + 1
        taken.add(name)
        ids.append(name)
    return ids


def load_input(source: InputItem) -> tuple[np.ndarray, Geometry]:
    """(X, Y, Z) float32 HU and geometry of a NIfTI file or a DICOM series; a failed input raises its error.

    A case whose estimated peak (``pipeline.memory``) does not fit in the memory free now
    is refused from its headers, before its voxels are read (``ResourceError``, naming
    both): a NIfTI file's header, a DICOM series' headers (a Deflated file's read only as
    far as its pixel data).
    """
    if isinstance(source, FailedInput):
        raise source.error
    from spleen_seg.pipeline.memory import available_bytes, require_case_memory

    if isinstance(source, Path):
        geometry = read_geometry(source)
        require_case_memory(geometry.shape, geometry.affine_ras, source, volume_loaded=False)
        return read_volume(source, max_bytes=available_bytes())
    from spleen_seg.io.dicom_volume import read_series

    series = source
    return read_series(series, check_geometry=lambda declared: require_case_memory(
        declared.shape, declared.affine_ras, series.label, volume_loaded=False))


def input_header_geometry(source: InputItem) -> tuple[tuple[int, int, int], np.ndarray | tuple[float, ...]] | None:
    """(X, Y, Z) voxels and the affine (NIfTI) or voxel spacing in mm (DICOM) an input's headers
    declare, from headers alone (one DICOM header read); None when they cannot be read."""
    try:
        if isinstance(source, FailedInput):
            return None
        if isinstance(source, Path):
            geometry = read_geometry(source)
            return geometry.shape, geometry.affine_ras
        from spleen_seg.io.dicom_files import read_dataset

        first = read_dataset(source.files[0], stop_before_pixels=True)  # a Deflated file: its header alone
        frames = int(first.get("NumberOfFrames", 0) or 0) if source.multiframe else 0
        row_mm, column_mm = (float(v) for v in first.get("PixelSpacing", (1.0, 1.0)))
        slice_mm = float(first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0)
        return (int(first.Columns), int(first.Rows), frames or len(source.files)), (column_mm, row_mm, slice_mm)
    # Headers the reader will refuse anyway: the geometry is simply unknown here (the case fails when read).
    except Exception:
        return None
