"""A batch split into the parts of a job array (``segment_files(..., part=...)``): every case is
computed by exactly one part, in the folder it would have without parts, the merged summary
has every row, and a part run again resumes. A threshold stands in for the network."""

from __future__ import annotations

import csv
import json
import os
import signal
from pathlib import Path

import pytest
from threshold_network import ThresholdSegmenter, install_threshold_network, sphere

from spleen_seg import cli
from spleen_seg.batch.case import SegmentOptions
from spleen_seg.batch.inputs import Part, collect_cases, read_manifest, select_part
from spleen_seg.batch.run import segment_files

NO_PREVIEW = SegmentOptions(preview=False)
PARTS = 3
EXIT_SIGTERM = 128 + signal.SIGTERM
RADII_VOX = (3, 4, 5, 6, 7, 4.5, 5.5)


def summary(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def cohort(tmp_path):
    """Seven sphere scans and a manifest of them (one given a case id, one missing), fake weights."""
    scans = [sphere(tmp_path / "scans" / f"s{n}.nii.gz", radius) for n, radius in enumerate(RADII_VOX)]
    manifest = tmp_path / "cases.csv"
    lines = ["path,case_id", "scans/s0.nii.gz,patient-0", *(f"scans/{p.name}," for p in scans[1:]),
             "scans/gone.nii.gz,"]
    manifest.write_text("\n".join(lines) + "\n")
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"stand-in weights")
    return manifest, weights


def run_part(items, cases, part, out, weights):
    mine, ids = select_part(items, cases, part)
    return segment_files(mine, out, weights, "cpu", progress=False, options=NO_PREVIEW, cases=ids, part=part)


def test_three_parts_compute_every_case_once_and_merge_every_row(cohort, tmp_path, monkeypatch):
    manifest, weights = cohort
    network = install_threshold_network(monkeypatch)
    items, cases = collect_cases([], read_manifest(manifest))
    out = tmp_path / "out"
    computed = []
    for index in range(PARTS):
        results = run_part(items, cases, Part(index, PARTS), out, weights)
        computed += [result.case for result in results]
    assert sorted(computed) == sorted(cases) and len(computed) == len(set(computed)) == len(RADII_VOX) + 1
    assert network.loads == PARTS and len(network.calls) == len(RADII_VOX)  # the missing scan is never read
    rows = summary(out / "summary.csv")
    assert [row["case"] for row in rows] == sorted(cases)  # merged, in case-id order
    by_case = {row["case"]: row for row in rows}
    assert by_case["gone"]["status"] == "failed" and "file not found" in by_case["gone"]["error"]
    assert all(by_case[case]["status"] == "ok" for case in cases if case != "gone")
    assert "patient-0" in by_case and (out / "patient-0" / "spleen.nii.gz").is_file()
    # Each row comes from exactly one part's summary.
    part_rows = [row["case"] for index in range(PARTS) for row in summary(out / f"summary.part-{index}-of-3.csv")]
    assert sorted(part_rows) == sorted(cases)
    assert all((out / f"summary.part-{index}-of-3.done").is_file() for index in range(PARTS))
    assert not list(out.glob("*.journal.csv"))

    # Part 1 run again: its cases are skipped (resume), nothing is recomputed, the merge stays whole.
    network.calls.clear()
    again = run_part(items, cases, Part(1, PARTS), out, weights)
    assert network.calls == [] and all(r.reused or r.status == "failed" for r in again)
    assert [row["case"] for row in summary(out / "summary.csv")] == sorted(cases)

    # The same cohort in 2 parts: same case folders, so the cases of the 3-part run are all skipped.
    for index in range(2):
        run_part(items, cases, Part(index, 2), out, weights)
    assert network.calls == [] and not list(out.glob("summary.part-*-of-3*"))
    assert [row["case"] for row in summary(out / "summary.csv")] == sorted(cases)


class TerminatedOnSecondCase(ThresholdSegmenter):
    """Sends this process SIGTERM (a scheduler's time limit) while the second case is in the network."""

    networks_run = 0

    def compute_margin(self, prepared):
        # The network stage runs in the main thread, where Python runs signal handlers.
        self.networks_run += 1
        if self.networks_run == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().compute_margin(prepared)


def test_sigterm_stops_a_part_like_ctrl_c(cohort, tmp_path, monkeypatch):
    manifest, weights = cohort
    install_threshold_network(monkeypatch, TerminatedOnSecondCase())
    out = tmp_path / "out"
    previous = signal.getsignal(signal.SIGTERM)
    try:
        code = cli.main(["segment", "--manifest", str(manifest), "-o", str(out), "--weights", str(weights), "-q",
                         "--device", "cpu", "--num-parts", "1", "--part-id", "0"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == EXIT_SIGTERM
    rows = summary(out / "summary.csv")
    assert [(row["case"], row["status"]) for row in rows] == [("patient-0", "ok"), ("s1", "interrupted")]
    assert json.loads((out / "summary.part-0-of-1.done").read_text())["status"] == "interrupted"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["patient-0"]  # no partial folder
