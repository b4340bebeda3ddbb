"""The batch's ``summary.csv`` and cohort page ``index.html``, kept current while cases finish, and
the summaries of a job array's parts merged into one.

Every finished case is first appended to a *journal* (``summary.journal.csv``, or
``summary.part-<I>-of-<K>.journal.csv`` for a part), one line flushed and fsync'd per case,
so a run killed at any moment loses no row it finished. The summary itself is rewritten
atomically (a reader sees the old file or the new one) on a schedule that keeps the rewrites
to a small share of the run (:class:`RewriteSchedule`): after every case while a rewrite is
cheap, less often once the cohort makes it costly, and always at the start, at the end and
on Ctrl-C. Each rewrite empties the journal; a run that ends normally leaves none.

A part of a job array (``--num-parts K --part-id I``) writes its rows to its own
``summary.part-I-of-K.csv`` (one writer per file) and rebuilds ``summary.csv`` and
``index.html`` from every part summary present: at its start, when it finishes or is
interrupted (then also ``summary.part-I-of-K.done``) and in between on the schedule, shared
by the K parts so that together they rebuild about as often as one run would. Parts that
finish at the same moment cannot lose each other's rows (see :func:`rebuild_merged`);
``merge_summaries`` (``spleen-seg merge-summaries OUT``) rebuilds from the part summaries
and their journals after the array, including parts that were killed.

Cells are neutralised against spreadsheet formulas the way OWASP's CSV injection guidance
describes: a cell that starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return (a case
id or path from a file name can) is written with a single quote before it and quoted
(``"'=1+2"``); so is a cell that starts with a quote itself, so that :func:`read_summary`
gives back every cell's original text by removing that one quote. (A summary written before
this rule reads back without the leading quote of a cell that had one: a name like ``'x``.)

Each file is rewritten only when it is absent or recognised as spleen-seg's (``batch.ownership``):
summaries and journals by their header row, ``.done`` marks by their JSON, the page by its
first lines; anything else raises ``ForeignOutputError`` and is left as it is.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from spleen_seg.batch.inputs import Part
from spleen_seg.batch.ownership import check_file
from spleen_seg.io.atomic import atomic_write_text
from spleen_seg.outputs.report import AXIS_NAMES, CaseReport
from spleen_seg.outputs.review_state import review_status

SUMMARY_FILENAME = "summary.csv"
SUMMARY_COLUMNS = ("case", "source", "status", "volume_ml", "extent_left_right_mm", "extent_anterior_posterior_mm",
                   "extent_superior_inferior_mm", "components", "quality_score", "review_suggested", "flags", "error",
                   "reused", "review")
# Every version's header began with these columns: how a summary or journal is recognised.
SUMMARY_HEADER_START = ("case", "source", "status", "volume_ml")
# OWASP: a cell starting with one of these is (or turns into) a formula in a spreadsheet.
FORMULA_STARTS = frozenset("=+-@\t\r")
NEUTRALISING_QUOTE = "'"
NEUTRALISED_STARTS = FORMULA_STARTS | {NEUTRALISING_QUOTE}
DONE_STATUSES = ("finished", "interrupted")
JOURNAL_SUFFIX = ".journal.csv"
PART_FILE = re.compile(r"^summary\.part-(?P<index>\d+)-of-(?P<count>\d+)(?P<kind>\.csv|\.journal\.csv|\.done)$")
# Rewrites of the summary and the page may take this share of a run (RewriteSchedule).
REWRITE_SHARE = 0.05

logger = logging.getLogger(__name__)
Row = dict[str, str]


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
        components = str(self.report.components_found) if self.report is not None else ""
        flags = ";".join(self.report.flags) if self.report is not None else ""
        spans = [f"{extents[name]:.2f}" if extents else "" for name in AXIS_NAMES]
        quality = self.report.quality if self.report is not None else None
        score = f"{quality['score']:.4f}" if quality else ""
        review = ("yes" if self.report.review_suggested else "no") if quality and self.report is not None else ""
        return [self.case, self.source, self.status, volume, *spans, components, score, review, flags, self.error,
                "yes" if self.reused else "no", self.review_state()]

    def review_state(self) -> str:
        """The ``review`` column: the reviewer's verdict from report.json (``review_state.review_status``)."""
        if self.report is None:
            return ""
        try:
            return review_status(self.report.review)
        except ValueError as err:  # a review record the review app did not write: the case reads as not reviewed
            logger.warning("%s: %s; its review column is left empty", self.case, err)
            return ""

    def as_dict(self) -> Row:
        return dict(zip(SUMMARY_COLUMNS, self.values(), strict=True))


