"""Backends agree on the real CT with the yardstick weights (ONNX parity: Dice >= 0.999)."""

import numpy as np
import pytest

from spleen_seg.io.nifti import read_volume
from spleen_seg.pipeline.segmenter import load_segmenter
from spleen_seg.training.evaluate import dice


@pytest.fixture(scope="module")
def real_volume(real_ct):
    return read_volume(real_ct)


@pytest.fixture(scope="module")
def torch_mask(real_volume, yardstick):
    array, geometry = real_volume
    return load_segmenter(yardstick, "cpu", "torch", progress=False).predict(array.copy(), geometry)


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_backend_mask_matches_torch_on_real_ct(real_volume, torch_mask, yardstick, backend):
    array, geometry = real_volume
    mask = load_segmenter(yardstick, "cpu", backend, progress=False).predict(array.copy(), geometry)
    assert mask.shape == geometry.shape
    assert torch_mask.sum() > 5000  # the yardstick finds the spleen (about 9,800 voxels)
    assert dice(mask, torch_mask) >= 0.999
    assert np.abs(int(mask.sum()) - int(torch_mask.sum())) <= 0.001 * torch_mask.sum() + 5
