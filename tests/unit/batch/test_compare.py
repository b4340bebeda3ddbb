"""spleen-seg compare's library call: volumes and change of two balls of known size, the growth flag and its
threshold, the side-by-side preview, reuse of OUT's segmentations, and the patient check on DICOM series.

A threshold stands in for the network (``load_segmenter`` is replaced): what is tested is the
bookkeeping and the measurement, in well under a second per comparison.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from synthetic_dicom import write_series
from threshold_network import SPLEEN_HU, install_threshold_network, sphere

from spleen_seg.batch.case import SegmentOptions
from spleen_seg.batch.compare import compare_followup
from spleen_seg.errors import ConfigError, ForeignOutputError
from spleen_seg.outputs.compare import COMPARE_FILENAME, COMPARE_PREVIEW_FILENAME, level_slices

VOXEL_ML = 1.5 * 1.5 * 2.0 / 1000.0  # sphere()'s voxels
FAST = SegmentOptions(preview=False)


def _ball_voxels(radius_vox: float, shape=(24, 22, 16)) -> int:
    grid = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij"))
    return int(((grid**2).sum(0) <= radius_vox**2).sum())


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_bytes(b"stand-in weights")
    return path


def test_volume_change_flag_preview_and_reuse(tmp_path, monkeypatch, weights):
    network = install_threshold_network(monkeypatch)
    prior, current = sphere(tmp_path / "prior.nii.gz", 5), sphere(tmp_path / "current.nii.gz", 6)
    out = tmp_path / "out"
    result = compare_followup(prior, current, out, weights, "cpu", progress=False, options=FAST)
    prior_ml, current_ml = _ball_voxels(5) * VOXEL_ML, _ball_voxels(6) * VOXEL_ML
    record = json.loads((out / COMPARE_FILENAME).read_text())
    assert record["prior"]["volume_ml"] == pytest.approx(prior_ml) and record["current"]["volume_ml"] == pytest.approx(current_ml)
    assert record["change_ml"] == pytest.approx(current_ml - prior_ml)
    assert record["change_percent"] == pytest.approx(100 * (current_ml - prior_ml) / prior_ml)
    assert record["change_percent"] > 50 and record["growth_flag"] and record["growth_threshold_percent"] == 10.0
    assert record["patient_check"] == "not checked" and "no PatientID" in record["warnings"][0]
    for role in ("prior", "current"):
        assert (out / role / "report.json").is_file() and record[role]["report"] == str(out / role / "report.json")
    with Image.open(out / COMPARE_PREVIEW_FILENAME) as image:
        assert image.format == "PNG" and image.width > 1000
    assert result.reused == (False, False) and network.loads == 1
    # Again with a higher threshold: both segmentations reused, only the flag changes.
    again = compare_followup(prior, current, out, weights, "cpu", progress=False, options=FAST,
                             growth_threshold_percent=200.0)
    assert again.reused == (True, True) and network.loads == 1
    assert not again.comparison.growth_flag and again.comparison.change_ml == pytest.approx(current_ml - prior_ml)


def test_a_scan_without_spleen_gives_no_change(tmp_path, monkeypatch, weights):
    install_threshold_network(monkeypatch)
    prior = sphere(tmp_path / "prior.nii.gz", 5)
    ball = np.asarray(nib.load(str(prior)).dataobj)
    current = tmp_path / "none.nii.gz"  # the same ball below the threshold's HU: nothing segmented
    nib.save(nib.Nifti1Image(np.where(ball > 0, 60.0, ball).astype(np.float32), np.diag([1.5, 1.5, 2.0, 1.0])),
             str(current))
    result = compare_followup(prior, current, tmp_path / "out", weights, "cpu", progress=False, options=FAST)
    assert result.comparison.change_ml is None and not result.comparison.growth_flag
    assert "spleen not found in the current scan" in result.comparison.warnings[-1]


def _dicom_ball(folder, patient_id: str, radius_vox: float, study_date: str):
    grid = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in (24, 22, 16)], indexing="ij"))
    hu = np.where((grid**2).sum(0) <= radius_vox**2, SPLEEN_HU, -100.0).astype(np.float32)
    write_series(folder, hu, extra={"PatientID": patient_id, "StudyDate": study_date})
    return folder


def test_dicom_series_of_different_patients_are_refused_unless_forced(tmp_path, monkeypatch, weights):
    network = install_threshold_network(monkeypatch)
    prior = _dicom_ball(tmp_path / "p1", "P1", 5, "20240101")
    other = _dicom_ball(tmp_path / "p2", "P2", 6, "20240301")
    with pytest.raises(ConfigError, match=r"different patients \(PatientID 'P1' and 'P2'\).*--force"):
        compare_followup(prior, other, tmp_path / "out", weights, "cpu", progress=False, options=FAST)
    assert network.loads == 0 and not (tmp_path / "out").exists()  # refused before anything ran
    forced = compare_followup(prior, other, tmp_path / "out", weights, "cpu", progress=False, options=FAST, force=True)
    assert forced.comparison.patient_check == "different PatientIDs, compared with --force"
    assert forced.comparison.interval_days == 60 and forced.comparison.change_percent is not None
    same = _dicom_ball(tmp_path / "p1_later", "P1", 6, "20240301")
    result = compare_followup(prior, same, tmp_path / "out2", weights, "cpu", progress=False, options=FAST)
    assert result.comparison.patient_check == "same PatientID (P1)" and not result.comparison.warnings
    assert result.comparison.current.patient["StudyDate"] == "20240301"


def test_levels_are_relative_to_each_spleens_extent():
    mask = np.zeros((4, 4, 40), dtype=np.uint8)
    mask[:, :, 10:31] = 1  # slices 10..30
    assert level_slices(mask) == [15, 20, 25]
    assert level_slices(np.zeros((4, 4, 9), dtype=np.uint8)) == [4, 4, 4]


def test_a_compare_json_or_png_of_someone_else_is_left_as_it_is(tmp_path, monkeypatch, weights):
    """OUT holds a user's compare.json, then a user's compare.png: refused before anything is
    computed or written; an earlier run's pair (a preview from before the mark) is replaced."""
    network = install_threshold_network(monkeypatch)
    prior, current = sphere(tmp_path / "prior.nii.gz", 5), sphere(tmp_path / "current.nii.gz", 6)
    out = tmp_path / "out"
    out.mkdir()
    theirs = {COMPARE_FILENAME: b'{"notes": "mine"}\n',
              COMPARE_PREVIEW_FILENAME: b"\x89PNG\r\n\x1a\n" + bytes(200)}  # a PNG spleen-seg did not write
    for name, data in theirs.items():
        (out / name).write_bytes(data)
        with pytest.raises(ForeignOutputError, match=f"{out / name} exists and is not a comparison"):
            compare_followup(prior, current, out, weights, "cpu", progress=False, options=FAST)
        assert (out / name).read_bytes() == data and sorted(p.name for p in out.iterdir()) == [name]
        assert network.loads == 0  # refused before the model loaded
        (out / name).unlink()
    compare_followup(prior, current, out, weights, "cpu", progress=False, options=FAST)
    assert b"spleen-seg compare" in (out / COMPARE_PREVIEW_FILENAME).read_bytes()[:4096]
    # A preview written before the mark existed, beside this program's record: replaced
    with Image.open(out / COMPARE_PREVIEW_FILENAME) as image:
        image.save(out / COMPARE_PREVIEW_FILENAME, format="PNG")  # PIL drops the Software chunk
    assert b"spleen-seg compare" not in (out / COMPARE_PREVIEW_FILENAME).read_bytes()[:4096]
    compare_followup(prior, current, out, weights, "cpu", progress=False, options=FAST)
    assert b"spleen-seg compare" in (out / COMPARE_PREVIEW_FILENAME).read_bytes()[:4096]
