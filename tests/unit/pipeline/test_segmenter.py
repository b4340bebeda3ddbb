"""The segmenter with a threshold network: identity on the native grid, volume kept, CPU tensors equal numpy."""

import numpy as np
import pytest
import torch

from spleen_seg.io.nifti import Geometry
from spleen_seg.pipeline.backends import Runner
from spleen_seg.pipeline.segmenter import Segmenter

# HU window -57..164 maps to 0..1; a threshold network marks voxels above 0.5 (53.5 HU).
THRESHOLD = 0.5


def threshold_margin(batch: np.ndarray) -> np.ndarray:
    """Spleen margin x - 0.5: spleen wherever the windowed intensity exceeds 0.5."""
    return batch - THRESHOLD


def sphere_volume(shape, spacing, affine_flip=(1, 1, 1), radius_mm=18.0):
    grid = np.stack(np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=False)], indexing="ij"))
    inside = (grid**2).sum(0) <= radius_mm**2
    image = np.where(inside, 150.0, -100.0).astype(np.float32)
    affine = np.diag([affine_flip[0] * spacing[0], affine_flip[1] * spacing[1], affine_flip[2] * spacing[2], 1.0])
    return image, inside.astype(np.uint8), affine


@pytest.fixture
def segmenter():
    return Segmenter(runner=Runner(threshold_margin, batch_size=4, backend="test"), progress=False)


@pytest.mark.parametrize("flip", [(1, 1, 1), (-1, -1, 1)], ids=["RAS", "LPS"])
def test_threshold_network_on_native_grid_returns_its_input(segmenter, flip):
    # Already at 1.5 x 1.5 x 2.0 mm: resampling is the identity, so the mask is the sphere.
    image, truth, affine = sphere_volume((40, 36, 30), (1.5, 1.5, 2.0), flip)
    mask = segmenter.predict(image, Geometry(shape=image.shape, affine_ras=affine))
    assert mask.dtype == np.uint8 and mask.shape == image.shape
    np.testing.assert_array_equal(mask, truth)


def test_resampled_grid_keeps_volume(segmenter):
    image, truth, affine = sphere_volume((80, 80, 50), (0.8, 0.8, 1.25), (-1, -1, 1))
    mask = segmenter.predict(image, Geometry(shape=image.shape, affine_ras=affine))
    assert mask.shape == image.shape
    # Down- then up-sampling blurs the edge by a fraction of a 1.5-2 mm voxel: a few % of volume.
    assert abs(int(mask.sum()) - int(truth.sum())) / truth.sum() < 0.06
    assert np.logical_and(mask, truth).sum() * 2 / (mask.sum() + truth.sum()) > 0.97


def test_torch_device_path_equals_numpy_path(monkeypatch):
    """On CUDA the Segmenter resamples and inverts with torch tensors; run that code on CPU tensors."""
    image, truth, affine = sphere_volume((50, 46, 30), (0.9, 0.9, 2.5), (-1, 1, 1))
    geometry = Geometry(shape=image.shape, affine_ras=affine)
    numpy_mask = Segmenter(runner=Runner(threshold_margin, 4, "test"), progress=False).predict(image, geometry)
    segmenter = Segmenter(runner=Runner(threshold_margin, 4, "test"), progress=False)
    monkeypatch.setattr(Segmenter, "_to_device", lambda self, array, device: torch.from_numpy(np.ascontiguousarray(array)))
    torch_mask = segmenter.predict(image, geometry)
    assert torch_mask.dtype == np.uint8 and torch_mask.shape == image.shape
    assert numpy_mask.sum() > 1000
    np.testing.assert_array_equal(torch_mask, numpy_mask)
