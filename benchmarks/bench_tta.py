"""Flip TTA's cost per CT and effect on Dice: 20 held-out phantoms, the packaged demo weights.

Each phantom (``make_phantom`` seeds 7001.., its drawn geometry and orientation; the demo
weights were trained on the seed-1 dataset of ``write_msd_dataset``, whose per-case seeds
differ from these) is segmented in one process, alternately, by the plain pipeline and by
each TTA variant (``--axes xyz z``: all 7 mirror combinations, then only head-feet), with
the default CPU backend. Printed per case: the seconds of ``Segmenter.predict`` (the whole
pipeline: resampling, windows, inversion) and the Dice against the phantom's truth; then the
median cost ratio (TTA / plain, per CT) and the mean and median Dice per variant.

Usage: python benchmarks/bench_tta.py [--cases 20] [--axes xyz z] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from spleen_seg.io.nifti import Geometry
from spleen_seg.pipeline.network import demo_weights_path
from spleen_seg.pipeline.segmenter import load_segmenter
from spleen_seg.pipeline.tta import check_tta_axes
from spleen_seg.training.evaluate import dice
from spleen_seg.training.phantom import _case_seed, make_phantom

FIRST_SEED = 7001
# The demo weights' training set: write_msd_dataset(n_cases=24, seed=1) (README, "Demo weights").
DEMO_TRAINING_SEED, DEMO_TRAINING_CASES = 1, 24


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--axes", nargs="+", default=["xyz", "z"], help="TTA variants, each a set of axes")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    seeds = list(range(FIRST_SEED, FIRST_SEED + args.cases))
    training = {_case_seed(DEMO_TRAINING_SEED, i) for i in range(1, DEMO_TRAINING_CASES + 1)}
    if training & set(seeds):
        raise SystemExit("a benchmark seed is one of the demo weights' training cases")
    plain = load_segmenter(demo_weights_path(), "cpu", progress=False)
    # The TTA variants share the plain one's network; the weights' record is checked as load_segmenter does
    # (the demo weights were trained without flips: every variant runs with the warning, printed once).
    variants = {"plain": plain, **{axes: replace(plain, tta_axes=axes,
                                                 tta_warning=check_tta_axes(demo_weights_path(), axes, explicit=True))
                                   for axes in args.axes}}
    for name, variant in variants.items():
        if variant.tta_warning:
            print(f"{name}: {variant.tta_warning}")
    warm = make_phantom(FIRST_SEED - 1, shape=(64, 64, 32), spacing_mm=(3.0, 3.0, 4.0))
    plain.predict(warm.image_hu.astype(np.float32), Geometry(shape=warm.image_hu.shape, affine_ras=warm.affine))
    rows = []
    print("seed   shape            " + "".join(f"{name:>16s}" for name in variants) + "   (seconds / Dice)")
    for seed in seeds:
        case = make_phantom(seed)
        image = case.image_hu.astype(np.float32)
        geometry = Geometry(shape=tuple(image.shape), affine_ras=case.affine)  # type: ignore[arg-type]
        row: dict = {"seed": seed, "shape": list(image.shape), "orientation": case.orientation}
        for name, segmenter in variants.items():
            start = time.perf_counter()
            mask = segmenter.predict(image, geometry)
            row[name] = {"seconds": time.perf_counter() - start, "dice": dice(mask, case.spleen_mask),
                         "windows": segmenter.last_windows.computed if segmenter.last_windows else None}
        rows.append(row)
        print(f"{seed}  {str(tuple(image.shape)):16s} " + "".join(
            f"{row[name]['seconds']:8.1f} {row[name]['dice']:.4f}" for name in variants), flush=True)
    summary = {}
    for name in variants:
        dices = [row[name]["dice"] for row in rows]
        summary[name] = {"mean_dice": statistics.mean(dices), "median_dice": statistics.median(dices),
                         "min_dice": min(dices), "median_seconds": statistics.median(r[name]["seconds"] for r in rows),
                         "median_cost_ratio": statistics.median(r[name]["seconds"] / r["plain"]["seconds"] for r in rows),
                         "better_than_plain": sum(r[name]["dice"] > r["plain"]["dice"] for r in rows)}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "cases": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
