"""One case of a batch: read, segment, measure and write its folder atomically."""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spleen_seg import __version__
from spleen_seg.batch.inputs import FailedInput, InputItem, input_case_id, input_source, load_input
from spleen_seg.batch.ownership import check_file, check_folder, new_work_folder, remove_folder
from spleen_seg.config import RECIPE
from spleen_seg.errors import SpleenSegError, library_message
from spleen_seg.io.atomic import atomic_write_text
from spleen_seg.io.nifti import Geometry, write_mask
from spleen_seg.pipeline.segmenter import PreparedImage, Segmenter

if TYPE_CHECKING:
    from spleen_seg.outputs.report import CaseReport
    from spleen_seg.pipeline.quality import QualityScore

MASK_FILENAME = "spleen.nii.gz"
RUN_INFO_FILENAME = "run_info.json"
# Every version wrote run_info.json as indented JSON with this key first: how it is recognised.
RUN_INFO_HEAD = b'{\n  "spleen_seg_version": '
SEG_FILENAME = "spleen_seg.dcm"
STL_FILENAME = "spleen.stl"
ALGORITHM_NAME = "spleen-seg"
# An error line stays one readable line: library messages can span pages (a header dump).
MAX_ERROR_CHARS = 400
WHITESPACE_RUN = re.compile(r"\s+")
# What to say when an exception carries no message (MemoryError() usually does not).
NO_MESSAGE: dict[type[BaseException], str] = {MemoryError: "not enough memory"}

# Hidden work folders beside the case folders, suffixed with the writing process's id.
PARTIAL_MARK = ".partial-"
OLD_MARK = ".old-"
# report.json's ``segment`` time: the segmenter's three stages (read, measure and writes are apart).
SEGMENT_STAGES = ("preprocess", "network", "invert")
WORK_DIR_NAME = re.compile(rf"^\..+(?:{re.escape(PARTIAL_MARK)}|{re.escape(OLD_MARK)})(\d+)$")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmentOptions:
    """What ``segment`` writes and checks besides the NIfTI mask."""

    largest_component: bool = False
    strict: bool = False
    stl: bool = False
    preview: bool = True
    all_windows: bool = False
    precision: str = "fp32"
    # None: decide from the weights (see network.weights_orientation_convention).
    weights_convention: str | None = None
    # Flip TTA over these axes of the RAS grid ("xyz", "xy"...; "" = none): pipeline/tta.py.
    tta_axes: str = ""
    # False when ``tta_axes`` is only --tta's default (all three): refused on weights not
    # trained with flips, where named axes run with a warning (tta.check_tta_axes).
    tta_axes_explicit: bool = True


@dataclass
class CaseResult:
    source: Path
    output: Path | None = None
    # "<input>: <what> (<ExceptionType>)", one line (see describe_failure).
    error: str | None = None
    spleen_ml: float = 0.0
    seconds: float = 0.0
    case: str = ""
    # ok, not_found (segmented, empty mask), failed, or interrupted (Ctrl-C).
    status: str = "ok"
    report: CaseReport | None = None
    # True when an earlier run's finished folder was kept (resume) instead of computing.
    reused: bool = False


def describe_failure(source: Path, err: BaseException) -> str:
    """``"<source>: <what> (<ExceptionType>)"`` on one line, at most about ``MAX_ERROR_CHARS`` long.

    Project errors already start with the input's path; it is not repeated.
    """
    # A library's message can hold a traceback after its first line (pydicom): its gist is the first line.
    message = str(err) if isinstance(err, SpleenSegError) else library_message(err, max_chars=None)
    what = WHITESPACE_RUN.sub(" ", message).strip()
    what = what.removeprefix(f"{source}: ").removeprefix(f"{source}:").strip()
    if not what:
        what = NO_MESSAGE.get(type(err), "failed without a message")
    if len(what) > MAX_ERROR_CHARS:
        what = what[:MAX_ERROR_CHARS].rstrip() + " [...]"
    return f"{source}: {what} ({type(err).__name__})"


def model_record(identity: dict[str, Any], weights: Path, convention: str, device: str, backend: str) -> dict[str, Any]:
    """The ``model`` section of every report: what computed the masks (``identity``: ``batch_identity``)."""
    return {"name": ALGORITHM_NAME, "version": __version__, "weights": str(Path(weights).resolve()),
            "weights_sha256": identity["weights_sha256"], "orientation_convention": convention,
            "device": str(device), "backend": backend}


