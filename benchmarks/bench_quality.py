"""Does the quality score find the bad masks? ROC AUC on degraded phantoms, threshold calibrated apart.

Two disjoint sets of phantoms (seeds 8001.. for calibration, 9001.. for evaluation), each
half clean and half degraded (``training/degrade.py``: strong noise, streaks, truncated
field of view, wrong HU offset, motion blur, in turn, severity drawn per case), are
segmented with the packaged demo weights. A case *fails* when its Dice against the
phantom's truth is below 0.9. On the calibration set the script reports the ROC AUC of the
margin score for several margin thresholds and the review threshold that maximises
Youden's J (sensitivity + specificity - 1); on the evaluation set it reports the ROC AUC of
the score as the code computes it (``pipeline.quality`` constants) and the sensitivity and
specificity of ``review_suggested``. With ``--tta-axes`` the flip-disagreement score is
computed too (8x the network time with xyz).

Usage: python benchmarks/bench_quality.py [--cases 40] [--geometry small|default] [--tta-axes xyz]
       [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy.stats import mannwhitneyu

from spleen_seg.io.nifti import Geometry
from spleen_seg.pipeline import quality, segmenter
from spleen_seg.pipeline.network import demo_weights_path
from spleen_seg.pipeline.segmenter import load_segmenter
from spleen_seg.pipeline.tta import check_tta_axes
from spleen_seg.training.degrade import DEGRADATIONS, degrade_phantom
from spleen_seg.training.evaluate import dice
from spleen_seg.training.phantom import make_phantom

FAIL_DICE = 0.9
CALIBRATION_SEED, EVALUATION_SEED = 8001, 9001
GEOMETRIES = {"small": {"shape": (96, 96, 48), "spacing_mm": (2.5, 2.5, 4.0)}, "default": {}}
MARGIN_CANDIDATES = (0.5, 1.0, 2.0, 4.0)


@dataclass
class Case:
    split: str
    seed: int
    degradation: str
    severity: float | None
    dice: float = 0.0
    score: float = 0.0  # the code's score (margin method)
    review: bool = False
    by_margin: dict[str, float] = field(default_factory=dict)  # margin score per candidate threshold
    tta_dice: float | None = None
    tta_score: float | None = None
    tta_review: bool | None = None
    tta_disagreement: float | None = None  # the flips' disagreement alone (disagreeing_voxels / region_voxels)


def roc_auc(scores: list[float], failed: list[bool]) -> float:
    """P(score of a failed case > score of a good one), ties counting half (Mann-Whitney U / n1 n2)."""
    bad = [s for s, f in zip(scores, failed, strict=True) if f]
    good = [s for s, f in zip(scores, failed, strict=True) if not f]
    if not bad or not good:
        return float("nan")
    return float(mannwhitneyu(bad, good).statistic / (len(bad) * len(good)))


def youden_threshold(scores: list[float], failed: list[bool]) -> tuple[float, float]:
    """The threshold t (flag when score > t) maximising sensitivity + specificity - 1, midway between scores."""
    values = sorted(set(scores))
    candidates = [values[0] - 1e-6] + [(a + b) / 2 for a, b in zip(values, values[1:], strict=False)]
    best = (-1.0, 0.0)
    for t in candidates:
        j = sum(1 for s, f in zip(scores, failed, strict=True) if f and s > t) / max(sum(failed), 1) + sum(
            1 for s, f in zip(scores, failed, strict=True) if not f and s <= t) / max(len(failed) - sum(failed), 1) - 1
        if j > best[0]:
            best = (j, t)
    return best[1], best[0]


def make_cases(split: str, first_seed: int, count: int) -> list[Case]:
    """Even positions clean, odd ones degraded by each kind in turn."""
    cases = []
    for index in range(count):
        kind = "none" if index % 2 == 0 else DEGRADATIONS[(index // 2) % len(DEGRADATIONS)]
        cases.append(Case(split, first_seed + index, kind, None))
    return cases


def run_case(case: Case, seg, geometry_kwargs: dict, tta_axes: str, captured: dict) -> None:
    phantom = make_phantom(case.seed, **geometry_kwargs)
    if case.degradation != "none":
        rng_severity = float(np.random.default_rng(case.seed + 1).uniform())
        case.severity = round(rng_severity, 3)
        phantom = degrade_phantom(phantom, case.degradation, case.seed, rng_severity)
    image = np.ascontiguousarray(phantom.image_hu, dtype=np.float32)
    geometry = Geometry(shape=tuple(image.shape), affine_ras=phantom.affine)  # type: ignore[arg-type]
    mask = seg.predict(image, geometry)
    case.dice = dice(mask, phantom.spleen_mask)
    case.score, case.review = seg.last_quality.score, seg.last_quality.review_suggested
    margin = captured["margin"]
    positive = margin > 0
    found = quality._region(positive)
    for threshold in MARGIN_CANDIDATES:
        if found is None:
            case.by_margin[str(threshold)] = quality.EMPTY_SCORE
        else:
            box, region = found
            case.by_margin[str(threshold)] = float((np.abs(margin[box][region]) < threshold).mean())
    if tta_axes:
        # The plain segmenter's network; the weights' record checked as load_segmenter does (main prints it once).
        tta = replace(seg, tta_axes=tta_axes, tta_warning=check_tta_axes(demo_weights_path(), tta_axes, explicit=True))
        mask = tta.predict(image, geometry)
        case.tta_dice = dice(mask, phantom.spleen_mask)
        case.tta_score, case.tta_review = tta.last_quality.score, tta.last_quality.review_suggested
        region = tta.last_quality.region_voxels
        case.tta_disagreement = tta.last_quality.disagreeing_voxels / region if region else quality.EMPTY_SCORE


def summarise(cases: list[Case], tta_axes: str) -> dict:
    out: dict = {}
    calibration = [c for c in cases if c.split == "calibration"]
    evaluation = [c for c in cases if c.split == "evaluation"]
    for name, subset in (("calibration", calibration), ("evaluation", evaluation)):
        failed = [c.dice < FAIL_DICE for c in subset]
        entry = {"cases": len(subset), "failed": sum(failed),
                 "auc_by_margin_threshold": {t: roc_auc([c.by_margin[t] for c in subset], failed)
                                             for t in subset[0].by_margin},
                 "auc": roc_auc([c.score for c in subset], failed)}
        threshold, j = youden_threshold([c.score for c in subset], failed)
        entry["youden_threshold"], entry["youden_j"] = threshold, j
        flagged = [c.review for c in subset]
        entry["sensitivity"] = sum(f and r for f, r in zip(failed, flagged, strict=True)) / max(sum(failed), 1)
        entry["specificity"] = sum((not f) and (not r) for f, r in zip(failed, flagged, strict=True)) / max(
            len(failed) - sum(failed), 1)
        if tta_axes:
            tta_failed = [(c.tta_dice or 0.0) < FAIL_DICE for c in subset]
            entry["tta"] = {"failed": sum(tta_failed),
                            "auc": roc_auc([c.tta_score or 0.0 for c in subset], tta_failed),
                            "auc_disagreement_alone": roc_auc([c.tta_disagreement or 0.0 for c in subset], tta_failed),
                            "youden_threshold": youden_threshold([c.tta_score or 0.0 for c in subset], tta_failed)[0],
                            "sensitivity": sum(f and bool(c.tta_review) for f, c in zip(tta_failed, subset, strict=True))
                            / max(sum(tta_failed), 1),
                            "specificity": sum((not f) and not c.tta_review for f, c in zip(tta_failed, subset, strict=True))
                            / max(len(tta_failed) - sum(tta_failed), 1)}
        out[name] = entry
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=40, help="phantoms per set (half degraded)")
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="small")
    parser.add_argument("--tta-axes", default="", help="also score with flip TTA over these axes, e.g. xyz")
    parser.add_argument("--json", type=Path, help="write every case and the summary here")
    args = parser.parse_args()

    captured: dict = {}
    original = segmenter.quality_score

    def capture(margin, agreement=None):  # keep the plain margin to score other margin thresholds
        if agreement is None:
            captured["margin"] = margin.copy()
        return original(margin, agreement)

    segmenter.quality_score = capture  # type: ignore[assignment]
    seg = load_segmenter(demo_weights_path(), "cpu", progress=False)
    if args.tta_axes:
        print(check_tta_axes(demo_weights_path(), args.tta_axes, explicit=True) or "TTA axes declared safe by the weights")
    cases = make_cases("calibration", CALIBRATION_SEED, args.cases) + make_cases("evaluation", EVALUATION_SEED, args.cases)
    start = time.perf_counter()
    print("split        seed  degradation    severity   Dice  score review"
          + ("  TTA Dice  TTA score  disagreement" if args.tta_axes else ""))
    for case in cases:
        run_case(case, seg, GEOMETRIES[args.geometry], args.tta_axes, captured)
        severity = "" if case.severity is None else f"{case.severity:.2f}"
        line = (f"{case.split:12s} {case.seed:5d}  {case.degradation:13s} {severity:>8s} {case.dice:6.3f} "
                f"{case.score:6.3f} {'yes' if case.review else 'no':>6s}")
        if args.tta_axes:
            line += f"  {case.tta_dice:8.3f}  {case.tta_score:9.3f}  {case.tta_disagreement:12.3f}"
        print(line, flush=True)
    summary = summarise(cases, args.tta_axes)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    summary["code"] = {"margin_threshold": quality.MARGIN_THRESHOLD, "review_threshold": quality.REVIEW_THRESHOLD,
                       "geometry": args.geometry, "tta_axes": args.tta_axes}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "cases": [vars(c) for c in cases]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
