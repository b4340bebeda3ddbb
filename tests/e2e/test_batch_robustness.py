"""``spleen-seg segment`` over batches that must not break (issue 7, items 3 and 4): a fuzz batch
of corrupted NIfTI and DICOM inputs, a batch killed with SIGKILL and run again, Ctrl-C; and
(issue 15) output folders that hold someone else's files, file names that are TeX or formulas."""

from __future__ import annotations

import collections
import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from corrupt_inputs import corrupt_dicom_folders, corrupt_nifti_files
from file_tree import tree
from matplotlib import image as mpimg
from phantoms import save_nifti, small_phantom

from spleen_seg.batch.summary import read_summary
from spleen_seg.pipeline.network import demo_weights_path
from spleen_seg.training.evaluate import dice

CLI = [sys.executable, "-m", "spleen_seg.cli"]
REPO = Path(__file__).resolve().parents[2]
EXIT_FAILED, EXIT_INTERRUPTED = 2, 130
MIN_DICE = 0.85
FUZZ_SEED = 7
FUZZ_NIFTI, FUZZ_DICOM = 130, 75
FUZZ_TIMEOUT_S = 600
BATCH_SEEDS = (1, 2, 3, 4)
KILL_AFTER_CASES = 2
WAIT_S = 180
POLL_S = 0.05
# Skipping every case reads reports and hashes inputs; it must cost far less than computing.
MAX_SKIP_ALL_FRACTION = 0.5
# preview.png: 13.5 x 5 inches at 100 dpi, RGBA.
PREVIEW_SHAPE = (500, 1350, 4)
ERROR_LINE = re.compile(r"^error: (?P<source>.+?): (?P<what>.+) \((?P<type>\w+)\)$")


def segment_args(inputs: list[Path], out: Path) -> list[str]:
    return [*CLI, "segment", *map(str, inputs), "-o", str(out), "--weights", str(demo_weights_path()), "-q"]


def run(args: list[str], timeout: float = WAIT_S) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - start


def summary(out: Path) -> list[dict[str, str]]:
    with (out / "summary.csv").open() as f:
        return list(csv.DictReader(f))


