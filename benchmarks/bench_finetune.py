"""Does learning from the corrections work? The review loop on phantoms of a shifted domain, on the CPU.

A domain where the demo weights do poorly (``--domain``: the degraded phantoms of
``training/degrade.py`` at a fixed severity, or a HU offset), then the loop as a user runs it:

1. ``spleen-seg segment`` a few cases of that domain with the demo weights;
2. review them as the review app would: every correction equals the truth (the phantom's label),
   saved as ``spleen_corrected.nii.gz`` with its record in ``report.json``
   (``outputs/review_state.py``);
3. ``spleen-seg corrections export`` them;
4. ``spleen-seg train --init-weights <demo weights>`` on the export: a short CPU fine-tune (the
   last exported case validates, before the first update and at the end);
5. the Dice of the demo weights and of the fine-tuned ``models/model.pt`` (``spleen-seg segment``)
   on held-out cases of the shifted domain (not among the corrected ones) and on held-out cases
   of the original, clean domain (does it forget?).

With ``--accepted N`` the reviewer also accepted N clean cases (the model's masks, as the export
takes them), which the fine-tune then sees beside the corrections. Their names sort before the
corrected ones, so the validation case stays a corrected one of the shifted domain.

Seconds per iteration come from the training's own TensorBoard events (the wall time between
consecutive ``train_loss`` events within an epoch: the median, and the fastest, which is the
machine's speed when no other process competes for its cores).

Usage: python benchmarks/bench_finetune.py [--domain noise] [--severity 0.5] [--corrected 6]
       [--held-out 6] [--epochs 8] [--work DIR] [--json results.json]
       python benchmarks/bench_finetune.py --candidates   # the demo weights' Dice per candidate domain
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "helpers"))

from review_records import record_review  # noqa: E402
from tensorboard_scalars import tensorboard_scalars  # noqa: E402

from spleen_seg.io.nifti import Geometry  # noqa: E402
from spleen_seg.pipeline.network import demo_weights_path  # noqa: E402
from spleen_seg.training.degrade import DEGRADATIONS, degrade_phantom  # noqa: E402
from spleen_seg.training.evaluate import dice  # noqa: E402
from spleen_seg.training.phantom import PhantomCase, make_phantom  # noqa: E402

CLI = [sys.executable, "-m", "spleen_seg.cli", "-q"]
# The e2e tests' small geometry: 240 x 240 x 192 mm, 160 x 160 x 96 voxels after resampling.
GEOMETRY = {"shape": (96, 96, 48), "spacing_mm": (2.5, 2.5, 4.0)}
CORRECTED_SEED, HELD_OUT_SEED, ORIGINAL_SEED = 7101, 7201, 7301
ACCEPTED_SEED = 7051  # case_7051...: sorts before the corrected cases
CANDIDATE_SEED, CANDIDATES = 7001, 4
HU_OFFSET = "hu_offset_fixed"
DOMAINS = (*DEGRADATIONS, HU_OFFSET)
CANDIDATE_SEVERITIES = (0.5, 1.0)
CANDIDATE_OFFSETS_HU = (-150.0, -100.0, 100.0, 150.0)
# Per iteration: one volume, this many 96^3 crops (the recipe's patch; the recipe takes 4 per volume
# and 2 volumes per iteration, 4x the work).
CROPS_PER_ITERATION = 2
COMMAND_TIMEOUT_S = 3600


def shifted(case: PhantomCase, domain: str, severity: float, seed: int) -> PhantomCase:
    """``case`` in the shifted domain: a degradation at ``severity``, or (``hu_offset_fixed``) every HU + ``severity``."""
    if domain == HU_OFFSET:
        return replace(case, image_hu=case.image_hu.astype(np.float32) + np.float32(severity))
    return degrade_phantom(case, domain, seed, severity)


def write_cases(folder: Path, seeds: range, domain: str | None, severity: float) -> dict[str, np.ndarray]:
    """Write the phantoms (shifted unless ``domain`` is None) as NIfTI; returns case -> truth mask."""
    truth = {}
    folder.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        case = make_phantom(seed, **GEOMETRY)
        if domain is not None:
            case = shifted(case, domain, severity, seed)
        name = f"case_{seed}"
        image = nib.Nifti1Image(np.asarray(case.image_hu, dtype=np.float32), case.affine)
        image.set_sform(case.affine, code=1)
        image.set_qform(case.affine, code=1)
        nib.save(image, str(folder / f"{name}.nii.gz"))
        truth[name] = case.spleen_mask
    return truth


def run(args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def segment_dice(folders: list[Path], truth: dict[str, np.ndarray], weights: Path, out: Path) -> list[float]:
    """``spleen-seg segment`` every case of ``folders`` with ``weights``; the Dice of each against its truth."""
    run([*CLI, "segment", *map(str, folders), "-o", str(out), "--weights", str(weights)])
    return [dice(np.asarray(nib.load(str(out / name / "spleen.nii.gz")).dataobj), mask) for name, mask in truth.items()]


def candidates() -> None:
    """The demo weights' mean Dice on a few phantoms of each candidate domain (in-process, the segment pipeline)."""
    from spleen_seg.pipeline.segmenter import load_segmenter

    segmenter = load_segmenter(demo_weights_path(), "cpu", progress=False)
    options = [("clean", "", 0.0)] + [(f"{k} {s:g}", k, s) for k in DEGRADATIONS if k not in ("truncated_fov", "hu_offset")
                                     for s in CANDIDATE_SEVERITIES]
    options += [(f"HU offset {o:+g}", HU_OFFSET, o) for o in CANDIDATE_OFFSETS_HU]
    print(f"{'domain':22s} mean Dice  per case ({CANDIDATES} phantoms, seeds {CANDIDATE_SEED}..)")
    for label, domain, severity in options:
        values = []
        for seed in range(CANDIDATE_SEED, CANDIDATE_SEED + CANDIDATES):
            case = make_phantom(seed, **GEOMETRY)
            case = shifted(case, domain, severity, seed) if domain else case
            image = np.ascontiguousarray(case.image_hu, dtype=np.float32)
            mask = segmenter.predict(image, Geometry(shape=tuple(image.shape), affine_ras=case.affine))  # type: ignore[arg-type]
            values.append(dice(mask, case.spleen_mask))
        print(f"{label:22s} {np.mean(values):9.3f}  " + " ".join(f"{v:.3f}" for v in values), flush=True)


