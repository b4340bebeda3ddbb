"""Flip TTA: axes parsing, TTA equal to plain inference for a mirror-symmetric network and input,
the average of the mirrored predictions otherwise, and the bundle's inferer equal to the segmenter's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from spleen_seg.errors import ConfigError
from spleen_seg.io.nifti import Geometry
from spleen_seg.pipeline.backends import Runner
from spleen_seg.pipeline.segmenter import Segmenter
from spleen_seg.pipeline.tta import MirroredInferer, bundle_inferer, flip_combinations, mirrored_margin, parse_tta_axes
from spleen_seg.pipeline.windows import spleen_margin

ROI = (96, 96, 96)
# 144 = 96 + 48: window starts 0 and 48 along the axis, the same layout read from either end.
SYMMETRIC_SHAPE = (144, 144, 96)
NATIVE_SPACING_MM = (1.5, 1.5, 2.0)  # the preprocessed grid's: resampling is the identity


def box_blur_margin(batch: np.ndarray) -> np.ndarray:
    """A mirror-equivariant network that is not pointwise: 5^3 mean (zero outside the window) minus 0.5."""
    return ndimage.uniform_filter(batch, size=(1, 1, 5, 5, 5), mode="constant") - 0.5


def shifted_margin(batch: np.ndarray) -> np.ndarray:
    """Not mirror-equivariant: looks 6 voxels towards +x."""
    return np.roll(batch, -6, axis=2) - 0.5


def _symmetric_ball() -> tuple[np.ndarray, Geometry]:
    """A 150 HU ball centred in a SYMMETRIC_SHAPE grid at the native spacing: every flip maps it onto itself."""
    grid = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(SYMMETRIC_SHAPE, NATIVE_SPACING_MM,
                                                                            strict=True)], indexing="ij")
    image = np.where(sum(g**2 for g in grid) <= 30.0**2, 150.0, -100.0).astype(np.float32)
    return image, Geometry(shape=image.shape, affine_ras=np.diag([*NATIVE_SPACING_MM, 1.0]))


def test_axes_parse_to_canonical_letters_and_bad_ones_are_refused():
    assert parse_tta_axes("z,x") == "xz" and parse_tta_axes("XYZ") == "xyz" and parse_tta_axes("") == ""
    for bad in ("w", "xx", "x;y"):
        with pytest.raises(ConfigError, match="TTA axes"):
            parse_tta_axes(bad)
    combos = flip_combinations("xyz")
    assert len(combos) == 8 and len(set(combos)) == 8 and combos[0] == ()
    assert flip_combinations("yz") == [(), (1,), (2,), (1, 2)]
    assert parse_tta_axes(("z", "y")) == "yz"  # monai.bundle run --tta_axes y,z passes a tuple


def test_the_bundle_override_turns_the_inferer_into_a_mirrored_one():
    from monai.bundle import ConfigParser
    from monai.inferers import SlidingWindowInferer

    from spleen_seg.training.bundle import inference_config

    for axes, expected in (("", SlidingWindowInferer), ("xyz", MirroredInferer), (("x", "y"), MirroredInferer)):
        parser = ConfigParser(inference_config())
        parser["tta_axes"] = axes
        inferer = parser.get_parsed_content("evaluator#inferer")
        assert type(inferer) is expected, axes
    assert inferer.flips == [(), (0,), (1,), (0, 1)]
    assert isinstance(inferer.inferer, SlidingWindowInferer) and tuple(inferer.inferer.roi_size) == ROI


@pytest.mark.parametrize("focus_radius", [8, None], ids=["focused", "all-windows"])
def test_tta_equals_plain_inference_for_a_mirror_symmetric_network_and_input(focus_radius):
    image, geometry = _symmetric_ball()
    plain = Segmenter(runner=Runner(box_blur_margin, 4, "test"), progress=False, focus_radius=focus_radius)
    tta = Segmenter(runner=Runner(box_blur_margin, 4, "test"), progress=False, focus_radius=focus_radius,
                    tta_axes="xyz")
    plain_mask, tta_mask = plain.predict(image, geometry), tta.predict(image, geometry)
    assert plain_mask.sum() > 10_000
    np.testing.assert_array_equal(tta_mask, plain_mask)
    assert tta.last_windows is not None and plain.last_windows is not None
    assert tta.last_windows.computed == 8 * plain.last_windows.computed
    # Eight identical predictions: nothing to disagree about; what is unsure is the plain margin's.
    assert tta.last_quality is not None and tta.last_quality.method == "flips_and_margin"
    assert tta.last_quality.predictions == 8 and tta.last_quality.disagreeing_voxels == 0
    assert plain.last_quality is not None and plain.last_quality.method == "margin"
    assert (tta.last_quality.region_voxels, tta.last_quality.unsure_voxels) == (
        plain.last_quality.region_voxels, plain.last_quality.unsure_voxels)


def test_tta_averages_the_mirrored_predictions_of_an_asymmetric_network():
    """The same input with a network that looks sideways: TTA is the mean of the mirrored margins, not plain."""
    image, geometry = _symmetric_ball()
    pre = Segmenter(runner=Runner(shifted_margin, 4, "test"), progress=False)
    windowed = pre.preprocess(image, geometry)[0]

    def sliding(view: np.ndarray):
        return spleen_margin(view, Runner(shifted_margin, 4, "test"), ROI, 0.5, 4, None)

    expected = np.mean([np.flip(sliding(np.ascontiguousarray(np.flip(windowed, axes)))[0], axes)
                        for axes in [(), (0,)]], axis=0)
    margin, stats, agreement = mirrored_margin(windowed, sliding, "x")
    np.testing.assert_allclose(margin, expected, atol=1e-6)
    assert agreement is not None and agreement.predictions == 2
    plain = sliding(windowed)[0]
    disagree = (agreement.positive_count == 1).sum()
    assert disagree == ((plain > 0) != (np.flip(sliding(np.ascontiguousarray(windowed[::-1]))[0], 0) > 0)).sum()
    assert disagree > 1000  # the two mirror images see the ball 12 voxels apart
    plain_mask = Segmenter(runner=Runner(shifted_margin, 4, "test"), progress=False).predict(image, geometry)
    tta_mask = Segmenter(runner=Runner(shifted_margin, 4, "test"), progress=False, tta_axes="x").predict(image, geometry)
    assert (plain_mask != tta_mask).sum() > 1000


def test_bundle_inferer_equals_the_segmenters_tta():
    """MirroredInferer around MONAI's SlidingWindowInferer gives the segmenter's TTA margin (all windows)."""
    from monai.inferers import SlidingWindowInferer

    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv3d(2, 2, 3, padding=1)).eval()
    roi = (32, 32, 32)  # a small window keeps the convolutions cheap; the layout logic is the same
    image = np.random.default_rng(0).random((48, 40, 32), dtype=np.float32)

    def runner(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            logits = network(torch.from_numpy(batch))
        return (logits[:, 1:] - logits[:, :1]).numpy()

    def sliding(view: np.ndarray):
        return spleen_margin(view, Runner(runner, 4, "test"), roi, 0.5, 4, None)

    margin, _, _ = mirrored_margin(image, sliding, "xz")
    inferer = bundle_inferer(SlidingWindowInferer(roi_size=roi, sw_batch_size=4, overlap=0.5), "xz")
    assert isinstance(inferer, MirroredInferer)
    with torch.no_grad():
        logits = inferer(torch.from_numpy(image)[None, None], network)
    bundle_margin = (logits[0, 1] - logits[0, 0]).numpy()
    np.testing.assert_allclose(bundle_margin, margin, atol=1e-4)
    plain = SlidingWindowInferer(roi_size=roi, sw_batch_size=4, overlap=0.5)
    assert bundle_inferer(plain, "") is plain
