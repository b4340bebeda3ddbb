"""OpenVINO on the CPU: the sliding window with the runner pipelined against one batch at a time.

Pipelined (what `pipeline/backends.py` does): a window starts on a stream as soon as one is
free, and a batch's outputs are added up while the next windows run. One batch at a time:
the next batch starts only once every window of the last one is done and added up, so a
stream idles while the other finishes and while the main thread adds up.

Runs the real sliding window (survey and focus rounds, ``Segmenter.compute_margin``) on the
batch benchmark's CTs of MSD geometry (``bench_batch.build_msd_volumes``) with the same
runner both ways, alternating order each round, in this process; prints seconds per window
computed, the ratio of the medians, and checks that the two margins are identical.

Usage: python benchmarks/bench_window_stream.py [--weights PATH] [--cases 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_batch import build_msd_volumes
from bench_inference import YARDSTICK

from spleen_seg.batch.inputs import load_input
from spleen_seg.pipeline.segmenter import load_segmenter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=YARDSTICK)
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    segmenter = load_segmenter(args.weights, "cpu", "openvino", progress=False)
    pipelined = segmenter.runner.pipelined
    volumes = build_msd_volumes(Path(tempfile.mkdtemp(prefix="bench_stream_")), args.cases)
    per_window: dict[str, list[float]] = {"pipelined": [], "batch by batch": []}
    for round_index in range(args.rounds):
        for volume in volumes:
            array, geometry = load_input(volume)
            margins = {}
            modes = list(per_window) if round_index % 2 == 0 else list(reversed(per_window))
            for mode in modes:
                segmenter.runner.pipelined = pipelined if mode == "pipelined" else None
                prepared = segmenter.prepare(array.copy(), geometry, volume)
                start = time.perf_counter()
                segmenter.compute_margin(prepared)
                per_window[mode].append((time.perf_counter() - start) / prepared.windows.computed)
                margins[mode] = prepared.margin
            if not np.array_equal(margins["pipelined"], margins["batch by batch"]):
                raise SystemExit(f"{volume.name}: the two margins differ")
    for mode, values in per_window.items():
        print(f"{mode:15s} median {statistics.median(values):.4f} s/window  "
              + " ".join(f"{v:.3f}" for v in values))
    ratio = statistics.median(per_window["batch by batch"]) / statistics.median(per_window["pipelined"])
    print(f"pipelined: {ratio:.2f}x the windows per second of batch by batch; margins identical "
          f"({len(volumes)} CTs x {args.rounds} rounds)")


if __name__ == "__main__":
    main()