def write_run_info(out_dir: Path, weights: Path, device: str, backend: str, inputs: list[InputItem],
                   orientation_convention: str | None = None) -> None:
    """Record how the outputs were made: versions, weights checksum, convention, recipe, inputs."""
    from dataclasses import asdict
    from importlib.metadata import PackageNotFoundError, version

    from spleen_seg.io.download import file_sha256

    def installed(package: str) -> str | None:
        try:
            return version(package)
        except PackageNotFoundError:
            return None

    info = {
        "spleen_seg_version": __version__,
        "versions": {p: installed(p) for p in ("monai", "torch", "openvino", "onnxruntime", "nibabel", "numpy")},
        "python": platform.python_version(),
        "command": sys.argv,
        "weights": str(weights),
        "weights_sha256": file_sha256(weights),
        "orientation_convention": orientation_convention,
        "device": device,
        "backend": backend,
        "recipe": asdict(RECIPE),
        "inputs": [_describe_input(p) for p in inputs],
    }
    check_run_info(out_dir)
    atomic_write_text(out_dir / RUN_INFO_FILENAME, json.dumps(info, indent=2, default=str) + "\n")


def check_run_info(out_dir: Path) -> None:
    """Raise ``ForeignOutputError`` when ``out_dir`` holds a ``run_info.json`` that spleen-seg did not write."""
    check_file(out_dir / RUN_INFO_FILENAME, lambda head: head.startswith(RUN_INFO_HEAD), f"a {RUN_INFO_FILENAME}")


def _describe_input(item: InputItem) -> str:
    if isinstance(item, FailedInput):
        return f"{item.path} (failed: {item.error})"
    return str(item) if isinstance(item, Path) else f"{item.folder} (series {item.series_uid})"


@dataclass
class CaseJob:
    """One case on its way through the stages: read and prepare, network, finish (see :func:`segment_one`).

    A pipeline runs the stages of different cases at once, in different threads or
    processes; the job carries the case's state between them. ``array`` is (X, Y, Z)
    float32 HU in file voxel order. ``error`` is set by the first stage that fails
    (``describe_failure``); the stages after it do nothing, and :func:`finish_case`
    returns the failed result.
    """

    source: InputItem
    out_dir: Path
    case: str
    options: SegmentOptions
    model: dict[str, Any]
    identity: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    array: np.ndarray | None = None
    geometry: Geometry | None = None
    warnings: list[str] = field(default_factory=list)
    prepared: PreparedImage | None = None
    error: str | None = None

    @property
    def path(self) -> Path:
        return input_source(self.source)

    def fail(self, err: Exception) -> None:
        """Record the case's failure (:func:`describe_failure`) and release its arrays: later stages skip it."""
        if not isinstance(err, SpleenSegError):  # unexpected type: the traceback for debugging
            logger.debug("%s failed", self.path, exc_info=err)
        self.error = describe_failure(self.path, err)
        self.array = self.prepared = None


def start_case(source: InputItem, out_dir: Path, *, case: str | None = None, options: SegmentOptions | None = None,
               model: dict[str, Any] | None = None, identity: dict[str, Any] | None = None) -> CaseJob:
    return CaseJob(source=source, out_dir=out_dir, case=case or input_case_id(source), options=options or SegmentOptions(),
                   model=dict(model or {}), identity=dict(identity or {}))


@contextmanager
def _stage(job: CaseJob, name: str | None) -> Iterator[None]:
    """Time the stage into ``job.timings[name]`` (unless None); any ``Exception`` becomes ``job.error``
    (the case fails alone)."""
    start = time.perf_counter()
    try:
        yield
    # Any exception: the batch's contract is that one bad case never stops the others, and
    # readers and runtimes raise far more than our own errors (nibabel's ValueError on a
    # fuzzed header, a decoder's RuntimeError, MemoryError, CUDA out of memory).
    except Exception as err:
        job.fail(err)
    finally:
        if name is not None:
            job.timings[name] = round(time.perf_counter() - start, 4)


def read_case(job: CaseJob, segmenter: Segmenter | None, prefetched: Future | None = None) -> CaseJob:
    """Stage 1 (CPU): read the input, check its header and intensities, and with a ``segmenter``
    preprocess it for the network (``Segmenter.prepare``). ``prefetched``: a future of
    :func:`load_input` already reading it."""
    from spleen_seg.outputs.report import check_geometry, check_intensity

    if job.array is None and job.error is None:
        with _stage(job, "read"):
            job.array, job.geometry = prefetched.result() if prefetched is not None else load_input(job.source)
            # Header assumptions first (--strict refuses them), then the intensity check.
            check_geometry(job.geometry, str(job.path), job.options.strict)
            job.warnings = check_intensity(job.array, str(job.path), job.options.strict)
    array, geometry = job.array, job.geometry  # None once a stage failed
    if segmenter is not None and job.prepared is None and array is not None and geometry is not None:
        with _stage(job, "preprocess"):
            job.prepared = segmenter.prepare(array, geometry, job.path)
    return job


