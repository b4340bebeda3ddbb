"""The numpy preprocessing geometry against MONAI's own transforms."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation, Spacing

from spleen_seg.pipeline.resample import Reorientation, index_box, resample_linear, spacing_grid

SPACING = (1.5, 1.5, 2.0)
GEOMETRIES = {
    "RAS_fine": (np.diag([0.78, 0.78, 5.0, 1.0]), (60, 50, 12)),
    "LPS_shifted": (np.array([[-0.9, 0, 0, 120.0], [0, -0.8, 0, 90.0], [0, 0, 2.5, -300.0], [0, 0, 0, 1]]), (40, 44, 20)),
    "LAS_native_z": (np.array([[-1.2, 0, 0, 10.0], [0, 1.2, 0, -5.0], [0, 0, 2.0, 7.0], [0, 0, 0, 1]]), (30, 31, 25)),
    "permuted": (np.array([[0, 0, 3.0, 0], [0, -3.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1]]), (26, 22, 18)),
}


def monai_preprocess(array, affine):
    image = MetaTensor(torch.from_numpy(array[None]), affine=torch.as_tensor(affine))
    image = Orientation(axcodes="RAS")(image)
    return Spacing(pixdim=SPACING, mode="bilinear")(image)


@pytest.mark.parametrize("name", GEOMETRIES)
def test_reorient_and_resample_match_monai(name):
    affine, shape = GEOMETRIES[name]
    array = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    expected = monai_preprocess(array, affine)
    reorientation = Reorientation.for_affine(affine, shape)
    ras = reorientation.apply(array)
    assert reorientation.ras_shape == ras.shape
    ras_affine = reorientation.affine(affine)
    out_shape, out_affine = spacing_grid(ras.shape, ras_affine, SPACING)
    assert out_shape == tuple(expected.shape[1:])
    np.testing.assert_allclose(out_affine, expected.affine.numpy(), atol=1e-5)
    ours = resample_linear(ras, ras_affine, out_affine, out_shape)
    np.testing.assert_allclose(ours, expected[0].numpy(), atol=2e-5)
    np.testing.assert_array_equal(reorientation.undo(ras), array)


def test_cropped_resampling_equals_full_resampling_crop():
    affine, shape = GEOMETRIES["LPS_shifted"]
    array = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    reorientation = Reorientation.for_affine(affine, shape)
    ras, ras_affine = reorientation.apply(array), reorientation.affine(affine)
    out_shape, out_affine = spacing_grid(ras.shape, ras_affine, SPACING)
    full = resample_linear(ras, ras_affine, out_affine, out_shape)
    crop = resample_linear(ras, ras_affine, out_affine, (5, 6, 7), dst_start=(3, 4, 2))
    np.testing.assert_allclose(crop, full[3:8, 4:10, 2:9], atol=1e-6)


def test_index_box_covers_the_support():
    src_affine = np.diag([1.5, 1.5, 2.0, 1.0])
    dst_affine = np.diag([0.75, 0.75, 5.0, 1.0])
    box = index_box(dst_affine, src_affine, (slice(10, 12), slice(0, 3), slice(4, 5)), (100, 100, 40), (60, 60, 30))
    # Source x in [9, 12] mm-index -> destination x in [18, 24].
    assert box[0] == slice(18, 25)
    assert box[1].start == 0
    assert box[2].start <= 1 and box[2].stop >= 2


def test_torch_tensors_give_the_numpy_result():
    """The GPU path (torch tensors) computes what the numpy path computes; checked on CPU tensors."""
    affine, shape = GEOMETRIES["LPS_shifted"]
    array = np.random.default_rng(2).normal(size=shape).astype(np.float32)
    reorientation = Reorientation.for_affine(affine, shape)
    ras_np = reorientation.apply(array)
    ras_t = reorientation.apply(torch.from_numpy(array))
    np.testing.assert_array_equal(ras_t.numpy(), ras_np)
    ras_affine = reorientation.affine(affine)
    out_shape, out_affine = spacing_grid(ras_np.shape, ras_affine, SPACING)
    np.testing.assert_allclose(resample_linear(ras_t, ras_affine, out_affine, out_shape).numpy(),
                               resample_linear(ras_np, ras_affine, out_affine, out_shape), atol=1e-6)
    np.testing.assert_array_equal(reorientation.undo(ras_t).numpy(), array)
