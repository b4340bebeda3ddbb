"""DICOM folders as batch inputs: one input per CT volume, meaningful unique case ids, skips logged."""

import logging

import pydicom
from pydicom.uid import generate_uid
from synthetic_dicom import random_volume, write_dose_report, write_series

from spleen_seg.batch.inputs import collect_inputs, unique_case_ids


def test_split_series_get_one_case_each_named_by_acquisition(tmp_path, caplog):
    for seed, acquisition in ((1, 1), (2, 2)):
        write_series(tmp_path / "study" / "ct", random_volume(seed=seed), series_uid="1.2.3.100", series_number=4,
                     extra={"AcquisitionNumber": acquisition}, names=[f"a{acquisition}_{k}" for k in range(4)])
    write_series(tmp_path / "study" / "other", random_volume(seed=3), series_uid="", study_uid="", series_number="")
    paths = write_series(tmp_path / "study" / "ct", random_volume(seed=4, shape=(6, 5, 1)), series_uid="1.2.3.100",
                         series_number=4, extra={"AcquisitionNumber": 1}, positions=[0.0], names=["again"])
    original = pydicom.dcmread(tmp_path / "study" / "ct" / "a1_0")
    original.SOPInstanceUID = original.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    original.save_as(paths[0])  # the first slice of acquisition 1 again, under another UID
    write_dose_report(tmp_path / "study" / "dose" / "SR1")
    with caplog.at_level(logging.INFO, logger="spleen_seg.batch.inputs"):
        items = collect_inputs([tmp_path / "study"])
    ids = unique_case_ids(items)
    assert ids[:2] == ["ct_s4_a1", "ct_s4_a2"]
    assert ids[2].startswith("other_") and len(ids[2]) == len("other_") + 8  # no series number: a short UID
    # Skipped dose report and split series: info; duplicate slice and derived UIDs: warnings.
    assert sorted(record.levelno for record in caplog.records) == [logging.INFO, logging.INFO, logging.WARNING,
                                                                   logging.WARNING]
    messages = "\n".join(record.getMessage() for record in caplog.records)
    assert "X-Ray Radiation Dose SR Storage, not a CT image" in messages
    assert "identical pixels as" in messages and "split by AcquisitionNumber into 2 volumes" in messages
    assert "derived UIDs are used instead" in messages
