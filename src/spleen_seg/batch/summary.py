"""The batch's ``summary.csv``: one row per input, rewritten atomically."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from spleen_seg.io.atomic import atomic_write_text
from spleen_seg.outputs.report import AXIS_NAMES, CaseReport

SUMMARY_FILENAME = "summary.csv"
SUMMARY_COLUMNS = ("case", "source", "status", "volume_ml", "extent_left_right_mm", "extent_anterior_posterior_mm",
                   "extent_superior_inferior_mm", "flags", "error")


@dataclass(frozen=True)
class SummaryRow:
    """One ``summary.csv`` line: status is ok, not_found (empty mask) or failed."""

    case: str
    source: str
    status: str
    report: CaseReport | None = None
    error: str = ""

    def values(self) -> list[str]:
        extents = self.report.extents_mm if self.report is not None else None
        volume = f"{self.report.volume_ml:.3f}" if self.report is not None else ""
        flags = ";".join(self.report.flags) if self.report is not None else ""
        spans = [f"{extents[name]:.2f}" if extents else "" for name in AXIS_NAMES]
        return [self.case, self.source, self.status, volume, *spans, flags, self.error]


def write_summary(rows: list[SummaryRow], dest: Path) -> Path:
    """Write ``summary.csv``: a header and one row per input, in input order."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SUMMARY_COLUMNS)
    for row in rows:
        writer.writerow(row.values())
    atomic_write_text(dest, buffer.getvalue())
    return dest
