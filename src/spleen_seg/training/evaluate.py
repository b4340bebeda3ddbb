"""Evaluation in the original image space, and the per-case metrics CSV.

The Dice convention when both prediction and label are empty: Dice 1.0 (perfect
agreement that there is no spleen) and HD95 empty in the CSV (undefined). When only
one is empty, Dice 0.0 and HD95 empty.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

CSV_COLUMNS = ("case", "dice", "hd95_mm", "pred_volume_ml", "label_volume_ml")


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
    return {
        "case": name,
        "dice": dice(pred_fg, label_fg),
        "hd95_mm": hd95_mm(pred_fg, label_fg, spacing),
        "pred_volume_ml": float(pred_fg.sum()) * voxel_ml,
        "label_volume_ml": float(label_fg.sum()) * voxel_ml,
    }


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in sorted(rows, key=lambda r: r["case"]):
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    return buffer.getvalue()


class CaseMetricsWriter:
    """Ignite handler: per-case Dice, HD95 (mm) and volumes (mL) to a CSV, atomically.

    Rows are computed on every rank and gathered to rank 0, which writes the file,
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


def evaluate(bundle_root: str | Path, overrides: dict[str, Any]) -> float:
    """Run ``train.json`` + ``evaluate.json``; returns the mean Dice on the validation split."""
    from spleen_seg.training.train import run_workflow

    workflow = run_workflow(bundle_root, ["train.json", "evaluate.json"], overrides)
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    return float(evaluator.state.metrics["val_mean_dice"])
