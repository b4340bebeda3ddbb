"""``spleen-seg review OUT``: the review app under uvicorn, on 127.0.0.1 unless told otherwise.

It prints the URL to open, with a fresh random access token in it (as Jupyter does); every
request without the token is refused. Before serving, it finishes or drops what a killed
server left under way (``store.ReviewStore.recover``).
"""

from __future__ import annotations

import getpass
import ipaddress
import logging
import os
import secrets
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from spleen_seg.errors import ConfigError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
# Voxels of a view (review/viewgrid.py): 4 M show in a few seconds in a browser without a GPU
# (SwiftShader on two busy cores, benchmarks/bench_review.py); a GPU takes 64 M as fast.
DEFAULT_MAX_VIEW_VOXELS = 1 << 22
TOKEN_BYTES = 32
# At most this many connections and requests at once; beyond, uvicorn answers 503.
MAX_CONCURRENT = 32
KEEP_ALIVE_S = 5
# A connection that has not sent its first request's headers by then is closed.
FIRST_REQUEST_TIMEOUT_S = 5.0
# h11's bound on a request's headers (bytes): a peer cannot make us buffer more before we know who it is.
MAX_HEADER_BYTES = 16 << 10
# Where web/ (package.json, node_modules) lies in a checkout; SPLEEN_SEG_WEB names another.
WEB_ENV = "SPLEEN_SEG_WEB"
WEB_DIR = Path(__file__).resolve().parents[3] / "web"
LOOPBACK_NAMES = ("localhost",)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReviewSettings:
    out_dir: Path
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    reviewer: str = ""
    max_view_voxels: int = DEFAULT_MAX_VIEW_VOXELS
    token: str | None = None  # None: a new random one


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def niivue_module() -> Path:
    """NiiVue's ES module from ``web/node_modules`` (installed by ``npm ci`` in ``make test``/``make demo``)."""
    from spleen_seg.review.app import NIIVUE_MODULE

    web = Path(os.environ.get(WEB_ENV, WEB_DIR))
    path = web / "node_modules" / NIIVUE_MODULE
    if not path.is_file():
        raise ConfigError(f"the viewer's NiiVue module is not installed ({path} missing): run `npm ci --prefix {web}` "
                          f"(make test and make demo do), or set {WEB_ENV} to a folder holding node_modules/")
    return path


def _timed_protocol():
    """uvicorn's h11 protocol, closing a connection that sends no request within ``FIRST_REQUEST_TIMEOUT_S``.

    uvicorn times out idle keep-alive connections but not one that never completes its
    first request, so a few silent sockets would hold every ``MAX_CONCURRENT`` slot.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class FirstRequestTimeoutProtocol(H11Protocol):
        def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
            super().connection_made(transport)
            self.loop.call_later(FIRST_REQUEST_TIMEOUT_S, self._close_if_silent)

        def _close_if_silent(self) -> None:
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()

    return FirstRequestTimeoutProtocol


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({err.strerror}); pass another --port (0: any free one)") \
            from None
    sock.listen(MAX_CONCURRENT)
    return sock


def review(settings: ReviewSettings) -> int:
    """Load the output folder, recover, print the URL and serve until Ctrl-C; returns the exit status."""
    import time

    import uvicorn

    from spleen_seg.review.app import ReviewApp, build_app
    from spleen_seg.review.cases import load_index
    from spleen_seg.review.source import seg_writer
    from spleen_seg.review.store import ReviewRefused, ReviewStore
    from spleen_seg.review.views import CaseViews

    start = time.perf_counter()
    niivue = niivue_module()
    index = load_index(settings.out_dir)
    try:
        store = ReviewStore(index, settings.reviewer or getpass.getuser())
    except ReviewRefused as err:
        raise ConfigError(f"--reviewer: {err}") from None

    def write_seg_for(entry):
        try:
            return seg_writer(entry, store.state(entry).report)
        except (ReviewRefused, ValueError, OSError) as err:
            logger.warning("%s: no corrected SEG written on recovery (%s)", entry.case, err)
            return None

    for line in store.recover(write_seg_for):
        logger.warning("recovered %s", line)
    token = settings.token or secrets.token_urlsafe(TOKEN_BYTES)
    sock = _bind(settings.host, settings.port)
    port = sock.getsockname()[1]
    loopback = is_loopback(settings.host)
    allowed = ["127.0.0.1", "localhost", "::1", settings.host] if loopback else ["*"]
    app = build_app(ReviewApp(index=index, store=store, views=CaseViews(settings.max_view_voxels),
                              niivue_path=niivue, title=settings.out_dir.resolve().name), token, port, allowed)
    shown = settings.host if loopback or settings.host not in ("0.0.0.0", "::") else socket.gethostname()
    shown = f"[{shown}]" if ":" in shown else shown
    print(f"spleen-seg review: {len(index.order)} cases to review of {len(index.entries)} in {settings.out_dir} "
          f"({index.layout}; loaded in {time.perf_counter() - start:.2f} s), reviewer {store.reviewer}", flush=True)
    if not loopback:
        print(f"warning: listening on {settings.host}, beyond this machine: anyone who can reach port {port} and "
              "sees the token (plain HTTP) can review; prefer 127.0.0.1 and an SSH tunnel", file=sys.stderr, flush=True)
    print(f"open http://{shown}:{port}/cases/?token={token}", flush=True)
    config = uvicorn.Config(app, log_level="warning", limit_concurrency=MAX_CONCURRENT, timeout_keep_alive=KEEP_ALIVE_S,
                            h11_max_incomplete_event_size=MAX_HEADER_BYTES, http=_timed_protocol(),
                            access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    return 0
