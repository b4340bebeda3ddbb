"""Network runners for inference: torch, ONNX Runtime, OpenVINO, TensorRT.

Every runner maps a window batch (B, 1, 96, 96, 96) float32 in [0, 1] to the spleen
margin ``logit(spleen) - logit(background)`` (B, 1, 96, 96, 96): the only quantity the
mask depends on (argmax over two channels is the sign of their difference), so the
exported graphs end in that subtraction and return half the data.

Exported models are cached in ``model_cache_dir()`` per weights checksum, spleen-seg
version and runtime version (``cache_path``); the first run with new weights exports
(needs torch and MONAI), later runs load the cached file and import neither, which saves
most of a process's start-up time on CPU. A manifest beside each export records its
files' sizes and sha256: a partial or damaged file is exported again with a warning, as
is one the runtime fails to load (``load_cached``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from spleen_seg.config import RECIPE
from spleen_seg.errors import ConfigError
from spleen_seg.io.atomic import atomic_write_text

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx", "openvino", "tensorrt")
PRECISIONS = ("fp32", "fp16")
CACHE_ENV = "SPLEEN_SEG_CACHE"
TORCH_BATCH = 4  # the bundle's sw_batch_size
# OpenVINO runs one window per inference stream (THROUGHPUT hint): on 2 cores, 2 streams of one
# thread gave 1.02-1.26x (median 1.09x) the windows per second of one request on both cores
# (LATENCY hint), never fewer, with identical outputs (benchmarks/bench_openvino_streams.py). A call takes up to as many windows as the hint
# has streams, at most the bundle's sw_batch_size (the memory estimate assumes that many).
OPENVINO_MAX_BATCH = TORCH_BATCH
OPENVINO_COMPILED_DIR = "openvino_compiled"
CACHE_SUFFIXES = {"onnx": ".onnx", "openvino": ".xml", "tensorrt": ".engine", "torchscript_margin": ".ts"}
# The package whose version decides whether a cached export still loads.
RUNTIME_PACKAGES = {"onnx": "onnxruntime", "openvino": "openvino", "tensorrt": "tensorrt", "torchscript_margin": "torch"}
T = TypeVar("T")


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


Stream = Callable[[Iterable[np.ndarray]], Iterator[np.ndarray]]


@dataclass
class Runner:
    """A callable network plus the batch size it runs best at.

    ``pipelined``: runs a sequence of window batches without idling the runtime between
    them (the next windows start while the caller adds up the last outputs); None: one
    batch at a time through ``predict``.
    """

    predict: Callable[[np.ndarray], np.ndarray]
    batch_size: int
    backend: str
    pipelined: Stream | None = None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.predict(batch)

    def stream(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """The outputs of ``batches``, in order."""
        return map(self.predict, batches) if self.pipelined is None else self.pipelined(batches)


def _cache_key_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")


def runtime_version(fmt: str) -> str:
    """The runtime that loads an exported format, with its installed version: ``openvino-2026-4-1``."""
    from importlib.metadata import PackageNotFoundError, version

    package = RUNTIME_PACKAGES[fmt]
    try:
        return _cache_key_part(f"{package}-{version(package)}")
    except PackageNotFoundError:
        return f"{package}-unknown"


def cache_path(weights: Path, fmt: str, precision: str = "fp32") -> Path:
    """Where the export of ``weights`` to ``fmt`` is cached: keyed by the weights' checksum,
    the precision, the spleen-seg version and the runtime's version, so an upgrade of
    either exports again instead of loading a file the new version may not read."""
    from spleen_seg import __version__
    from spleen_seg.io.download import file_sha256

    key = f"{file_sha256(weights)[:16]}_{precision}_spleen-seg-{_cache_key_part(__version__)}_{runtime_version(fmt)}"
    return model_cache_dir() / f"spleen_margin_{key}{CACHE_SUFFIXES[fmt]}"


def _cache_files(dest: Path) -> list[Path]:
    """The files of one cached model: OpenVINO's IR is the .xml and its .bin."""
    return [dest, dest.with_suffix(".bin")] if dest.suffix == ".xml" else [dest]


def _manifest_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".manifest.json")


def _file_record(path: Path) -> dict[str, Any]:
    # Hashed afresh each time (not io.download's cache keyed by size and mtime): a file
    # damaged within the same mtime tick must still be told apart. ~20 ms for the 19 MB IR.
    with path.open("rb") as handle:
        return {"bytes": path.stat().st_size, "sha256": hashlib.file_digest(handle, "sha256").hexdigest()}


def _cache_is_complete(dest: Path) -> bool:
    """The cached files exist with the sizes and checksums recorded when they were written."""
    try:
        recorded = json.loads(_manifest_path(dest).read_text(encoding="utf-8"))["files"]
        return all(recorded[path.name] == _file_record(path) for path in _cache_files(dest))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _remove_cached(dest: Path) -> None:
    for path in (*_cache_files(dest), _manifest_path(dest)):
        path.unlink(missing_ok=True)
    if dest.suffix == ".xml":  # OpenVINO's compiled blobs: a damaged one would fail again
        shutil.rmtree(dest.parent / OPENVINO_COMPILED_DIR, ignore_errors=True)


