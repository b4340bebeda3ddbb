"""The node's spool folder: received instances and results on disk, durable and owner-only.

Layout under the spool root (folders 0700, files 0600)::

    spleen-seg-spool.json  the marker: this folder is a spool the node made (see ``Spool.create``)
    jobs.sqlite        the job table (see jobs.py)
    node.lock          held by the running node: one node per spool
    incoming/          instances being written (temporary names; removed on start)
    series/<series>/<sop instance>.dcm   received instances, as received (no re-encoding)
    results/job-<id>/  what a job produced: spleen_seg.dcm, report.json, ...
    purging/           series folders retention moved out of place, being deleted

An instance is durable before its C-STORE is acknowledged: written under a temporary
name, fsync'd, renamed into its series folder, and the folder fsync'd, so neither a
SIGKILL nor a power cut can leave a truncated file under a final name.

The spool counts the bytes of the received instances it holds (``instance_bytes``) so
that ``write_instance`` can refuse an instance over the quota before writing it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import uuid
from pathlib import Path

from spleen_seg import __version__
from spleen_seg.errors import NodeError, format_bytes
from spleen_seg.node.jobs import is_job_table

DB_FILENAME = "jobs.sqlite"
LOCK_FILENAME = "node.lock"
MARKER_FILENAME = "spleen-seg-spool.json"
MARKER_FORMAT = "spleen-seg node spool"
INCOMING_DIR = "incoming"
SERIES_DIR = "series"
RESULTS_DIR = "results"
PURGING_DIR = "purging"
# Every name a spool of this layout holds at its root (SQLite's WAL, shared-memory and
# rollback-journal files beside the job table included). A folder holding anything else
# without the marker is someone else's.
SPOOL_NAMES = frozenset({MARKER_FILENAME, DB_FILENAME, f"{DB_FILENAME}-wal", f"{DB_FILENAME}-shm",
                         f"{DB_FILENAME}-journal", LOCK_FILENAME, INCOMING_DIR, SERIES_DIR, RESULTS_DIR, PURGING_DIR})
LISTED_NAMES = 5
INSTANCE_SUFFIX = ".dcm"
FOLDER_MODE = 0o700
FILE_MODE = 0o600
# File names are UIDs when they are plain UIDs (digits and dots); anything else is hashed
# so that a peer cannot choose a path ("../x") through a malformed UID.
SAFE_UID = re.compile(r"^[0-9][0-9.]{0,63}$")
HASHED_NAME_CHARS = 40


def safe_name(uid: str) -> str:
    """A file name for ``uid``: the UID itself when it is a plain UID, else a digest of it."""
    if SAFE_UID.match(uid) and ".." not in uid:
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:HASHED_NAME_CHARS]


def fsync_dir(folder: Path) -> None:
    """Make a rename or file creation in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder`` and the folders themselves (results before they are recorded)."""
    for root, _dirs, names in os.walk(folder):
        for name in names:
            fd = os.open(Path(root) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))
    fsync_dir(folder.parent)


class SpoolQuotaExceeded(Exception):
    """An instance would take the spool's received instances past its quota; nothing was written."""


def _is_unmarked_spool(root: Path, names: set[str]) -> bool:
    """A spool made before the marker existed: only names of the spool layout, and a job table at its place.

    The job table is checked on a copy (in a temporary folder): SQLite opens a WAL database
    even read-only by creating its ``-wal`` and ``-shm`` files, and a folder that turns out
    not to be a spool must not gain a file.
    """
    if not names <= SPOOL_NAMES or DB_FILENAME not in names or not (root / DB_FILENAME).is_file():
        return False
    if any((root / name).exists() and not (root / name).is_dir() for name in (INCOMING_DIR, SERIES_DIR, RESULTS_DIR)):
        return False
    with tempfile.TemporaryDirectory(prefix="spleen-seg-spool-check-") as scratch:
        for name in (DB_FILENAME, f"{DB_FILENAME}-wal"):
            if (root / name).is_file():
                shutil.copyfile(root / name, Path(scratch) / name)
        return is_job_table(Path(scratch) / DB_FILENAME)


