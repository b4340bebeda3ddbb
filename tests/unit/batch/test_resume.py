"""batch.resume and the batch loop around it: a rerun skips exactly the cases an earlier run
finished with the same input, weights, options and version; anything else is recomputed.

A threshold stands in for the network (``load_segmenter`` is replaced), so these tests
check the bookkeeping, not the segmentation, in well under a second per batch.
"""

from __future__ import annotations

import csv
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from threshold_network import THRESHOLD_HU, ThresholdSegmenter, install_threshold_network, run_batch, sphere

import spleen_seg.batch.resume as resume
from spleen_seg.batch.case import SegmentOptions
from spleen_seg.batch.ownership import new_work_folder
from spleen_seg.batch.resume import batch_identity, finished_report, input_sha256
from spleen_seg.batch.run import segment_files
from spleen_seg.io.dicom import DicomSeries

NO_PREVIEW = SegmentOptions(preview=False)
CASES = ("a", "b", "c")


run = run_batch


def summary(out: Path) -> list[dict[str, str]]:
    with (out / "summary.csv").open() as f:
        return list(csv.DictReader(f))


def report_times(out: Path) -> dict[str, int]:
    return {case: (out / case / "report.json").stat().st_mtime_ns for case in CASES}


def test_rerun_skips_every_finished_case_without_loading_the_model(batch, network):
    first = run(batch)
    assert [r.status for r in first] == ["ok"] * 3 and network.loads == 1
    before, first_rows = report_times(batch.out), summary(batch.out)
    skipped = []
    second = run(batch, on_result=skipped.append)
    assert network.loads == 1 and network.calls == ["a.nii.gz", "b.nii.gz", "c.nii.gz"]  # nothing computed again
    assert [r.case for r in skipped] == list(CASES) and all(r.reused for r in second)
    assert [r.spleen_ml for r in second] == [r.spleen_ml for r in first]
    assert report_times(batch.out) == before
    rows = summary(batch.out)
    assert [row.pop("reused") for row in rows] == ["yes"] * 3 and [row.pop("reused") for row in first_rows] == ["no"] * 3
    assert rows == first_rows  # volumes, extents, flags from each report.json


@pytest.mark.parametrize("change, recomputed", [
    ("input", ["b"]),
    ("weights", list(CASES)),
    ("option", list(CASES)),
    ("version", list(CASES)),
    ("output_missing", ["a"]),
    ("report_corrupt", ["c"]),
    ("report_missing", ["b"]),
    ("precision", []),  # a runtime choice, not part of the identity (see batch.resume)
])
def test_a_change_recomputes_exactly_the_cases_it_affects(change, recomputed, batch, network, monkeypatch):
    run(batch)
    options = NO_PREVIEW
    if change == "input":
        sphere(batch.inputs[1], radius_vox=7)
    elif change == "weights":
        batch.weights.write_bytes(b"other weights")
    elif change == "option":
        options = SegmentOptions(preview=False, largest_component=True)
    elif change == "version":
        monkeypatch.setattr(resume, "__version__", "99.0")
    elif change == "output_missing":
        (batch.out / "a" / "spleen.nii.gz").unlink()
    elif change == "report_corrupt":
        (batch.out / "c" / "report.json").write_text("{not json")
    elif change == "report_missing":
        (batch.out / "b" / "report.json").unlink()
    elif change == "precision":
        options = SegmentOptions(preview=False, precision="fp16")
    network.calls.clear()
    results = run(batch, options=options)
    assert [Path(name).name.split(".")[0] for name in network.calls] == recomputed
    assert [r.case for r in results if not r.reused] == recomputed
    assert all((batch.out / case / "spleen.nii.gz").is_file() for case in CASES)
    assert [row["reused"] for row in summary(batch.out)] == ["no" if c in recomputed else "yes" for c in CASES]


def test_overwrite_recomputes_every_case(batch, network):
    run(batch)
    network.calls.clear()
    results = run(batch, overwrite=True)
    assert len(network.calls) == 3 and not any(r.reused for r in results)


def test_input_digest_is_computed_only_when_everything_else_matches(batch, network):
    run(batch)
    recorded = batch_identity(hashlib.sha256(b"stand-in weights").hexdigest(), "true", NO_PREVIEW)

    def must_not_hash():
        raise AssertionError("the input was hashed although the weights differ")

    report, why = finished_report(batch.out / "a", {**recorded, "weights_sha256": "0" * 64}, must_not_hash)
    assert report is None and why == "weights sha256 changed"
    report, why = finished_report(batch.out / "a", recorded, lambda: input_sha256(batch.inputs[0]))
    assert report is not None and why == "" and report.case == "a"
    assert finished_report(batch.out / "a", recorded, lambda: "f" * 64) == (None, "input changed")
    assert finished_report(batch.out / "zzz", recorded, must_not_hash) == (None, "not computed yet")


