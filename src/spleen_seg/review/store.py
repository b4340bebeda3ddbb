"""The review app's writes: decisions, corrected masks, the audit log, and the summary and page after them.

Every change of a case happens under its lock (a thread lock, plus ``flock`` on the case
folder so two review servers on one output folder do not interleave) and starts from the
revision the reviewer saw: a stale revision is a :class:`Conflict` (HTTP 409), never an
overwrite. The writes go in this order, each durable (written to a temporary name,
fsync'd, renamed, the folder fsync'd) before the next starts:

1. ``.review_pending.json`` in the case folder: the state and audit line about to be written;
2. ``spleen_corrected.nii.gz`` (a save), then ``spleen_corrected_seg.dcm`` (a save of a DICOM case);
3. ``report.json`` with the new ``review`` (revision + 1);
4. one line of ``review_audit.jsonl`` (``O_APPEND``, fsync'd);
5. ``summary.csv``, its part summary and ``index.html`` (derived; rewritten from the files on disk);
6. the pending file is removed; only then does the reviewer get the answer.

A kill at any moment leaves each file whole (old or new) and the pending file telling what
was under way; :meth:`ReviewStore.recover` (at start) finishes that change when its mask was
already renamed into place (the old correction is gone then, the new one is complete: the
report, the SEG, the audit line and the summary are brought to it), and otherwise drops it
(nothing the reviewer was told was saved is lost: no answer had been sent).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

import numpy as np

from spleen_seg.batch.summary import SUMMARY_FILENAME, read_summary, write_page, write_summary_rows
from spleen_seg.io.atomic import atomic_path
from spleen_seg.io.download import hash_file
from spleen_seg.node.spool import fsync_dir
from spleen_seg.outputs.report import REPORT_FILENAME, CaseReport, read_report, write_report
from spleen_seg.outputs.review_state import (
    AUDIT_LOG_FILENAME,
    CORRECTED_MASK_FILENAME,
    CORRECTED_SEG_FILENAME,
    DECISIONS,
    Correction,
    ReviewState,
    review_from_dict,
    review_status,
)
from spleen_seg.review.cases import CaseEntry, CaseIndex, case_file, case_folder

PENDING_FILENAME = ".review_pending.json"
STAGED_SUFFIX = ".staged.nii.gz"
# The files this module writes in a case folder; a kill can leave ``.<name>.<...>`` temporaries of them.
OWN_WRITES = (CORRECTED_MASK_FILENAME, CORRECTED_SEG_FILENAME, REPORT_FILENAME, PENDING_FILENAME)
MAX_COMMENT_CHARS = 2000
MAX_REVIEWER_CHARS = 100
OWNER_ONLY = 0o600  # a node's spool keeps its files to its owner (node/spool.py FILE_MODE)
# Tests only: stop a save at a named stage (and say so on stderr) so that a test can kill the server there.
TEST_PAUSE_ENV = "SPLEEN_SEG_REVIEW_TEST_PAUSE"
TEST_PAUSE_STAGES = ("pending-written", "mask-written", "mask-renamed", "report-written", "audit-written")
TEST_PAUSE_SECONDS = 3600.0

logger = logging.getLogger(__name__)


class ReviewRefused(Exception):
    """A request the store will not carry out; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Conflict(ReviewRefused):
    """The reviewer started from a revision that is no longer the case's (another tab or reviewer saved since)."""

    def __init__(self, case: str, expected: int, current: int) -> None:
        super().__init__(409, f"{case}: this page shows revision {expected} but the case is at revision {current} "
                              "(saved from another tab or by another reviewer): reload the case and redo the change")
        self.current = current


