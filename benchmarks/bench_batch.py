"""Batch benchmark: the MONAI bundle's inference.json over 6 CTs against `spleen-seg segment` over the same 6.

Builds 6 distinct CTs of MSD Task09 geometry (512 x 512 x 67 at 0.78 x 0.78 x 5 mm) from the
shared real CT: each is the source moved by a different sub-voxel shift (and one mirrored
left-right) before the B-spline resampling, so the images differ voxel for voxel while
keeping the geometry. Then runs, alternating, as whole processes with the same weights:
  bundle:     python -m monai.bundle run --config_file configs/inference.json  (imagesTs holds the 6)
  spleen-seg: spleen-seg segment <6 files> -o OUT --weights W                   (the local batch)
  ray:        spleen-seg segment <6 files> -o OUT --weights W --ray            (a local Ray instance)
  parts:      K processes `--num-parts K --part-id I` one after another (only if the flag exists)
and prints per-run wall time and peak RSS, the medians, the speed ratios against the bundle,
and per-case mask Dice against the bundle's masks.

Usage: python benchmarks/bench_batch.py [--runs 3] [--weights PATH] [--no-ray] [--parts K]
       [--variant NAME="flags" ...] [--volumes DIR]

GPU (CTs per second on one GPU, target >= 2 CT/s): `benchmarks/gpu_check.sh` runs it with
`--device cuda --no-bundle --volumes DIR` over 24 copies of one CT of MSD geometry
(benchmarks/README.md, "Batch throughput on a GPU").
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from bench_inference import AIR_HU, MSD_IN_PLANE, MSD_SPACING_MM, REAL_CT, REPO, YARDSTICK, dice, timed

# Sub-voxel shifts (mm, in the source's physical space) that make each CT distinct.
SHIFTS_MM = ((0.0, 0.0, 0.0), (0.4, 0.0, 0.0), (0.0, -0.3, 0.0), (0.0, 0.0, 1.7), (-0.25, 0.35, -2.2),
             (0.2, 0.2, 0.9))
MIRRORED = {5}  # these indices are also mirrored left-right


def build_msd_volumes(folder: Path, count: int) -> list[Path]:
    """``count`` distinct CTs of MSD geometry: the shared CT shifted (and mirrored) then resampled (B-spline)."""
    import SimpleITK as sitk

    source = sitk.ReadImage(str(REAL_CT))
    size = [int(round(n * s / t)) for n, s, t in zip(source.GetSize(), source.GetSpacing(), MSD_SPACING_MM, strict=True)]
    paths = []
    for index in range(count):
        image = sitk.Flip(source, [True, False, False]) if index % len(SHIFTS_MM) in MIRRORED else source
        image.SetOrigin(source.GetOrigin())  # Flip moves the origin; keep the grid where it was
        shift = sitk.TranslationTransform(3, SHIFTS_MM[index % len(SHIFTS_MM)])
        resampled = sitk.Resample(image, size, shift, sitk.sitkBSpline, image.GetOrigin(), MSD_SPACING_MM,
                                  image.GetDirection(), AIR_HU, sitk.sitkInt16)
        pad = [max(MSD_IN_PLANE - size[0], 0), max(MSD_IN_PLANE - size[1], 0), 0]
        low = [p // 2 for p in pad]
        padded = sitk.ConstantPad(resampled, low, [p - q for p, q in zip(pad, low, strict=True)], AIR_HU)
        dest = folder / f"msd_ct_{index:02d}.nii.gz"
        sitk.WriteImage(padded, str(dest))
        paths.append(dest)
    return paths


def given_volumes(source: Path, images: Path) -> list[Path]:
    """Links in ``images`` (where the bundle reads them too) to the ``*.nii.gz`` of ``source``, sorted by name."""
    links = []
    for volume in sorted(source.glob("*.nii.gz")):
        links.append(images / volume.name)
        links[-1].symlink_to(volume.resolve())
    if not links:
        sys.exit(f"{source}: no *.nii.gz volumes there")
    return links


def network_alone(volumes: list[Path], weights: Path, device: str) -> None:
    """In this process: each volume read and preprocessed (not timed), then the network alone, timed.

    Prints one line per case, ``network <seconds> <windows computed>``: the floor under any
    batch path's time per case, whatever it overlaps.
    """
    from spleen_seg.batch.inputs import load_input
    from spleen_seg.pipeline.segmenter import load_segmenter

    segmenter = load_segmenter(weights, device, progress=False)
    for volume in volumes:
        array, geometry = load_input(volume)
        prepared = segmenter.prepare(array, geometry, volume)
        start = time.perf_counter()
        segmenter.compute_margin(prepared)
        print(f"network {time.perf_counter() - start:.3f} {prepared.windows.computed}", flush=True)


def network_run(volumes: list[Path], weights: Path, device: str) -> list[tuple[float, int]]:
    proc = subprocess.run([sys.executable, __file__, "--weights", str(weights), "--device", device, "--network-alone",
                           *map(str, volumes)], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"network-alone run failed:\n{proc.stderr[-3000:]}")
    return [(float(seconds), int(windows)) for _, seconds, windows in (line.split() for line in proc.stdout.splitlines()
                                                                       if line.startswith("network "))]


def has_flag(flag: str) -> bool:
    proc = subprocess.run([sys.executable, "-m", "spleen_seg.cli", "segment", "--help"], capture_output=True,
                          text=True, cwd=REPO)
    return flag in proc.stdout


def mask_of(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--weights", type=Path, default=YARDSTICK)
    parser.add_argument("--device", default="cpu", help="for spleen-seg (the bundle picks its own)")
    parser.add_argument("--no-bundle", action="store_true", help="skip the bundle (GPU throughput runs)")
    parser.add_argument("--no-ray", action="store_true", help="skip the --ray run")
    parser.add_argument("--parts", type=int, default=3, help="K of the parts run (0: skip)")
    parser.add_argument("--variant", action="append", default=[], metavar='NAME="FLAGS"',
                        help="another spleen-seg configuration to time")
    parser.add_argument("--volumes", type=Path, metavar="DIR",
                        help="time the *.nii.gz in DIR instead of building --cases CTs (no SimpleITK or ../shared needed)")
    parser.add_argument("--network-alone", nargs="+", type=Path, metavar="VOLUME", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.network_alone:
        network_alone(args.network_alone, args.weights, args.device)
        return
    if not args.weights.exists() or not (args.volumes or REAL_CT).exists():
        sys.exit(f"needs {args.weights} and {args.volumes or REAL_CT}")

    work = Path(tempfile.mkdtemp(prefix="bench_batch_"))
    dataset = work / "Task09_Spleen"
    (dataset / "imagesTs").mkdir(parents=True)
    volumes = given_volumes(args.volumes, dataset / "imagesTs") if args.volumes else \
        build_msd_volumes(dataset / "imagesTs", args.cases)
    first = nib.load(str(volumes[0]))
    spacing = tuple(round(float(z), 5) for z in first.header.get_zooms()[:3])
    print(f"{len(volumes)} volumes: {first.shape} at {spacing} mm from {args.volumes or REAL_CT.name}")
    bundle_root = work / "bundle"
    (bundle_root / "models").mkdir(parents=True)
    (bundle_root / "models" / "model.pt").symlink_to(args.weights.resolve())

    def ours(name: str, flags: str) -> list[str]:
        return [sys.executable, "-m", "spleen_seg.cli", "-q", "segment", *map(str, volumes), "-o",
                str(work / f"out_{name}"), "--weights", str(args.weights), "--device", args.device, "--overwrite",
                *shlex.split(flags)]

    commands: dict[str, list[list[str]]] = {}
    if not args.no_bundle:
        commands["bundle"] = [[sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
                               "--bundle_root", str(bundle_root), "--dataset_dir", str(dataset),
                               "--output_dir", str(work / "bundle_out")]]
    commands["spleen-seg"] = [ours("spleen-seg", "")]
    for name, flags in (v.split("=", 1) for v in args.variant):
        commands[name] = [ours(name, flags)]
    if not args.no_ray:
        commands["ray"] = [ours("ray", "--ray")]
    if args.parts and has_flag("--num-parts"):
        commands[f"parts{args.parts}"] = [ours(f"parts{args.parts}", f"--num-parts {args.parts} --part-id {i}")
                                          for i in range(args.parts)]
    elif args.parts:
        print("parts: this spleen-seg has no --num-parts; skipped")

    warm, _ = timed(commands["spleen-seg"][0], REPO)  # exports the weights to the model cache if needed
    print(f"first spleen-seg run (not timed: model cache, page cache): {warm:.1f} s")
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    network: list[list[tuple[float, int]]] = []
    for run in range(1, args.runs + 1):
        for name, cmds in commands.items():
            timings = [timed(cmd, REPO) for cmd in cmds]  # parts: the K processes one after another
            wall, rss = sum(t for t, _ in timings), max(r for _, r in timings)
            results[name].append((wall, rss))
            print(f"run {run} {name:12s} wall {wall:6.2f} s  peak RSS {rss:7.0f} MiB", flush=True)
        network.append(network_run(volumes, args.weights, args.device))
        print(f"run {run} network alone, per case: " + " ".join(f"{s:.2f} s ({w} windows)" for s, w in network[-1]))
    report(results, volumes, work, args.no_bundle)
    sums = [sum(s for s, _ in per_case) for per_case in network]
    ref = "bundle" if not args.no_bundle else "spleen-seg"
    ref_wall = statistics.median(w for w, _ in results[ref])
    print(f"network alone: {statistics.median(sums):.2f} s for the {len(volumes)} cases (median of {len(sums)} runs; "
          f"{statistics.median(sums) / len(volumes):.2f} s per case): a batch path can be at most "
          f"{ref_wall / statistics.median(sums):.2f}x faster than {ref} with these windows")


def report(results: dict[str, list[tuple[float, float]]], volumes: list[Path], work: Path, no_bundle: bool) -> None:
    reference = "bundle" if not no_bundle else "spleen-seg"
    ref_wall = statistics.median(w for w, _ in results[reference])
    print(f"\n{'pipeline':12s} {'median s':>9s} {'CT/s':>6s} {'ratio':>6s} {'peak RSS MiB':>13s} {'min Dice':>9s}")
    for name, runs in results.items():
        wall = statistics.median(w for w, _ in runs)
        rss = statistics.median(r for _, r in runs)
        scores = [] if name == reference else case_dice(name, volumes, work, reference)
        shown = f"{min(scores):9.4f}" if scores else f"{'-':>9s}"
        print(f"{name:12s} {wall:9.2f} {len(volumes) / wall:6.3f} {ref_wall / wall:5.2f}x {rss:13.0f} {shown}")
        if scores:
            print(f"{'':12s} per-case Dice vs {reference}: " + " ".join(f"{s:.4f}" for s in scores))


def case_dice(name: str, volumes: list[Path], work: Path, reference: str) -> list[float]:
    scores = []
    for volume in volumes:
        case = volume.name.removesuffix(".nii.gz")
        ours = mask_of(work / f"out_{name}" / case / "spleen.nii.gz")
        theirs = (mask_of(work / "bundle_out" / case / f"{case}_trans.nii.gz") if reference == "bundle"
                  else mask_of(work / f"out_{reference}" / case / "spleen.nii.gz"))
        scores.append(dice(ours, theirs))
    return scores


if __name__ == "__main__":
    main()