def test_dicom_series_digest_ignores_names_and_order_but_not_content(tmp_path):
    files = []
    for name, content in (("x.dcm", b"slice one"), ("y.dcm", b"slice two")):
        files.append(tmp_path / name)
        files[-1].write_bytes(content)
    series = DicomSeries("1.2.3", "CT", tuple(files), "")
    renamed = [tmp_path / "other" / name for name in ("2", "1")]
    renamed[0].parent.mkdir()
    renamed[0].write_bytes(b"slice one")
    renamed[1].write_bytes(b"slice two")
    assert input_sha256(series) == input_sha256(DicomSeries("1.2.3", "CT", tuple(renamed), ""))
    files[1].write_bytes(b"slice 2")
    assert input_sha256(series) != input_sha256(DicomSeries("1.2.3", "CT", tuple(renamed), ""))
    assert input_sha256(tmp_path / "missing.nii.gz") is None  # its read reports the error


# ----------------------------------------------------------------------------- one bad case


class Exploding(ThresholdSegmenter):
    """Raises ``error`` when it meets the input named ``victim``."""

    def __init__(self, victim: str, error: BaseException) -> None:
        super().__init__(THRESHOLD_HU)
        self.victim, self.error = victim, error

    def prepare(self, array, geometry, source=""):
        if Path(source).name == self.victim:
            raise self.error
        return super().prepare(array, geometry, source)


def explode(monkeypatch, victim: str, error: BaseException) -> Exploding:
    return install_threshold_network(monkeypatch, Exploding(victim, error))


@pytest.mark.parametrize("error", [
    ValueError("nibabel says:\n  the header\n  is odd"),
    RuntimeError("decoder failed"),
    MemoryError(),
    KeyError("PixelData"),
    OSError(5, "Input/output error"),
])
def test_any_exception_fails_its_case_alone(error, batch, network, monkeypatch):
    run(batch)  # b gets a folder, which a failure must then remove
    explode(monkeypatch, "b.nii.gz", error)
    lines = []
    results = run(batch, overwrite=True, on_result=lines.append)
    assert [r.status for r in results] == ["ok", "failed", "ok"]
    failed = results[1]
    assert failed.error is not None and "\n" not in failed.error
    assert failed.error.startswith(f"{batch.inputs[1]}: ") and failed.error.endswith(f" ({type(error).__name__})")
    assert not (batch.out / "b").exists() and (batch.out / "c" / "spleen.nii.gz").is_file()
    rows = summary(batch.out)
    assert [(row["case"], row["status"]) for row in rows] == [("a", "ok"), ("b", "failed"), ("c", "ok")]
    assert rows[1]["error"] == failed.error and [r.case for r in lines] == list(CASES)


def test_error_line_is_one_line_without_the_repeated_path(batch):
    from spleen_seg.batch.case import MAX_ERROR_CHARS, describe_failure
    from spleen_seg.errors import InputImageError

    source = batch.inputs[0]
    assert describe_failure(source, InputImageError(f"{source}: file not found")) == \
        f"{source}: file not found (InputImageError)"
    assert describe_failure(source, MemoryError()) == f"{source}: not enough memory (MemoryError)"
    long = describe_failure(source, ValueError("x" * 5000 + "\n" + "y"))
    assert "\n" not in long and len(long) < len(str(source)) + MAX_ERROR_CHARS + 40 and long.endswith("[...] (ValueError)")
    # pydicom puts a traceback after the first line of its message: the line keeps the gist only.
    pydicom_style = NotImplementedError("With tag (0010,0030) got exception: Unknown Value Representation '0x44 0xcd'"
                                        "\nTraceback (most recent call last):\n  File \"hooks.py\", line 246")
    assert describe_failure(source, pydicom_style) == (f"{source}: With tag (0010,0030) got exception: Unknown Value "
                                                       "Representation '0x44 0xcd' (NotImplementedError)")