class Spool:
    """The spool folder of one node (see the module docstring for the layout)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.incoming = self.root / INCOMING_DIR
        self.series_root = self.root / SERIES_DIR
        self.results = self.root / RESULTS_DIR
        self.purging = self.root / PURGING_DIR
        self.db_path = self.root / DB_FILENAME
        self.marker = self.root / MARKER_FILENAME
        self._lock_fd: int | None = None
        # Bytes of received instances under series/ plus those being written; None until first
        # needed (then counted from the disk once).
        self._instance_bytes: int | None = None
        self._bytes_lock = threading.Lock()

    def check_ours(self) -> None:
        """Refuse, touching nothing, a ``--spool`` folder this node cannot recognise as a spool.

        Ours: a folder that does not exist yet, an empty one, one with the marker, or one of
        the current layout made before the marker existed (``_is_unmarked_spool``).
        """
        if not self.root.exists():
            return
        if not self.root.is_dir():
            raise NodeError(f"--spool {self.root} is a file, not a folder; pass a folder for the node's spool")
        if self.root.stat().st_uid != os.getuid():
            raise NodeError(f"spool folder {self.root} belongs to another user; pass a --spool folder of your own")
        if self.marker.is_file():
            return
        try:
            names = {entry.name for entry in os.scandir(self.root)}
        except OSError as err:
            raise NodeError(f"cannot read the --spool folder {self.root} ({err.strerror}); pass a folder of your own") \
                from None
        if names and not _is_unmarked_spool(self.root, names):
            shown = ", ".join(sorted(names)[:LISTED_NAMES]) + (", ..." if len(names) > LISTED_NAMES else "")
            raise NodeError(f"--spool {self.root} is not a spleen-seg spool (it holds {shown} and no {MARKER_FILENAME}); "
                            "nothing in it was touched: pass a new or empty folder, which the node makes its spool")

    def create(self) -> Spool:
        """Make the folder a spool: check it is ours (``check_ours``), create the folders (0700) or
        tighten existing ones, write the marker when it is missing."""
        self.check_ours()
        for folder in (self.root, self.incoming, self.series_root, self.results, self.purging):
            folder.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
            if folder.stat().st_uid != os.getuid():
                raise NodeError(f"spool folder {folder} belongs to another user; pass a --spool folder of your own")
            os.chmod(folder, FOLDER_MODE)
            if folder == self.root and not self.marker.is_file():
                # First, before any sub-folder: a kill before it leaves an empty folder (ours again),
                # never a folder of spool names without the marker. Only its presence counts, so a
                # kill in the middle of writing it is harmless too.
                self._write_marker()
        return self

    def _write_marker(self) -> None:
        text = json.dumps({"format": MARKER_FORMAT, "layout": 1, "created_by": f"spleen-seg {__version__}"}) + "\n"
        fd = os.open(self.marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        fsync_dir(self.root)

    def lock(self) -> None:
        """Hold the spool's lock for the life of the process; a second node on it is refused.

        An OS file lock (flock) is released by the kernel when the process dies, even by
        SIGKILL, so a killed node never leaves a stale lock behind.
        """
        import fcntl

        fd = os.open(self.root / LOCK_FILENAME, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise NodeError(f"spool {self.root} is in use by a running node (pid {holder}); stop it or pass "
                            "another --spool") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def series_folder(self, series_key: str) -> Path:
        return self.series_root / safe_name(series_key)

    def result_folder(self, job_id: int, part: str = "") -> Path:
        """``results/job-<id>``; a series split into several volumes puts part ``p`` in ``job-<id>-<p>``."""
        return self.results / (f"job-{job_id:06d}-{part}" if part else f"job-{job_id:06d}")

    def _job_folders(self, job_id: int) -> list[Path]:
        return [self.result_folder(job_id), *self.results.glob(f"job-{job_id:06d}-*")]

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.root))

    # --- the bytes of received instances ------------------------------------------------------

    def instance_bytes(self) -> int:
        """Bytes of the received instances the spool holds (and of those being written)."""
        with self._bytes_lock:
            return self._counted_bytes()

    def _counted_bytes(self) -> int:
        if self._instance_bytes is None:
            self._instance_bytes = sum(path.stat().st_size for path in self.series_root.glob(f"*/*{INSTANCE_SUFFIX}"))
        return self._instance_bytes

    def _add_bytes(self, count: int) -> None:
        with self._bytes_lock:
            self._instance_bytes = self._counted_bytes() + count

    def _reserve(self, count: int, quota_bytes: int | None) -> None:
        with self._bytes_lock:
            held = self._counted_bytes()
            if quota_bytes is not None and held + count > quota_bytes:
                raise SpoolQuotaExceeded(f"spool quota reached: {format_bytes(held)} of received instances held, "
                                         f"quota {format_bytes(quota_bytes)}; accepted again once retention frees space")
            self._instance_bytes = held + count

    def _unlink_counted(self, path: Path) -> None:
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return
        self._add_bytes(-size)

    # --- instances -------------------------------------------------------------------------

    def write_instance(self, series_key: str, sop_instance_uid: str, data: bytes, quota_bytes: int | None = None) -> str:
        """Write one received instance durably; returns its path relative to the spool root.

        The bytes are written as received (DICOM file format: preamble, file meta, the
        dataset in its transfer syntax). Raises ``SpoolQuotaExceeded`` before writing when
        the instance would take the spool past ``quota_bytes``, and ``OSError`` (e.g. disk
        full), after which nothing is left under the final name.
        """
        self._reserve(len(data), quota_bytes)
        fd, tmp_name = tempfile.mkstemp(dir=self.incoming, suffix=".part")  # mkstemp: mode 0600
        tmp = Path(tmp_name)
        written = False
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            folder = self.series_folder(series_key)
            if not folder.is_dir():
                folder.mkdir(mode=FOLDER_MODE, exist_ok=True)
                fsync_dir(self.series_root)
            dest = folder / (safe_name(sop_instance_uid) + INSTANCE_SUFFIX)
            replaced = dest.stat().st_size if dest.is_file() else 0  # a resent instance of a failed job
            os.replace(tmp, dest)
            written = True
            self._add_bytes(-replaced)
            fsync_dir(folder)
        finally:
            tmp.unlink(missing_ok=True)
            if not written:
                self._add_bytes(-len(data))
        return self.relative(dest)

    def remove_instance(self, path: str) -> None:
        """Remove an instance file that was written but not recorded (its C-STORE is answered with a failure)."""
        self._unlink_counted(self.root / path)

    def remove_strays(self, known_instances: set[str]) -> int:
        """Remove what a kill left behind: temporary files and instances never recorded.

        An instance file with no row in the job table was renamed but not committed when
        the node died, so its C-STORE was never acknowledged and the sender will send it
        again. Returns the number of files removed.
        """
        removed = kept_bytes = 0
        for tmp in self.incoming.iterdir():
            tmp.unlink(missing_ok=True)
            removed += 1
        for folder in self.series_root.iterdir():
            for path in folder.iterdir():
                if self.relative(path) not in known_instances:
                    path.unlink(missing_ok=True)
                    removed += 1
                elif path.name.endswith(INSTANCE_SUFFIX):
                    kept_bytes += path.stat().st_size
        for retired in self.purging.iterdir():  # a kill in the middle of a retention sweep
            shutil.rmtree(retired, ignore_errors=True)
        with self._bytes_lock:  # counted on this walk, not again on the first C-STORE (under the lock)
            self._instance_bytes = kept_bytes
        return removed

    def remove_partial_results(self, keep_jobs: set[int]) -> None:
        """Remove result folders of jobs that did not finish processing (and hidden partial folders)."""
        keep = {folder for job in keep_jobs for folder in self._job_folders(job)}
        for folder in self.results.iterdir():
            if folder not in keep:
                shutil.rmtree(folder, ignore_errors=True)

    # --- retention -------------------------------------------------------------------------

    def retire_series(self, series_key: str) -> Path | None:
        """Move a series' folder out of ``series/`` (one rename); returns where it went, None if it had none.

        Retention calls this inside the job-table transaction that marks the series purged,
        so an instance written into the folder before the move is refused when it is
        recorded (its file is gone), and one written after it goes into a new folder.
        """
        folder = self.series_folder(series_key)
        if not folder.is_dir():
            return None
        retired = self.purging / f"{folder.name}-{uuid.uuid4().hex}"
        os.rename(folder, retired)
        return retired

    def delete_retired(self, retired: Path | None, job_ids: list[int]) -> None:
        """Delete a retired series folder (``retire_series``) and the result folders of its jobs."""
        if retired is not None:
            for path in retired.iterdir():
                self._unlink_counted(path)
            shutil.rmtree(retired, ignore_errors=True)
        for job in job_ids:
            for folder in self._job_folders(job):
                shutil.rmtree(folder, ignore_errors=True)
