"""The review app's case index (batch, parts, node layouts; review order; no symlinks) and its store
(decisions, corrections, conflicts, the audit log, the summary), without a server."""

from __future__ import annotations

import gzip
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
from review_outputs import CaseSpec, make_batch

from spleen_seg.batch.ownership import MARKER_FILENAME
from spleen_seg.batch.summary import SUMMARY_FILENAME, read_summary, write_summary_rows
from spleen_seg.errors import ConfigError
from spleen_seg.outputs.review_state import AUDIT_LOG_FILENAME, CORRECTED_MASK_FILENAME
from spleen_seg.review.cases import case_file, load_index
from spleen_seg.review.store import PENDING_FILENAME, Conflict, ReviewRefused, ReviewStore, correction_record
from spleen_seg.review.viewgrid import plan_view, view_mask
from spleen_seg.review.views import inflate, read_drawing

SPECS = [CaseSpec("low", quality=0.05), CaseSpec("unscored"), CaseSpec("flagged", quality=0.02, review_suggested=True),
         CaseSpec("high", quality=0.4)]


@pytest.fixture
def batch(tmp_path):
    return make_batch(tmp_path / "out", SPECS, tmp_path / "inputs")


def test_cases_come_in_review_order(batch):
    index = load_index(batch)
    assert index.layout == "batch"
    assert index.order == ["flagged", "high", "low", "unscored"]  # suggested, then least sure first, unscored last
    assert index.neighbours("high") == ("flagged", "low")


def test_a_part_summary_and_a_journal_are_read_and_the_part_holding_a_case_is_known(batch):
    rows = read_summary(batch / SUMMARY_FILENAME)
    (batch / SUMMARY_FILENAME).unlink()
    write_summary_rows(rows[:2], batch / "summary.part-0-of-2.csv")
    write_summary_rows(rows[2:3], batch / "summary.part-1-of-2.csv")
    write_summary_rows(rows[3:], batch / "summary.part-1-of-2.journal.csv")  # a part killed before rewriting
    index = load_index(batch)
    assert sorted(index.entries) == sorted(spec.case for spec in SPECS)
    assert index.entries[rows[0]["case"]].part_summary == batch / "summary.part-0-of-2.csv"
    assert index.entries[rows[2]["case"]].part_summary == batch / "summary.part-1-of-2.csv"


def test_a_node_spool_is_listed_from_its_reports(batch, tmp_path):
    spool = tmp_path / "spool"
    (spool / "results").mkdir(parents=True)
    (spool / "jobs.sqlite").write_bytes(b"")
    shutil.copytree(batch / "high", spool / "results" / "job-000001")
    index = load_index(spool)
    assert index.layout == "node" and not index.writes_summary
    assert index.order == ["job-000001"]
    assert index.entries["job-000001"].row["quality_score"] == "0.4000"


def test_a_folder_that_is_not_an_output_folder_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no summary.csv"):
        load_index(tmp_path)


def test_case_files_are_known_names_and_never_symlinks(batch, tmp_path):
    index = load_index(batch)
    entry = index.get("low")
    assert case_file(entry, "report.json") == batch / "low" / "report.json"
    assert case_file(entry, "../summary.csv") is None and case_file(entry, "review_view_roi.nii.gz") is None
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"x")
    (batch / "low" / "preview.png").unlink()
    (batch / "low" / "preview.png").symlink_to(outside)
    assert case_file(entry, "preview.png") is None
    shutil.move(batch / "high", tmp_path / "high")
    (batch / "high").symlink_to(tmp_path / "high", target_is_directory=True)
    assert case_file(index.get("high"), "report.json") is None
    assert index.get("../low") is None and index.get(None) is None  # type: ignore[arg-type]


def test_a_decision_is_recorded_and_a_stale_revision_is_a_conflict(batch):
    index = load_index(batch)
    store = ReviewStore(index, "rr\x1b[31m")
    assert store.reviewer == "rr [31m"  # control characters never reach a log or a terminal
    state = store.decide(index.get("low"), "accepted", "fine", 0)
    assert (state.revision, state.decision, state.reviewer) == (1, "accepted", "rr [31m")
    with pytest.raises(Conflict):
        store.decide(index.get("low"), "rejected", "", 0)
    with pytest.raises(ReviewRefused, match="decision"):
        store.decide(index.get("low"), "maybe", "", 1)
    with pytest.raises(ReviewRefused, match="comment"):
        store.decide(index.get("low"), "rejected", "x" * 5000, 1)
    assert store.state(index.get("low")).review == state
    summary = {row["case"]: row["review"] for row in read_summary(batch / SUMMARY_FILENAME)}
    assert summary == {"low": "accepted", "unscored": "", "flagged": "", "high": ""}
    assert not (batch / "low" / PENDING_FILENAME).exists()


