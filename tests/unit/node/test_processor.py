"""The processor around ``segment_one`` with a stub network: results recorded and queued, SEG equal
to the mask, SR and Secondary Capture in the source study, bad series and crashes fail their job only."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from stub_segmenter import ThresholdSegmenter
from synthetic_dicom import write_series

from spleen_seg.batch.case import SegmentOptions
from spleen_seg.node.jobs import FAILED, SENDING, JobTable, NewInstance
from spleen_seg.node.processor import LoadedModel, process_next
from spleen_seg.node.settings import NodeSettings
from spleen_seg.node.spool import Spool

SHAPE = (24, 20, 8)
VOXEL_ML = 0.8 * 0.7 * 2.0 / 1000  # synthetic_dicom's spacing
TARGET = "PACS@127.0.0.1:104"


class CrashingSegmenter(ThresholdSegmenter):
    def compute_margin(self, prepared):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def phantom() -> np.ndarray:
    """Soft tissue with a 6 x 5 x 4 block of 150 HU (the stub's spleen) and air in one corner."""
    hu = np.full(SHAPE, 40.0, dtype=np.float32)
    hu[:4, :4, :] = -1000.0
    hu[8:14, 6:11, 2:6] = 150.0
    return hu


def loaded(segmenter, send_report: bool) -> LoadedModel:
    model = {"name": "spleen-seg", "version": "test", "weights_sha256": "ab" * 32}
    return LoadedModel(segmenter=segmenter, model=model, options=SegmentOptions(preview=send_report))


def receive_series(spool: Spool, table: JobTable, folder: Path, hu: np.ndarray, **kwargs) -> str:
    paths = write_series(folder, hu, **kwargs)
    for path in paths:
        ds = pydicom.dcmread(path)
        rel = spool.write_instance(ds.SeriesInstanceUID, ds.SOPInstanceUID, path.read_bytes())
        table.record_instance(NewInstance(ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID, rel,
                                          ds.SOPClassUID, "", "PACS"), 100.0)
    table.complete_quiet(200.0, 10.0)
    return str(pydicom.dcmread(paths[0]).SeriesInstanceUID)


def test_processed_series_queues_a_seg_equal_to_the_mask(spool_and_table, tmp_path):
    spool, table = spool_and_table
    series_uid = receive_series(spool, table, tmp_path / "ct", phantom())
    job = process_next(table, spool, loaded(ThresholdSegmenter(), False), NodeSettings(spool=spool.root),
                       clock=lambda: 300.0)
    assert job is not None and job.state == "done"  # no target: results stay in the spool
    seg_path = spool.result_folder(job.id) / "spleen_seg.dcm"
    seg = hd.seg.segread(seg_path)
    assert seg.StudyInstanceUID == "1.2.3.4"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    frames = seg.get_volume().array  # (slices, rows, columns) of the source grid
    assert int(frames.sum()) == 6 * 5 * 4


def test_send_report_adds_volume_sr_and_secondary_capture_in_the_source_study(spool_and_table, tmp_path):
    spool, table = spool_and_table
    receive_series(spool, table, tmp_path / "ct", phantom())
    settings = NodeSettings(spool=spool.root, send_report=True, stow_url="http://pacs/dicom-web")
    job = process_next(table, spool, loaded(ThresholdSegmenter(), True), settings, clock=lambda: 300.0)
    assert job.state == SENDING
    results = {r.kind: r for r in table.results(job.id)}
    assert set(results) == {"seg", "sr", "sc"} and {r.target for r in results.values()} == {"http://pacs/dicom-web"}
    sr = pydicom.dcmread(spool.root / results["sr"].path)
    sc = pydicom.dcmread(spool.root / results["sc"].path)
    assert sr.StudyInstanceUID == sc.StudyInstanceUID == "1.2.3.4"
    assert len({results[k].series_uid for k in results}) == 3  # each a new series
    report = hd.sr.srread(spool.root / results["sr"].path)
    (group,) = report.content.get_volumetric_roi_measurement_groups()
    (volume,) = group.get_measurements()
    assert volume.value == pytest.approx(6 * 5 * 4 * VOXEL_ML, rel=1e-6)
    assert (volume.unit.value, volume.unit.scheme_designator) == ("ml", "UCUM")
    assert group.referenced_segment.referenced_sop_instance_uid == results["seg"].sop_instance_uid
    assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3 and sc.Rows > 100


def test_series_that_cannot_be_read_fails_its_job_with_the_reason(spool_and_table, tmp_path):
    spool, table = spool_and_table
    receive_series(spool, table, tmp_path / "ct", phantom()[:, :, :1])
    job = process_next(table, spool, loaded(ThresholdSegmenter(), False), NodeSettings(spool=spool.root),
                       clock=lambda: 300.0)
    assert job.state == FAILED and "a single slice is not a 3D volume" in job.last_error


def test_crash_in_the_pipeline_fails_that_job_and_the_next_is_processed(spool_and_table, tmp_path):
    spool, table = spool_and_table
    receive_series(spool, table, tmp_path / "a", phantom())
    crashed = process_next(table, spool, loaded(CrashingSegmenter(), False), NodeSettings(spool=spool.root),
                           clock=lambda: 300.0)
    assert crashed.state == FAILED
    # segment_one captures every exception of its case: "<input>: <what> (<type>)".
    assert crashed.last_error.endswith(": CUDA error: an illegal memory access was encountered (RuntimeError)")
    receive_series(spool, table, tmp_path / "b", phantom())
    settings = NodeSettings(spool=spool.root, stow_url="http://pacs/dicom-web")
    assert process_next(table, spool, loaded(ThresholdSegmenter(), False), settings, clock=lambda: 300.0).state == SENDING
    assert process_next(table, spool, loaded(ThresholdSegmenter(), False), settings, clock=lambda: 300.0) is None
