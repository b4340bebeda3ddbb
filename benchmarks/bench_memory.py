"""Peak memory of `spleen-seg segment` on a 512 x 512 x 2000 whole-body CT, and the estimator against it.

Builds a whole-body-sized CT from the shared real CT: resampled (B-spline) to 0.78 x 0.78
x 1.0 mm, padded in-plane with air to 512 x 512 and repeated along z (every other copy
mirrored, so no seam is a step) to 2000 slices: int16 .nii.gz, 1 GB of voxels. Then runs

  spleen-seg segment VOLUME -o OUT --weights yardstick.pt --device cpu

as a whole process and prints its wall time, its peak RSS (the kernel's high-water mark,
``getrusage(RUSAGE_CHILDREN).ru_maxrss``) and the estimate of
``spleen_seg.pipeline.memory.estimate_case_peak_bytes`` for the volume. The acceptance
figure is a peak RSS below 8 GB.

``--table`` instead measures, for several smaller synthetic shapes, the pipeline's
case-dependent peak (read, preprocess, windows with a stand-in network, inversion,
report, mask and preview written) in a fresh process each, as peak RSS minus the RSS
before the case, next to the estimate.

Usage: python benchmarks/bench_memory.py [--slices 2000] [--keep DIR] [--table]
Not part of the test suite (minutes of CPU and 1 GB of disk).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from bench_inference import AIR_HU, REAL_CT, REPO, YARDSTICK

WHOLE_BODY_SPACING_MM = (0.78125, 0.78125, 1.0)
IN_PLANE = 512
GB = 1e9
# The estimator must bound the measured peak without wasting much: measured / estimate.
TABLE_SHAPES = ((512, 512, 200), (512, 512, 500), (400, 300, 800), (256, 256, 1200))
TABLE_SPACING_MM = (0.78125, 0.78125, 1.0)


def build_whole_body(dest: Path, slices: int) -> Path:
    """The real CT at whole-body CT geometry: (512, 512, slices) int16, RAS, 0.78 x 0.78 x 1 mm."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(REAL_CT))
    size = [int(round(n * s / t)) for n, s, t in zip(image.GetSize(), image.GetSpacing(), WHOLE_BODY_SPACING_MM,
                                                     strict=True)]
    resampled = sitk.Resample(image, size, sitk.Transform(), sitk.sitkBSpline, image.GetOrigin(),
                              WHOLE_BODY_SPACING_MM, image.GetDirection(), AIR_HU, sitk.sitkInt16)
    block = sitk.GetArrayFromImage(resampled).transpose(2, 1, 0)  # SimpleITK is (z, y, x)
    volume = np.full((IN_PLANE, IN_PLANE, slices), AIR_HU, dtype=np.int16)
    x0, y0 = (IN_PLANE - block.shape[0]) // 2, (IN_PLANE - block.shape[1]) // 2
    for index, z0 in enumerate(range(0, slices, block.shape[2])):
        tile = block if index % 2 == 0 else block[:, :, ::-1]
        depth = min(block.shape[2], slices - z0)
        volume[x0 : x0 + block.shape[0], y0 : y0 + block.shape[1], z0 : z0 + depth] = tile[:, :, :depth]
    affine = np.diag([*WHOLE_BODY_SPACING_MM, 1.0])
    out = nib.Nifti1Image(volume, affine)
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    nib.save(out, str(dest))
    return dest


