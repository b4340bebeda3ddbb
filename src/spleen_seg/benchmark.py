"""``spleen-seg benchmark``: network and end-to-end timings for the backends this machine has.

Prints the table of the reference bundle's README (network time per 96^3 patch for torch
fp32, torch AMP, TensorRT fp32/fp16) extended with ONNX Runtime and OpenVINO, plus the
end-to-end time of ``Segmenter.predict`` on one volume per backend. For whole-process
comparisons against the MONAI bundle use ``benchmarks/bench_inference.py``.
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spleen_seg.config import RECIPE
from spleen_seg.errors import SpleenSegError


@dataclass(frozen=True)
class Row:
    backend: str
    precision: str
    device: str
    ms_per_patch: float | None
    end_to_end_s: float | None
    note: str = ""


def candidates(device: str) -> list[tuple[str, str]]:
    """(backend, precision) pairs worth timing on ``device``."""
    if device.startswith("cuda"):
        pairs = [("torch", "fp32"), ("torch", "fp16")]
        if importlib.util.find_spec("tensorrt") is not None:
            pairs += [("tensorrt", "fp32"), ("tensorrt", "fp16")]
        if importlib.util.find_spec("onnxruntime") is not None:
            import onnxruntime

            if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
                pairs.append(("onnx", "fp32"))
        return pairs
    pairs = [("torch", "fp32")]
    for backend, module in (("onnx", "onnxruntime"), ("openvino", "openvino")):
        if importlib.util.find_spec(module) is not None:
            pairs.append((backend, "fp32"))
    return pairs


def time_network(runner, repeats: int) -> float:
    """Median milliseconds per 96^3 patch at the runner's preferred batch size."""
    batch = np.random.default_rng(0).random((runner.batch_size, 1, *RECIPE.inference.roi_size), dtype=np.float32)
    runner(batch)  # warm-up: graph compilation, allocator, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner(batch)
        times.append((time.perf_counter() - start) / runner.batch_size)
    return 1000.0 * statistics.median(times)


def run_benchmark(weights: Path, device: str, volume: Path | None, repeats: int) -> list[Row]:
    from spleen_seg.io.nifti import Geometry, read_volume
    from spleen_seg.pipeline.backends import make_runner
    from spleen_seg.pipeline.segmenter import Segmenter
    from spleen_seg.training.phantom import make_phantom

    if volume is not None:
        array, geometry = read_volume(volume)
    else:
        case = make_phantom(0)
        array = case.image_hu.astype(np.float32)
        geometry = Geometry(shape=tuple(case.image_hu.shape), affine_ras=case.affine)  # type: ignore[arg-type]
    rows = []
    for backend, precision in candidates(device):
        try:
            runner = make_runner(weights, backend, device, precision)
        except (SpleenSegError, ImportError, RuntimeError) as err:
            rows.append(Row(backend, precision, device, None, None, f"unavailable: {err}"))
            continue
        ms = time_network(runner, repeats)
        segmenter = Segmenter(runner=runner, progress=False)
        start = time.perf_counter()
        segmenter.predict(array.copy(), geometry)
        seconds = time.perf_counter() - start
        windows = segmenter.last_windows
        note = f"{windows.computed}/{windows.total} windows" if windows is not None else ""
        rows.append(Row(backend, precision, device, ms, seconds, note))
    return rows


def format_table(rows: list[Row]) -> str:
    lines = [f"{'backend':10s} {'precision':9s} {'device':7s} {'ms/96^3 patch':>14s} {'end-to-end s':>13s}  note"]
    for r in rows:
        ms = f"{r.ms_per_patch:14.1f}" if r.ms_per_patch is not None else f"{'-':>14s}"
        e2e = f"{r.end_to_end_s:13.2f}" if r.end_to_end_s is not None else f"{'-':>13s}"
        lines.append(f"{r.backend:10s} {r.precision:9s} {r.device:7s} {ms} {e2e}  {r.note}")
    return "\n".join(lines)
