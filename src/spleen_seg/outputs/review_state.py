"""A case's review: the reviewer's decision and correction, as recorded beside the model's outputs.

The review app (``spleen-seg review``) writes them; the batch's summary, the cohort page and
``spleen-seg corrections export`` read them. One case's review lives in its ``report.json``
under ``"review"`` (``CaseReport.review``), so the report stays the one file that describes a
case; the corrected mask is ``spleen_corrected.nii.gz`` beside the model's ``spleen.nii.gz``,
which is never overwritten; every decision and save is also a line of the output folder's
append-only ``review_audit.jsonl``.

``review`` in ``report.json``::

    {"revision": 3,                       # +1 per decision or save: a save names the revision it
                                          # started from, and a stale one is a conflict
     "decision": "accepted" | "rejected" | null,
     "comment": "...", "reviewer": "...", "decided_at": "2026-12-02T17:15:13Z" | null,
     "correction": null | {
        "file": "spleen_corrected.nii.gz", "seg_file": "spleen_corrected_seg.dcm" | null,
        "sha256": "<corrected mask file>", "model_mask_sha256": "<spleen.nii.gz>",
        "saved_at": "...", "reviewer": "...",
        "voxels": 51234, "volume_ml": 201.4,
        "change_voxels": 812, "change_ml": 3.2,   # corrected minus model
        "dice_vs_model": 0.981}}

A case's state for the summary and the page (:func:`review_status`): ``corrected`` when a
correction is saved (whatever the decision), else ``accepted`` or ``rejected``, else empty
(not reviewed). ``corrections export`` takes the corrected mask of every corrected case and
the model's mask of every accepted one; a rejected case without a correction is left out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

REVIEW_KEY = "review"
CORRECTED_MASK_FILENAME = "spleen_corrected.nii.gz"
CORRECTED_SEG_FILENAME = "spleen_corrected_seg.dcm"
AUDIT_LOG_FILENAME = "review_audit.jsonl"
# A corrected mask, its CT and the viewer's grids are on one grid when their affines agree to this (mm):
# NIfTI stores the sform as float32.
AFFINE_TOLERANCE_MM = 1e-3
DECISIONS = ("accepted", "rejected")
STATUS_CORRECTED = "corrected"
STATUS_UNREVIEWED = ""


@dataclass(frozen=True)
class Correction:
    """A saved correction of the model's mask (see the module docstring for the fields)."""

    file: str
    sha256: str
    model_mask_sha256: str
    saved_at: str
    reviewer: str
    voxels: int
    volume_ml: float
    change_voxels: int
    change_ml: float
    dice_vs_model: float
    seg_file: str | None = None


@dataclass(frozen=True)
class ReviewState:
    """A case's review as ``report.json`` holds it; ``ReviewState()`` is a case not reviewed yet."""

    revision: int = 0
    decision: str | None = None
    comment: str = ""
    reviewer: str = ""
    decided_at: str | None = None
    correction: Correction | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def review_from_dict(data: dict[str, Any] | None) -> ReviewState:
    """The ``review`` object of a report (None or absent: not reviewed).

    Raises ``ValueError`` naming the field when the object is not one this module wrote.
    """
    if data is None:
        return ReviewState()
    if not isinstance(data, dict):
        raise ValueError(f"review record is a {type(data).__name__}, not an object")
    decision = data.get("decision")
    if decision is not None and decision not in DECISIONS:
        raise ValueError(f"review decision {decision!r} is not one of {', '.join(DECISIONS)}")
    correction = data.get("correction")
    try:
        return ReviewState(
            revision=int(data.get("revision", 0)),
            decision=decision,
            comment=str(data.get("comment", "")),
            reviewer=str(data.get("reviewer", "")),
            decided_at=data.get("decided_at"),
            correction=Correction(**correction) if correction is not None else None,
        )
    except TypeError as err:
        raise ValueError(f"review correction record: {err}") from None


def review_status(review: ReviewState | dict[str, Any] | None) -> str:
    """``corrected``, ``accepted``, ``rejected`` or ``""`` (not reviewed), for the summary and the page."""
    state = review if isinstance(review, ReviewState) else review_from_dict(review)
    if state.correction is not None:
        return STATUS_CORRECTED
    return state.decision or STATUS_UNREVIEWED


def exported_label(review: ReviewState) -> str | None:
    """Which mask ``corrections export`` takes as the case's label: ``"corrected"``, ``"model"`` or None."""
    if review.correction is not None:
        return "corrected"
    if review.decision == "accepted":
        return "model"
    return None
