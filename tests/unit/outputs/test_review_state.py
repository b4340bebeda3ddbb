"""The review record's contract: what the summary, the page and the export read from a report."""

import json

import pytest

from spleen_seg.outputs.review_state import (
    Correction,
    ReviewState,
    exported_label,
    review_from_dict,
    review_status,
)

CORRECTION = Correction(file="spleen_corrected.nii.gz", sha256="a" * 64, model_mask_sha256="b" * 64,
                        saved_at="2026-12-02T17:00:00Z", reviewer="rr", voxels=120, volume_ml=1.5,
                        change_voxels=-8, change_ml=-0.1, dice_vs_model=0.97)


def test_a_review_round_trips_through_json():
    state = ReviewState(revision=2, decision="rejected", comment="misses the hilum", reviewer="rr",
                        decided_at="2026-12-02T17:01:00Z", correction=CORRECTION)
    assert review_from_dict(json.loads(json.dumps(state.as_dict()))) == state


@pytest.mark.parametrize(("state", "status", "label"), [
    (ReviewState(), "", None),
    (ReviewState(revision=1, decision="accepted"), "accepted", "model"),
    (ReviewState(revision=1, decision="rejected"), "rejected", None),
    (ReviewState(revision=2, decision="rejected", correction=CORRECTION), "corrected", "corrected"),
    (ReviewState(revision=1, correction=CORRECTION), "corrected", "corrected"),
])
def test_status_and_exported_label_follow_decision_and_correction(state, status, label):
    assert review_status(state) == status
    assert review_status(state.as_dict()) == status
    assert exported_label(state) == label


def test_a_missing_review_is_not_reviewed():
    assert review_from_dict(None) == ReviewState()
    assert review_status(None) == ""


@pytest.mark.parametrize(("record", "word"), [
    ({"decision": "maybe"}, "decision"),
    ({"correction": {"file": "x"}}, "correction"),
    ([1, 2], "list"),
])
def test_a_record_this_module_did_not_write_is_refused_by_name(record, word):
    with pytest.raises(ValueError, match=word):
        review_from_dict(record)
