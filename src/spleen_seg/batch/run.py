"""The ``segment`` command's batch driver: resume, a bounded pipeline around the network, one folder per case, the summary.

The local batch overlaps reading and preprocessing of the next case and writing of the
finished one with the network (:func:`_compute`), memory permitting; ``--ray`` runs the
same cases on a Ray cluster instead (``batch.ray``). A batch never breaks: every case that
fails (any ``Exception``) gets a ``failed`` row and the batch goes on. ``summary.csv`` is
kept current (``batch.summary``). Ctrl-C discards the
current case (under ``--ray``, the cases in flight), writes the summary (the interrupted
cases as ``interrupted``) and re-raises ``KeyboardInterrupt``. A case an earlier run finished with the same identity
(``batch.resume``) is skipped, and the model is not loaded when every case is. Only what
spleen-seg wrote is replaced or removed (``batch.ownership``): a case whose folder is someone
else's, or holds a review, fails without being computed, and a run-level file that is not
ours refuses the run before anything is written.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spleen_seg.batch.case import (
    CaseJob,
    CaseResult,
    SegmentOptions,
    check_run_info,
    describe_failure,
    finish_case,
    model_record,
    network_case,
    read_case,
    remove_stale_work_dirs,
    start_case,
    warm_output_imports,
    write_run_info,
)
from spleen_seg.batch.inputs import InputItem, Part, input_header_geometry, input_source, unique_case_ids
from spleen_seg.batch.ownership import folder_problem, remove_folder
from spleen_seg.batch.progress import BatchProgress, Stopwatch, totals_line
from spleen_seg.batch.resume import batch_identity, case_identity, finished_report, input_sha256
from spleen_seg.batch.summary import SUMMARY_FILENAME, LiveSummary, SummaryRow, check_summary_files
from spleen_seg.errors import ForeignOutputError

if TYPE_CHECKING:
    from spleen_seg.batch.ray import RaySettings
    from spleen_seg.outputs.report import CaseReport
    from spleen_seg.pipeline.segmenter import Segmenter

logger = logging.getLogger(__name__)

ResultCallback = Callable[[CaseResult], None]


@dataclass
class _Batch:
    """The cases of one batch and what happened to each so far (results and summary rows by input index)."""

    inputs: list[InputItem]
    cases: list[str]
    out_dir: Path
    identity: dict[str, Any]
    on_result: ResultCallback | None
    summary: LiveSummary
    current: int | None = None
    # The cases sent to the cluster (Ray) or to the writer thread and not recorded yet; ``current``: the
    # local batch's case in the network.
    in_flight: set[int] = field(default_factory=set)
    results: dict[int, CaseResult] = field(default_factory=dict)
    digests: dict[int, str | None] = field(default_factory=dict)

    def digest(self, index: int) -> str | None:
        if index not in self.digests:
            self.digests[index] = input_sha256(self.inputs[index])
        return self.digests[index]

    def resume(self, overwrite: bool) -> list[int]:
        """Record the cases an earlier run finished with this identity; return the indices left to compute."""
        todo = []
        for index, case in enumerate(self.cases):
            report, why = (None, "--overwrite") if overwrite else finished_report(
                self.out_dir / case, self.identity, functools.partial(self.digest, index))
            if report is None:
                problem = folder_problem(self.out_dir / case)
                if problem is not None:  # not ours, or a review: fails now, without computing
                    source = input_source(self.inputs[index])
                    self.finish(index, CaseResult(source=source, case=case, status="failed",
                                                  error=describe_failure(source, ForeignOutputError(problem))),
                                write=False)
                    continue
                if (self.out_dir / case).exists():
                    logger.info("recomputing %s: %s", case, why)
                todo.append(index)
                continue
            self.finish(index, self._from_report(index, report, reused=True), write=False)
        self.summary.write()
        return todo

    def _from_report(self, index: int, report: CaseReport, *, reused: bool) -> CaseResult:
        """The result of a case whose folder holds a finished report."""
        case = self.cases[index]
        mask = self.out_dir / case / Path(report.outputs.get("mask", "")).name
        return CaseResult(source=input_source(self.inputs[index]), output=mask, spleen_ml=report.volume_ml,
                          case=case, status="ok" if report.spleen_found else "not_found", report=report,
                          reused=reused)

    def finish(self, index: int, result: CaseResult, *, write: bool = True) -> None:
        """Record a case's result: its summary row (rewritten unless ``write=False``), then the callback."""
        self.results[index] = result
        if result.status == "failed":
            # An earlier run's folder for this case no longer describes it (other input,
            # options or version): after a run the case folders are exactly the rows that
            # are ok or not_found, and the folders that are not spleen-seg's to remove.
            kept = remove_folder(self.out_dir / self.cases[index])
            if kept is not None:
                logger.debug("kept %s: %s", self.out_dir / self.cases[index], kept)
        self.summary.record(index, SummaryRow(case=result.case, source=str(result.source), status=result.status,
                                              report=result.report, error=result.error or "",
                                              reused=result.reused), write=write)
        if self.on_result is not None:
            from tqdm import tqdm

            with tqdm.external_write_mode(file=sys.stdout):  # the lines print above the progress bar
                self.on_result(result)

    def interrupted(self) -> None:
        """Ctrl-C or SIGTERM. A case whose folder was published before the stop is finished, and recorded so,
        even when its result never reached us (a worker's last rename can beat the stop; seen under Ray in CI);
        the current case, or under Ray every case in flight (their work folders already removed or left to the
        next run), is recorded as interrupted."""
        running = self.in_flight | ({self.current} if self.current is not None else set())
        for index in sorted(running - set(self.results)):  # only these: a case not started is not hashed here
            report, _ = finished_report(self.out_dir / self.cases[index], self.identity,
                                        functools.partial(self.digest, index))
            if report is not None:
                self.finish(index, self._from_report(index, report, reused=False), write=False)
            else:
                source = input_source(self.inputs[index])
                self.results[index] = CaseResult(source=source, case=self.cases[index], status="interrupted",
                                                 error=f"{source}: interrupted before it finished (KeyboardInterrupt)")
                self.summary.record(index, SummaryRow(case=self.cases[index], source=str(source),
                                                      status="interrupted", error=self.results[index].error or ""),
                                    write=False)
        self.summary.write(final=True)

    def ordered_results(self) -> list[CaseResult]:
        return [self.results[index] for index in sorted(self.results)]


