"""spleen-seg serve against dcmtk: echoscu and storescu send, storescp receives the SEG.

One node (1 s quiet period, callers STORESCU and ECHOSCU only) serves every test of the
module, as a node serves a hospital: each test sends its own series and checks what came
back, and a bad input in one test must not stop the node for the next.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
import pytest
from node_harness import (
    Node,
    Storescp,
    echoscu,
    free_port,
    need_binaries,
    phantom_series,
    referenced_instances,
    seg_mask,
    storescu,
    wait_until,
    warm_model_cache,
)
from pydicom.uid import SegmentationStorage
from synthetic_dicom import random_volume, write_series

QUIET_SECONDS = 1.0
RESULT_TIMEOUT_S = 90.0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    need_binaries("echoscu", "storescu", "storescp")
    warm_model_cache()
    root = tmp_path_factory.mktemp("node_dcmtk")
    receiver = Storescp(root / "received", free_port(), root / "storescp.log")
    node = Node(root / "spool", free_port(), root / "node.log", "--quiet-seconds", str(QUIET_SECONDS),
                "--allowed-callers", "STORESCU,ECHOSCU", "--destination", receiver.destination)
    yield node, receiver, root
    node.stop()
    receiver.stop()


def segs_for(receiver: Storescp, series_uid: str) -> list[pydicom.Dataset]:
    return [ds for ds in receiver.received(SegmentationStorage)
            if ds.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid]


def job_for(node: Node, series_uid: str) -> dict:
    (job,) = [j for j in node.jobs() if j["series_key"] == series_uid]
    return job


def test_echo_answers_and_an_unknown_calling_ae_is_rejected(setup):
    node, _, _ = setup
    assert echoscu(node.port).returncode == 0
    rejected = echoscu(node.port, calling="INTRUDER")
    assert rejected.returncode != 0 and "Rejected" in rejected.stdout + rejected.stderr
    node.wait_for_log('calling_ae=INTRUDER address=127.0.0.1 reason="calling AE title not allowed"', 10)
    assert echoscu(node.port).returncode == 0


def test_series_from_storescu_comes_back_as_one_seg_of_its_mask(setup, tmp_path):
    node, receiver, _ = setup
    files = phantom_series(tmp_path / "ct", seed=1)
    sent = storescu(node.port, files)
    assert sent.returncode == 0, sent.stderr
    sources = sorted((pydicom.dcmread(f) for f in files), key=lambda ds: ds.InstanceNumber)
    series_uid = str(sources[0].SeriesInstanceUID)
    (seg,) = wait_until(lambda: segs_for(receiver, series_uid), RESULT_TIMEOUT_S, "the SEG at storescp")
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID and seg.SeriesInstanceUID != series_uid
    assert referenced_instances(seg) == {str(ds.SOPInstanceUID) for ds in sources}
    job = wait_until(lambda: job_for(node, series_uid)["state"] == "done" and job_for(node, series_uid),
                     10, "job done")
    assert (job["instances"], job["attempts"], job["results_sent"]) == (len(files), 1, 1)
    # The SEG holds the mask the node wrote beside it (the segment pipeline's NIfTI, LPS voxel order here).
    nifti = nib.load(node.spool / "results" / f"job-{job['id']:06d}" / "spleen.nii.gz")
    mask = np.asarray(nifti.dataobj)
    np.testing.assert_array_equal(seg_mask(seg, sources), mask)
    assert mask.sum() > 500  # the phantom's spleen was found


def test_non_ct_sop_class_is_refused_and_the_node_serves_on(setup, tmp_path):
    node, _, _ = setup
    mr = write_series(tmp_path / "mr", random_volume(shape=(8, 8, 2)), modality="MR")
    sent = storescu(node.port, mr, "STORESCU", "SPLEENSEG", "-R")  # -R: propose only the files' SOP classes
    assert sent.returncode != 0
    assert "No presentation context" in sent.stdout + sent.stderr or "no acceptable" in (sent.stdout + sent.stderr).lower()
    node.wait_for_log('refused_sop_classes="MR Image Storage"', 10)
    assert not [j for j in node.jobs() if j["study_uid"] == "1.2.3.4" and j["instances"] == 2]
    assert echoscu(node.port).returncode == 0


def test_corrupt_instance_fails_its_job_the_next_series_is_served_and_a_resend_retries(setup, tmp_path):
    node, receiver, _ = setup
    corrupt = phantom_series(tmp_path / "corrupt", seed=2)
    intact = corrupt[10].read_bytes()
    ds = pydicom.dcmread(corrupt[10])
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]  # half a slice: undecodable
    ds.save_as(corrupt[10])
    good = phantom_series(tmp_path / "good", seed=3)
    assert storescu(node.port, corrupt + good).returncode == 0
    corrupt_uid = str(pydicom.dcmread(corrupt[0]).SeriesInstanceUID)
    good_uid = str(pydicom.dcmread(good[0]).SeriesInstanceUID)
    failed = wait_until(lambda: job_for(node, corrupt_uid)["state"] == "failed" and job_for(node, corrupt_uid),
                        RESULT_TIMEOUT_S, "the corrupt series' job to fail")
    assert "cannot decode the pixels" in failed["last_error"]
    wait_until(lambda: segs_for(receiver, good_uid), RESULT_TIMEOUT_S, "the good series' SEG")
    assert segs_for(receiver, corrupt_uid) == []
    node.wait_for_log(f"event=job job={failed['id']} state=failed", 5)
    # The sender corrects the instance and sends the series again: the failed series is retried.
    corrupt[10].write_bytes(intact)
    assert storescu(node.port, corrupt).returncode == 0
    (seg,) = wait_until(lambda: segs_for(receiver, corrupt_uid), RESULT_TIMEOUT_S, "the retried series' SEG")
    assert referenced_instances(seg) == {str(pydicom.dcmread(f).SOPInstanceUID) for f in corrupt}


def test_anonymised_series_without_study_and_series_uids_is_processed_under_derived_ones(setup, tmp_path):
    """Study and Series Instance UIDs blank, as in the shared real series. (Its blank SOP Class
    and SOP Instance UIDs cannot travel: storescu finds no presentation context for them and
    Orthanc refuses them; a C-STORE without a SOP Instance UID is refused by the node.)"""
    node, receiver, _ = setup
    files = phantom_series(tmp_path / "anonymised", seed=5)
    sop_uids = set()
    for path in files:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = ds.SeriesInstanceUID = ""
        ds.save_as(path)
        sop_uids.add(str(ds.SOPInstanceUID))
    sent = storescu(node.port, files)
    assert sent.returncode == 0, sent.stdout + sent.stderr

    def seg_of_these() -> list[pydicom.Dataset]:
        return [ds for ds in receiver.received(SegmentationStorage) if referenced_instances(ds) == sop_uids]

    (seg,) = wait_until(seg_of_these, RESULT_TIMEOUT_S, "the SEG of the anonymised series")
    (job,) = [j for j in node.jobs() if j["study_uid"] == ""]
    assert job["instances"] == len(files) and pydicom.uid.UID(job["series_key"]).is_valid
    assert pydicom.uid.UID(seg.StudyInstanceUID).is_valid  # derived, as segment derives it
