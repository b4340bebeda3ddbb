"""outputs.cohort: robust z-scores, the page's data, escaping of user-controlled text, page weight;
outputs.preview's thumbnail. (The page in a real browser: tests/e2e/test_cohort.py.)"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from spleen_seg.outputs.cohort import CaseFiles, cohort_page, page_data, robust_z
from spleen_seg.outputs.preview import THUMBNAIL_WIDTH_PX, write_thumbnail

FILES = CaseFiles(thumbnail="preview_thumb.jpg", preview="preview.png",
                  links=(("report", "report.json"), ("mask", "spleen.nii.gz"), ("folder", "")))
# 1,000 rows of a cohort (paths of 60 characters) must stay a light page: its weight is the thumbnails'.
MAX_BYTES_PER_ROW = 250
DATA_BLOCK = re.compile(r'<script type="application/json" id="cohort-data">(.*?)</script>', re.S)


def summary_row(case: str, status: str = "ok", volume: str = "200.000", **extra: str) -> dict[str, str]:
    return {"case": case, "source": f"/cohort/site-a/{case}.nii.gz", "status": status, "volume_ml": volume,
            "components": "1", "flags": "", "error": "", "reused": "no", **extra}


def test_robust_z_is_the_modified_z_score_around_median_and_mad():
    z, stats = robust_z([100.0, 110.0, 120.0, None, 130.0, 1000.0])
    # median 120, absolute deviations 20 10 0 10 880: MAD 10.
    assert (stats.median_ml, stats.mad_ml, stats.cases) == (120.0, 10.0, 5)
    expected = [-2 * 0.6745, -0.6745, 0.0, None, 0.6745, 88 * 0.6745]
    assert z == [None if e is None else pytest.approx(e, abs=1e-3) for e in expected]
    assert robust_z([5.0, 5.0, 5.0, 9.0])[0] == [None] * 4  # MAD 0: no outlier can be told apart
    assert robust_z([100.0, None, 300.0])[0] == [None] * 3  # fewer than 3 volumes


def test_page_data_rows_flags_and_outliers():
    rows = [summary_row(f"c{n}", volume=f"{200 + n:.3f}") for n in range(6)]
    rows += [summary_row("huge", volume="900.000", flags="splenomegaly;touches_border", components="3"),
             summary_row("empty", status="not_found", volume="0.000", components="0"),
             summary_row("bad", status="failed", volume="", components="", error="/x/bad.nii.gz: truncated (EOFError)")]
    data = page_data(rows, FILES, "cohort", expected=12)
    by_case = {row[0]: row for row in data["rows"]}
    assert by_case["huge"][5] == ["splenomegaly", "touches_border", "several_components"]
    assert by_case["huge"][3] > data["stats"]["outlier_z"] and abs(by_case["c3"][3]) < 1
    assert by_case["empty"][2:4] == [0.0, None] and data["stats"]["cases"] == 7  # empty masks are no volumes
    assert by_case["bad"][2:5] == [None, None, None] and by_case["bad"][6].endswith("(EOFError)")
    assert data["expected"] == 12 and data["files"]["links"][2] == ["folder", ""]


HOSTILE = "</script><script>document.title='owned'</script><!--"


def test_user_text_cannot_become_markup():
    rows = [summary_row(HOSTILE), summary_row("x{{data}}y", status="failed", volume="", error=f"{HOSTILE}: gone")]
    page = cohort_page(rows, files=FILES, title=f"<b>{HOSTILE}")
    assert page.count("<script") == 2 and page.count("</script>") == 2  # only the page's own two
    assert "<b>" not in page and "&lt;b&gt;" in page
    (block,) = DATA_BLOCK.findall(page)
    data = json.loads(block)
    assert [row[0] for row in data["rows"]] == [HOSTILE, "x{{data}}y"]  # text survives intact
    assert data["rows"][1][6] == f"{HOSTILE}: gone"


def test_page_is_self_contained_and_light():
    rng = np.random.default_rng(0)
    rows = [summary_row(f"case_{n:04d}", volume=f"{rng.normal(200, 40):.3f}") for n in range(1000)]
    page = cohort_page(rows, files=FILES, title="cohort")
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", page)  # nothing from the network
    assert "<link" not in page and "@import" not in page and "url(" not in page
    assert len(page.encode()) < MAX_BYTES_PER_ROW * len(rows)
    assert len(json.loads(DATA_BLOCK.findall(page)[0])["rows"]) == 1000


def test_thumbnail_is_a_small_jpeg_of_the_preview(tmp_path):
    rng = np.random.default_rng(1)
    preview = tmp_path / "preview.png"
    Image.fromarray(rng.integers(0, 255, (500, 1350, 3), dtype=np.uint8)).save(preview)
    thumb = write_thumbnail(preview, tmp_path / "preview_thumb.jpg")
    with Image.open(thumb) as image:
        assert image.format == "JPEG" and image.size == (THUMBNAIL_WIDTH_PX, 148)
    assert thumb.stat().st_size < preview.stat().st_size / 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preview.png", "preview_thumb.jpg"]
