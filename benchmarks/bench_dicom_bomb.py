"""Peak RSS and wall time of `spleen-seg segment` on a folder of Deflated DICOM bombs.

Each file is a valid Deflated Explicit VR Little Endian CT slice of 8192 x 8192 16-bit
zeros: 128 KiB on disk, 128 MiB inflated (``tests/helpers/synthetic_dicom.py``,
``write_deflated_bomb_series``). The command runs as a child process

  spleen-seg -q segment FOLDER -o OUT --weights DEMO

once per ``--src`` (a ``src`` folder put first on PYTHONPATH, so that two checkouts are
compared in the same run, alternating, ``--rounds`` times) and prints its exit status,
wall seconds and peak RSS (the child's own ``ru_maxrss``, read with ``os.wait4``). A
watchdog kills the child with SIGKILL once its RSS passes ``--kill-above-mib``, so that
measuring the code before the fix cannot take the (shared) machine down: such a run is
printed as killed, with the RSS it had reached.

Usage: python benchmarks/bench_dicom_bomb.py --files 20 --src /work/main/src --src src
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "helpers"))
from child_rss import Measured, run_measured  # noqa: E402

MIB = 1 << 20
TIMEOUT_S = 900


def run_once(src: Path, folder: Path, out: Path, kill_above_mib: int, env: dict[str, str]) -> Measured:
    """One segment run of the code under ``src``, measured."""
    from spleen_seg.pipeline.network import demo_weights_path

    cmd = [sys.executable, "-m", "spleen_seg.cli", "-q", "segment", str(folder), "-o", str(out),
           "--weights", str(demo_weights_path())]
    measured = run_measured(cmd, cwd=REPO, env={**os.environ, **env, "PYTHONPATH": str(src)},
                            kill_above_bytes=kill_above_mib * MIB, timeout_s=TIMEOUT_S)
    errors = [line for line in measured.stderr.splitlines() if line.startswith("error")]
    if errors:
        print("   ", errors[0][:200])
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20, help="bomb files in the series")
    parser.add_argument("--src", type=Path, action="append", required=True, help="a src folder to measure")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--kill-above-mib", type=int, default=8192)
    parser.add_argument("--memory-limit", default="", help="SPLEEN_SEG_MEMORY_LIMIT for the child (empty: none)")
    args = parser.parse_args()
    from synthetic_dicom import write_deflated_bomb_series

    env = {"SPLEEN_SEG_MEMORY_LIMIT": args.memory_limit} if args.memory_limit else {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "bombs"
        paths = write_deflated_bomb_series(folder, args.files)
        disk = sum(p.stat().st_size for p in paths)
        print(f"{args.files} files, {disk / MIB:.1f} MiB on disk, {args.files * 128} MiB inflated")
        for round_index in range(args.rounds):
            for index, src in enumerate(args.src):
                out = Path(tmp) / f"out_{round_index}_{index}"
                run = run_once(src.resolve(), folder, out, args.kill_above_mib, env)
                note = f" (killed above {args.kill_above_mib} MiB)" if run.killed else ""
                print(f"round {round_index} {src}: exit {run.returncode}, {run.seconds:.2f} s, "
                      f"peak RSS {run.peak_rss_bytes / MIB:.0f} MiB{note}", flush=True)


if __name__ == "__main__":
    main()
