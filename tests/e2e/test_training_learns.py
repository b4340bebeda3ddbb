"""``spleen-seg train`` learns on CPU: the training loss falls and the validation Dice on a
phantom it trains on rises above 0.5, with small crops set by override.

The numbers come from the run's own TensorBoard event files (``<bundle-root>/eval``), which
train.json's TensorBoardStatsHandlers write: ``train_loss`` per iteration, ``val_mean_dice``
per validation. Training on CPU is deterministic (train.json seeds everything), so the run
and its figures repeat exactly on a given installation.
"""

from __future__ import annotations

import re
import shutil
import sys
import time

import numpy as np
import pytest
from tensorboard_scalars import tensorboard_scalars

CLI = [sys.executable, "-m", "spleen_seg.cli", "-q"]
# The largest spleen of the e2e phantoms (283 mL), stored once to train on and once more,
# under a name that sorts last, as the bundle's validation case: the Dice is measured by
# train.json's own validation (sliding window, eval mode) on the phantom it trains on.
TRAIN_SEED = 3
# 60 iterations of one 64^3 crop (the recipe: 4 crops of 96^3, batch 2) with validations
# after 30 and 60; the first validation comes before the network has learned the spleen.
EPOCHS = 60
VAL_INTERVAL = 30
LEARNING = [
    "--epochs", str(EPOCHS), "--val-interval", str(VAL_INTERVAL), "--val-count", "1", "--num-workers", "0",
    "--device", "cpu",
    "--set", "train#random_transforms#0#num_samples=1",
    "--set", "train#random_transforms#0#spatial_size=[64,64,64]",
    "--set", "train#dataloader#batch_size=1",
]
LOSS_WINDOW = 10  # iterations averaged at the start and at the end
MAX_LOSS_RATIO = 0.6  # the last iterations' mean loss against the first ones'
MIN_FINAL_DICE = 0.5
# About a minute on the 2-core development machine; several times that while it is shared.
TRAIN_TIMEOUT_S = 900


@pytest.mark.slow
def test_training_learns_a_phantom(phantom, write_nifti, run_command, tail, tmp_path):
    dataset = tmp_path / "Task09_Spleen"
    case = phantom(TRAIN_SEED, "RAS")
    write_nifti(case.image_hu.astype(np.int16), case.affine, dataset / "imagesTr" / "spleen_1.nii.gz")
    write_nifti(case.spleen_mask.astype(np.uint8), case.affine, dataset / "labelsTr" / "spleen_1.nii.gz")
    for folder in ("imagesTr", "labelsTr"):
        shutil.copyfile(dataset / folder / "spleen_1.nii.gz", dataset / folder / "spleen_9.nii.gz")

    root = tmp_path / "run"
    start = time.perf_counter()
    proc = run_command([*CLI, "train", "--dataset-dir", str(dataset), "--bundle-root", str(root), *LEARNING],
                       timeout=TRAIN_TIMEOUT_S)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, tail(proc)

    scalars = tensorboard_scalars(root / "eval")
    losses = [value for _, value in scalars["train_loss"]]
    assert len(losses) == EPOCHS  # one crop of one training case per epoch
    first, last = np.mean(losses[:LOSS_WINDOW]), np.mean(losses[-LOSS_WINDOW:])
    dices = scalars["val_mean_dice"]
    assert [step for step, _ in dices] == [VAL_INTERVAL, EPOCHS]
    summary = (f"loss {first:.3f} -> {last:.3f}, Dice {dices[0][1]:.3f} -> {dices[-1][1]:.3f}, "
               f"{seconds:.0f} s")
    assert last < MAX_LOSS_RATIO * first, summary
    assert dices[0][1] < MIN_FINAL_DICE <= dices[-1][1], summary
    # The command reports the best validation Dice, and model.pt is that epoch's network.
    best = re.search(r"best validation mean Dice (\d+\.\d+)", proc.stdout)
    assert best is not None, tail(proc)
    assert float(best.group(1)) == pytest.approx(max(value for _, value in dices), abs=1e-4)
    assert (root / "models" / "model.pt").is_file()
