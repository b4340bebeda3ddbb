"""Exports (ONNX, OpenVINO, TorchScript) compute the same network as the state dict."""

import numpy as np
import pytest
import torch

from spleen_seg.errors import ConfigError
from spleen_seg.pipeline.backends import cached_export, make_runner, resolve_backend
from spleen_seg.pipeline.export import export_model, margin_module
from spleen_seg.pipeline.network import build, load_network


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(3)
    net = build().eval()
    path = tmp_path_factory.mktemp("w") / "model.pt"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def window():
    return np.random.default_rng(0).random((1, 1, 96, 96, 96), dtype=np.float32)


@pytest.fixture(scope="module")
def torch_margin(weights, window):
    with torch.inference_mode():
        return margin_module(weights, "cpu")(torch.from_numpy(window)).numpy()


def test_onnx_export_matches_torch(weights, window, torch_margin, tmp_path):
    import onnxruntime as ort

    path = export_model(weights, tmp_path / "m.onnx", "onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {"image": window})[0]
    assert out.shape == (1, 1, 96, 96, 96)
    np.testing.assert_allclose(out, torch_margin, atol=1e-3)
    # Dynamic batch: two windows in one call.
    two = session.run(None, {"image": np.concatenate([window, window])})[0]
    assert two.shape[0] == 2


def test_openvino_runner_matches_torch(weights, window, torch_margin):
    runner = make_runner(weights, "openvino", "cpu")
    np.testing.assert_allclose(runner(window), torch_margin, atol=1e-3)
    assert runner.backend == "openvino"


def test_openvino_stream_gives_each_batch_its_own_outputs_in_order(weights):
    """The pipelined OpenVINO runner (windows of the next batch start before this batch is
    handed out) returns, batch by batch, exactly what one call per batch returns; batches
    of more windows than it has streams included."""
    runner = make_runner(weights, "openvino", "cpu")
    assert runner.pipelined is not None and runner.batch_size >= 1
    rng = np.random.default_rng(5)
    sizes = [1, runner.batch_size, runner.batch_size + 1, 2]
    batches = [rng.random((n, 1, 96, 96, 96), dtype=np.float32) for n in sizes]
    streamed = list(runner.stream(iter(batches)))
    assert [len(out) for out in streamed] == sizes
    for batch, out in zip(batches, streamed, strict=True):
        np.testing.assert_array_equal(out, runner(batch))
    assert not np.array_equal(streamed[0][0], streamed[1][0])  # distinct windows, distinct outputs
    # A stream left after its first batch (its caller raised) still has windows running; the
    # next stream reuses their indices and must not hand out their outputs.
    # One window a batch: when the first is handed out, later ones are running.
    left = runner.stream(iter([window[None] for batch in batches for window in batch]))
    next(left)
    left.close()
    again = list(runner.stream(iter([batches[2]])))
    np.testing.assert_array_equal(again[0], streamed[2])


def test_focused_margin_is_the_same_streamed_or_batch_by_batch(weights):
    """The sliding window (survey and focus rounds) with the pipelined runner equals the same
    runner called one batch at a time, voxel for voxel."""
    from dataclasses import replace

    from spleen_seg.pipeline.windows import spleen_margin

    runner = make_runner(weights, "openvino", "cpu")
    image = np.random.default_rng(6).random((130, 100, 96), dtype=np.float32)
    streamed, stats = spleen_margin(image, runner, (96, 96, 96), 0.5, runner.batch_size, focus_radius=8)
    plain, plain_stats = spleen_margin(image, replace(runner, pipelined=None), (96, 96, 96), 0.5, runner.batch_size,
                                       focus_radius=8)
    assert stats.computed == plain_stats.computed >= 1
    np.testing.assert_array_equal(streamed, plain)


def test_torch_runner_uses_cached_torchscript(weights, window, torch_margin):
    runner = make_runner(weights, "torch", "cpu")
    np.testing.assert_allclose(runner(window), torch_margin, atol=1e-4)
    first = cached_export(weights, "torchscript_margin")
    mtime = first.stat().st_mtime_ns
    assert cached_export(weights, "torchscript_margin").stat().st_mtime_ns == mtime  # reused, not re-exported


def test_torchscript_export_is_the_bundle_model_ts(weights, tmp_path):
    path = export_model(weights, tmp_path / "model.ts", "torchscript")
    scripted = load_network(path, torch.device("cpu"))
    reference = load_network(weights, torch.device("cpu"))
    x = torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        np.testing.assert_allclose(scripted(x).numpy(), reference(x).numpy(), atol=1e-5)
        assert scripted(x).shape == (1, 2, 64, 64, 64)


def test_bad_export_requests_are_refused(weights, tmp_path):
    with pytest.raises(ConfigError, match="format"):
        export_model(weights, tmp_path / "x", "caffe")
    with pytest.raises(ConfigError, match="fp16"):
        export_model(weights, tmp_path / "x.onnx", "onnx", "fp16")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="tensorrt"):
            make_runner(weights, "tensorrt", "cpu")
    assert not list(tmp_path.iterdir())


def test_backend_resolution():
    assert resolve_backend("auto", "cpu") == "openvino"
    assert resolve_backend("auto", "cuda") == "torch"
    assert resolve_backend("onnx", "cpu") == "onnx"
    with pytest.raises(ConfigError):
        resolve_backend("tflite", "cpu")


def test_fp16_on_cpu_is_refused(weights):
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        make_runner(weights, "openvino", "cpu", "fp16")