def segment_files(
    inputs: list[InputItem], out_dir: Path, weights: Path, device: str, *, backend: str = "auto",
    progress: bool = True, options: SegmentOptions | None = None, overwrite: bool = False,
    on_result: ResultCallback | None = None, cases: list[str] | None = None, part: Part | None = None,
    ray: RaySettings | None = None,
) -> list[CaseResult]:
    """Segment every input into ``out_dir/<case>/``, keeping ``out_dir/summary.csv`` current.

    Cases an earlier run finished with the same input, weights, options and version are
    skipped (``CaseResult.reused``) unless ``overwrite``. Failures do not stop the batch.
    ``on_result`` is called with each case's result as soon as it is known (skipped cases,
    and cases refused because their folder is not spleen-seg's to replace, first). Weights
    trained under the MSD orientation convention see their inputs mirrored left-right and
    front-back (``Segmenter.mirror_xy``). ``cases``: the inputs' case ids
    (default ``unique_case_ids``); ``part``: this run is that part of a job array
    (``batch.summary`` merges the parts' summaries); ``ray``: compute on a Ray cluster
    (``batch.ray``) instead of this process. Returns the results in input order; Ctrl-C
    writes the summary and re-raises ``KeyboardInterrupt``. Raises ``ForeignOutputError``
    before anything is written when ``out_dir`` holds a summary, page or ``run_info.json``
    that spleen-seg did not write; a case folder of that kind fails its case alone.
    """
    from spleen_seg.io.download import file_sha256
    from spleen_seg.pipeline.network import weights_orientation_convention
    from spleen_seg.pipeline.tta import check_tta_axes

    options = options or SegmentOptions()
    convention = weights_orientation_convention(weights, options.weights_convention)
    # Refused TTA fails here, before the output folder, a Ray cluster or a model; the
    # segmenter checks again where it loads (and records the warning in each report).
    check_tta_axes(weights, options.tta_axes, explicit=options.tta_axes_explicit)
    out_dir.mkdir(parents=True, exist_ok=True)
    # A summary, page or run_info.json that is not ours refuses the run before anything is written.
    check_summary_files(out_dir)
    check_run_info(out_dir)
    for stale in remove_stale_work_dirs(out_dir):
        logger.info("removed %s, left by a run that was killed", stale)
    batch = _Batch(inputs=inputs, cases=unique_case_ids(inputs) if cases is None else cases, out_dir=out_dir,
                   identity=batch_identity(file_sha256(weights), convention, options), on_result=on_result,
                   summary=LiveSummary(out_dir / SUMMARY_FILENAME, part=part, total=len(inputs)))
    clock = Stopwatch()
    try:
        todo = batch.resume(overwrite)
        if todo and ray is not None:
            _compute_on_ray(batch, todo, weights, device, backend, progress, options, convention, ray)
        elif todo:
            _compute(batch, todo, weights, device, backend, progress, options, convention)
    except KeyboardInterrupt:
        batch.interrupted()
        raise
    results = batch.ordered_results()
    logger.info("%s", totals_line(results, clock.seconds))
    return results


