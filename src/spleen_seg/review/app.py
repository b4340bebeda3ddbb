"""The review app's HTTP side: routes, the access token, the page headers and the bounds on requests.

Routes (every one behind the token, see :class:`TokenGate`)::

    GET  /                               -> /cases/
    GET  /cases/                         the cohort page (outputs/cohort.py) with each case's review state
    GET  /cases/<case>/                  the viewer (static page; the case id is read from the URL)
    GET  /cases/<case>/<file>            a file of the case folder, by name (cases.CASE_FILES)
    GET  /static/<file>                  the viewer's script and style; niivue.js from web/node_modules
    GET  /api/cases                      the cases in review order
    GET  /api/cases/<case>               report numbers, flags, review state, view grid, neighbours
    GET  /api/cases/<case>/<view>/ct.nii.gz     the CT on the view
    GET  /api/cases/<case>/<view>/mask.nii.gz   the current mask on the view
    POST /api/cases/<case>/decision      {"decision": "accepted"|"rejected", "comment": "...", "revision": N}
    PUT  /api/cases/<case>/<view>/mask?revision=N   the drawing (NIfTI, gzip or not) -> spleen_corrected.nii.gz

Starlette under uvicorn: a small, well-kept ASGI toolkit whose request body is a stream we
can bound while reading, and whose routing we can keep explicit; FastAPI would add pydantic
models and OpenAPI pages that four JSON endpoints do not need.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from spleen_seg.errors import SpleenSegError
from spleen_seg.outputs.report import REPORT_FILENAME
from spleen_seg.outputs.review_state import review_status
from spleen_seg.review.cases import CaseEntry, CaseIndex, case_file
from spleen_seg.review.store import Conflict, ReviewRefused, ReviewStore
from spleen_seg.review.viewgrid import apply_drawing
from spleen_seg.review.views import WINDOW_HU, CaseViews, drawing_limit_bytes, read_drawing

STATIC_DIR = Path(__file__).with_name("static")
STATIC_FILES = {"viewer.js": "text/javascript", "viewer.css": "text/css"}
NIIVUE_MODULE = Path("@niivue") / "niivue" / "dist" / "index.js"
TOKEN_PARAM = "token"
COOKIE_PREFIX = "spleen_review_"
# A decision is a few hundred bytes; its comment at most store.MAX_COMMENT_CHARS characters.
MAX_JSON_BODY_BYTES = 16 << 10
# A stalled upload is dropped: no chunk for this long, or not finished within the total.
BODY_IDLE_TIMEOUT_S = 10.0
BODY_TOTAL_TIMEOUT_S = 120.0
CSP = ("default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; font-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"), (b"cache-control", b"no-store")]
INLINE_BLOCK = re.compile(r"<(script|style)>(.*?)</\1>", re.DOTALL)

logger = logging.getLogger(__name__)


@dataclass
class ReviewApp:
    """What the routes share: the case index, the store of decisions, the views, the page's assets."""

    index: CaseIndex
    store: ReviewStore
    views: CaseViews
    niivue_path: Path
    title: str


