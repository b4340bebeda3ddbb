import json
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from spleen_seg.config import RECIPE
from spleen_seg.training.bundle import CONFIG_FILES, LOGGING_CONF, bundle_configs, render_json

CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs"


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


def test_msd_header_fix_mirrors_world_x_and_y_only_when_enabled():
    import numpy as np
    import torch
    from monai.data import MetaTensor

    from spleen_seg.training.transforms import FixMSDOrientationd

    affine = torch.tensor([[1.5, 0, 0, -200.0], [0, 1.5, 0, -180.0], [0, 0, 2.0, 30.0], [0, 0, 0, 1]], dtype=torch.float64)
    data = {"image": MetaTensor(torch.zeros(1, 4, 4, 4), affine=affine.clone()),
            "label": MetaTensor(torch.zeros(1, 4, 4, 4), affine=affine.clone())}
    unchanged = FixMSDOrientationd(["image", "label"], enabled=False)(data)
    np.testing.assert_allclose(unchanged["image"].affine.numpy(), affine.numpy())
    fixed = FixMSDOrientationd(["image", "label"], enabled=True)(data)
    for key in ("image", "label"):
        expected = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine.numpy()
        np.testing.assert_allclose(fixed[key].affine.numpy(), expected)
    # A voxel at world x = -100 mm (patient's left in RAS+) under the MSD header lies at +100 mm.
    voxel = np.array([(-100.0 + 200.0) / 1.5, 0, 0, 1])
    assert (affine.numpy() @ voxel)[0] == pytest.approx(-100.0)
    assert (fixed["image"].affine.numpy() @ voxel)[0] == pytest.approx(100.0)


def test_train_json_applies_the_msd_fix_after_loading(tmp_path):
    import nibabel as nib
    import numpy as np

    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    for name in ("image", "label"):
        nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), affine), str(tmp_path / f"{name}.nii.gz"))
    files = {"image": str(tmp_path / "image.nii.gz"), "label": str(tmp_path / "label.nii.gz")}
    for enabled, sign in ((False, 1.0), (True, -1.0)):
        parser = ConfigParser(bundle_configs()["train.json"])
        parser["fix_msd_orientation"] = enabled
        load, fix = parser.get_parsed_content("train#deterministic_transforms")[:2]
        data = fix(load(files))
        assert data["image"].affine[0, 0].item() == pytest.approx(sign * 1.5)
        assert data["label"].affine[1, 1].item() == pytest.approx(sign * 1.5)
        assert data["image"].affine[2, 2].item() == pytest.approx(2.0)
