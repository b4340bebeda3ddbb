"""Flip TTA: axes parsing, TTA equal to plain inference for a mirror-symmetric network and input,
the average of the mirrored predictions otherwise, and the bundle's inferer equal to the segmenter's."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from spleen_seg.errors import ConfigError
from spleen_seg.io.nifti import Geometry
from spleen_seg.pipeline import network
from spleen_seg.pipeline.backends import Runner
from spleen_seg.pipeline.network import sidecar_path
from spleen_seg.pipeline.segmenter import Segmenter
from spleen_seg.pipeline.tta import (
    FLAG_TTA_UNTRAINED,
    MirroredInferer,
    bundle_inferer,
    check_tta_axes,
    flip_combinations,
    mirrored_margin,
    parse_tta_axes,
    weights_flip_record,
)
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


# ----------------------------------------------------------------------------- the weights' record decides
def _weights(tmp_path, record: dict | list | None = None, name: str = "model.pt") -> Path:
    """A weights file (its bytes matter only for the checksum) with ``record`` as its sidecar."""
    path = tmp_path / name
    path.write_bytes(b"stand-in weights: only their checksum and sidecar are read")
    if record is not None:
        sidecar_path(path).write_text(json.dumps(record))
    return path


def test_weights_without_a_record_or_the_official_ones_count_as_trained_without_flips(tmp_path, monkeypatch):
    weights = _weights(tmp_path)
    record = weights_flip_record(weights)
    assert (record.trained_with_flips, record.safe_axes) == (False, "") and record.source.startswith("no record")
    monkeypatch.setattr(network, "OFFICIAL_WEIGHTS_MD5", hashlib.md5(weights.read_bytes()).hexdigest())
    record = weights_flip_record(weights)
    assert (record.trained_with_flips, record.safe_axes) == (False, "") and "released weights" in record.source
    with pytest.raises(ConfigError, match=r"were not trained with flips \(the model zoo's released weights"):
        check_tta_axes(weights, "xyz", explicit=False)


def test_plain_tta_on_such_weights_is_refused_in_one_line_and_named_axes_warn(tmp_path):
    weights = _weights(tmp_path)
    with pytest.raises(ConfigError) as refused:
        check_tta_axes(weights, "xyz", explicit=False)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"--tta refused: {weights} were not trained with flips")
    assert "--tta-axes" in message and '"trained_with_flips": true' in message and "none declared" in message
    warning = check_tta_axes(weights, "z", explicit=True)
    assert warning is not None and "\n" not in warning
    assert warning.startswith(f"{FLAG_TTA_UNTRAINED}: flip TTA along z, but {weights} were not trained with flips")
    assert check_tta_axes(weights, "", explicit=False) is None  # no TTA: nothing to decide


def test_a_record_allows_tta_on_the_axes_it_declares(tmp_path):
    trained = _weights(tmp_path, {"trained_with_flips": True}, "trained.pt")
    assert weights_flip_record(trained).safe_axes == "xyz"
    assert check_tta_axes(trained, "xyz", explicit=False) is None
    only_z = _weights(tmp_path, {"trained_with_flips": True, "safe_tta_axes": "z"}, "only_z.pt")
    with pytest.raises(ConfigError, match="trained with flips along z only.*declare safe \\(z\\)"):
        check_tta_axes(only_z, "xyz", explicit=False)
    assert check_tta_axes(only_z, "z", explicit=True) is None
    assert "flip TTA along x, but" in (check_tta_axes(only_z, "xz", explicit=True) or "")
    # Weights trained without flips may still declare an axis safe (a network symmetric along it).
    declared = _weights(tmp_path, {"trained_with_flips": False, "safe_tta_axes": "z"}, "declared.pt")
    assert check_tta_axes(declared, "z", explicit=True) is None


@pytest.mark.parametrize(("record", "match"), [
    ({"trained_with_flips": "yes"}, "'trained_with_flips' must be true or false, got 'yes'"),
    ({"trained_with_flips": True, "safe_tta_axes": "w"}, "'safe_tta_axes': TTA axes must be"),
    ({"trained_with_flips": True, "safe_tta_axes": 3}, "'safe_tta_axes' must be a string"),
    ([True], "not a JSON object \\(a JSON list\\)"),
])
def test_an_invalid_flip_record_is_refused_naming_the_sidecar(tmp_path, record, match):
    weights = _weights(tmp_path, record)
    with pytest.raises(ConfigError, match=f"model\\.pt\\.json: .*{match}"):
        check_tta_axes(weights, "z", explicit=True)


def test_load_segmenter_decides_before_any_model_loads_and_reports_the_warning(tmp_path, monkeypatch):
    # load_segmenter is what segment, compare, the Ray actors and library callers go through.
    import spleen_seg.pipeline.segmenter as segmenter_module
    from spleen_seg.pipeline.segmenter import load_segmenter

    loaded: list[Path] = []

    def make_runner(weights, *args, **kwargs):
        loaded.append(weights)
        return Runner(box_blur_margin, 4, "test")

    monkeypatch.setattr(segmenter_module, "make_runner", make_runner)
    weights = _weights(tmp_path)
    with pytest.raises(ConfigError, match="--tta refused"):
        load_segmenter(weights, "cpu", tta_axes="xyz", tta_axes_explicit=False)
    assert loaded == []
    image, geometry = _symmetric_ball()
    segmenter = load_segmenter(weights, "cpu", progress=False, tta_axes="z")  # named axes, as --tta-axes
    assert loaded == [weights] and segmenter.tta_warning is not None
    assert int(segmenter.predict(image, geometry).sum()) > 0
    assert segmenter.last_warnings == [segmenter.tta_warning]
    plain = load_segmenter(weights, "cpu", progress=False)
    plain.predict(image, geometry)
    assert plain.tta_warning is None and plain.last_warnings == []


def test_the_bundle_inferer_warns_for_weights_without_flips(tmp_path, caplog):
    from monai.inferers import SlidingWindowInferer

    plain = SlidingWindowInferer(roi_size=(32, 32, 32))
    with caplog.at_level(logging.WARNING, logger="spleen_seg.pipeline.tta"):
        assert isinstance(bundle_inferer(plain, "z", _weights(tmp_path)), MirroredInferer)
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [FLAG_TTA_UNTRAINED]
    caplog.clear()
    trained = _weights(tmp_path, {"trained_with_flips": True}, "trained.pt")
    with caplog.at_level(logging.WARNING, logger="spleen_seg.pipeline.tta"):
        bundle_inferer(plain, "xyz", trained)
        assert bundle_inferer(plain, "", trained) is plain
    assert caplog.records == []
    # Through inference.json: the inferer reads the checkpoint the bundle loads.
    from monai.bundle import ConfigParser

    from spleen_seg.training.bundle import inference_config

    (tmp_path / "models").mkdir()
    _weights(tmp_path / "models")
    parser = ConfigParser(inference_config())
    parser["bundle_root"], parser["tta_axes"] = str(tmp_path), "x"
    with caplog.at_level(logging.WARNING, logger="spleen_seg.pipeline.tta"):
        assert isinstance(parser.get_parsed_content("evaluator#inferer"), MirroredInferer)
    assert [r.getMessage() for r in caplog.records] == [check_tta_axes(tmp_path / "models" / "model.pt", "x",
                                                                       explicit=True)]
