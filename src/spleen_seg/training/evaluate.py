"""Evaluation in the original image space: the per-case metrics CSV, its summary rows and a JSON twin.

Per case (on the label's grid, after the bundle's ``Invertd``): Dice, HD95 (mm), the
normalised surface Dice (NSD) at 1, 2 and 3 mm, the predicted and label volumes (mL), the
absolute volume error ``|pred - label|`` (mL) and the relative volume error
``100 (pred - label) / label`` (%, signed: positive when the prediction is too large).

NSD is MONAI's ``SurfaceDiceMetric`` with ``use_subvoxels=True``: surface elements and
their areas as in DeepMind's surface-distance reference (Nikolov et al. 2021), tolerances
in mm through the voxel spacing. It is the fraction of both surfaces' area lying within the
tolerance of the other surface.

Conventions when a mask is empty: both empty (perfect agreement that there is no spleen):
Dice 1.0, NSD 1.0 at every tolerance, HD95 undefined (empty in the CSV, null in the JSON),
volume errors 0 mL and undefined %. Only one empty: Dice 0.0, NSD 0.0, HD95 undefined; the
relative volume error is undefined when the label is empty.

After the cases, ``case_metrics.csv`` holds three summary rows, whose ``case`` is ``mean``,
``median`` and ``iqr`` (interquartile range, 75th minus 25th percentile), each over the
cases where the metric is defined; ``case_metrics.json`` holds the same cases and summary
plus how many cases each statistic covers.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

NSD_TOLERANCES_MM = (1.0, 2.0, 3.0)
NSD_COLUMNS = tuple(f"nsd_{tolerance:g}mm" for tolerance in NSD_TOLERANCES_MM)
CSV_COLUMNS = ("case", "dice", "hd95_mm", *NSD_COLUMNS, "pred_volume_ml", "label_volume_ml", "abs_volume_error_ml",
               "rel_volume_error_percent")
METRIC_COLUMNS = CSV_COLUMNS[1:]
SUMMARY_STATISTICS = ("mean", "median", "iqr")
JSON_SUFFIX = ".json"
# The bundle override that names the weights evaluate.json loads (``spleen-seg evaluate --weights``).
WEIGHTS_OVERRIDE = "validate#handlers#0#load_path"


def dice(pred: np.ndarray, label: np.ndarray) -> float:
    """Dice of two binary masks; 1.0 when both are empty (see module docstring)."""
    pred, label = pred.astype(bool), label.astype(bool)
    total = int(pred.sum()) + int(label.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, label).sum()) / total


def hd95_mm(pred: np.ndarray, label: np.ndarray, spacing_mm: tuple[float, ...]) -> float:
    """95th percentile symmetric Hausdorff distance in mm; NaN when either mask is empty."""
    from monai.metrics import compute_hausdorff_distance

    if not pred.any() or not label.any():
        return math.nan
    p = torch.as_tensor(pred[None, None].astype(np.float32))
    lab = torch.as_tensor(label[None, None].astype(np.float32))
    value = compute_hausdorff_distance(p, lab, include_background=True, percentile=95, spacing=list(spacing_mm))
    return float(value.item())


def nsd(pred: np.ndarray, label: np.ndarray, spacing_mm: tuple[float, ...],
        tolerances_mm: tuple[float, ...] = NSD_TOLERANCES_MM) -> list[float]:
    """Normalised surface Dice of two binary masks (same shape, voxel ``spacing_mm``) at each tolerance (mm).

    MONAI's ``SurfaceDiceMetric`` with sub-voxel surfaces; 1.0 when both masks are empty,
    0.0 when one is (see the module docstring).
    """
    from monai.metrics import SurfaceDiceMetric

    pred, label = pred.astype(bool), label.astype(bool)
    if not pred.any() or not label.any():
        return [1.0 if not pred.any() and not label.any() else 0.0] * len(tolerances_mm)
    # One channel per tolerance: the metric applies class_thresholds[c] to channel c.
    channels = len(tolerances_mm)
    p = torch.as_tensor(pred)[None, None].expand(1, channels, *pred.shape)
    lab = torch.as_tensor(label)[None, None].expand(1, channels, *label.shape)
    metric = SurfaceDiceMetric(class_thresholds=list(tolerances_mm), include_background=True, use_subvoxels=True,
                               reduction="none")
    values = metric(p, lab, spacing=list(spacing_mm))
    return [float(v) for v in torch.as_tensor(values).reshape(-1)]


def volume_errors(pred_ml: float, label_ml: float) -> tuple[float, float]:
    """(|pred - label| in mL, 100 (pred - label) / label in %; NaN when the label is empty)."""
    relative = 100.0 * (pred_ml - label_ml) / label_ml if label_ml > 0 else math.nan
    return abs(pred_ml - label_ml), relative


def _spacing_and_voxel_ml(affine: torch.Tensor) -> tuple[tuple[float, ...], float]:
    a = torch.as_tensor(affine, dtype=torch.float64)[:3, :3]
    spacing = tuple(float(s) for s in torch.sqrt((a**2).sum(dim=0)))
    return spacing, float(abs(torch.linalg.det(a))) / 1000.0


def case_row(pred, label) -> dict[str, Any]:
    """Metrics of one case from one-hot MetaTensors (2, X, Y, Z) on the original grid."""
    pred_fg = np.asarray(torch.as_tensor(pred)[1].cpu() > 0.5)
    label_fg = np.asarray(torch.as_tensor(label)[1].cpu() > 0.5)
    spacing, voxel_ml = _spacing_and_voxel_ml(pred.affine)
    name = Path(str(pred.meta.get("filename_or_obj", "unknown"))).name
    pred_ml, label_ml = float(pred_fg.sum()) * voxel_ml, float(label_fg.sum()) * voxel_ml
    absolute, relative = volume_errors(pred_ml, label_ml)
    return {
        "case": name,
        "dice": dice(pred_fg, label_fg),
        "hd95_mm": hd95_mm(pred_fg, label_fg, spacing),
        **dict(zip(NSD_COLUMNS, nsd(pred_fg, label_fg, spacing), strict=True)),
        "pred_volume_ml": pred_ml,
        "label_volume_ml": label_ml,
        "abs_volume_error_ml": absolute,
        "rel_volume_error_percent": relative,
    }


def summary_rows(rows: list[dict[str, Any]]) -> dict[str, dict[str, float | int]]:
    """Per metric: mean, median, iqr (and q25, q75, n) over the cases where it is defined (not NaN)."""
    summary: dict[str, dict[str, float | int]] = {}
    for column in METRIC_COLUMNS:
        values = np.array([row[column] for row in rows], dtype=np.float64)
        values = values[~np.isnan(values)]
        if values.size == 0:
            summary[column] = {"mean": math.nan, "median": math.nan, "iqr": math.nan, "q25": math.nan,
                               "q75": math.nan, "n": 0}
            continue
        q25, median, q75 = np.percentile(values, [25.0, 50.0, 75.0])
        summary[column] = {"mean": float(values.mean()), "median": float(median), "iqr": float(q75 - q25),
                           "q25": float(q25), "q75": float(q75), "n": int(values.size)}
    return summary


def _cell(value: Any) -> Any:
    return "" if isinstance(value, float) and math.isnan(value) else value


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    """The cases sorted by name, then the ``mean``, ``median`` and ``iqr`` rows (see the module docstring)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in sorted(rows, key=lambda r: r["case"]):
        writer.writerow({k: _cell(v) for k, v in row.items()})
    if rows:
        summary = summary_rows(rows)
        for statistic in SUMMARY_STATISTICS:
            writer.writerow({"case": statistic, **{c: _cell(summary[c][statistic]) for c in METRIC_COLUMNS}})
    return buffer.getvalue()


