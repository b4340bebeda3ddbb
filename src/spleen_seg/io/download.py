"""HTTP downloads that resume, retry, verify an md5 and never leave a half-written file; file digests.

Only the standard library, so that fetching data or weights needs neither network
credentials nor extra packages.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from spleen_seg.errors import ConfigError, DownloadError

logger = logging.getLogger(__name__)

# Download tuning. The backoff doubles after every failed attempt.
CHUNK_BYTES = 1 << 20
RETRY_BACKOFF_S = 1.0
USER_AGENT = "spleen-seg-downloader"
PART_SUFFIX = ".part"
MD5_HEX_LENGTH = 32
HTTP_OK = 200
HTTP_PARTIAL_CONTENT = 206
HTTP_RANGE_NOT_SATISFIABLE = 416
HTTP_TOO_MANY_REQUESTS = 429
HTTP_SERVER_ERROR = 500
CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


class _TransientError(Exception):
    """A failure worth retrying: dropped connection, timeout, 5xx, short body."""


class _RestartError(_TransientError):
    """The ``.part`` cannot be resumed (bad Content-Range answer); retry from byte 0."""


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file (weights identity in reports, run records and export caches)."""
    return _file_digest(path, "sha256")


def file_md5(path: str | Path) -> str:
    """Hex md5 of a file, read in chunks so multi-GB archives need little memory."""
    return _file_digest(path, "md5")


def _file_digest(path: str | Path, algorithm: str) -> str:
    stat = Path(path).stat()
    return _digest_of(str(Path(path).resolve()), algorithm, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _digest_of(path: str, algorithm: str, size: int, mtime_ns: int) -> str:
    # Keyed by size and mtime too: a rewritten file is hashed again.
    return hash_file(path, algorithm)


def hash_file(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file read in chunks, uncached: for files rewritten under one name within the
    file system's timestamp resolution (the review app's staged masks), where the cached digests'
    (size, mtime) key could return a stale one."""
    digest = hashlib.new(algorithm)
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_download_args(url: str, md5: str | None, retries: int, timeout_s: float) -> None:
    """Reject bad arguments before touching the network."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise ConfigError(f"download URL {url!r} must start with http:// or https://")
    if md5 is not None and not re.fullmatch(rf"[0-9a-fA-F]{{{MD5_HEX_LENGTH}}}", md5):
        raise ConfigError(
            f"md5 {md5!r} for {url} is not {MD5_HEX_LENGTH} hex digits; pass the archive's "
            "md5 or None to skip the check"
        )
    if retries < 0:
        raise ConfigError(f"retries={retries} must be >= 0")
    if timeout_s <= 0:
        raise ConfigError(f"timeout_s={timeout_s} must be > 0 seconds")


def download_file(
    url: str,
    dest: Path,
    md5: str | None,
    *,
    progress: bool = True,
    timeout_s: float = 60,
    retries: int = 3,
) -> Path:
    """Download ``url`` to ``dest``, resuming and retrying, and verify its md5.

    Bytes stream into ``dest.name + ".part"``; a ``.part`` left by an earlier run is
    resumed with an HTTP ``Range`` request (a server that ignores ``Range`` restarts from
    byte 0). Dropped connections, timeouts, short bodies and 5xx/429 answers are retried
    up to ``retries`` times, each resuming where the last stopped. The finished file must
    match ``md5`` (skipped when ``None``) before it is atomically renamed to ``dest``, so
    ``dest`` is never half-written. An existing ``dest`` with the right md5 is returned
    without any network access; one with a wrong md5 is deleted and downloaded again.

    Returns:
        ``dest``.

    Raises:
        ConfigError: bad URL scheme, md5 format, ``retries`` or ``timeout_s``.
        DownloadError: HTTP 4xx, retries exhausted, or checksum mismatch (the ``.part``
            is then deleted).
    """
    _check_download_args(url, md5, retries, timeout_s)
    dest = Path(dest)
    expected = md5.lower() if md5 is not None else None
    if dest.is_file():
        if expected is None:
            logger.info("%s exists and no md5 was given; using it as is", dest)
            return dest
        actual = file_md5(dest)
        if actual == expected:
            logger.info("%s exists with the expected md5; skipping download", dest)
            return dest
        logger.warning("%s has md5 %s, expected %s; downloading again", dest, actual, expected)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + PART_SUFFIX)

    failures = 0
    while True:
        try:
            _download_attempt(url, part, timeout_s=timeout_s, progress=progress)
            break
        except _TransientError as err:
            failures += 1
            if failures > retries:
                raise DownloadError(
                    f"download of {url} failed after {failures} attempts ({err}); check the "
                    f"network and rerun: the {part.stat().st_size if part.exists() else 0} "
                    f"bytes kept in {part} will be resumed"
                ) from err
            delay_s = RETRY_BACKOFF_S * 2 ** (failures - 1)
            logger.warning("%s: %s; retry %d/%d in %.1f s", url, err, failures, retries, delay_s)
            time.sleep(delay_s)

    if expected is not None:
        actual = file_md5(part)
        if actual != expected:
            part.unlink()
            raise DownloadError(
                f"{url} downloaded with md5 {actual} but {expected} was expected; the "
                "partial file was deleted: rerun, and check the URL and md5 if it persists"
            )
    os.replace(part, dest)
    return dest