def cached_export(weights: Path, fmt: str, precision: str = "fp32") -> Path:
    """Path of the exported model for these weights, exporting it on first use.

    A cached file that is missing, partial or damaged (its size or sha256 differs from
    the manifest written after it) is exported again, with a warning.
    """
    from spleen_seg.io.download import file_sha256
    from spleen_seg.pipeline.export import export_model

    dest = cache_path(weights, fmt, precision)
    if _cache_is_complete(dest):
        return dest
    if any(path.exists() for path in (*_cache_files(dest), _manifest_path(dest))):
        logger.warning("cached %s model %s is incomplete or damaged; exporting it again", fmt, dest)
        _remove_cached(dest)
    else:
        logger.info("exporting %s model for %s (first use of these weights)", fmt, weights)
    export_model(weights, dest, fmt, precision)
    manifest = {"weights_sha256": file_sha256(weights), "format": fmt, "precision": precision,
                "runtime": runtime_version(fmt), "files": {path.name: _file_record(path) for path in _cache_files(dest)}}
    atomic_write_text(_manifest_path(dest), json.dumps(manifest, indent=2) + "\n")
    return dest


def load_cached(weights: Path, fmt: str, precision: str, load: Callable[[Path], T]) -> T:
    """``load(path)`` of the cached export; if the runtime cannot load it, export it once more
    (with a warning) and load that: a damaged cache never stops a run."""
    dest = cached_export(weights, fmt, precision)
    try:
        return load(dest)
    except Exception as err:  # each runtime raises its own types for an unreadable model; a second failure raises
        logger.warning("cached %s model %s could not be loaded (%s: %s); exporting it again", fmt, dest,
                       type(err).__name__, (str(err).splitlines() or [""])[0][:200])
    _remove_cached(dest)
    return load(cached_export(weights, fmt, precision))


def _torch_runner(weights: Path, device: str, precision: str) -> Runner:
    import torch

    # A cached TorchScript of the margin model loads without importing MONAI (4-13 s).
    module = load_cached(weights, "torchscript_margin", "fp32",
                         lambda path: torch.jit.load(str(path), map_location=device).eval())
    amp = precision == "fp16" and device.startswith("cuda")

    def predict(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), torch.autocast("cuda", enabled=amp):
            out = module(torch.from_numpy(batch).to(device))
        return out.float().cpu().numpy()

    return Runner(predict, TORCH_BATCH, "torch")


def _onnx_runner(weights: Path, device: str, precision: str) -> Runner:
    import onnxruntime as ort

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else ["CPUExecutionProvider"]
    session = load_cached(weights, "onnx", "fp32", lambda path: ort.InferenceSession(str(path), providers=providers))
    name = session.get_inputs()[0].name
    return Runner(lambda batch: session.run(None, {name: batch})[0], 1, "onnx")


def _openvino_runner(weights: Path, device: str, precision: str) -> Runner:
    import openvino as ov

    if device != "cpu":
        raise ConfigError(f"backend openvino runs on the CPU here; got --device {device}")

    def load(xml: Path):
        core = ov.Core()
        # OpenVINO's own cache of compiled blobs makes later compilations an import.
        core.set_property({"CACHE_DIR": str(xml.parent / OPENVINO_COMPILED_DIR)})
        model = core.read_model(str(xml))
        model.reshape([1, 1, *RECIPE.inference.roi_size])
        # f32 inference precision: OpenVINO may otherwise pick bf16 where the CPU has it.
        compiled = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": "f32"})
        streams = max(1, min(int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")), OPENVINO_MAX_BATCH))
        return ov.AsyncInferQueue(compiled, streams)

    queue = load_cached(weights, "openvino", "fp32", load)
    outputs: dict[int, np.ndarray] = {}

    def keep(request, index: int) -> None:
        outputs[index] = request.get_output_tensor(0).data.copy()

    queue.set_callback(keep)

    def stream(batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """One window a stream, every stream kept busy: a window starts as soon as a stream is
        free (``start_async`` waits for one), and a batch's outputs are handed out once all its
        windows are done, while later windows run. 1.11x and 1.04x (two runs, medians of 9 CTs)
        the windows per second of starting a batch only once the last one is added up,
        identical margins (benchmarks/bench_window_stream.py)."""
        # A stream its caller left early (an exception while adding up) may still have windows
        # running: their outputs must not be taken for this stream's, which reuses the indices.
        queue.wait_all()
        outputs.clear()
        started = 0
        waiting: deque[range] = deque()  # the window indices of each batch not yet handed out
        for batch in batches:
            for window in batch:
                queue.start_async([np.ascontiguousarray(window[None])], started)
                started += 1
            waiting.append(range(started - len(batch), started))
            while waiting and all(index in outputs for index in waiting[0]):
                yield np.concatenate([outputs.pop(index) for index in waiting.popleft()])
        queue.wait_all()
        for indices in waiting:
            yield np.concatenate([outputs.pop(index) for index in indices])

    def predict(batch: np.ndarray) -> np.ndarray:
        """(N, 1, 96, 96, 96) windows: one window a stream, all at once."""
        return next(stream([batch]))

    return Runner(predict, len(queue), "openvino", pipelined=stream)


def _tensorrt_runner(weights: Path, device: str, precision: str) -> Runner:
    from spleen_seg.pipeline.export import load_tensorrt_engine

    if not device.startswith("cuda"):
        raise ConfigError("backend tensorrt needs --device cuda")
    return Runner(load_cached(weights, "tensorrt", precision, lambda path: load_tensorrt_engine(path, device)),
                  TORCH_BATCH, "tensorrt")


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
