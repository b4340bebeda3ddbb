"""A local HTTP file server for download tests (no internet needed).

``serve`` starts a threaded server on 127.0.0.1 with a free port, serves in-memory
files, can misbehave on purpose (drop or stall the connection part-way, ignore
``Range``, answer an error status first) and records every request so tests can assert
how the client behaved.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCALHOST = "127.0.0.1"
# serve_forever checks for shutdown this often; the default 0.5 s slows every test.
POLL_INTERVAL_S = 0.01
RANGE_RE = re.compile(r"bytes=(\d+)-(\d*)")
HTTP_OK = 200
HTTP_PARTIAL_CONTENT = 206
HTTP_NOT_FOUND = 404
HTTP_RANGE_NOT_SATISFIABLE = 416


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server saw it."""

    path: str
    range_header: str | None
    status: int


@dataclass
class ServedFiles:
    """Handle returned by :func:`serve`: the base URL and the requests seen so far."""

    url: str
    files: dict[str, bytes]
    drop_after: int | None
    drop_count: int
    stall_s: float
    support_range: bool
    error_status: int | None
    error_count: int
    requests: list[RecordedRequest] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url_for(self, name: str) -> str:
        """Full URL of a served file name."""
        return f"{self.url}/{name}"


def _make_handler(state: ServedFiles) -> type[BaseHTTPRequestHandler]:
    """Build a request handler bound to ``state``."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            """Keep test output quiet."""

        def do_GET(self) -> None:
            range_header = self.headers.get("Range")
            with state.lock:
                index = len(state.requests)
                status, start = self._plan(range_header, index)
                state.requests.append(RecordedRequest(self.path, range_header, status))
            self.close_connection = True
            if status != HTTP_OK and status != HTTP_PARTIAL_CONTENT:
                self._send_empty(status)
                return
            data = state.files[self.path.lstrip("/")]
            body = data[start:]
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes" if state.support_range else "none")
            if status == HTTP_PARTIAL_CONTENT:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if state.drop_after is not None and index < state.drop_count:
                # Send part of the body, optionally go silent, then hang up.
                self.wfile.write(body[: state.drop_after])
                self.wfile.flush()
                time.sleep(state.stall_s)
                return
            self.wfile.write(body)

        def _plan(self, range_header: str | None, index: int) -> tuple[int, int]:
            """Status and first body byte for this request."""
            if state.error_status is not None and index < state.error_count:
                return state.error_status, 0
            data = state.files.get(self.path.lstrip("/"))
            if data is None:
                return HTTP_NOT_FOUND, 0
            match = RANGE_RE.fullmatch(range_header or "")
            if not state.support_range or match is None:
                return HTTP_OK, 0
            start = int(match.group(1))
            if start >= len(data):
                return HTTP_RANGE_NOT_SATISFIABLE, 0
            return HTTP_PARTIAL_CONTENT, start

        def _send_empty(self, status: int) -> None:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler


@contextmanager
def serve(
    files: dict[str, bytes],
    *,
    drop_after: int | None = None,
    drop_count: int = 1,
    stall_s: float = 0.0,
    support_range: bool = True,
    error_status: int | None = None,
    error_count: int = 1,
) -> Iterator[ServedFiles]:
    """Serve ``files`` (name -> bytes) at ``http://127.0.0.1:<free port>/<name>``.

    Args:
        files: file name (no leading slash) to content.
        drop_after: when set, the first ``drop_count`` successful requests send only this
            many body bytes (after a full Content-Length header) and close the connection.
        drop_count: how many requests are dropped.
        stall_s: seconds to stay silent before hanging up a dropped request, to make the
            client's read time out.
        support_range: answer ``Range: bytes=N-`` with 206; when False, always send 200
            and the whole file.
        error_status: when set, the first ``error_count`` requests get this status.
        error_count: how many requests get ``error_status``.
    """
    server = ThreadingHTTPServer((LOCALHOST, 0), BaseHTTPRequestHandler)
    port = server.server_address[1]
    state = ServedFiles(
        url=f"http://{LOCALHOST}:{port}",
        files=files,
        drop_after=drop_after,
        drop_count=drop_count,
        stall_s=stall_s,
        support_range=support_range,
        error_status=error_status,
        error_count=error_count,
    )
    server.RequestHandlerClass = _make_handler(state)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(POLL_INTERVAL_S,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