@dataclass(frozen=True)
class CaseState:
    """A case's report (as read) and its review state."""

    report: CaseReport
    review: ReviewState


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_mask(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A mask file's voxels as uint8 of ``shape`` (its header's trailing axes of length 1 dropped)."""
    import nibabel as nib

    image = cast(nib.Nifti1Image, nib.load(path))
    return np.asarray(image.dataobj, dtype=np.uint8).reshape(shape)


def _fsync_path(path: Path) -> None:
    """fsync a file or a folder (the node's helper opens either read-only)."""
    fsync_dir(path)


def _test_pause(stage: str) -> None:
    """Tests only: with ``SPLEEN_SEG_REVIEW_TEST_PAUSE=<stage>``, say so on stderr and wait to be killed."""
    if os.environ.get(TEST_PAUSE_ENV) == stage:
        print(f"review: paused at {stage}", file=sys.stderr, flush=True)
        time.sleep(TEST_PAUSE_SECONDS)


def durable_write(dest: Path, write: Callable[[Path], object], pause_stage: str | None = None) -> Path:
    """Write ``dest`` through ``write(tmp)``: temporary file, fsync, rename, folder fsync (whole or not at all).

    The file keeps the mode of the one it replaces, and a new one in an owner-only folder (a
    node's spool) is owner-only too.
    """
    try:
        mode: int | None = stat.S_IMODE(dest.stat().st_mode)
    except FileNotFoundError:
        mode = OWNER_ONLY if stat.S_IMODE(dest.parent.stat().st_mode) & 0o077 == 0 else None
    with atomic_path(dest) as tmp:
        write(tmp)
        _fsync_path(tmp)
        if pause_stage is not None:
            _test_pause(pause_stage)
    if mode is not None:
        os.chmod(dest, mode)
    _fsync_path(dest.parent)
    return dest


def correction_record(model: np.ndarray, corrected: np.ndarray, voxel_ml: float, *, sha256: str,
                      model_sha256: str, reviewer: str, seg_file: str | None) -> Correction:
    """The report's record of a correction: its size, the change from the model's mask and their Dice.

    Dice of two empty masks is 1.0 (they agree), as in ``training.evaluate``.
    """
    model_bool, corrected_bool = np.asarray(model) > 0, np.asarray(corrected) > 0
    model_voxels, voxels = int(model_bool.sum()), int(corrected_bool.sum())
    overlap = int(np.logical_and(model_bool, corrected_bool).sum())
    dice = 1.0 if model_voxels + voxels == 0 else 2.0 * overlap / (model_voxels + voxels)
    return Correction(file=CORRECTED_MASK_FILENAME, sha256=sha256, model_mask_sha256=model_sha256, saved_at=utc_now(),
                      reviewer=reviewer, voxels=voxels, volume_ml=round(voxels * voxel_ml, 4),
                      change_voxels=voxels - model_voxels, change_ml=round((voxels - model_voxels) * voxel_ml, 4),
                      dice_vs_model=round(dice, 6), seg_file=seg_file)


def clean_text(text: object, limit: int, what: str) -> str:
    """A comment or name as stored: a string of at most ``limit`` characters without control characters."""
    if not isinstance(text, str):
        raise ReviewRefused(422, f"the {what} must be text")
    if len(text) > limit:
        raise ReviewRefused(413, f"the {what} has {len(text)} characters, more than {limit}")
    return "".join(ch if ch.isprintable() or ch in "\n\t" else " " for ch in text)


class ReviewStore:
    """Decisions and corrections of the cases of ``index``, recorded as by ``reviewer``."""

    def __init__(self, index: CaseIndex, reviewer: str) -> None:
        self.index = index
        self.reviewer = clean_text(reviewer, MAX_REVIEWER_CHARS, "reviewer name")
        self.audit_path = index.out_dir / AUDIT_LOG_FILENAME
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._summary_lock = threading.Lock()

    # --- reading --------------------------------------------------------------------------

    def state(self, entry: CaseEntry) -> CaseState:
        path = case_file(entry, REPORT_FILENAME)
        report = read_report(path) if path is not None else None
        if report is None:
            raise ReviewRefused(404, f"{entry.case}: no readable {REPORT_FILENAME} in its folder")
        try:
            review = review_from_dict(report.review)
        except ValueError as err:
            raise ReviewRefused(409, f"{entry.case}: {REPORT_FILENAME} holds a review record this app did not "
                                     f"write ({err})") from None
        return CaseState(report=report, review=review)

    def current_mask_file(self, entry: CaseEntry, review: ReviewState) -> Path:
        """The mask a reviewer edits: the saved correction when there is one, else the model's."""
        from spleen_seg.batch.case import MASK_FILENAME

        name = CORRECTED_MASK_FILENAME if review.correction is not None else MASK_FILENAME
        path = case_file(entry, name)
        if path is None:
            raise ReviewRefused(404, f"{entry.case}: {name} is missing from its folder (or is not a regular file)")
        return path

    # --- writing --------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self, entry: CaseEntry) -> Iterator[Path]:
        """The case folder, held against other threads and other review processes."""
        folder = case_folder(entry)
        if folder is None:
            raise ReviewRefused(404, f"{entry.case}: its folder is missing or is not a real folder")
        with self._locks_guard:
            lock = self._locks.setdefault(entry.case, threading.Lock())
        with lock:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_NOFOLLOW", 0))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield folder
            finally:
                os.close(fd)

    def decide(self, entry: CaseEntry, decision: str, comment: object, revision: int) -> ReviewState:
        """Record ``accepted`` or ``rejected`` (with a comment) on top of ``revision``; returns the new state."""
        if decision not in DECISIONS:
            raise ReviewRefused(422, f"decision {decision!r} is not one of {', '.join(DECISIONS)}")
        text = clean_text(comment, MAX_COMMENT_CHARS, "comment")
        with self.locked(entry) as folder:
            current = self._current(entry, revision)
            new = replace(current.review, revision=current.review.revision + 1, decision=decision, comment=text,
                          reviewer=self.reviewer, decided_at=utc_now())
            self._commit(entry, folder, current.report, new, action=decision)
        return new

    def save_correction(self, entry: CaseEntry, revision: int,
                        correct: Callable[[np.ndarray], np.ndarray],
                        write_seg: Callable[[np.ndarray, Path], object] | None) -> ReviewState:
        """Save ``correct(base)`` as the case's corrected mask on top of ``revision``.

        ``base`` is the mask the reviewer started from (the saved correction, else the
        model's), read under the lock; ``correct`` returns the new mask on the same grid
        (uint8 0/1) or raises :class:`ReviewRefused`. ``write_seg(mask, path)`` writes the
        corrected DICOM SEG (DICOM cases; None for NIfTI).
        """
        from spleen_seg.io.nifti import read_geometry, write_mask

        with self.locked(entry) as folder:
            current = self._current(entry, revision)
            base_path = self.current_mask_file(entry, current.review)
            model_path = self.current_mask_file(entry, ReviewState())
            geometry = read_geometry(model_path)
            model = read_mask(model_path, geometry.shape)
            base = model if base_path == model_path else read_mask(base_path, geometry.shape)
            corrected = correct(base)
            if np.array_equal(corrected > 0, base > 0):
                raise ReviewRefused(422, f"{entry.case}: the drawing changes no voxel of the mask it started from; "
                                         "accept the case instead")
            dest = folder / CORRECTED_MASK_FILENAME
            # The mask is first written beside the pending file, so the pending file can name its digest.
            staged = folder / f".{CORRECTED_MASK_FILENAME}{STAGED_SUFFIX}"
            durable_write(staged, lambda tmp: write_mask(corrected, geometry, tmp))
            try:
                model_sha256 = hash_file(model_path)
                record = correction_record(model, corrected, geometry.voxel_volume_ml, sha256=hash_file(staged),
                                           model_sha256=model_sha256, reviewer=self.reviewer,
                                           seg_file=CORRECTED_SEG_FILENAME if write_seg is not None else None)
                new = replace(current.review, revision=current.review.revision + 1, correction=record)
                self._commit(entry, folder, current.report, new, action="corrected", model_sha256=model_sha256,
                             before_report=lambda: self._place_mask(staged, dest, corrected, folder, write_seg))
            finally:
                staged.unlink(missing_ok=True)
        return new

    def _place_mask(self, staged: Path, dest: Path, corrected: np.ndarray, folder: Path,
                    write_seg: Callable[[np.ndarray, Path], object] | None) -> None:
        _test_pause("mask-written")
        os.replace(staged, dest)  # staged by durable_write: already the mode a new file here gets
        _fsync_path(folder)
        _test_pause("mask-renamed")
        if write_seg is not None:
            durable_write(folder / CORRECTED_SEG_FILENAME, lambda tmp: write_seg(corrected, tmp))

    def _current(self, entry: CaseEntry, revision: int) -> CaseState:
        current = self.state(entry)
        if current.review.revision != revision:
            raise Conflict(entry.case, revision, current.review.revision)
        return current

    def _audit_record(self, entry: CaseEntry, review: ReviewState, action: str, recovered: bool = False,
                      model_sha256: str | None = None) -> dict[str, Any]:
        """The audit line; ``model_sha256``: the model mask's digest when the caller just computed it."""
        from spleen_seg.batch.case import MASK_FILENAME

        model = case_file(entry, MASK_FILENAME)
        if model_sha256 is None and model is not None:
            model_sha256 = hash_file(model)
        correction = review.correction
        return {"time": utc_now(), "reviewer": self.reviewer, "case": entry.case, "action": action,
                "decision": review.decision, "status": review_status(review), "revision": review.revision,
                "comment": review.comment if action in DECISIONS else "",
                "model_mask_sha256": model_sha256,
                "corrected_mask_sha256": correction.sha256 if correction is not None else None,
                **({"recovered": True} if recovered else {})}

    def _commit(self, entry: CaseEntry, folder: Path, report: CaseReport, new: ReviewState, *, action: str,
                before_report: Callable[[], None] | None = None, model_sha256: str | None = None) -> None:
        pending = folder / PENDING_FILENAME
        audit = self._audit_record(entry, new, action, model_sha256=model_sha256)
        durable_write(pending, lambda tmp: tmp.write_text(json.dumps({"review": new.as_dict(), "audit": audit}),
                                                          encoding="utf-8"))
        _test_pause("pending-written")
        if before_report is not None:
            before_report()
        self._write_review(folder, report, new)
        _test_pause("report-written")
        self._append_audit(audit)
        _test_pause("audit-written")
        self.refresh_summary(entry, review_status(new))
        pending.unlink()
        _fsync_path(folder)

    def _write_review(self, folder: Path, report: CaseReport, review: ReviewState) -> None:
        report.review = review.as_dict()
        durable_write(folder / REPORT_FILENAME, lambda tmp: write_report(report, tmp))

    def _append_audit(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=True, sort_keys=True) + "\n").encode()
        fd = os.open(self.audit_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0), 0o666)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    # --- the summary and the page ----------------------------------------------------------

    def refresh_summary(self, entry: CaseEntry, status: str) -> None:
        """Set the case's ``review`` cell in ``summary.csv`` (and its part summary) and rewrite ``index.html``.

        The files are read again first: a batch still running may have added rows since.
        """
        entry.row["review"] = status
        if not self.index.writes_summary:
            return
        with self._summary_lock:
            summary = self.index.out_dir / SUMMARY_FILENAME
            for path in (summary, entry.part_summary):
                if path is None or not path.is_file():
                    continue
                rows = read_summary(path)
                for row in rows:
                    if row["case"] == entry.case:
                        row["review"] = status
                write_summary_rows(rows, path)
                if path == summary:
                    write_page(rows, self.index.out_dir)

    # --- recovery ---------------------------------------------------------------------------

    def recover(self, write_seg_for: Callable[[CaseEntry], Callable[[np.ndarray, Path], object] | None]) -> list[str]:
        """Finish or drop the changes a killed server left under way, and bring the summary to the reports.

        Returns one line per case it touched. ``write_seg_for(entry)`` gives the SEG writer
        of a DICOM case (a finished correction's SEG is written again from its mask).
        """
        lines = []
        for pending in sorted(self.index.case_root.glob(f"*/{PENDING_FILENAME}")):
            entry = self.index.get(pending.parent.name)
            if entry is None or case_folder(entry) is None:  # not a case of ours, or a symlinked folder
                continue
            try:
                lines.append(self._recover_case(entry, pending, write_seg_for))
            except ReviewRefused as err:
                lines.append(f"{entry.case}: left as it is ({err})")
        lines += self._reconcile_summary()
        return lines

    def _recover_case(self, entry: CaseEntry, pending: Path,
                      write_seg_for: Callable[[CaseEntry], Callable[[np.ndarray, Path], object] | None]) -> str:
        with self.locked(entry) as folder:
            for name in OWN_WRITES:  # the temporary files of our writes a kill left (atomic_path's names)
                for stray in folder.glob(f".{name}.*"):
                    stray.unlink(missing_ok=True)
            try:
                intended = json.loads(pending.read_text(encoding="utf-8"))
                new = review_from_dict(intended["review"])
                audit = dict(intended["audit"])
            except (OSError, ValueError, KeyError, TypeError) as err:
                pending.unlink()
                return f"{entry.case}: unreadable {PENDING_FILENAME} removed ({err}); the report stands"
            current = self.state(entry)
            corrected = case_file(entry, CORRECTED_MASK_FILENAME)
            placed = new.correction is not None and corrected is not None and \
                hash_file(corrected) == new.correction.sha256
            if current.review.revision == new.revision - 1 and placed:
                write_seg = write_seg_for(entry)
                if write_seg is not None and corrected is not None:
                    from spleen_seg.io.nifti import read_geometry

                    mask = read_mask(corrected, read_geometry(corrected).shape)
                    durable_write(folder / CORRECTED_SEG_FILENAME, lambda tmp: write_seg(mask, tmp))
                self._write_review(folder, current.report, new)
                current = self.state(entry)
                outcome = f"finished the correction saved when the server stopped (revision {new.revision})"
            elif current.review.revision == new.revision - 1:
                pending.unlink()
                _fsync_path(folder)
                return f"{entry.case}: dropped a change the server had not written when it stopped (nothing was saved)"
            else:
                outcome = f"completed the records of revision {current.review.revision}"
            if current.review == new and not self._audited(entry.case, new.revision):
                self._append_audit({**audit, "recovered": True})
            self.refresh_summary(entry, review_status(current.review))
            pending.unlink()
            _fsync_path(folder)
        return f"{entry.case}: {outcome}"

    def _audit_lines(self) -> Iterator[dict[str, Any]]:
        try:
            text = self.audit_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash of the machine: the report keeps the state
            if isinstance(record, dict):
                yield record

    def _audited(self, case: str, revision: int) -> bool:
        return any(r.get("case") == case and r.get("revision") == revision for r in self._audit_lines())

    def _reconcile_summary(self) -> list[str]:
        """Summary cells that disagree with the audit log's last status of their case, set from the report."""
        last: dict[str, str] = {}
        for record in self._audit_lines():
            if isinstance(record.get("case"), str):
                last[record["case"]] = str(record.get("status") or "")
        lines = []
        for case, status in last.items():
            entry = self.index.get(case)
            if entry is None or entry.row.get("review", "") == status:
                continue
            try:
                actual = review_status(self.state(entry).review)
            except ReviewRefused as err:
                lines.append(str(err))
                continue
            if actual != entry.row.get("review", ""):
                self.refresh_summary(entry, actual)
                lines.append(f"{case}: summary review column set to {actual or 'not reviewed'!r} from its report")
        return lines
