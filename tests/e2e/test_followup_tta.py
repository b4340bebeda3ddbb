"""Issue 10 through the CLI with the demo weights: ``segment --tta-axes`` and its quality score, and
``compare`` of two DICOM phantom series of known spleen volumes (refused as different patients,
then forced; a rerun reuses both segmentations)."""

from __future__ import annotations

import csv
import json
import sys
import time

import nibabel as nib
import numpy as np
import pytest
from synthetic_dicom import write_phantom_series

from spleen_seg.pipeline.network import demo_weights_path
from spleen_seg.pipeline.tta import FLAG_TTA_UNTRAINED
from spleen_seg.training.evaluate import dice

CLI = [sys.executable, "-m", "spleen_seg.cli"]
WEIGHTS = ["--weights", str(demo_weights_path())]
MIN_DICE = 0.85
# Segmented volumes of these phantoms are within a few percent of the truth; allow 10 %.
VOLUME_RTOL = 0.10
PRIOR_SEED, CURRENT_SEED = 1, 2  # spleens of 117.8 and 203.3 mL at the e2e geometry
REFUSAL_MAX_S = 15.0  # refused before any model loads


def test_segment_with_flip_tta_records_the_disagreement_score(phantom, write_nifti, run_command, tail, tmp_path):
    case = phantom(PRIOR_SEED, "RAS")
    scan = write_nifti(case.image_hu.astype(np.int16), case.affine, tmp_path / "scan.nii.gz")
    out = tmp_path / "out"
    proc = run_command([*CLI, "segment", str(scan), "-o", str(out), *WEIGHTS, "--tta-axes", "z", "-q"])
    assert proc.returncode == 0, tail(proc)
    report = json.loads((out / "scan" / "report.json").read_text())
    quality = report["quality"]
    assert quality["method"] == "flips_and_margin" and quality["predictions"] == 2
    assert 0 <= quality["disagreeing_voxels"] <= quality["unsure_voxels"]
    assert 0.0 <= quality["score"] < 1.0 and quality["region_voxels"] > 1000
    assert report["identity"]["options"]["tta_axes"] == "z"
    # The demo weights were trained without flips (no record says otherwise): named axes run, with a warning.
    (warning,) = [w for w in report["warnings"] if w.startswith(FLAG_TTA_UNTRAINED)]
    assert f"flip TTA along z, but {demo_weights_path()} were not trained with flips" in warning
    assert f"warning: scan: {warning}" in proc.stderr.splitlines()
    mask = np.asarray(nib.load(str(out / "scan" / "spleen.nii.gz")).dataobj)
    assert dice(mask, case.spleen_mask) >= MIN_DICE
    with (out / "summary.csv").open(newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["quality_score"]) == pytest.approx(quality["score"], abs=1e-4)
    assert row["review_suggested"] == ("yes" if quality["review_suggested"] else "no")
    # Without TTA the identity differs: the case is computed again, with the margin score.
    proc = run_command([*CLI, "segment", str(scan), "-o", str(out), *WEIGHTS, "-q"])
    assert proc.returncode == 0 and "skipped" not in proc.stdout, tail(proc)
    assert json.loads((out / "scan" / "report.json").read_text())["quality"]["method"] == "margin"


@pytest.mark.parametrize("command", ["segment", "compare"])
def test_plain_tta_is_refused_in_one_line_before_any_model_loads(command, phantom, write_nifti, run_command, tail,
                                                                 tmp_path):
    case = phantom(PRIOR_SEED, "RAS")
    scan = write_nifti(case.image_hu.astype(np.int16), case.affine, tmp_path / "scan.nii.gz")
    out = tmp_path / "out"
    inputs = [str(scan)] if command == "segment" else [str(scan), str(scan)]
    start = time.monotonic()
    proc = run_command([*CLI, command, *inputs, "-o", str(out), *WEIGHTS, "--tta", "-q"])
    assert proc.returncode == 2, tail(proc)
    assert time.monotonic() - start < REFUSAL_MAX_S and not out.exists()
    (line,) = [line for line in proc.stderr.splitlines() if "Warning" not in line]
    assert line.startswith(f"error: --tta refused: {demo_weights_path()} were not trained with flips (no record")
    assert "--tta-axes" in line


def test_compare_two_dicom_phantoms(phantom, run_command, tail, tmp_path):
    truth = {}
    for role, seed, patient in (("prior", PRIOR_SEED, "P1"), ("current", CURRENT_SEED, "P2")):
        case = phantom(seed, "LPS")
        write_phantom_series(tmp_path / role, case, extra={"PatientID": patient, "StudyDate": f"2024{seed:02d}01"})
        truth[role] = float(case.spleen_mask.sum()) * float(abs(np.linalg.det(case.affine[:3, :3]))) / 1000.0
    out = tmp_path / "out"
    args = [*CLI, "compare", str(tmp_path / "prior"), str(tmp_path / "current"), "-o", str(out), *WEIGHTS, "-q"]
    start = time.monotonic()
    proc = run_command(args)
    assert proc.returncode == 2 and "different patients (PatientID 'P1' and 'P2')" in proc.stderr, tail(proc)
    assert time.monotonic() - start < REFUSAL_MAX_S and not out.exists()

    proc = run_command([*args, "--force", "--growth-threshold-percent", "25"])
    assert proc.returncode == 0, tail(proc)
    record = json.loads((out / "compare.json").read_text())
    for role in ("prior", "current"):
        assert record[role]["volume_ml"] == pytest.approx(truth[role], rel=VOLUME_RTOL), role
        assert record[role]["patient"]["PatientID"] == ("P1" if role == "prior" else "P2")
        assert (out / role / "report.json").is_file() and (out / role / "spleen_seg.dcm").is_file()
    true_percent = 100.0 * (truth["current"] - truth["prior"]) / truth["prior"]
    assert record["change_percent"] == pytest.approx(true_percent, abs=15.0)
    assert record["growth_flag"] and record["growth_threshold_percent"] == 25.0 and record["interval_days"] == 31
    assert f"change {record['change_ml']:+.1f} mL ({record['change_percent']:+.1f} %); growth above 25 %: FLAGGED" \
        in proc.stdout
    assert "warning: different patients compared (--force)" in proc.stderr
    assert (out / "compare.png").stat().st_size > 20_000

    proc = run_command([*args, "--force", "--growth-threshold-percent", "100"])
    assert proc.returncode == 0, tail(proc)
    assert "reused the prior scan's segmentation" in proc.stdout and "reused the current scan's" in proc.stdout
    again = json.loads((out / "compare.json").read_text())
    assert not again["growth_flag"] and again["change_ml"] == pytest.approx(record["change_ml"])