def case_folders(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")) if out.exists() else []


def work_folders(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.is_dir() and p.name.startswith("."))


def mask(out: Path, case: str) -> np.ndarray:
    return np.asarray(nib.load(str(out / case / "spleen.nii.gz")).dataobj)


# ----------------------------------------------------------------------------- fuzz


def test_fuzz_batch_never_breaks(phantom, write_nifti, tmp_path, tail):
    """Over 200 corrupted inputs around one good CT: no traceback, the CT segmented, every input a row."""
    good_case = phantom(1, "RAS")
    good = write_nifti(good_case.image_hu.astype(np.int16), good_case.affine, tmp_path / "good.nii.gz")
    corrupted = (corrupt_nifti_files(tmp_path / "nifti", FUZZ_NIFTI, FUZZ_SEED)
                 + corrupt_dicom_folders(tmp_path / "dicom", FUZZ_DICOM, FUZZ_SEED))
    out = tmp_path / "out"
    proc, seconds = run(segment_args([*(c.path for c in corrupted[: FUZZ_NIFTI // 2]), good,
                                      *(c.path for c in corrupted[FUZZ_NIFTI // 2:])], out), timeout=FUZZ_TIMEOUT_S)
    assert proc.returncode == EXIT_FAILED, tail(proc)
    assert "Traceback" not in proc.stderr + proc.stdout, tail(proc)

    rows = summary(out)
    by_source = collections.defaultdict(list)
    for row in rows:
        by_source[row["source"]].append(row)
    (good_row,) = by_source[str(good)]
    assert good_row["status"] == "ok" and dice(mask(out, good_row["case"]), good_case.spleen_mask) >= MIN_DICE
    outcomes = collections.Counter()
    for item in corrupted:
        assert by_source[str(item.path)], f"{item.path} ({item.kind}) has no row in summary.csv"
        for row in by_source[str(item.path)]:
            outcomes[item.kind, "failed" if row["status"] == "failed" else "segmented"] += 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    failed = [row for row in rows if row["status"] == "failed"]
    assert len(errors) == len(failed), (len(errors), len(failed))
    assert [line for line in errors if not ERROR_LINE.match(line)] == []
    assert [f"error: {row['error']}" for row in failed] == errors  # the same text, in input order
    assert {row["status"] for row in rows} <= {"ok", "not_found", "failed"}
    # A case folder exactly for each segmented row.
    assert case_folders(out) == sorted(row["case"] for row in rows if row["status"] != "failed")
    assert work_folders(out) == []
    # Truncated NIfTI files and lone damaged DICOM slices can never be read.
    for kind in ("nifti.truncate", "dicom.alone.truncate", "dicom.alone.header_byte", "dicom.alone.data_bytes"):
        assert outcomes[kind, "segmented"] == 0 and outcomes[kind, "failed"] > 0, kind
    print(f"\nfuzz: {len(corrupted)} corrupted inputs, {len(rows)} rows, {len(failed)} failed, "
          f"{len(rows) - len(failed) - 1} corrupted but readable (segmented), {seconds:.1f} s")
    for (kind, outcome), count in sorted(outcomes.items()):
        print(f"  {kind:28s} {outcome:9s} {count}")
    print("  exception types:", dict(collections.Counter(ERROR_LINE.match(e)["type"] for e in errors)))


# ----------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def batch_inputs(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("batch_inputs")
    paths = []
    for seed in BATCH_SEEDS:
        case = small_phantom(seed, "RAS" if seed % 2 else "LPS")
        paths.append(save_nifti(case.image_hu.astype(np.int16), case.affine, folder / f"case_{seed}.nii.gz"))
    return paths


@pytest.fixture(scope="module")
def uninterrupted(batch_inputs, tmp_path_factory):
    """The batch run once from scratch, then again (every case skipped): outputs and times."""
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    first, scratch_s = run(segment_args(batch_inputs, out))
    assert first.returncode == 0, first.stderr[-3000:]
    rows = summary(out)
    reports = {case: (out / case / "report.json").read_bytes() for case in case_folders(out)}
    info_mtime = (out / "run_info.json").stat().st_mtime_ns
    again, skip_s = run(segment_args(batch_inputs, out))
    return {"out": out, "rows": rows, "reports": reports, "info_mtime": info_mtime, "scratch_s": scratch_s,
            "again": again, "skip_s": skip_s}


def cases_of(inputs: list[Path]) -> list[str]:
    return [p.name.removesuffix(".nii.gz") for p in inputs]


def test_rerun_skips_every_finished_case(uninterrupted, batch_inputs):
    again, out = uninterrupted["again"], uninterrupted["out"]
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.splitlines() == [f"skipped, already done: {case}" for case in cases_of(batch_inputs)]
    assert {case: (out / case / "report.json").read_bytes() for case in case_folders(out)} == uninterrupted["reports"]
    # No model was loaded: run_info.json is written only when a case is computed.
    assert (out / "run_info.json").stat().st_mtime_ns == uninterrupted["info_mtime"]
    rows = summary(out)
    assert [row.pop("reused") for row in rows] == ["yes"] * len(batch_inputs)
    assert rows == [{k: v for k, v in row.items() if k != "reused"} for row in uninterrupted["rows"]]
    ratio = uninterrupted["skip_s"] / uninterrupted["scratch_s"]
    print(f"\nresume: {len(batch_inputs)} phantoms from scratch {uninterrupted['scratch_s']:.1f} s, "
          f"rerun skipping all {uninterrupted['skip_s']:.1f} s (ratio {ratio:.3f})")
    assert ratio < MAX_SKIP_ALL_FRACTION


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_cases(proc: subprocess.Popen, out: Path, count: int) -> None:
    """Until ``count`` case folders exist (bounded); fails if the batch ended first."""
    deadline = time.monotonic() + WAIT_S
    while len(case_folders(out)) < count:
        assert proc.poll() is None, f"the batch ended before {count} cases were done: {proc.communicate()}"
        assert time.monotonic() < deadline, f"no {count} case folders in {out} after {WAIT_S} s"
        time.sleep(POLL_S)


def test_sigkill_then_rerun_computes_only_the_unfinished_cases(uninterrupted, batch_inputs, tmp_path):
    out = tmp_path / "out"
    proc = start(segment_args(batch_inputs, out))
    try:
        wait_for_cases(proc, out, KILL_AFTER_CASES)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=WAIT_S)
    finished = case_folders(out)
    cases = cases_of(batch_inputs)
    assert len(finished) < len(cases), "the batch finished before it was killed: nothing to resume"
    # The summary a killed batch leaves: finished cases only, all ok (a case published in
    # the instant before the kill may not have its row yet).
    killed_rows = summary(out)
    assert {row["case"] for row in killed_rows} <= set(finished) and len(finished) - len(killed_rows) <= 1
    assert all(row["status"] == "ok" for row in killed_rows)
    reports = {case: (out / case / "report.json").read_bytes() for case in finished}

    rerun, resume_s = run(segment_args(batch_inputs, out))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    lines = rerun.stdout.splitlines()
    assert [line for line in lines if line.startswith("skipped")] == [f"skipped, already done: {c}" for c in finished]
    computed = [Path(line.split(": spleen")[0]).name.removesuffix(".nii.gz") for line in lines if " -> " in line]
    assert computed == [case for case in cases if case not in finished]
    assert {case: (out / case / "report.json").read_bytes() for case in finished} == reports
    assert case_folders(out) == sorted(cases) and work_folders(out) == []
    reference = uninterrupted["out"]
    for case in cases:
        np.testing.assert_array_equal(mask(out, case), mask(reference, case), err_msg=case)
    rows = summary(out)
    assert [row.pop("reused") for row in rows] == ["yes" if c in finished else "no" for c in cases]
    assert rows == [{k: v for k, v in row.items() if k != "reused"} for row in uninterrupted["rows"]]
    print(f"\nSIGKILL after {len(finished)} of {len(cases)} cases; rerun {resume_s:.1f} s "
          f"(from scratch {uninterrupted['scratch_s']:.1f} s)")


def test_ctrl_c_exits_130_with_the_summary_of_what_finished(batch_inputs, tmp_path):
    out = tmp_path / "out"
    proc = start(segment_args(batch_inputs, out))
    try:
        wait_for_cases(proc, out, 1)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    assert proc.returncode == EXIT_INTERRUPTED, stderr[-3000:]
    assert "Traceback" not in stderr and "interrupted: " in stderr
    finished = case_folders(out)
    assert 1 <= len(finished) < len(batch_inputs) and work_folders(out) == []
    rows = summary(out)
    done = [row["case"] for row in rows if row["status"] == "ok"]
    assert done == finished  # input order is the cases' sorted order here
    interrupted = [row for row in rows if row["status"] == "interrupted"]
    assert [row["case"] for row in rows] == done + [row["case"] for row in interrupted] and len(interrupted) <= 1
    assert all(row["case"] not in finished for row in interrupted)


# ----------------------------------------------------------------------------- folders that are not ours


NOT_OURS = "exists and was not written by spleen-seg; it is left as it is: move it away, or choose another output folder (-o)"


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def test_a_manifest_into_its_own_data_folder_leaves_the_data_byte_for_byte(tmp_path, tail):
    """-o is the data folder and the case ids are the patients' folders: nothing of theirs is replaced or removed."""
    data = tmp_path / "data"
    case = small_phantom(1, "RAS")
    save_nifti(case.image_hu.astype(np.int16), case.affine, data / "p1" / "ct.nii.gz")
    (data / "p1" / "notes.txt").write_text("the patient's notes\n")
    save_nifti(case.spleen_mask.astype(np.uint8), case.affine, data / "p2" / "labels.nii.gz")
    manifest = data / "manifest.csv"
    manifest.write_text("path,case_id\np1/ct.nii.gz,p1\np2/missing.nii.gz,p2\n")
    before = tree(data)
    proc, _ = run([*CLI, "segment", "--manifest", str(manifest), "-o", str(data), "--weights",
                   str(demo_weights_path()), "-q"])
    assert proc.returncode == EXIT_FAILED, tail(proc)
    assert error_lines(proc) == [
        f"error: {data / 'p1' / 'ct.nii.gz'}: output folder {data / 'p1'} {NOT_OURS} (ForeignOutputError)",
        f"error: {data / 'p2' / 'missing.nii.gz'}: output folder {data / 'p2'} {NOT_OURS} (ForeignOutputError)"]
    after = tree(data)
    assert {name: after.get(name) for name in before} == before  # every file and folder as it was
    assert sorted(set(after) - set(before)) == ["index.html", "summary.csv"]
    assert [(row["case"], row["status"]) for row in summary(data)] == [("p1", "failed"), ("p2", "failed")]


def test_segment_beside_someone_elses_folder_of_the_case_name(tmp_path, tail):
    case = small_phantom(1, "RAS")
    scan = save_nifti(case.image_hu.astype(np.int16), case.affine, tmp_path / "x.nii.gz")
    (tmp_path / "dir" / "x").mkdir(parents=True)
    (tmp_path / "dir" / "x" / "thesis.tex").write_text("\\chapter{one}\n")
    before = tree(tmp_path / "dir" / "x")
    for extra in ([], ["--overwrite"]):
        proc, _ = run([*segment_args([scan], tmp_path / "dir"), *extra])
        assert proc.returncode == EXIT_FAILED, tail(proc)
        assert error_lines(proc) == [f"error: {scan}: output folder {tmp_path / 'dir' / 'x'} {NOT_OURS} "
                                     "(ForeignOutputError)"]
        assert tree(tmp_path / "dir" / "x") == before


def test_file_names_that_are_tex_or_formulas_segment_and_read_back(tmp_path, tail):
    """A "$" name once failed its preview (mathtext); "=1+2" must not become a formula in summary.csv."""
    case = small_phantom(1, "RAS")
    names = ["scan$\\foo$", "=1+2"]
    for name in names:
        save_nifti(case.image_hu.astype(np.int16), case.affine, tmp_path / f"{name}.nii.gz")
    args = [*CLI, "segment", *(f"{name}.nii.gz" for name in names), "-o", "out", "--weights",
            str(demo_weights_path()), "-q"]
    first = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=WAIT_S)
    assert first.returncode == 0, tail(first)
    out = tmp_path / "out"
    for name in names:
        assert mpimg.imread(out / name / "preview.png").shape == PREVIEW_SHAPE, name
    raw = list(csv.reader((out / "summary.csv").open(newline="")))[1:]
    assert [row[:3] for row in raw] == [["scan$\\foo$", "scan$\\foo$.nii.gz", "ok"], ["'=1+2", "'=1+2.nii.gz", "ok"]]
    assert "\n\"'=1+2\",\"'=1+2.nii.gz\",\"ok\"," in (out / "summary.csv").read_text()
    again = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=WAIT_S)
    assert again.returncode == 0, tail(again)
    assert again.stdout.splitlines() == [f"skipped, already done: {name}" for name in names]
    rows = read_summary(out / "summary.csv")
    assert [(row["case"], row["source"], row["status"], row["reused"]) for row in rows] == [
        (name, f"{name}.nii.gz", "ok", "yes") for name in names]
# ----------------------------------------------------------------------------- decompression bombs

# 40 Deflated CT slices of 8192 x 8192 zeros: 5 MB on disk, 5.4 GB inflated, ~15 GB to segment.
BOMB_FILES = 40
# The memory the case may use, whatever this machine has free: the refusal must not depend on it.
BOMB_MEMORY_LIMIT = "4G"
MIB = 1 << 20
BOMB_MAX_RSS = 400 * MIB  # refused from headers: the process's own baseline, about 220 MiB here
BOMB_KILL_ABOVE = 1536 * MIB  # before the fix the run grows ~700 MiB a file: stopped here instead
BOMB_ERROR = re.compile(r"series \S+ in (?P<folder>\S+): needs ~[\d.]+ GB of memory \(its 8192x8192x40 voxels, "
                        r"\d+x\d+x40 after resampling, peak at \w+\), [\d.]+ GB free: free memory or run it on a larger "
                        r"machine \(ResourceError\)$")


def run_bombs(inputs: list[Path], out: Path):
    """The batch with the memory limit, measured; the CPU backend's model exported first (once per
    session), so that the peak is the batch's, not the one-off export's (about 780 MiB)."""
    from child_rss import run_measured
    from node_harness import warm_model_cache

    warm_model_cache()
    return run_measured(segment_args(inputs, out), cwd=REPO, kill_above_bytes=BOMB_KILL_ABOVE, timeout_s=WAIT_S,
                        env={**os.environ, "SPLEEN_SEG_MEMORY_LIMIT": BOMB_MEMORY_LIMIT})


def test_a_deflated_bomb_series_is_refused_before_it_inflates(tmp_path):
    """Discovery reads each header without inflating its pixels, and the series is refused from
    its headers' estimate; the peak RSS of the whole run is measured (os.wait4)."""
    from synthetic_dicom import write_deflated_bomb_series

    paths = write_deflated_bomb_series(tmp_path / "bombs", BOMB_FILES)
    assert sum(p.stat().st_size for p in paths) < 6_000_000
    out = tmp_path / "out"
    run = run_bombs([tmp_path / "bombs"], out)
    assert not run.killed, f"killed at {run.peak_rss_bytes / MIB:.0f} MiB: the bombs were inflated"
    assert run.returncode == EXIT_FAILED, run.stderr[-3000:]
    assert run.peak_rss_bytes < BOMB_MAX_RSS, f"peak RSS {run.peak_rss_bytes / MIB:.0f} MiB"
    assert "Traceback" not in run.stderr
    (row,) = summary(out)
    assert row["status"] == "failed" and BOMB_ERROR.search(row["error"]), row
    assert case_folders(out) == [] and work_folders(out) == []
    print(f"\n{BOMB_FILES} bomb files: exit {run.returncode}, {run.seconds:.1f} s, peak RSS "
          f"{run.peak_rss_bytes / MIB:.0f} MiB")


def test_a_bomb_series_fails_alone_beside_a_good_nifti(phantom, write_nifti, tmp_path):
    from synthetic_dicom import write_deflated_bomb_series

    good_case = phantom(1, "RAS")
    good = write_nifti(good_case.image_hu.astype(np.int16), good_case.affine, tmp_path / "good.nii.gz")
    write_deflated_bomb_series(tmp_path / "bombs", BOMB_FILES)
    out = tmp_path / "out"
    run = run_bombs([tmp_path / "bombs", good], out)
    assert not run.killed, f"killed at {run.peak_rss_bytes / MIB:.0f} MiB: the bombs were inflated"
    assert run.returncode == EXIT_FAILED, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    by_source = {row["source"]: row for row in summary(out)}
    assert by_source[str(good)]["status"] == "ok"
    assert dice(mask(out, by_source[str(good)]["case"]), good_case.spleen_mask) >= MIN_DICE
    bomb_row = by_source[str(tmp_path / "bombs")]
    assert bomb_row["status"] == "failed" and BOMB_ERROR.search(bomb_row["error"]), bomb_row
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {bomb_row['error']}"]
    assert case_folders(out) == [by_source[str(good)]["case"]]
