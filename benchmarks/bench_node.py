"""The DICOM node's figures: latency of the shared DICOM series through Orthanc, peak RSS under load,
and the logs of the kill-and-restart test.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_node.py [--runs 5] [--weights W] [--skip-tests]

Latency: Orthanc (started here, temporary storage) stores the shared real series
(../shared/data/real_ct/dicom_series, 20 slices 512 x 512, JPEG 2000; its blank UIDs are filled
with fresh ones for each run, since Orthanc refuses instances without them and a node ignores
a series it already processed), sends it to a running node (C-STORE, ``/modalities/.../store``),
and the time is taken from the node's receipt of the last instance (the job table's
``received_at``) to the first moment Orthanc's ``/tools/find`` shows the SEG, polled every
20 ms; the quiet period is subtracted. The node runs on with the model loaded, as in service.

Peak RSS and the restart logs come from the e2e tests (tests/e2e/test_node_load.py and
test_node_restart.py), run here with their output shown.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "helpers"))

import pydicom  # noqa: E402
from node_harness import Node, Orthanc, free_port, wait_until, warm_model_cache  # noqa: E402
from pydicom.uid import CTImageStorage, generate_uid  # noqa: E402
from synthetic_dicom import REAL_SERIES  # noqa: E402

from spleen_seg.pipeline.network import demo_weights_path  # noqa: E402

YARDSTICK = REAL_SERIES.parents[2] / "models" / "yardstick.pt"
QUIET_SECONDS = 2.0
FIND_POLL_S = 0.02
RESULT_TIMEOUT_S = 300.0


def series_with_uids(source: Path, dest: Path) -> tuple[list[Path], str]:
    """A copy of the series with fresh Study/Series/SOP Instance UIDs (pixel data untouched)."""
    dest.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    files = []
    for path in sorted(source.iterdir()):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID or CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(dest / path.name)
        files.append(dest / path.name)
    return files, series


def last_received(spool: Path, series_uid: str) -> float:
    """When the node recorded the series' last instance (just before acknowledging it)."""
    with sqlite3.connect(spool / "jobs.sqlite") as db:
        (value,) = db.execute("SELECT MAX(received_at) FROM instances WHERE series_key = ?", (series_uid,)).fetchone()
    return float(value)


def stage_timings(spool: Path, job_id: int) -> dict[str, float]:
    """The job's report.json timings: read, segment, measure, write_nifti, write_dicom_seg, total."""
    report = spool / "results" / f"job-{job_id:06d}" / "report.json"
    return json.loads(report.read_text())["timings_s"]


def segment_cli_seconds(weights: Path, work: Path) -> dict[str, float]:
    """The same series through ``spleen-seg segment`` (model loaded per run): its report's timings."""
    out = work / "segment"
    subprocess.run([sys.executable, "-m", "spleen_seg.cli", "-q", "segment", str(REAL_SERIES), "-o", str(out),
                    "--weights", str(weights)], cwd=REPO, check=True, capture_output=True, timeout=RESULT_TIMEOUT_S)
    (report,) = out.glob("*/report.json")
    return json.loads(report.read_text())["timings_s"]


def seg_of(pacs: Orthanc, series_uid: str) -> bool:
    for seg in pacs.find("SEG"):
        tags = pacs.get(f"/instances/{seg}/tags?simplify")
        if tags.get("ReferencedSeriesSequence", [{}])[0].get("SeriesInstanceUID") == series_uid:
            return True
    return False


def latency_runs(runs: int, weights: Path, work: Path) -> list[float]:
    node_port = free_port()
    pacs = Orthanc(work / "pacs", {"spleenseg": ["SPLEENSEG", "127.0.0.1", node_port]})
    node = Node(work / "spool", node_port, work / "node.log", "--quiet-seconds", str(QUIET_SECONDS),
                "--allowed-callers", pacs.ae_title, "--destination", f"{pacs.ae_title}@127.0.0.1:{pacs.dicom_port}",
                weights=weights)
    latencies = []
    try:
        node.wait_for_log("event=node state=model_loaded", RESULT_TIMEOUT_S)
        for run in range(runs):
            files, series_uid = series_with_uids(REAL_SERIES, work / f"run{run}")
            series_id = pacs.upload(files)
            pacs.post("/modalities/spleenseg/store", {"Resources": [series_id], "Synchronous": True})
            wait_until(lambda uid=series_uid: seg_of(pacs, uid), RESULT_TIMEOUT_S, "the SEG in Orthanc")
            seen = time.time()
            latency = seen - last_received(work / "spool", series_uid) - QUIET_SECONDS
            latencies.append(latency)
            print(f"run {run + 1}: {latency:.2f} s from the last instance received to the SEG in Orthanc "
                  f"(quiet period of {QUIET_SECONDS:g} s subtracted); processing stages (s): "
                  f"{stage_timings(work / 'spool', run + 1)}", flush=True)
    finally:
        node.stop()
        pacs.stop()
    print("\n--- node log of the latency runs ---\n" + node.log.read_text())
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--weights", type=Path, help="default: the shared yardstick weights, else the demo weights")
    parser.add_argument("--skip-tests", action="store_true", help="only the latency, not the load and restart tests")
    args = parser.parse_args()
    if not REAL_SERIES.is_dir():
        print(f"shared DICOM series not found: {REAL_SERIES}", file=sys.stderr)
        return 2
    weights = args.weights or (YARDSTICK if YARDSTICK.is_file() else demo_weights_path())
    os.environ.setdefault("SPLEEN_SEG_CACHE", tempfile.mkdtemp(prefix="bench_node_cache_"))
    warm_model_cache()
    work = Path(tempfile.mkdtemp(prefix="bench_node_"))
    try:
        latencies = latency_runs(args.runs, weights, work)
        cli = segment_cli_seconds(weights, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nthe same series through `spleen-seg segment` in this run, stages (s): {cli}")
    print(f"weights {weights.name}; latency median of {len(latencies)}: {statistics.median(latencies):.2f} s "
          f"(min {min(latencies):.2f}, max {max(latencies):.2f}); machine shared with other jobs")
    if not args.skip_tests:
        tests = ["tests/e2e/test_node_load.py", "tests/e2e/test_node_restart.py"]
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", *tests],
                                cwd=REPO, env=os.environ.copy())
        return result.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
