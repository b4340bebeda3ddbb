"""The node's spool folder: received instances and results on disk, durable and owner-only.

Layout under the spool root (folders 0700, files 0600)::

    jobs.sqlite        the job table (see jobs.py)
    node.lock          held by the running node: one node per spool
    incoming/          instances being written (temporary names; removed on start)
    series/<series>/<sop instance>.dcm   received instances, as received (no re-encoding)
    results/job-<id>/  what a job produced: spleen_seg.dcm, report.json, ...

An instance is durable before its C-STORE is acknowledged: written under a temporary
name, fsync'd, renamed into its series folder, and the folder fsync'd, so neither a
SIGKILL nor a power cut can leave a truncated file under a final name.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from spleen_seg.errors import NodeError

DB_FILENAME = "jobs.sqlite"
LOCK_FILENAME = "node.lock"
INCOMING_DIR = "incoming"
SERIES_DIR = "series"
RESULTS_DIR = "results"
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


class Spool:
    """The spool folder of one node (see the module docstring for the layout)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.incoming = self.root / INCOMING_DIR
        self.series_root = self.root / SERIES_DIR
        self.results = self.root / RESULTS_DIR
        self.db_path = self.root / DB_FILENAME
        self._lock_fd: int | None = None

    def create(self) -> Spool:
        """Create the folders (0700) or tighten existing ones; refuse a spool owned by someone else."""
        for folder in (self.root, self.incoming, self.series_root, self.results):
            folder.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
            if folder.stat().st_uid != os.getuid():
                raise NodeError(f"spool folder {folder} belongs to another user; pass a --spool folder of your own")
            os.chmod(folder, FOLDER_MODE)
        return self

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

    def write_instance(self, series_key: str, sop_instance_uid: str, data: bytes) -> str:
        """Write one received instance durably; returns its path relative to the spool root.

        The bytes are written as received (DICOM file format: preamble, file meta, the
        dataset in its transfer syntax). Raises ``OSError`` (e.g. disk full), after
        which nothing is left under the final name.
        """
        fd, tmp_name = tempfile.mkstemp(dir=self.incoming, suffix=".part")  # mkstemp: mode 0600
        tmp = Path(tmp_name)
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
            os.replace(tmp, dest)
            fsync_dir(folder)
        finally:
            tmp.unlink(missing_ok=True)
        return self.relative(dest)

    def remove_strays(self, known_instances: set[str]) -> int:
        """Remove what a kill left behind: temporary files and instances never recorded.

        An instance file with no row in the job table was renamed but not committed when
        the node died, so its C-STORE was never acknowledged and the sender will send it
        again. Returns the number of files removed.
        """
        removed = 0
        for tmp in self.incoming.iterdir():
            tmp.unlink(missing_ok=True)
            removed += 1
        for folder in self.series_root.iterdir():
            for path in folder.iterdir():
                if self.relative(path) not in known_instances:
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed

    def remove_partial_results(self, keep_jobs: set[int]) -> None:
        """Remove result folders of jobs that did not finish processing (and hidden partial folders)."""
        keep = {folder for job in keep_jobs for folder in self._job_folders(job)}
        for folder in self.results.iterdir():
            if folder not in keep:
                shutil.rmtree(folder, ignore_errors=True)

    def purge_series(self, series_key: str, job_ids: list[int]) -> None:
        """Delete a series' instances and its jobs' results (retention)."""
        shutil.rmtree(self.series_folder(series_key), ignore_errors=True)
        for job in job_ids:
            for folder in self._job_folders(job):
                shutil.rmtree(folder, ignore_errors=True)
