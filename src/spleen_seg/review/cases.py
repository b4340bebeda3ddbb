"""The cases of an output folder as the review app lists them: where each case's files are, in review order.

An output folder is one of:

- a batch (``segment -o OUT``, ``--ray``, or the merged parts of ``--num-parts``): ``OUT/summary.csv``
  lists the cases, each in ``OUT/<case>/``; part summaries (``summary.part-I-of-K.csv``) and the
  journal of a run still going are read too, a newer row replacing an older one;
- a DICOM node's spool (``serve --spool OUT``: ``OUT/results/job-<id>/``) or its ``results``
  folder: no summary, so each case's row is built from its ``report.json``.

Case ids come from those files, not from requests: a request names a case id, and only an id
of this index maps to a folder, always a direct child of the case root that is a real
directory (not a symlink). Files inside a case folder are opened only by names the app knows
(:func:`case_files`), and never through a symlink.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from spleen_seg.batch.summary import (
    JOURNAL_SUFFIX,
    PART_FILE,
    SUMMARY_FILENAME,
    Row,
    SummaryRow,
    read_summary,
)
from spleen_seg.errors import ConfigError
from spleen_seg.outputs.preview import PREVIEW_FILENAME, THUMBNAIL_FILENAME
from spleen_seg.outputs.report import REPORT_FILENAME, read_report
from spleen_seg.outputs.review_state import CORRECTED_MASK_FILENAME, CORRECTED_SEG_FILENAME

LAYOUT_BATCH = "batch"
LAYOUT_NODE = "node"
NODE_RESULTS_DIR = "results"  # node/spool.py RESULTS_DIR
NODE_DB_FILENAME = "jobs.sqlite"  # node/spool.py DB_FILENAME
NODE_JOB_PREFIX = "job-"
# Statuses whose folder holds a mask to look at (failed and interrupted cases have none).
REVIEWABLE_STATUSES = ("ok", "not_found")
NOT_CASE_NAMES = ("", ".", "..")

logger = logging.getLogger(__name__)


@dataclass
class CaseEntry:
    """One case: its id, its folder, its summary row (column -> text) and the part summary holding it."""

    case: str
    folder: Path
    row: Row
    part_summary: Path | None = None

    @property
    def reviewable(self) -> bool:
        return self.row.get("status") in REVIEWABLE_STATUSES


@dataclass
class CaseIndex:
    """The cases of one output folder (``out_dir``); ``order`` lists the reviewable ones in review order."""

    out_dir: Path
    layout: str
    case_root: Path
    entries: dict[str, CaseEntry] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    positions: dict[str, int] = field(default_factory=dict)  # case id -> its place in ``order``

    @property
    def writes_summary(self) -> bool:
        """A batch's summary.csv and index.html are ours to rewrite; a node has neither."""
        return self.layout == LAYOUT_BATCH

    def rows(self) -> list[Row]:
        return [entry.row for entry in self.entries.values()]

    def get(self, case: str) -> CaseEntry | None:
        """The entry of ``case`` (any text a request carried), or None when it is not one of ours."""
        return self.entries.get(case) if isinstance(case, str) else None

    def neighbours(self, case: str) -> tuple[str | None, str | None]:
        """The previous and next case in review order (None at the ends or for a case not in it)."""
        at = self.positions.get(case)
        if at is None:
            return None, None
        return (self.order[at - 1] if at > 0 else None), (self.order[at + 1] if at + 1 < len(self.order) else None)


@functools.cache
def case_files() -> frozenset[str]:
    """The files of a case folder the app may read, by name; nothing else is served.

    A function, not a constant: ``batch.case`` (the model's file names) imports the pipeline,
    which the first page of a 10,000-case folder should not wait for.
    """
    from spleen_seg.batch.case import MASK_FILENAME, SEG_FILENAME

    return frozenset({MASK_FILENAME, SEG_FILENAME, REPORT_FILENAME, PREVIEW_FILENAME, THUMBNAIL_FILENAME,
                      CORRECTED_MASK_FILENAME, CORRECTED_SEG_FILENAME})


def _is_case_name(name: str) -> bool:
    return name not in NOT_CASE_NAMES and "/" not in name and "\\" not in name and "\0" not in name