def _csv_text(rows: Iterable[Sequence[str]], header: bool = True) -> str:
    """CSV lines of ``rows``, cells neutralised against formulas (module docstring).

    Rows stream through (a list of a large cohort's rows costs more than looking at each
    cell's first character, which is about a third of writing the cells).
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    # OWASP's rule quotes a neutralised cell, which csv's minimal quoting would not: such rows quote every cell.
    quoting_writer = csv.writer(buffer, lineterminator="\n", quoting=csv.QUOTE_ALL)
    if header:
        writer.writerow(SUMMARY_COLUMNS)
    for cells in rows:
        if any(cell[:1] in NEUTRALISED_STARTS for cell in cells):
            quoting_writer.writerow([NEUTRALISING_QUOTE + cell if cell[:1] in NEUTRALISED_STARTS else cell
                                     for cell in cells])
        else:
            writer.writerow(cells)
    return buffer.getvalue()


def _original(cell: str) -> str:
    """A cell as the batch recorded it: without the quote :func:`_csv_text` put before it."""
    return cell[1:] if cell.startswith(NEUTRALISING_QUOTE) else cell


def _is_summary(head: bytes) -> bool:
    """Does a file starting with ``head`` start with a summary's header row (any version's)?"""
    first = head.split(b"\n", 1)[0].decode("utf-8", errors="replace")
    cells = next(csv.reader([first]), [])
    return tuple(cells[: len(SUMMARY_HEADER_START)]) == SUMMARY_HEADER_START


def _is_journal(head: bytes) -> bool:
    """A journal: a summary's header, or nothing (a run killed as it opened the journal)."""
    return head == b"" or _is_summary(head)


def _is_done_mark(head: bytes) -> bool:
    try:
        mark = json.loads(head)
    except ValueError:
        return False
    return isinstance(mark, dict) and mark.get("status") in DONE_STATUSES and {"rows", "cases"} <= mark.keys()


def check_summary(path: Path) -> None:
    check_file(path, _is_summary, "a summary")


def check_summary_files(out_dir: Path) -> None:
    """Raise ``ForeignOutputError`` when a file a run rewrites or removes in ``out_dir`` is not spleen-seg's:
    ``summary.csv``, the page, the journals, and the part summaries and marks of any split."""
    from spleen_seg.outputs.cohort import PAGE_FILENAME

    check_summary(out_dir / SUMMARY_FILENAME)
    check_file(out_dir / f"summary{JOURNAL_SUFFIX}", _is_journal, "a summary journal")
    _check_page(out_dir / PAGE_FILENAME)
    for path in sorted(out_dir.glob("summary.part-*")):
        _check_part_file(path)


def _check_part_file(path: Path) -> None:
    match = PART_FILE.match(path.name)
    if match is None:  # another name: never written, rewritten or removed by a run
        return
    if match["kind"] == ".done":
        check_file(path, _is_done_mark, "a part's .done mark")
    elif match["kind"] == JOURNAL_SUFFIX:
        check_file(path, _is_journal, "a part's summary journal")
    else:
        check_file(path, _is_summary, "a part's summary")


def _check_page(path: Path) -> None:
    from spleen_seg.outputs.cohort import is_cohort_page

    check_file(path, is_cohort_page, "a cohort page")


def write_summary(rows: list[SummaryRow], dest: Path) -> Path:
    """Write ``summary.csv``: a header and one row per input, in input order."""
    check_summary(dest)
    atomic_write_text(dest, _csv_text(row.values() for row in rows))
    return dest


def write_summary_rows(rows: Iterable[Mapping[str, str]], dest: Path) -> Path:
    """Write summary rows read back as dicts (a merge); a column they lack is left empty."""
    check_summary(dest)
    atomic_write_text(dest, _csv_text([row.get(name) or "" for name in SUMMARY_COLUMNS] for row in rows))
    return dest


def read_summary(path: Path) -> list[Row]:
    """The rows of a summary or journal CSV, each cell's original text; [] when it does not exist.

    A journal's last line may be cut short by a kill: a line without its newline, or without
    every column, is dropped.
    """
    try:
        # Bytes decoded, not read_text: its newline translation would turn a "\r" inside a cell into "\n".
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return []
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    rows: list[Row] = []
    reader = csv.DictReader(io.StringIO(text))
    try:
        for row in reader:
            if None not in row and None not in row.values():
                rows.append({name: _original(row.get(name) or "") for name in SUMMARY_COLUMNS})
    except csv.Error as err:  # a quoted field cut short: the rows before it stand
        logger.warning("%s: rows after line %d are unreadable (%s)", path, reader.line_num, err)
    return rows


