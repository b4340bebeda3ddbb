"""Network runners for inference: torch, ONNX Runtime, OpenVINO, TensorRT.

Every runner maps a window batch (B, 1, 96, 96, 96) float32 in [0, 1] to the spleen
margin ``logit(spleen) - logit(background)`` (B, 1, 96, 96, 96): the only quantity the
mask depends on (argmax over two channels is the sign of their difference), so the
exported graphs end in that subtraction and return half the data.

Exported models are cached per weights checksum in ``model_cache_dir()``; the first run
with new weights exports (needs torch and MONAI), later runs load the cached file and
import neither, which saves most of a process's start-up time on CPU.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spleen_seg.config import RECIPE
from spleen_seg.errors import ConfigError

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx", "openvino", "tensorrt")
PRECISIONS = ("fp32", "fp16")
CACHE_ENV = "SPLEEN_SEG_CACHE"
TORCH_BATCH = 4  # the bundle's sw_batch_size
OPENVINO_BATCH = 1  # LATENCY hint; 2 windows a call measured no faster on 2 cores


def model_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "spleen-seg" / "models")


def resolve_device_name(name: str) -> str:
    """``auto|cpu|cuda|cuda:N`` -> a device string; imports torch only where CUDA may exist,
    so CPU runs on cached exports never pay torch's import time."""
    import shutil

    if name == "cpu" or (name == "auto" and not Path("/proc/driver/nvidia").exists() and not shutil.which("nvidia-smi")):
        return "cpu"
    from spleen_seg.pipeline.network import resolve_device

    return str(resolve_device(name))


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def resolve_backend(name: str, device: str) -> str:
    """``auto``: OpenVINO on CPU when installed (fastest measured here), torch on CUDA."""
    if name not in BACKENDS:
        raise ConfigError(f"backend '{name}' is not one of {', '.join(BACKENDS)}")
    if name != "auto":
        return name
    if device.startswith("cuda"):
        return "torch"
    for backend, module in (("openvino", "openvino"), ("onnx", "onnxruntime")):
        if _installed(module):
            return backend
    return "torch"


@dataclass
class Runner:
    """A callable network plus the batch size it runs best at."""

    predict: Callable[[np.ndarray], np.ndarray]
    batch_size: int
    backend: str

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.predict(batch)


def cached_export(weights: Path, fmt: str, precision: str = "fp32") -> Path:
    """Path of the exported model for these weights, exporting it on first use."""
    from spleen_seg.io.download import file_sha256

    suffix = {"onnx": ".onnx", "openvino": ".xml", "tensorrt": ".engine", "torchscript_margin": ".ts"}[fmt]
    dest = model_cache_dir() / f"spleen_margin_{file_sha256(weights)[:16]}_{precision}{suffix}"
    if not dest.exists():
        from spleen_seg.pipeline.export import export_model

        logger.info("exporting %s model for %s (first use of these weights)", fmt, weights)
        export_model(weights, dest, fmt, precision)
    return dest


def _torch_runner(weights: Path, device: str, precision: str) -> Runner:
    import torch

    # A cached TorchScript of the margin model loads without importing MONAI (4-13 s).
    module = torch.jit.load(str(cached_export(weights, "torchscript_margin")), map_location=device).eval()
    amp = precision == "fp16" and device.startswith("cuda")

    def predict(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), torch.autocast("cuda", enabled=amp):
            out = module(torch.from_numpy(batch).to(device))
        return out.float().cpu().numpy()

    return Runner(predict, TORCH_BATCH, "torch")


def _onnx_runner(weights: Path, device: str, precision: str) -> Runner:
    import onnxruntime as ort

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(cached_export(weights, "onnx")), providers=providers)
    name = session.get_inputs()[0].name
    return Runner(lambda batch: session.run(None, {name: batch})[0], 1, "onnx")


def _openvino_runner(weights: Path, device: str, precision: str) -> Runner:
    import openvino as ov

    if device != "cpu":
        raise ConfigError(f"backend openvino runs on the CPU here; got --device {device}")
    core = ov.Core()
    xml = cached_export(weights, "openvino")
    # OpenVINO's own cache of compiled blobs makes later compilations an import.
    core.set_property({"CACHE_DIR": str(xml.parent / "openvino_compiled")})
    model = core.read_model(str(xml))
    model.reshape([OPENVINO_BATCH, 1, *RECIPE.inference.roi_size])
    # f32 inference precision: OpenVINO may otherwise pick bf16 where the CPU has it.
    compiled = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()

    def predict(batch: np.ndarray) -> np.ndarray:
        count = len(batch)
        if count < OPENVINO_BATCH:  # the static shape wants a full batch: repeat the last window
            batch = np.concatenate([batch, np.repeat(batch[-1:], OPENVINO_BATCH - count, axis=0)])
        return request.infer([batch])[0][:count].copy()

    return Runner(predict, OPENVINO_BATCH, "openvino")


def _tensorrt_runner(weights: Path, device: str, precision: str) -> Runner:
    from spleen_seg.pipeline.export import load_tensorrt_engine

    if not device.startswith("cuda"):
        raise ConfigError("backend tensorrt needs --device cuda")
    engine = cached_export(weights, "tensorrt", precision)
    return Runner(load_tensorrt_engine(engine, device), TORCH_BATCH, "tensorrt")


RUNNERS = {"torch": _torch_runner, "onnx": _onnx_runner, "openvino": _openvino_runner, "tensorrt": _tensorrt_runner}


def make_runner(weights: Path, backend: str, device: str, precision: str = "fp32") -> Runner:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision '{precision}' is not one of {', '.join(PRECISIONS)}")
    name = resolve_backend(backend, device)
    if precision == "fp16" and not (device.startswith("cuda") and name in ("torch", "tensorrt")):
        raise ConfigError(f"--precision fp16 needs CUDA and the torch or tensorrt backend (got {name} on {device})")
    if name in ("openvino", "onnx") and not _installed({"openvino": "openvino", "onnx": "onnxruntime"}[name]):
        raise ConfigError(f"backend {name} is not installed: pip install {'openvino' if name == 'openvino' else 'onnxruntime'}")
    return RUNNERS[name](Path(weights), device, precision)
