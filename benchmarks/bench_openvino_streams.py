"""OpenVINO on the CPU: windows per second with one request on every core (LATENCY hint) against
one request per inference stream (THROUGHPUT hint, what `pipeline/backends.py` uses), same IR.

Exports the weights' margin network to OpenVINO IR in a temporary folder
(``pipeline.export.export_openvino``), then times the same random 96^3 windows both ways,
alternating, in this process, and checks that the outputs are identical.

Usage: python benchmarks/bench_openvino_streams.py [--weights PATH] [--windows 16] [--rounds 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import openvino as ov
from bench_inference import YARDSTICK

from spleen_seg.config import RECIPE
from spleen_seg.pipeline.export import export_openvino


def compiled(xml: Path, hint: str):
    core = ov.Core()
    model = core.read_model(str(xml))
    model.reshape([1, 1, *RECIPE.inference.roi_size])
    return core.compile_model(model, "CPU", {"PERFORMANCE_HINT": hint, "INFERENCE_PRECISION_HINT": "f32"})


def one_request(xml: Path, windows: list[np.ndarray]) -> tuple[float, list[np.ndarray]]:
    request = compiled(xml, "LATENCY").create_infer_request()
    request.infer([windows[0]])  # warm-up
    start = time.perf_counter()
    outputs = [request.infer([w])[0].copy() for w in windows]
    return (time.perf_counter() - start) / len(windows), outputs


def one_per_stream(xml: Path, windows: list[np.ndarray]) -> tuple[float, list[np.ndarray], int]:
    model = compiled(xml, "THROUGHPUT")
    queue = ov.AsyncInferQueue(model, int(model.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
    outputs: list[np.ndarray | None] = [None] * len(windows)

    def keep(request, index: int) -> None:
        outputs[index] = request.get_output_tensor(0).data.copy()

    queue.set_callback(keep)
    queue.start_async([windows[0]], 0)  # warm-up
    queue.wait_all()
    start = time.perf_counter()
    for index, window in enumerate(windows):
        queue.start_async([window], index)
    queue.wait_all()
    return (time.perf_counter() - start) / len(windows), outputs, len(queue)  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=YARDSTICK)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    windows = [rng.random((1, 1, *RECIPE.inference.roi_size), dtype=np.float32) for _ in range(args.windows)]
    with tempfile.TemporaryDirectory() as folder:
        xml = export_openvino(args.weights, Path(folder) / "margin.xml")
        for round_ in range(1, args.rounds + 1):
            latency, reference = one_request(xml, windows)
            streamed, outputs, streams = one_per_stream(xml, windows)
            difference = max(float(np.abs(a - b).max()) for a, b in zip(reference, outputs, strict=True))
            print(f"round {round_}: one request {1000 * latency:.1f} ms/window; {streams} streams "
                  f"{1000 * streamed:.1f} ms/window; {latency / streamed:.2f}x; max |difference| {difference:.1e}")


if __name__ == "__main__":
    main()
