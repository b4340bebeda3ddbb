"""``train --init-weights``: the file is checked before training as the network will load it, the
network starts from exactly those weights, and the orientation convention they learned carries over
(or the run is refused when the dataset teaches the other one)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from monai.networks.nets import UNet

from spleen_seg.errors import ConfigError, DatasetError, WeightsError
from spleen_seg.io.download import file_sha256
from spleen_seg.pipeline.network import SIDECAR_KEY, build, demo_weights_path, sidecar_path
from spleen_seg.training.bundle import bundle_configs
from spleen_seg.training.data import dataset_orientation_convention
from spleen_seg.training.train import INIT_RECORD, InitWeights, check_init_weights, start_from, trained_convention


def test_the_init_weights_are_checked_as_the_network_loads_them(tmp_path):
    demo = check_init_weights(demo_weights_path())
    assert demo == InitWeights(path=demo_weights_path().resolve(), sha256=file_sha256(demo_weights_path()),
                               orientation_convention="true")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    other = tmp_path / "other.pt"
    torch.save(UNet(3, 1, 2, channels=(4, 8), strides=(2,)).state_dict(), other)
    scripted = tmp_path / "model.ts"
    torch.jit.save(torch.jit.script(torch.nn.Conv3d(1, 2, 1)), str(scripted))
    for path, message in ((garbage, "not a readable PyTorch weights file (UnpicklingError)"),
                          (other, "weights do not fit the bundle's UNet: Error(s) in loading state_dict"),
                          (scripted, "a TorchScript file holds a compiled network, not weights to start from"),
                          (tmp_path / "missing.pt", "weights file not found")):
        with pytest.raises(WeightsError, match="^" + re.escape(f"{path}: {message}")):
            check_init_weights(path)
    # A checkpoint with the state under "model" (ignite's), as the official model.pt's loading rules allow.
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"model": build().state_dict(), "epoch": 3}, checkpoint)
    msd = tmp_path / "msd.pt"
    torch.save(build().state_dict(), msd)
    sidecar_path(msd).write_text(json.dumps({SIDECAR_KEY: "msd"}))
    assert check_init_weights(checkpoint).orientation_convention == "true"
    assert check_init_weights(msd).orientation_convention == "msd"


def test_start_from_copies_the_weights_into_a_wrapped_network_and_records_them(tmp_path):
    network = build()
    wrapper = SimpleNamespace(module=network)  # what DDP looks like to start_from
    parameters = [id(p) for p in network.parameters()]
    start_from(wrapper, str(demo_weights_path()), str(tmp_path), fix_msd_orientation=False)
    state = torch.load(demo_weights_path(), map_location="cpu", weights_only=True)
    assert all(torch.equal(network.state_dict()[k], v.float() if v.is_floating_point() else v) for k, v in state.items())
    assert [id(p) for p in network.parameters()] == parameters  # the optimiser's parameters, in place
    record = json.loads((tmp_path / INIT_RECORD).read_text())
    assert record == {"path": str(demo_weights_path().resolve()), "sha256": file_sha256(demo_weights_path()),
                      "orientation_convention": "true"}
    sidecar = json.loads(sidecar_path(tmp_path / "model.pt").read_text())
    assert sidecar[SIDECAR_KEY] == "true" and sidecar["init_weights_sha256"] == record["sha256"]
    empty = tmp_path / "none"
    empty.mkdir()
    start_from(build(), None, str(empty))  # the bundle's default: nothing loaded, nothing written
    assert list(empty.iterdir()) == []


def _init(convention: str) -> InitWeights:
    return InitWeights(path=Path("/w.pt"), sha256="0" * 64, orientation_convention=convention)


@pytest.mark.parametrize(("init", "fix", "dataset", "expected"), [
    (None, False, None, None),  # the reference: no sidecar
    (None, True, None, "true"),
    (None, True, "msd", "true"),
    (None, False, "true", "true"),
    (_init("msd"), False, None, "msd"),  # fine-tuning official weights on MSD data as shipped
    (_init("true"), False, None, "true"),
    (_init("true"), True, "msd", "true"),
    (_init("true"), False, "true", "true"),  # the demo weights on a corrections export
    (_init("msd"), False, "msd", "msd"),
])
def test_the_new_weights_learn_the_convention_the_data_teaches(init, fix, dataset, expected):
    assert trained_convention(init, fix, dataset) == expected


@pytest.mark.parametrize(("init", "fix", "dataset", "message"), [
    (None, True, "true", "would mirror them"),
    (_init("msd"), False, "true", "'msd' orientation convention but the dataset teaches 'true'"),
    (_init("msd"), True, None, "'msd' orientation convention but the dataset teaches 'true'"),
    (_init("true"), False, "msd", "'true' orientation convention but the dataset teaches 'msd'"),
])
def test_contradicting_conventions_are_refused(init, fix, dataset, message):
    with pytest.raises(ConfigError, match=message):
        trained_convention(init, fix, dataset)


def test_a_dataset_declares_its_convention_in_dataset_json(tmp_path):
    assert dataset_orientation_convention(tmp_path) is None
    (tmp_path / "dataset.json").write_text(json.dumps({"training": []}))
    assert dataset_orientation_convention(tmp_path) is None
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [], "orientation_convention": "true"}))
    assert dataset_orientation_convention(tmp_path) == "true"
    (tmp_path / "dataset.json").write_text(json.dumps({"orientation_convention": "sideways"}))
    with pytest.raises(DatasetError, match="sideways"):
        dataset_orientation_convention(tmp_path)


def test_the_bundle_default_starts_from_random_weights_and_validates_after_training():
    train = bundle_configs()["train.json"]
    assert train["init_weights"] is None and train["resume"] is False
    validation = train["train"]["handlers"][0]
    assert validation["_target_"] == "ValidationHandler"
    assert validation["exec_at_start"] == "$@init_weights is not None and not @resume"
    for name in ("train.json", "multi_gpu_train.json"):
        # After the trainer is built (attach_resume), just before it runs: the random initialisation
        # draws from the seeded generator in the same order as without init weights.
        run = bundle_configs()[name]["run"]
        assert run[0].startswith("$spleen_seg.training.train.attach_resume(@train#trainer"), name
        assert run[2].startswith("$spleen_seg.training.train.start_from(@network, @init_weights"), name
        assert run[3] == "$@train#trainer.run()", name
