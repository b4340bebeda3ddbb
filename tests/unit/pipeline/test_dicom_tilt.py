"""Gantry tilt: the series is read with a sheared affine and segmented on its own grid, so the
mask and the SEG lie exactly on the source slices (io.dicom documents why it is not resampled)."""

import numpy as np
import pydicom
import pytest
from synthetic_dicom import ORIGIN, dciodvfy, only_series, write_series

from spleen_seg.io.dicom_volume import read_series
from spleen_seg.io.nifti import Geometry
from spleen_seg.io.seg import AlgorithmInfo, write_dicom_seg
from spleen_seg.pipeline.backends import Runner
from spleen_seg.pipeline.segmenter import Segmenter

TILT_DEG = 15.0
# A threshold network: spleen wherever the windowed HU (-57..164 -> 0..1) exceeds 0.5, i.e. 53.5 HU.
THRESHOLD = 0.5
INSIDE_HU, OUTSIDE_HU = 150.0, -100.0


def threshold_segmenter() -> Segmenter:
    return Segmenter(runner=Runner(lambda batch: batch - THRESHOLD, batch_size=4, backend="test"), progress=False)


def write_tilted_series(folder, pixel_mm: float, step_mm: float, shape=(40, 36, 24)):
    """An ellipsoid written slice by slice with each slice shifted along y by step * sin(tilt):
    the positions lie on a line at TILT_DEG to the slice normal, ``step_mm`` apart."""
    tilt = np.deg2rad(TILT_DEG)
    grid = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij"))
    inside = ((grid / (np.asarray(shape)[:, None, None, None] / 3.0)) ** 2).sum(0) <= 1
    image = np.where(inside, INSIDE_HU, OUTSIDE_HU).astype(np.float32)
    step = np.array([0.0, np.sin(tilt), np.cos(tilt)]) * step_mm
    paths = write_series(folder, image, spacing=(pixel_mm, pixel_mm, step[2]), extra={"GantryDetectorTilt": TILT_DEG})
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient = [f"{v:.6f}" for v in np.asarray(ORIGIN) + k * step]
        ds.save_as(path)
    return image, inside.astype(np.uint8), paths


def test_tilted_series_is_segmented_on_its_source_slices(tmp_path):
    # 1.5 x 1.5 mm pixels, slices 2.0 mm apart along the tilted line: the network's own grid,
    # so with a sheared affine kept as it is, resampling is the identity and the mask is exact.
    image, truth, paths = write_tilted_series(tmp_path / "ct", pixel_mm=1.5, step_mm=2.0)
    series = only_series(tmp_path / "ct")
    array, geometry = read_series(series)
    np.testing.assert_array_equal(array, image)
    assert abs(geometry.affine_ras[1, 2]) > 0.5  # sheared: the slice step has a y component
    mask = threshold_segmenter().predict(array, geometry)
    np.testing.assert_array_equal(mask, truth)

    dest = write_dicom_seg(mask, series, tmp_path / "seg.dcm", AlgorithmInfo("spleen-seg", "0.1.0", "ab" * 32))
    seg = pydicom.dcmread(dest)
    sources = {pydicom.dcmread(p).SOPInstanceUID: (k, pydicom.dcmread(p)) for k, p in enumerate(series.files)}
    decoded = np.zeros_like(mask)
    frames = seg.pixel_array.reshape(-1, mask.shape[1], mask.shape[0])
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        k, source = sources[item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        np.testing.assert_allclose(np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float),
                                   np.asarray(source.ImagePositionPatient, float), atol=1e-4)
        decoded[:, :, k] = frame.T
    np.testing.assert_array_equal(decoded, mask)
    errors, _ = dciodvfy(dest)
    assert errors == []


@pytest.mark.parametrize("pixel_mm, step_mm", [(0.9, 2.5), (1.2, 1.25)])
def test_tilted_series_segments_as_its_grid_does_without_the_tilt(tmp_path, pixel_mm, step_mm):
    """Off the network's grid the pipeline resamples along the grid's own (sheared) axes, so the
    mask in voxel indices equals that of the same voxels with the shear removed; resampling
    into world axes instead would make them differ."""
    image, truth, _ = write_tilted_series(tmp_path / "ct", pixel_mm=pixel_mm, step_mm=step_mm)
    array, geometry = read_series(only_series(tmp_path / "ct"))
    unsheared = geometry.affine_ras.copy()
    unsheared[:3, 2] = [0.0, 0.0, step_mm]
    segmenter = threshold_segmenter()
    tilted_mask = segmenter.predict(array, geometry)
    straight_mask = segmenter.predict(array, Geometry(shape=geometry.shape, affine_ras=unsheared))
    np.testing.assert_array_equal(tilted_mask, straight_mask)
    dice = 2 * np.logical_and(tilted_mask, truth).sum() / (tilted_mask.sum() + truth.sum())
    assert dice > 0.95
