"""report.py: components, volumes, extents, the anatomical check, intensity checks, summary.csv."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from spleen_seg.batch.summary import SummaryRow, write_summary
from spleen_seg.errors import InputImageError
from spleen_seg.io.nifti import Geometry, read_volume
from spleen_seg.outputs.report import (
    SPLENOMEGALY_THRESHOLD_ML,
    anatomical_check,
    build_report,
    check_geometry,
    check_intensity,
    extents_mm,
    intensity_warning,
    keep_components,
    touches_border,
)

SPACING = (2.0, 1.5, 3.0)


def msd_flip(affine: np.ndarray) -> np.ndarray:
    """The header MSD Task09 gives LPS-stored voxels: world x and y mirrored, voxels kept."""
    flipped = np.array(affine, dtype=np.float64)
    flipped[:2, :] *= -1
    return flipped


def lps_version(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same image stored LPS: voxels reversed along x and y, affine adjusted (same world)."""
    shape = array.shape
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = shape[0] - 1, shape[1] - 1
    return np.ascontiguousarray(array[::-1, ::-1]), affine @ flip


def body_with_spleen(shape=(40, 36, 20)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RAS image: air, an elliptic body (40 HU), a spleen box at the patient's left-posterior."""
    x, y, _ = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    cx, cy = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    image = np.full(shape, -1000.0, dtype=np.float32)
    image[((x - cx) / 17) ** 2 + ((y - cy) / 15) ** 2 <= 1] = 40.0
    mask = np.zeros(shape, dtype=np.uint8)
    mask[8:14, 9:15, 6:13] = 1  # small x = patient's left, small y = posterior in RAS
    image[mask > 0] = 50.0
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = (-40.0, -27.0, 100.0)
    return image, mask, affine


def test_components_26_connected_and_largest_kept():
    mask = np.zeros((12, 12, 12), np.uint8)
    mask[1:4, 1:4, 1:4] = 1  # 27 voxels
    mask[4, 4, 4] = 1  # touches the cube only by a corner: same component under 26-connectivity
    mask[8:10, 8:10, 8:10] = 1  # planted extra component, 8 voxels
    found = keep_components(mask, largest_only=False)
    assert (found.found, found.kept, found.voxels_per_component) == (2, 2, [28, 8])
    np.testing.assert_array_equal(found.mask, mask)
    largest = keep_components(mask, largest_only=True)
    assert (largest.found, largest.kept) == (2, 1)
    assert int(largest.mask.sum()) == 28 and largest.mask[8:10, 8:10, 8:10].sum() == 0
    empty = keep_components(np.zeros((4, 4, 4), np.uint8), largest_only=True)
    assert (empty.found, empty.kept, int(empty.mask.sum())) == (0, 0, 0)


def test_volume_is_voxel_count_times_voxel_volume():
    image, mask, affine = body_with_spleen()
    geometry = Geometry(shape=image.shape, affine_ras=affine)
    report = build_report("c", "src", mask, image, geometry, keep_components(mask, False))
    assert report.voxel_count == 6 * 6 * 7
    assert report.volume_ml == report.voxel_count * geometry.voxel_volume_ml
    assert report.volume_ml == pytest.approx(252 * 2.0 * 1.5 * 3.0 / 1000.0, rel=1e-12)
    assert report.extents_mm == {"left_right": 12.0, "anterior_posterior": 9.0, "superior_inferior": 21.0}
    assert (report.hu_mean, report.hu_std) == (50.0, 0.0)
    assert report.spleen_found and not report.touches_border and not report.probable_header_flip
    assert report.splenomegaly["flag"] is False
    assert report.splenomegaly["threshold_ml"] == SPLENOMEGALY_THRESHOLD_ML
    assert "Linguraru" in report.splenomegaly["citation"] and "Acad Radiol" in report.splenomegaly["citation"]
    data = json.loads(report.to_json())
    assert data["spleen_found"] is True and data["flags"] == []
    assert data["input_geometry"]["orientation"] == "RAS"


def test_lps_and_ras_give_identical_numbers():
    image, mask, affine = body_with_spleen()
    lps_image, lps_affine = lps_version(image, affine)
    lps_mask, _ = lps_version(mask, affine)
    assert "".join(nib.aff2axcodes(lps_affine)) == "LPS"
    ras = build_report("c", "s", mask, image, Geometry(image.shape, affine), keep_components(mask, False))
    lps = build_report("c", "s", lps_mask, lps_image, Geometry(image.shape, lps_affine), keep_components(lps_mask, False))
    assert lps.volume_ml == ras.volume_ml and lps.extents_mm == ras.extents_mm
    assert lps.hu_mean == ras.hu_mean and lps.hu_std == ras.hu_std
    assert lps.anatomy["spleen_centroid_ras_mm"] == ras.anatomy["spleen_centroid_ras_mm"]
    assert lps.probable_header_flip is False


def test_extents_of_an_oblique_grid_use_world_coordinates():
    mask = np.zeros((5, 5, 5), np.uint8)
    mask[1:4, 2, 2] = 1  # 3 voxels along i
    theta = np.deg2rad(90)
    affine = np.eye(4)
    affine[:2, :2] = [[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]  # i runs along world y
    spans = extents_mm(mask, affine)
    assert spans["anterior_posterior"] == pytest.approx(3.0)
    assert spans["left_right"] == pytest.approx(1.0)


def test_touches_border():
    mask = np.zeros((5, 5, 5), np.uint8)
    mask[2, 2, 2] = 1
    assert not touches_border(mask)
    mask[2, 2, 4] = 1
    assert touches_border(mask)


def test_empty_mask_reports_not_found():
    image, mask, affine = body_with_spleen()
    empty = np.zeros_like(mask)
    report = build_report("c", "s", empty, image, Geometry(image.shape, affine), keep_components(empty, False))
    data = json.loads(report.to_json())
    assert data["spleen_found"] is False and data["volume_ml"] == 0.0 and data["extents_mm"] is None
    assert "not found" in data["message"] and data["message"] in data["warnings"]
    assert data["probable_header_flip"] is False


def test_msd_flipped_header_is_flagged_on_synthetic_body():
    image, mask, affine = body_with_spleen()
    assert not anatomical_check(mask, image, affine).probable_header_flip
    flipped = anatomical_check(mask, image, msd_flip(affine))
    assert flipped.probable_header_flip and not flipped.on_patient_left and not flipped.posterior
    report = build_report("c", "s", mask, image, Geometry(image.shape, msd_flip(affine)), keep_components(mask, False))
    assert report.probable_header_flip and "probable_header_flip" in report.flags
    assert any(w.startswith("probable_header_flip") for w in report.warnings)


def test_intensity_check_flags_mr_like_images_and_strict_refuses():
    rng = np.random.default_rng(0)
    mr = rng.uniform(0, 4000, size=(30, 30, 10)).astype(np.float32)
    assert "non_ct_intensity" in intensity_warning(mr)
    assert check_intensity(mr, "mr.nii.gz", strict=False)[0].startswith("non_ct_intensity")
    with pytest.raises(InputImageError, match=r"mr\.nii\.gz: .*--strict"):
        check_intensity(mr, "mr.nii.gz", strict=True)
    image, _, _ = body_with_spleen()
    assert intensity_warning(image) is None
    assert check_intensity(image, "ct", strict=True) == []


def test_ct_stored_without_its_hu_offset_warns_and_strict_refuses():
    """0..4095 (air at 0): the non-CT warning as before, with a hint; --strict refuses."""
    image, _, _ = body_with_spleen()
    unsigned = image + 1024.0
    assert unsigned.min() == 24.0 and unsigned.max() < 4096
    warnings = check_intensity(unsigned, "ct_no_offset.nii.gz", strict=False)
    assert len(warnings) == 1 and warnings[0].startswith("non_ct_intensity")
    assert "without its -1024 HU offset" in warnings[0]
    with pytest.raises(InputImageError, match=r"ct_no_offset\.nii\.gz: .*-1024 HU offset.*--strict"):
        check_intensity(unsigned, "ct_no_offset.nii.gz", strict=True)
    mr = np.random.default_rng(0).uniform(0, 9000, size=(30, 30, 10)).astype(np.float32)
    assert "HU offset" not in intensity_warning(mr)


def test_header_assumptions_reach_the_report_and_strict_refuses_them():
    image, mask, affine = body_with_spleen()
    assumed = "header without orientation (qform_code = sform_code = 0): assumed nibabel's default"
    geometry = Geometry(image.shape, affine, warnings=(assumed,))
    report = build_report("c", "s", mask, image, geometry, keep_components(mask, False), ["non_ct_intensity: x"])
    assert report.warnings[:2] == [assumed, "non_ct_intensity: x"]
    assert json.loads(report.to_json())["warnings"][0] == assumed
    assert check_geometry(geometry, "s.nii", strict=False) == [assumed]
    with pytest.raises(InputImageError, match=r"s\.nii: header without orientation .*--strict"):
        check_geometry(geometry, "s.nii", strict=True)
    assert check_geometry(Geometry(image.shape, affine), "s.nii", strict=True) == []


def test_components_keep_the_mask_without_copying_it():
    mask = np.zeros((30, 30, 30), np.uint8)
    mask[2:5, 2:5, 2:5] = 1
    mask[20:22, 20:22, 20:22] = 1
    assert keep_components(mask, largest_only=False).mask is mask
    largest = keep_components(mask, largest_only=True)
    assert largest.mask is not mask and int(largest.mask.sum()) == 27 and int(mask.sum()) == 35


def test_summary_csv_rows(tmp_path):
    image, mask, affine = body_with_spleen()
    report = build_report("a", "a.nii.gz", mask, image, Geometry(image.shape, affine), keep_components(mask, False))
    rows = [SummaryRow("a", "a.nii.gz", "ok", report), SummaryRow("b", "b.nii.gz", "failed", error="b.nii.gz: file not found")]
    dest = write_summary(rows, tmp_path / "summary.csv")
    with dest.open() as f:
        lines = list(csv.DictReader(f))
    assert [r["case"] for r in lines] == ["a", "b"]
    assert float(lines[0]["volume_ml"]) == pytest.approx(report.volume_ml, abs=1e-3)
    assert (lines[0]["extent_left_right_mm"], lines[0]["extent_superior_inferior_mm"]) == ("12.00", "21.00")
    assert lines[1] == {**lines[1], "status": "failed", "volume_ml": "", "error": "b.nii.gz: file not found"}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.csv"]


# ---------------------------------------------------------------- real CT (issue 3 item 7)


def test_real_ct_passes_and_msd_flipped_header_is_flagged(real_ct, real_ct_mask):
    image, geometry = read_volume(real_ct)
    mask = np.asarray(nib.load(str(real_ct_mask)).dataobj).astype(np.uint8)
    correct = anatomical_check(mask, image, geometry.affine_ras)
    assert correct.on_patient_left and correct.posterior and not correct.probable_header_flip
    flipped = anatomical_check(mask, image, msd_flip(geometry.affine_ras))
    assert flipped.probable_header_flip and not flipped.on_patient_left and not flipped.posterior


def test_real_dicom_series_passes_the_check(real_ct):
    from spleen_seg.io.dicom import find_series
    from spleen_seg.io.dicom_volume import read_series

    folder = real_ct.parent / "dicom_series"
    shared_mask = nib.load(str(real_ct.parent / "dicom_series_spleen.nii.gz"))
    (series,), _ = find_series(folder)
    image, geometry = read_series(series)
    # Bring the shared mask onto the series' voxel grid (both axis-aligned; orders may differ).
    transform = nib.orientations.ornt_transform(nib.io_orientation(shared_mask.affine), nib.io_orientation(geometry.affine_ras))
    mask = nib.orientations.apply_orientation(np.asarray(shared_mask.dataobj), transform).astype(np.uint8)
    moved = shared_mask.affine @ nib.orientations.inv_ornt_aff(transform, shared_mask.shape)
    np.testing.assert_allclose(moved, geometry.affine_ras, atol=1e-3)
    check = anatomical_check(mask, image, geometry.affine_ras)
    assert check.on_patient_left and check.posterior
    assert anatomical_check(mask, image, msd_flip(geometry.affine_ras)).probable_header_flip


def test_a_reviewed_report_and_a_version_3_report_both_read_back(tmp_path):
    """Resume reads report.json: a review record must not make it unreadable (the case would be
    recomputed over the reviewer's work), and reports written before the review existed still read."""
    from dataclasses import replace

    from spleen_seg.outputs.report import read_report, write_report
    from spleen_seg.outputs.review_state import ReviewState, review_from_dict

    image, mask, affine = body_with_spleen()
    report = build_report("c", "s", mask, image, Geometry(image.shape, affine), keep_components(mask, False))
    reviewed = replace(report, review=ReviewState(revision=1, decision="accepted", reviewer="rr").as_dict())
    write_report(reviewed, tmp_path / "report.json")
    back = read_report(tmp_path / "report.json")
    assert back == reviewed and review_from_dict(back.review).decision == "accepted"

    data = json.loads(report.to_json())
    data["report_version"] = 3
    del data["review"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    old = read_report(tmp_path / "old.json")
    assert old is not None and old.review is None and old.volume_ml == report.volume_ml