def _compute_on_ray(batch: _Batch, todo: list[int], weights: Path, device: str, backend: str, progress: bool,
                    options: SegmentOptions, convention: str, ray: RaySettings) -> None:
    from spleen_seg.batch.ray import RayCase, segment_on_ray

    cases = [RayCase(index, batch.inputs[index], batch.cases[index]) for index in todo]
    with BatchProgress(len(todo), progress) as bar:
        def record(index: int, result: CaseResult) -> None:
            batch.finish(index, result)
            batch.in_flight.discard(index)
            bar.done(result)

        segment_on_ray(cases, batch.out_dir, weights, device, backend=backend, options=options,
                       convention=convention, identity=batch.identity, settings=ray, record=record,
                       all_inputs=batch.inputs, started=batch.in_flight.add)


# At most this many cases wait for their outputs beside the one in the network (memory bound).
MAX_FINISHING = 1


def _compute(batch: _Batch, todo: list[int], weights: Path, device: str, backend: str, progress: bool,
             options: SegmentOptions, convention: str) -> None:
    """Segment the cases ``todo`` (input indices) as a bounded pipeline, recording each result in order.

    Three stages overlap: the next case is read and preprocessed in a reader thread
    (``read_case``; when memory allows, see :func:`_ahead_mode`), the network runs here,
    and the finished case's mask, report and files are written in a writer thread
    (``finish_case``). At most three cases are in memory: one ahead, one in the network,
    :data:`MAX_FINISHING` being written. The runtimes release the GIL.
    """
    from spleen_seg.pipeline.network import CONVENTION_MSD
    from spleen_seg.pipeline.segmenter import load_segmenter

    # Overlap: the runner compiles while the first input is read (and hashed).
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="spleen-seg-read") as reader, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="spleen-seg-write") as writer, \
            BatchProgress(len(todo), progress) as bar:
        pipeline = _Pipeline(batch, reader, writer, bar)
        try:
            pending = reader.submit(load_segmenter, weights, device, backend, mirror_xy=convention == CONVENTION_MSD,
                                    progress=progress, all_windows=options.all_windows, precision=options.precision,
                                    tta_axes=options.tta_axes, tta_axes_explicit=options.tta_axes_explicit)
            pipeline.ahead[todo[0]] = reader.submit(pipeline.start, todo[0], None, "read", options)
            pipeline.segmenter = segmenter = pending.result()
            pipeline.warm_outputs = options.preview
            pipeline.model = model_record(batch.identity, weights, convention, device, segmenter.runner.backend)
            write_run_info(batch.out_dir, weights, device, segmenter.runner.backend, batch.inputs,
                           orientation_convention=convention)
            for position, index in enumerate(todo):
                pipeline.run(index, todo[position + 1] if position + 1 < len(todo) else None, options)
            pipeline.drain()
        except BaseException:
            # Ctrl-C or a failed model load: do not start the reads still queued; record the
            # cases already in the writer (their network is done), then the current one as interrupted.
            reader.shutdown(wait=False, cancel_futures=True)
            pipeline.drain()
            raise