def _hash_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def page_csp(html_text: str) -> str:
    """The CSP of a page whose only scripts and styles are its inline blocks (the cohort page): their hashes."""
    blocks: dict[str, list[str]] = {"script": [], "style": []}
    for kind, body in INLINE_BLOCK.findall(html_text):
        blocks[kind].append(_hash_source(body))
    return (f"default-src 'none'; script-src {' '.join(blocks['script']) or chr(39) + 'none' + chr(39)}; "
            f"style-src {' '.join(blocks['style']) or chr(39) + 'none' + chr(39)}; img-src 'self'; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _refused(err: ReviewRefused) -> JSONResponse:
    body: dict[str, Any] = {"error": str(err)}
    if isinstance(err, Conflict):
        body["revision"] = err.current
    return JSONResponse(body, status_code=err.status)


def _entry(app: ReviewApp, request: Request) -> CaseEntry:
    entry = app.index.get(request.path_params["case"])
    if entry is None:
        raise ReviewRefused(404, "no such case in this output folder")
    return entry


def _guarded(handler: Callable[[ReviewApp, Request], Awaitable[Response]], app: ReviewApp):
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(app, request)
        except ReviewRefused as err:
            return _refused(err)

    return endpoint


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) past ``limit`` bytes before it is read (Content-Length) or while
    it is (chunked), and (408) when it stalls."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ReviewRefused(400, "Content-Length is not a number")
        if int(declared) > limit:
            raise ReviewRefused(413, f"the request body declares {declared} bytes, more than {limit}")
    chunks: list[bytes] = []
    size = 0
    stream = request.stream().__aiter__()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BODY_TOTAL_TIMEOUT_S
    while True:
        remaining = min(BODY_IDLE_TIMEOUT_S, deadline - loop.time())
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), timeout=max(remaining, 0.0))
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise ReviewRefused(408, "the request body stalled") from None
        size += len(chunk)
        if size > limit:
            raise ReviewRefused(413, f"the request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


# --- pages ---------------------------------------------------------------------------------------


async def cohort(app: ReviewApp, request: Request) -> Response:
    from spleen_seg.batch.case import MASK_FILENAME
    from spleen_seg.outputs.cohort import CaseFiles, cohort_page
    from spleen_seg.outputs.preview import PREVIEW_FILENAME, THUMBNAIL_FILENAME

    files = CaseFiles(thumbnail=THUMBNAIL_FILENAME, preview=PREVIEW_FILENAME,
                      links=(("review", ""), ("report", REPORT_FILENAME), ("mask", MASK_FILENAME)))
    text = await run_in_threadpool(cohort_page, app.index.rows(), files=files, title=app.title)
    return Response(text, media_type="text/html; charset=utf-8", headers={"content-security-policy": page_csp(text)})


async def viewer(app: ReviewApp, request: Request) -> Response:
    _entry(app, request)
    return FileResponse(STATIC_DIR / "viewer.html", media_type="text/html; charset=utf-8")


async def case_file_route(app: ReviewApp, request: Request) -> Response:
    path = case_file(_entry(app, request), request.path_params["name"])
    if path is None:
        raise ReviewRefused(404, "no such file in the case folder")
    inline = path.suffix in (".png", ".jpg")
    return FileResponse(path, content_disposition_type="inline" if inline else "attachment", filename=path.name)


async def static(app: ReviewApp, request: Request) -> Response:
    name = request.path_params["name"]
    if name == "niivue.js":
        return FileResponse(app.niivue_path, media_type="text/javascript")
    if name not in STATIC_FILES:
        raise ReviewRefused(404, "no such file")
    return FileResponse(STATIC_DIR / name, media_type=STATIC_FILES[name])


# --- the viewer's API ----------------------------------------------------------------------------


def _number(text: str) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


async def case_list(app: ReviewApp, request: Request) -> Response:
    rows = []
    for case in app.index.order:
        row = app.index.entries[case].row
        rows.append([case, row.get("status", ""), row.get("review", ""), _number(row.get("quality_score", "")),
                     row.get("review_suggested") == "yes", _number(row.get("volume_ml", ""))])
    return JSONResponse({"columns": ["case", "status", "review", "quality_score", "review_suggested", "volume_ml"],
                         "cases": rows, "reviewer": app.store.reviewer, "layout": app.index.layout})


def _case_info(app: ReviewApp, entry: CaseEntry) -> dict[str, Any]:
    state = app.store.state(entry)
    report = state.report
    previous, following = app.index.neighbours(entry.case)
    grids = {view: app.views.grid(entry, view)[0].as_dict() for view in ("roi", "full")}
    return {
        "case": entry.case, "position": app.index.positions.get(entry.case), "count": len(app.index.order),
        "previous": previous, "next": following, "status": entry.row.get("status", ""),
        "review": state.review.as_dict(), "review_status": review_status(state.review),
        "report": {"source": report.source, "spleen_found": report.spleen_found, "volume_ml": report.volume_ml,
                   "voxel_count": report.voxel_count, "extents_mm": report.extents_mm, "hu_mean": report.hu_mean,
                   "hu_std": report.hu_std, "components_found": report.components_found,
                   "components_kept": report.components_kept, "flags": report.flags, "warnings": report.warnings,
                   "quality": report.quality, "message": report.message,
                   "spacing_mm": report.input_geometry.get("spacing_mm"),
                   "centroid_ras_mm": (report.anatomy or {}).get("spleen_centroid_ras_mm"),
                   "shape": report.input_geometry.get("shape")},
        "views": grids, "window_hu": list(WINDOW_HU),
    }


async def case_info(app: ReviewApp, request: Request) -> Response:
    entry = _entry(app, request)
    return JSONResponse(await run_in_threadpool(_case_info, app, entry))


async def view_ct(app: ReviewApp, request: Request) -> Response:
    entry = _entry(app, request)
    state = await run_in_threadpool(app.store.state, entry)
    path = await run_in_threadpool(app.views.ct_file, entry, state.report, request.path_params["view"])
    return FileResponse(path, media_type="application/gzip")


async def view_mask(app: ReviewApp, request: Request) -> Response:
    entry = _entry(app, request)

    def make() -> bytes:
        state = app.store.state(entry)
        return app.views.mask_bytes(entry, app.store.current_mask_file(entry, state.review), request.path_params["view"])

    return Response(await run_in_threadpool(make), media_type="application/gzip")


def _revision(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).isdigit():
        raise ReviewRefused(422, "revision must be the non-negative integer of the state the page shows")
    return int(value)


async def decision(app: ReviewApp, request: Request) -> Response:
    entry = _entry(app, request)
    body = await read_body(request, MAX_JSON_BODY_BYTES)
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ReviewRefused(400, "the body is not JSON") from None
    if not isinstance(data, dict):
        raise ReviewRefused(400, "the body must be a JSON object")
    revision = _revision(data.get("revision"))
    choice = data.get("decision")
    if not isinstance(choice, str):
        raise ReviewRefused(422, "decision must be \"accepted\" or \"rejected\"")
    state = await run_in_threadpool(app.store.decide, entry, choice, data.get("comment", ""), revision)
    return JSONResponse({"review": state.as_dict(), "review_status": review_status(state)})


async def save_mask(app: ReviewApp, request: Request) -> Response:
    entry = _entry(app, request)
    revision = _revision(request.query_params.get("revision", ""))
    grid, _geometry = await run_in_threadpool(app.views.grid, entry, request.path_params["view"])
    body = await read_body(request, drawing_limit_bytes(grid))

    def save():
        drawing = read_drawing(body, grid)
        state = app.store.state(entry)
        from spleen_seg.review.source import seg_writer

        try:
            write_seg = seg_writer(entry, state.report)
        except (SpleenSegError, OSError) as err:  # the SEG needs the series: refuse rather than save half
            raise ReviewRefused(409, f"{entry.case}: its DICOM series cannot be read for the corrected SEG "
                                     f"({err})") from None
        return app.store.save_correction(entry, revision, lambda base: apply_drawing(base, drawing, grid), write_seg)

    state = await run_in_threadpool(save)
    return JSONResponse({"review": state.as_dict(), "review_status": review_status(state)})


# --- the token -----------------------------------------------------------------------------------


class TokenGate:
    """Refuses (401) every request without the token; adds the security headers to every answer.

    The token comes in the URL the server prints (``?token=``), is checked, moved into an
    HttpOnly SameSite=Strict cookie (named after the port: two apps on one host keep theirs)
    and the browser is sent to the same URL without it, so it is not left in the address bar,
    the history or a Referer. Scripts may send ``Authorization: Bearer <token>``. A request
    that changes something must come from the app's own origin when the browser names one.
    """

    def __init__(self, app: ASGIApp, token: str, port: int) -> None:
        self.app = app
        self.token = token.encode()
        self.cookie = f"{COOKIE_PREFIX}{port}"

    def _valid(self, candidate: str | None) -> bool:
        return candidate is not None and secrets.compare_digest(candidate.encode(), self.token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                headers += [(name, value) for name, value in SECURITY_HEADERS if name not in names]
                if b"content-security-policy" not in names:
                    headers.append((b"content-security-policy", CSP.encode()))
                message = {**message, "headers": headers}
            await send(message)

        request = Request(scope)
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        given = dict(query).get(TOKEN_PARAM)
        if given is not None and self._valid(given) and scope["method"] in ("GET", "HEAD"):
            rest = urlencode([(k, v) for k, v in query if k != TOKEN_PARAM])
            response: Response = RedirectResponse(scope["path"] + (f"?{rest}" if rest else ""), status_code=303)
            response.set_cookie(self.cookie, self.token.decode(), httponly=True, samesite="strict", path="/")
            await response(scope, receive, send_with_headers)
            return
        authorization = request.headers.get("authorization", "")
        bearer = authorization[len("Bearer "):] if authorization.startswith("Bearer ") else None
        cookie = SimpleCookie()
        try:
            cookie.load(request.headers.get("cookie", ""))
        except Exception:  # noqa: BLE001 (a malformed Cookie header is simply no cookie)
            cookie = SimpleCookie()
        held = cookie[self.cookie].value if self.cookie in cookie else None
        if not (self._valid(bearer) or self._valid(held)):
            await PlainTextResponse("401: this review app needs its access token: open the URL that "
                                    "`spleen-seg review` printed", status_code=401)(scope, receive, send_with_headers)
            return
        origin = request.headers.get("origin")
        if scope["method"] not in ("GET", "HEAD") and origin is not None and \
                origin.split("://", 1)[-1] != request.headers.get("host", ""):
            await PlainTextResponse("403: a change must come from the review app's own page",
                                    status_code=403)(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)


def build_app(review: ReviewApp, token: str, port: int, allowed_hosts: list[str]) -> ASGIApp:
    """The ASGI app: the routes behind :class:`TokenGate`, for requests naming one of ``allowed_hosts``."""
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    def route(path: str, handler, methods=("GET",)) -> Route:
        return Route(path, _guarded(handler, review), methods=list(methods))

    routes = [
        Route("/", lambda request: RedirectResponse("/cases/", status_code=303)),
        Route("/favicon.ico", lambda request: Response(status_code=204)),
        route("/cases/", cohort),
        route("/cases/{case}/", viewer),
        route("/cases/{case}/{name}", case_file_route),
        route("/static/{name}", static),
        route("/api/cases", case_list),
        route("/api/cases/{case}", case_info),
        route("/api/cases/{case}/decision", decision, methods=("POST",)),
        route("/api/cases/{case}/{view}/ct.nii.gz", view_ct),
        route("/api/cases/{case}/{view}/mask.nii.gz", view_mask),
        route("/api/cases/{case}/{view}/mask", save_mask, methods=("PUT",)),
    ]
    app = Starlette(routes=routes)
    return TokenGate(TrustedHostMiddleware(app, allowed_hosts=allowed_hosts), token, port)
