import pytest
import torch
from monai.networks.nets import UNet

from spleen_seg.errors import ConfigError, WeightsError
from spleen_seg.pipeline.network import build, is_torchscript, load_network, resolve_device, save_fp16_state_dict


def reference_unet() -> torch.nn.Module:
    """Built with the official bundle's literal parameters, independent of our recipe."""
    torch.manual_seed(0)
    return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256),
                strides=(2, 2, 2, 2), num_res_units=2, norm="batch").eval()


@pytest.fixture(scope="module")
def saved_state(tmp_path_factory):
    net = reference_unet()
    path = tmp_path_factory.mktemp("w") / "model.pt"
    torch.save(net.state_dict(), path)
    return net, path


def _same_outputs(a, b, atol=0.0):
    x = torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.allclose(a(x), b(x), atol=atol, rtol=0)


def test_official_state_dict_loads_with_identical_outputs(saved_state):
    net, path = saved_state
    loaded = load_network(path, torch.device("cpu"))
    assert not is_torchscript(path)
    assert _same_outputs(net, loaded)


def test_checkpoint_dict_and_ddp_prefix_are_accepted(saved_state, tmp_path):
    net, _ = saved_state
    wrapped = {"model": {f"module.{k}": v for k, v in net.state_dict().items()}, "epoch": torch.tensor(3)}
    path = tmp_path / "ckpt.pt"
    torch.save(wrapped, path)
    assert _same_outputs(net, load_network(path, torch.device("cpu")))


def test_torchscript_model_ts_loads(saved_state, tmp_path):
    net, _ = saved_state
    path = tmp_path / "model.ts"
    torch.jit.script(net).save(str(path))
    assert is_torchscript(path)
    assert _same_outputs(net, load_network(path, torch.device("cpu")), atol=1e-5)


def test_fp16_state_dict_loads_close(saved_state, tmp_path):
    net, _ = saved_state
    path = tmp_path / "half.pt"
    save_fp16_state_dict(net.state_dict(), path)
    assert all(v.dtype == torch.float16 for v in torch.load(path, weights_only=True).values() if v.is_floating_point())
    assert _same_outputs(net, load_network(path, torch.device("cpu")), atol=5e-2)


def test_build_matches_reference_parameter_names():
    assert list(build().state_dict()) == list(reference_unet().state_dict())


@pytest.mark.parametrize("content, message", [
    (b"not a torch file", "not a readable PyTorch weights file"),
])
def test_unreadable_weights_rejected(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match=message):
        load_network(path, torch.device("cpu"))


def test_wrong_architecture_rejected(tmp_path):
    other = UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(8, 16), strides=(2,))
    path = tmp_path / "other.pt"
    torch.save(other.state_dict(), path)
    with pytest.raises(WeightsError, match="do not fit"):
        load_network(path, torch.device("cpu"))


def test_missing_weights_rejected(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_network(tmp_path / "nope.pt", torch.device("cpu"))


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ConfigError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")
