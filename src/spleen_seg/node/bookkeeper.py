"""What happened to each series: structured log lines, the status view, spool retention.

Log lines are logfmt (``event=job job=3 state=done ...``): one line per association and
per job state change, readable by people and by log collectors. They carry UIDs, AE
titles and addresses, never patient data (names, IDs, dates, measurements).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from spleen_seg.errors import NodeError
from spleen_seg.node.jobs import FINISHED_STATES, JOB_STATES, SENT, Job, JobTable
from spleen_seg.node.spool import DB_FILENAME, LOCK_FILENAME, Spool

SECONDS_PER_DAY = 86400.0
STATUS_ERROR_CHARS = 90
PLAIN_VALUE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_:/@,+[]")


def _logfmt(value: Any) -> str:
    """A logfmt value: plain, or quoted with JSON's escapes (control characters, non-ASCII, and DEL,
    which JSON leaves as it is), so no peer-chosen text can move a terminal's cursor or split a line."""
    text = str(value)
    if text and set(text) <= PLAIN_VALUE:
        return text
    return json.dumps(text).replace("\x7f", "\\u007f")


def terminal_text(text: str) -> str:
    """Peer-chosen text (a series key, an error naming a UID) for a terminal: as it is when every
    character is printable, else quoted and escaped as the log lines are (``_logfmt``)."""
    return text if text.isprintable() else _logfmt(text)


def log_event(logger: logging.Logger, event: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """Log one structured line ``event=<event> key=value ...``; empty values are left out."""
    parts = [f"event={event}"] + [f"{key}={_logfmt(value)}" for key, value in fields.items()
                                  if value is not None and value != ""]
    logger.log(level, " ".join(parts))


def log_job(logger: logging.Logger, job: Job, **fields: Any) -> None:
    """The line for a job entering its current state."""
    level = logging.WARNING if job.state == "failed" else logging.INFO
    log_event(logger, "job", level=level, job=job.id, state=job.state, series=job.series_key,
              instances=job.instances, attempts=job.attempts, error=job.last_error if job.state == "failed" else "",
              **fields)


# --- retention ----------------------------------------------------------------------------


def purge_expired(table: JobTable, spool: Spool, keep_days: float, now: float) -> list[str]:
    """Delete the instances and results of series finished more than ``keep_days`` ago.

    A series is expired when its latest job is done or failed and was last updated
    before the cut-off; the job rows and instance UIDs stay (tiny, no patient data), so
    the status keeps the history and a resent series is still recognised. Returns the
    series keys purged.
    """
    cutoff = now - keep_days * SECONDS_PER_DAY
    purged = []
    for series_key in table.expired_series(cutoff):
        # The choice is checked again, and the files moved away, in one transaction with the
        # receiver (see JobTable.purge_if_expired): an instance acknowledged since is never deleted.
        done = table.purge_if_expired(series_key, cutoff, spool.retire_series)
        if done is None:
            continue
        job_ids, retired = done
        spool.delete_retired(retired, job_ids)
        purged.append(series_key)
    return purged


# --- status ---------------------------------------------------------------------------------


def open_for_status(spool_dir: Path) -> JobTable:
    """The job table of an existing spool, for reading; ``NodeError`` when there is none."""
    db = Path(spool_dir) / DB_FILENAME
    if not db.is_file():
        raise NodeError(f"{spool_dir}: no node spool here (no {DB_FILENAME}); pass the --spool folder given to "
                        "spleen-seg serve")
    if not os.access(db, os.R_OK):
        raise NodeError(f"{db}: not readable by this user (the spool is owner-only); run as the user the node runs as")
    return JobTable(db, create=False)


def node_pid(spool_dir: Path) -> int | None:
    """The pid of the node holding the spool, if that process is alive."""
    try:
        pid = int((Path(spool_dir) / LOCK_FILENAME).read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def _time(value: float | None) -> str:
    if value is None:
        return ""
    return dt.datetime.fromtimestamp(value).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def status_records(table: JobTable, limit: int | None = None) -> list[dict[str, Any]]:
    """Each job (newest first) with its results: what ``spleen-seg status --json`` prints."""
    records = []
    for job in table.jobs(limit):
        results = table.results(job.id)
        record = asdict(job)
        record["results"] = [asdict(r) for r in results]
        record["results_sent"] = sum(r.state == SENT for r in results)
        records.append(record)
    return records


def format_status(spool_dir: Path, table: JobTable, limit: int | None = None) -> str:
    """The job table as text: a summary line, then one line per job, newest first."""
    records = status_records(table, limit)
    counts = {state: 0 for state in JOB_STATES}
    for job in table.jobs():
        counts[job.state] += 1
    pid = node_pid(spool_dir)
    running = f"node running (pid {pid})" if pid else "node not running"
    summary = ", ".join(f"{state} {n}" for state, n in counts.items() if n) or "no jobs yet"
    lines = [f"spool {spool_dir}: {running}; {summary}"]
    header = ("JOB", "STATE", "UPDATED", "INSTANCES", "ATTEMPTS", "SENT", "SERIES", "LAST ERROR")
    rows = [header]
    for record in records:
        sent = f"{record['results_sent']}/{len(record['results'])}" if record["results"] else "-"
        error = record["last_error"] if record["state"] not in FINISHED_STATES or record["state"] == "failed" else ""
        if len(error) > STATUS_ERROR_CHARS:
            error = error[:STATUS_ERROR_CHARS - 3] + "..."
        rows.append((str(record["id"]), record["state"], _time(record["updated_at"]), str(record["instances"]),
                     str(record["attempts"]), sent, terminal_text(record["series_key"]), terminal_text(error)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    for row in rows:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])
    return "\n".join(line.rstrip() for line in lines)


def print_status(spool_dir: Path, as_json: bool = False, limit: int | None = None) -> str:
    """``spleen-seg status``: the text (or JSON) view of a spool's job table."""
    table = open_for_status(spool_dir)
    try:
        if as_json:
            return json.dumps({"spool": str(spool_dir), "node_pid": node_pid(spool_dir),
                               "jobs": status_records(table, limit)}, indent=2)
        return format_status(spool_dir, table, limit)
    finally:
        table.close()
