"""The local batch as a bounded pipeline: the next case is prepared while the network runs, the
finished case written meanwhile, how far ahead memory allows, the progress totals, --ray's flag.

A stand-in segmenter (``stub_segmenter``) replaces the network; its network stage blocks
until the overlapping stage has happened, so a pipeline that did not overlap fails on a
bounded wait instead of passing by luck.
"""

from __future__ import annotations

import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from stub_segmenter import ThresholdSegmenter

import spleen_seg.batch.run as run_module
import spleen_seg.pipeline.memory as memory
import spleen_seg.pipeline.segmenter as segmenter_module
from spleen_seg.batch.case import CaseResult, SegmentOptions, start_case
from spleen_seg.batch.progress import totals_line
from spleen_seg.batch.run import _ahead_mode, segment_files
from spleen_seg.cli import build_parser
from spleen_seg.io.nifti import read_geometry

OVERLAP_WAIT_S = 20.0
SHAPE = (24, 22, 16)
SPACING_MM = (1.5, 1.5, 2.0)


def sphere(path: Path, radius_vox: float) -> Path:
    grid = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in SHAPE], indexing="ij"))
    image = np.where((grid**2).sum(0) <= radius_vox**2, 150.0, -100.0).astype(np.float32)
    nib.save(nib.Nifti1Image(image, np.diag([*SPACING_MM, 1.0])), str(path))
    return path


class OverlapSegmenter(ThresholdSegmenter):
    """Records which thread ran each stage; the network of case ``i`` waits until case ``i + 1``
    is prepared and case ``i - 1`` is inverted (the writer's work), as a pipeline does."""

    def __init__(self, cases: list[str]) -> None:
        super().__init__()
        self.cases = cases
        self.prepared = {case: threading.Event() for case in cases}
        self.inverted = {case: threading.Event() for case in cases}
        self.threads: dict[tuple[str, str], str] = {}
        self.waited: dict[str, bool] = {}

    def prepare(self, array, geometry, source=""):
        case = Path(source).name.removesuffix(".nii.gz")
        self.threads["prepare", case] = threading.current_thread().name
        prepared = super().prepare(array, geometry, source)
        prepared.warnings.append(case)  # carries the case name to the later stages
        self.prepared[case].set()
        return prepared

    def compute_margin(self, prepared):
        case = prepared.warnings[0]
        self.threads["network", case] = threading.current_thread().name
        index = self.cases.index(case)
        waits = []
        if index + 1 < len(self.cases):
            waits.append(self.prepared[self.cases[index + 1]])
        if index > 0:
            waits.append(self.inverted[self.cases[index - 1]])
        self.waited[case] = all(event.wait(OVERLAP_WAIT_S) for event in waits)
        return super().compute_margin(prepared)

    def invert(self, prepared):
        case = prepared.warnings[0]
        self.threads["invert", case] = threading.current_thread().name
        self.inverted[case].set()
        return super().invert(prepared)


def test_the_next_case_is_prepared_and_the_last_one_written_while_the_network_runs(tmp_path, monkeypatch):
    cases = ["a", "b", "c", "d"]
    inputs = [sphere(tmp_path / f"{case}.nii.gz", 3 + i) for i, case in enumerate(cases)]
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"stand-in weights")
    fake = OverlapSegmenter(cases)
    monkeypatch.setattr(segmenter_module, "load_segmenter", lambda *args, **kwargs: fake)
    results = segment_files(inputs, tmp_path / "out", weights, "cpu", progress=False,
                            options=SegmentOptions(preview=False))
    assert [r.status for r in results] == ["ok"] * len(cases)
    assert fake.waited == dict.fromkeys(cases, True)  # every overlap happened within the bound
    assert {fake.threads["network", case] for case in cases} == {threading.main_thread().name}
    assert all(fake.threads["prepare", case].startswith("spleen-seg-read") for case in cases[1:])
    assert all(fake.threads["invert", case].startswith("spleen-seg-write") for case in cases)
    for case, path in zip(cases, inputs, strict=True):  # the threshold's mask, per case
        image = np.asarray(nib.load(str(path)).dataobj)
        written = np.asarray(nib.load(str(tmp_path / "out" / case / "spleen.nii.gz")).dataobj)
        np.testing.assert_array_equal(written, (image > fake.threshold_hu).astype(np.uint8))


class EventSegmenter(ThresholdSegmenter):
    """Appends ("prepared", case) and ("network", case) to ``events`` as the stages happen."""

    def __init__(self, events: list[tuple[str, str]]) -> None:
        super().__init__()
        self.events = events

    def prepare(self, array, geometry, source=""):
        prepared = super().prepare(array, geometry, source)
        prepared.warnings.append(Path(source).name.removesuffix(".nii.gz"))
        self.events.append(("prepared", prepared.warnings[-1]))
        return prepared

    def compute_margin(self, prepared):
        self.events.append(("network", prepared.warnings[-1]))
        return super().compute_margin(prepared)