def rows_to_json(rows: list[dict[str, Any]]) -> str:
    """The CSV's twin: ``{"cases": [...], "summary": {metric: {mean, median, iqr, q25, q75, n}}, "conventions"}``;
    undefined values are null."""
    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        return None if isinstance(value, float) and math.isnan(value) else value

    document = {"cases": [clean(row) for row in sorted(rows, key=lambda r: r["case"])],
                "summary": clean(summary_rows(rows)) if rows else {},
                "nsd_tolerances_mm": list(NSD_TOLERANCES_MM),
                "conventions": {"both_empty": "dice 1, nsd 1, hd95 null, volume errors 0 mL and null %",
                                "one_empty": "dice 0, nsd 0, hd95 null; relative volume error null when the label is "
                                             "empty", "rel_volume_error_percent": "100 (pred - label) / label, signed",
                                "summary": "over the cases where the metric is defined; iqr = q75 - q25"}}
    return json.dumps(document, indent=2) + "\n"


class CaseMetricsWriter:
    """Ignite handler: per-case metrics (``CSV_COLUMNS``) and their summary rows to a CSV, and its
    JSON twin beside it (``case_metrics.csv`` -> ``case_metrics.json``), atomically.

    Rows are computed on every rank and gathered to rank 0, which writes the files,
    so the multi-GPU evaluation writes one complete CSV.
    """

    def __init__(self, output_path: str) -> None:
        self.output_path = Path(output_path)
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine) -> None:
        self.rows = []

    def _collect(self, engine) -> None:
        for item in engine.state.output:
            self.rows.append(case_row(item["pred"], item["label"]))

    def _write(self, engine) -> None:
        import torch.distributed as dist

        from spleen_seg.io.atomic import atomic_write_text

        rows = self.rows
        if dist.is_available() and dist.is_initialized():
            gathered: list[list[dict[str, Any]]] = [[] for _ in range(dist.get_world_size())]
            dist.all_gather_object(gathered, rows)
            if dist.get_rank() != 0:
                return
            rows = [row for part in gathered for row in part]
        atomic_write_text(self.output_path, rows_to_csv(rows))
        atomic_write_text(self.output_path.with_suffix(JSON_SUFFIX), rows_to_json(rows))


def _check_weights(bundle_root: Path, overrides: dict[str, Any]) -> None:
    """Without a weights override, ``models/model.pt`` must exist; say what to do when a run left none."""
    from spleen_seg.errors import ConfigError
    from spleen_seg.training.train import BEST_WEIGHTS, UNVALIDATED_WEIGHTS

    if WEIGHTS_OVERRIDE in overrides:
        return
    best, unvalidated = bundle_root / "models" / BEST_WEIGHTS, bundle_root / "models" / UNVALIDATED_WEIGHTS
    if best.is_file():
        return
    if unvalidated.is_file():
        raise ConfigError(f"{best} does not exist: the training run ended before its first validation; its last, "
                          f"unvalidated weights are {unvalidated}: pass --weights {unvalidated} to evaluate them")
    raise ConfigError(f"{best} does not exist: train first (spleen-seg train) or pass --weights PATH")


def evaluate(bundle_root: str | Path, overrides: dict[str, Any]) -> float:
    """Run ``train.json`` + ``evaluate.json``; returns the mean Dice on the validation split.

    Raises ``ConfigError`` before running when no weights are given and ``models/model.pt``
    is missing (naming ``models/model_unvalidated.pt`` when a short run left one).
    """
    from spleen_seg.training.train import run_workflow

    _check_weights(Path(bundle_root).resolve(), overrides)
    workflow = run_workflow(bundle_root, ["train.json", "evaluate.json"], overrides)
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    return float(evaluator.state.metrics["val_mean_dice"])
