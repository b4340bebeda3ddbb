"""Atomic file writes: a reader sees the old file or the complete new one, never a part.

Each writer writes a temporary file in the destination's folder (same file system, so
``os.replace`` is an atomic rename) and renames it only once the content is complete.

The temporary file is created with mode 0666 and ``O_EXCL``, so the kernel applies the
process umask (or the folder's default ACL) itself, as for a plain ``open()``. The umask is
never read: reading it means setting it (``os.umask`` has no getter), and setting it to 0
for a moment made files other threads created in that moment world-writable.
``/proc/self/status`` (``Umask:``) would read it without setting it, but only on Linux and
it would still miss a default ACL; a umask read once at import is set at import, from
whatever thread imports first, and misses a later ``os.umask``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

# What a plain open() asks for; the kernel removes the umask's bits.
NEW_FILE_MODE = 0o666
# O_EXCL on a random name: a clash with another writer is retried under a new name.
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
MAX_NAME_ATTEMPTS = 100
RANDOM_NAME_BYTES = 6


def _create_temporary(dest: Path, suffix: str) -> Path:
    """A new empty file beside ``dest`` that no other writer holds, named ``.<dest name>.<random>.part<suffix>``."""
    for _attempt in range(MAX_NAME_ATTEMPTS):
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(RANDOM_NAME_BYTES)}.part{suffix}")
        try:
            os.close(os.open(tmp, CREATE_FLAGS, NEW_FILE_MODE))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"{dest.parent}: no free temporary name for {dest.name} after {MAX_NAME_ATTEMPTS} attempts")


@contextlib.contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it to ``dest`` if the block succeeds.

    The temporary name keeps ``dest``'s suffixes (``.nii.gz``) so writers that pick a
    format by extension still work. The file gets the permissions a plain ``open()`` would
    give it. On any exception the temporary file is removed.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temporary(dest, "".join(dest.suffixes) or ".tmp")
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(dest: str | Path, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(dest: str | Path, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)
