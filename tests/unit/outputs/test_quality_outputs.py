"""The quality score on its way out: report.json (version 3), its flag, summary.csv's columns, the cohort page."""

from __future__ import annotations

import numpy as np

from spleen_seg.batch.summary import SUMMARY_COLUMNS, SummaryRow
from spleen_seg.io.nifti import Geometry
from spleen_seg.outputs.cohort import CaseFiles, page_data
from spleen_seg.outputs.report import FLAG_REVIEW, build_report, keep_components, read_report, write_report
from spleen_seg.pipeline.quality import quality_score

FILES = CaseFiles(thumbnail="t.jpg", preview="p.png", links=())


def _report(margin_inside: float):
    image = np.full((24, 24, 24), -100.0, dtype=np.float32)
    mask = np.zeros(image.shape, dtype=np.uint8)
    mask[8:16, 8:16, 8:16] = 1
    image[mask > 0] = 60.0
    geometry = Geometry(shape=image.shape, affine_ras=np.diag([1.5, 1.5, 2.0, 1.0]))
    report = build_report("c", "c.nii.gz", mask, image, geometry, keep_components(mask, False))
    margin = np.where(mask > 0, margin_inside, -6.0).astype(np.float32)
    report.quality = quality_score(margin).as_dict()
    return report


def test_quality_reaches_report_summary_and_page(tmp_path):
    sure, unsure = _report(6.0), _report(0.5)
    assert sure.quality is not None and sure.quality["score"] == 0.0 and FLAG_REVIEW not in sure.flags
    assert unsure.quality is not None and unsure.quality["score"] > 0.5 and FLAG_REVIEW in unsure.flags
    write_report(unsure, tmp_path / "report.json")
    again = read_report(tmp_path / "report.json")
    assert again is not None and again.quality == unsure.quality and again.review_suggested
    rows = [SummaryRow("sure", "a", "ok", report=sure).as_dict(), SummaryRow("unsure", "b", "ok", report=unsure).as_dict(),
            SummaryRow("gone", "c", "failed", error="c: bad").as_dict()]
    assert list(rows[0]) == list(SUMMARY_COLUMNS)
    assert [(r["quality_score"], r["review_suggested"]) for r in rows] == [
        ("0.0000", "no"), (f"{unsure.quality['score']:.4f}", "yes"), ("", "")]
    assert rows[1]["flags"].split(";")[-1] == FLAG_REVIEW
    table = page_data(rows, FILES, "t", None)["rows"]
    assert [(r[9], r[10]) for r in table] == [(0.0, False), (round(unsure.quality["score"], 4), True), (None, False)]
    assert FLAG_REVIEW in table[1][5]
