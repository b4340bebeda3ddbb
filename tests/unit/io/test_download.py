"""Tests for spleen_seg.io.download: the resumable, retrying, md5-checking downloader."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import pytest
from http_server import serve

from spleen_seg.errors import ConfigError, DownloadError
from spleen_seg.io import download
from spleen_seg.io.download import download_file

PAYLOAD_BYTES = 200_000
DROP_AT = 70_000


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries wait RETRY_BACKOFF_S * 2**n; tests do not need to wait."""
    monkeypatch.setattr(download, "RETRY_BACKOFF_S", 0.0)


def _payload() -> bytes:
    """Deterministic non-repeating bytes, so an offset error changes the md5."""
    return bytes((i * 7 + i // 251) % 256 for i in range(PAYLOAD_BYTES))


def _md5(blob: bytes) -> str:
    return hashlib.md5(blob).hexdigest()


def test_download_correct_md5(tmp_path: Path) -> None:
    blob = _payload()
    dest = tmp_path / "sub" / "file.bin"
    with serve({"file.bin": blob}) as server:
        out = download_file(server.url_for("file.bin"), dest, _md5(blob), progress=False)
    assert out == dest
    assert dest.read_bytes() == blob
    assert not dest.with_name("file.bin.part").exists()
    assert [r.status for r in server.requests] == [200]
    assert server.requests[0].range_header is None


def test_download_progress_bar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blob = _payload()
    with serve({"file.bin": blob}) as server:
        download_file(server.url_for("file.bin"), tmp_path / "file.bin", _md5(blob), progress=True)
    err = capsys.readouterr().err
    # tqdm with unit_divisor=1024: 200,000 bytes is 195k.
    assert "file.bin" in err
    assert "195k/195k" in err


def test_download_wrong_md5_leaves_nothing(tmp_path: Path) -> None:
    blob = _payload()
    dest = tmp_path / "file.bin"
    wrong = "0" * 32
    with serve({"file.bin": blob}) as server, pytest.raises(DownloadError) as info:
        download_file(server.url_for("file.bin"), dest, wrong, progress=False)
    message = str(info.value)
    assert server.url_for("file.bin") in message
    assert wrong in message and _md5(blob) in message
    assert not dest.exists()
    assert not dest.with_name("file.bin.part").exists()


def test_dropped_connection_resumes_with_range(tmp_path: Path) -> None:
    blob = _payload()
    dest = tmp_path / "file.bin"
    with serve({"file.bin": blob}, drop_after=DROP_AT) as server:
        download_file(server.url_for("file.bin"), dest, _md5(blob), progress=False)
    assert dest.read_bytes() == blob
    assert [(r.range_header, r.status) for r in server.requests] == [
        (None, 200),
        (f"bytes={DROP_AT}-", 206),
    ]


def test_stalled_connection_times_out_and_resumes(tmp_path: Path) -> None:
    blob = _payload()
    dest = tmp_path / "file.bin"
    with serve({"file.bin": blob}, drop_after=DROP_AT, stall_s=1.0) as server:
        download_file(server.url_for("file.bin"), dest, _md5(blob), progress=False, timeout_s=0.2)
    assert dest.read_bytes() == blob
    assert [r.range_header for r in server.requests] == [None, f"bytes={DROP_AT}-"]


def test_existing_part_is_resumed(tmp_path: Path) -> None:
    blob = _payload()
    dest = tmp_path / "file.bin"
    dest.with_name("file.bin.part").write_bytes(blob[:12_345])
    with serve({"file.bin": blob}) as server:
        download_file(server.url_for("file.bin"), dest, _md5(blob), progress=False)
    assert dest.read_bytes() == blob
    assert [r.range_header for r in server.requests] == ["bytes=12345-"]


def test_server_without_range_restarts(tmp_path: Path) -> None:
    blob = _payload()
    dest = tmp_path / "file.bin"
    with serve({"file.bin": blob}, drop_after=DROP_AT, support_range=False) as server:
        download_file(server.url_for("file.bin"), dest, _md5(blob), progress=False)
    assert dest.read_bytes() == blob
    # The client asked to resume; the server answered 200 with the whole file.
    assert [(r.range_header, r.status) for r in server.requests] == [
        (None, 200),
        (f"bytes={DROP_AT}-", 200),
    ]


def test_oversized_part_restarts_after_416(tmp_path: Path) -> None:
    blob = _payload()
    dest = tmp_path / "file.bin"
    dest.with_name("file.bin.part").write_bytes(blob + b"junk")
    with serve({"file.bin": blob}) as server:
        download_file(server.url_for("file.bin"), dest, _md5(blob), progress=False)
    assert dest.read_bytes() == blob
    assert [r.status for r in server.requests] == [416, 200]


def test_retries_exhausted_keeps_part(tmp_path: Path) -> None:
    blob = _payload()
    dest = tmp_path / "file.bin"
    with (
        serve({"file.bin": blob}, drop_after=1000, drop_count=10) as server,
        pytest.raises(DownloadError, match="after 3 attempts"),
    ):
        download_file(server.url_for("file.bin"), dest, _md5(blob), progress=False, retries=2)
    assert len(server.requests) == 3
    assert not dest.exists()
    # Each attempt resumed and added 1000 bytes; the next run can go on from there.
    assert dest.with_name("file.bin.part").read_bytes() == blob[:3000]


def test_server_error_is_retried(tmp_path: Path) -> None:
    blob = _payload()
    dest = tmp_path / "file.bin"
    with serve({"file.bin": blob}, error_status=503) as server:
        download_file(server.url_for("file.bin"), dest, _md5(blob), progress=False)
    assert dest.read_bytes() == blob
    assert [r.status for r in server.requests] == [503, 200]


def test_404_raises_without_retry(tmp_path: Path) -> None:
    dest = tmp_path / "missing.bin"
    with serve({}) as server, pytest.raises(DownloadError) as info:
        download_file(server.url_for("missing.bin"), dest, None, progress=False)
    assert "404" in str(info.value)
    assert server.url_for("missing.bin") in str(info.value)
    assert len(server.requests) == 1
    assert not dest.exists()


def test_unreachable_host(tmp_path: Path) -> None:
    # A port that was free a moment ago: connecting to it is refused.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/file.bin"
    with pytest.raises(DownloadError) as info:
        download_file(url, tmp_path / "file.bin", None, progress=False, retries=1)
    assert url in str(info.value)
    assert not (tmp_path / "file.bin").exists()


def test_cache_hit_makes_no_request(tmp_path: Path) -> None:
    blob = _payload()
    dest = tmp_path / "file.bin"
    dest.write_bytes(blob)
    with serve({"file.bin": b"different"}) as server:
        download_file(server.url_for("file.bin"), dest, _md5(blob), progress=False)
    assert server.requests == []
    assert dest.read_bytes() == blob


def test_corrupt_dest_is_replaced(tmp_path: Path) -> None:
    blob = _payload()
    dest = tmp_path / "file.bin"
    dest.write_bytes(b"corrupt")
    with serve({"file.bin": blob}) as server:
        download_file(server.url_for("file.bin"), dest, _md5(blob), progress=False)
    assert dest.read_bytes() == blob
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    ("url", "md5"),
    [("ftp://example.org/x.tar", None), ("http://127.0.0.1/x.tar", "not-an-md5")],
)
def test_bad_download_arguments(tmp_path: Path, url: str, md5: str | None) -> None:
    with pytest.raises(ConfigError):
        download_file(url, tmp_path / "x.tar", md5, progress=False)


