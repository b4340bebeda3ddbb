"""The job table: what the node received, what it made of each series, what it sent.

One SQLite database in the spool (WAL journal, ``synchronous=FULL``: a committed
transaction survives a kill and a power cut). Three tables:

- ``instances``: one row per received SOP Instance UID (the key that makes a resent
  instance a duplicate, unless its job failed: resending a failed series retries it), its
  series, its job and its spool file (NULL once retention removed it);
- ``jobs``: one row per processing of a series. A series' first instance opens a job in
  ``receiving``; later instances join it while it is ``receiving`` or ``complete``; an
  instance arriving once it is ``segmenting`` or later opens a new job (the series is
  processed again, a new SEG series is sent);
- ``results``: one row per result file and target (C-STORE destination or STOW-RS URL):
  the outbox. A row is ``pending`` until the target confirmed it, then ``sent``.

Job states (``receiving -> complete -> segmenting -> sending -> done``, or ``failed``)::

    receiving   instances are arriving; complete after --quiet-seconds without one
    complete    waiting for the processor (taken in completion order)
    segmenting  the processor is on it; a node killed here redoes it on start
    sending     results written and queued; done when every target confirmed them all
    done        finished
    failed      the series could not be processed (last_error says why)

Every method takes ``now`` (seconds since the epoch) so tests drive the clock.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

RECEIVING = "receiving"
COMPLETE = "complete"
SEGMENTING = "segmenting"
SENDING = "sending"
DONE = "done"
FAILED = "failed"
JOB_STATES = (RECEIVING, COMPLETE, SEGMENTING, SENDING, DONE, FAILED)
FINISHED_STATES = (DONE, FAILED)
PENDING = "pending"
SENT = "sent"
SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 10_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    series_key TEXT NOT NULL,
    study_uid TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    calling_ae TEXT NOT NULL DEFAULT '',
    instances INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    last_instance_at REAL NOT NULL,
    completed_at REAL,
    purged INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_by_series ON jobs (series_key, id);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, completed_at, id);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    series_key TEXT NOT NULL,
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    path TEXT,
    sop_class_uid TEXT NOT NULL DEFAULT '',
    transfer_syntax TEXT NOT NULL DEFAULT '',
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_by_series ON instances (series_key);
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    kind TEXT NOT NULL,
    path TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    target TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    sent_at REAL
);
CREATE INDEX IF NOT EXISTS results_by_state ON results (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS results_by_job ON results (job_id);
"""
TABLES = ("jobs", "instances", "results")


class RecordRefused(Exception):
    """A received instance was not recorded (the transaction rolled back): its C-STORE gets a failure status."""


def check_series_room(db: sqlite3.Connection, item: NewInstance, max_series_instances: int) -> None:
    """``RecordRefused`` when the series of ``item`` holds ``max_series_instances`` other instances on disk."""
    held = db.execute("SELECT COUNT(*) FROM instances WHERE series_key = ? AND path IS NOT NULL "
                      "AND sop_instance_uid != ?", (item.series_key, item.sop_instance_uid)).fetchone()[0]
    if held >= max_series_instances:
        raise RecordRefused(f"series {item.series_key} already holds {held} instances in the spool "
                            f"(--max-series-instances {max_series_instances})")


def is_job_table(path: Path) -> bool:
    """True when ``path`` is an SQLite database holding a job table of this schema version.

    Opens the file read-only; with a WAL database SQLite still creates ``-wal``/``-shm``
    files beside it, so pass a copy when the folder may not be ours.
    """
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            db.close()
    except sqlite3.Error:
        return False
    return version == SCHEMA_VERSION and set(TABLES) <= tables


@dataclass(frozen=True)
class Job:
    id: int
    series_key: str
    study_uid: str
    state: str
    calling_ae: str
    instances: int
    attempts: int
    last_error: str
    created_at: float
    updated_at: float
    last_instance_at: float
    completed_at: float | None
    purged: int


@dataclass(frozen=True)
class ResultFile:
    """A result a job produced, before it is queued: ``path`` relative to the spool root."""

    kind: str  # seg, sr or sc
    path: str
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str


@dataclass(frozen=True)
class Result:
    """One result file for one target (a row of the outbox)."""

    id: int
    job_id: int
    kind: str
    path: str
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    target: str
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str
    sent_at: float | None


@dataclass(frozen=True)
class NewInstance:
    """A received instance, already durable in the spool."""

    sop_instance_uid: str
    series_key: str
    study_uid: str
    path: str
    sop_class_uid: str
    transfer_syntax: str
    calling_ae: str


