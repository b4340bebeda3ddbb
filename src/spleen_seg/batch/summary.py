"""The batch's ``summary.csv``: one row per case finished so far, rewritten atomically after each."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from spleen_seg.io.atomic import atomic_write_text
from spleen_seg.outputs.report import AXIS_NAMES, CaseReport

SUMMARY_FILENAME = "summary.csv"
SUMMARY_COLUMNS = ("case", "source", "status", "volume_ml", "extent_left_right_mm", "extent_anterior_posterior_mm",
                   "extent_superior_inferior_mm", "flags", "error", "reused")


@dataclass(frozen=True)
class SummaryRow:
    """One ``summary.csv`` line.

    ``status`` is ok, not_found (empty mask), failed, or interrupted (Ctrl-C); ``reused``
    marks a case an earlier run finished (resume), whose values come from its report.json.
    """

    case: str
    source: str
    status: str
    report: CaseReport | None = None
    error: str = ""
    reused: bool = False

    def values(self) -> list[str]:
        extents = self.report.extents_mm if self.report is not None else None
        volume = f"{self.report.volume_ml:.3f}" if self.report is not None else ""
        flags = ";".join(self.report.flags) if self.report is not None else ""
        spans = [f"{extents[name]:.2f}" if extents else "" for name in AXIS_NAMES]
        return [self.case, self.source, self.status, volume, *spans, flags, self.error, "yes" if self.reused else "no"]


def write_summary(rows: list[SummaryRow], dest: Path) -> Path:
    """Write ``summary.csv``: a header and one row per input, in input order."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SUMMARY_COLUMNS)
    for row in rows:
        writer.writerow(row.values())
    atomic_write_text(dest, buffer.getvalue())
    return dest


class LiveSummary:
    """``summary.csv`` of a batch in progress: rows of the cases finished so far, in input order.

    Rewritten atomically after every case, so a batch killed at any point leaves a correct
    summary of what it finished; cases not reached yet have no row.
    """

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self._rows: dict[int, SummaryRow] = {}

    def record(self, index: int, row: SummaryRow, *, write: bool = True) -> None:
        """Set the row of input number ``index``; ``write=False`` defers the rewrite to :meth:`write`."""
        self._rows[index] = row
        if write:
            self.write()

    def write(self) -> Path:
        return write_summary([self._rows[index] for index in sorted(self._rows)], self.dest)
