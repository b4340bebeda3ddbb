"""``spleen-seg compare PRIOR CURRENT -o OUT``: segment two scans of one patient and measure the change.

Both scans are segmented as one batch into ``OUT/prior/`` and ``OUT/current/`` (each with its
mask, report.json and preview; ``OUT/summary.csv`` lists the two), so a second run with the
same inputs, weights and options reuses both (``batch.resume``) and only measures again.
``OUT/compare.json`` and ``OUT/compare.png`` hold the comparison (``outputs.compare``).

Before anything is segmented the patients are checked: two DICOM series whose PatientID
differs are refused (``--force`` compares them anyway, and the comparison says so); when an
input carries no PatientID (NIfTI), the check cannot be made and the comparison records that.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from spleen_seg.batch.case import MASK_FILENAME, CaseResult, SegmentOptions
from spleen_seg.batch.inputs import FailedInput, InputItem, collect_inputs, load_input
from spleen_seg.batch.ownership import check_file
from spleen_seg.config import GROWTH_THRESHOLD_PERCENT
from spleen_seg.errors import ConfigError, InputImageError
from spleen_seg.outputs.compare import (
    COMPARE_FILENAME,
    COMPARE_PREVIEW_FILENAME,
    PNG_SIGNATURE,
    Comparison,
    ScanSide,
    compare_scans,
    is_compare_preview,
    is_compare_record,
    write_compare_preview,
    write_comparison,
)

logger = logging.getLogger(__name__)
ROLES = ("prior", "current")
PATIENT_ID = "PatientID"


@dataclass(frozen=True)
class CompareResult:
    comparison: Comparison
    json_path: Path
    preview_path: Path
    reused: tuple[bool, bool]  # each scan's segmentation came from an earlier run


def _single_input(path: str | Path, role: str) -> InputItem:
    """The one CT volume ``path`` names (a NIfTI file or a DICOM folder holding one series)."""
    items = collect_inputs([path])
    if len(items) != 1:
        raise ConfigError(f"{path}: {role.upper()} holds {len(items)} CT volumes; give one NIfTI file or one "
                          "DICOM series folder per scan")
    item = items[0]
    if isinstance(item, FailedInput):
        raise InputImageError(f"{item.path}: {item.error}")
    return item


def _patient(item: InputItem) -> dict[str, str]:
    if isinstance(item, Path):
        return {}
    from spleen_seg.io.dicom import series_patient

    return series_patient(item)  # type: ignore[arg-type]


def check_patients(prior: dict[str, str], current: dict[str, str], force: bool,
                   sources: tuple[Path, Path]) -> tuple[str, list[str]]:
    """How the patient check went (a phrase for compare.json) and warnings; refuses different PatientIDs."""
    ids = (prior.get(PATIENT_ID, ""), current.get(PATIENT_ID, ""))
    if not all(ids):
        unknown = " and ".join(str(s) for s, i in zip(sources, ids, strict=True) if not i)
        return "not checked", [f"patient identity not checked: no PatientID in {unknown} (NIfTI carries none)"]
    if ids[0] == ids[1]:
        return f"same PatientID ({ids[0]})", []
    if not force:
        raise ConfigError(f"{sources[0]} and {sources[1]} belong to different patients (PatientID '{ids[0]}' and "
                          f"'{ids[1]}'); compare scans of one patient, or pass --force to compare them anyway")
    return "different PatientIDs, compared with --force", [
        f"different patients compared (--force): PatientID '{ids[0]}' and '{ids[1]}'"]


def _side(role: str, result: CaseResult, patient: dict[str, str]) -> ScanSide:
    if result.error is not None or result.report is None or result.output is None:
        raise InputImageError(result.error or f"{result.source}: not segmented")
    from spleen_seg.outputs.report import REPORT_FILENAME

    report = result.output.parent / REPORT_FILENAME
    return ScanSide(role=role, source=str(result.source), case_dir=str(result.output.parent), report=str(report),
                    spleen_found=result.report.spleen_found, volume_ml=result.report.volume_ml, patient=patient)


def check_compare_outputs(out_dir: Path) -> None:
    """Raise ``ForeignOutputError`` when ``OUT/compare.json`` or ``OUT/compare.png`` exists and is
    not this program's, before anything is computed or written. A preview without the mark
    (written before it existed) is this program's when the record beside it is."""
    record = out_dir / COMPARE_FILENAME
    check_file(record, is_compare_record, "a comparison record")
    earlier_pair = record.is_file()  # recognised just above
    check_file(out_dir / COMPARE_PREVIEW_FILENAME,
               lambda head: is_compare_preview(head) or (earlier_pair and head.startswith(PNG_SIGNATURE)),
               "a comparison preview")


def compare_followup(prior: str | Path, current: str | Path, out_dir: Path, weights: Path, device: str, *,
                     backend: str = "auto", progress: bool = True, options: SegmentOptions | None = None,
                     growth_threshold_percent: float = GROWTH_THRESHOLD_PERCENT, force: bool = False,
                     overwrite: bool = False) -> CompareResult:
    """Segment (or reuse) both scans into ``out_dir`` and write compare.json and compare.png.

    Raises ``ConfigError`` for an input that is not one CT volume or for different
    PatientIDs without ``force`` (both before the model loads), ``InputImageError`` when a
    scan cannot be read or segmented.
    """
    from spleen_seg.batch.run import segment_files
    from spleen_seg.pipeline.tta import FLAG_TTA_UNTRAINED

    items = [_single_input(prior, "prior"), _single_input(current, "current")]
    patients = [_patient(item) for item in items]
    sources = (Path(prior), Path(current))
    check, warnings = check_patients(patients[0], patients[1], force, sources)
    check_compare_outputs(out_dir)
    results = segment_files(items, out_dir, weights, device, backend=backend, progress=progress, options=options,
                            overwrite=overwrite, cases=list(ROLES))
    sides = [_side(role, result, patient) for role, result, patient in zip(ROLES, results, patients, strict=True)]
    # TTA on axes the weights were not trained on: the warning both reports hold, said once here.
    warnings += sorted({w for r in results if r.report is not None for w in r.report.warnings
                        if w.startswith(FLAG_TTA_UNTRAINED)})
    comparison = compare_scans(sides[0], sides[1], check, warnings, growth_threshold_percent)
    json_path = write_comparison(comparison, out_dir / COMPARE_FILENAME)
    scans = []
    for item, side in zip(items, sides, strict=True):
        image, geometry = load_input(item)
        # The mask lies on the scan's own grid (written with its geometry).
        mask = np.asarray(nib.load(str(Path(side.case_dir) / MASK_FILENAME)).dataobj,  # type: ignore[attr-defined]
                          dtype=np.uint8)
        scans.append((image, mask, geometry.affine_ras))
    title = (f"spleen {comparison.prior.volume_ml:.1f} mL -> {comparison.current.volume_ml:.1f} mL"
             + (f" ({comparison.change_percent:+.1f} %)" if comparison.change_percent is not None else ""))
    preview = write_compare_preview(scans[0], scans[1], out_dir / COMPARE_PREVIEW_FILENAME, title)
    return CompareResult(comparison=comparison, json_path=json_path, preview_path=preview,
                         reused=(results[0].reused, results[1].reused))
