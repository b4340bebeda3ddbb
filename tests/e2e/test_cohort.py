"""``spleen-seg segment`` at cohort scale (issue 9): a manifest run as the three parts of a job array
at once, ``merge-summaries``, and the cohort page ``index.html`` rendered by headless Chromium.

The manifest holds three phantoms (one named by a case id that is an HTML injection attempt) and
a path that does not exist (an error message holding ``<script>``): that case fails, the others
are segmented, and the page shows every row with its text as text.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from ci import in_ci
from PIL import Image

from spleen_seg.batch.summary import SummaryRow, write_page
from spleen_seg.pipeline.network import demo_weights_path

CLI = [sys.executable, "-m", "spleen_seg.cli"]
EXIT_FAILED = 2
PARTS = 3
PHANTOM_SEEDS = (1, 2, 3)
XSS_CASE = "<img src=x onerror=document.body.setAttribute('data-xss',1)>"
XSS_PATH = "missing/<script>document.body.setAttribute('data-xss',2)</script>.nii.gz"
MAX_FLAG_ERROR_S = 15.0  # a bad manifest or flag is refused before any model loads
CHROMIUM = os.environ.get("CHROMIUM", "chromium")
CHROMIUM_TIMEOUT_S = 90
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WINDOW = (1400, 900)
ROW = re.compile(r'<tr class="case ([^"]*)" data-case="([^"]*)" data-volume="([^"]*)">')
SYNTHETIC_ROWS, SYNTHETIC_FAILED, ROWS_PER_PAGE = 1200, 30, 500


def summary(path: Path) -> list[dict[str, str]]:
    import csv

    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, phantom, write_nifti, run_command):
    """The manifest's three parts run into one output folder."""
    root = tmp_path_factory.mktemp("cohort")
    for seed in PHANTOM_SEEDS:
        case = phantom(seed, "RAS")
        write_nifti(case.image_hu.astype(np.int16), case.affine, root / "scans" / f"case_{seed}.nii.gz")
    manifest = root / "cases.csv"
    manifest.write_text("path,case_id\nscans/case_1.nii.gz,\n"
                        f"scans/case_2.nii.gz,\"{XSS_CASE}\"\nscans/case_3.nii.gz,third\n\"{XSS_PATH}\",\n")
    out = root / "out"
    args = [*CLI, "segment", "--manifest", str(manifest), "-o", str(out), "--weights", str(demo_weights_path()),
            "-q", "--num-parts", str(PARTS)]
    # Part 0 first: it exports the network into the session's model cache once (about 15 s when
    # cold); then the other parts run at the same time, as the tasks of an array do.
    parts = [run_command([*args, "--part-id", "0"])]
    with ThreadPoolExecutor(PARTS - 1) as pool:
        parts += pool.map(lambda index: run_command([*args, "--part-id", str(index)]), range(1, PARTS))
    return {"root": root, "out": out, "parts": parts, "manifest": manifest}


def test_parts_of_a_manifest_cover_every_case_once(cohort, run_command, tail):
    out, parts = cohort["out"], cohort["parts"]
    codes = sorted(proc.returncode for proc in parts)
    assert codes == [0, 0, EXIT_FAILED], [tail(proc) for proc in parts]
    # Case ids sort as "<img...", "case_1", "script>", "third": part 2 of 3 got the missing file.
    failing = parts[[proc.returncode for proc in parts].index(EXIT_FAILED)]
    assert failing is parts[2] and "file not found (InputImageError)" in failing.stderr
    rows = summary(out / "summary.csv")
    assert [row["case"] for row in rows] == [XSS_CASE, "case_1", "script>", "third"]
    assert [row["status"] for row in rows] == ["ok", "ok", "failed", "ok"]
    assert rows[2]["error"].endswith(f"{XSS_PATH}: file not found (InputImageError)")
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == sorted([XSS_CASE, "case_1", "third"])
    for case in folders:
        assert {"spleen.nii.gz", "report.json", "preview.png", "preview_thumb.jpg"} <= {
            p.name for p in (out / case).iterdir()}
    for index in range(PARTS):
        assert (out / f"summary.part-{index}-of-{PARTS}.done").is_file()
    merged = (out / "summary.csv").read_bytes()
    proc = run_command([*CLI, "merge-summaries", str(out)])
    assert proc.returncode == 0, tail(proc)
    assert f"{out / 'summary.csv'}: 4 cases (failed 1, ok 3)" in proc.stdout and "parts finished: 3 of 3" in proc.stdout
    assert (out / "summary.csv").read_bytes() == merged  # the parts had already merged every row


def test_bad_manifest_and_part_flags_fail_before_any_model_loads(cohort, run_command, tmp_path):
    no_path = tmp_path / "no_path.csv"
    no_path.write_text("file\nscans/case_1.nii.gz\n")
    duplicate = tmp_path / "duplicate.csv"
    duplicate.write_text("path,case_id\na.nii.gz,x\nb.nii.gz,x\n")
    base = [*CLI, "segment", "-o", str(tmp_path / "out"), "--weights", str(demo_weights_path())]
    for extra, message in (
        (["--manifest", str(no_path)], f"error: {no_path}: no 'path' column (header: file)"),
        (["--manifest", str(duplicate)], f"error: {duplicate}: case_id 'x' on lines 2 and 3"),
        (["--manifest", str(cohort["manifest"]), "--part-id", "1"], "error: --num-parts and --part-id go together"),
        (["--manifest", str(cohort["manifest"]), "--num-parts", "3", "--part-id", "3"],
         "error: part id 3 is not one of 0..2 (--num-parts 3)"),
    ):
        proc = run_command([*base, *extra], timeout=MAX_FLAG_ERROR_S * 4)
        assert proc.returncode == EXIT_FAILED and proc.stderr.startswith(message), proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the page in a browser