def test_a_correction_records_its_change_and_keeps_the_model_mask(batch):
    index = load_index(batch)
    store = ReviewStore(index, "rr")
    entry = index.get("high")
    model_bytes = (batch / "high" / "spleen.nii.gz").read_bytes()
    model = np.asarray(nib.load(batch / "high" / "spleen.nii.gz").dataobj)
    grown = model.copy()
    grown[0, 0, :4] = 1
    state = store.save_correction(entry, 0, lambda base: grown, None)
    record = state.correction
    assert (record.voxels, record.change_voxels) == (int(model.sum()) + 4, 4)
    assert record.dice_vs_model == pytest.approx(2 * model.sum() / (2 * model.sum() + 4), abs=1e-6)
    assert record.change_ml == pytest.approx(4 * 2.0 * 2.0 * 3.0 / 1000)
    assert np.array_equal(np.asarray(nib.load(batch / "high" / CORRECTED_MASK_FILENAME).dataobj), grown)
    assert (batch / "high" / "spleen.nii.gz").read_bytes() == model_bytes  # never overwritten
    with pytest.raises(ReviewRefused, match="changes no voxel"):
        store.save_correction(entry, 1, lambda base: base, None)  # the base is now the correction
    audit = [json.loads(line) for line in (batch / AUDIT_LOG_FILENAME).read_text().splitlines()]
    assert audit[-1]["corrected_mask_sha256"] == record.sha256 and audit[-1]["action"] == "corrected"


def test_two_empty_masks_agree():
    empty = np.zeros((3, 3, 3), np.uint8)
    assert correction_record(empty, empty, 1.0, sha256="", model_sha256="", reviewer="", seg_file=None).dice_vs_model == 1.0


def test_recovery_drops_a_change_whose_mask_was_never_placed_and_fixes_the_summary(batch):
    index = load_index(batch)
    store = ReviewStore(index, "rr")
    folder = batch / "low"
    (folder / PENDING_FILENAME).write_text(json.dumps({"review": {"revision": 1, "correction": {
        "file": CORRECTED_MASK_FILENAME, "sha256": "f" * 64, "model_mask_sha256": "0" * 64, "saved_at": "",
        "reviewer": "rr", "voxels": 1, "volume_ml": 0.0, "change_voxels": 0, "change_ml": 0.0, "dice_vs_model": 1.0}},
        "audit": {}}))
    (folder / ".report.json.abc.part.json").write_text("half")
    (folder / "keep.part").write_text("not ours")
    lines = store.recover(lambda entry: None)
    assert lines == ["low: dropped a change the server had not written when it stopped (nothing was saved)"]
    assert sorted(os.listdir(folder)) == sorted([MARKER_FILENAME, "keep.part", "preview.png", "preview_thumb.jpg", "report.json",
                                                 "spleen.nii.gz"])


def test_an_upload_is_checked_before_it_is_inflated_or_parsed(batch):
    index = load_index(batch)
    mask = np.asarray(nib.load(batch / "low" / "spleen.nii.gz").dataobj)
    grid = plan_view(mask, nib.load(batch / "low" / "spleen.nii.gz").affine, "roi", 10 ** 9)
    with pytest.raises(ReviewRefused, match="inflates"):
        inflate(gzip.compress(b"\0" * 10_000), 1000)
    good = nib.Nifti1Image(view_mask(mask, grid), grid.affine)
    assert np.array_equal(read_drawing(gzip.compress(good.to_bytes()), grid), view_mask(mask, grid))
    assert np.array_equal(read_drawing(good.to_bytes(), grid), view_mask(mask, grid))
    with pytest.raises(ReviewRefused, match="cut short"):
        read_drawing(gzip.compress(good.to_bytes())[:-20], grid)
    assert index.get("low") is not None


def test_a_decision_reaches_the_part_summary_holding_the_case_so_a_merge_keeps_it(batch):
    from spleen_seg.batch.summary import merge_summaries

    rows = read_summary(batch / SUMMARY_FILENAME)
    write_summary_rows(rows[:2], batch / "summary.part-0-of-2.csv")
    write_summary_rows(rows[2:], batch / "summary.part-1-of-2.csv")
    index = load_index(batch)
    case = rows[3]["case"]
    ReviewStore(index, "rr").decide(index.get(case), "rejected", "", 0)
    assert {r["case"]: r["review"] for r in read_summary(batch / "summary.part-1-of-2.csv")}[case] == "rejected"
    merged = merge_summaries(batch)  # after the array: rebuilt from the part summaries
    assert {r["case"]: r["review"] for r in merged.rows}[case] == "rejected"


def test_files_of_an_owner_only_case_folder_stay_owner_only(batch):
    folder = batch / "low"
    os.chmod(folder, 0o700)
    for path in folder.iterdir():
        os.chmod(path, 0o600)
    index = load_index(batch)
    store = ReviewStore(index, "rr")
    mask = np.asarray(nib.load(folder / "spleen.nii.gz").dataobj).copy()
    mask[0, 0, 0] = 1
    store.save_correction(index.get("low"), 0, lambda base: mask, None)
    assert {path.name: oct(path.stat().st_mode & 0o777) for path in folder.iterdir()
            if path.name in ("report.json", CORRECTED_MASK_FILENAME)} == {"report.json": "0o600",
                                                                          CORRECTED_MASK_FILENAME: "0o600"}
