"""spleen-seg segment end to end: DICOM in / SEG out, reports, previews, summary.csv, the
anatomical check on real CT (issue 3). Each CLI run is shared by the tests that read it."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from shared_data import REAL_CT, YARDSTICK

from spleen_seg.batch.ownership import MARKER_FILENAME
from spleen_seg.cli import main
from spleen_seg.pipeline.network import demo_weights_path
from spleen_seg.training.phantom import make_phantom

REPO = Path(__file__).resolve().parents[2]

DICOM_FOLDER = REAL_CT.parent / "dicom_series"
PHANTOM_SEED = 11
# Slices 15..64 of the real CT: lower abdomen, below the spleen and above the pelvis.
NO_SPLEEN_SLICES = slice(15, 65)


def run_cli(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["-q", *map(str, args)])
    return code, out.getvalue(), err.getvalue()


def need_real_data() -> None:
    for path in (REAL_CT, YARDSTICK, DICOM_FOLDER):
        if not path.exists():
            pytest.skip(f"shared test data not found: {path} (only present beside the project checkout)")


def report(out: Path, case: str) -> dict:
    return json.loads((out / case / "report.json").read_text())


def summary(out: Path) -> list[dict[str, str]]:
    with (out / "summary.csv").open() as f:
        return list(csv.DictReader(f))


def save(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


# ------------------------------------------------------------------------------ DICOM


@pytest.fixture(scope="module")
def dicom_run(tmp_path_factory):
    need_real_data()
    out = tmp_path_factory.mktemp("dicom") / "out"
    code, stdout, stderr = run_cli(["segment", DICOM_FOLDER, "-o", out, "--weights", YARDSTICK, "--stl"])
    assert code == 0, stderr
    (case,) = [p for p in out.iterdir() if p.is_dir()]
    return out, case


def test_dicom_writes_seg_nifti_report_preview_stl(dicom_run):
    out, case = dicom_run
    assert case.name.startswith("dicom_series_")
    assert sorted(p.name for p in case.iterdir()) == [MARKER_FILENAME, "preview.png", "preview_thumb.jpg", "report.json",
                                                      "spleen.nii.gz", "spleen.stl", "spleen_seg.dcm"]
    data = report(out, case.name)
    mask = np.asarray(nib.load(str(case / "spleen.nii.gz")).dataobj)
    assert data["spleen_found"] is True and data["voxel_count"] == int(mask.sum())
    assert data["input_geometry"]["shape"] == [512, 512, 20]
    assert data["input_geometry"]["orientation"] == "LPS"
    assert data["probable_header_flip"] is False
    assert set(data["timings_s"]) >= {"read", "segment", "write_nifti", "write_dicom_seg", "write_stl", "preview"}
    assert [row["status"] for row in summary(out)] == ["ok"]


def test_dicom_seg_equals_nifti_mask_voxel_for_voxel(dicom_run):
    import highdicom as hd
    import pydicom

    from spleen_seg.io.dicom import find_series

    out, case = dicom_run
    nifti = nib.load(str(case / "spleen.nii.gz"))
    mask = np.asarray(nifti.dataobj)
    seg = hd.seg.segread(case / "spleen_seg.dcm")
    assert seg.SegmentSequence[0].SegmentLabel == "Spleen"
    (series,), _ = find_series(DICOM_FOLDER)
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in series.files]
    assert len(sources) == mask.shape[2]
    # Slice k of the NIfTI grid sits where source file k sits (LPS = RAS with x, y negated).
    lps_origins = [np.diag([-1, -1, 1]) @ (nifti.affine @ [0, 0, k, 1])[:3] for k in range(mask.shape[2])]
    for k, ds in enumerate(sources):
        np.testing.assert_allclose(lps_origins[k], np.asarray(ds.ImagePositionPatient, float), atol=1e-3)
    decoded = np.zeros_like(mask)
    frames = seg.pixel_array  # (frames, rows, columns)
    for frame, groups in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        position = np.asarray(groups.PlanePositionSequence[0].ImagePositionPatient, float)
        (k,) = [k for k, origin in enumerate(lps_origins) if np.allclose(origin, position, atol=1e-3)]
        referenced = groups.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        # The shared files carry empty SOP Instance UIDs (anonymised): the SEG then references derived ones.
        assert referenced and referenced == (sources[k].get("SOPInstanceUID") or referenced)
        decoded[:, :, k] = frame.T
    np.testing.assert_array_equal(decoded, mask)
    assert int(decoded.sum()) > 0


# ------------------------------------------------------------------------------ real CT


@pytest.fixture(scope="module")
def real_batch(tmp_path_factory):
    """One batch: the real CT, the same CT with an MSD-flipped header, a crop with no spleen."""
    need_real_data()
    folder = tmp_path_factory.mktemp("real")
    image = nib.load(str(REAL_CT))
    voxels = np.asarray(image.dataobj)
    flipped = image.affine.copy()
    flipped[:2, :] *= -1  # the header claims the opposite x and y directions; voxels unchanged
    save(folder / "msd_flipped.nii.gz", voxels, flipped)
    crop_affine = image.affine.copy()
    crop_affine[:3, 3] += image.affine[:3, 2] * NO_SPLEEN_SLICES.start
    save(folder / "no_spleen.nii.gz", np.ascontiguousarray(voxels[:, :, NO_SPLEEN_SLICES]), crop_affine)
    out = folder / "out"
    code, stdout, stderr = run_cli(["segment", REAL_CT, folder / "msd_flipped.nii.gz", folder / "no_spleen.nii.gz",
                                    "-o", out, "--weights", YARDSTICK])
    return code, stdout, stderr, out


def test_real_ct_passes_anatomical_check(real_batch):
    code, _, _, out = real_batch
    assert code == 0
    data = report(out, "ct_abdomen_3mm")
    assert data["probable_header_flip"] is False
    assert data["anatomy"]["on_patient_left"] and data["anatomy"]["posterior"]
    assert data["model"]["orientation_convention"] == "true"
    mask_image = nib.load(str(out / "ct_abdomen_3mm" / "spleen.nii.gz"))
    voxel_ml = abs(np.linalg.det(mask_image.affine[:3, :3])) / 1000.0
    assert data["volume_ml"] == int(np.asarray(mask_image.dataobj).sum()) * voxel_ml
    assert data["volume_ml"] == pytest.approx(264.1, abs=3.0)  # reference mask: 261.3 mL
    assert data["splenomegaly"]["flag"] is False and data["splenomegaly"]["threshold_ml"] == 314.5
    assert data["touches_border"] is True  # the CT's top slice cuts through the spleen


def test_msd_flipped_header_is_flagged_with_a_warning(real_batch):
    code, _, stderr, out = real_batch
    data = report(out, "msd_flipped")
    assert data["probable_header_flip"] is True
    assert "probable_header_flip" in data["flags"]
    assert "warning: msd_flipped: probable_header_flip" in stderr
    assert "warning: ct_abdomen_3mm: probable_header_flip" not in stderr


def test_ct_without_spleen_reports_not_found_and_exits_0(real_batch):
    code, stdout, _, out = real_batch
    assert code == 0
    data = report(out, "no_spleen")
    assert data["spleen_found"] is False and data["volume_ml"] == 0.0 and "not found" in data["message"]
    assert int(np.asarray(nib.load(str(out / "no_spleen" / "spleen.nii.gz")).dataobj).sum()) == 0
    assert (out / "no_spleen" / "preview.png").is_file()
    assert "no_spleen.nii.gz: spleen not found" in stdout


def test_real_batch_summary_rows(real_batch):
    _, _, _, out = real_batch
    rows = summary(out)
    assert [(r["case"], r["status"]) for r in rows] == [("ct_abdomen_3mm", "ok"), ("msd_flipped", "ok"),
                                                        ("no_spleen", "not_found")]
    assert float(rows[0]["volume_ml"]) == pytest.approx(report(out, "ct_abdomen_3mm")["volume_ml"], abs=1e-3)
    assert "probable_header_flip" in rows[1]["flags"].split(";")
    assert rows[2]["volume_ml"] == "0.000" and rows[2]["extent_left_right_mm"] == ""


def test_largest_component_removes_the_extra_component(real_batch, tmp_path):
    _, _, _, out_all = real_batch
    everything = report(out_all, "ct_abdomen_3mm")
    # The yardstick also marks a few voxels in the pelvis, far from the spleen.
    assert everything["components_found"] >= 2 and everything["components_kept"] == everything["components_found"]
    code, _, stderr = run_cli(["segment", REAL_CT, "-o", tmp_path, "--weights", YARDSTICK, "--largest-component"])
    assert code == 0, stderr
    largest = report(tmp_path, "ct_abdomen_3mm")
    assert largest["components_found"] == everything["components_found"] and largest["components_kept"] == 1
    kept = np.asarray(nib.load(str(tmp_path / "ct_abdomen_3mm" / "spleen.nii.gz")).dataobj)
    full = np.asarray(nib.load(str(out_all / "ct_abdomen_3mm" / "spleen.nii.gz")).dataobj)
    from scipy import ndimage

    labels, _ = ndimage.label(full, structure=np.ones((3, 3, 3)))
    biggest = np.argmax(np.bincount(labels.ravel())[1:]) + 1
    np.testing.assert_array_equal(kept, (labels == biggest).astype(np.uint8))
    assert largest["voxel_count"] < everything["voxel_count"]
    assert largest["extents_mm"]["superior_inferior"] < everything["extents_mm"]["superior_inferior"]


# ------------------------------------------------------------------------------ phantoms


@pytest.fixture(scope="module")
def phantom_batch(tmp_path_factory):
    """The same phantom stored RAS and LPS, and a copy whose spleen is replaced by fat."""
    folder = tmp_path_factory.mktemp("phantoms")
    for orientation in ("RAS", "LPS"):
        case = make_phantom(PHANTOM_SEED, orientation=orientation)
        save(folder / f"phantom_{orientation.lower()}.nii.gz", case.image_hu, case.affine)
    ras = make_phantom(PHANTOM_SEED, orientation="RAS")
    no_spleen = ras.image_hu.copy()
    no_spleen[ras.spleen_mask > 0] = -100
    save(folder / "phantom_no_spleen.nii.gz", no_spleen, ras.affine)
    out = folder / "out"
    code, stdout, stderr = run_cli(["segment", folder, "-o", out, "--weights", demo_weights_path()])
    return code, stderr, out


def test_lps_and_ras_give_identical_reports(phantom_batch):
    code, stderr, out = phantom_batch
    assert code == 0, stderr
    ras, lps = report(out, "phantom_ras"), report(out, "phantom_lps")
    assert ras["input_geometry"]["orientation"] == "RAS" and lps["input_geometry"]["orientation"] == "LPS"
    assert ras["spleen_found"] and ras["voxel_count"] == lps["voxel_count"] > 0
    assert lps["volume_ml"] == pytest.approx(ras["volume_ml"], rel=1e-12)
    for axis, value in ras["extents_mm"].items():
        assert lps["extents_mm"][axis] == pytest.approx(value, abs=1e-6)
    assert lps["hu_mean"] == pytest.approx(ras["hu_mean"], abs=1e-6)
    assert lps["hu_std"] == pytest.approx(ras["hu_std"], abs=1e-6)
    np.testing.assert_allclose(lps["anatomy"]["spleen_centroid_ras_mm"], ras["anatomy"]["spleen_centroid_ras_mm"],
                               atol=1e-3)
    assert ras["probable_header_flip"] is False and lps["probable_header_flip"] is False


def test_phantom_report_volume_is_voxel_count_times_voxel_volume(phantom_batch):
    _, _, out = phantom_batch
    for case in ("phantom_ras", "phantom_lps"):
        image = nib.load(str(out / case / "spleen.nii.gz"))
        count = int(np.asarray(image.dataobj).sum())
        data = report(out, case)
        assert data["voxel_count"] == count
        assert data["volume_ml"] == count * abs(np.linalg.det(image.affine[:3, :3])) / 1000.0


def test_phantom_without_spleen_is_not_found(phantom_batch):
    code, _, out = phantom_batch
    assert code == 0
    data = report(out, "phantom_no_spleen")
    assert data["spleen_found"] is False and data["components_found"] == 0
    rows = {r["case"]: r for r in summary(out)}
    assert [rows[c]["status"] for c in ("phantom_lps", "phantom_no_spleen", "phantom_ras")] == ["ok", "not_found", "ok"]


def test_failed_inputs_exit_2_with_failed_rows(tmp_path):
    rng = np.random.default_rng(0)
    mr = save(tmp_path / "mr_like.nii.gz", rng.uniform(0, 4000, (40, 40, 20)).astype(np.float32), np.diag([2, 2, 4, 1.0]))
    missing = tmp_path / "missing.nii.gz"
    code, _, stderr = run_cli(["segment", mr, missing, "-o", tmp_path / "out", "--weights", demo_weights_path(),
                               "--strict"])
    assert code == 2
    assert "--strict" in stderr and "missing.nii.gz: file not found" in stderr
    rows = summary(tmp_path / "out")
    assert [(r["case"], r["status"]) for r in rows] == [("mr_like", "failed"), ("missing", "failed")]
    assert "does not look like CT" in rows[0]["error"] or "do not look like CT" in rows[0]["error"]
    assert not (tmp_path / "out" / "mr_like").exists()