def run_segment(volume: Path, out: Path, weights: Path) -> tuple[float, float, int]:
    """(wall s, peak RSS bytes of the child process, exit status) of one ``spleen-seg segment``."""
    cmd = [sys.executable, "-m", "spleen_seg.cli", "-q", "segment", str(volume), "-o", str(out),
           "--weights", str(weights), "--device", "cpu"]
    print("command:", " ".join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
    # ru_maxrss is in KiB on Linux: the largest peak of any waited-for child (one child here).
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return wall, float(peak), proc.returncode


# One case through the whole pipeline in a fresh process, with a stand-in network (the
# windows' network memory is the runtime's, fixed and outside the case's estimate).
_CASE_SCRIPT = r"""
import json, resource, sys
from pathlib import Path
import numpy as np
import psutil
from spleen_seg.io.nifti import read_volume, write_mask
from spleen_seg.outputs.preview import write_preview
from spleen_seg.outputs.report import build_report, check_intensity, keep_components
from spleen_seg.pipeline.backends import Runner
from spleen_seg.pipeline.segmenter import Segmenter
import matplotlib.figure, scipy.ndimage  # imported before the baseline, as in a batch
source, out = Path(sys.argv[1]), Path(sys.argv[2])
segmenter = Segmenter(runner=Runner(lambda batch: batch - 0.5, 4, "stand-in"), progress=False)
segmenter.predict(np.zeros((20, 20, 20), np.float32) + np.arange(20), __import__("spleen_seg.io.nifti", fromlist=["x"]).Geometry((20, 20, 20), np.eye(4)))
before = psutil.Process().memory_info().rss
array, geometry = read_volume(source)
warnings = check_intensity(array, str(source), False)
mask = segmenter.predict(array, geometry, source)
components = keep_components(mask, False)
report = build_report("case", str(source), components.mask, array, geometry, components, warnings)
write_mask(components.mask, geometry, out / "spleen.nii.gz")
write_preview(array, components.mask, geometry.affine_ras, out / "preview.png", "case")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"before": before, "peak": peak}))
"""


def synthetic_ct(dest: Path, shape: tuple[int, int, int], spacing_mm: tuple[float, float, float]) -> Path:
    """An int16 CT-like volume: air around a soft-tissue cylinder holding a brighter ellipsoid.

    The noise keeps the tissue below the stand-in network's threshold (53.5 HU), so only
    the ellipsoid is "spleen", as a spleen model's output would be.
    """
    rng = np.random.default_rng(0)
    x = np.linspace(-1, 1, shape[0], dtype=np.float32)[:, None]
    y = np.linspace(-1, 1, shape[1], dtype=np.float32)[None, :]
    body = (x**2 + y**2) < 0.8
    volume = np.empty(shape, dtype=np.int16)
    for z in range(shape[2]):
        plane = np.where(body, 30, AIR_HU).astype(np.int16)
        plane += rng.integers(-15, 15, size=plane.shape, dtype=np.int16)
        if abs(z - shape[2] / 2) < shape[2] / 8:
            plane[((x - 0.3) ** 2 + (y + 0.2) ** 2) < 0.04] = 120
        volume[:, :, z] = plane
    affine = np.diag([*spacing_mm, 1.0])
    nib.save(nib.Nifti1Image(volume, affine), str(dest))
    return dest


def table(work: Path) -> None:
    from spleen_seg.pipeline.memory import estimate_case_peak_bytes

    print(f"{'shape':>16s} {'voxels M':>9s} {'estimate GB':>12s} {'measured GB':>12s} {'measured/estimate':>18s}")
    for shape in TABLE_SHAPES:
        source = synthetic_ct(work / f"ct_{'x'.join(map(str, shape))}.nii.gz", shape, TABLE_SPACING_MM)
        out = work / f"out_{source.stem}"
        out.mkdir(exist_ok=True)
        proc = subprocess.run([sys.executable, "-c", _CASE_SCRIPT, str(source), str(out)], capture_output=True,
                              text=True, cwd=REPO)
        if proc.returncode != 0:
            sys.exit(proc.stderr[-3000:])
        numbers = json.loads(proc.stdout.strip().splitlines()[-1])
        measured = numbers["peak"] - numbers["before"]
        estimate = estimate_case_peak_bytes(shape, TABLE_SPACING_MM)
        print(f"{'x'.join(map(str, shape)):>16s} {np.prod(shape) / 1e6:9.1f} {estimate / GB:12.2f} "
              f"{measured / GB:12.2f} {measured / estimate:18.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=2000)
    parser.add_argument("--weights", type=Path, default=YARDSTICK)
    parser.add_argument("--keep", type=Path, help="folder for the volume and outputs (reused if the volume exists)")
    parser.add_argument("--table", action="store_true", help="estimate against measured peak on smaller shapes")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.table:
        table(work)
        return
    if not REAL_CT.exists() or not args.weights.exists():
        sys.exit(f"needs {REAL_CT} and {args.weights}")
    from spleen_seg.pipeline.memory import estimate_case_peak_bytes

    volume = work / f"whole_body_512x512x{args.slices}.nii.gz"
    if not volume.exists():
        start = time.perf_counter()
        build_whole_body(volume, args.slices)
        print(f"built {volume} in {time.perf_counter() - start:.0f} s ({volume.stat().st_size / 1e6:.0f} MB)")
    shape = (IN_PLANE, IN_PLANE, args.slices)
    estimate = estimate_case_peak_bytes(shape, WHOLE_BODY_SPACING_MM)
    wall, peak, status = run_segment(volume, work / "out", args.weights)
    report = work / "out" / volume.name.removesuffix(".nii.gz") / "report.json"
    spleen = json.loads(report.read_text())["volume_ml"] if report.exists() else float("nan")
    print(f"volume {shape} int16 at {WHOLE_BODY_SPACING_MM} mm; exit status {status}")
    print(f"wall {wall:.1f} s, peak RSS {peak / GB:.2f} GB (limit 8 GB), case estimate {estimate / GB:.2f} GB "
          f"(beyond the process's own), spleen {spleen:.1f} mL")


if __name__ == "__main__":
    main()
