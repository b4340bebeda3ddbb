"""Make docs/images/review_viewer.png: the shared real CT and its reference spleen mask as a batch case,
opened in the review app in headless chromium (SwiftShader), a comment typed.

Usage: python docs/images/make_review_screenshot.py  (needs ../shared/data/real_ct, chromium, web/node_modules)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "helpers"))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_review import CHROMIUM, CHROMIUM_ARGS, LOADED, Server  # noqa: E402
from shared_data import REAL_CT, REAL_CT_MASK  # noqa: E402

from spleen_seg.batch.case import segment_one  # noqa: E402
from spleen_seg.batch.summary import SUMMARY_FILENAME, SummaryRow, write_page, write_summary  # noqa: E402
from spleen_seg.pipeline.segmenter import PreparedImage  # noqa: E402

DEST = Path(__file__).with_name("review_viewer.png")
VIEWPORT = {"width": 1280, "height": 720}
PALETTE_COLOURS = 128  # a palette PNG keeps the screenshot under 300 kB


class KnownMask:
    """A segmenter stand-in that returns the shared CT's reference spleen mask."""

    def __init__(self, mask: np.ndarray) -> None:
        self.mask = mask

    def prepare(self, array, geometry, source=""):
        return PreparedImage(image=None, grid_affine=np.eye(4), reorientation=None, geometry=geometry)  # type: ignore[arg-type]

    def compute_margin(self, prepared):
        return prepared

    def invert(self, prepared):
        return self.mask


def main() -> int:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "review-demo"
        mask = np.asarray(nib.load(REAL_CT_MASK).dataobj, dtype=np.uint8)
        result = segment_one(KnownMask(mask), REAL_CT, out, case="ct_abdomen_3mm", model={"name": "spleen-seg"})
        assert result.error is None, result.error
        rows = [SummaryRow(result.case, str(REAL_CT), result.status, result.report)]
        write_summary(rows, out / SUMMARY_FILENAME)
        write_page([row.as_dict() for row in rows], out)
        server = Server(out, "--reviewer", "a.reviewer")
        try:
            with sync_playwright() as driver:
                browser = driver.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport=VIEWPORT, device_scale_factor=1)
                page.goto(server.url)
                page.goto(f"http://127.0.0.1:{server.port}/cases/{result.case}/")
                page.wait_for_selector(LOADED, state="attached", timeout=120_000)
                page.fill("#comment", "lower pole fixed")
                page.evaluate("window.reviewViewer.sync()")
                shot = Path(tmp) / "shot.png"
                page.screenshot(path=str(shot))
                browser.close()
        finally:
            server.stop()
        from PIL import Image

        Image.open(shot).convert("RGB").quantize(PALETTE_COLOURS).save(DEST, optimize=True)
    print(f"{DEST}: {DEST.stat().st_size // 1024} kB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
