"""The review app in a real browser: headless Debian chromium (WebGL through SwiftShader) driven by
Playwright, against ``spleen-seg review`` started as a subprocess. One browser for the module."""

from __future__ import annotations

import gzip
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
from review_outputs import CaseSpec, ReviewServer, make_batch

from spleen_seg.outputs.review_state import AUDIT_LOG_FILENAME, CORRECTED_MASK_FILENAME

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# WebGL without a GPU: ANGLE on SwiftShader; no network, no profile of the user's.
CHROMIUM_ARGS = ["--use-gl=angle", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--no-sandbox"]
VIEWPORT = {"width": 1200, "height": 760}
LOAD_TIMEOUT_MS = 90_000
# The drawing layer: value 1 is NiiVue's red, blended at the viewer's opacity over the grey CT.
RED_MARGIN = 60
SAMPLE_STEP_PX = 6
MOVE_PAUSE_MS = 10
RELEASE_PAUSE_MS = 500
LOADED = "body[data-loaded]:not([data-loaded='']):not([data-loaded='error'])"


def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("playwright is not installed (pyproject's dev extra)")
        pytest.skip("playwright is not installed (pip install -e .[dev])")
    if shutil.which(CHROMIUM) is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{CHROMIUM} not found: .ci/run installs the Debian package chromium")
        pytest.skip(f"{CHROMIUM} not found (Debian package chromium)")
    return sync_playwright


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    specs = [CaseSpec("first", quality=0.4, review_suggested=True), CaseSpec("second", quality=0.3),
             CaseSpec("third", quality=0.1)]
    out = make_batch(root / "out", specs, root / "inputs")
    with ReviewServer(out) as server:
        yield server


@pytest.fixture(scope="module")
def page(app):
    sync_playwright = _playwright()
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
        tab = context.new_page()
        tab.console_messages_seen = []
        tab.on("console", lambda message: tab.console_messages_seen.append(message.text))
        tab.goto(app.url)  # the printed URL: the token becomes a cookie
        tab.wait_for_selector("#case-rows tr")
        tab.click("text=first")
        tab.wait_for_selector(LOADED, state="attached", timeout=LOAD_TIMEOUT_MS)
        yield tab
        browser.close()


def view_mask(app: ReviewServer, case: str) -> np.ndarray:
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", app.port, timeout=60)
    connection.request("GET", f"/api/cases/{case}/roi/mask.nii.gz", headers={"Authorization": f"Bearer {app.token}"})
    body = connection.getresponse().read()
    return np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(body)).dataobj)


def canvas_voxels(page, points: list[list[float]]) -> list[tuple[int, int, int] | None]:
    """The view voxel (RAS order) NiiVue draws at each canvas point, None outside the image."""
    found = page.evaluate("""(points) => {
        const nv = window.reviewViewer.nv;
        return points.map((p) => {
            const frac = nv.canvasPos2frac(p);
            const dims = nv.volumes[0].dimsRAS;
            const vox = Array.from(nv.frac2vox(frac)).map(Math.round);
            if (vox.some((v, i) => !(v >= 0 && v < dims[i + 1]))) { return null; }
            return vox;
        });
    }""", points)
    return [None if v is None else (int(v[0]), int(v[1]), int(v[2])) for v in found]  # JSON gives -0.0 for -0


def test_the_overlay_is_red_where_the_mask_is_and_nowhere_else(app, page, tmp_path):
    page.keyboard.press("1")  # axial
    page.evaluate("window.reviewViewer.nv.setCrosshairWidth(0); window.reviewViewer.sync()")  # the overlay alone
    shot = tmp_path / "axial.png"
    page.locator("#gl").screenshot(path=str(shot))
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    height, width, _ = pixels.shape
    points = [[x + 0.5, y + 0.5] for y in range(0, height, SAMPLE_STEP_PX) for x in range(0, width, SAMPLE_STEP_PX)]
    voxels = canvas_voxels(page, points)
    mask = view_mask(app, "first")
    inside, outside = [], []
    for (x, y), voxel in zip(points, voxels, strict=True):
        if voxel is None:
            continue
        r, g, b = pixels[int(y), int(x)]
        red = r - max(g, b) > RED_MARGIN
        (inside if mask[voxel] else outside).append(red)
    assert len(inside) > 50 and len(outside) > 500, (len(inside), len(outside))
    assert np.mean(inside) > 0.95, np.mean(inside)
    assert np.mean(outside) < 0.01, np.mean(outside)
    assert not [m for m in page.console_messages_seen if "Content Security Policy" in m]
    page.evaluate("window.reviewViewer.nv.setCrosshairWidth(0.2)")


def drawn_voxels(page) -> int:
    return page.evaluate("window.reviewViewer.nv.drawBitmap.reduce((n, v) => n + (v > 0 ? 1 : 0), 0)")


