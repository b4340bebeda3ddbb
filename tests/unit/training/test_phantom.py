"""Tests for the synthetic CT phantom generator and its MSD Task09 writer."""

from __future__ import annotations

import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from spleen_seg.errors import ConfigError
from spleen_seg.training.phantom import ORIENTATIONS, PhantomCase, make_phantom, write_msd_dataset

# A fixed, smallish geometry keeps orientation comparisons fast and exact.
SMALL_SHAPE = (160, 160, 64)
SMALL_SPACING_MM = (1.6, 1.6, 3.0)
ML_PER_MM3 = 1e-3


def _world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return nib.affines.apply_affine(affine, np.argwhere(mask).mean(axis=0))


def _voxel_ml(affine: np.ndarray) -> float:
    return float(abs(np.linalg.det(affine[:3, :3]))) * ML_PER_MM3


def _body_centroid(case: PhantomCase) -> np.ndarray:
    return _world_centroid(case.image_hu > -500, case.affine)


@pytest.fixture(scope="module")
def default_case() -> PhantomCase:
    return make_phantom(7)


@pytest.fixture(scope="module")
def small_cases() -> dict[str, PhantomCase]:
    return {o: make_phantom(3, shape=SMALL_SHAPE, spacing_mm=SMALL_SPACING_MM, orientation=o) for o in ORIENTATIONS}


def test_same_seed_is_identical_and_different_seeds_differ() -> None:
    a, b, c = make_phantom(11), make_phantom(11), make_phantom(12)
    np.testing.assert_array_equal(a.image_hu, b.image_hu)
    np.testing.assert_array_equal(a.spleen_mask, b.spleen_mask)
    np.testing.assert_array_equal(a.affine, b.affine)
    assert a.orientation == b.orientation
    assert a.image_hu.shape != c.image_hu.shape or not np.array_equal(a.image_hu, c.image_hu)


def test_dtypes_and_shapes(default_case: PhantomCase) -> None:
    assert default_case.image_hu.dtype == np.int16
    assert default_case.spleen_mask.dtype == np.uint8
    assert default_case.affine.dtype == np.float64
    assert default_case.affine.shape == (4, 4)
    assert default_case.image_hu.shape == default_case.spleen_mask.shape
    assert set(np.unique(default_case.spleen_mask).tolist()) == {0, 1}


def test_default_geometry_in_documented_ranges(default_case: PhantomCase) -> None:
    zooms = np.sqrt((default_case.affine[:3, :3] ** 2).sum(axis=0))
    fov_mm = np.array(default_case.image_hu.shape) * zooms
    assert 0.8 - 1e-6 <= zooms[0] <= 1.6 + 1e-6 and zooms[0] == pytest.approx(zooms[1])
    assert 1.5 - 1e-6 <= zooms[2] <= 5.0 + 1e-6
    assert 200.0 - 1e-6 <= fov_mm[0] <= 320.0 + 1e-6
    assert 150.0 <= fov_mm[2] <= 300.0


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_affine_orientation_matches_field(orientation: str, small_cases: dict[str, PhantomCase]) -> None:
    case = small_cases[orientation]
    assert case.orientation == orientation
    assert "".join(nib.aff2axcodes(case.affine)) == orientation
    assert case.image_hu.shape == SMALL_SHAPE


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_spleen_is_on_patients_left_and_posterior(orientation: str, small_cases: dict[str, PhantomCase]) -> None:
    # nibabel RAS+: +x is the patient's Right and +y Anterior, so left is lower x, posterior lower y.
    case = small_cases[orientation]
    spleen, body = _world_centroid(case.spleen_mask, case.affine), _body_centroid(case)
    assert spleen[0] < body[0] - 20.0
    assert spleen[1] < body[1]


def test_world_geometry_identical_across_orientations(small_cases: dict[str, PhantomCase]) -> None:
    ras = small_cases["RAS"]
    half_voxel_mm = max(SMALL_SPACING_MM) / 2.0
    for case in small_cases.values():
        assert np.abs(_world_centroid(case.spleen_mask, case.affine)
                      - _world_centroid(ras.spleen_mask, ras.affine)).max() < half_voxel_mm
        assert case.spleen_mask.sum() * _voxel_ml(case.affine) == pytest.approx(
            ras.spleen_mask.sum() * _voxel_ml(ras.affine))
        # World position of voxel (0, 0, 0) of the RAS case, looked up in the other voxel order.
        ijk = np.rint(nib.affines.apply_affine(np.linalg.inv(case.affine), ras.affine[:3, 3])).astype(int)
        assert case.image_hu[tuple(ijk)] == ras.image_hu[0, 0, 0]


def test_left_right_flip_moves_spleen_in_voxel_space(small_cases: dict[str, PhantomCase]) -> None:
    np.testing.assert_array_equal(small_cases["LAS"].spleen_mask, small_cases["RAS"].spleen_mask[::-1])
    np.testing.assert_array_equal(small_cases["LPS"].image_hu, small_cases["RAS"].image_hu[::-1, ::-1])


def test_spleen_volume_plausible_for_ten_seeds() -> None:
    volumes = []
    for seed in range(10):
        case = make_phantom(seed)
        volumes.append(case.spleen_mask.sum() * _voxel_ml(case.affine))
    assert all(80.0 <= v <= 400.0 for v in volumes), volumes
    assert max(volumes) - min(volumes) > 50.0  # size varies per case


