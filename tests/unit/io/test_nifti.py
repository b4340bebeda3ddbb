import gzip

import nibabel as nib
import numpy as np
import pytest

from spleen_seg.errors import InputImageError
from spleen_seg.io.nifti import Geometry, case_id, read_volume, write_mask

LPS_AFFINE = np.array([[-0.8, 0, 0, 100.0], [0, -0.8, 0, 80.0], [0, 0, 2.5, -40.0], [0, 0, 0, 1]])


def _save(path, data, affine=LPS_AFFINE):
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def test_read_volume_returns_hu_and_geometry(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) - 50
    array, geo = read_volume(_save(tmp_path / "ct.nii.gz", data))
    assert array.dtype == np.float32 and array.shape == (4, 5, 6)
    np.testing.assert_array_equal(array, data.astype(np.float32))
    np.testing.assert_allclose(geo.affine_ras, LPS_AFFINE)
    assert geo.axcodes == "LPS"
    assert geo.spacing_mm == pytest.approx((0.8, 0.8, 2.5))
    assert geo.voxel_volume_ml == pytest.approx(0.8 * 0.8 * 2.5 / 1000)


def test_4d_single_volume_is_squeezed(tmp_path):
    data = np.random.default_rng(0).normal(size=(4, 5, 6, 1)).astype(np.float32)
    array, geo = read_volume(_save(tmp_path / "ct.nii", data))
    assert array.shape == geo.shape == (4, 5, 6)


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "file not found"),
    (lambda p: p.write_bytes(b"this is not nifti"), "not a readable NIfTI image"),
    (lambda p: p.write_bytes(gzip.compress(b"x" * 400)), "not a readable NIfTI image"),
    (lambda p: _save(p, np.ones((8, 8), dtype=np.float32) * np.arange(8)), "2D"),
    (lambda p: _save(p, np.ones((8, 8, 1), dtype=np.float32) * np.arange(8)[:, None, None]), "2D"),
    (lambda p: _save(p, np.random.default_rng(0).normal(size=(4, 4, 4, 3)).astype(np.float32)), "3D volume"),
    (lambda p: _save(p, np.where(np.eye(4)[:, :, None] > 0, np.nan, 1.0).repeat(4, 2).astype(np.float32)), "NaN"),
    (lambda p: _save(p, np.full((6, 6, 6), -1000, dtype=np.int16)), "constant"),
])
def test_bad_inputs_give_one_line_error_naming_the_file(tmp_path, make, message):
    path = tmp_path / "input.nii.gz"
    make(path)
    with pytest.raises(InputImageError, match=message) as err:
        read_volume(path)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_truncated_file_is_rejected(tmp_path):
    path = _save(tmp_path / "ct.nii.gz", np.random.default_rng(0).normal(size=(30, 30, 30)).astype(np.float32))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InputImageError, match=str(path)):
        read_volume(path)


def test_write_mask_keeps_shape_affine_and_is_uint8(tmp_path):
    src = _save(tmp_path / "ct.nii.gz", np.random.default_rng(0).normal(size=(7, 8, 9)).astype(np.float32))
    _, geo = read_volume(src)
    mask = np.zeros(geo.shape, dtype=np.uint8)
    mask[2:4, 3:5, 4:6] = 1
    out = write_mask(mask, geo, tmp_path / "out" / "spleen.nii.gz")
    back = nib.load(str(out))
    assert back.get_data_dtype() == np.uint8
    assert back.shape == (7, 8, 9)
    np.testing.assert_allclose(back.affine, LPS_AFFINE, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(back.dataobj), mask)
    assert sorted(p.name for p in out.parent.iterdir()) == ["spleen.nii.gz"]


def test_write_mask_shape_mismatch_leaves_no_file(tmp_path):
    geo = Geometry(shape=(4, 4, 4), affine_ras=np.eye(4))
    with pytest.raises(ValueError):
        write_mask(np.zeros((3, 4, 4), np.uint8), geo, tmp_path / "m.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_case_id():
    assert case_id("/a/spleen_1.nii.gz") == "spleen_1"
    assert case_id("b/CT.NII") == "CT"
