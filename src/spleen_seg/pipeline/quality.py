"""A per-case quality score: how much of the mask the network was unsure about, and whether to review it.

Both scores are fractions (0 = sure everywhere, 1 = unsure everywhere) of the voxels of the
preprocessed (1.5 x 1.5 x 2 mm) grid where a mask error would show: the predicted spleen
and its one-voxel shell (6-connected dilation), the *region*.

* Without TTA (``method = "margin"``): the fraction of the region whose margin
  ``logit(spleen) - logit(background)`` is within ``MARGIN_THRESHOLD`` of 0, i.e. where
  the spleen probability lies between 1/(1+e^2) = 0.12 and 0.88. The region is where the
  margin is positive, dilated.
* With flip TTA (``method = "flips_and_margin"``): the fraction of the region where the
  mirrored predictions do not all agree (some call the voxel spleen, some do not), or where
  their mean margin is within ``MARGIN_THRESHOLD`` of 0. The region is where any of them
  is positive, dilated, so a blob only some mirror images see counts against the case too.
  Disagreement alone misses the failures on which every mirror image is wrong alike (a
  scan drowned in noise, a wrong HU offset): on the calibration phantoms its ROC AUC was
  0.79, against 0.90 with the margin added (benchmarks/README.md). ``disagreeing_voxels``
  keeps the disagreement alone.

An empty mask (no region) scores 1.0: the report already says the spleen was not found,
and a scan that should show a spleen but gives none deserves a look.

``review_suggested`` is set when the score exceeds the method's threshold. The thresholds
and ``MARGIN_THRESHOLD`` were chosen on 40 calibration phantoms (half degraded: strong
noise, streaks, truncated field of view, wrong HU offset, motion blur) and checked on 40
others, with the packaged demo weights: ``benchmarks/bench_quality.py``, figures in
``benchmarks/README.md`` (evaluation ROC AUC for Dice < 0.9: 0.997 without TTA, 0.915 with).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from spleen_seg.pipeline.tta import FlipAgreement

METHOD_MARGIN = "margin"
METHOD_FLIPS = "flips_and_margin"
# |margin| below this (logits) counts as unsure: spleen probability between 0.12 and 0.88.
MARGIN_THRESHOLD = 2.0
# Scores above these suggest a review: Youden's optimum on the calibration phantoms (see the
# module docstring), the TTA one with --tta-axes z (2 predictions; with xyz the demo weights
# break the masks, see benchmarks/README.md).
REVIEW_THRESHOLD = {METHOD_MARGIN: 0.153, METHOD_FLIPS: 0.327}
EMPTY_SCORE = 1.0


@dataclass(frozen=True)
class QualityScore:
    """The quality score of one case (see the module docstring); ``as_dict`` goes into report.json."""

    score: float
    method: str
    review_threshold: float
    review_suggested: bool
    region_voxels: int  # voxels of the preprocessed grid the score is a fraction of
    unsure_voxels: int
    margin_threshold: float | None = None
    predictions: int | None = None  # with TTA: the mirrored predictions compared
    disagreeing_voxels: int | None = None  # with TTA: the region's voxels where they disagree

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "score": round(self.score, 4)}


def _region(positive: np.ndarray) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """The box of ``positive`` grown by one voxel, and the dilated ``positive`` inside it; None when empty."""
    boxes = ndimage.find_objects(positive.view(np.uint8))
    if not boxes or boxes[0] is None:
        return None
    box = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(boxes[0], positive.shape, strict=True))
    return box, ndimage.binary_dilation(positive[box])


def _score(method: str, region_voxels: int, unsure_voxels: int, **details: Any) -> QualityScore:
    score = unsure_voxels / region_voxels if region_voxels else EMPTY_SCORE
    threshold = REVIEW_THRESHOLD[method]
    return QualityScore(score=float(score), method=method, review_threshold=threshold,
                        review_suggested=bool(score > threshold), region_voxels=int(region_voxels),
                        unsure_voxels=int(unsure_voxels), **details)


def quality_score(margin: np.ndarray, agreement: FlipAgreement | None = None) -> QualityScore:
    """The case's score from its margin (float32 (X, Y, Z), preprocessed grid) and, with TTA,
    the mirrored predictions' agreement on the same grid (see the module docstring)."""
    if agreement is None:
        found = _region(margin > 0)
        if found is None:
            return _score(METHOD_MARGIN, 0, 0, margin_threshold=MARGIN_THRESHOLD)
        box, region = found
        unsure = np.abs(margin[box][region]) < MARGIN_THRESHOLD
        return _score(METHOD_MARGIN, int(region.sum()), int(unsure.sum()), margin_threshold=MARGIN_THRESHOLD)
    count = agreement.positive_count
    details = {"margin_threshold": MARGIN_THRESHOLD, "predictions": agreement.predictions}
    found = _region(count > 0)
    if found is None:
        return _score(METHOD_FLIPS, 0, 0, disagreeing_voxels=0, **details)
    box, region = found
    inside = count[box][region]
    disagree = (inside > 0) & (inside < agreement.predictions)
    unsure = disagree | (np.abs(margin[box][region]) < MARGIN_THRESHOLD)
    return _score(METHOD_FLIPS, int(region.sum()), int(unsure.sum()), disagreeing_voxels=int(disagree.sum()),
                  **details)