def _download_attempt(url: str, part: Path, *, timeout_s: float, progress: bool) -> None:
    """One HTTP request that continues (or restarts) ``part`` until the body ends."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset > 0:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code == HTTP_RANGE_NOT_SATISFIABLE and offset > 0:
            # The .part is as long as (or longer than) the file: it cannot be resumed.
            part.unlink()
            raise _TransientError(f"HTTP 416 resuming at byte {offset}; restarting") from err
        if err.code >= HTTP_SERVER_ERROR or err.code == HTTP_TOO_MANY_REQUESTS:
            raise _TransientError(f"HTTP {err.code} {err.reason}") from err
        raise DownloadError(f"download of {url} failed with HTTP {err.code} {err.reason}; check the URL") from err
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        reason = getattr(err, "reason", err)
        raise _TransientError(f"cannot reach {url}: {reason}") from err

    with response:
        try:
            offset, total = _resume_offset(response, offset)
        except _RestartError:
            part.unlink()
            raise
        length_header = response.headers.get("Content-Length")
        body_bytes = int(length_header) if length_header is not None else None
        with (
            part.open("ab" if offset > 0 else "wb") as handle,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=part.name.removesuffix(PART_SUFFIX),
                disable=not progress,
            ) as bar,
        ):
            received = _copy_body(response, handle, bar)
    if body_bytes is not None and received < body_bytes:
        raise _TransientError(f"connection closed after {offset + received} of {offset + body_bytes} bytes")


def _resume_offset(response: http.client.HTTPResponse, offset: int) -> tuple[int, int | None]:
    """Where the response body starts in the file, and the file size when known.

    A 206 must continue exactly at ``offset``; a 200 (server ignored ``Range``) restarts
    from byte 0, so the caller rewrites the ``.part`` from scratch.
    """
    if response.status == HTTP_PARTIAL_CONTENT:
        match = CONTENT_RANGE_RE.fullmatch(response.headers.get("Content-Range", "").strip())
        if match is None or int(match.group(1)) != offset:
            raise _RestartError(
                f"server answered Range bytes={offset}- with Content-Range "
                f"{response.headers.get('Content-Range')!r}; restarting"
            )
        total = None if match.group(3) == "*" else int(match.group(3))
        return offset, total
    if offset > 0:
        logger.info("server ignored the Range request; restarting from byte 0")
    length_header = response.headers.get("Content-Length")
    return 0, int(length_header) if length_header is not None else None


def _copy_body(response: http.client.HTTPResponse, handle: BinaryIO, bar: tqdm) -> int:
    """Copy the response body into ``handle``; returns bytes written.

    Bytes received before a failure are flushed to disk first, so the retry resumes after
    them instead of downloading them again.
    """
    received = 0
    while True:
        try:
            # read1 returns what has arrived; read() would block for a full chunk and
            # lose the buffered bytes if the socket then times out.
            chunk = response.read1(CHUNK_BYTES)
        except http.client.IncompleteRead as err:
            handle.write(err.partial)
            received += len(err.partial)
            raise _TransientError(f"connection dropped after {received} body bytes") from err
        except (http.client.HTTPException, OSError) as err:
            raise _TransientError(f"connection failed after {received} body bytes: {err}") from err
        if not chunk:
            return received
        handle.write(chunk)
        received += len(chunk)
        bar.update(len(chunk))