def _job(row: sqlite3.Row) -> Job:
    return Job(**dict(row))


def _result(row: sqlite3.Row) -> Result:
    return Result(**dict(row))


class JobTable:
    """The job table of one spool; thread-safe (one connection, one lock: every call is short)."""

    def __init__(self, path: str | Path, *, create: bool = True):
        """Open (``create``: and create or check the schema of) the job table at ``path``.

        ``create=False`` only reads an existing table, as the status command does while
        the node writes it (WAL: readers never wait for the writer).
        """
        self.path = Path(path)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=BUSY_TIMEOUT_MS / 1000)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: each commit is fsync'd, so an acknowledged instance survives a power cut too.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        if not create:
            return
        with self._transaction():
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise RuntimeError(f"{self.path}: job table schema version {version}, this spleen-seg reads "
                                   f"{SCHEMA_VERSION}; use a new --spool folder or the matching spleen-seg version")
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # --- receiving -----------------------------------------------------------------------

    def has_instance(self, sop_instance_uid: str) -> bool:
        return bool(self._query("SELECT 1 FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)))

    def is_duplicate(self, sop_instance_uid: str) -> bool:
        """True when the instance was received before and its job did not fail.

        An instance of a failed job counts as new (it is written again and its series is
        processed anew): sending a failed series again retries it, with whatever the
        sender corrected.
        """
        rows = self._query("SELECT j.state FROM instances i JOIN jobs j ON j.id = i.job_id "
                           "WHERE i.sop_instance_uid = ?", (sop_instance_uid,))
        return bool(rows) and rows[0][0] != FAILED

    def record_instance(self, item: NewInstance, now: float, *, file: Path | None = None,
                        max_series_instances: int | None = None) -> Job | None:
        """Record a durable instance; returns the job it joined or opened, None for a duplicate.

        A duplicate (see ``is_duplicate``) changes nothing, except that it keeps a series
        still being received from completing mid-transfer. Raises ``RecordRefused``, recording
        nothing, when ``file`` (the instance's spool file) is no longer there, checked inside
        the transaction (retention moves a series' folder away inside its own, see
        ``purge_if_expired``), or when the series already holds ``max_series_instances``.
        """
        with self._transaction() as db:
            if file is not None and not file.is_file():
                raise RecordRefused("its series' files were removed by retention while it was written; send it again")
            latest = db.execute("SELECT * FROM jobs WHERE series_key = ? ORDER BY id DESC LIMIT 1",
                                (item.series_key,)).fetchone()
            previous = db.execute("SELECT j.state FROM instances i JOIN jobs j ON j.id = i.job_id "
                                  "WHERE i.sop_instance_uid = ?", (item.sop_instance_uid,)).fetchone()
            if previous is not None and previous["state"] != FAILED:
                if latest is not None and latest["state"] == RECEIVING:
                    db.execute("UPDATE jobs SET last_instance_at = ?, updated_at = ? WHERE id = ?",
                               (now, now, latest["id"]))
                return None
            if max_series_instances is not None:
                check_series_room(db, item, max_series_instances)
            if latest is not None and latest["state"] in (RECEIVING, COMPLETE):
                job_id = latest["id"]
                db.execute("UPDATE jobs SET state = ?, instances = instances + 1, last_instance_at = ?, updated_at = ?,"
                           " completed_at = NULL WHERE id = ?", (RECEIVING, now, now, job_id))
            else:
                job_id = db.execute(
                    "INSERT INTO jobs (series_key, study_uid, state, calling_ae, instances, created_at, updated_at, "
                    "last_instance_at) VALUES (?, ?, ?, ?, 1, ?, ?, ?)",
                    (item.series_key, item.study_uid, RECEIVING, item.calling_ae, now, now, now),
                ).lastrowid
            db.execute(
                "INSERT OR REPLACE INTO instances (sop_instance_uid, series_key, job_id, path, sop_class_uid, "
                "transfer_syntax, received_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (item.sop_instance_uid, item.series_key, job_id, item.path, item.sop_class_uid, item.transfer_syntax, now))
            return _job(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def check_series_room(self, item: NewInstance, max_series_instances: int) -> None:
        """Raise ``RecordRefused`` when ``item``'s series already holds ``max_series_instances``:
        read before the instance is written, so that a full series costs no write and fsync
        (``record_instance`` checks again inside its transaction)."""
        with self._lock:
            check_series_room(self._db, item, max_series_instances)

    def instance_paths(self) -> set[str]:
        """Spool paths of every recorded instance still on disk."""
        return {row[0] for row in self._query("SELECT path FROM instances WHERE path IS NOT NULL")}

    def series_paths(self, series_key: str) -> list[str]:
        return [row[0] for row in self._query(
            "SELECT path FROM instances WHERE series_key = ? AND path IS NOT NULL ORDER BY path", (series_key,))]

    # --- router --------------------------------------------------------------------------

    def complete_quiet(self, now: float, quiet_seconds: float) -> list[Job]:
        """Mark complete every receiving job with no instance for ``quiet_seconds``; returns them."""
        with self._transaction() as db:
            rows = db.execute("SELECT id FROM jobs WHERE state = ? AND last_instance_at <= ? ORDER BY last_instance_at, id",
                              (RECEIVING, now - quiet_seconds)).fetchall()
            for row in rows:
                db.execute("UPDATE jobs SET state = ?, completed_at = ?, updated_at = ? WHERE id = ?",
                           (COMPLETE, now, now, row["id"]))
            return [_job(db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone()) for row in rows]

    # --- processor -----------------------------------------------------------------------

    def claim_next(self, now: float) -> Job | None:
        """Take the earliest-completed ``complete`` job: it becomes ``segmenting``, one more attempt."""
        with self._transaction() as db:
            row = db.execute("SELECT id FROM jobs WHERE state = ? ORDER BY completed_at, id LIMIT 1",
                             (COMPLETE,)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state = ?, attempts = attempts + 1, updated_at = ? WHERE id = ?",
                       (SEGMENTING, now, row["id"]))
            return _job(db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone())

    def finish_processing(self, job_id: int, files: list[ResultFile], targets: tuple[str, ...], now: float) -> Job:
        """Queue every result file for every target in one transaction: the job becomes ``sending``.

        With no target the job is ``done`` at once (results stay in the spool).
        """
        with self._transaction() as db:
            for item in files:
                for target in targets:
                    db.execute(
                        "INSERT INTO results (job_id, kind, path, sop_class_uid, sop_instance_uid, series_uid, target, "
                        "state, next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (job_id, item.kind, item.path, item.sop_class_uid, item.sop_instance_uid, item.series_uid,
                         target, PENDING, now))
            state = SENDING if files and targets else DONE
            db.execute("UPDATE jobs SET state = ?, last_error = '', updated_at = ? WHERE id = ?", (state, now, job_id))
            return _job(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def fail(self, job_id: int, error: str, now: float) -> None:
        """The job is ``failed`` with ``error``; its unsent results (if any) are dropped."""
        with self._transaction() as db:
            db.execute("DELETE FROM results WHERE job_id = ? AND state = ?", (job_id, PENDING))
            db.execute("UPDATE jobs SET state = ?, last_error = ?, updated_at = ? WHERE id = ?",
                       (FAILED, error, now, job_id))

    # --- dispatcher ----------------------------------------------------------------------

    def due_results(self, now: float) -> list[Result]:
        """Pending results whose next attempt is due, oldest job first."""
        return [_result(row) for row in self._query(
            "SELECT * FROM results WHERE state = ? AND next_attempt_at <= ? ORDER BY job_id, id", (PENDING, now))]

    def next_due_at(self) -> float | None:
        row = self._query("SELECT MIN(next_attempt_at) FROM results WHERE state = ?", (PENDING,))
        return row[0][0] if row else None

    def mark_sent(self, result_id: int, now: float) -> Job | None:
        """Record a confirmed send; returns the job when this made it ``done``."""
        with self._transaction() as db:
            db.execute("UPDATE results SET state = ?, sent_at = ?, attempts = attempts + 1, last_error = '' "
                       "WHERE id = ?", (SENT, now, result_id))
            job_id = db.execute("SELECT job_id FROM results WHERE id = ?", (result_id,)).fetchone()["job_id"]
            left = db.execute("SELECT COUNT(*) FROM results WHERE job_id = ? AND state = ?", (job_id, PENDING)).fetchone()[0]
            if left:
                return None
            db.execute("UPDATE jobs SET state = ?, updated_at = ? WHERE id = ? AND state = ?", (DONE, now, job_id, SENDING))
            return _job(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def mark_retry(self, result_id: int, error: str, retry_at: float, now: float) -> None:
        with self._transaction() as db:
            db.execute("UPDATE results SET attempts = attempts + 1, last_error = ?, next_attempt_at = ? WHERE id = ?",
                       (error, retry_at, result_id))
            db.execute("UPDATE jobs SET last_error = ?, updated_at = ? WHERE id = (SELECT job_id FROM results WHERE id = ?)",
                       (f"sending: {error}", now, result_id))

    # --- start-up and bookkeeping ---------------------------------------------------------

    def recover(self, now: float, max_attempts: int) -> tuple[list[Job], list[Job]]:
        """After a stop or a kill: jobs caught ``segmenting`` are processed again, unsent results are due now.

        A job interrupted ``max_attempts`` times (a series that crashes the node) is
        failed instead. Returns ``(requeued, failed)``.
        """
        with self._transaction() as db:
            rows = db.execute("SELECT * FROM jobs WHERE state = ?", (SEGMENTING,)).fetchall()
            requeued, failed = [], []
            for row in rows:
                if row["attempts"] >= max_attempts:
                    error = f"interrupted {row['attempts']} times while segmenting (node killed or crashed); giving up"
                    db.execute("UPDATE jobs SET state = ?, last_error = ?, updated_at = ? WHERE id = ?",
                               (FAILED, error, now, row["id"]))
                    failed.append(row["id"])
                else:
                    db.execute("UPDATE jobs SET state = ?, updated_at = ? WHERE id = ?", (COMPLETE, now, row["id"]))
                    requeued.append(row["id"])
            # The target may be back: a restart is a natural moment to retry at once.
            db.execute("UPDATE results SET next_attempt_at = ? WHERE state = ?", (now, PENDING))
            get = "SELECT * FROM jobs WHERE id = ?"
            return ([_job(db.execute(get, (i,)).fetchone()) for i in requeued],
                    [_job(db.execute(get, (i,)).fetchone()) for i in failed])

    def job(self, job_id: int) -> Job:
        return _job(self._query("SELECT * FROM jobs WHERE id = ?", (job_id,))[0])

    def jobs(self, limit: int | None = None) -> list[Job]:
        """Jobs, newest first."""
        sql = "SELECT * FROM jobs ORDER BY id DESC" + (" LIMIT ?" if limit else "")
        return [_job(row) for row in self._query(sql, (limit,) if limit else ())]

    def results(self, job_id: int | None = None) -> list[Result]:
        if job_id is None:
            return [_result(row) for row in self._query("SELECT * FROM results ORDER BY id")]
        return [_result(row) for row in self._query("SELECT * FROM results WHERE job_id = ? ORDER BY id", (job_id,))]

    def jobs_with_results(self) -> set[int]:
        """Jobs whose result folders are kept on start: queued, sent, or failed (for inspection)."""
        return {row[0] for row in self._query("SELECT id FROM jobs WHERE state IN (?, ?, ?)", (SENDING, DONE, FAILED))}

    def expired_series(self, cutoff: float) -> list[str]:
        """Keys of the series whose latest job finished before ``cutoff`` and whose files are still kept."""
        return [row[0] for row in self._query(
            "SELECT j.series_key FROM jobs j WHERE j.purged = 0 AND j.id = "
            "(SELECT MAX(id) FROM jobs WHERE series_key = j.series_key) AND j.state IN (?, ?) AND j.updated_at < ? "
            "ORDER BY j.id", (DONE, FAILED, cutoff))]

    def purge_if_expired(self, series_key: str, cutoff: float,
                         retire: Callable[[str], Path | None]) -> tuple[list[int], Path | None] | None:
        """Retention of one series, in one transaction with the receiver's ``record_instance``.

        If the series' latest job is still finished before ``cutoff`` (an instance recorded
        since ``expired_series`` chose it opened a new job, and then nothing happens),
        ``retire(series_key)`` moves its files out of place and the series is marked purged:
        paths forgotten, UIDs kept (a resend stays a duplicate). An instance written but not
        yet recorded when its folder moved is refused by ``record_instance`` (its file is
        gone), so no acknowledged instance is ever among the files retired. Returns the
        series' job ids and what ``retire`` returned, or None when the series is not expired.
        """
        with self._transaction() as db:
            latest = db.execute("SELECT state, updated_at, purged FROM jobs WHERE series_key = ? ORDER BY id DESC "
                                "LIMIT 1", (series_key,)).fetchone()
            if latest is None or latest["purged"] or latest["state"] not in FINISHED_STATES \
                    or latest["updated_at"] >= cutoff:
                return None
            retired = retire(series_key)
            db.execute("UPDATE instances SET path = NULL WHERE series_key = ?", (series_key,))
            db.execute("UPDATE jobs SET purged = 1 WHERE series_key = ?", (series_key,))
            job_ids = [row[0] for row in db.execute("SELECT id FROM jobs WHERE series_key = ?", (series_key,))]
            return job_ids, retired
