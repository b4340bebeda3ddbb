"""End-to-end inference benchmark: the MONAI bundle's inference.json against `spleen-seg segment`.

Builds a CT of MSD Task09 geometry (512 x 512 in-plane, 0.78 mm pixels, 5 mm slices) from
the shared real CT (B-spline for the image, padded with -1024 HU), then runs, alternating,
  A: python -m monai.bundle run --config_file configs/inference.json   (the reference pipeline)
  B: spleen-seg segment VOLUME -o OUT --weights W                      (our default path)
as whole processes with the same weights (the yardstick weights), and prints per-run wall
time and peak RSS, their medians, the speed ratio, the Dice between the two masks, and the
sliding windows spleen-seg computed (counted in one extra, untimed, in-process run).

Usage: python benchmarks/bench_inference.py [--runs 3] [--weights PATH] [--extra-args "..."]
       [--variant NAME="flags" ...]   (more spleen-seg configurations, timed in the same rotation)
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SPLEEN_SEG_SHARED", REPO.parent / "shared"))
REAL_CT = SHARED / "data" / "real_ct" / "ct_abdomen_3mm.nii.gz"
YARDSTICK = SHARED / "models" / "yardstick.pt"
MSD_SPACING_MM = (0.78125, 0.78125, 5.0)
MSD_IN_PLANE = 512
AIR_HU = -1024


def build_msd_volume(dest: Path) -> Path:
    """Resample the real CT to MSD geometry (B-spline), pad in-plane to 512 x 512 with air."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(REAL_CT))
    size = [int(round(n * s / t)) for n, s, t in zip(image.GetSize(), image.GetSpacing(), MSD_SPACING_MM, strict=True)]
    resampled = sitk.Resample(image, size, sitk.Transform(), sitk.sitkBSpline, image.GetOrigin(), MSD_SPACING_MM,
                              image.GetDirection(), AIR_HU, sitk.sitkInt16)
    pad = [max(MSD_IN_PLANE - size[0], 0), max(MSD_IN_PLANE - size[1], 0), 0]
    low = [p // 2 for p in pad]
    high = [p - p // 2 for p in pad]
    padded = sitk.ConstantPad(resampled, low, high, AIR_HU)
    sitk.WriteImage(padded, str(dest))
    return dest


def timed(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one whole process; the peak from the child's own rusage
    (``os.wait4``), so no GNU time is needed (the lent GPU image may lack it)."""
    with tempfile.TemporaryFile() as output:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=output, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
        if proc.returncode != 0:
            output.seek(0)
            tail = output.read().decode(errors="replace")[-3000:]
            sys.exit(f"command failed ({proc.returncode}): {shlex.join(cmd)}\n{tail}")
    return wall, usage.ru_maxrss / 1024  # KiB on Linux


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def windows_computed(volume: Path, weights: Path, flags: str) -> str:
    """"computed/total" sliding windows of one in-process segmentation with ``flags``' window
    and backend options (a count, so unlike the times it does not depend on the load)."""
    from spleen_seg.io.nifti import read_volume
    from spleen_seg.pipeline.segmenter import load_segmenter

    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--all-windows", action="store_true")
    options.add_argument("--backend", default="auto")
    known, _ = options.parse_known_args(shlex.split(flags))
    segmenter = load_segmenter(weights, "cpu", known.backend, progress=False, all_windows=known.all_windows)
    segmenter.predict(*read_volume(volume))
    stats = segmenter.last_windows
    return "" if stats is None else f"{stats.computed}/{stats.total}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--weights", type=Path, default=YARDSTICK)
    parser.add_argument("--extra-args", default="", help="extra flags for spleen-seg segment")
    parser.add_argument("--variant", action="append", default=[], metavar='NAME="FLAGS"',
                        help="another spleen-seg configuration to time, e.g. torch=\"--backend torch\"")
    args = parser.parse_args()
    if not REAL_CT.exists() or not args.weights.exists():
        sys.exit(f"needs {REAL_CT} and {args.weights}")

    work = Path(tempfile.mkdtemp(prefix="bench_"))
    dataset = work / "Task09_Spleen"
    (dataset / "imagesTs").mkdir(parents=True)
    volume = build_msd_volume(dataset / "imagesTs" / "msd_geometry_ct.nii.gz")
    print(f"volume: {nib.load(str(volume)).shape} at {MSD_SPACING_MM} mm from {REAL_CT.name}")
    bundle_root = work / "bundle"
    (bundle_root / "models").mkdir(parents=True)
    (bundle_root / "models" / "model.pt").symlink_to(args.weights.resolve())

    bundle_cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
                  "--bundle_root", str(bundle_root), "--dataset_dir", str(dataset), "--output_dir", str(work / "bundle_out")]
    def ours_cmd(name: str, flags: str) -> list[str]:
        return [sys.executable, "-m", "spleen_seg.cli", "-q", "segment", str(volume), "-o", str(work / f"out_{name}"),
                "--weights", str(args.weights), "--overwrite", *shlex.split(flags)]  # every run computes (no resume)

    variants = {"spleen-seg": args.extra_args}
    variants.update(dict(v.split("=", 1) for v in args.variant))
    commands = {"bundle": bundle_cmd, **{name: ours_cmd(name, flags) for name, flags in variants.items()}}
    for name in variants:  # first use exports the weights to the model cache: not timed
        warm_wall, _ = timed(commands[name], REPO)
        print(f"first run of {name} (exports the model to its cache if needed): {warm_wall:.1f} s")

    results: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for run in range(1, args.runs + 1):
        for name, cmd in commands.items():
            wall, rss = timed(cmd, REPO)
            results[name].append((wall, rss))
            print(f"run {run} {name:12s} wall {wall:6.2f} s  peak RSS {rss:7.0f} MiB", flush=True)

    bundle_mask = np.asarray(nib.load(str(work / "bundle_out" / "msd_geometry_ct" / "msd_geometry_ct_trans.nii.gz")).dataobj)
    bundle_wall = statistics.median(w for w, _ in results["bundle"])
    windows = {name: windows_computed(volume, args.weights, flags) for name, flags in variants.items()}
    print(f"{'pipeline':12s} {'median s':>9s} {'ratio':>6s} {'peak RSS MiB':>13s} {'Dice vs bundle':>15s} {'windows':>8s}")
    for name, runs in results.items():
        wall = statistics.median(w for w, _ in runs)
        rss = statistics.median(r for _, r in runs)
        if name == "bundle":
            score = 1.0
        else:
            mask = np.asarray(nib.load(str(work / f"out_{name}" / "msd_geometry_ct" / "spleen.nii.gz")).dataobj)
            score = dice(mask, bundle_mask)
        print(f"{name:12s} {wall:9.2f} {bundle_wall / wall:5.2f}x {rss:13.0f} {score:15.4f} {windows.get(name, ''):>8s}")


if __name__ == "__main__":
    main()