def chromium(args: list[str], url: str, profile: Path) -> subprocess.CompletedProcess:
    """Run headless Chromium on ``url`` with a fresh profile; killed (its process group) at the timeout."""
    if shutil.which(CHROMIUM) is None:
        if in_ci():
            pytest.fail(f"{CHROMIUM} not found: .ci/run installs the Debian package chromium")
        pytest.skip(f"{CHROMIUM} not found (Debian package chromium)")
    proc = subprocess.Popen([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=CHROMIUM_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def rendered_rows(page: Path, fragment: str, profile: Path) -> tuple[str, list[tuple[str, str, str]]]:
    """The DOM after the page's script ran for ``index.html#<fragment>``, and its case rows
    as (classes, case id, volume)."""
    dom = chromium(["--dump-dom"], f"{page.as_uri()}#{fragment}", profile).stdout
    return dom, [(classes, html.unescape(case), volume) for classes, case, volume in ROW.findall(dom)]


def test_cohort_page_in_headless_chromium(cohort, tmp_path):
    page = cohort["out"] / "index.html"
    dom, rows = rendered_rows(page, "", tmp_path / "p1")
    assert [case for _, case, _ in rows] == [XSS_CASE, "case_1", "script>", "third"]  # case-id order
    body = re.search(r"<body[^>]*>", dom)
    assert body is not None and "data-xss" not in body.group(0)  # neither injection ran
    assert "<title>spleen-seg cohort: out</title>" in dom and "4 of 4 cases: ok 3" not in dom  # no expected count
    assert "4 cases: ok 3, not found 0, failed 1" in dom
    # Each segmented case shows its quality score (pipeline/quality.py), the failed one none.
    assert len(re.findall(r'<td class="num quality(?: review)?">[01]\.\d{3}</td>', dom)) == 3
    failed_row = dom[dom.index('data-case="script&gt;"'):].split("</tr>")[0]
    assert html.escape(f"{XSS_PATH}: file not found (InputImageError)", quote=False) in failed_row
    assert [classes for classes, case, _ in rows if case == "script>"] == ["status-failed"]
    assert "<script>document" not in dom

    _, by_volume = rendered_rows(page, "sort=volume", tmp_path / "p2")
    volumes = [float(volume) for _, _, volume in by_volume if volume]
    assert len(volumes) == 3 and volumes == sorted(volumes) and by_volume[-1][1] == "script>"  # no volume: last
    _, descending = rendered_rows(page, "sort=-volume", tmp_path / "p3")
    assert [float(v) for _, _, v in descending if v] == sorted(volumes, reverse=True)

    shot = tmp_path / "page.png"
    chromium([f"--screenshot={shot}", f"--window-size={WINDOW[0]},{WINDOW[1]}"], page.as_uri(), tmp_path / "p4")
    with Image.open(shot) as image:
        assert image.size == WINDOW
        grey = np.asarray(image.convert("L"), dtype=np.float64)
    table = grey[150:750]  # below the header: the rows with their thumbnails
    print(f"\nscreenshot {shot}: std {grey.std():.1f}, dark {np.mean(table < 60):.3f}, "
          f"non-white {np.mean(table < 240):.3f} of the table area")
    assert grey.std() > 30  # not blank
    # Three rows with thumbnails cover about 15% of it in non-white, 8% in near-black; without the
    # thumbnails (text only) near-black would be under 1%.
    assert np.mean(table < 240) > 0.08  # rows drawn
    assert np.mean(table < 60) > 0.04  # the thumbnails (CT on black) loaded from the case folders


def test_cohort_page_pages_and_filters_a_large_cohort(tmp_path):
    rows = []
    for n in range(SYNTHETIC_ROWS):
        if n % (SYNTHETIC_ROWS // SYNTHETIC_FAILED) == 0:
            rows.append(SummaryRow(f"case_{n:05d}", f"/cohort/{n}.nii.gz", "failed", error=f"/cohort/{n}.nii.gz: bad"))
        else:
            rows.append(SummaryRow(f"case_{n:05d}", f"/cohort/{n}.nii.gz", "ok"))
    dicts = [row.as_dict() for row in rows]
    for n, row in enumerate(dicts):  # volumes spread evenly over 180-220 mL (MAD 10 mL: |z| <= 1.35)...
        row["volume_ml"] = f"{180 + 40 * n / SYNTHETIC_ROWS:.3f}" if row["status"] == "ok" else ""
    dicts[7]["volume_ml"] = "2500.000"  # ...but one
    page = write_page(dicts, tmp_path)
    _, first = rendered_rows(page, "", tmp_path / "p1")
    assert len(first) == ROWS_PER_PAGE
    assert [case for classes, case, _ in first if "outlier" in classes.split()] == ["case_00007"]
    _, last = rendered_rows(page, "page=3", tmp_path / "p2")
    assert len(last) == SYNTHETIC_ROWS - 2 * ROWS_PER_PAGE and last[0][1] == f"case_{2 * ROWS_PER_PAGE:05d}"
    _, failed = rendered_rows(page, "status=failed&sort=-case", tmp_path / "p3")
    assert len(failed) == SYNTHETIC_FAILED and all("status-failed" in classes for classes, _, _ in failed)
    assert [case for _, case, _ in failed] == sorted((case for _, case, _ in failed), reverse=True)
