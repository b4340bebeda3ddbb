"""summary.csv's last column, ``review``: the reviewer's verdict taken from report.json, so a resumed batch keeps it."""

from __future__ import annotations

import logging

from review_outputs import CaseSpec, make_batch

from spleen_seg.batch.summary import SUMMARY_COLUMNS, SUMMARY_FILENAME, SummaryRow, read_summary
from spleen_seg.outputs.cohort import CaseFiles, page_data
from spleen_seg.outputs.report import REPORT_FILENAME, read_report
from spleen_seg.outputs.review_state import ReviewState


def test_the_review_column_is_last_and_comes_from_the_report(tmp_path):
    out = make_batch(tmp_path / "out", [CaseSpec("a")], tmp_path / "in")
    report = read_report(out / "a" / REPORT_FILENAME)
    assert SUMMARY_COLUMNS[-1] == "review"
    assert SummaryRow("a", "x", "ok", report=report).as_dict()["review"] == ""
    report.review = ReviewState(revision=1, decision="rejected").as_dict()
    assert SummaryRow("a", "x", "ok", report=report).as_dict()["review"] == "rejected"
    assert SummaryRow("b", "x", "failed", error="bad").as_dict()["review"] == ""


def test_a_review_record_we_did_not_write_leaves_the_cell_empty_with_a_warning(tmp_path, caplog):
    out = make_batch(tmp_path / "out", [CaseSpec("a")], tmp_path / "in")
    report = read_report(out / "a" / REPORT_FILENAME)
    report.review = {"decision": "maybe"}
    with caplog.at_level(logging.WARNING):
        assert SummaryRow("a", "x", "ok", report=report).as_dict()["review"] == ""
    assert "decision" in caplog.text


def test_a_summary_written_before_the_column_reads_as_not_reviewed(tmp_path):
    path = tmp_path / SUMMARY_FILENAME
    old_header = ",".join(SUMMARY_COLUMNS[:-1])
    path.write_text(f"{old_header}\na,/x,ok,1.0,1,1,1,1,0.1,no,,,no\n")
    (row,) = read_summary(path)
    assert row["review"] == "" and row["reused"] == "no"


def test_the_cohort_page_carries_the_review_state():
    data = page_data([{"case": "a", "status": "ok", "review": "corrected"}, {"case": "b", "status": "ok"}],
                     files=CaseFiles("t", "p", ()),
                     title="t", expected=None)
    assert [row[11] for row in data["rows"]] == ["corrected", ""]
