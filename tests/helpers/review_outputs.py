"""Output folders for the review app's tests, written by the batch's own code (``segment_one``,
``write_summary``) with a threshold segmenter, so a test knows every mask voxel."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from phantoms import save_nifti
from stub_segmenter import ThresholdSegmenter

from spleen_seg.batch.case import segment_one
from spleen_seg.batch.summary import SUMMARY_FILENAME, SummaryRow, write_page, write_summary
from spleen_seg.outputs.report import REPORT_FILENAME, read_report, write_report

AIR_HU, TISSUE_HU, SPLEEN_HU = -1000.0, 40.0, 150.0
THRESHOLD_HU = 100.0
MODEL = {"name": "spleen-seg", "version": "test", "weights_sha256": "0" * 64}
SERVER_START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class CaseSpec:
    case: str
    shape: tuple[int, int, int] = (40, 36, 24)
    spacing_mm: tuple[float, float, float] = (2.0, 2.0, 3.0)
    centre: tuple[float, float, float] = (0.3, 0.35, 0.5)  # of the shape: patient left, posterior
    radius_vox: float = 6.0
    quality: float | None = None
    review_suggested: bool = False


def phantom_ct(spec: CaseSpec, seed: int = 0) -> np.ndarray:
    """Air around an elliptic body of soft tissue holding one brighter ball (the "spleen"): float32 HU."""
    grid = np.indices(spec.shape, dtype=np.float32)
    centre = [c * (n - 1) for c, n in zip(spec.centre, spec.shape, strict=True)]
    body = sum(((g - (n - 1) / 2) / (0.48 * n)) ** 2 for g, n in zip(grid[:2], spec.shape[:2], strict=True)) <= 1
    ball = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= spec.radius_vox ** 2
    noise = np.random.default_rng(seed).normal(0.0, 5.0, spec.shape).astype(np.float32)
    ct = np.where(body, TISSUE_HU, AIR_HU).astype(np.float32) + noise
    ct[ball] = SPLEEN_HU
    return ct


def affine_for(spec: CaseSpec) -> np.ndarray:
    return np.diag([*spec.spacing_mm, 1.0])


def make_batch(out_dir: Path, specs: list[CaseSpec], inputs: Path) -> Path:
    """Segment each spec's phantom NIfTI into ``out_dir`` and write summary.csv and index.html, as ``segment`` does."""
    segmenter = ThresholdSegmenter(THRESHOLD_HU)
    rows = []
    for seed, spec in enumerate(specs):
        path = save_nifti(phantom_ct(spec, seed).astype(np.int16), affine_for(spec), inputs / f"{spec.case}.nii.gz")
        result = segment_one(segmenter, path, out_dir, case=spec.case, model=MODEL)
        assert result.error is None, result.error
        report = result.report
        if spec.quality is not None:
            report.quality = {"score": spec.quality, "review_suggested": spec.review_suggested}
            write_report(report, out_dir / spec.case / REPORT_FILENAME)
        rows.append(SummaryRow(case=spec.case, source=str(path), status=result.status, report=report))
    write_summary(rows, out_dir / SUMMARY_FILENAME)
    write_page([row.as_dict() for row in rows], out_dir)
    return out_dir


def make_dicom_case(out_dir: Path, series_dir: Path, spec: CaseSpec) -> str:
    """One DICOM case (a synthetic series segmented by ``segment_one``) added to ``out_dir``'s summary; its case id."""
    from synthetic_dicom import only_series, write_series

    write_series(series_dir, phantom_ct(spec), spacing=spec.spacing_mm)
    series = only_series(series_dir)
    result = segment_one(ThresholdSegmenter(THRESHOLD_HU), series, out_dir, model=MODEL)
    assert result.error is None, result.error
    rows = [SummaryRow(case=p.name, source=read_report(p / REPORT_FILENAME).source, status="ok",
                       report=read_report(p / REPORT_FILENAME))
            for p in sorted(out_dir.iterdir()) if (p / REPORT_FILENAME).is_file()]
    write_summary(rows, out_dir / SUMMARY_FILENAME)
    return result.case


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ReviewServer:
    """``spleen-seg review OUT`` as a subprocess on a free port of 127.0.0.1 with a known token; stopped by pid."""

    def __init__(self, out_dir: Path, *, env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> None:
        self.out_dir = out_dir
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = out_dir.parent / f"review-server-{self.port}.log"
        environment = {**os.environ, **(env or {})}
        self.handle = self.log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "spleen_seg.cli", "review", str(out_dir), "--port", str(self.port),
             "--reviewer", "tester", *args], stdout=self.handle, stderr=subprocess.STDOUT, env=environment)
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while "open http" not in self.output():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"review server did not start: {self.output()}")
            time.sleep(0.1)
        url = re.search(r"open (http://\S+)", self.output())
        assert url is not None, self.output()
        self.url = url.group(1)
        self.token = self.url.split("token=", 1)[1]

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_for_output(self, text: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in self.output():
            assert time.monotonic() < deadline, f"{text!r} not in the server's output: {self.output()}"
            time.sleep(0.05)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=30)
        self.handle.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self.handle.close()

    def __enter__(self) -> ReviewServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
