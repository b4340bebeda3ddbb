"""The review app as a user starts it (``spleen-seg review OUT`` in a subprocess on 127.0.0.1), attacked
over real sockets: no token, paths out of OUT, bad masks, conflicting saves, oversized and stalled
requests, and SIGKILL in the middle of a save."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import socket
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from review_outputs import CaseSpec, ReviewServer, make_batch

from spleen_seg.batch.ownership import MARKER_FILENAME
from spleen_seg.outputs.review_state import AUDIT_LOG_FILENAME, CORRECTED_MASK_FILENAME
from spleen_seg.review.server import FIRST_REQUEST_TIMEOUT_S, MAX_CONCURRENT

SECRET = "the secret outside OUT"
ATTACK_CHUNKS = 64  # 1 MB each
ATTACK_RSS_BOUND_BYTES = 16 << 20


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")
REQUEST_TIMEOUT_S = 60


def request(server: ReviewServer, method: str, path: str, body: bytes | None = None, *, auth: bool = True,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=REQUEST_TIMEOUT_S)
    sent = {"Authorization": f"Bearer {server.token}"} if auth else {}
    connection.request(method, path, body=body, headers={**sent, **(headers or {})})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


def revision(server: ReviewServer, case: str) -> int:
    status, _, body = request(server, "GET", f"/api/cases/{case}")
    assert status == 200, body
    return json.loads(body)["review"]["revision"]


def view_mask(server: ReviewServer, case: str) -> nib.Nifti1Image:
    status, _, body = request(server, "GET", f"/api/cases/{case}/roi/mask.nii.gz")
    assert status == 200, body
    return nib.Nifti1Image.from_bytes(gzip.decompress(body))


def drawing_bytes(image: nib.Nifti1Image, data: np.ndarray, dtype=np.uint8) -> bytes:
    """A drawing as NiiVue saves one: the view's header, the voxels as ``dtype``, gzip'd."""
    out = nib.Nifti1Image(np.asarray(data, dtype=dtype), image.affine, header=image.header.copy())
    out.set_data_dtype(dtype)
    return gzip.compress(out.to_bytes())


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("review")
    out = make_batch(root / "out", [CaseSpec(f"case{i}", quality=0.1 * i) for i in range(6)], root / "inputs")
    secret = root / "secret.txt"
    secret.write_text(SECRET)
    (out / "case0" / "preview.png").unlink()
    (out / "case0" / "preview.png").symlink_to(secret)  # a symlink inside OUT pointing out
    outside = root / "elsewhere"
    (outside).mkdir()
    (outside / "report.json").write_text(SECRET)
    (out / "evil").symlink_to(outside, target_is_directory=True)
    with (out / "summary.csv").open("a") as summary:
        summary.write("evil,/x,ok,1.0,,,,1,,,,,no,\n")
    return out


@pytest.fixture(scope="module")
def server(outputs):
    with ReviewServer(outputs) as running:
        yield running


def test_every_request_without_the_token_is_refused(server):
    for path in ("/cases/", "/api/cases", "/static/viewer.js", "/static/niivue.js", "/api/cases/case1",
                 "/api/cases/case1/roi/ct.nii.gz", "/cases/case1/report.json"):
        assert request(server, "GET", path, auth=False)[0] == 401, path
        assert request(server, "GET", path, auth=False, headers={"Authorization": "Bearer wrong"})[0] == 401, path
        assert request(server, "GET", path, auth=False, headers={"Cookie": f"spleen_review_{server.port}=wrong"})[0] == 401
    status, _, _ = request(server, "POST", "/api/cases/case1/decision", b'{"decision":"accepted","revision":0}',
                           auth=False)
    assert status == 401
    assert revision(server, "case1") == 0


def test_the_token_moves_into_a_strict_http_only_cookie(server):
    status, headers, _ = request(server, "GET", f"/cases/?token={server.token}&x=1", auth=False)
    assert status == 303
    assert headers["location"] == "/cases/?x=1"  # the token leaves the address bar
    cookie = headers["set-cookie"]
    assert cookie.startswith(f"spleen_review_{server.port}={server.token};")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie
    status, headers, body = request(server, "GET", "/cases/", auth=False,
                                    headers={"Cookie": f"spleen_review_{server.port}={server.token}"})
    assert status == 200 and b"case3" in body
    # The cohort page runs only its own inline script: the CSP names its hash, nothing else.
    assert "script-src 'sha256-" in headers["content-security-policy"]
    assert "unsafe-inline" not in headers["content-security-policy"]


def test_a_change_from_another_origin_is_refused(server):
    status, _, _ = request(server, "POST", "/api/cases/case1/decision", b'{"decision":"accepted","revision":0}',
                           headers={"Origin": "http://evil.example", "Content-Type": "application/json"})
    assert status == 403
    assert revision(server, "case1") == 0


def test_a_request_for_another_host_name_is_refused(server):
    # DNS rebinding: a page of evil.example resolved to 127.0.0.1 still names its own host.
    assert request(server, "GET", "/api/cases", headers={"Host": "evil.example"})[0] == 400


@pytest.mark.parametrize("path", [
    "/cases/../summary.csv", "/cases/%2e%2e/summary.csv", "/cases/..%2fsummary.csv", "/cases/case1/..%2f..%2fsecret.txt",
    "/cases/case1/%2e%2e%2fcase2%2freport.json", "/cases/case1/../../secret.txt", "/static/..%2fapp.py",
    "/static/%2e%2e%2f%2e%2e%2fcli.py", "/cases/case1/summary.csv", "/cases/case1/review_view_roi.nii.gz",
    "/api/cases/..%2fcase1", "/api/cases/%2e%2e/roi/ct.nii.gz", "/cases/case0/preview.png", "/cases/evil/report.json",
    "/api/cases/evil", "/cases/case1/%2fetc%2fpasswd",
])
def test_nothing_outside_out_or_its_known_files_can_be_read(server, path):
    status, _, body = request(server, "GET", path)
    assert status in (400, 404), (path, status)
    assert SECRET.encode() not in body and b"case,source" not in body


def test_a_mask_that_does_not_fit_the_case_is_refused_and_nothing_is_written(server, outputs):
    image = view_mask(server, "case2")
    data = np.asarray(image.dataobj)
    wrong_affine = nib.Nifti1Image(data, image.affine @ np.diag([2.0, 1.0, 1.0, 1.0]))
    bomb = gzip.compress(b"\0" * (64 << 20))
    attempts = {
        "shape": drawing_bytes(nib.Nifti1Image(data[:-1], image.affine, header=image.header), data[:-1]),
        "affine": gzip.compress(wrong_affine.to_bytes()),
        "dtype": drawing_bytes(image, data, np.int16),
        "values": drawing_bytes(image, data * 2),
        "not nifti": b"GIF89a" + b"\0" * 400,
        "gzip bomb": bomb,
    }
    answers = {name: request(server, "PUT", "/api/cases/case2/roi/mask?revision=0", body) for name, body in attempts.items()}
    for name, (status, _, body) in answers.items():
        assert 400 <= status < 500, (name, status, body)
        assert json.loads(body)["error"], name
    assert answers["shape"][0] == 422 and b"shape" in answers["shape"][2]
    assert answers["affine"][0] == 422 and b"affine" in answers["affine"][2]
    assert answers["dtype"][0] == 422 and b"int16" in answers["dtype"][2]
    assert answers["values"][0] == 422
    assert answers["gzip bomb"][0] == 413
    assert not (outputs / "case2" / CORRECTED_MASK_FILENAME).exists()
    assert revision(server, "case2") == 0
    assert not any(line and json.loads(line)["case"] == "case2"
                   for line in (outputs / AUDIT_LOG_FILENAME).read_text().splitlines()) \
        if (outputs / AUDIT_LOG_FILENAME).exists() else True


def test_the_second_of_two_saves_from_the_same_revision_is_a_conflict(server, outputs):
    image = view_mask(server, "case3")
    first, second = np.asarray(image.dataobj).copy(), np.asarray(image.dataobj).copy()
    first[0, 0, 0], second[1, 1, 1] = 1, 1
    assert request(server, "PUT", "/api/cases/case3/roi/mask?revision=0", drawing_bytes(image, first))[0] == 200
    saved = (outputs / "case3" / CORRECTED_MASK_FILENAME).read_bytes()
    status, _, body = request(server, "PUT", "/api/cases/case3/roi/mask?revision=0", drawing_bytes(image, second))
    assert status == 409 and json.loads(body)["revision"] == 1
    assert (outputs / "case3" / CORRECTED_MASK_FILENAME).read_bytes() == saved  # not overwritten
    status, _, _ = request(server, "POST", "/api/cases/case3/decision", b'{"decision":"accepted","revision":0}')
    assert status == 409
    assert revision(server, "case3") == 1


def test_a_decision_reaches_the_report_the_audit_log_and_the_summary(server, outputs):
    body = json.dumps({"decision": "rejected", "comment": "<img src=x onerror=alert(1)> misses the hilum",
                       "revision": 0}).encode()
    status, _, answer = request(server, "POST", "/api/cases/case4/decision", body)
    assert status == 200, answer
    report = json.loads((outputs / "case4" / "report.json").read_text())
    assert report["report_version"] == 4
    assert report["review"]["decision"] == "rejected" and report["review"]["revision"] == 1
    assert report["review"]["reviewer"] == "tester"
    audit = [json.loads(line) for line in (outputs / AUDIT_LOG_FILENAME).read_text().splitlines()]
    mine = [line for line in audit if line["case"] == "case4"]
    assert len(mine) == 1 and mine[0]["decision"] == "rejected" and mine[0]["revision"] == 1
    assert mine[0]["model_mask_sha256"] == hashlib.sha256((outputs / "case4" / "spleen.nii.gz").read_bytes()).hexdigest()
    summary = (outputs / "summary.csv").read_text().splitlines()
    assert summary[0].endswith(",review")
    assert [line for line in summary if line.startswith("case4,")][0].endswith(",rejected")
    page = (outputs / "index.html").read_text()
    assert '"rejected"' in page and "<img src=x" not in page  # the comment is not on the page at all


def test_requests_larger_than_the_limit_are_refused_before_they_are_read(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=REQUEST_TIMEOUT_S) as sock:
        sock.sendall(f"PUT /api/cases/case5/roi/mask?revision=0 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     f"Authorization: Bearer {server.token}\r\nContent-Length: {1 << 40}\r\n\r\n".encode())
        started = time.monotonic()
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert time.monotonic() - started < 5
    status, _, _ = request(server, "POST", "/api/cases/case5/decision", b"{" + b" " * (1 << 20) + b"}")
    assert status == 413
    # A chunked body (no Content-Length) is counted while it is read: 64 MB sent, the server stops at the
    # view's bound and its memory does not follow what the peer sends.
    before = rss_bytes(server.process.pid)
    with socket.create_connection(("127.0.0.1", server.port), timeout=REQUEST_TIMEOUT_S) as sock:
        sock.sendall(f"PUT /api/cases/case5/roi/mask?revision=0 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     f"Authorization: Bearer {server.token}\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        chunk = b"%x\r\n%s\r\n" % (1 << 20, b"\0" * (1 << 20))
        answer = b""
        try:
            for _ in range(ATTACK_CHUNKS):
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused and closed before all of it was sent
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
    assert rss_bytes(server.process.pid) - before < ATTACK_RSS_BOUND_BYTES
    assert revision(server, "case5") == 0


def test_silent_connections_are_closed_and_bounded(server):
    sockets = [socket.create_connection(("127.0.0.1", server.port), timeout=REQUEST_TIMEOUT_S)
               for _ in range(MAX_CONCURRENT + 2)]
    try:
        assert request(server, "GET", "/api/cases")[0] == 503  # every slot is taken by a silent peer
        time.sleep(FIRST_REQUEST_TIMEOUT_S + 1.0)
        for sock in sockets:
            assert sock.recv(1) == b""  # closed by the server
        assert request(server, "GET", "/api/cases")[0] == 200
    finally:
        for sock in sockets:
            sock.close()


@pytest.mark.parametrize("stage", ["mask-written", "mask-renamed", "report-written"])
def test_sigkill_during_a_save_leaves_the_old_or_the_new_mask_and_records_that_agree(tmp_path, stage):
    out = make_batch(tmp_path / "out", [CaseSpec("k", quality=0.2)], tmp_path / "inputs")
    with ReviewServer(out) as first:
        image = view_mask(first, "k")
        data = np.asarray(image.dataobj).copy()
        data[2:6, 2:6, 2] = 1
        assert request(first, "PUT", "/api/cases/k/roi/mask?revision=0", drawing_bytes(image, data))[0] == 200
    saved = (out / "k" / CORRECTED_MASK_FILENAME).read_bytes()
    with ReviewServer(out, env={"SPLEEN_SEG_REVIEW_TEST_PAUSE": stage}) as paused:
        newer = data.copy()
        newer[2:6, 2:6, 3] = 1
        def save_until_killed() -> None:
            with pytest.raises(http.client.RemoteDisconnected):
                request(paused, "PUT", "/api/cases/k/roi/mask?revision=1", drawing_bytes(image, newer))

        thread = threading.Thread(target=save_until_killed, daemon=True)
        thread.start()
        paused.wait_for_output(f"paused at {stage}")
        paused.kill()
        thread.join(timeout=REQUEST_TIMEOUT_S)
    corrected = out / "k" / CORRECTED_MASK_FILENAME
    assert nib.load(corrected).get_fdata().sum() > 0  # whole: it reads
    if stage == "mask-written":
        assert corrected.read_bytes() == saved
    else:
        assert corrected.read_bytes() != saved
    with ReviewServer(out) as after:
        assert "recovered k:" in after.output()
        state = json.loads(request(after, "GET", "/api/cases/k")[2])["review"]
    digest = hashlib.sha256(corrected.read_bytes()).hexdigest()
    assert state["correction"]["sha256"] == digest
    assert state["revision"] == (1 if stage == "mask-written" else 2)
    audit = [json.loads(line) for line in (out / AUDIT_LOG_FILENAME).read_text().splitlines()]
    assert [a["revision"] for a in audit] == list(range(1, state["revision"] + 1))
    assert audit[-1]["corrected_mask_sha256"] == digest
    # no temporary or pending file left; the batch's ownership marker stays
    assert [p.name for p in (out / "k").glob(".*")] == [MARKER_FILENAME]
    assert [line for line in (out / "summary.csv").read_text().splitlines() if line.startswith("k,")][0] \
        .endswith(",corrected")
