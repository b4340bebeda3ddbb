"""The loop closed from the command line: ``segment``, a review, ``corrections export``, and ``train
--init-weights`` on the export, which starts from the given weights.

"Starts from the given weights" is measured: the first validation of the fine-tune (epoch 0, before
the first update) must equal, to 1e-6, the mean Dice of the weights alone on the same validation
case computed by ``spleen-seg evaluate`` with MONAI's own CheckpointLoader and the training's
validation postprocessing (no inversion, so both measure on the same resampled grid). Both run the
same network on the same deterministic preprocessing on the CPU, so they agree to float rounding;
one training step moves the Dice by about 1e-3 on this case, and a network that did not load the
weights scores near 0.
"""

from __future__ import annotations

import json
import sys

import nibabel as nib
import numpy as np
import pytest
from review_records import record_review
from tensorboard_scalars import tensorboard_scalars

from spleen_seg.io.download import file_sha256
from spleen_seg.pipeline.network import SIDECAR_KEY, demo_weights_path, sidecar_path
from spleen_seg.training.evaluate import WEIGHTS_OVERRIDE, evaluate

CLI = [sys.executable, "-m", "spleen_seg.cli", "-q"]
TINY = ["--val-count", "1", "--num-workers", "0", "--device", "cpu",
        "--set", "train#random_transforms#0#num_samples=1",
        "--set", "train#random_transforms#0#spatial_size=[64,64,64]",
        "--set", "train#dataloader#batch_size=1"]
# Same network, same data, same deterministic CPU computation: equal up to float rounding.
SAME_DICE_ABS = 1e-6
MIN_DEMO_DICE = 0.85  # the demo weights on these phantoms (a random network scores near 0)


@pytest.fixture(scope="module")
def exported(phantom_dataset, run_command, tail, tmp_path_factory):
    """Four phantoms segmented with the demo weights, reviewed (two corrected to the truth, one accepted,
    one rejected) and exported: a dataset of three cases."""
    root = tmp_path_factory.mktemp("loop")
    images = [phantom_dataset.root / "imagesTr" / name for name in phantom_dataset.cases[:4]]
    out = root / "out"
    proc = run_command([*CLI, "segment", *map(str, images), "-o", str(out), "--weights", str(demo_weights_path())])
    assert proc.returncode == 0, tail(proc)
    cases = [name.removesuffix(".nii.gz") for name in phantom_dataset.cases[:4]]
    for case in cases[:2]:
        truth = np.asarray(nib.load(str(phantom_dataset.label(case + ".nii.gz"))).dataobj)
        record_review(out / case, "rejected", truth)
    record_review(out / cases[2], "accepted")
    record_review(out / cases[3], "rejected")
    dataset = root / "dataset"
    proc = run_command([*CLI, "corrections", "export", str(out), "-o", str(dataset)])
    assert proc.returncode == 0, tail(proc)
    assert proc.stdout.strip() == (f"3 exported: 2 corrected, 1 accepted; 1 left out (1 rejected without correction, "
                                   f"0 not reviewed); 0 failed -> {dataset} (orientation convention true)")
    assert proc.stderr.strip().splitlines()[-1] == f"left out: {cases[3]}: rejected without a correction"
    return dataset


@pytest.mark.slow
def test_the_export_fine_tunes_from_the_init_weights(exported, run_command, tail, tmp_path):
    init = demo_weights_path()
    run = tmp_path / "run"
    # One epoch, validated only before it (every 2 epochs after): the validation of the init weights.
    proc = run_command([*CLI, "train", "--dataset-dir", str(exported), "--bundle-root", str(run), "--epochs", "1",
                        "--val-interval", "2", "--init-weights", str(init), *TINY])
    assert proc.returncode == 0, tail(proc)
    scalars = tensorboard_scalars(run / "eval")
    # Two training cases, one 64^3 crop each, batch 1: two iterations trained.
    assert len(scalars["train_loss"]) == 2
    assert [step for step, _ in scalars["val_mean_dice"]] == [0]
    first = scalars["val_mean_dice"][0][1]
    assert f"validation before training (the init weights): mean Dice {first:.4f}" in proc.stdout + proc.stderr
    assert (f"best validation mean Dice {first:.4f} at epoch 0, before training: no later validation (1 epochs "
            f"trained) improved on the init weights; weights (theirs): {(run / 'models' / 'model.pt').resolve()}"
            ) in proc.stdout, tail(proc)

    # The weights alone on the same validation case: evaluate.json's CheckpointLoader, the training's
    # postprocessing (in this process: MONAI is imported already).
    alone = evaluate(tmp_path / "alone", {"dataset_dir": str(exported), "val_count": 1, "num_workers": 0,
                                          "device_name": "cpu", WEIGHTS_OVERRIDE: str(init),
                                          "validate#postprocessing": "%train#postprocessing"})
    assert first >= MIN_DEMO_DICE
    assert first == pytest.approx(alone, abs=SAME_DICE_ABS)

    # The run records what it started from; the new weights carry the init weights' convention.
    sha256 = file_sha256(init)
    recorded = json.loads((run / "run_train.json").read_text())["init_weights"]
    assert recorded == {"path": str(init.resolve()), "sha256": sha256, "orientation_convention": "true"}
    assert json.loads((run / "models" / "init_weights.json").read_text()) == recorded
    sidecar = json.loads(sidecar_path(run / "models" / "model.pt").read_text())
    assert sidecar[SIDECAR_KEY] == "true" and sidecar["init_weights_sha256"] == sha256


def test_a_bad_init_weights_file_is_one_line_before_training(exported, run_command, tail, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    run = tmp_path / "run"
    proc = run_command([*CLI, "train", "--dataset-dir", str(exported), "--bundle-root", str(run),
                        "--init-weights", str(garbage), *TINY])
    assert proc.returncode == 2, tail(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {garbage}: not a readable PyTorch weights file (UnpicklingError)"], tail(proc)
    assert not run.exists()  # refused before anything was written or read