def network_case(job: CaseJob, segmenter: Segmenter) -> CaseJob:
    """Stage 2: the network on the prepared image (``Segmenter.compute_margin``); the caller
    prepared it (:func:`read_case` with the segmenter), or an earlier stage failed."""
    if job.prepared is None and job.error is None:
        raise ValueError(f"{job.path}: network_case needs a prepared job: run read_case with the segmenter first")
    prepared = job.prepared  # None once a stage failed
    if prepared is not None:
        with _stage(job, "network"):
            segmenter.compute_margin(prepared)  # flip TTA, if asked, is the segmenter's (load_segmenter)
    return job


def finish_case(job: CaseJob, segmenter: Segmenter) -> CaseResult:
    """Stage 3 (CPU): invert the margin to the mask, measure, write the case folder atomically."""
    prepared, array, geometry = job.prepared, job.array, job.geometry  # None once a stage failed
    result = None
    if prepared is not None and array is not None and geometry is not None:
        with _stage(job, "invert"):
            mask = segmenter.invert(prepared)
        job.timings["segment"] = round(sum(job.timings.get(s, 0.0) for s in SEGMENT_STAGES), 4)
        work_dir = job.out_dir / f".{job.case}{PARTIAL_MARK}{os.getpid()}"
        try:
            if job.error is None:
                with _stage(job, None):
                    result = _measure_and_write(job, mask, array, geometry, prepared.warnings, work_dir,
                                                prepared.quality)
        finally:
            kept = remove_folder(work_dir, work=True)  # gone once published; kept when it is not ours
            if kept is not None and work_dir.exists():
                logger.debug("left %s: %s", work_dir, kept)
    job.array = job.prepared = None
    if result is None:
        return CaseResult(source=job.path, error=job.error, case=job.case, status="failed", seconds=_work_seconds(job))
    return result


def _work_seconds(job: CaseJob) -> float:
    """Seconds the case's stages worked (not the time it waited between them)."""
    return round(sum(v for k, v in job.timings.items() if k != "segment"), 4)


def _measure_and_write(job: CaseJob, mask: np.ndarray, array: np.ndarray, geometry: Geometry,
                       segmenter_warnings: list[str], work_dir: Path, quality: QualityScore | None) -> CaseResult:
    from spleen_seg.outputs.report import REPORT_FILENAME, build_report, keep_components, write_report

    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        job.timings[stage] = round(now - clock, 4)
        clock = now

    case_dir = job.out_dir / job.case
    components = keep_components(mask, job.options.largest_component)
    mask = components.mask
    # The segmenter's own warnings (out of memory: smaller batches, then the CPU) go in the report.
    report = build_report(job.case, str(job.path), mask, array, geometry, components,
                          [*job.warnings, *segmenter_warnings])
    report.model = dict(job.model)
    report.quality = None if quality is None else quality.as_dict()
    report.identity = dict(job.identity)
    lap("measure")
    new_work_folder(work_dir)
    outputs = _write_outputs(mask, array, geometry, job.source, work_dir, report, job.options, lap)
    report.outputs = {name: str(case_dir / dest.name) for name, dest in outputs.items()}
    report.timings_s = {**job.timings, "total": _work_seconds(job)}
    write_report(report, work_dir / REPORT_FILENAME)
    _publish(work_dir, case_dir)
    return CaseResult(source=job.path, output=case_dir / outputs["mask"].name, spleen_ml=report.volume_ml,
                      seconds=_work_seconds(job), case=job.case, status="ok" if report.spleen_found else "not_found",
                      report=report)


