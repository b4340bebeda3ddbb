"""preview.py: radiological orientation, independence from voxel order, empty masks."""

from __future__ import annotations

import numpy as np
from matplotlib import image as mpimg

from spleen_seg.outputs.preview import write_preview

SHAPE = (48, 40, 24)


def _phantom() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RAS volume: a soft-tissue body, with a mask blob at the patient's left, anterior, superior."""
    image = np.full(SHAPE, -1000.0, dtype=np.float32)
    image[4:-4, 4:-4, :] = 40.0
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[6:14, 26:34, 14:20] = 1  # small x = patient's left; large y = anterior; large z = superior
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    return image, mask, affine


def _panels(png) -> list[tuple[float, float]]:
    """Red contour centroid in each panel (axial, coronal, sagittal) as fractions of the body's box.

    (0, 0) is the body's top-left corner in the picture, (1, 1) its bottom-right.
    """
    pixels = mpimg.imread(str(png))[..., :3]
    red = (pixels[..., 0] > 0.8) & (pixels[..., 1] < 0.45) & (pixels[..., 2] < 0.45)
    grey = (np.abs(pixels[..., 0] - pixels[..., 2]) < 0.05) & (pixels.mean(axis=2) > 0.3) & (pixels.mean(axis=2) < 0.7)
    width = pixels.shape[1] // 3
    out = []
    for p in range(3):
        cols = slice(p * width, (p + 1) * width)
        body_rows, body_cols = np.nonzero(grey[:, cols])
        rows, columns = np.nonzero(red[:, cols])
        out.append(((columns.mean() - body_cols.min()) / np.ptp(body_cols), (rows.mean() - body_rows.min()) / np.ptp(body_rows)))
    return out


def test_radiological_orientation(tmp_path):
    image, mask, affine = _phantom()
    dest = write_preview(image, mask, affine, tmp_path / "preview.png", "case: spleen 1.0 mL")
    assert dest.is_file() and [p.name for p in tmp_path.iterdir()] == ["preview.png"]
    (ax_x, ax_y), (co_x, co_y), (sa_x, sa_y) = _panels(dest)
    # Axial: the blob (patient's left, anterior) on the image's right, in the upper half.
    assert ax_x > 0.6 and ax_y < 0.4
    # Coronal: the blob (left, superior) on the right, upper half.
    assert co_x > 0.6 and co_y < 0.4
    # Sagittal: anterior on the left, superior at the top.
    assert sa_x < 0.4 and sa_y < 0.4


def test_lps_and_ras_inputs_give_the_same_picture(tmp_path):
    image, mask, affine = _phantom()
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = SHAPE[0] - 1, SHAPE[1] - 1
    ras = write_preview(image, mask, affine, tmp_path / "ras.png", "same")
    lps = write_preview(image[::-1, ::-1], mask[::-1, ::-1], affine @ flip, tmp_path / "lps.png", "same")
    np.testing.assert_array_equal(mpimg.imread(str(ras)), mpimg.imread(str(lps)))


def test_empty_mask_draws_no_contour(tmp_path):
    image, mask, affine = _phantom()
    dest = write_preview(image, np.zeros_like(mask), affine, tmp_path / "preview.png", "case: spleen not found")
    pixels = mpimg.imread(str(dest))
    assert not ((pixels[..., 0] > 0.8) & (pixels[..., 1] < 0.45)).any()
