"""The bundle commands verbatim (``python -m monai.bundle run``, and under torchrun with two
CPU ranks on gloo) on phantoms: saved weights, per-case metrics and their numbers."""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
import pytest
import torch

from spleen_seg.pipeline.network import build, load_network
from spleen_seg.training.evaluate import CSV_COLUMNS, SUMMARY_STATISTICS

BUNDLE_RUN = [sys.executable, "-m", "monai.bundle", "run"]
# torchrun, two processes on this machine; --standalone picks a free rendezvous port.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2"]

# Two ranks on two cores: one thread each, or they thrash.
DDP_ENV = {"OMP_NUM_THREADS": "1"}
TRAIN_VAL_COUNT = 2
TINY_TRAINING = [
    "--epochs", "1", "--val_interval", "1", "--val_count", str(TRAIN_VAL_COUNT), "--num_workers", "0",
    "--train#random_transforms#0#num_samples", "1",
    "--train#random_transforms#0#spatial_size", "[64,64,64]",
    "--train#dataloader#batch_size", "1",
]
MIN_DICE = 0.85
MAX_HD95_MM = 20.0
VOLUME_RTOL = 0.005
needs_gloo = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def _run_torchrun(run_command, args: list[str]):
    """One torchrun, no retry: rank 0's abort at exit is fixed at its cause (distributed.py)."""
    return run_command([*TORCHRUN, *args], env=DDP_ENV)


def _config_list(*names: str) -> str:
    return "[" + ",".join(f"'configs/{n}'" for n in names) + "]"


def _check_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """models/model.pt is a plain fp32 state dict of the bundle's UNet (no wrapper prefixes)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    expected = build().state_dict()
    assert isinstance(state, dict)
    assert set(state) == set(expected)
    for key, tensor in state.items():
        assert isinstance(tensor, torch.Tensor), key
        assert tensor.shape == expected[key].shape, key
        assert tensor.dtype == expected[key].dtype, key
    net = load_network(path, torch.device("cpu"))
    assert all(torch.equal(net.state_dict()[k], state[k]) for k in state)
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 2, 32, 32, 32)
    return state


def _check_resume_checkpoint(models: Path, epoch: int, iterations: int, model_state: dict[str, torch.Tensor]) -> None:
    """The every-epoch checkpoint holds model, optimiser and trainer state of the last epoch."""
    checkpoint = torch.load(models / f"resume_checkpoint_epoch={epoch}.pt", map_location="cpu", weights_only=True)
    assert set(checkpoint) == {"model", "optimizer", "trainer"}
    assert checkpoint["trainer"]["iteration"] == iterations
    assert checkpoint["trainer"]["max_epochs"] == epoch
    # Validation (which saves model.pt) ends the same epoch: nothing trains in between.
    assert set(checkpoint["model"]) == set(model_state)
    assert all(torch.equal(checkpoint["model"][k], model_state[k]) for k in model_state)


def _read_case_metrics(path: Path) -> list[dict[str, str]]:
    """The case rows; the summary rows that follow them must summarise those cases."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
        rows = list(reader)
    cases, summary = rows[: -len(SUMMARY_STATISTICS)], rows[-len(SUMMARY_STATISTICS):]
    assert [row["case"] for row in summary] == list(SUMMARY_STATISTICS)
    assert float(summary[0]["dice"]) == pytest.approx(np.mean([float(r["dice"]) for r in cases]), abs=1e-6)
    twin = json.loads(path.with_suffix(".json").read_text())
    assert [case["case"] for case in twin["cases"]] == [row["case"] for row in cases]
    return cases


def _read_metrics_saver(path: Path) -> dict[str, float]:
    """MONAI MetricsSaver's metrics.csv: one ``name,value`` line per metric, no header."""
    with open(path, newline="") as f:
        return {name: float(value) for name, value in csv.reader(f)}


def _label_volume_ml(path: Path) -> float:
    image = cast(nib.Nifti1Image, nib.load(str(path)))
    voxels = int(np.count_nonzero(np.asarray(image.dataobj)))
    return voxels * abs(float(np.linalg.det(image.affine[:3, :3]))) / 1000.0


def _check_evaluation(eval_dir: Path, dataset, val_count: int) -> list[dict[str, str]]:
    rows = _read_case_metrics(eval_dir / "case_metrics.csv")
    assert sorted(r["case"] for r in rows) == sorted(dataset.validation(val_count))
    for row in rows:
        assert float(row["dice"]) >= MIN_DICE, row
        hd95 = float(row["hd95_mm"])
        assert math.isfinite(hd95) and 0.0 <= hd95 < MAX_HD95_MM, row
        expected_ml = _label_volume_ml(dataset.label(row["case"]))
        assert float(row["label_volume_ml"]) == pytest.approx(expected_ml, rel=VOLUME_RTOL), row
        assert float(row["pred_volume_ml"]) > 0.0, row
    metrics = _read_metrics_saver(eval_dir / "metrics.csv")
    assert set(metrics) == {"val_mean_dice", "val_accuracy"}
    assert metrics["val_mean_dice"] >= MIN_DICE
    # MeanDice over the cases equals the mean of the CSV's per-case Dice.
    assert metrics["val_mean_dice"] == pytest.approx(np.mean([float(r["dice"]) for r in rows]), abs=1e-4)
    return rows


