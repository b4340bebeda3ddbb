"""The ``segment`` command's batch driver: read ahead while the network runs, one folder per case, the summary."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from spleen_seg import __version__
from spleen_seg.batch.case import (
    ALGORITHM_NAME,
    CaseResult,
    SegmentOptions,
    segment_one,
    warm_output_imports,
    write_run_info,
)
from spleen_seg.batch.inputs import InputItem, input_source, load_input, unique_case_ids
from spleen_seg.pipeline.segmenter import load_segmenter

logger = logging.getLogger(__name__)


def segment_files(
    inputs: list[InputItem], out_dir: Path, weights: Path, device: str, *, backend: str = "auto",
    progress: bool = True, options: SegmentOptions | None = None,
) -> list[CaseResult]:
    """Segment every input into ``out_dir/<case>/``, then write ``out_dir/summary.csv``.

    Failures do not stop the batch. Weights trained under the MSD orientation convention
    see their inputs mirrored left-right and front-back (``Segmenter.mirror_xy``).
    """
    from spleen_seg.batch.summary import SUMMARY_FILENAME, SummaryRow, write_summary
    from spleen_seg.io.download import file_sha256
    from spleen_seg.pipeline.network import CONVENTION_MSD, weights_orientation_convention

    options = options or SegmentOptions()
    convention = weights_orientation_convention(weights, options.weights_convention)
    # Overlap: the runner compiles and the next input is read while the current one computes.
    with ThreadPoolExecutor(max_workers=3, thread_name_prefix="spleen-seg-io") as pool:
        pending = pool.submit(load_segmenter, weights, device, backend, mirror_xy=convention == CONVENTION_MSD,
                              progress=progress, all_windows=options.all_windows, precision=options.precision)
        reads = {0: pool.submit(load_input, inputs[0])} if inputs else {}
        segmenter = pending.result()
        if options.preview:  # after the start-up work, so that it overlaps the network instead
            pool.submit(warm_output_imports)
        model = {"name": ALGORITHM_NAME, "version": __version__, "weights": str(Path(weights).resolve()),
                 "weights_sha256": file_sha256(weights), "orientation_convention": convention,
                 "device": str(device), "backend": segmenter.runner.backend}
        out_dir.mkdir(parents=True, exist_ok=True)
        write_run_info(out_dir, weights, device, segmenter.runner.backend, inputs, orientation_convention=convention)
        results = []
        for index, (source, case) in enumerate(zip(inputs, unique_case_ids(inputs), strict=True)):
            logger.info("[%d/%d] %s", index + 1, len(inputs), input_source(source))
            if index + 1 < len(inputs):
                reads[index + 1] = pool.submit(load_input, inputs[index + 1])
            results.append(segment_one(segmenter, source, out_dir, case=case, options=options, model=model,
                                       prefetched=reads.pop(index)))
    rows = [SummaryRow(case=r.case, source=str(r.source), status=r.status, report=r.report, error=r.error or "")
            for r in results]
    write_summary(rows, out_dir / SUMMARY_FILENAME)
    return results
