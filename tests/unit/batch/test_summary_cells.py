"""summary.csv cells against spreadsheet formulas (OWASP CSV injection), and the round trip back.

A case id or path comes from a file name, which may start with ``=``, ``+``, ``-``, ``@``, a tab or
a carriage return: such a cell is written as OWASP describes (a single quote before it, the cell
quoted), and everything that reads the summary back (the journal, the merge of parts,
merge-summaries, the cohort page) gets the original text.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

from spleen_seg.batch.inputs import Part
from spleen_seg.batch.summary import (
    SUMMARY_FILENAME,
    LiveSummary,
    SummaryRow,
    merge_summaries,
    read_summary,
    write_summary,
)

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
CASES = ["=1+2", '=HYPERLINK("http://x","y")', "+41 cmd", "-2+3", "@SUM(A1:A2)", "\t=1", "\r=1",
         "'already quoted", "'=1", "plain", 'comma, and "quotes"']


def rows(cases: list[str]) -> list[SummaryRow]:
    return [SummaryRow(case=case, source=f"{case}.nii.gz", status="failed", error=f"{case}.nii.gz: file not found")
            for case in cases]


def cells(path: Path) -> list[list[str]]:
    """The cells as a spreadsheet's CSV import sees them (before it evaluates anything)."""
    return list(csv.reader(io.StringIO(path.read_bytes().decode("utf-8"), newline="")))[1:]


def assert_neutralised(path: Path, cases: list[str]) -> None:
    table = cells(path)
    assert len(table) == len(cases)
    for cell in (cell for row in table for cell in row):
        assert not cell.startswith(FORMULA_STARTS), cell
    by_case = {row[0]: row for row in table}
    for case in cases:
        written = "'" + case if case.startswith((*FORMULA_STARTS, "'")) else case
        assert by_case[written][1] == ("'" if written != case else "") + f"{case}.nii.gz"
    text = path.read_bytes().decode("utf-8")
    assert "\n\"'=1+2\",\"'=1+2.nii.gz\",\"failed\"," in text  # OWASP's form: quote before, cell quoted
    assert "\nplain,plain.nii.gz,failed," in text  # other rows as before


def test_formula_cells_are_neutralised_and_read_back_as_written(tmp_path):
    dest = write_summary(rows(CASES), tmp_path / SUMMARY_FILENAME)
    assert_neutralised(dest, CASES)
    back = read_summary(dest)
    assert [(row["case"], row["source"], row["error"]) for row in back] == [
        (case, f"{case}.nii.gz", f"{case}.nii.gz: file not found") for case in CASES]


def test_journal_parts_merge_and_page_give_back_the_original_text(tmp_path):
    halves = [CASES[0::2], CASES[1::2]]
    for index, part_cases in enumerate(halves):
        live = LiveSummary(tmp_path / SUMMARY_FILENAME, part=Part(index, 2), total=len(part_cases))
        for number, row in enumerate(rows(part_cases)):
            live.record(number, row)
    merged = tmp_path / SUMMARY_FILENAME
    assert_neutralised(merged, CASES)  # neutralised once: a merge writes the original text again
    assert sorted(row["case"] for row in read_summary(merged)) == sorted(CASES)
    page = (tmp_path / "index.html").read_text(encoding="utf-8")
    data = json.loads(re.search(r'<script type="application/json" id="cohort-data">(.*?)</script>', page, re.S)[1])
    assert sorted(row[0] for row in data["rows"]) == sorted(CASES)

    # A killed part: its rows only in its journal; merge-summaries folds them in, once neutralised.
    journal = tmp_path / "summary.part-1-of-2.journal.csv"
    (tmp_path / "summary.part-1-of-2.csv").rename(journal)
    (tmp_path / "summary.part-1-of-2.done").unlink()
    result = merge_summaries(tmp_path)
    assert sorted(row["case"] for row in result.rows) == sorted(CASES) and result.journal_rows == len(halves[1])
    assert_neutralised(merged, CASES)
    assert [row["case"] for row in read_summary(journal)] == halves[1]
