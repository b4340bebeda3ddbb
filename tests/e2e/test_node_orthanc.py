"""Orthanc as the PACS: a series uploaded by REST is sent to the node by Orthanc
(``POST /modalities/<name>/store``), and the SEG, volume SR and preview Secondary Capture come
back into the same study by C-STORE; a second Orthanc receives them by STOW-RS (DICOMweb).

The SEG found in Orthanc (``POST /tools/find``) references the series, and its pixels equal the
mask ``spleen-seg segment`` writes for the same files; the SR's volume equals its report's.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from node_harness import (
    DICOMWEB_PLUGIN,
    ORTHANC,
    Node,
    Orthanc,
    Process,
    free_port,
    need_binaries,
    phantom_series,
    seg_mask,
    wait_until,
    warm_model_cache,
)
from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage, SegmentationStorage

from spleen_seg.pipeline.network import demo_weights_path

QUIET_SECONDS = 1.0
RESULT_TIMEOUT_S = 120.0
CLI_TIMEOUT_S = 300


def instances_of(pacs: Orthanc, study_id: str) -> dict[str, pydicom.Dataset]:
    """The study's instances in Orthanc by SOP Class UID (one each expected), as DICOM files."""
    found: dict[str, pydicom.Dataset] = {}
    for instance in pacs.get(f"/studies/{study_id}/instances"):
        ds = pydicom.dcmread(io.BytesIO(pacs.instance_file(instance["ID"])))
        if ds.SOPClassUID != "1.2.840.10008.5.1.4.1.1.2":
            assert ds.SOPClassUID not in found, f"two {ds.SOPClassUID.name} in the study"
            found[str(ds.SOPClassUID)] = ds
    return found


def test_orthanc_round_trip_seg_sr_and_secondary_capture(tmp_path):
    need_binaries(ORTHANC, str(DICOMWEB_PLUGIN))
    warm_model_cache()
    files = phantom_series(tmp_path / "ct", seed=4)
    node_port = free_port()
    with contextlib.ExitStack() as started:  # everything started here is stopped by PID on the way out
        # What `segment` makes of the same files, computed meanwhile: the node's SEG must equal it.
        cli_out = tmp_path / "cli"
        cli = Process([sys.executable, "-m", "spleen_seg.cli", "-q", "segment", str(tmp_path / "ct"), "-o",
                       str(cli_out), "--weights", str(demo_weights_path())], tmp_path / "cli.log")
        started.callback(cli.stop)
        pacs = Orthanc(tmp_path / "pacs", {"spleenseg": ["SPLEENSEG", "127.0.0.1", node_port]})
        started.callback(pacs.stop)
        web = Orthanc(tmp_path / "web", {}, dicomweb=True, ae_title="WEBPACS")
        started.callback(web.stop)
        node = Node(tmp_path / "spool", node_port, tmp_path / "node.log", "--quiet-seconds", str(QUIET_SECONDS),
                    "--allowed-callers", pacs.ae_title, "--destination", f"{pacs.ae_title}@127.0.0.1:{pacs.dicom_port}",
                    "--stow-url", f"{web.url}/dicom-web", "--send-report")
        started.callback(node.stop)

        series_id = pacs.upload(files)
        study_id = pacs.get(f"/series/{series_id}")["ParentStudy"]
        pacs.post("/modalities/spleenseg/store", {"Resources": [series_id], "Synchronous": True})
        seg_ids = wait_until(lambda: pacs.find("SEG"), RESULT_TIMEOUT_S, "a SEG in Orthanc")
        wait_until(lambda: node.jobs() and node.jobs()[0]["state"] == "done", RESULT_TIMEOUT_S,
                   "the node's job to be done (sent to both targets)")
        returned = instances_of(pacs, study_id)
        stowed_classes = {pydicom.dcmread(io.BytesIO(web.instance_file(i)), stop_before_pixels=True).SOPClassUID
                          for i in web.get("/instances")}
        assert cli.popen.wait(timeout=CLI_TIMEOUT_S) == 0, cli.text()[-3000:]

    (job,) = node.jobs()
    assert (job["instances"], job["results_sent"], len(job["results"])) == (len(files), 6, 6)  # 3 results x 2 targets
    assert len(seg_ids) == 1 and set(returned) == {SegmentationStorage, Comprehensive3DSRStorage,
                                                   SecondaryCaptureImageStorage}
    assert stowed_classes == set(returned)
    seg, sr = returned[SegmentationStorage], returned[Comprehensive3DSRStorage]
    sources = sorted((pydicom.dcmread(f) for f in files), key=lambda ds: ds.InstanceNumber)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID

    (case,) = [p for p in cli_out.iterdir() if p.is_dir()]
    cli_mask = np.asarray(nib.load(case / "spleen.nii.gz").dataobj)
    np.testing.assert_array_equal(seg_mask(seg, sources), cli_mask)
    assert cli_mask.sum() > 500

    report = hd.sr.Comprehensive3DSR.from_dataset(sr)
    (group,) = report.content.get_volumetric_roi_measurement_groups()
    (volume,) = group.get_measurements()
    assert volume.value == pytest.approx(json.loads((case / "report.json").read_text())["volume_ml"], rel=1e-6)
    assert group.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID
