"""What ``spleen-seg train`` records beside the weights it trains: whether its transforms mirrored the
images (derived from the run's random transforms, the recipe's by default), so flip TTA knows."""

from __future__ import annotations

import json

import pytest

from spleen_seg.config import RECIPE
from spleen_seg.pipeline.network import read_weights_record, weights_orientation_convention, write_weights_record
from spleen_seg.pipeline.tta import check_tta_axes, weights_flip_record
from spleen_seg.training.bundle import train_config
from spleen_seg.training.train import RANDOM_TRANSFORMS_ID, weights_record
from spleen_seg.training.transforms import mirrored_axes, training_random_config

FLIP_X = {"_target_": "RandFlipd", "keys": ["image", "label"], "prob": 0.5, "spatial_axis": 0}


def test_the_recipe_trains_without_flips():
    section, key = RANDOM_TRANSFORMS_ID.split("#")
    recipe_transforms = train_config(RECIPE)[section][key]
    assert recipe_transforms == training_random_config(RECIPE, RECIPE.training)
    assert mirrored_axes(recipe_transforms) == ""
    assert weights_record(recipe_transforms, None) == {"trained_with_flips": False, "safe_tta_axes": ""}


@pytest.mark.parametrize(("flips", "axes"), [
    ([FLIP_X], "x"),
    ([{**FLIP_X, "spatial_axis": [1, -1]}], "yz"),
    ([{**FLIP_X, "spatial_axis": None}], "xyz"),
    ([{"_target_": "monai.transforms.RandAxisFlipd", "keys": "image", "prob": 0.3}], "xyz"),
    ([FLIP_X, {**FLIP_X, "spatial_axis": 2}], "xz"),
    ([{**FLIP_X, "prob": 0.0}], ""),
    ([{**FLIP_X, "prob": "@flip_prob"}], ""),  # not a literal: not counted
    ([{"_target_": "RandFlipd", "keys": "image"}], "xyz"),  # MONAI's defaults: prob 0.1, every axis
])
def test_flips_in_the_random_transforms_are_found(flips, axes):
    transforms = [*training_random_config(RECIPE, RECIPE.training), *flips]
    assert mirrored_axes(transforms) == axes
    assert weights_record(transforms, "true") == {"trained_with_flips": bool(axes), "safe_tta_axes": axes,
                                                "orientation_convention": "true"}


def test_the_record_written_is_the_one_segment_reads(tmp_path):
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"weights")
    (tmp_path / "model.pt.json").write_text(json.dumps({"orientation_convention": "true", "stale": 1}))
    write_weights_record(weights, weights_record([FLIP_X], None))  # new weights: the old record goes
    assert read_weights_record(weights) == {"trained_with_flips": True, "safe_tta_axes": "x"}
    assert weights_orientation_convention(weights) == "true"  # no key: the default, as without a sidecar
    assert weights_flip_record(weights).safe_axes == "x"
    assert check_tta_axes(weights, "x", explicit=False) is None