def test_ctrl_c_discards_the_current_case_and_writes_the_summary(batch, monkeypatch):
    explode(monkeypatch, "b.nii.gz", KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        run(batch)
    rows = summary(batch.out)
    assert [(row["case"], row["status"]) for row in rows] == [("a", "ok"), ("b", "interrupted")]
    assert sorted(p.name for p in batch.out.iterdir()) == ["a", "index.html", "run_info.json", "summary.csv"]  # no work folder


def test_a_case_published_as_ctrl_c_lands_is_recorded_finished(batch, network, monkeypatch):
    """The writer publishes c's folder and the stop reaches us before its result (the race CI met under Ray):
    the summary says ok, with the folder's volume, not interrupted beside a finished folder."""
    import spleen_seg.batch.run as batch_run

    real_finish = batch_run.finish_case

    def finish_then_stop(job, segmenter):
        result = real_finish(job, segmenter)
        if job.case == "c":
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(batch_run, "finish_case", finish_then_stop)
    printed = []
    with pytest.raises(KeyboardInterrupt):
        run(batch, on_result=printed.append)
    rows = summary(batch.out)
    assert [(row["case"], row["status"]) for row in rows] == [("a", "ok"), ("b", "ok"), ("c", "ok")]
    report = (batch.out / "c" / "report.json").read_text()
    assert float(rows[2]["volume_ml"]) > 0 and f'"volume_ml": {rows[2]["volume_ml"]}' in report.replace("\n", "")
    assert [r.case for r in printed] == list(CASES) and not printed[2].reused


def test_folders_that_cannot_be_expanded_are_failed_cases(tmp_path, network):
    from synthetic_dicom import random_volume, write_series

    from spleen_seg.batch.inputs import FailedInput, collect_inputs

    write_series(tmp_path / "mr", random_volume(), modality="MR")
    (tmp_path / "empty").mkdir()
    good = sphere(tmp_path / "good.nii.gz", 5)
    inputs = collect_inputs([tmp_path / "mr", tmp_path / "empty", good])
    assert [type(item) for item in inputs] == [FailedInput, FailedInput, type(good)]
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"w")
    results = segment_files(inputs, tmp_path / "out", weights, "cpu", progress=False, options=NO_PREVIEW)
    assert [(r.case, r.status) for r in results] == [("mr", "failed"), ("empty", "failed"), ("good", "ok")]
    assert (results[0].error or "").startswith(f"{tmp_path / 'mr'}: ") and "no .nii" in (results[1].error or "")


def test_work_folders_of_killed_runs_are_removed(batch, network):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid, live_pid = int(finished.stdout), os.getppid()  # the process that started pytest is running
    batch.out.mkdir()
    dead = [batch.out / f".a.partial-{dead_pid}", batch.out / f".b.old-{dead_pid}"]
    live = batch.out / f".c.partial-{live_pid}"
    for folder in [*dead, live]:
        new_work_folder(folder)  # as a run creates them (batch.ownership recognises them)
        (folder / "spleen.nii.gz").write_bytes(b"half written")
    run(batch)
    assert not any(folder.exists() for folder in dead) and live.is_dir()


def test_case_ids_never_name_the_output_folder_itself(tmp_path):
    from spleen_seg.batch.inputs import unique_case_ids

    assert unique_case_ids([tmp_path / ".nii.gz", tmp_path / "..nii", tmp_path / "a.nii"]) == ["case", "case_2", "a"]


# ----------------------------------------------------------------------------- memory


def test_short_memory_reads_in_turn_instead_of_ahead(batch, network, monkeypatch, caplog):
    """Each case fits alone but not beside the next one's read: no read ahead, every case done."""
    import spleen_seg.pipeline.memory as memory

    need = memory.estimate_case_memory((24, 22, 16), (1.5, 1.5, 2.0)).peak_bytes
    monkeypatch.setattr(memory, "available_bytes", lambda: need + memory.HEADROOM_BYTES)
    with caplog.at_level("INFO", logger="spleen_seg.batch.run"):
        results = run(batch)
    assert [r.status for r in results] == ["ok"] * len(CASES)
    assert sum("not reading" in record.getMessage() for record in caplog.records) == len(CASES) - 1


def test_a_case_that_cannot_fit_fails_alone_naming_what_it_needs(batch, network, monkeypatch):
    import spleen_seg.pipeline.memory as memory

    monkeypatch.setattr(memory, "available_bytes", lambda: 1000)
    results = run(batch)
    assert [r.status for r in results] == ["failed"] * len(CASES)
    assert all("needs ~" in r.error and "free" in r.error and r.error.endswith("(ResourceError)") for r in results)
    assert network.calls == []