def test_the_writers_libraries_are_imported_once_the_first_case_is_prepared(tmp_path, monkeypatch):
    # Imported earlier, they slowed the first case's read and preprocessing, which the network waits for.
    events: list[tuple[str, str]] = []
    inputs = [sphere(tmp_path / f"{case}.nii.gz", 4) for case in ("a", "b")]
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"stand-in weights")
    monkeypatch.setattr(segmenter_module, "load_segmenter", lambda *args, **kwargs: EventSegmenter(events))
    monkeypatch.setattr(run_module, "warm_output_imports", lambda: events.append(("imports", "")))
    results = segment_files(inputs, tmp_path / "out", weights, "cpu", progress=False, options=SegmentOptions())
    assert [r.status for r in results] == ["ok", "ok"]
    assert events.count(("imports", "")) == 1
    assert events.index(("prepared", "a")) < events.index(("imports", ""))
    assert events.index(("prepared", "a")) < events.index(("network", "a"))


@pytest.fixture
def two_cases(tmp_path):
    first, following = sphere(tmp_path / "a.nii.gz", 4), sphere(tmp_path / "b.nii.gz", 5)
    job = start_case(first, tmp_path / "out")
    job.geometry = read_geometry(first)  # the running case, read
    estimate = memory.estimate_case_memory(SHAPE, SPACING_MM)
    preparing = max(estimate.stages["read"], estimate.stages["resample"])
    return job, following, estimate, preparing


def test_how_far_ahead_follows_the_memory_free(two_cases, monkeypatch):
    job, following, estimate, preparing = two_cases
    beside = estimate.after_read_bytes + memory.HEADROOM_BYTES
    for free, mode in [(preparing + beside, "prepare"), (preparing + beside - 1, "read"),
                       (memory.read_peak_bytes(SHAPE) + beside - 1, "none")]:
        monkeypatch.setattr(memory, "available_bytes", lambda free=free: free)
        assert _ahead_mode(job, following) == mode, free


def test_a_case_read_in_turn_keeps_the_next_one_in_turn(two_cases, monkeypatch):
    job, following, _, _ = two_cases
    job.geometry = None  # memory was short for this one: it was not read ahead
    monkeypatch.setattr(memory, "available_bytes", lambda: 1 << 50)
    assert _ahead_mode(job, following) == "none"
    job.error = "a.nii.gz: unreadable (ValueError)"  # its read failed: nothing of it is in memory
    assert _ahead_mode(job, following) == "prepare"


def test_totals_count_each_kind_and_the_rate_of_the_computed_cases():
    results = [CaseResult(source=Path(f"{i}.nii.gz"), case=str(i), status=status, reused=reused)
               for i, (status, reused) in enumerate([("ok", False), ("ok", True), ("not_found", False),
                                                     ("failed", False), ("ok", False)])]
    assert totals_line(results, 8.0) == ("5 cases in 8.0 s: 3 finished (2 ok, 1 spleen not found), 1 failed, "
                                         "1 skipped (done before); 0.50 cases/s")


@pytest.mark.parametrize("argv, ray", [
    (["a.nii.gz", "-o", "out", "--ray"], "local"),
    (["a.nii.gz", "-o", "out", "--ray", "10.0.0.5:6379"], "10.0.0.5:6379"),
    (["--ray=ray://head:10001", "a.nii.gz", "-o", "out"], "ray://head:10001"),
    (["a.nii.gz", "-o", "out"], None),
])
def test_ray_flag_takes_an_optional_cluster_address(argv, ray):
    assert build_parser().parse_args(["segment", *argv]).ray == ray


def test_ray_flag_refuses_an_input_in_place_of_the_address(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["segment", "--ray", "a.nii.gz", "-o", "out"])
    assert "is not a Ray cluster address" in capsys.readouterr().err


def test_ray_stall_seconds_is_a_number_of_seconds_of_at_least_one(capsys):
    assert build_parser().parse_args(["segment", "a.nii.gz", "-o", "out", "--ray-stall-seconds", "2.5"]
                                     ).ray_stall_seconds == 2.5
    assert build_parser().parse_args(["segment", "a.nii.gz", "-o", "out"]).ray_stall_seconds is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["segment", "a.nii.gz", "-o", "out", "--ray-stall-seconds", "0"])
    assert "--ray-stall-seconds: expected a number >= 1, got 0" in capsys.readouterr().err