def seconds_per_iteration(log_dir: Path) -> tuple[float, float, int]:
    """Median and fastest wall seconds between consecutive train_loss events of one epoch, and the iterations."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    times = []
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            if any(value.tag == "train_loss" for value in event.summary.value):
                times.append((event.step, event.wall_time))
    times.sort()
    gaps = [b[1] - a[1] for a, b in zip(times, times[1:], strict=False) if b[0] == a[0] + 1]
    if not gaps:
        return float("nan"), float("nan"), len(times)
    return float(np.median(gaps)), float(min(gaps)), len(times)


def fine_tune(work: Path, args: argparse.Namespace) -> dict:
    demo = demo_weights_path()
    domain_truth = write_cases(work / "corrected_ct", range(CORRECTED_SEED, CORRECTED_SEED + args.corrected),
                               args.domain, args.severity)
    held_out = write_cases(work / "held_out_ct", range(HELD_OUT_SEED, HELD_OUT_SEED + args.held_out), args.domain,
                           args.severity)
    original = write_cases(work / "original_ct", range(ORIGINAL_SEED, ORIGINAL_SEED + args.held_out), None, 0.0)
    accepted = write_cases(work / "accepted_ct", range(ACCEPTED_SEED, ACCEPTED_SEED + args.accepted), None, 0.0)

    # 1-2. Segment the cases to review; the reviewer's corrections are the truth, the clean ones accepted.
    folders = [work / "corrected_ct", *([work / "accepted_ct"] if accepted else [])]
    reviewed = segment_dice(folders, {**domain_truth, **accepted}, demo, work / "out")
    corrected_dice = reviewed[:args.corrected]
    for name, mask in domain_truth.items():
        record_review(work / "out" / name, "rejected", mask)
    for name in accepted:
        record_review(work / "out" / name, "accepted")
    # 3. Export.
    export = run([*CLI, "corrections", "export", str(work / "out"), "-o", str(work / "dataset")])
    print(export.stdout.strip())
    # 4. Fine-tune from the demo weights.
    start = time.perf_counter()
    train = run([*CLI, "train", "--dataset-dir", str(work / "dataset"), "--bundle-root", str(work / "run"),
                 "--init-weights", str(demo), "--epochs", str(args.epochs), "--val-interval", str(args.epochs),
                 "--val-count", "1", "--num-workers", "0", "--device", "cpu",
                 "--set", f"train#random_transforms#0#num_samples={CROPS_PER_ITERATION}",
                 "--set", "train#dataloader#batch_size=1"])
    train_seconds = time.perf_counter() - start
    print(train.stdout.strip())
    per_iteration, fastest, iterations = seconds_per_iteration(work / "run" / "eval")
    validation = tensorboard_scalars(work / "run" / "eval")["val_mean_dice"]
    tuned = work / "run" / "models" / "model.pt"
    # 5. Held-out Dice, before and after.
    results = {"before": {}, "after": {}}
    for when, weights in (("before", demo), ("after", tuned)):
        results[when]["shifted"] = segment_dice([work / "held_out_ct"], held_out, weights, work / f"{when}_shifted")
        results[when]["original"] = segment_dice([work / "original_ct"], original, weights, work / f"{when}_original")
    return {"domain": args.domain, "severity": args.severity, "corrected_cases": args.corrected,
            "accepted_clean_cases": args.accepted, "demo_dice_on_accepted": reviewed[args.corrected:],
            "held_out_cases": args.held_out, "demo_dice_on_corrected": corrected_dice, "epochs": args.epochs,
            "iterations": iterations, "crops_per_iteration": CROPS_PER_ITERATION, "seconds_per_iteration": per_iteration,
            "fastest_seconds_per_iteration": fastest,
            "train_seconds": round(train_seconds, 1), "validation_dice": validation, "dice": results,
            "threads": os.environ.get("OMP_NUM_THREADS", "")}


def table(result: dict) -> str:
    rows = [f"{'held-out cases':32s} {'demo weights':>14s} {'fine-tuned':>12s}"]
    for key, label in (("shifted", f"shifted domain ({result['domain']} {result['severity']:g})"),
                       ("original", "original domain (clean)")):
        before, after = result["dice"]["before"][key], result["dice"]["after"][key]
        rows.append(f"{label:32s} {np.mean(before):14.3f} {np.mean(after):12.3f}")
    cases = result["corrected_cases"] + result["accepted_clean_cases"] - 1
    rows.append(f"{result['iterations']} iterations ({result['epochs']} epochs x {cases} cases, "
                f"{result['crops_per_iteration']} crops of 96^3 each), {result['seconds_per_iteration']:.1f} s per "
                f"iteration (fastest {result['fastest_seconds_per_iteration']:.1f} s), training run "
                f"{result['train_seconds']:.0f} s")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", action="store_true", help="only measure the demo weights per candidate domain")
    parser.add_argument("--domain", choices=DOMAINS, default="noise")
    parser.add_argument("--severity", type=float, default=0.5,
                        help="degradation severity in [0, 1], or the HU added for hu_offset_fixed")
    parser.add_argument("--corrected", type=int, default=6, help="cases segmented, corrected and exported")
    parser.add_argument("--accepted", type=int, default=0, help="clean cases segmented, accepted and exported")
    parser.add_argument("--held-out", type=int, default=6, help="held-out cases per domain")
    parser.add_argument("--epochs", type=int, default=12,
                        help="fine-tune epochs (each: corrected + accepted - 1 iterations)")
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if args.candidates:
        candidates()
        return 0
    with tempfile.TemporaryDirectory(prefix="bench_finetune_") as scratch:
        work = args.work or Path(scratch)
        result = fine_tune(work, args)
    print(json.dumps(result, indent=2, default=float))
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
