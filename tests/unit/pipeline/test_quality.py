"""The quality score: fractions counted by hand on built margins and flip counts, and the review flag."""

from __future__ import annotations

import numpy as np
import pytest

from spleen_seg.pipeline.quality import (
    MARGIN_THRESHOLD,
    METHOD_FLIPS,
    METHOD_MARGIN,
    REVIEW_THRESHOLD,
    quality_score,
)
from spleen_seg.pipeline.tta import FlipAgreement

SHAPE = (30, 30, 30)
CUBE = (slice(10, 20),) * 3  # 1,000 voxels; its 6-connected one-voxel shell adds 6 x 100


def test_margin_score_counts_unsure_voxels_of_the_mask_and_its_shell():
    margin = np.full(SHAPE, -5.0, dtype=np.float32)
    margin[CUBE] = 5.0
    sure = quality_score(margin)
    assert sure.method == METHOD_MARGIN and sure.margin_threshold == MARGIN_THRESHOLD
    assert (sure.region_voxels, sure.unsure_voxels, sure.score) == (1600, 0, 0.0)
    assert not sure.review_suggested
    margin[CUBE] = MARGIN_THRESHOLD / 2  # the whole cube barely positive
    margin[11:19, 11:19, 11:19] = 5.0  # ... except its 8^3 core: 1,000 - 512 = 488 unsure
    margin[9, 10:20, 10:20] = -MARGIN_THRESHOLD / 2  # one face of the shell barely negative: 100 more
    unsure = quality_score(margin)
    assert (unsure.region_voxels, unsure.unsure_voxels) == (1600, 588)
    assert unsure.score == pytest.approx(588 / 1600)
    assert unsure.review_suggested and REVIEW_THRESHOLD[METHOD_MARGIN] < unsure.score
    assert unsure.as_dict()["score"] == round(588 / 1600, 4)


def test_an_empty_mask_scores_one_and_asks_for_review():
    score = quality_score(np.full(SHAPE, -3.0, dtype=np.float32))
    assert (score.score, score.region_voxels, score.review_suggested) == (1.0, 0, True)
    counts = FlipAgreement(positive_count=np.zeros(SHAPE, dtype=np.uint8), predictions=8)
    assert quality_score(np.full(SHAPE, -3.0, dtype=np.float32), counts).score == 1.0


def test_flip_score_counts_disagreement_and_unsure_mean_margins():
    counts = np.zeros(SHAPE, dtype=np.uint8)
    counts[CUBE] = 8  # all eight agree on the cube
    counts[20, 10:20, 10:20] = 3  # three of eight see one more layer: disagreement, inside the region
    margin = np.where(counts >= 4, 6.0, -6.0).astype(np.float32)  # a sure mean margin everywhere ...
    margin[10, 10:20, 10:20] = 1.0  # ... but on one face of the cube, where all eight agree
    score = quality_score(margin, FlipAgreement(positive_count=counts, predictions=8))
    assert score.method == METHOD_FLIPS and score.predictions == 8
    # Region: the 10 x 10 x 11 block seen by any prediction, dilated by one voxel.
    assert score.region_voxels == 1100 + 2 * 110 + 2 * 110 + 2 * 100
    assert score.disagreeing_voxels == 100 and score.unsure_voxels == 200
    assert score.score == pytest.approx(200 / 1740)
    counts[CUBE] = 4  # half of them see the cube: all of it is disputed
    disputed = quality_score(margin, FlipAgreement(counts, 8))
    assert disputed.disagreeing_voxels == 1100 and disputed.unsure_voxels == 1100
