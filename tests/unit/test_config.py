import json
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from spleen_seg.config import CONFIG_FILES, LOGGING_CONF, RECIPE, bundle_configs, render_json

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_committed_bundle_json_equals_generator(name):
    committed = (CONFIG_DIR / name).read_text()
    assert committed == render_json(bundle_configs()[name]), f"configs/{name} drifted: run `make configs`"


def test_committed_logging_conf_equals_generator():
    assert (CONFIG_DIR / "logging.conf").read_text() == LOGGING_CONF


def test_recipe_values_reach_the_bundle():
    train = bundle_configs()["train.json"]
    infer = bundle_configs()["inference.json"]
    spacing = [t for t in infer["preprocessing"]["transforms"] if t["_target_"] == "Spacingd"][0]
    assert spacing["pixdim"] == [1.5, 1.5, 2.0]
    window = [t for t in infer["preprocessing"]["transforms"] if t["_target_"] == "ScaleIntensityRanged"][0]
    assert (window["a_min"], window["a_max"], window["b_min"], window["b_max"]) == (-57.0, 164.0, 0.0, 1.0)
    assert infer["inferer"] == {"_target_": "SlidingWindowInferer", "roi_size": [96, 96, 96], "sw_batch_size": 4, "overlap": 0.5}
    assert train["network_def"] == infer["network_def"]
    assert train["network_def"]["channels"] == [16, 32, 64, 128, 256]
    assert train["optimizer"]["lr"] == 0.002 and train["optimizer"]["_target_"] == "Novograd"
    crop = train["train"]["random_transforms"][0]
    assert crop["num_samples"] == 4 and crop["spatial_size"] == [96, 96, 96]
    assert RECIPE.training.val_count == train["val_count"] == 9


def test_network_def_instantiates_the_reference_unet():
    parser = ConfigParser(bundle_configs()["inference.json"])
    net = parser.get_parsed_content("network_def")
    assert sum(p.numel() for p in net.parameters()) == 4808917


def test_json_is_valid_and_round_trips():
    for name, content in bundle_configs().items():
        assert json.loads(render_json(content)) == json.loads(json.dumps(content)), name
