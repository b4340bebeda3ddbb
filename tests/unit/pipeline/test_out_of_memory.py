"""Device out of memory: the window batch halves, then the CPU finishes; each step is a warning for the report."""

import numpy as np
import pytest
import torch

from spleen_seg.io.nifti import Geometry
from spleen_seg.pipeline import segmenter as segmenter_module
from spleen_seg.pipeline.backends import Runner
from spleen_seg.pipeline.segmenter import Segmenter, invert_margin, is_out_of_memory

THRESHOLD = 0.5


def threshold_margin(batch: np.ndarray) -> np.ndarray:
    return batch - THRESHOLD


def sphere_case():
    spacing = (1.5, 1.5, 2.0)
    shape = (150, 100, 60)  # the network's grid already: 3 x 2 x 1 windows of 96^3
    grid = np.stack(np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)],
                                indexing="ij"))
    image = np.where((grid**2).sum(0) <= 20.0**2, 150.0, -100.0).astype(np.float32)
    return image, Geometry(shape=shape, affine_ras=np.diag([-spacing[0], -spacing[1], spacing[2], 1.0]))


@pytest.fixture(scope="module")
def reference():
    image, geometry = sphere_case()
    return Segmenter(runner=Runner(threshold_margin, 4, "cpu"), progress=False, focus_radius=None).predict(image, geometry)


class DeviceRunner:
    """A runner that, like a full GPU, raises torch's OutOfMemoryError above ``fits`` windows."""

    def __init__(self, fits: int) -> None:
        self.fits = fits
        self.sizes: list[int] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.sizes.append(len(batch))
        if len(batch) > self.fits:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(batch)} windows")
        return threshold_margin(batch)


def test_batch_halves_until_it_fits(reference):
    image, geometry = sphere_case()
    device = DeviceRunner(fits=1)
    segmenter = Segmenter(runner=Runner(device, 4, "torch"), progress=False, focus_radius=None)
    mask = segmenter.predict(image, geometry)
    np.testing.assert_array_equal(mask, reference)
    assert device.sizes[:3] == [4, 2, 1] and set(device.sizes[3:]) == {1}
    assert segmenter.last_warnings == [
        "cuda_out_of_memory: sliding-window batch reduced from 4 to 2 windows after device out of memory",
        "cuda_out_of_memory: sliding-window batch reduced from 2 to 1 windows after device out of memory",
    ]
    segmenter.runner = Runner(threshold_margin, 4, "torch")
    segmenter.predict(image, geometry)
    assert segmenter.last_warnings == []  # per case


def test_out_of_memory_at_one_window_continues_on_the_cpu(reference):
    image, geometry = sphere_case()
    device = DeviceRunner(fits=0)
    cpu_calls = []

    def cpu_runner() -> Runner:
        cpu_calls.append(1)
        return Runner(threshold_margin, 1, "openvino")

    segmenter = Segmenter(runner=Runner(device, 2, "torch"), progress=False, focus_radius=None, fallback=cpu_runner)
    mask = segmenter.predict(image, geometry)
    np.testing.assert_array_equal(mask, reference)
    assert cpu_calls == [1] and device.sizes == [2, 1]
    assert segmenter.last_warnings[-1].startswith("cuda_out_of_memory: out of device memory with one window per batch")
    assert "computed on the CPU" in segmenter.last_warnings[-1]


def test_without_a_cpu_fallback_the_error_is_raised():
    image, geometry = sphere_case()
    segmenter = Segmenter(runner=Runner(DeviceRunner(fits=0), 1, "torch"), progress=False)
    with pytest.raises(torch.OutOfMemoryError):
        segmenter.predict(image, geometry)


def test_other_runner_errors_are_not_retried():
    image, geometry = sphere_case()
    calls = []

    def broken(batch):
        calls.append(len(batch))
        raise RuntimeError("shape mismatch in the network")

    segmenter = Segmenter(runner=Runner(broken, 4, "torch"), progress=False, fallback=lambda: Runner(threshold_margin, 1, "x"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        segmenter.predict(image, geometry)
    assert calls == [4]


def test_out_of_memory_while_resampling_on_the_device_redoes_the_case_on_the_cpu(reference, monkeypatch):
    """On CUDA the resampling runs on the device; a fake device path that runs out of memory."""
    image, geometry = sphere_case()
    moved = []

    def to_device(self, array, device):
        if device.startswith("cuda"):
            moved.append(device)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return array

    monkeypatch.setattr(Segmenter, "_to_device", to_device)
    monkeypatch.setattr(segmenter_module, "_release_device_memory", lambda: None)
    segmenter = Segmenter(runner=Runner(threshold_margin, 4, "torch"), progress=False, focus_radius=None,
                          device="cuda:0")
    mask = segmenter.predict(image, geometry)
    np.testing.assert_array_equal(mask, reference)
    assert moved == ["cuda:0"]
    assert segmenter.last_warnings == ["cuda_out_of_memory: out of device memory while resampling or inverting; "
                                       "the case was computed again on the CPU (slower)"]


def test_what_counts_as_out_of_memory():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : CUDA failure 2: out of memory"))
    assert not is_out_of_memory(RuntimeError("expected 5D input"))
    assert not is_out_of_memory(ValueError("bad shape"))


def test_inversion_in_slabs_equals_one_pass(monkeypatch):
    """The inversion interpolates the spleen's box in slabs: the mask is the same voxel for voxel."""
    rng = np.random.default_rng(3)
    margin = rng.normal(size=(30, 28, 20)).astype(np.float32) + 0.3
    grid_affine = np.diag([1.5, 1.5, 2.0, 1.0])
    ras_affine = np.diag([0.7, 0.8, 1.1, 1.0])
    ras_shape = (64, 52, 36)
    whole = invert_margin(margin, grid_affine, ras_shape, ras_affine)
    monkeypatch.setattr(segmenter_module, "INVERT_SLAB_VOXELS", 700)  # a slab of one or two planes
    slabs = invert_margin(margin, grid_affine, ras_shape, ras_affine)
    assert int(whole.sum()) > 10_000
    np.testing.assert_array_equal(slabs, whole)
