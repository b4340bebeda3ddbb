"""Wall time and traced peak of ``read_series`` on an uncompressed CT series, per checkout.

Reads one synthetic 512 x 512 x ``--slices`` Explicit VR Little Endian series (written
once, in a temporary folder) with the code under each ``--src`` (a ``src`` folder put
first on PYTHONPATH), in a fresh process each, alternating ``--rounds`` times. Each
process prints the best of three reads and the tracemalloc peak of one read (numpy's
arrays and pydicom's bytes included). What it compares: a read that holds every file's
data set until the volume is filled against one that reads the headers first and then
decodes one file at a time. ``--syntax deflated`` re-encodes the series as Deflated
Explicit VR Little Endian (dcmtk's ``dcmconv +td``): what the bounded inflating reader costs.

Usage: python benchmarks/bench_dicom_read.py --src /work/main/src --src src
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "helpers"))
MIB = 1 << 20
READS = 3
CHILD = """
import sys, time, tracemalloc
from pathlib import Path
from spleen_seg.io.dicom import find_series
from spleen_seg.io.dicom_volume import read_series
(series,), _ = find_series(Path(sys.argv[1]))
read_series(series)  # warm: the page cache, pydicom's lazy imports
times = []
for _ in range({reads}):
    start = time.perf_counter()
    read_series(series)
    times.append(time.perf_counter() - start)
tracemalloc.start()
read_series(series)
print(min(times), tracemalloc.get_traced_memory()[1])
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, action="append", required=True)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--syntax", choices=("explicit", "deflated"), default="explicit")
    args = parser.parse_args()
    from synthetic_dicom import dcmtk_encode, write_series

    with tempfile.TemporaryDirectory() as tmp:
        hu = np.random.default_rng(0).integers(-1000, 1500, size=(512, 512, args.slices)).astype(np.float32)
        paths = write_series(Path(tmp) / "ct", hu)
        if args.syntax == "deflated":
            dcmtk_encode(paths, "dcmconv", "+td")
        results: dict[Path, list[tuple[float, int]]] = {src: [] for src in args.src}
        for round_index in range(args.rounds):
            for src in args.src:
                proc = subprocess.run([sys.executable, "-c", CHILD.format(reads=READS), str(Path(tmp) / "ct")],
                                      env={**os.environ, "PYTHONPATH": str(src.resolve())}, capture_output=True,
                                      text=True, check=True)
                seconds, traced = proc.stdout.split()
                results[src].append((float(seconds), int(traced)))
                print(f"round {round_index} {src}: {float(seconds):.3f} s, traced peak {int(traced) / MIB:.0f} MiB",
                      flush=True)
        volume_mib = 4 * 512 * 512 * args.slices / MIB
        print(f"float32 volume: {volume_mib:.0f} MiB")
        for src, runs in results.items():
            seconds = sorted(s for s, _ in runs)
            print(f"{src}: {seconds[0]:.3f}-{seconds[-1]:.3f} s (median {seconds[len(seconds) // 2]:.3f}), "
                  f"traced peak {max(t for _, t in runs) / MIB:.0f} MiB")


if __name__ == "__main__":
    main()
