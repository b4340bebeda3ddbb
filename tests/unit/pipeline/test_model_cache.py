"""The export cache: keyed by weights, spleen-seg version and runtime version; damage is rebuilt, never a crash."""

import json
import logging

import numpy as np
import pytest
import torch

import spleen_seg
from spleen_seg.pipeline import backends, network
from spleen_seg.pipeline.backends import cache_path, cached_export, load_cached, make_runner
from spleen_seg.pipeline.export import margin_module

FORMAT_OF = {"torch": "torchscript_margin", "onnx": "onnx", "openvino": "openvino"}


def _small_network(config=None):
    """One convolution to two channels: each export takes a fraction of the bundle UNet's
    time, and the cache logic under test is the same."""
    return torch.nn.Conv3d(1, 2, kernel_size=3, padding=1)


@pytest.fixture(scope="module", autouse=True)
def small_network():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(network, "build", _small_network)
        yield


@pytest.fixture(scope="module")
def weights(tmp_path_factory, small_network):
    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("w") / "model.pt"
    torch.save(_small_network().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def window_and_margin(weights):
    window = np.random.default_rng(1).random((1, 1, 96, 96, 96), dtype=np.float32)
    with torch.inference_mode():
        return window, margin_module(weights, "cpu")(torch.from_numpy(window)).numpy()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache folder for the module: each format is exported once, then damaged and rebuilt."""
    folder = tmp_path_factory.mktemp("model_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(backends.CACHE_ENV, str(folder))
        yield folder


def test_cache_name_changes_with_weights_version_and_runtime(weights, cache, tmp_path, monkeypatch):
    path = cache_path(weights, "openvino")
    assert path.parent == cache and path.suffix == ".xml"
    from spleen_seg.io.download import file_sha256

    assert file_sha256(weights)[:16] in path.name and "openvino-" in path.name
    other = tmp_path / "other.pt"
    other.write_bytes(weights.read_bytes() + b"\0")
    names = {path.name, cache_path(other, "openvino").name}
    monkeypatch.setattr(spleen_seg, "__version__", "9.9.9")
    names.add(cache_path(weights, "openvino").name)
    assert "spleen-seg-9-9-9" in cache_path(weights, "openvino").name
    monkeypatch.setattr("importlib.metadata.version", lambda package: "1.2.3")
    names.add(cache_path(weights, "openvino").name)
    assert "openvino-1-2-3" in cache_path(weights, "openvino").name
    assert len(names) == 4


def _damage(path, how):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 3])
    elif how == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(len(data)))
    else:  # "missing"
        path.unlink()


@pytest.mark.parametrize("backend, damaged, how", [
    ("torch", ".ts", "truncated"),
    ("onnx", ".onnx", "garbage"),
    ("openvino", ".xml", "truncated"),
    ("openvino", ".bin", "garbage"),
    ("openvino", ".bin", "missing"),
])
def test_damaged_cache_file_is_rebuilt_with_one_warning(weights, window_and_margin, cache, caplog, backend,
                                                         damaged, how):
    window, expected = window_and_margin
    make_runner(weights, backend, "cpu")  # exported (or already cached)
    dest = cache_path(weights, FORMAT_OF[backend])
    _damage(dest.with_suffix(damaged), how)
    with caplog.at_level(logging.WARNING, logger=backends.__name__):
        runner = make_runner(weights, backend, "cpu")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "incomplete or damaged" in warnings[0] and dest.name in warnings[0]
    np.testing.assert_allclose(runner(window), expected, atol=1e-3)
    manifest = json.loads(dest.with_name(dest.name + ".manifest.json").read_text())
    assert manifest["files"][dest.name]["bytes"] == dest.stat().st_size


def test_file_that_matches_its_manifest_but_does_not_load_is_rebuilt(weights, window_and_margin, cache, caplog):
    """Damage the manifest cannot see (written by another tool): the runtime's load error rebuilds once."""
    import onnxruntime as ort

    dest = cached_export(weights, "onnx")
    dest.write_bytes(b"not an onnx graph")
    manifest_path = dest.with_name(dest.name + ".manifest.json")
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][dest.name] = backends._file_record(dest)
    manifest_path.write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger=backends.__name__):
        session = load_cached(weights, "onnx", "fp32", lambda path: ort.InferenceSession(str(path)))
    assert [r.getMessage() for r in caplog.records if "could not be loaded" in r.getMessage()]
    window, expected = window_and_margin
    np.testing.assert_allclose(session.run(None, {"image": window})[0], expected, atol=1e-3)


def test_a_loader_that_always_fails_raises_after_one_rebuild(weights, cache):
    calls = []

    def broken(path):
        calls.append(path)
        raise RuntimeError("runtime cannot read this model")

    with pytest.raises(RuntimeError, match="cannot read"):
        load_cached(weights, "onnx", "fp32", broken)
    assert len(calls) == 2
