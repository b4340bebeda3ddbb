"""The ``segment`` command's batch driver: resume, read ahead while the network runs, one folder per case, the summary.

A batch never breaks: every case that fails (any ``Exception``) gets a ``failed`` row and
the batch goes on. ``summary.csv`` is kept current (``batch.summary``). Ctrl-C discards the
current case, writes the summary (the interrupted case as ``interrupted``) and re-raises
``KeyboardInterrupt``. A case an earlier run finished with the same identity
(``batch.resume``) is skipped, and the model is not loaded when every case is.
"""

from __future__ import annotations

import functools
import logging
import shutil
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spleen_seg import __version__
from spleen_seg.batch.case import (
    ALGORITHM_NAME,
    CaseResult,
    SegmentOptions,
    remove_stale_work_dirs,
    segment_one,
    warm_output_imports,
    write_run_info,
)
from spleen_seg.batch.inputs import InputItem, Part, input_shape, input_source, load_input, unique_case_ids
from spleen_seg.batch.resume import batch_identity, case_identity, finished_report, input_sha256
from spleen_seg.batch.summary import SUMMARY_FILENAME, LiveSummary, SummaryRow

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
                if (self.out_dir / case).exists():
                    logger.info("recomputing %s: %s", case, why)
                todo.append(index)
                continue
            status = "ok" if report.spleen_found else "not_found"
            mask = self.out_dir / case / Path(report.outputs.get("mask", "")).name
            self.finish(index, CaseResult(source=input_source(self.inputs[index]), output=mask,
                                          spleen_ml=report.volume_ml, case=case, status=status, report=report,
                                          reused=True), write=False)
        self.summary.write()
        return todo

    def finish(self, index: int, result: CaseResult, *, write: bool = True) -> None:
        """Record a case's result: its summary row (rewritten unless ``write=False``), then the callback."""
        self.results[index] = result
        if result.status == "failed":
            # An earlier run's folder for this case no longer describes it (other input,
            # options or version): after a run the case folders are exactly the rows
            # that are ok or not_found.
            shutil.rmtree(self.out_dir / self.cases[index], ignore_errors=True)
        self.summary.record(index, SummaryRow(case=result.case, source=str(result.source), status=result.status,
                                              report=result.report, error=result.error or "",
                                              reused=result.reused), write=write)
        if self.on_result is not None:
            from tqdm import tqdm

            with tqdm.external_write_mode(file=sys.stdout):  # the lines print above the progress bar
                self.on_result(result)

    def interrupted(self) -> None:
        """Ctrl-C: the current case (its work folder already removed) is recorded as interrupted."""
        index = self.current
        if index is not None and index not in self.results:
            source = input_source(self.inputs[index])
            self.results[index] = CaseResult(source=source, case=self.cases[index], status="interrupted",
                                             error=f"{source}: interrupted before it finished (KeyboardInterrupt)")
            self.summary.record(index, SummaryRow(case=self.cases[index], source=str(source), status="interrupted",
                                                  error=self.results[index].error or ""), write=False)
        self.summary.write(final=True)

    def ordered_results(self) -> list[CaseResult]:
        return [self.results[index] for index in sorted(self.results)]


def segment_files(
    inputs: list[InputItem], out_dir: Path, weights: Path, device: str, *, backend: str = "auto",
    progress: bool = True, options: SegmentOptions | None = None, overwrite: bool = False,
    on_result: ResultCallback | None = None, cases: list[str] | None = None, part: Part | None = None,
) -> list[CaseResult]:
    """Segment every input into ``out_dir/<case>/``, keeping ``out_dir/summary.csv`` current.

    Cases an earlier run finished with the same input, weights, options and version are
    skipped (``CaseResult.reused``) unless ``overwrite``. Failures do not stop the batch.
    ``on_result`` is called with each case's result as soon as it is known (skipped cases
    first). Weights trained under the MSD orientation convention see their inputs mirrored
    left-right and front-back (``Segmenter.mirror_xy``). Returns the results in input
    order; Ctrl-C writes the summary and re-raises ``KeyboardInterrupt``. ``cases``: the inputs'
    case ids (default ``unique_case_ids``); ``part``: this run is that part of a job array
    (``batch.summary`` merges the parts' summaries).
    """
    from spleen_seg.io.download import file_sha256
    from spleen_seg.pipeline.network import weights_orientation_convention

    options = options or SegmentOptions()
    convention = weights_orientation_convention(weights, options.weights_convention)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_work_dirs(out_dir):
        logger.info("removed %s, left by a run that was killed", stale)
    batch = _Batch(inputs=inputs, cases=unique_case_ids(inputs) if cases is None else cases, out_dir=out_dir,
                   identity=batch_identity(file_sha256(weights), convention, options), on_result=on_result,
                   summary=LiveSummary(out_dir / SUMMARY_FILENAME, part=part, total=len(inputs)))
    try:
        todo = batch.resume(overwrite)
        if todo:
            _compute(batch, todo, weights, device, backend, progress, options, convention)
    except KeyboardInterrupt:
        batch.interrupted()
        raise
    return batch.ordered_results()


