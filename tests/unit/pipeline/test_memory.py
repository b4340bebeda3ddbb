"""The memory estimate against what the pipeline allocates, the guard, read-ahead, cgroup limits."""

import tracemalloc

import nibabel as nib
import numpy as np
import pytest
from memory_trace import traced_peak

from spleen_seg.errors import ConfigError, ResourceError
from spleen_seg.io.nifti import Geometry, read_volume, write_mask
from spleen_seg.outputs.report import build_report, keep_components
from spleen_seg.pipeline import memory
from spleen_seg.pipeline.backends import Runner
from spleen_seg.pipeline.memory import can_prefetch, estimate_case_memory, require_case_memory
from spleen_seg.pipeline.segmenter import Segmenter

MB = 1 << 20
LPS_SPACING = np.diag([-0.8, -0.8, 1.0, 1.0])


def _body_ct(shape) -> np.ndarray:
    """int16 CT-like volume: air around an elliptic body (40 HU) holding a brighter blob."""
    x, y, z = (np.linspace(-1, 1, n, dtype=np.float32) for n in shape)
    x, y, z = x[:, None, None], y[None, :, None], z[None, None, :]
    body = np.where(x**2 + y**2 < 0.8, 40, -1000) + np.where((x - 0.3) ** 2 + (y + 0.2) ** 2 + z**2 < 0.1, 80, 0)
    return body.astype(np.int16)


def test_estimate_bounds_what_a_case_allocates(tmp_path):
    """A whole case (read, segment, report, mask) under tracemalloc, which sees numpy's
    allocations: the estimate is an upper bound of the same order as the measured peak."""
    import scipy.ndimage  # noqa: F401  (imported before measuring, as in a batch after its first case)
    import tqdm  # noqa: F401

    shape = (256, 256, 160)
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(_body_ct(shape), LPS_SPACING), str(path))
    segmenter = Segmenter(runner=Runner(lambda batch: batch - 0.5, 4, "threshold"), progress=False)
    tracemalloc.start()
    try:
        array, geometry = read_volume(path)
        mask = segmenter.predict(array, geometry, path)
        components = keep_components(mask, False)
        build_report("c", str(path), components.mask, array, geometry, components)
        write_mask(components.mask, geometry, tmp_path / "mask.nii.gz")
        _, measured = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    estimate = estimate_case_memory(shape, LPS_SPACING)
    assert estimate.grid_shape == (137, 137, 80)
    assert int(mask.sum()) > 1000
    assert 0.4 * estimate.peak_bytes < measured <= estimate.peak_bytes, (measured, estimate)


def test_whole_body_ct_estimate_is_within_the_8_gb_budget():
    """512 x 512 x 2000 at 0.78 x 0.78 x 1 mm: 2.1 GB of float32 volume, about twice that at the peak."""
    estimate = estimate_case_memory((512, 512, 2000), (0.78125, 0.78125, 1.0))
    assert estimate.read_bytes == 512 * 512 * 2000 * 4
    assert estimate.grid_shape == (267, 267, 1000)
    assert 1.5 * estimate.read_bytes < estimate.peak_bytes < 2.2 * estimate.read_bytes
    assert estimate.peak_stage == "resample"


def test_guard_refuses_a_case_that_does_not_fit_before_allocating(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: 100 * MB)
    geometry = Geometry(shape=(512, 512, 2000), affine_ras=np.diag([0.78125, 0.78125, 1.0, 1.0]))
    segmenter = Segmenter(runner=Runner(lambda batch: batch - 0.5, 4, "threshold"), progress=False)
    tracemalloc.start()
    try:
        with pytest.raises(ResourceError) as err:
            segmenter.predict(np.zeros((2, 2, 2), np.float32), geometry, "big.nii.gz")
        _, traced = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(err.value)
    assert message.startswith("big.nii.gz: needs ~") and "104.9 MB free" in message
    needed_gb = float(message.split("needs ~")[1].split(" GB")[0])
    assert 1.0 < needed_gb < 3.0  # beyond the already loaded 2.1 GB volume
    assert "512x512x2000 voxels, 267x267x1000 after resampling" in message and "\n" not in message
    assert traced < 4 * MB


def test_guard_lets_a_fitting_case_through(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: 64 << 30)
    result = require_case_memory((512, 512, 300), (0.8, 0.8, 1.0), "ct.nii.gz")
    assert result.peak_bytes > result.read_bytes == 512 * 512 * 300 * 4


def test_read_ahead_only_when_the_next_read_and_the_running_case_fit(monkeypatch):
    running = estimate_case_memory((512, 512, 400), (0.8, 0.8, 1.0))
    next_read = memory.read_peak_bytes((512, 512, 400))
    free = running.after_read_bytes + next_read + memory.HEADROOM_BYTES
    monkeypatch.setattr(memory, "available_bytes", lambda: free)
    assert can_prefetch((512, 512, 400), running)
    assert not can_prefetch((512, 512, 401), running)
    assert can_prefetch((512, 512, 500), None)  # nothing running: the read alone fits
    assert not can_prefetch((512, 512, 1600), None)