def _check_metric_details_name_cases(eval_dir: Path, dataset, val_count: int) -> None:
    """MetricsSaver's per-case detail file must say which case each Dice belongs to."""
    with open(eval_dir / "val_mean_dice_raw.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == val_count
    named = sorted(Path(r["filename"]).name for r in rows)
    assert named == sorted(dataset.validation(val_count)), (
        "val_mean_dice_raw.csv does not name the cases: MetricsSaver in evaluate.json needs "
        "batch_transform=\"$lambda x: [xx['image'].meta for xx in x]\"")


def _bundle_with_weights(tmp_path: Path, weights: Path) -> Path:
    root = tmp_path / "bundle"
    (root / "models").mkdir(parents=True)
    shutil.copyfile(weights, root / "models" / "model.pt")
    return root


@pytest.mark.slow
def test_bundle_train_saves_plain_state_dict(phantom_dataset, run_command, tail, tmp_path):
    root = tmp_path / "bundle"
    proc = run_command([*BUNDLE_RUN, "--config_file", "configs/train.json", "--dataset_dir", str(phantom_dataset.root),
                        "--bundle_root", str(root), *TINY_TRAINING])
    assert proc.returncode == 0, tail(proc)
    models = root / "models"
    assert sorted(p.name for p in models.iterdir()) == ["model.pt", "resume_checkpoint_epoch=1.pt"]
    state = _check_state_dict_file(models / "model.pt")
    train_cases = len(phantom_dataset.cases) - TRAIN_VAL_COUNT  # batch 1, one patch per case
    _check_resume_checkpoint(models, epoch=1, iterations=train_cases, model_state=state)


@pytest.mark.slow
def test_bundle_evaluate_demo_weights(phantom_dataset, demo_fp32_weights, run_command, tail, tmp_path):
    val_count = 2
    root = _bundle_with_weights(tmp_path, demo_fp32_weights)
    proc = run_command([*BUNDLE_RUN, "--config_file", _config_list("train.json", "evaluate.json"),
                        "--dataset_dir", str(phantom_dataset.root), "--bundle_root", str(root),
                        "--val_count", str(val_count), "--num_workers", "0"])
    assert proc.returncode == 0, tail(proc)
    _check_evaluation(root / "eval", phantom_dataset, val_count)
    _check_metric_details_name_cases(root / "eval", phantom_dataset, val_count)


@pytest.mark.slow
@needs_gloo
def test_torchrun_train_two_ranks(phantom_dataset, run_command, tail, tmp_path):
    root = tmp_path / "bundle"
    proc = _run_torchrun(run_command, ["-m", "monai.bundle", "run",
                                       "--config_file", _config_list("train.json", "multi_gpu_train.json"),
                                       "--dataset_dir", str(phantom_dataset.root), "--bundle_root", str(root),
                                       *TINY_TRAINING])
    assert proc.returncode == 0, tail(proc)
    models = root / "models"
    # Rank 0 alone saves: one model.pt, one resume checkpoint, no stray temp or duplicate files.
    assert sorted(p.name for p in models.iterdir()) == ["model.pt", "resume_checkpoint_epoch=1.pt"]
    state = _check_state_dict_file(models / "model.pt")  # DDP's "module." prefix is not saved
    train_cases = len(phantom_dataset.cases) - TRAIN_VAL_COUNT
    per_rank = math.ceil(train_cases / 2)  # DistributedSampler(even_divisible=True), batch 1
    _check_resume_checkpoint(models, epoch=1, iterations=per_rank, model_state=state)


@pytest.mark.slow
@needs_gloo
def test_torchrun_evaluate_gathers_all_cases(phantom_dataset, demo_fp32_weights, run_command, tail, tmp_path):
    val_count = 3  # rank 0 gets two cases, rank 1 one
    root = _bundle_with_weights(tmp_path, demo_fp32_weights)
    proc = _run_torchrun(run_command, ["-m", "monai.bundle", "run", "--config_file",
                                       _config_list("train.json", "evaluate.json", "multi_gpu_evaluate.json"),
                                       "--dataset_dir", str(phantom_dataset.root), "--bundle_root", str(root),
                                       "--val_count", str(val_count), "--num_workers", "0"])
    assert proc.returncode == 0, tail(proc)
    rows = _check_evaluation(root / "eval", phantom_dataset, val_count)
    assert len(rows) == val_count  # each case once: gathered, not duplicated
