"""io/atomic.py: complete files only, and the permissions of a plain open() without touching the umask."""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

import pytest

from spleen_seg.io.atomic import atomic_path, atomic_write_text

# Umasks a user runs under: 022 (group and others read) and 027 (others nothing).
USER_UMASK = 0o022
PRIVATE_UMASK = 0o027
# A thread may lose the processor between any two calls; os.umask holds it this long after
# each change, as such a preemption would, so that a moment with another umask is seen every time.
PREEMPTION_S = 0.001
ATOMIC_WRITES = 100
PLAIN_WRITERS = 2
ATOMIC_WRITERS = 2
REAL_UMASK = os.umask


@pytest.fixture
def umask():
    """Set the process umask for one test and restore the caller's afterwards."""
    previous = REAL_UMASK(USER_UMASK)
    yield REAL_UMASK
    REAL_UMASK(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_get_the_mode_a_plain_open_gives(tmp_path, umask):
    for mask in (USER_UMASK, PRIVATE_UMASK):
        umask(mask)
        plain = tmp_path / f"plain-{mask:o}.txt"
        plain.write_text("x")
        atomic_write_text(tmp_path / f"atomic-{mask:o}.txt", "x")
        assert mode(tmp_path / f"atomic-{mask:o}.txt") == mode(plain) == 0o666 & ~mask


def test_threads_writing_beside_atomic_writes_never_make_a_world_writable_file(tmp_path, umask, monkeypatch):
    """Plain open() and atomic writes in several threads at once: under a 022 umask no file may come
    out writable by others (the old code set the umask to 0 for a moment on every atomic write;
    here that moment lasts as long as a preemption there would)."""

    def preempted_umask(mask: int) -> int:
        previous = REAL_UMASK(mask)
        time.sleep(PREEMPTION_S)
        return previous

    monkeypatch.setattr(os, "umask", preempted_umask)
    stop = threading.Event()
    errors: list[BaseException] = []

    def plain_writer(number: int) -> None:
        count = 0
        try:
            while not stop.is_set():
                with open(tmp_path / f"plain-{number}-{count}.txt", "w") as handle:
                    handle.write("x")
                count += 1
        except BaseException as err:  # noqa: BLE001  # reported by the main thread
            errors.append(err)

    def atomic_writer(number: int) -> None:
        try:
            for count in range(ATOMIC_WRITES):
                atomic_write_text(tmp_path / f"atomic-{number}-{count}.txt", "x")
        except BaseException as err:  # noqa: BLE001  # reported by the main thread
            errors.append(err)

    plain = [threading.Thread(target=plain_writer, args=(n,)) for n in range(PLAIN_WRITERS)]
    atomic = [threading.Thread(target=atomic_writer, args=(n,)) for n in range(ATOMIC_WRITERS)]
    for thread in plain + atomic:
        thread.start()
    for thread in atomic:
        thread.join()
    stop.set()
    for thread in plain:
        thread.join()
    assert not errors, errors
    files = list(tmp_path.iterdir())
    assert sum(path.name.startswith("atomic-") for path in files) == ATOMIC_WRITERS * ATOMIC_WRITES
    assert sum(path.name.startswith("plain-") for path in files) > 0
    writable = sorted(path.name for path in files if mode(path) & stat.S_IWOTH)
    assert writable == [], f"{len(writable)} of {len(files)} files world-writable, e.g. {writable[:5]}"
    assert {mode(path) for path in files} == {0o644}


def test_a_failed_write_leaves_neither_the_file_nor_its_temporary(tmp_path):
    dest = tmp_path / "mask.nii.gz"
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        assert tmp.name.startswith(".mask.nii.gz.") and tmp.name.endswith(".part.nii.gz") and tmp.is_file()
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert list(tmp_path.iterdir()) == []