def segment_one(segmenter: Segmenter, source: InputItem, out_dir: Path, *, case: str | None = None,
                options: SegmentOptions | None = None, model: dict[str, Any] | None = None,
                prefetched: Future | None = None, identity: dict[str, Any] | None = None) -> CaseResult:
    """Read, segment and write one input into ``out_dir/<case>/``; any failure becomes ``CaseResult.error``.

    Writes ``spleen.nii.gz``, ``report.json``, ``preview.png`` and its thumbnail; for a DICOM series also
    ``spleen_seg.dcm``; with ``options.stl`` also ``spleen.stl`` (not for an empty mask).
    The files are written into a hidden temporary folder renamed to ``<case>`` at the end,
    so a failure or a kill leaves no partial case folder. ``prefetched`` is a future of
    :func:`load_input` already reading this input (batch mode overlaps reading and compute).
    ``identity`` is recorded in the report for resuming (``batch.resume``).

    The three stages (:func:`read_case`, :func:`network_case`, :func:`finish_case`) in
    turn. Every ``Exception`` (project errors, library errors, ``MemoryError``, CUDA out
    of memory) gives a ``failed`` result; ``KeyboardInterrupt`` propagates, leaving no
    case folder.
    """
    job = start_case(source, out_dir, case=case, options=options, model=model, identity=identity)
    read_case(job, segmenter, prefetched)
    network_case(job, segmenter)
    return finish_case(job, segmenter)


def _publish(work_dir: Path, case_dir: Path) -> None:
    """Replace ``case_dir`` by the finished ``work_dir``: an earlier run's folder is removed, but
    anything else there (not spleen-seg's, or holding a review) raises ``ForeignOutputError``
    and stays as it is (``batch.ownership``)."""
    check_folder(case_dir)
    if not os.path.lexists(case_dir):
        os.replace(work_dir, case_dir)
        return
    stale = case_dir.with_name(f".{case_dir.name}{OLD_MARK}{os.getpid()}")
    os.replace(case_dir, stale)
    os.replace(work_dir, case_dir)
    shutil.rmtree(stale, ignore_errors=True)


def remove_stale_work_dirs(out_dir: Path) -> list[Path]:
    """Remove the hidden work folders (``.<case>.partial-<pid>``, ``.<case>.old-<pid>``) of dead processes.

    A run killed with SIGKILL leaves its current case's work folder behind; folders of a
    process still running (another batch writing here) are kept, and so is a folder of that
    name that spleen-seg cannot recognise as its own or that holds a review (logged).
    Returns what was removed.
    """
    removed = []
    for path in out_dir.glob(".*"):
        match = WORK_DIR_NAME.match(path.name)
        if match and not path.is_symlink() and path.is_dir() and not _process_alive(int(match.group(1))):
            kept = remove_folder(path, work=True)
            if kept is None:
                removed.append(path)
            else:
                logger.warning("left %s, named like a work folder of a killed run: %s", path, kept)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, under another user
        return True
    return True


def warm_output_imports() -> None:
    """Import the output writers' libraries while the network runs (its runtime releases the GIL)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.figure  # noqa: F401
    import scipy.ndimage  # noqa: F401


def _write_outputs(mask: np.ndarray, image: np.ndarray, geometry: Geometry, source: InputItem, case_dir: Path,
                   report: CaseReport, options: SegmentOptions, lap) -> dict[str, Path]:
    """Write the mask files and preview of one case; ``lap(stage)`` records each stage's time."""
    outputs = {"mask": write_mask(mask, geometry, case_dir / MASK_FILENAME)}
    lap("write_nifti")
    if not isinstance(source, (Path, FailedInput)):
        from spleen_seg.io.seg import AlgorithmInfo, write_dicom_seg

        algorithm = AlgorithmInfo(name=ALGORITHM_NAME, version=__version__,
                                  weights_sha256=str(report.model.get("weights_sha256", "")))
        outputs["dicom_seg"] = write_dicom_seg(mask, source, case_dir / SEG_FILENAME, algorithm)
        lap("write_dicom_seg")
    if options.stl:
        if report.spleen_found:
            from spleen_seg.io.stl import write_stl

            outputs["stl"] = write_stl(mask, geometry.affine_ras, case_dir / STL_FILENAME)
            lap("write_stl")
        else:
            report.warnings.append("no STL written: the mask is empty")
    if options.preview:
        from spleen_seg.outputs.preview import PREVIEW_FILENAME, THUMBNAIL_FILENAME, write_preview, write_thumbnail

        title = (f"{report.case}: spleen {report.volume_ml:.1f} mL" if report.spleen_found
                 else f"{report.case}: spleen not found")
        outputs["preview"] = write_preview(image, mask, geometry.affine_ras, case_dir / PREVIEW_FILENAME, title)
        outputs["thumbnail"] = write_thumbnail(outputs["preview"], case_dir / THUMBNAIL_FILENAME)
        lap("preview")
    return outputs


