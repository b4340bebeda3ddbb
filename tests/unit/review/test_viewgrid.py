"""The viewer's grid: where each view voxel lies in the world, and a drawing on it put back voxel for voxel."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest

from spleen_seg.review.viewgrid import apply_drawing, plan_view, view_image, view_mask

SHAPE = (50, 44, 30)
LPS = np.array([[-0.8, 0, 0, 20.0], [0, -0.7, 0, 15.0], [0, 0, 2.5, -40.0], [0, 0, 0, 1]])
OBLIQUE = nib.affines.from_matvec(np.array([[0.0, 0.9, 0.1], [-0.8, 0.0, 0.0], [0.0, -0.1, 2.0]]), [5.0, -3.0, 7.0])


def ball(shape=SHAPE, centre=(20, 25, 12), radius=6.0) -> np.ndarray:
    grid = np.indices(shape)
    return (sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius ** 2).astype(np.uint8)


@pytest.mark.parametrize("affine", [LPS, OBLIQUE], ids=["LPS", "oblique"])
@pytest.mark.parametrize("max_voxels", [10 ** 9, 3000], ids=["every voxel", "blocks"])
def test_each_view_voxel_sits_at_the_centre_of_its_block_in_ras_order(affine, max_voxels):
    mask = ball()
    grid = plan_view(mask, affine, "roi", max_voxels, margin_mm=5.0)
    assert math.prod(grid.shape) <= max_voxels
    assert "".join(nib.aff2axcodes(grid.affine)) == "RAS"
    # The world position of every case voxel, averaged over each block, is the block's view voxel.
    world = nib.affines.apply_affine(affine, np.indices(SHAPE).reshape(3, -1).T).reshape(*SHAPE, 3)
    # view_image gives int16: world mm x 100 keeps 0.01 mm.
    means = np.stack([view_image(world[..., axis].astype(np.float32) * 100, grid) / 100 for axis in range(3)], -1)
    expected = nib.affines.apply_affine(grid.affine, np.indices(grid.shape).reshape(3, -1).T).reshape(*grid.shape, 3)
    np.testing.assert_allclose(means, expected, atol=6e-3)


def test_the_roi_holds_the_mask_and_its_margin_and_an_empty_mask_shows_the_whole_volume():
    mask = ball()
    grid = plan_view(mask, LPS, "roi", 10 ** 9, margin_mm=5.0)
    assert grid.factors == (1, 1, 1)
    assert grid.start == (20 - 6 - 7, 25 - 6 - 8, 12 - 6 - 2) and grid.stop == (20 + 7 + 7, 25 + 7 + 8, 12 + 7 + 2)
    assert view_mask(mask, grid).sum() == mask.sum()
    empty = plan_view(np.zeros(SHAPE, np.uint8), LPS, "roi", 10 ** 9)
    assert (empty.start, empty.stop) == ((0, 0, 0), SHAPE)
    full = plan_view(mask, LPS, "full", 10 ** 9)
    assert (full.start, full.stop) == ((0, 0, 0), SHAPE)


def test_blocks_grow_along_the_finest_axes_first_and_stay_whole():
    grid = plan_view(ball(), LPS, "full", 8000)  # voxels 0.8 x 0.7 x 2.5 mm
    assert grid.factors[1] >= grid.factors[0] > grid.factors[2] == 1
    roi = plan_view(ball(), LPS, "roi", 2000, margin_mm=5.0)
    assert max(roi.factors) > 1
    # Whole blocks, unless the box is the whole axis (then the volume's last block is cut).
    for view in (grid, roi):
        for start, stop, factor, n in zip(view.start, view.stop, view.factors, SHAPE, strict=True):
            assert (stop - start) % factor == 0 or (start, stop) == (0, n)


@pytest.mark.parametrize("max_voxels", [10 ** 9, 3000], ids=["every voxel", "blocks"])
def test_a_drawing_changes_the_case_mask_only_in_the_blocks_drawn(max_voxels):
    mask = ball()
    grid = plan_view(mask, LPS, "roi", max_voxels, margin_mm=5.0)
    shown = view_mask(mask, grid)
    assert np.array_equal(apply_drawing(mask, shown, grid), mask)  # nothing drawn: every voxel kept
    drawn = shown.copy()
    painted, erased = (0, 0, 0), tuple(int(n) // 2 for n in grid.shape)
    assert shown[painted] == 0 and shown[erased] == 1
    drawn[painted], drawn[erased] = 1, 0
    result = apply_drawing(mask, drawn, grid)
    # Each changed view voxel maps, through the affines, onto the block of case voxels it covers.
    to_case = np.linalg.inv(LPS) @ grid.affine
    for voxel, value in ((painted, 1), (erased, 0)):
        centre = nib.affines.apply_affine(to_case, voxel)
        half = (np.asarray(grid.factors) - 1) / 2
        lo = np.rint(np.minimum(centre - half, centre + half)).astype(int)
        block = tuple(slice(a, a + f) for a, f in zip(lo, grid.factors, strict=True))
        assert (result[block] == value).all()
        mask_block = mask.copy()
        mask_block[block] = value
        mask = mask_block
    assert np.array_equal(result, mask)  # and nothing else changed


def test_a_drawing_of_another_shape_is_refused():
    grid = plan_view(ball(), LPS, "roi", 10 ** 9)
    with pytest.raises(ValueError, match="shape"):
        apply_drawing(ball(), np.zeros((3, 3, 3), np.uint8), grid)