class Journal:
    """Append-only CSV beside a summary: the rows finished since the summary was last written.

    Each line is flushed and fsync'd before the case counts as recorded, so neither a kill
    nor a crash of the machine loses it; written with ``O_APPEND`` on one file descriptor.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._header_bytes = 0

    def append(self, values: list[str]) -> None:
        if self._fd is None:
            check_file(self.path, _is_journal, "a summary journal")
            header = _csv_text([], header=True).encode()
            # O_TRUNC: a killed earlier run's journal is stale once this run has written its summary.
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o666)
            self._header_bytes = len(header)
            os.write(self._fd, header)
        os.write(self._fd, _csv_text([values], header=False).encode())
        os.fsync(self._fd)

    def clear(self) -> None:
        """The summary now holds every journaled row: keep only the header."""
        if self._fd is not None:
            os.ftruncate(self._fd, self._header_bytes)

    def remove(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        else:  # an earlier run's journal, this run's summary now holds its rows
            check_file(self.path, _is_journal, "a summary journal")
        self.path.unlink(missing_ok=True)


class RewriteSchedule:
    """When to rewrite a file whose cost grows with the cohort, so rewrites take about ``share`` of the time.

    A rewrite is due once the time since the last one ended is at least its cost divided by
    ``share``: after every case while rewriting is cheap (100 rows: milliseconds), every few
    seconds to minutes once it is not (100,000 rows: about a second).
    """

    def __init__(self, share: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.share = share
        self._clock = clock
        self._cost = 0.0
        self._end = float("-inf")

    def due(self) -> bool:
        return self._clock() - self._end >= self._cost / self.share

    @contextmanager
    def timed(self) -> Iterator[None]:
        start = self._clock()
        try:
            yield
        finally:
            self._end = self._clock()
            self._cost = self._end - start


def part_summary_name(part: Part) -> str:
    return f"summary.{part.label}.csv"


def _journal_path(summary: Path) -> Path:
    return summary.with_name(summary.name.removesuffix(".csv") + JOURNAL_SUFFIX)


def _done_path(out_dir: Path, part: Part) -> Path:
    return out_dir / f"summary.{part.label}.done"


class LiveSummary:
    """``summary.csv`` (and ``index.html``) of a batch in progress: the rows of the cases finished so far.

    ``record`` journals a finished case's row at once and rewrites the files when the schedule
    says so; ``write`` rewrites now. The summary is written in full once all ``total`` cases
    have a row. With ``part``, the rows go to the part's own summary and ``summary.csv`` is the
    merge of every part's (ordered by case id); without, ``summary.csv`` lists the cases in
    input order.
    """

    def __init__(self, dest: Path, *, part: Part | None = None, total: int | None = None,
                 share: float = REWRITE_SHARE, clock: Callable[[], float] = time.monotonic) -> None:
        self.dest = dest
        self.part = part
        self.total = total
        self.own = dest if part is None else dest.with_name(part_summary_name(part))
        self.journal = Journal(_journal_path(self.own))
        self._rows: dict[int, SummaryRow] = {}
        self._own_schedule = RewriteSchedule(share, clock)
        # K parts share the merged files' budget: together they rebuild as often as one run.
        self._merge_schedule = RewriteSchedule(share / part.count, clock) if part is not None else None
        self._prepared = False

    def record(self, index: int, row: SummaryRow, *, write: bool = True) -> None:
        """Set the row of input number ``index``; with ``write``, journal it and rewrite when due.

        ``write=False`` (rows taken from an earlier run's reports) defers everything to :meth:`write`.
        """
        self._rows[index] = row
        if not write:
            return
        self.journal.append(row.values())
        if self.total is not None and len(self._rows) >= self.total:
            self.write(final=True)
        elif self._own_schedule.due():
            self._write_own()
            if self._merge_schedule is not None and self._merge_schedule.due():
                self._write_merged()

    def write(self, *, final: bool = False) -> Path:
        """Rewrite the summary (and the merged files of a part) now; the journal is no longer needed.

        ``final``: this run writes no more rows (it finished or was interrupted); a part then
        leaves ``summary.part-I-of-K.done`` for the parts merging at the same moment.
        """
        self._write_own()
        complete = self.total is not None and len(self._rows) >= self.total and all(
            row.status != "interrupted" for row in self._rows.values())
        if self.part is not None:
            if final or complete:
                status = "finished" if complete else "interrupted"
                done = _done_path(self.dest.parent, self.part)
                check_file(done, _is_done_mark, "a part's .done mark")
                atomic_write_text(done, json.dumps({"status": status, "rows": len(self._rows), "cases": self.total}) + "\n")
            self._write_merged()
        self.journal.remove()
        return self.dest

    def _write_own(self) -> None:
        if not self._prepared:
            _remove_other_splits(self.dest.parent, self.part)
            self._prepared = True
        with self._own_schedule.timed():
            rows = [self._rows[index] for index in sorted(self._rows)]
            write_summary(rows, self.own)
            if self.part is None:
                write_page([row.as_dict() for row in rows], self.dest.parent, expected=self.total)
        self.journal.clear()

    def _write_merged(self) -> None:
        assert self._merge_schedule is not None and self.part is not None  # only parts merge
        with self._merge_schedule.timed():
            rebuild_merged(self.dest.parent, self.part.count)


def _remove_other_splits(out_dir: Path, part: Part | None) -> None:
    """Remove the summaries, journals and marks of another split of this output folder (and ours).

    They describe an earlier run with another number of parts (or none): their finished
    cases are taken over by this run's resume, their failed cases are tried again.
    """
    for path in out_dir.glob("summary.*"):
        match = PART_FILE.match(path.name)
        if match is not None:
            stale = part is None or int(match["count"]) != part.count or (
                int(match["index"]) == part.index and match["kind"] == ".done")
        else:
            stale = part is not None and path.name == f"summary{JOURNAL_SUFFIX}"
        if stale:
            if match is not None:
                _check_part_file(path)
            else:
                check_file(path, _is_journal, "a summary journal")
            logger.info("removed %s (another split of %s, or this part's mark of an earlier run)", path.name, out_dir)
            path.unlink(missing_ok=True)


def _file_state(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


@dataclass(frozen=True)
class _Snapshot:
    files: tuple[tuple[int, int, int] | None, ...]
    final: frozenset[int]


def _snapshot(out_dir: Path, count: int) -> _Snapshot:
    parts = [Part(index, count) for index in range(count)]
    return _Snapshot(files=tuple(_file_state(out_dir / part_summary_name(part)) for part in parts),
                     final=frozenset(part.index for part in parts if _done_path(out_dir, part).exists()))


def _sorted_by_case(rows: Iterable[Row]) -> list[Row]:
    merged: dict[str, Row] = {}
    for row in rows:
        merged[row["case"]] = row  # a later row of a case (its journal's) replaces an earlier one
    return [merged[case] for case in sorted(merged)]


def rebuild_merged(out_dir: Path, count: int) -> list[Row]:
    """``summary.csv`` and ``index.html`` from every ``summary.part-*-of-<count>.csv`` present.

    Each part writes only its own summary (atomically), so no part row is ever lost; the
    merged files are derived. When two parts finish at the same moment, each may read the
    other's summary before its last rewrite, and the later rename would keep stale rows. So
    after renaming, a merger checks the part summaries again (inode, size, mtime): if one that
    is final (its ``.done`` mark exists) changed since it read them, it merges again. Every
    final write is followed by its own part's merge, so the last merge to rename has read
    every final summary. A part still running rewrites its summary again later and does not
    make others repeat their merge, which bounds the retries to one per finished part.
    """
    rows: list[Row] = []
    for _attempt in range(count + 2):
        before = _snapshot(out_dir, count)
        rows = _sorted_by_case(row for index in range(count)
                               for row in read_summary(out_dir / part_summary_name(Part(index, count))))
        write_summary_rows(rows, out_dir / SUMMARY_FILENAME)
        write_page(rows, out_dir)
        after = _snapshot(out_dir, count)
        if not any(after.files[index] != before.files[index] for index in after.final):
            return rows
    logger.warning("%s: part summaries kept changing while merging; run spleen-seg merge-summaries %s "
                   "after the last part ends", out_dir / SUMMARY_FILENAME, out_dir)
    return rows


@dataclass
class MergeResult:
    """What :func:`merge_summaries` found: the merged rows and the state of each part (by part index)."""

    rows: list[Row]
    count: int | None  # number of parts; None for a run without parts
    finished: list[int] = field(default_factory=list)
    interrupted: list[int] = field(default_factory=list)
    unfinished: list[int] = field(default_factory=list)  # a summary or journal but no final write: running or killed
    missing: list[int] = field(default_factory=list)  # nothing written
    journal_rows: int = 0  # rows found only in journals (a run killed before rewriting its summary)


def _part_counts(out_dir: Path) -> set[int]:
    return {int(match["count"]) for path in out_dir.glob("summary.part-*")
            if (match := PART_FILE.match(path.name)) is not None}


def merge_summaries(out_dir: Path) -> MergeResult:
    """Rebuild ``summary.csv`` and ``index.html`` of ``out_dir`` from what the runs left in it.

    With part summaries (``segment --num-parts K``): every part's summary plus the rows only in
    its journal (a part killed before rewriting its summary), ordered by case id. Without: the
    summary plus its journal's rows. Raises ``ConfigError`` when the folder holds no summary
    or part summaries of different splits, ``ForeignOutputError`` when one of its files is not
    spleen-seg's (``check_summary_files``).
    """
    from spleen_seg.errors import ConfigError

    check_summary_files(out_dir)
    counts = _part_counts(out_dir)
    if len(counts) > 1:
        raise ConfigError(f"{out_dir}: part summaries of {' and '.join(map(str, sorted(counts)))} parts; "
                          "delete the summary.part-* files of the split no longer used and merge again")
    if not counts:
        summary, journal = out_dir / SUMMARY_FILENAME, out_dir / f"summary{JOURNAL_SUFFIX}"
        if not summary.exists() and not journal.exists():
            raise ConfigError(f"{out_dir}: no {SUMMARY_FILENAME} or part summaries; is this the -o folder "
                              "of spleen-seg segment?")
        rows, extra = _with_journal(read_summary(summary), read_summary(journal), keep_order=True)
        write_summary_rows(rows, summary)
        write_page(rows, out_dir)
        return MergeResult(rows=rows, count=None, journal_rows=extra)
    (count,) = counts
    result = MergeResult(rows=[], count=count)
    collected: list[Row] = []
    for index in range(count):
        part = Part(index, count)
        summary = out_dir / part_summary_name(part)
        rows, extra = _with_journal(read_summary(summary), read_summary(_journal_path(summary)), keep_order=False)
        collected += rows
        result.journal_rows += extra
        done = _done_path(out_dir, part)
        status = json.loads(done.read_text(encoding="utf-8")).get("status") if done.exists() else None
        if status == "finished":
            result.finished.append(index)
        elif status == "interrupted":
            result.interrupted.append(index)
        elif summary.exists() or _journal_path(summary).exists():
            result.unfinished.append(index)
        else:
            result.missing.append(index)
    result.rows = _sorted_by_case(collected)
    write_summary_rows(result.rows, out_dir / SUMMARY_FILENAME)
    write_page(result.rows, out_dir)
    return result


def _with_journal(rows: list[Row], journal: list[Row], *, keep_order: bool) -> tuple[list[Row], int]:
    """``rows`` updated by the journal's (newer) rows; returns them and how many cases only the journal had."""
    by_case = {row["case"]: row for row in rows}
    extra = [row["case"] for row in journal if row["case"] not in by_case]
    by_case.update((row["case"], row) for row in journal)
    order = [row["case"] for row in rows] + list(dict.fromkeys(extra))
    merged = [by_case[case] for case in order] if keep_order else list(by_case.values())
    return merged, len(set(extra))


def write_page(rows: list[Row], out_dir: Path, expected: int | None = None) -> Path:
    """``out_dir/index.html`` for the summary ``rows`` (see ``outputs.cohort``)."""
    from spleen_seg.batch.case import MASK_FILENAME
    from spleen_seg.outputs.cohort import PAGE_FILENAME, CaseFiles, write_cohort_page
    from spleen_seg.outputs.preview import PREVIEW_FILENAME, THUMBNAIL_FILENAME
    from spleen_seg.outputs.report import REPORT_FILENAME

    files = CaseFiles(thumbnail=THUMBNAIL_FILENAME, preview=PREVIEW_FILENAME,
                      links=(("report", REPORT_FILENAME), ("mask", MASK_FILENAME), ("folder", "")))
    _check_page(out_dir / PAGE_FILENAME)
    return write_cohort_page(rows, out_dir / PAGE_FILENAME, files=files, title=out_dir.resolve().name,
                             expected=expected)
