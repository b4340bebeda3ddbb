"""Cost of the batch's progressive files at cohort scale: one rewrite of summary.csv, of index.html,
of a job array's merged summary, and one journal line, for 1,000 / 10,000 / 100,000 cases.

These costs decide the rewrite schedule of ``batch.summary`` (``RewriteSchedule``): rewriting
after every case is quadratic in the cohort, so once a rewrite costs more than a small share
of the time since the last one it waits. Also prints the page weight of 1,000 cases (the HTML
and the thumbnails it loads) against the full previews, which is why the page shows
``preview_thumb.jpg``.

Usage: python benchmarks/bench_cohort_files.py [--sizes 1000 10000 100000] [--parts 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from spleen_seg.batch.inputs import Part
from spleen_seg.batch.summary import (
    Journal,
    SummaryRow,
    part_summary_name,
    rebuild_merged,
    write_page,
    write_summary,
)
from spleen_seg.outputs.report import FLAG_TOUCHES_BORDER, CaseReport

JOURNAL_LINES = 50  # appends timed (each flushed and fsync'd)
# A cohort path as NLST's DICOM folders name them (about 110 characters).
SOURCE = "/data/nlst/{n:06d}/01-02-1999-NLST-LSS-45699/1.000000-0OPAGELSPLUSLUNG3502.51204.00.11.5-{n:05d}"


def fake_rows(count: int, seed: int = 0) -> list[SummaryRow]:
    """``count`` summary rows like a real cohort's: volumes around 200 mL, 2% failed, some flags."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in range(count):
        case = f"{n:06d}_s2"
        if rng.random() < 0.02:
            rows.append(SummaryRow(case, SOURCE.format(n=n), "failed",
                                   error=f"{SOURCE.format(n=n)}: slice 37 missing (gap 10 mm) (InputImageError)"))
            continue
        volume = float(rng.lognormal(np.log(200.0), 0.35))
        report = CaseReport(case=case, source=SOURCE.format(n=n), spleen_found=True, volume_ml=volume,
                            voxel_count=int(volume * 300), extents_mm={"left_right": 80.0, "anterior_posterior": 95.0,
                                                                        "superior_inferior": 110.0},
                            hu_mean=120.0, hu_std=20.0, components_found=1 + int(rng.random() < 0.05),
                            components_kept=1, touches_border=bool(rng.random() < 0.03), probable_header_flip=False,
                            anatomy=None, splenomegaly={"flag": volume > 314.5}, input_geometry={},
                            warnings=[FLAG_TOUCHES_BORDER] if rng.random() < 0.03 else [])
        rows.append(SummaryRow(case, SOURCE.format(n=n), "ok", report))
    return rows


def timed(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(size: int, parts: int, repeats: int) -> str:
    """One table line: median seconds of each rewrite for a cohort of ``size`` cases, file sizes."""
    rows = fake_rows(size)
    dicts = [row.as_dict() for row in rows]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        csv_s = timed(lambda: write_summary(rows, out / "summary.csv"), repeats)
        page_s = timed(lambda: write_page(dicts, out), repeats)
        for index in range(parts):
            write_summary(rows[index::parts], out / part_summary_name(Part(index, parts)))
        merge_s = timed(lambda: rebuild_merged(out, parts), repeats)
        journal = Journal(out / "summary.journal.csv")
        line_s = timed(lambda: journal.append(rows[0].values()), JOURNAL_LINES)
        journal.remove()
        csv_mb = (out / "summary.csv").stat().st_size / 1e6
        html_mb = (out / "index.html").stat().st_size / 1e6
    return (f"{size:>8} {csv_s:>11.3f}s {page_s:>10.3f}s {csv_s + page_s:>8.3f}s {merge_s:>9.3f}s "
            f"{csv_mb:>7.1f} {html_mb:>8.1f} {line_s * 1000:>11.2f}ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--parts", type=int, default=10, help="parts of the merged summary")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{'cases':>8} {'summary.csv':>12} {'index.html':>11} {'rewrite':>9} {'merge ' + str(args.parts):>10} "
          f"{'csv MB':>7} {'html MB':>8} {'journal line':>13}")
    for size in args.sizes:
        print(measure(size, args.parts, args.repeats), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
