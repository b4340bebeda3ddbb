"""Window layout and blending against MONAI's sliding_window_inference."""

import numpy as np
import pytest
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference
from monai.inferers.utils import _get_scan_interval

from spleen_seg.pipeline.windows import covering_starts, spleen_margin, window_starts

ROI = (16, 16, 16)


@pytest.mark.parametrize("shape", [(40, 33, 16), (267, 267, 166), (96, 120, 97), (20, 17, 31)])
def test_window_starts_equal_monai_layout(shape):
    roi = (96, 96, 96) if max(shape) > 60 else ROI
    padded = tuple(max(s, r) for s, r in zip(shape, roi, strict=True))
    interval = _get_scan_interval(padded, roi, 3, (0.5, 0.5, 0.5))
    slices = dense_patch_slices(padded, roi, interval)
    expected = sorted({tuple(s.start for s in sl) for sl in slices})
    ours = sorted(np.array(np.meshgrid(*[window_starts(n, r, 0.5) for n, r in zip(padded, roi, strict=True)],
                                       indexing="ij")).reshape(3, -1).T.tolist())
    assert [tuple(p) for p in ours] == expected


def test_covering_starts_cover_the_axis_with_fewer_windows():
    starts = window_starts(267, 96, 0.5)
    assert starts == [0, 48, 96, 144, 171]
    chosen = covering_starts(starts, 96)
    assert chosen == [0, 96, 171]
    covered = np.zeros(267, bool)
    for s in chosen:
        covered[s : s + 96] = True
    assert covered.all()


def _conv_runner():
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(1, 1, 5, padding=2).eval()

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return conv(torch.from_numpy(batch)).numpy()

    return conv, run


@pytest.mark.parametrize("shape", [(40, 35, 20), (12, 30, 18)])
def test_all_windows_equal_monai_sliding_window(shape):
    conv, run = _conv_runner()
    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    with torch.no_grad():
        expected = sliding_window_inference(torch.from_numpy(image)[None, None], ROI, 3, conv, overlap=0.5)[0, 0].numpy()
    ours, stats = spleen_margin(image, run, ROI, 0.5, 3, focus_radius=None)
    assert ours.shape == shape
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    assert stats.computed == stats.total


def test_focused_windows_are_exact_near_the_positive_region():
    conv, run = _conv_runner()
    rng = np.random.default_rng(1)
    image = rng.random((64, 64, 48), dtype=np.float32) * 0.1
    image[40:52, 40:52, 30:40] = 3.0  # a bright blob: the only place the conv output is clearly positive
    full, _ = spleen_margin(image, run, ROI, 0.5, 4, focus_radius=None)
    focused, stats = spleen_margin(image, run, ROI, 0.5, 4, focus_radius=4)
    assert stats.computed < stats.total
    # Within the blob (plus 2 voxels) every window is computed: MONAI's exact average.
    near = np.zeros(image.shape, bool)
    near[38:54, 38:54, 28:42] = True
    np.testing.assert_allclose(focused[near], full[near], atol=1e-5)
    np.testing.assert_array_equal(focused > 0, full > 0)