@pytest.mark.parametrize("files, expected", [
    ({"memory.max": "1000000000", "memory.current": "600000000", "memory.stat": "anon 1\ninactive_file 100000000\n"},
     500_000_000),
    ({"memory.limit_in_bytes": "1000000000", "memory.usage_in_bytes": "900000000",
      "memory.stat": "cache 5\ntotal_inactive_file 50000000\n"}, 150_000_000),
    ({"memory.max": "max", "memory.current": "600000000"}, None),
    ({"memory.limit_in_bytes": "9223372036854771712", "memory.usage_in_bytes": "1"}, None),
])
def test_cgroup_limit_caps_available_memory(tmp_path, monkeypatch, files, expected):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(memory, "_cgroup_folders", lambda: [tmp_path])
    assert memory._cgroup_free_bytes() == expected
    import psutil

    machine = psutil.virtual_memory().available
    assert memory.available_bytes() <= machine
    if expected is not None and expected < machine:
        assert memory.available_bytes() == expected


def test_memory_limit_env_caps_available_memory(monkeypatch):
    """SPLEEN_SEG_MEMORY_LIMIT: a limit on this process's memory, less what it already holds."""
    import psutil

    monkeypatch.setenv(memory.MEMORY_LIMIT_ENV, "1.5G")
    assert memory.memory_limit_bytes() == 3 << 29
    # The limit is set above what this process holds now (in a full suite it holds more than 1.5 GiB)
    limit = psutil.Process().memory_info().rss + 512 * MB
    monkeypatch.setenv(memory.MEMORY_LIMIT_ENV, str(limit))
    free = memory.available_bytes()
    resident = psutil.Process().memory_info().rss
    assert 400 * MB < free <= limit - resident + 16 * MB  # the RSS moves a little between the two reads
    monkeypatch.setenv(memory.MEMORY_LIMIT_ENV, "100000")
    assert memory.available_bytes() == 0  # the process already holds more
    monkeypatch.setenv(memory.MEMORY_LIMIT_ENV, "512MiB")
    assert memory.memory_limit_bytes() == 512 * MB
    # The node's --spool-quota grammar: GB decimal, as format_bytes prints it
    from spleen_seg.node.settings import parse_size

    for text in ("8GB", "8G", "8 gib", "2.5 kb", "4096"):
        monkeypatch.setenv(memory.MEMORY_LIMIT_ENV, text)
        assert memory.memory_limit_bytes() == parse_size(text)
    assert memory.memory_limit_bytes() == 4096 and parse_size("8GB") == 8 * 10**9
    for bad in ("lots", "8 X", "-1G"):
        monkeypatch.setenv(memory.MEMORY_LIMIT_ENV, bad)
        with pytest.raises(ConfigError, match=f"SPLEEN_SEG_MEMORY_LIMIT='{bad}': expected a memory size"):
            memory.available_bytes()


def test_a_dicom_series_that_declares_too_much_is_refused_from_its_headers(tmp_path, monkeypatch):
    """An uncompressed series whose headers declare 4096 x 4096 pixels a slice (the files hold
    little): refused by the same estimate and message as a NIfTI file, before any pixel is read."""
    import pydicom
    from synthetic_dicom import only_series, random_volume, write_series

    from spleen_seg.batch.inputs import load_input

    for path in write_series(tmp_path / "ct", random_volume(shape=(8, 8, 20))):
        ds = pydicom.dcmread(path)
        ds.Rows = ds.Columns = 4096
        ds.save_as(path)
    series = only_series(tmp_path / "ct")
    monkeypatch.setattr(memory, "available_bytes", lambda: 2 << 30)
    err, traced = traced_peak(lambda: load_input(series))
    assert isinstance(err, ResourceError), err
    assert traced < 4 * MB  # nothing volume-sized: 1.3 GB of float32 voxels were declared
    message = str(err)
    assert message.startswith(f"series {series.series_uid} in {series.folder}: needs ~")
    assert "(its 4096x4096x20 voxels, " in message and "2.1 GB free: free memory or run it on a larger machine" in message
    # The NIfTI guard's words exactly, for the same geometry.
    spacing = (0.8, 0.7, 2.0)  # write_series: between columns, rows and slices
    with pytest.raises(ResourceError) as nifti_err:
        require_case_memory((4096, 4096, 20), spacing, "ct.nii.gz", volume_loaded=False)
    assert message.split(": needs ", 1)[1] == str(nifti_err.value).split(": needs ", 1)[1]
