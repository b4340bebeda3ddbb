"""The focused windows' rule against a baseline checkout's and against all windows, on the MSD-geometry CT.

Builds the CT of MSD Task09 geometry that `bench_inference.py` builds (the shared real CT at
0.78 x 0.78 x 5 mm, padded to 512 x 512), then, alternating the order each round, times the
sliding windows alone (``Segmenter.compute_margin``; the CT is read and preprocessed untimed)
of three configurations, each in a process of its own (model loaded untimed):
  new rule      this checkout's default focused windows
  old rule      the default of the checkout given by --baseline-src (skipped without it)
  all windows   this checkout with every window computed (MONAI's average everywhere)
and prints per run the seconds and windows computed, the medians, their ratios, and each mask's
voxel differences from the all-windows mask (the yardstick weights, OpenVINO on the CPU).

Usage: python benchmarks/bench_focus.py [--rounds 3] [--baseline-src /path/to/other/checkout/src]
       [--crop-front N]   (crop N voxels at the front first: the crop on which the old rule differs)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from bench_inference import REPO, YARDSTICK, build_msd_volume

ALL_WINDOWS = "all windows"


def measure(volume: Path, weights: Path, all_windows: bool, mask_dest: Path) -> dict:
    """One configuration in this process: seconds of the sliding windows, windows computed, the mask saved."""
    from spleen_seg.io.nifti import read_volume
    from spleen_seg.pipeline.segmenter import load_segmenter

    segmenter = load_segmenter(weights, "cpu", progress=False, all_windows=all_windows)
    array, geometry = read_volume(volume)
    prepared = segmenter.prepare(array, geometry, volume)
    start = time.perf_counter()
    segmenter.compute_margin(prepared)
    seconds = time.perf_counter() - start
    mask = segmenter.invert(prepared)
    np.save(mask_dest, mask)
    stats = prepared.windows
    return {"seconds": seconds, "computed": stats.computed, "total": stats.total, "voxels": int(mask.sum())}


def run_measurement(src: Path, volume: Path, weights: Path, all_windows: bool, mask_dest: Path) -> dict:
    """``measure`` in a new process importing spleen_seg from ``src``; its last stdout line is the JSON result."""
    cmd = [sys.executable, __file__, "--measure", str(volume), "--weights", str(weights), "--mask", str(mask_dest)]
    if all_windows:
        cmd.append("--all-windows")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(Path(__file__).parent)])}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"measurement failed ({src}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def build_volume(work: Path, crop_front: int) -> Path:
    volume = build_msd_volume(work / "msd_geometry_ct.nii.gz")
    if crop_front <= 0:
        return volume
    image = nib.load(str(volume))
    affine = image.affine.copy()
    affine[:3, 3] += affine[:3, :3] @ [0, crop_front, 0]
    cropped = work / f"msd_geometry_ct_front{crop_front}.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[:, crop_front:], affine, image.header), str(cropped))
    return cropped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--weights", type=Path, default=YARDSTICK)
    parser.add_argument("--baseline-src", type=Path, help="the src/ folder of the checkout whose rule is the baseline")
    parser.add_argument("--crop-front", type=int, default=0, metavar="N", help="crop N voxels at the front first")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--mask", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--all-windows", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(measure(args.measure, args.weights, args.all_windows, args.mask)))
        return

    work = Path(tempfile.mkdtemp(prefix="bench_focus_"))
    volume = build_volume(work, args.crop_front)
    print(f"volume: {nib.load(str(volume)).shape} at 0.78 x 0.78 x 5 mm ({volume.name})")
    here = REPO / "src"
    configs = {"new rule": (here, False), ALL_WINDOWS: (here, True)}
    if args.baseline_src is not None:
        configs["old rule"] = (args.baseline_src.resolve(), False)
    for src, all_windows in configs.values():  # exports the weights to the model cache if needed
        run_measurement(src, volume, args.weights, all_windows, work / "warm.npy")
    results: dict[str, list[dict]] = {name: [] for name in configs}
    for round_index in range(args.rounds):
        order = list(configs) if round_index % 2 == 0 else list(reversed(configs))
        for name in order:
            src, all_windows = configs[name]
            result = run_measurement(src, volume, args.weights, all_windows, work / f"{name.replace(' ', '_')}.npy")
            results[name].append(result)
            print(f"round {round_index + 1} {name:12s} {result['seconds']:7.2f} s  "
                  f"{result['computed']}/{result['total']} windows  {result['voxels']} voxels", flush=True)
    reference = np.load(work / f"{ALL_WINDOWS.replace(' ', '_')}.npy")
    base = statistics.median(r["seconds"] for r in results[ALL_WINDOWS])
    print(f"{'rule':12s} {'median s':>9s} {'vs all':>7s} {'windows':>8s} {'voxels':>7s} {'differ':>7s}  seconds per run")
    for name, runs in results.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        mask = np.load(work / f"{name.replace(' ', '_')}.npy")
        print(f"{name:12s} {seconds:9.2f} {seconds / base:6.2f}x {runs[-1]['computed']:>4d}/{runs[-1]['total']:<3d} "
              f"{int(mask.sum()):7d} {int((mask != reference).sum()):7d}  "
              + " ".join(f"{r['seconds']:.2f}" for r in runs))


if __name__ == "__main__":
    main()
