"""batch.ownership: a batch replaces or removes only what spleen-seg wrote, and never a review.

A threshold stands in for the network (as in test_resume.py). Every folder or file that is not
the batch's own is compared byte for byte (every path, every file's sha256, every link's target)
before and after the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from file_tree import tree
from threshold_network import THRESHOLD_HU, ThresholdSegmenter, run_batch, sphere

from spleen_seg.batch.case import SegmentOptions, segment_one
from spleen_seg.batch.inputs import Part
from spleen_seg.batch.ownership import MARKER_FILENAME, new_work_folder
from spleen_seg.batch.summary import SUMMARY_COLUMNS, LiveSummary, SummaryRow, merge_summaries, read_summary
from spleen_seg.errors import ForeignOutputError
from spleen_seg.outputs.review_state import CORRECTED_MASK_FILENAME, ReviewState

NO_PREVIEW = SegmentOptions(preview=False)
CASES = ("a", "b", "c")
NOT_OURS = "exists and was not written by spleen-seg; it is left as it is: move it away, or choose another output folder (-o)"
REVIEW_ADVICE = ("a batch never replaces or removes a review: write to another output folder (-o), or move the review "
                 "away to compute this case again")
# The header of the first summary.csv (spleen-seg before the reused, components and quality columns).
OLDEST_SUMMARY_HEADER = ("case,source,status,volume_ml,extent_left_right_mm,extent_anterior_posterior_mm,"
                         "extent_superior_inferior_mm,flags,error\n")


run = run_batch


def user_folder(folder: Path) -> dict[str, str]:
    """A folder of someone's files (nested, one of them a NIfTI like ours), and its tree."""
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes\n")
    sphere(folder / "sub" / "labels.nii.gz", 3)
    return tree(folder)


def add_review(case_dir: Path) -> None:
    report = json.loads((case_dir / "report.json").read_text())
    report["review"] = ReviewState(revision=1, decision="accepted", reviewer="dr x").as_dict()
    (case_dir / "report.json").write_text(json.dumps(report, indent=2))


def dead_pid() -> int:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(finished.stdout)


# ----------------------------------------------------------------------------- case folders


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_not_written_by_spleen_seg_fails_its_case_and_stays_byte_for_byte(batch, network, overwrite):
    before = user_folder(batch.out / "b")
    batch.inputs[2].unlink()  # c fails for its input, beside someone's folder named c
    before_c = user_folder(batch.out / "c")
    lines = []
    results = run(batch, overwrite=overwrite, on_result=lines.append)
    assert [(r.case, r.status) for r in results] == [("a", "ok"), ("b", "failed"), ("c", "failed")]
    assert network.calls == ["a.nii.gz"]  # b and c were refused before computing
    for result, folder in ((results[1], batch.out / "b"), (results[2], batch.out / "c")):
        assert result.error == f"{result.source}: output folder {folder} {NOT_OURS} (ForeignOutputError)"
    assert tree(batch.out / "b") == before and tree(batch.out / "c") == before_c
    rows = read_summary(batch.out / "summary.csv")
    assert [(row["case"], row["status"], row["error"]) for row in rows[1:]] == [
        ("b", "failed", results[1].error), ("c", "failed", results[2].error)]
    assert [r.case for r in lines] == ["b", "c", "a"]  # refused before any case is computed, as skips are


def test_a_folder_that_appears_while_the_case_runs_is_not_replaced(tmp_path):
    """The node's path (segment_one) and a folder made after the batch's check: the publish refuses it."""
    source = sphere(tmp_path / "x.nii.gz", 5)
    before = user_folder(tmp_path / "out" / "x")
    result = segment_one(ThresholdSegmenter(THRESHOLD_HU), source, tmp_path / "out", options=NO_PREVIEW)
    assert result.status == "failed"
    assert result.error == f"{source}: output folder {tmp_path / 'out' / 'x'} {NOT_OURS} (ForeignOutputError)"
    assert tree(tmp_path / "out" / "x") == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x"]  # no work folder left


def test_someone_elses_folder_at_the_work_folders_place_is_not_removed(tmp_path):
    source = sphere(tmp_path / "x.nii.gz", 5)
    work = tmp_path / "out" / f".x.partial-{os.getpid()}"
    before = user_folder(work)
    result = segment_one(ThresholdSegmenter(THRESHOLD_HU), source, tmp_path / "out", options=NO_PREVIEW)
    assert result.status == "failed" and f"output folder {work} {NOT_OURS}" in (result.error or "")
    assert tree(work) == before and not (tmp_path / "out" / "x").exists()


