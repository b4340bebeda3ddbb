"""Processing a complete series: the ``segment`` pipeline on the spooled files, results queued for sending.

``process_series`` is the node's one call into ``batch`` (``segment_one``), so the node
writes exactly what ``segment`` writes for a DICOM series (mask, DICOM SEG, report.json,
preview), plus, with ``--send-report``, the volume SR and the preview Secondary Capture.
``process_next`` takes the next complete job, runs it and records the outcome.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom

from spleen_seg import __version__
from spleen_seg.batch.case import ALGORITHM_NAME, SEG_FILENAME, SegmentOptions, segment_one, warm_output_imports
from spleen_seg.errors import InputImageError, SpleenSegError
from spleen_seg.node.bookkeeper import log_job
from spleen_seg.node.jobs import Job, JobTable, ResultFile
from spleen_seg.node.settings import NodeSettings
from spleen_seg.node.spool import Spool, fsync_tree
from spleen_seg.pipeline.segmenter import Segmenter

if TYPE_CHECKING:
    from spleen_seg.io.dicom import DicomSeries

logger = logging.getLogger(__name__)

SR_FILENAME = "spleen_volume_sr.dcm"
SC_FILENAME = "spleen_preview_sc.dcm"


@dataclass(frozen=True)
class LoadedModel:
    """The segmenter, loaded once, with what every result records about it."""

    segmenter: Segmenter
    model: dict[str, Any]
    options: SegmentOptions


@dataclass(frozen=True)
class ProcessedSeries:
    """What processing a series produced; ``files`` are the results to send, paths relative to the spool."""

    files: list[ResultFile]
    volume_ml: float
    spleen_found: bool
    warnings: list[str] = field(default_factory=list)


def load_model(settings: NodeSettings) -> LoadedModel:
    """Resolve weights, device and orientation convention as ``segment`` does, and load the network once."""
    from spleen_seg.io.download import file_sha256
    from spleen_seg.pipeline.backends import resolve_device_name
    from spleen_seg.pipeline.network import CONVENTION_MSD, default_segment_weights, weights_orientation_convention
    from spleen_seg.pipeline.segmenter import load_segmenter

    weights = default_segment_weights(settings.weights)
    device = resolve_device_name(settings.device)
    convention = weights_orientation_convention(weights, settings.weights_convention)
    segmenter = load_segmenter(weights, device, settings.backend, mirror_xy=convention == CONVENTION_MSD, progress=False)
    warm_output_imports()
    model = {"name": ALGORITHM_NAME, "version": __version__, "weights": str(Path(weights).resolve()),
             "weights_sha256": file_sha256(weights), "orientation_convention": convention,
             "device": device, "backend": segmenter.runner.backend}
    options = SegmentOptions(largest_component=settings.largest_component, preview=settings.send_report,
                             weights_convention=convention)
    return LoadedModel(segmenter=segmenter, model=model, options=options)


def _result_file(spool: Spool, path: Path, kind: str) -> ResultFile:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return ResultFile(kind=kind, path=spool.relative(path), sop_class_uid=str(ds.SOPClassUID),
                      sop_instance_uid=str(ds.SOPInstanceUID), series_uid=str(ds.SeriesInstanceUID))


def process_series(loaded: LoadedModel, series_folder: Path, spool: Spool, job_id: int,
                   send_report: bool) -> ProcessedSeries:
    """Segment the series spooled in ``series_folder`` into the job's result folder.

    The adapter around ``batch.case.segment_one``: finds the CT volumes in the folder
    (deriving UIDs the files lack; one volume, or several when the series holds several
    complete acquisitions at the same positions), runs ``segment_one`` on each (outputs
    as ``segment``), adds the SR and Secondary Capture when ``send_report``, and makes
    the folders durable. ``volume_ml`` is the first volume's. Raises ``SpleenSegError``
    with the reason when the series cannot be processed.
    """
    from spleen_seg.io.dicom import find_series

    found, notices = find_series(series_folder)
    if not found:
        raise InputImageError(f"{series_folder}: no CT volume ({'; '.join(n.text for n in notices)})")
    outcomes = [_process_volume(loaded, series, spool.result_folder(job_id, series.part if len(found) > 1 else ""),
                                spool, send_report) for series in found]
    files = [file for processed in outcomes for file in processed.files]
    warnings = [warning for processed in outcomes for warning in processed.warnings]
    return ProcessedSeries(files=files, volume_ml=outcomes[0].volume_ml, spleen_found=outcomes[0].spleen_found,
                           warnings=warnings)


def _process_volume(loaded: LoadedModel, series: DicomSeries, case_dir: Path, spool: Spool,
                    send_report: bool) -> ProcessedSeries:
    from spleen_seg.io.dicom_volume import series_headers
    from spleen_seg.io.seg import AlgorithmInfo

    result = segment_one(loaded.segmenter, series, case_dir.parent, case=case_dir.name, options=loaded.options,
                         model=loaded.model)
    if result.error is not None or result.report is None:
        raise InputImageError(result.error or f"{series.folder}: segmentation produced no report")
    files = [_result_file(spool, case_dir / SEG_FILENAME, "seg")]
    if send_report:
        from spleen_seg.outputs.dicom_report import write_preview_sc, write_volume_sr
        from spleen_seg.outputs.preview import PREVIEW_FILENAME

        algorithm = AlgorithmInfo(name=ALGORITHM_NAME, version=__version__,
                                  weights_sha256=str(loaded.model.get("weights_sha256", "")))
        headers = series_headers(series)
        seg = pydicom.dcmread(case_dir / SEG_FILENAME, stop_before_pixels=True)
        sr = write_volume_sr(seg, headers, result.report.volume_ml, case_dir / SR_FILENAME, algorithm)
        sc = write_preview_sc(case_dir / PREVIEW_FILENAME, headers[0], case_dir / SC_FILENAME, algorithm)
        files += [_result_file(spool, sr, "sr"), _result_file(spool, sc, "sc")]
    fsync_tree(case_dir)
    return ProcessedSeries(files=files, volume_ml=result.report.volume_ml, spleen_found=result.report.spleen_found,
                           warnings=list(result.report.warnings))


def process_next(table: JobTable, spool: Spool, loaded: LoadedModel, settings: NodeSettings,
                 clock=time.time) -> Job | None:
    """Take the next complete job (completion order), process it, record the outcome; None when idle.

    A series that cannot be processed fails its job with the reason; the node goes on.
    """
    job = table.claim_next(clock())
    if job is None:
        return None
    log_job(logger, job)
    start = time.monotonic()
    try:
        processed = process_series(loaded, spool.series_folder(job.series_key), spool, job.id, settings.send_report)
    except SpleenSegError as err:
        table.fail(job.id, str(err), clock())
    # The node must keep serving whatever one series does to the pipeline: the job records
    # the error, the log keeps the traceback.
    except Exception as err:  # noqa: BLE001
        logger.error("job %d: unexpected error\n%s", job.id, traceback.format_exc())
        table.fail(job.id, f"internal error: {err.__class__.__name__}: {err}", clock())
    else:
        finished = table.finish_processing(job.id, processed.files, settings.targets, clock())
        log_job(logger, finished, seconds=round(time.monotonic() - start, 3),
                results=",".join(f.kind for f in processed.files),
                seg_series=processed.files[0].series_uid)
        return finished
    failed = table.job(job.id)
    log_job(logger, failed, seconds=round(time.monotonic() - start, 3))
    return failed
