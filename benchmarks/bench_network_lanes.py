"""OpenVINO on the CPU: is there idle time left in the network stage of a batch?

The local batch runs one case at a time through the network, its windows spread over
OpenVINO's two inference streams (`pipeline/backends.py`). Each case has points where the
streams can idle: the survey's last window, each focus round's last window, the adding-up
and the dilation between rounds. Two cases in the network at once, each on one stream of
its own ("two lanes"), would fill those gaps with the other case's windows.

This script measures what that would gain before anyone builds it. It prepares the batch
benchmark's CTs of MSD geometry (``bench_batch.build_msd_volumes``, not timed), then times
the real sliding window (``Segmenter.compute_margin``: survey and focus) over all of them
both ways, alternating which goes first, in this process:
  one case at a time: the project's runner, every case's windows over both streams
  two lanes:          two threads, each with its own infer request of the same compiled
                      model (one stream each), each taking every other case
It prints wall seconds, process CPU seconds and the ratio per round, and checks that the
margins are identical.

Usage: python benchmarks/bench_network_lanes.py [--weights PATH] [--cases 6] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import openvino as ov
from bench_batch import build_msd_volumes
from bench_inference import YARDSTICK

from spleen_seg.batch.inputs import load_input
from spleen_seg.config import RECIPE
from spleen_seg.pipeline.backends import Runner, cached_export
from spleen_seg.pipeline.segmenter import PreparedImage, Segmenter, load_segmenter

LANES = 2


def lane_segmenters(weights: Path) -> list[Segmenter]:
    """``LANES`` segmenters, each running its windows one at a time on its own request of one compiled model."""
    core = ov.Core()
    model = core.read_model(str(cached_export(weights, "openvino", "fp32")))
    model.reshape([1, 1, *RECIPE.inference.roi_size])
    compiled = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": "f32"})

    def one_stream() -> Runner:
        request = compiled.create_infer_request()

        def predict(batch: np.ndarray) -> np.ndarray:
            return np.concatenate([request.infer([np.ascontiguousarray(w[None])])[0].copy() for w in batch])

        return Runner(predict, 1, "openvino")

    return [Segmenter(runner=one_stream(), progress=False) for _ in range(LANES)]


def prepared_cases(segmenter: Segmenter, volumes: list[Path]) -> list[PreparedImage]:
    cases = []
    for volume in volumes:
        array, geometry = load_input(volume)
        cases.append(segmenter.prepare(array, geometry, volume))
    return cases


def one_at_a_time(segmenter: Segmenter, cases: list[PreparedImage]) -> None:
    for case in cases:
        segmenter.compute_margin(case)


def in_lanes(lanes: list[Segmenter], cases: list[PreparedImage]) -> None:
    def lane(index: int) -> None:
        for case in cases[index::LANES]:
            lanes[index].compute_margin(case)

    threads = [threading.Thread(target=lane, args=(index,)) for index in range(LANES)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=YARDSTICK)
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    segmenter = load_segmenter(args.weights, "cpu", "openvino", progress=False)
    lanes = lane_segmenters(args.weights)
    volumes = build_msd_volumes(Path(tempfile.mkdtemp(prefix="bench_lanes_")), args.cases)
    runs = {"one case at a time": lambda cases: one_at_a_time(segmenter, cases),
            "two lanes": lambda cases: in_lanes(lanes, cases)}
    walls: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in range(args.rounds):
        margins = {}
        for name in (list(runs) if round_index % 2 == 0 else list(reversed(runs))):
            cases = prepared_cases(segmenter, volumes)
            wall, cpu = time.perf_counter(), time.process_time()
            runs[name](cases)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            walls[name].append(wall)
            margins[name] = [case.margin for case in cases]
            windows = sum(case.windows.computed for case in cases if case.windows is not None)
            print(f"round {round_index + 1} {name:19s} {wall:6.2f} s wall {cpu:6.2f} s CPU  "
                  f"{windows} windows, {wall / windows:.4f} s a window", flush=True)
        if not all(np.array_equal(a, b) for a, b in zip(*margins.values(), strict=True)):
            raise SystemExit(f"round {round_index + 1}: the two ways gave different margins")
    one, two = (statistics.median(walls[name]) for name in runs)
    print(f"two lanes: {one / two:.3f}x the speed of one case at a time (medians {two:.2f} and {one:.2f} s; "
          f"{len(volumes)} CTs x {args.rounds} rounds); margins identical")


if __name__ == "__main__":
    main()