def _compute(batch: _Batch, todo: list[int], weights: Path, device: str, backend: str, progress: bool,
             options: SegmentOptions, convention: str) -> None:
    """Segment the cases ``todo`` (input indices) in order, recording each result as it comes."""
    from tqdm import tqdm

    from spleen_seg.pipeline.network import CONVENTION_MSD
    from spleen_seg.pipeline.segmenter import load_segmenter

    # Overlap: the runner compiles and the next input is read (and hashed) while the current one computes.
    with ThreadPoolExecutor(max_workers=3, thread_name_prefix="spleen-seg-io") as pool:
        try:
            pending = pool.submit(load_segmenter, weights, device, backend, mirror_xy=convention == CONVENTION_MSD,
                                  progress=progress, all_windows=options.all_windows, precision=options.precision)
            reads = {todo[0]: _prefetch(pool, batch, todo[0])}
            segmenter = pending.result()
            if options.preview:  # after the start-up work, so that it overlaps the network instead
                pool.submit(warm_output_imports)
            model = {"name": ALGORITHM_NAME, "version": __version__, "weights": str(Path(weights).resolve()),
                     "weights_sha256": batch.identity["weights_sha256"], "orientation_convention": convention,
                     "device": str(device), "backend": segmenter.runner.backend}
            write_run_info(batch.out_dir, weights, device, segmenter.runner.backend, batch.inputs,
                           orientation_convention=convention)
            with tqdm(total=len(todo), desc="cases", unit="case", disable=not progress) as bar:
                for position, index in enumerate(todo):
                    batch.current = index
                    bar.set_postfix_str(batch.cases[index], refresh=False)
                    read, digest = reads.pop(index)
                    if position + 1 < len(todo):
                        following = todo[position + 1]
                        reads[following] = _prefetch(pool, batch, following, _may_read_ahead(read, batch.inputs[following]))
                    result = segment_one(segmenter, batch.inputs[index], batch.out_dir, case=batch.cases[index],
                                         options=options, model=model, prefetched=read,
                                         identity=case_identity(batch.identity, digest.result()))
                    batch.finish(index, result)
                    bar.update()
        except BaseException:
            # Ctrl-C or a failed model load: do not start the reads still queued.
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _prefetch(pool: ThreadPoolExecutor, batch: _Batch, index: int,
              read_ahead: bool = True) -> tuple[Future | None, Future]:
    """Futures of the input's (array, geometry) (None: read when its turn comes) and of its digest."""
    read = pool.submit(load_input, batch.inputs[index]) if read_ahead else None
    return read, pool.submit(batch.digest, index)


def _may_read_ahead(current: Future | None, following: InputItem) -> bool:
    """Read the next input while this one computes only if both fit in the memory free now.

    Waits for the current read (the case cannot start before it anyway): the running
    case's estimate comes from its real geometry, the next one's from its headers. When
    the current case could not be read ahead either, memory is short: read in turn.
    """
    if current is not None and _fits_beside(current, following):
        return True
    logger.info("not reading %s ahead: memory is short; it is read when its turn comes", input_source(following))
    return False


def _fits_beside(current: Future, following: InputItem) -> bool:
    from spleen_seg.pipeline.memory import can_prefetch, estimate_case_memory

    shape = input_shape(following)
    if shape is None:  # unreadable headers: its read fails fast, and it would fail later too
        return True
    running = None
    if current.exception() is None:
        _, geometry = current.result()
        running = estimate_case_memory(geometry.shape, geometry.affine_ras)
    return can_prefetch(shape, running)
