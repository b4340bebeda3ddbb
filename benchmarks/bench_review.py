"""The review app at scale: time to the first page of a 10,000-case output folder, and time until the
viewer shows a 512 x 512 x 300 case in headless chromium (WebGL through SwiftShader, no GPU).

1. Cohort: a batch folder of ``--cases`` cases (summary.csv as a real cohort's, one folder with a
   report per case), ``spleen-seg review`` started as a user starts it; the time from starting the
   process to the cohort page fully received, and to the case list, ``--repeats`` times. Baseline in
   the same run: the same Python starting ``spleen-seg --help`` (interpreter and CLI imports alone).
2. Viewer: one 512 x 512 x 300 CT (0.78 x 0.78 x 1.5 mm) segmented by the batch code with a threshold
   segmenter; the time from opening the case's URL until NiiVue has drawn it (the GPU finished), with
   the view made the first time (the CT read and reduced) and with it made. Baseline in the same run:
   the whole volume at its own resolution (``--view-voxels`` above its 78.6 M voxels), as the viewer
   would show it without the view grid (skipped with ``--no-full-baseline``: it takes minutes here).

Usage: python benchmarks/bench_review.py [--cases 10000] [--repeats 3] [--no-full-baseline]
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "helpers"))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_cohort_files import fake_rows  # noqa: E402
from phantoms import save_nifti  # noqa: E402
from stub_segmenter import ThresholdSegmenter  # noqa: E402

from spleen_seg.batch.case import segment_one  # noqa: E402
from spleen_seg.batch.summary import SUMMARY_FILENAME, SummaryRow, write_page, write_summary  # noqa: E402
from spleen_seg.outputs.report import REPORT_FILENAME, write_report  # noqa: E402

BIG_SHAPE = (512, 512, 300)
BIG_SPACING_MM = (0.78, 0.78, 1.5)
SPLEEN_RADIUS_MM = 55.0
START_TIMEOUT_S = 120.0
VIEW_TIMEOUT_S = 600.0
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--use-gl=angle", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--no-sandbox"]
NEXT_PREFETCH_WAIT_MS = 8000
LOADED = "body[data-loaded]:not([data-loaded='']):not([data-loaded='error'])"


def cohort_folder(root: Path, count: int) -> Path:
    out = root / "cohort"
    out.mkdir()
    rows = fake_rows(count)
    for row in rows:
        (out / row.case).mkdir()
        if row.report is not None:
            write_report(row.report, out / row.case / REPORT_FILENAME)
    write_summary(rows, out / SUMMARY_FILENAME)
    write_page([row.as_dict() for row in rows], out)
    return out


def big_case(root: Path) -> tuple[Path, str]:
    """A 512 x 512 x 300 CT (body of soft tissue in air, a ball of 'spleen' at 150 HU) and its batch folder."""
    grid = np.indices(BIG_SHAPE, dtype=np.float32)
    spacing = np.asarray(BIG_SPACING_MM, dtype=np.float32).reshape(3, 1, 1, 1)
    mm = grid * spacing
    centre = np.array([0.3 * BIG_SHAPE[0], 0.4 * BIG_SHAPE[1], 0.5 * BIG_SHAPE[2]], np.float32).reshape(3, 1, 1, 1) * spacing
    body = ((grid[0] - 255.5) / 240) ** 2 + ((grid[1] - 255.5) / 200) ** 2 <= 1
    ct = np.where(body, 40, -1000).astype(np.int16)
    ct += np.random.default_rng(0).integers(-15, 16, BIG_SHAPE, dtype=np.int16)
    ct[((mm - centre) ** 2).sum(axis=0) <= SPLEEN_RADIUS_MM ** 2] = 150
    del grid, mm
    path = save_nifti(ct, np.diag([*BIG_SPACING_MM, 1.0]), root / "inputs" / "big_512x512x300.nii.gz")
    out = root / "big"
    rows = []
    for case in ("big", "big_next"):  # a second case: the reviewer's "next" within the open page
        result = segment_one(ThresholdSegmenter(100.0), path, out, case=case, model={"name": "spleen-seg"})
        assert result.error is None, result.error
        rows.append(SummaryRow(case, str(path), result.status, result.report))
    write_summary(rows, out / SUMMARY_FILENAME)
    return out, "big"


class Server:
    def __init__(self, out: Path, *args: str) -> None:
        self.started = time.perf_counter()
        self.process = subprocess.Popen([sys.executable, "-m", "spleen_seg.cli", "review", str(out), "--port", "0", *args],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = ""
        deadline = time.monotonic() + START_TIMEOUT_S
        while "open http" not in line:
            line = self.process.stdout.readline()
            if not line and self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("review server did not start")
        self.url = re.search(r"open (http://\S+)", line).group(1)
        self.port = int(re.search(r":(\d+)/", self.url).group(1))
        self.token = self.url.split("token=")[1]

    def get(self, path: str) -> bytes:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=START_TIMEOUT_S)
        connection.request("GET", path, headers={"Authorization": f"Bearer {self.token}"})
        response = connection.getresponse()
        body = response.read()
        assert response.status == 200, (path, response.status, body[:200])
        return body

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def measure_cohort(out: Path, repeats: int) -> None:
    baseline, page, listing = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "spleen_seg.cli", "--help"], check=True, capture_output=True)
        baseline.append(time.perf_counter() - start)
        server = Server(out)
        try:
            body = server.get("/cases/")
            page.append(time.perf_counter() - server.started)
            assert body.count(b'"ok"') > 0
            start = time.perf_counter()
            server.get("/api/cases")
            listing.append(time.perf_counter() - start)
        finally:
            server.stop()
    print(f"  python + CLI imports (spleen-seg --help): median {statistics.median(baseline):.2f} s "
          f"(range {min(baseline):.2f}-{max(baseline):.2f})")
    print(f"  start to cohort page received:           median {statistics.median(page):.2f} s "
          f"(range {min(page):.2f}-{max(page):.2f})")
    print(f"  then the case list (/api/cases):         median {statistics.median(listing):.3f} s")


def _shown(page) -> str:
    laps = page.evaluate("JSON.stringify(window.reviewViewer.state.laps)")
    return page.inner_text("#numbers").replace("\n", " ").split("shown")[-1].strip() + " " + laps


def time_view(browser, server: Server, case: str, then_next: bool = False,
              whole_volume: bool = False) -> list[tuple[str, float, str]]:
    """Seconds from opening the case's URL in a new tab until NiiVue drew it (and, with ``then_next``, from
    pressing n until the next case is drawn in the same tab, its data fetched ahead; with ``whole_volume``,
    from pressing w until the whole volume is drawn)."""
    context = browser.new_context(viewport={"width": 1280, "height": 800}, device_scale_factor=1)
    page = context.new_page()
    try:
        page.goto(server.url)  # the token becomes the cookie; then the case
        start = time.perf_counter()
        page.goto(f"http://127.0.0.1:{server.port}/cases/{case}/?timing")
        page.wait_for_selector(LOADED, state="attached", timeout=VIEW_TIMEOUT_S * 1000)
        page.evaluate("window.reviewViewer.sync()")
        times = [("open in a new tab", time.perf_counter() - start, _shown(page))]
        if then_next:
            page.wait_for_timeout(NEXT_PREFETCH_WAIT_MS)  # the reviewer looks at the case meanwhile
            start = time.perf_counter()
            page.keyboard.press("n")
            page.wait_for_selector(f"body[data-loaded='{case}_next']", state="attached", timeout=VIEW_TIMEOUT_S * 1000)
            page.evaluate("window.reviewViewer.sync()")
            times.append(("next case (n) in the same tab", time.perf_counter() - start, _shown(page)))
        if whole_volume:
            start = time.perf_counter()
            page.keyboard.press("w")
            page.locator("#numbers", has_text="(full").wait_for(timeout=VIEW_TIMEOUT_S * 1000)
            page.wait_for_selector(LOADED, state="attached", timeout=VIEW_TIMEOUT_S * 1000)
            page.evaluate("window.reviewViewer.sync()")
            times.append(("whole volume (w)", time.perf_counter() - start, _shown(page)))
        return times
    finally:
        context.close()


def measure_viewer(out: Path, case: str, full_baseline: bool) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            server = Server(out)
            try:
                for label in ("view made from the CT", "view made before", "view made before"):
                    for what, seconds, shown in time_view(browser, server, case, then_next=label == "view made from the CT"):
                        print(f"  {what}, {label}: {seconds:5.1f} s   shown: {shown}")
            finally:
                server.stop()
            if full_baseline:
                server = Server(out, "--view-voxels", str(int(np.prod(BIG_SHAPE))))
                try:
                    for what, seconds, shown in time_view(browser, server, case, whole_volume=True):
                        print(f"  baseline, {what}: {seconds:5.1f} s   shown: {shown}")
                finally:
                    server.stop()
        finally:
            browser.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-full-baseline", action="store_true")
    parser.add_argument("--cohort-only", action="store_true", help="measure the 10,000-case folder only")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_review_"))
    try:
        start = time.perf_counter()
        out = cohort_folder(root, args.cases)
        print(f"cohort of {args.cases} cases written in {time.perf_counter() - start:.1f} s (load {os.getloadavg()[0]:.1f})")
        measure_cohort(out, args.repeats)
        if args.cohort_only:
            return 0
        start = time.perf_counter()
        big, case = big_case(root)
        print(f"512 x 512 x 300 case segmented in {time.perf_counter() - start:.1f} s (load {os.getloadavg()[0]:.1f})")
        measure_viewer(big, case, not args.no_full_baseline)
        print(f"(load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