def test_a_file_or_a_link_at_a_cases_place_is_left_alone(batch, network, tmp_path):
    batch.out.mkdir()
    (batch.out / "a").write_bytes(b"someone's file named a")
    target = tmp_path / "their-data"
    before_target = user_folder(target)
    (batch.out / "b").symlink_to(target, target_is_directory=True)
    results = run(batch, overwrite=True)
    assert [r.status for r in results] == ["failed", "failed", "ok"]
    assert f"{batch.out / 'a'} exists where the case's output folder goes and is not a folder" in (results[0].error or "")
    assert f"output folder {batch.out / 'b'} is a symbolic link" in (results[1].error or "")
    assert (batch.out / "a").read_bytes() == b"someone's file named a"
    assert os.readlink(batch.out / "b") == str(target) and tree(target) == before_target


def test_a_case_folder_of_an_earlier_version_is_resumed_and_replaced(batch, network):
    """Written before the marker: a readable report.json whose outputs are there makes it ours."""
    run(batch)
    for case in CASES:
        (batch.out / case / MARKER_FILENAME).unlink()
    network.calls.clear()
    assert all(r.reused for r in run(batch)) and network.calls == []
    results = run(batch, overwrite=True)
    assert [r.status for r in results] == ["ok"] * 3 and len(network.calls) == 3
    assert all((batch.out / case / MARKER_FILENAME).is_file() for case in CASES)


def test_our_folder_of_a_case_that_fails_now_is_removed(batch, network):
    run(batch)
    batch.inputs[1].write_bytes(b"not a NIfTI any more")
    results = run(batch)
    assert [r.status for r in results] == ["ok", "failed", "ok"] and not (batch.out / "b").exists()


# ----------------------------------------------------------------------------- reviews


def test_a_reviewed_case_is_skipped_when_unchanged_and_never_replaced_or_removed(batch, network):
    run(batch)
    add_review(batch.out / "a")
    (batch.out / "b" / CORRECTED_MASK_FILENAME).write_bytes(b"a reviewer's corrected mask")
    before = {case: tree(batch.out / case) for case in ("a", "b")}
    network.calls.clear()
    assert [r.reused for r in run(batch)] == [True, True, True] and network.calls == []

    for change in ("overwrite", "option", "input"):
        kwargs = {"overwrite": True} if change == "overwrite" else {}
        if change == "option":
            kwargs["options"] = SegmentOptions(preview=False, largest_component=True)
        if change == "input":
            batch.inputs[0].unlink()
            batch.inputs[1].unlink()
        results = run(batch, **kwargs)
        assert [r.status for r in results] == ["failed", "failed", "ok"], change
        assert results[0].error == (f"{results[0].source}: output folder {batch.out / 'a'} holds a review (a review "
                                    f"record in report.json); {REVIEW_ADVICE} (ForeignOutputError)")
        assert results[1].error == (f"{results[1].source}: output folder {batch.out / 'b'} holds a review "
                                    f"({CORRECTED_MASK_FILENAME}); {REVIEW_ADVICE} (ForeignOutputError)")
        assert {case: tree(batch.out / case) for case in ("a", "b")} == before, change
    assert "a.nii.gz" not in network.calls and "b.nii.gz" not in network.calls


# ----------------------------------------------------------------------------- work folders


def test_only_recognised_work_folders_of_killed_runs_are_removed(batch, network, caplog):
    pid = dead_pid()
    batch.out.mkdir()
    ours = batch.out / f".a.partial-{pid}"
    new_work_folder(ours)
    (ours / "spleen.nii.gz").write_bytes(b"half written")
    empty = batch.out / f".b.partial-{pid}"
    empty.mkdir()  # killed as it was created
    theirs = batch.out / f".c.partial-{pid}"
    before_theirs = user_folder(theirs)
    reviewed = batch.out / f".b.old-{pid}"
    new_work_folder(reviewed)
    (reviewed / CORRECTED_MASK_FILENAME).write_bytes(b"corrected")
    before_reviewed = tree(reviewed)
    run(batch)
    assert not ours.exists() and not empty.exists()
    assert tree(theirs) == before_theirs and tree(reviewed) == before_reviewed
    kept = [record.getMessage() for record in caplog.records if record.getMessage().startswith("left ")]
    assert len(kept) == 2 and any(f"{theirs}" in line and NOT_OURS in line for line in kept)
    assert any("holds a review" in line for line in kept)