def test_undo_takes_back_a_stroke(app, page):
    before = drawn_voxels(page)
    assert before == int(view_mask(app, "first").sum())
    page.keyboard.press("d")
    box = page.locator("#gl").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.2)
    page.mouse.down()
    for step in range(1, 12):
        page.mouse.move(box["x"] + box["width"] * (0.3 + 0.02 * step), box["y"] + box["height"] * 0.2)
        page.wait_for_timeout(MOVE_PAUSE_MS)
    page.wait_for_timeout(RELEASE_PAUSE_MS)
    page.mouse.up()
    assert drawn_voxels(page) > before
    page.keyboard.press("u")
    assert drawn_voxels(page) == before
    page.keyboard.press("Escape")


def test_a_stroke_saved_changes_the_mask_exactly_where_it_went(app, page):
    page.keyboard.press("d")  # paint
    box = page.locator("#gl").bounding_box()
    # A row of voxels across the body in front of the spleen, on the axial slice shown: the mouse passes
    # through their centres (where NiiVue puts them on the canvas) in steps smaller than a voxel.
    centres = page.evaluate("""() => {
        const nv = window.reviewViewer.nv, dims = nv.volumes[0].dimsRAS;
        const z = Math.round(nv.frac2vox(nv.scene.crosshairPos)[2]), y = dims[2] - 5;
        const row = [];
        for (let x = 6; x < dims[1] - 6; x++) { row.push([[x, y, z], nv.frac2canvasPos(nv.vox2frac([x, y, z]))]); }
        return row;
    }""")
    # NiiVue paints a move's line up to the voxel before the pointer: a stroke ends one voxel past its last.
    expected_view = {(int(v[0]), int(v[1]), int(v[2])) for v, _ in centres[:-1]}
    path = []
    for (_, a), (_, b) in zip(centres, centres[1:], strict=False):
        path += [[a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t] for t in np.arange(0, 1, 0.5)]
    path.append(centres[-1][1])
    y = path[0][1]
    page.mouse.move(box["x"] + path[0][0], box["y"] + y)
    page.mouse.down()
    for x, y in path[1:]:
        page.mouse.move(box["x"] + x, box["y"] + y)
        page.wait_for_timeout(MOVE_PAUSE_MS)  # a hand's pace: NiiVue draws from one move event to the next
    page.wait_for_timeout(RELEASE_PAUSE_MS)  # NiiVue takes the last move on its next frame; then release
    page.mouse.up()
    page.keyboard.press("Escape")
    page.keyboard.press("s")
    page.locator("#message", has_text="correction saved").wait_for(timeout=LOAD_TIMEOUT_MS)
    case_dir = app.out_dir / "first"
    model = nib.load(case_dir / "spleen.nii.gz")
    corrected = nib.load(case_dir / CORRECTED_MASK_FILENAME)
    assert np.allclose(corrected.affine, model.affine) and corrected.shape == model.shape
    changed = {tuple(v) for v in np.argwhere(np.asarray(corrected.dataobj) != np.asarray(model.dataobj))}
    view_affine = json.loads(page.evaluate("JSON.stringify(Array.from(window.reviewViewer.nv.volumes[0].hdr.affine"
                                           ".flat()))"))
    to_case = np.linalg.inv(model.affine) @ np.asarray(view_affine).reshape(4, 4)
    expected = {tuple(int(round(c)) for c in (to_case @ [*v, 1.0])[:3]) for v in expected_view}
    assert not np.asarray(model.dataobj)[tuple(np.array(sorted(expected)).T)].any()  # the stroke missed the mask
    assert changed == expected
    assert np.asarray(corrected.dataobj)[tuple(np.array(sorted(expected)).T)].all()  # painted, not erased
    report = json.loads((case_dir / "report.json").read_text())
    assert report["review"]["correction"]["change_voxels"] == len(expected)


def test_accept_and_reject_from_the_keyboard(app, page):
    page.keyboard.press("a")  # the corrected case accepted; the viewer moves on to the next case
    page.wait_for_selector("body[data-loaded='second']", state="attached", timeout=LOAD_TIMEOUT_MS)
    page.click("#comment")
    page.keyboard.type("<b>not</b> the spleen")
    page.keyboard.press("r")  # typed into the comment, not a key for the viewer
    page.keyboard.press("Escape")
    page.keyboard.press("r")
    page.wait_for_selector("body[data-loaded='third']", state="attached", timeout=LOAD_TIMEOUT_MS)
    audit = [json.loads(line) for line in (app.out_dir / AUDIT_LOG_FILENAME).read_text().splitlines()]
    assert [(a["case"], a["action"], a["status"]) for a in audit] == [
        ("first", "corrected", "corrected"), ("first", "accepted", "corrected"), ("second", "rejected", "rejected")]
    assert audit[2]["comment"] == "<b>not</b> the spleenr" and audit[2]["reviewer"] == "tester"
    summary = {line.split(",")[0]: line.rsplit(",", 1)[1] for line in (app.out_dir / "summary.csv").read_text().splitlines()[1:]}
    assert summary == {"first": "corrected", "second": "rejected", "third": ""}
    page.goto(f"{app.base}/cases/")  # the cohort page shows it, the comment is nowhere as markup
    assert page.locator("tr[data-case='second'] .badge.verdict").inner_text() == "rejected"
    assert page.locator("b", has_text="not").count() == 0
