"""Review records as the review app writes them (outputs/review_state.py), for the export tests and the
fine-tune benchmark: a decision, and optionally a corrected mask saved beside the model's."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from spleen_seg.io.download import file_sha256
from spleen_seg.io.nifti import read_geometry, write_mask
from spleen_seg.outputs.report import REPORT_FILENAME, read_report, write_report
from spleen_seg.outputs.review_state import CORRECTED_MASK_FILENAME, Correction, ReviewState
from spleen_seg.training.evaluate import dice

MODEL_MASK = "spleen.nii.gz"
REVIEWER = "test-reviewer"
SAVED_AT = "2026-12-02T17:00:00Z"


def record_review(case_dir: Path, decision: str | None, corrected: np.ndarray | None = None) -> ReviewState:
    """Write ``decision`` (accepted, rejected or None) and, with ``corrected`` (uint8, the model mask's
    shape and voxel order), ``spleen_corrected.nii.gz`` on the model mask's geometry, into the case's
    ``report.json``; returns the review recorded."""
    report = read_report(case_dir / REPORT_FILENAME)
    assert report is not None, case_dir
    model_path = case_dir / MODEL_MASK
    correction = None
    if corrected is not None:
        geometry = read_geometry(model_path)
        model = np.asarray(nib.load(str(model_path)).dataobj)
        dest = write_mask(corrected.astype(np.uint8), geometry, case_dir / CORRECTED_MASK_FILENAME)
        voxels, model_voxels = int(np.count_nonzero(corrected)), int(np.count_nonzero(model))
        correction = Correction(
            file=CORRECTED_MASK_FILENAME, sha256=file_sha256(dest), model_mask_sha256=file_sha256(model_path),
            saved_at=SAVED_AT, reviewer=REVIEWER, voxels=voxels, volume_ml=voxels * geometry.voxel_volume_ml,
            change_voxels=voxels - model_voxels, change_ml=(voxels - model_voxels) * geometry.voxel_volume_ml,
            dice_vs_model=dice(corrected, model > 0))
    state = ReviewState(revision=1 + (correction is not None), decision=decision, reviewer=REVIEWER,
                        decided_at=SAVED_AT if decision else None, correction=correction)
    report.review = state.as_dict()
    write_report(report, case_dir / REPORT_FILENAME)
    return state