# ----------------------------------------------------------------------------- run-level files


FOREIGN_FILES = {
    "summary.csv": ("patient,age\n1,54\n", "a summary"),
    "index.html": ("<!DOCTYPE html>\n<html><body>my own page</body></html>\n", "a cohort page"),
    "run_info.json": ('{"my": "settings"}\n', "a run_info.json"),
    "summary.journal.csv": ("my journal\n", "a summary journal"),
    "summary.part-0-of-2.csv": ("id,value\n", "a part's summary"),
    "summary.part-1-of-2.journal.csv": ("id\n1\n", "a part's summary journal"),
    "summary.part-1-of-2.done": ('{"status": "done by me"}\n', "a part's .done mark"),
}


@pytest.mark.parametrize("name", sorted(FOREIGN_FILES))
def test_a_run_level_file_that_is_not_ours_refuses_the_run_before_anything_is_written(batch, network, name):
    content, what = FOREIGN_FILES[name]
    batch.out.mkdir()
    (batch.out / name).write_text(content)
    with pytest.raises(ForeignOutputError) as refused:
        run(batch)
    assert str(refused.value) == f"{batch.out / name} exists and is not {what} spleen-seg wrote; it is left as it " \
                                 "is: move it away, or choose another output folder (-o)"
    assert network.loads == 0 and sorted(p.name for p in batch.out.iterdir()) == [name]
    assert (batch.out / name).read_text() == content


def test_a_link_in_place_of_the_summary_is_refused(batch, network, tmp_path):
    ours = tmp_path / "elsewhere.csv"
    ours.write_text(",".join(SUMMARY_COLUMNS) + "\n")
    batch.out.mkdir()
    (batch.out / "summary.csv").symlink_to(ours)
    with pytest.raises(ForeignOutputError, match="is not a summary spleen-seg wrote"):
        run(batch)
    assert (batch.out / "summary.csv").is_symlink() and ours.read_text() == ",".join(SUMMARY_COLUMNS) + "\n"


def test_run_level_files_of_earlier_runs_and_versions_are_replaced(batch, network):
    batch.out.mkdir()
    (batch.out / "summary.csv").write_text(OLDEST_SUMMARY_HEADER + "old,row,ok,1,1,1,1,,\n")
    (batch.out / "summary.journal.csv").write_bytes(b"")  # a run killed as it opened its journal
    results = run(batch)
    assert [r.status for r in results] == ["ok"] * 3
    assert [row["case"] for row in read_summary(batch.out / "summary.csv")] == list(CASES)
    run(batch, overwrite=True)  # run_info.json, index.html and summary.csv of the run before
    assert sorted(p.name for p in batch.out.iterdir()) == [*CASES, "index.html", "run_info.json", "summary.csv"]


def test_merging_and_parts_never_write_over_a_file_that_is_not_ours(tmp_path):
    (tmp_path / "summary.csv").write_text("patient,age\n")
    with pytest.raises(ForeignOutputError, match="summary.csv exists and is not a summary spleen-seg wrote"):
        merge_summaries(tmp_path)
    assert (tmp_path / "summary.csv").read_text() == "patient,age\n"
    (tmp_path / "summary.csv").unlink()
    (tmp_path / "summary.part-0-of-1.done").write_text("my notes\n")
    live = LiveSummary(tmp_path / "summary.csv", part=Part(0, 1), total=1)
    with pytest.raises(ForeignOutputError, match=r"summary\.part-0-of-1\.done exists and is not a part's \.done mark"):
        live.record(0, SummaryRow(case="a", source="a.nii.gz", status="failed"))
    assert (tmp_path / "summary.part-0-of-1.done").read_text() == "my notes\n"
    (tmp_path / "summary.part-0-of-1.done").unlink()
    (tmp_path / "summary.journal.csv").write_text("my journal\n")
    with pytest.raises(ForeignOutputError, match=r"summary\.journal\.csv exists and is not a summary journal"):
        LiveSummary(tmp_path / "summary.csv", total=1).write()
    assert (tmp_path / "summary.journal.csv").read_text() == "my journal\n"