def review_order(entries: Iterable[CaseEntry]) -> list[str]:
    """Case ids to review first to last: review suggested first, then by quality score (highest,
    i.e. least sure, first), cases without a score after those with one, then by case id."""

    def key(entry: CaseEntry) -> tuple[int, int, float, str]:
        try:
            score = float(entry.row.get("quality_score") or "nan")
        except ValueError:
            score = math.nan
        suggested = entry.row.get("review_suggested") == "yes"
        return (0 if suggested else 1, 1 if math.isnan(score) else 0, 0.0 if math.isnan(score) else -score, entry.case)

    return [entry.case for entry in sorted((e for e in entries if e.reviewable), key=key)]


def _batch_rows(out_dir: Path) -> tuple[list[Row], dict[str, Path]]:
    """Rows of summary.csv, updated by the part summaries and the journals beside it; which part holds a case."""
    rows = {row["case"]: row for row in read_summary(out_dir / SUMMARY_FILENAME)}
    holders: dict[str, Path] = {}
    for path in sorted(out_dir.glob("summary.*")):
        match = PART_FILE.match(path.name)
        if path.name == f"summary{JOURNAL_SUFFIX}" or (match is not None and match["kind"] != ".done"):
            for row in read_summary(path):
                rows[row["case"]] = row
                if match is not None and match["kind"] == ".csv":
                    holders[row["case"]] = path
    return list(rows.values()), holders


def _node_root(out_dir: Path) -> Path | None:
    """The folder of a node's result folders: ``OUT/results`` of a spool, or OUT itself when it holds job folders."""
    if (out_dir / NODE_DB_FILENAME).is_file() and (out_dir / NODE_RESULTS_DIR).is_dir():
        return out_dir / NODE_RESULTS_DIR
    if any(path.name.startswith(NODE_JOB_PREFIX) for path in out_dir.iterdir()):
        return out_dir
    return None


def _report_rows(case_root: Path) -> list[Row]:
    """One summary row per case folder holding a readable report (a node's results have no summary)."""
    rows: list[Row] = []
    for folder in sorted(case_root.iterdir()):
        if not _is_case_name(folder.name) or folder.name.startswith(".") or folder.is_symlink() or not folder.is_dir():
            continue
        report = read_report(folder / REPORT_FILENAME)
        if report is None:
            continue
        status = "ok" if report.spleen_found else "not_found"
        rows.append(SummaryRow(case=folder.name, source=report.source, status=status, report=report).as_dict())
    return rows


def load_index(out_dir: Path) -> CaseIndex:
    """The cases of ``out_dir`` (see the module docstring); ``ConfigError`` when it is no output folder of ours."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise ConfigError(f"{out_dir}: folder not found; pass the -o folder of spleen-seg segment or a node's --spool")
    rows, holders = _batch_rows(out_dir)
    layout, case_root = LAYOUT_BATCH, out_dir
    if not rows:
        node_root = _node_root(out_dir)
        if node_root is None:
            raise ConfigError(f"{out_dir}: no {SUMMARY_FILENAME}, part summaries or node results; pass the -o folder "
                              "of spleen-seg segment (or a node's --spool)")
        layout, case_root, rows = LAYOUT_NODE, node_root, _report_rows(node_root)
    index = CaseIndex(out_dir=out_dir, layout=layout, case_root=case_root)
    skipped = 0
    for row in rows:
        case = row.get("case", "")
        if not _is_case_name(case):
            skipped += 1
            continue
        # read_summary's rows hold every column already; a node's come from SummaryRow.as_dict.
        index.entries[case] = CaseEntry(case=case, folder=case_root / case, row=row, part_summary=holders.get(case))
    if skipped:
        logger.warning("%s: %d summary rows with a case id that is not a folder name were left out", out_dir, skipped)
    index.order = review_order(index.entries.values())
    index.positions = {case: at for at, case in enumerate(index.order)}
    return index


def case_folder(entry: CaseEntry) -> Path | None:
    """The case's folder when it is a real directory (not a symlink, not gone), else None."""
    try:
        mode = os.lstat(entry.folder).st_mode
    except OSError:
        return None
    return entry.folder if stat.S_ISDIR(mode) else None


def case_file(entry: CaseEntry, name: str) -> Path | None:
    """``name`` in the case's folder when it is one of :func:`case_files` and a regular file (a symlink is
    refused: it could point anywhere), else None."""
    folder = case_folder(entry)
    if folder is None or name not in case_files():
        return None
    path = folder / name
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None
    return path if stat.S_ISREG(mode) else None