@dataclass
class _Pipeline:
    """The stages' hand-over points: jobs read ahead (by input index), jobs being written, in order."""

    batch: _Batch
    reader: ThreadPoolExecutor
    writer: ThreadPoolExecutor
    bar: BatchProgress
    segmenter: Segmenter | None = None
    model: dict[str, Any] = field(default_factory=dict)
    ahead: dict[int, Future] = field(default_factory=dict)
    finishing: deque[tuple[int, Future]] = field(default_factory=deque)
    # Import the output writers' libraries once the first case is prepared, so that the imports
    # overlap the network: started earlier, they slowed that case's read and preprocessing,
    # which the network waits for.
    warm_outputs: bool = False

    def start(self, index: int, segmenter: Segmenter | None, mode: str, options: SegmentOptions) -> CaseJob:
        """Reader thread: the case's job, its digest (resume identity), and per ``mode`` its read or preparation."""
        batch = self.batch
        job = start_case(batch.inputs[index], batch.out_dir, case=batch.cases[index], options=options,
                         identity=case_identity(batch.identity, batch.digest(index)))
        if mode != "none":
            read_case(job, segmenter if mode == "prepare" else None)
        return job

    def run(self, index: int, following: int | None, options: SegmentOptions) -> None:
        """Main thread: take the case read ahead, start the next one ahead, run the network, hand over to the writer."""
        batch, segmenter = self.batch, self.segmenter
        assert segmenter is not None  # set once the model loaded, before the first case
        batch.current = index
        self.bar.running(batch.cases[index])
        job = self.ahead.pop(index).result()
        if following is not None:
            mode = _ahead_mode(job, batch.inputs[following])
            self.ahead[following] = self.reader.submit(self.start, following, segmenter, mode, options)
        job.model = dict(self.model)
        read_case(job, segmenter)  # a case not prepared ahead (the first; memory was short) is prepared now
        if self.warm_outputs:
            self.warm_outputs = False
            self.writer.submit(warm_output_imports)
        network_case(job, segmenter)
        while len(self.finishing) > MAX_FINISHING - 1:
            self._record_first()
        self.finishing.append((index, self.writer.submit(finish_case, job, segmenter)))
        batch.in_flight.add(index)  # in the writer: recorded, or found published, on Ctrl-C
        batch.current = None
        self._record_done()

    def _record_done(self) -> None:
        while self.finishing and self.finishing[0][1].done():
            self._record_first()

    def _record_first(self) -> None:
        """Record the oldest case in the writer (waits for it). It leaves the queue only once recorded: a Ctrl-C
        while waiting leaves it there for ``drain``, instead of dropping a case the writer goes on to publish."""
        index, future = self.finishing[0]
        result = future.result()
        self.finishing.popleft()
        self.batch.finish(index, result)
        self.batch.in_flight.discard(index)
        self.bar.done(result)

    def drain(self) -> None:
        """Record every case the writer holds (waits for it)."""
        while self.finishing:
            self._record_first()


def _ahead_mode(current: CaseJob, following: InputItem) -> str:
    """How far to take the next case while this one is in the network: "prepare", "read" or "none".

    "prepare" (read and preprocess) when the next case's preparation peak fits beside what
    this case still allocates; else "read" when its read alone fits (``can_prefetch``);
    else "none": memory is short, it is read when its turn comes. When the current case
    could not be read ahead either (its job holds no volume), memory is short: "none".
    """
    from spleen_seg.pipeline.memory import (
        HEADROOM_BYTES,
        available_bytes,
        can_prefetch,
        estimate_case_memory,
    )

    header = input_header_geometry(following)
    if header is None:  # unreadable headers: its read fails fast, and it would fail later too
        return "read"
    if current.geometry is not None or current.error is not None:
        running = None
        if current.geometry is not None:
            running = estimate_case_memory(current.geometry.shape, current.geometry.affine_ras)
        stages = estimate_case_memory(*header).stages
        preparing = max(stages["read"], stages["resample"])
        if preparing + (running.after_read_bytes if running else 0) + HEADROOM_BYTES <= available_bytes():
            return "prepare"
        if can_prefetch(header[0], running):
            return "read"
    logger.info("not reading %s ahead: memory is short; it is read when its turn comes", input_source(following))
    return "none"