def test_spleen_hu_overlaps_liver_hu(default_case: PhantomCase) -> None:
    # The liver is the large soft-tissue organ on the patient's right, above the kidneys.
    case = default_case
    spleen_hu = case.image_hu[case.spleen_mask == 1].astype(float)
    centroid = _world_centroid(case.spleen_mask, case.affine)
    liver_point = np.array([45.0, 0.0, centroid[2] + 10.0])
    ijk = np.rint(nib.affines.apply_affine(np.linalg.inv(case.affine), liver_point)).astype(int)
    patch = case.image_hu[tuple(slice(i - 3, i + 4) for i in ijk)].astype(float)
    # Medians: edge voxels are smoothed towards the surrounding fat.
    assert 40.0 <= np.median(spleen_hu) <= 70.0
    assert abs(np.median(spleen_hu) - np.median(patch)) < 15.0


def test_hu_ranges(default_case: PhantomCase) -> None:
    image = default_case.image_hu
    corners = image[:10, :10, :]
    assert np.percentile(corners, 99) < -900
    assert image.max() > 250
    assert image.min() >= -1024
    soft = image[default_case.spleen_mask == 1]
    assert 5.0 < soft.std() < 30.0  # noisy like CT, not a flat label map


def test_generation_time_per_case() -> None:
    make_phantom(0)  # warm-up: imports and allocator
    timings = []
    for seed in (1, 2, 3):
        start = time.perf_counter()
        make_phantom(seed)
        timings.append(time.perf_counter() - start)
    assert max(timings) < 1.0, timings


@pytest.mark.parametrize("kwargs", [
    {"seed": -1}, {"seed": 1.5}, {"seed": 1, "shape": (10, 10)}, {"seed": 1, "shape": (0, 10, 10)},
    {"seed": 1, "spacing_mm": (1.0, -1.0, 1.0)}, {"seed": 1, "spacing_mm": (1.0, float("nan"), 1.0)},
    {"seed": 1, "orientation": "RPI"},
])
def test_make_phantom_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        make_phantom(**kwargs)


def test_write_msd_dataset_layout_and_roundtrip(tmp_path: Path) -> None:
    out = write_msd_dataset(tmp_path / "Task09_Spleen", n_cases=2, seed=5, n_test=1, progress=False)
    assert out == tmp_path / "Task09_Spleen"
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["numTraining"] == 2 and meta["numTest"] == 1
    assert meta["tensorImageSize"] == "3D"
    assert meta["modality"] == {"0": "CT"}
    assert meta["labels"] == {"0": "background", "1": "spleen"}
    assert meta["training"] == [
        {"image": f"./imagesTr/spleen_{i}.nii.gz", "label": f"./labelsTr/spleen_{i}.nii.gz"} for i in (1, 2)]
    assert meta["test"] == ["./imagesTs/spleen_3.nii.gz"]
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["dataset.json", "imagesTr/spleen_1.nii.gz", "imagesTr/spleen_2.nii.gz",
                     "imagesTs/spleen_3.nii.gz", "labelsTr/spleen_1.nii.gz", "labelsTr/spleen_2.nii.gz"]
    image, label = nib.load(out / "imagesTr/spleen_2.nii.gz"), nib.load(out / "labelsTr/spleen_2.nii.gz")
    assert image.get_data_dtype() == np.int16 and label.get_data_dtype() == np.uint8
    assert int(image.header["qform_code"]) == 1 and int(image.header["sform_code"]) == 1
    np.testing.assert_allclose(image.affine, label.affine)
    # Same seed again: byte-identical arrays, so the dataset is reproducible.
    assert np.asanyarray(label.dataobj).dtype == np.uint8 and np.asanyarray(label.dataobj).sum() > 0
    first = np.asanyarray(nib.load(out / "imagesTr/spleen_1.nii.gz").dataobj)
    assert first.shape != image.shape or not np.array_equal(first, np.asanyarray(image.dataobj))
    # Same seed again: identical arrays, so the dataset is reproducible.
    again = write_msd_dataset(tmp_path / "again", n_cases=1, seed=5, progress=False)
    np.testing.assert_array_equal(np.asanyarray(nib.load(again / "imagesTr/spleen_1.nii.gz").dataobj), first)


def test_written_file_matches_make_phantom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import spleen_seg.training.phantom as phantom

    made: list[PhantomCase] = []

    def recording(seed: int, **kwargs) -> PhantomCase:
        made.append(make_phantom(seed, **kwargs))
        return made[-1]

    monkeypatch.setattr(phantom, "make_phantom", recording)
    out = write_msd_dataset(tmp_path, n_cases=1, seed=0, progress=False)
    image, label = nib.load(out / "imagesTr/spleen_1.nii.gz"), nib.load(out / "labelsTr/spleen_1.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(image.dataobj), made[0].image_hu)
    np.testing.assert_array_equal(np.asanyarray(label.dataobj), made[0].spleen_mask)
    np.testing.assert_allclose(image.affine, made[0].affine, atol=1e-4)
    assert "".join(nib.aff2axcodes(image.affine)) == made[0].orientation
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


@pytest.mark.parametrize("kwargs", [
    {"n_cases": 0, "seed": 0}, {"n_cases": 1, "seed": 0, "n_test": -1}, {"n_cases": 1.5, "seed": 0},
    {"n_cases": True, "seed": 0}, {"n_cases": 1, "seed": -3},
])
def test_write_msd_dataset_rejects_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ConfigError, match="n_cases|n_test|seed"):
        write_msd_dataset(tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_write_msd_dataset_rejects_file_as_out_dir(tmp_path: Path) -> None:
    target = tmp_path / "a_file"
    target.write_text("not a folder")
    with pytest.raises(ConfigError, match="a_file"):
        write_msd_dataset(target, n_cases=1, seed=0, progress=False)
