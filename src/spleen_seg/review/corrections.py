"""Learn from the corrections: the reviewed cases of a segmentation output folder as an MSD training set.

``spleen-seg corrections export OUT -o DATASET`` reads every case folder of OUT (a batch, its
parts, a Ray run, or a node's ``results/``) and writes, for each case whose review exports a
label (``outputs.review_state.exported_label``), its CT as ``imagesTr/<case>.nii.gz`` and the
label as ``labelsTr/<case>.nii.gz``: the corrected mask of a corrected case, the model's mask of
an accepted one. A rejected case without a correction is left out (one line each), and so is a
case not reviewed yet (counted). ``dataset.json`` lists them as ``training.data.msd_datalist``
reads them, so ``spleen-seg train --dataset-dir DATASET`` trains on them as it is.

The image is the case's CT as ``report.json``'s ``source`` names it: a NIfTI file, or a DICOM
series (the series of that folder whose content digest the report recorded) read with the
project's DICOM reader. It is written on the mask's grid, with the mask's header (shape,
affine, codes), so image and label share one geometry; a mask that does not match the image
(shape, affine, values other than 0/1), a CT changed since it was segmented (its sha256
differs from the report's) or missing, or a corrected mask changed since it was saved fails
that case with one line, and the others go on.

``dataset.json`` also records where each case came from (``spleen_seg_export``: the output
folder, case, which mask, the masks' and the CT's sha256, the reviewer) and the orientation
convention of its headers, which ``train`` checks its init weights against: by default that of
the weights that computed the masks (the model the reviewer corrected, so that those weights
fine-tune on the export as they are). ``true``: the headers place the anatomy where it is.
``msd``: the headers say what MSD Task09's do (world x and y mirrored: ``diag(-1, -1, 1, 1) @
affine``, the voxels unchanged), the anatomy the official weights learned, so that they
fine-tune on it without learning mirrored and true anatomy at once.

DATASET must be new, empty, or a folder this command wrote (its marker file, or its
``dataset.json``): a folder of someone else's is refused untouched. Every file is written
atomically, ``dataset.json`` last; files of an earlier export that this one no longer lists
are removed after it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import nibabel as nib
import numpy as np
from tqdm import tqdm

from spleen_seg import __version__
from spleen_seg.batch.inputs import FailedInput, InputItem, collect_inputs, input_case_id, input_source, load_input
from spleen_seg.batch.resume import INPUT_DIGEST_KEY, input_sha256
from spleen_seg.errors import ConfigError, SpleenSegError, library_message
from spleen_seg.io.atomic import atomic_write_text
from spleen_seg.io.download import file_sha256
from spleen_seg.io.nifti import Geometry, read_geometry, write_volume
from spleen_seg.outputs.report import REPORT_FILENAME, CaseReport, read_report
from spleen_seg.outputs.review_state import (
    AFFINE_TOLERANCE_MM,
    Correction,
    ReviewState,
    exported_label,
    review_from_dict,
)
from spleen_seg.pipeline.network import CONVENTION_MSD, CONVENTION_TRUE, ORIENTATION_CONVENTIONS
from spleen_seg.training.data import (
    DATASET_JSON,
    IMAGES_TRAIN_DIR,
    LABELS_TRAIN_DIR,
    NIFTI_SUFFIX,
    ORIENTATION_KEY,
    msd_dataset_json,
    msd_training_entry,
)

logger = logging.getLogger(__name__)

EXPORT_KEY = "spleen_seg_export"
EXPORT_VERSION = 1
# Written first into a new or empty DATASET, so that an export killed before its dataset.json
# still leaves a folder the next export recognises as its own.
MARKER_FILENAME = ".spleen-seg-corrections-export.json"
MARKER_CONTENT = {"written_by": "spleen-seg corrections export", "version": EXPORT_VERSION}
# ``--convention`` choices; "auto": that of the weights whose masks were reviewed (report.json's model).
CONVENTION_AUTO = "auto"
LABEL_CORRECTED, LABEL_MODEL = "corrected", "model"
# CT voxels that are whole numbers in int16's range are stored int16, as MSD's images are.
INT16_RANGE = (np.iinfo(np.int16).min, np.iinfo(np.int16).max)
# A dataset.json of another program is read no further than this.
MAX_MANIFEST_BYTES = 64 << 20


@dataclass(frozen=True)
class ExportedCase:
    """One case written into the dataset, and where it came from (``dataset.json``'s record)."""

    name: str
    label: str  # LABEL_CORRECTED or LABEL_MODEL
    provenance: dict[str, Any]


@dataclass
class ExportSummary:
    """What an export did: the cases written, left out (rejected without correction), not reviewed, failed."""

    dataset: Path
    convention: str = CONVENTION_TRUE  # of the written headers (dataset.json's orientation_convention)
    exported: list[ExportedCase] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    not_reviewed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # one line each
    removed: list[str] = field(default_factory=list)  # files of an earlier export this one no longer lists

    def line(self) -> str:
        """``"5 exported: 3 corrected, 2 accepted; 4 left out (1 rejected without correction, 3 not reviewed); 1 failed
        -> DATASET (orientation convention true)"``."""
        corrected = sum(case.label == LABEL_CORRECTED for case in self.exported)
        left_out = len(self.left_out) + len(self.not_reviewed)
        return (f"{len(self.exported)} exported: {corrected} corrected, {len(self.exported) - corrected} accepted; "
                f"{left_out} left out ({len(self.left_out)} rejected without correction, {len(self.not_reviewed)} "
                f"not reviewed); {len(self.failed)} failed -> {self.dataset} (orientation convention {self.convention})")


class CaseFailure(SpleenSegError):
    """One case cannot be exported; the message is its line."""


# --------------------------------------------------------------------------- the DATASET folder


def _read_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when it is not one (or too large to be ours)."""
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def claim_dataset_folder(dataset: Path) -> dict[str, Any] | None:
    """Make ``dataset`` this export's folder; returns the ``dataset.json`` an earlier export left (or None).

    A new or empty folder gets the marker file; a folder holding the marker or an export's
    ``dataset.json`` is ours. Anything else raises ``ConfigError`` and is left untouched.
    """
    if dataset.exists() and not dataset.is_dir():
        raise ConfigError(f"{dataset}: exists and is not a folder; give a new or empty folder for the dataset")
    manifest = _read_json_object(dataset / DATASET_JSON) if (dataset / DATASET_JSON).is_file() else None
    exported = manifest if manifest is not None and isinstance(manifest.get(EXPORT_KEY), dict) else None
    ours = exported is not None or _read_json_object(dataset / MARKER_FILENAME) == MARKER_CONTENT
    if dataset.is_dir() and not ours and any(dataset.iterdir()):
        raise ConfigError(f"{dataset}: holds files spleen-seg did not write (no {MARKER_FILENAME}, no dataset.json of "
                          "a corrections export); nothing was changed: give a new or empty folder")
    dataset.mkdir(parents=True, exist_ok=True)
    atomic_write_text(dataset / MARKER_FILENAME, json.dumps(MARKER_CONTENT) + "\n")
    # Only an export's own dataset.json names files it may remove later.
    return exported


def _listed_files(manifest: dict[str, Any] | None, dataset: Path) -> set[Path]:
    """The image and label files an earlier export's ``dataset.json`` lists, inside ``dataset`` only."""
    files: set[Path] = set()
    entries = manifest.get("training") if manifest is not None else None
    for entry in entries if isinstance(entries, list) else []:
        for key, folder in (("image", IMAGES_TRAIN_DIR), ("label", LABELS_TRAIN_DIR)):
            name = Path(str(entry.get(key, ""))).name if isinstance(entry, dict) else ""
            # Only a plain name in our own subfolder: a crafted entry cannot point elsewhere.
            if name and not name.startswith("."):
                files.add(dataset / folder / name)
    return files


# --------------------------------------------------------------------------- one case


def case_folders(out: Path) -> list[Path]:
    """The case folders of an output folder (sorted by name): visible subfolders holding a ``report.json``."""
    if not out.is_dir():
        raise ConfigError(f"{out}: output folder not found; give the -o folder of spleen-seg segment")
    return sorted(p for p in out.iterdir() if not p.name.startswith(".") and (p / REPORT_FILENAME).is_file())


def _case_review(case_dir: Path) -> tuple[CaseReport, ReviewState]:
    report = read_report(case_dir / REPORT_FILENAME)
    if report is None:
        raise CaseFailure(f"{case_dir / REPORT_FILENAME}: not a report this spleen-seg version reads")
    try:
        return report, review_from_dict(report.review)
    except ValueError as err:
        raise CaseFailure(f"{case_dir / REPORT_FILENAME}: {err}") from None


def _inside(case_dir: Path, name: str, what: str) -> Path:
    """``case_dir/name`` for a plain file name (a report cannot send the export to read elsewhere)."""
    if not name or Path(name).name != name or name.startswith("."):
        raise CaseFailure(f"{case_dir / REPORT_FILENAME}: the {what} {name!r} is not a file name in the case folder")
    path = case_dir / name
    if not path.is_file():
        raise CaseFailure(f"{path}: the {what} is missing")
    return path


def _mask_path(case_dir: Path, report: CaseReport, label: str, correction: Correction | None) -> Path:
    if label == LABEL_CORRECTED and correction is not None:
        path = _inside(case_dir, correction.file, "corrected mask")
        if file_sha256(path) != correction.sha256:
            raise CaseFailure(f"{path}: changed since the correction was saved (sha256 differs from the review "
                              "record's); save the correction again in spleen-seg review")
        return path
    return _inside(case_dir, Path(report.outputs.get("mask", "")).name, "model's mask")


def _source_item(report: CaseReport, case_dir: Path) -> InputItem:
    """The input ``report.source`` names (batch.inputs' InputItem), checked against the report's digest."""
    source = Path(report.source)
    if not source.exists():
        raise CaseFailure(f"{case_dir.name}: its CT {source} cannot be found (moved or deleted since it was segmented)")
    recorded = report.identity.get(INPUT_DIGEST_KEY)
    items = [item for item in collect_inputs([source]) if not isinstance(item, FailedInput)]
    if len(items) > 1:  # a DICOM folder of several series: the one the report's digest names
        if recorded:
            items = [item for item in items if input_sha256(item) == recorded]
        else:
            items = [item for item in items if input_case_id(item) == case_dir.name]
        if len(items) != 1:
            raise CaseFailure(f"{case_dir.name}: no CT series in {source} is the one it was segmented from "
                              "(changed since, or the report records no digest)")
    elif not items:
        raise CaseFailure(f"{case_dir.name}: {source} holds no CT it can read")
    elif recorded and input_sha256(items[0]) != recorded:
        raise CaseFailure(f"{case_dir.name}: its CT {source} changed since it was segmented (sha256 differs from "
                          "the report's); segment it again before exporting")
    return items[0]


def _read_mask(path: Path) -> tuple[np.ndarray, Geometry]:
    """The mask's voxels (uint8) and geometry; values must be 0 and 1."""
    geometry = read_geometry(path)
    try:
        voxels = np.asarray(cast(nib.Nifti1Image, nib.load(str(path))).dataobj).reshape(geometry.shape)
    except (OSError, ValueError, EOFError) as err:
        raise CaseFailure(f"{path}: unreadable mask ({library_message(err)})") from err
    if not bool(((voxels == 0) | (voxels == 1)).all()):  # no sort of the whole volume, as np.unique would
        raise CaseFailure(f"{path}: the mask holds values other than 0 and 1; a label is 0 (background) or 1 (spleen)")
    return voxels.astype(np.uint8, copy=False), geometry


def _check_same_grid(image_geometry: Geometry, mask_geometry: Geometry, mask_path: Path, source: Path) -> None:
    if tuple(image_geometry.shape) != tuple(mask_geometry.shape):
        raise CaseFailure(f"{mask_path}: shape {tuple(mask_geometry.shape)} differs from its CT {source} "
                          f"({tuple(image_geometry.shape)})")
    offset_mm = float(np.abs(np.asarray(image_geometry.affine_ras) - np.asarray(mask_geometry.affine_ras)).max())
    if not offset_mm <= AFFINE_TOLERANCE_MM:
        raise CaseFailure(f"{mask_path}: its affine differs from its CT {source} by up to {offset_mm:.4g} mm "
                          f"(more than {AFFINE_TOLERANCE_MM:g}); the mask is not on the CT's grid")


def _stored_image(array: np.ndarray) -> np.ndarray:
    """int16 when every voxel is a whole number in its range (CT in HU usually is), else float32."""
    low, high = float(array.min()), float(array.max())
    if INT16_RANGE[0] <= low and high <= INT16_RANGE[1] and bool(np.all(np.mod(array, 1.0) == 0.0)):
        return array.astype(np.int16)
    return np.asarray(array, dtype=np.float32)


def _in_convention(geometry: Geometry, convention: str) -> Geometry:
    """The geometry written for ``convention``: as read (true), or with MSD's mirrored header (msd)."""
    if convention == CONVENTION_TRUE:
        return geometry
    from dataclasses import replace

    from spleen_seg.training.transforms import MSD_HEADER_FIX

    return replace(geometry, affine_ras=np.asarray(MSD_HEADER_FIX) @ np.asarray(geometry.affine_ras, dtype=np.float64))


def export_case(case_dir: Path, dataset: Path, out: Path,
                convention: str = CONVENTION_TRUE) -> ExportedCase | str | None:
    """Write one case into ``dataset``; returns the case, a left-out line (rejected), or None (not reviewed).

    Raises ``CaseFailure`` (the case's one line) when it cannot be exported.
    """
    report, review = _case_review(case_dir)
    label = exported_label(review)
    if label is None:  # rejected without a correction, or not reviewed yet
        return f"left out: {case_dir.name}: rejected without a correction" if review.decision is not None else None
    mask_path = _mask_path(case_dir, report, label, review.correction)
    mask, mask_geometry = _read_mask(mask_path)
    item = _source_item(report, case_dir)
    source = input_source(item)
    try:
        array, image_geometry = load_input(item)
    except SpleenSegError as err:
        raise CaseFailure(f"{case_dir.name}: {err}") from None
    _check_same_grid(image_geometry, mask_geometry, mask_path, source)
    name = case_dir.name + NIFTI_SUFFIX
    image_dest, label_dest = dataset / IMAGES_TRAIN_DIR / name, dataset / LABELS_TRAIN_DIR / name
    # Both on the mask's geometry (header included): the image and label a reader sees share one grid.
    written = _in_convention(mask_geometry, convention)
    write_volume(_stored_image(array), written, image_dest)
    write_volume(mask, written, label_dest)
    correction = review.correction
    provenance = {
        "case": case_dir.name, "output_folder": str(out), "label_from": label, "mask": mask_path.name,
        "mask_sha256": file_sha256(mask_path),
        "model_mask_sha256": correction.model_mask_sha256 if correction is not None else file_sha256(mask_path),
        "decision": review.decision, "reviewer": correction.reviewer if correction is not None else review.reviewer,
        "reviewed_at": correction.saved_at if correction is not None else review.decided_at,
        "source": str(source), "source_sha256": report.identity.get(INPUT_DIGEST_KEY),
        "image_sha256": file_sha256(image_dest), "label_sha256": file_sha256(label_dest),
        "label_voxels": int(np.count_nonzero(mask)),
    }
    return ExportedCase(name=name, label=label, provenance=provenance)


# --------------------------------------------------------------------------- the export


def _write_manifest(summary: ExportSummary, out: Path) -> None:
    cases = sorted(summary.exported, key=lambda case: case.name)
    manifest = msd_dataset_json(
        description=f"Reviewed cases of {out}: corrected masks and accepted model masks (spleen-seg corrections export)",
        reference="spleen-seg corrections export", licence="that of the source CTs",
        training=[msd_training_entry(case.name) for case in cases],
        extra={ORIENTATION_KEY: summary.convention,
               EXPORT_KEY: {"version": EXPORT_VERSION, "spleen_seg_version": __version__, "output_folder": str(out),
                            "cases": {case.name: case.provenance for case in cases}}})
    atomic_write_text(summary.dataset / DATASET_JSON, json.dumps(manifest, indent=2) + "\n")


def reviewed_convention(folders: list[Path]) -> str:
    """The orientation convention of the weights that computed the masks to export (their reports' model).

    Raises ``ConfigError`` when the cases were computed by weights of both conventions (say which).
    """
    found: dict[str, str] = {}
    for case_dir in folders:
        try:
            report, review = _case_review(case_dir)
        except CaseFailure:  # the export's own pass gives this case its line
            continue
        convention = report.model.get("orientation_convention")
        if exported_label(review) is not None and convention in ORIENTATION_CONVENTIONS:
            found.setdefault(str(convention), case_dir.name)
    if len(found) > 1:
        raise ConfigError(f"the reviewed masks come from weights of both orientation conventions (msd: "
                          f"{found[CONVENTION_MSD]}, true: {found[CONVENTION_TRUE]}, ...); nothing was written: give "
                          "--convention, that of the weights you will fine-tune")
    return next(iter(found), CONVENTION_TRUE)


def export_corrections(out: str | Path, dataset: str | Path, *, convention: str = CONVENTION_AUTO,
                       progress: bool = True, on_line: Callable[[str], None] = logger.info) -> ExportSummary:
    """Export the accepted and corrected cases of ``out`` into ``dataset`` (MSD layout); see the module docstring.

    ``convention``: of the headers written, ``"true"``, ``"msd"`` or ``"auto"`` (that of the weights
    that computed the masks). ``on_line`` gets one line per case left out or failed. Raises
    ``ConfigError`` (nothing written) when ``out`` is not a folder, ``dataset`` is a folder of
    someone else's, or ``auto`` finds masks of both conventions.
    """
    out, dataset = Path(os.path.abspath(Path(out).expanduser())), Path(os.path.abspath(Path(dataset).expanduser()))
    folders = case_folders(out)
    if convention == CONVENTION_AUTO:
        convention = reviewed_convention(folders)
    elif convention not in ORIENTATION_CONVENTIONS:
        raise ConfigError(f"orientation convention must be one of {(CONVENTION_AUTO, *ORIENTATION_CONVENTIONS)}, "
                          f"got {convention!r}")
    earlier = claim_dataset_folder(dataset)
    summary = ExportSummary(dataset=dataset, convention=convention)
    with tqdm(folders, desc="export", unit="case", disable=not progress) as bar:
        for case_dir in bar:
            try:
                result = export_case(case_dir, dataset, out, convention)
            # Any exception: one bad case never stops the others (readers raise far more than our
            # own errors: nibabel on a damaged header, pydicom, MemoryError), as in the batch.
            except Exception as err:
                summary.failed.append(f"failed: {_failure_line(case_dir, err)}")
                on_line(summary.failed[-1])
                continue
            if isinstance(result, ExportedCase):
                summary.exported.append(result)
            elif result is None:
                summary.not_reviewed.append(case_dir.name)
            else:
                summary.left_out.append(result)
                on_line(result)
    _write_manifest(summary, out)
    _remove_stale(summary, earlier)
    return summary


def _failure_line(case_dir: Path, err: Exception) -> str:
    if isinstance(err, CaseFailure):
        return str(err)
    if isinstance(err, SpleenSegError):  # a reader's error: it names the file
        return f"{case_dir.name}: {err}"
    logger.debug("%s failed", case_dir, exc_info=err)
    return f"{case_dir.name}: {library_message(err) or 'failed without a message'} ({type(err).__name__})"


def _remove_stale(summary: ExportSummary, earlier: dict[str, Any] | None) -> None:
    """Remove the files an earlier export listed that this one does not (after its dataset.json is written)."""
    kept = {summary.dataset / folder / case.name for case in summary.exported
            for folder in (IMAGES_TRAIN_DIR, LABELS_TRAIN_DIR)}
    for stale in sorted(_listed_files(earlier, summary.dataset) - kept):
        if stale.is_file():
            stale.unlink()
            summary.removed.append(str(stale))
