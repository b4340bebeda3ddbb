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


def test_slices_pass_through_the_mask_centre_of_mass():
    """The centre from the mask's counts per index equals the mean of its voxels' indices."""
    from spleen_seg.outputs.preview import _centre

    mask = np.zeros((40, 30, 20), dtype=np.uint8)
    mask[10:20, 5:8, 2:4] = 1  # mean indices 14.5, 6, 2.5 -> rounded half to even
    mask[30, 25, 15] = 1  # one far voxel moves the mean: (10*3*2*14.5 + 30) / 61
    expected = tuple(int(round(float(index.mean()))) for index in np.nonzero(mask))
    assert _centre(mask) == expected == (15, 6, 3)
    assert _centre(np.zeros((7, 9, 4), dtype=np.uint8)) == (3, 4, 2)  # no mask: the volume's centre


def test_titles_are_plain_text_never_mathtext(tmp_path):
    """A case id from a file name is shown as it is: "scan$\\foo$" once failed its case as bad TeX."""
    image, mask, affine = _phantom()
    for number, title in enumerate(("scan$\\foo$: spleen 1.0 mL", "$x^{2$ unbalanced", "a $\\frac{1}{0}$ b")):
        dest = write_preview(image, mask, affine, tmp_path / f"preview_{number}.png", title)
        assert mpimg.imread(str(dest)).shape == (500, 1350, 4), title
