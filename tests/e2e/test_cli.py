"""``spleen-seg`` end to end on phantoms: segment (geometry, Dice, orientation, bad inputs),
train and resume, evaluate, demo and the phantom writer; flag errors answer at once."""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
import pytest
import torch

from spleen_seg.pipeline.network import demo_weights_path, load_network
from spleen_seg.training.evaluate import dice
from spleen_seg.training.phantom import make_phantom

CLI = [sys.executable, "-m", "spleen_seg.cli"]
EXIT_USER_ERROR = 2
MIN_DICE = 0.85
MIN_DEMO_DICE = 0.90
MIN_ORIENTATION_AGREEMENT = 0.99
FLAG_ERROR_MAX_S = 3.0
SEGMENT_SEED = 3
DEMO_SEED = 2026  # the CLI's default
TRAIN_VAL_COUNT = 2
TINY_TRAINING = [
    "--val-interval", "1", "--val-count", str(TRAIN_VAL_COUNT), "--num-workers", "0",
    "--set", "train#random_transforms#0#num_samples=1",
    "--set", "train#random_transforms#0#spatial_size=[64,64,64]",
]
REPO = Path(__file__).resolve().parents[2]
VALIDATION_LINE = re.compile(r"validation at epoch (?P<epoch>\d+/\d+): mean Dice (?P<dice>\d\.\d{4}) \(best \d\.\d{4} at "
                             r"epoch \d+\); elapsed (?P<elapsed>\d+:\d\d:\d\d), remaining about "
                             r"(?P<remaining>\d+:\d\d:\d\d) \(ETA \d\d:\d\d:\d\d\)")


def _mask(path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    image = cast(nib.Nifti1Image, nib.load(str(path)))
    return np.asarray(image.dataobj), image


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# ----------------------------------------------------------------------------- segment


def test_segment_folder_ras_and_lps(phantom, write_nifti, run_command, tail, tmp_path):
    """Same anatomy stored RAS and LPS: each mask on its input grid, both equal in world space."""
    inputs = tmp_path / "inputs"
    cases = {name: phantom(SEGMENT_SEED, orientation) for name, orientation in (("ras", "RAS"), ("lps", "LPS"))}
    for name, case in cases.items():
        write_nifti(case.image_hu.astype(np.int16), case.affine, inputs / f"{name}.nii.gz")
    (inputs / "notes.txt").write_text("not an image\n")
    out = tmp_path / "out"
    proc = run_command([*CLI, "segment", str(inputs), "-o", str(out), "--weights", str(demo_weights_path())])
    assert proc.returncode == 0, tail(proc)

    masks = {}
    for name, case in cases.items():
        mask, image = _mask(out / name / "spleen.nii.gz")
        assert mask.shape == case.image_hu.shape
        assert np.allclose(image.affine, case.affine, atol=1e-5)
        assert image.get_data_dtype() == np.uint8
        assert set(np.unique(mask)) <= {0, 1}
        assert dice(mask, case.spleen_mask) >= MIN_DICE, name
        masks[name] = mask
    # LPS -> RAS voxel order: reverse the first two axes.
    assert np.allclose(cases["lps"].affine[:, :3] * [-1, -1, 1], cases["ras"].affine[:, :3])
    assert dice(np.flip(masks["lps"], axis=(0, 1)), masks["ras"]) >= MIN_ORIENTATION_AGREEMENT

    info = json.loads((out / "run_info.json").read_text())
    assert sorted(Path(p).name for p in info["inputs"]) == ["lps.nii.gz", "ras.nii.gz"]  # folder expanded
    assert info["weights_sha256"] == hashlib.sha256(demo_weights_path().read_bytes()).hexdigest()
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["lps", "ras"]


def _write_bad_input(kind: str, folder: Path, write_nifti) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{kind}.nii.gz"
    rng = np.random.default_rng(0)
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    if kind == "missing":
        return path
    if kind == "text":
        path.write_text("this is not a NIfTI file\n")
    elif kind == "flat_2d":
        write_nifti(rng.integers(-100, 100, size=(32, 32)).astype(np.int16), affine, path)
    elif kind == "single_slice":
        write_nifti(rng.integers(-100, 100, size=(32, 32, 1)).astype(np.int16), affine, path)
    elif kind == "nan":
        array = rng.normal(size=(24, 24, 24)).astype(np.float32)
        array[5, 6, 7] = np.nan
        write_nifti(array, affine, path)
    elif kind == "constant":
        write_nifti(np.full((24, 24, 24), -1000, dtype=np.int16), affine, path)
    return path


@pytest.mark.parametrize("kind", ["missing", "text", "flat_2d", "single_slice", "nan", "constant"])
def test_segment_rejects_bad_input(kind, write_nifti, run_command, tail, tmp_path):
    bad = _write_bad_input(kind, tmp_path / "inputs", write_nifti)
    out = tmp_path / "out"
    proc = run_command([*CLI, "segment", str(bad), "-o", str(out), "--weights", str(demo_weights_path())])
    assert proc.returncode == EXIT_USER_ERROR, tail(proc)
    errors = _error_lines(proc.stderr)
    assert len(errors) == 1, proc.stderr
    assert str(bad) in errors[0]
    assert "Traceback" not in proc.stderr
    assert not (out / kind).exists()
    # Nothing but the batch's records (run_info.json, summary.csv): no case folder, no mask.
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_dir() or p.name.endswith(".nii.gz")]


def test_segment_batch_with_one_bad_input(phantom, write_nifti, run_command, tail, tmp_path):
    good_case = phantom(1, "RAS")
    good = write_nifti(good_case.image_hu.astype(np.int16), good_case.affine, tmp_path / "inputs" / "good.nii.gz")
    bad = _write_bad_input("nan", tmp_path / "inputs", write_nifti)
    out = tmp_path / "out"
    proc = run_command([*CLI, "segment", str(good), str(bad), "-o", str(out), "--weights", str(demo_weights_path())])
    assert proc.returncode == EXIT_USER_ERROR, tail(proc)
    mask, image = _mask(out / "good" / "spleen.nii.gz")
    assert mask.shape == good_case.image_hu.shape
    assert np.allclose(image.affine, good_case.affine, atol=1e-5)
    assert dice(mask, good_case.spleen_mask) >= MIN_DICE
    assert not (out / "nan").exists()
    errors = _error_lines(proc.stderr)
    assert len(errors) == 1 and str(bad) in errors[0], proc.stderr
    assert "1 of 2 inputs segmented; 1 failed" in proc.stderr.splitlines()


def test_segment_without_weights_says_how_to_get_them(run_command, tail, tmp_path):
    out = tmp_path / "out"
    proc = run_command([*CLI, "segment", str(tmp_path / "x.nii.gz"), "-o", str(out)])
    assert proc.returncode == EXIT_USER_ERROR, tail(proc)
    errors = _error_lines(proc.stderr)
    assert len(errors) == 1 and "--weights" in errors[0], proc.stderr
    assert not out.exists()


def test_bad_device_fails_fast_without_torch(run_command, tail, tmp_path):
    args = ["segment", str(tmp_path / "x.nii.gz"), "-o", str(tmp_path / "out"), "--device", "tpu"]
    start = time.perf_counter()
    proc = run_command([*CLI, *args])
    elapsed_s = time.perf_counter() - start
    assert proc.returncode == EXIT_USER_ERROR, tail(proc)
    assert "--device" in proc.stderr and "tpu" in proc.stderr
    assert elapsed_s < FLAG_ERROR_MAX_S
    # -X importtime lists every module imported, one "... | name" line each.
    proc = run_command([sys.executable, "-X", "importtime", "-m", "spleen_seg.cli", *args])
    assert proc.returncode == EXIT_USER_ERROR, tail(proc)
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "spleen_seg" in imported  # the listing works: the CLI's package was imported
    assert not imported & {"torch", "monai", "numpy", "nibabel"}


# ----------------------------------------------------------------------------- train, evaluate


@pytest.mark.slow
def test_train_then_resume(phantom_dataset, run_command, tail, tmp_path):
    root = tmp_path / "run"
    base = [*CLI, "train", "--dataset-dir", str(phantom_dataset.root), "--bundle-root", str(root), *TINY_TRAINING]
    proc = run_command([*base, "--epochs", "1"])
    assert proc.returncode == 0, tail(proc)
    best = re.search(r"best validation mean Dice (\d+\.\d+) at epoch 1 of 1; weights: (.+)$", proc.stdout, re.M)
    assert best is not None, tail(proc)
    assert 0.0 <= float(best.group(1)) <= 1.0 and Path(best.group(2)) == (root / "models" / "model.pt").resolve()
    # The validation line: Dice, best so far, elapsed time and what remains of the run.
    line = VALIDATION_LINE.search(proc.stdout + proc.stderr)
    assert line is not None and line["epoch"] == "1/1" and line["remaining"] == "0:00:00", tail(proc)
    assert float(line["dice"]) == pytest.approx(float(best.group(1)), abs=1e-4)
    models = root / "models"
    assert sorted(p.name for p in models.iterdir()) == ["model.pt", "model.pt.json", "resume_checkpoint_epoch=1.pt"]
    # The recipe mirrors nothing: the weights' record says so, and plain --tta is refused for them.
    assert json.loads((models / "model.pt.json").read_text()) == {"trained_with_flips": False, "safe_tta_axes": ""}
    # The run records the configuration it ran: the generated bundle, byte for byte.
    for name in ("train.json", "metadata.json", "evaluate.json"):
        assert (root / "configs" / name).read_bytes() == (REPO / "configs" / name).read_bytes(), name
    first = torch.load(models / "resume_checkpoint_epoch=1.pt", map_location="cpu", weights_only=True)
    epoch_length = first["trainer"]["epoch_length"]

    proc = run_command([*base, "--epochs", "2", "--resume"])
    assert proc.returncode == 0, tail(proc)
    output = proc.stdout + proc.stderr
    # ignite logs "Engine run resuming from iteration 0, epoch 0" before the CheckpointLoader
    # (an Events.STARTED handler) restores the state: the loader's line and the epochs that
    # run show the resume.
    assert f"Restored all variables from {models / 'resume_checkpoint_epoch=1.pt'}" in output, tail(proc)
    assert re.search(r"Epoch: 2/2, Iter: 1/", output), tail(proc)
    assert [m["epoch"] for m in VALIDATION_LINE.finditer(output)] == ["2/2"], tail(proc)
    assert not re.search(r"Epoch: 1/2, Iter: ", output), tail(proc)
    # The newest checkpoint, the one a further --resume picks, is epoch 2's.
    newest = max(models.glob("resume_checkpoint_epoch=*.pt"), key=lambda p: p.stat().st_mtime)
    assert newest.name == "resume_checkpoint_epoch=2.pt"
    second = torch.load(models / "resume_checkpoint_epoch=2.pt", map_location="cpu", weights_only=True)
    assert second["trainer"]["iteration"] == 2 * epoch_length
    assert (models / "model.pt").is_file()


@pytest.mark.slow
def test_train_shorter_than_one_validation_interval(phantom_dataset, run_command, tail, tmp_path):
    """Fewer epochs than the validation interval: said so, last weights named unvalidated, no -1.0."""
    root = tmp_path / "run"
    tiny = [arg for arg in TINY_TRAINING if arg not in ("--val-interval", "1")]
    proc = run_command([*CLI, "train", "--dataset-dir", str(phantom_dataset.root), "--bundle-root", str(root), *tiny,
                        "--epochs", "1", "--val-interval", "2"])
    assert proc.returncode == 0, tail(proc)
    output = proc.stdout + proc.stderr
    assert "-1.0" not in output and "best validation" not in output and not VALIDATION_LINE.search(output), tail(proc)
    unvalidated = (root / "models" / "model_unvalidated.pt").resolve()
    assert (f"training ended after epoch 1 of 1, before its first validation (every 2 epochs): no validated weights; "
            f"the last weights, NOT validated, are in {unvalidated}") in proc.stderr, tail(proc)
    assert sorted(p.name for p in (root / "models").iterdir()) == ["model_unvalidated.pt", "model_unvalidated.pt.json",
                                                                   "resume_checkpoint_epoch=1.pt"]
    # They are the network as it ended: the every-epoch checkpoint's model.
    saved = torch.load(unvalidated, map_location="cpu", weights_only=True)
    last = torch.load(root / "models" / "resume_checkpoint_epoch=1.pt", map_location="cpu", weights_only=True)["model"]
    assert set(saved) == set(last) and all(torch.equal(saved[k], last[k]) for k in last)
    load_network(unvalidated, torch.device("cpu"))


def test_evaluate_demo_weights(phantom_dataset, demo_fp32_weights, run_command, tail, tmp_path):
    root = tmp_path / "run"
    proc = run_command([*CLI, "evaluate", "--dataset-dir", str(phantom_dataset.root), "--bundle-root", str(root),
                        "--weights", str(demo_fp32_weights), "--val-count", "2", "--num-workers", "0"])
    assert proc.returncode == 0, tail(proc)
    found = re.search(r"mean Dice (\d+\.\d+)", proc.stdout)
    assert found is not None, tail(proc)
    mean_dice = float(found.group(1))
    assert mean_dice >= MIN_DICE
    lines = (root / "eval" / "case_metrics.csv").read_text().splitlines()
    assert len(lines) == 1 + 2 + 3  # header, two cases, mean, median and iqr
    case_dice = [float(line.split(",")[1]) for line in lines[1:3]]
    assert mean_dice == pytest.approx(np.mean(case_dice), abs=1e-4)
    assert lines[3].startswith("mean,") and float(lines[3].split(",")[1]) == pytest.approx(mean_dice, abs=1e-4)


# ----------------------------------------------------------------------------- demo, data


def test_demo(run_command, tail, tmp_path):
    out = tmp_path / "demo"
    proc = run_command([*CLI, "demo", "-o", str(out)])
    assert proc.returncode == 0, tail(proc)
    found = re.search(r"Dice vs phantom truth: (\d+\.\d+)", proc.stdout)
    assert found is not None, tail(proc)
    printed = float(found.group(1))
    assert printed >= MIN_DEMO_DICE
    case = make_phantom(DEMO_SEED)
    mask, image = _mask(out / "spleen.nii.gz")
    assert mask.shape == case.image_hu.shape
    assert np.allclose(image.affine, case.affine, atol=1e-5)
    # The printed Dice is the file's Dice against the phantom's truth.
    assert dice(mask, case.spleen_mask) == pytest.approx(printed, abs=1e-4)


def test_data_phantom(run_command, tail, tmp_path):
    out = tmp_path / "Task09_Spleen"
    proc = run_command([*CLI, "data", "phantom", "--out", str(out), "-n", "3", "--seed", "5", "-q"])
    assert proc.returncode == 0, tail(proc)
    names = [f"spleen_{i}.nii.gz" for i in (1, 2, 3)]
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == names
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == names
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["numTraining"] == 3
    assert [Path(e["image"]).name for e in manifest["training"]] == names
    for name in names:
        image, label = _mask(out / "imagesTr" / name)[1], _mask(out / "labelsTr" / name)[1]
        assert image.get_data_dtype() == np.int16 and label.get_data_dtype() == np.uint8
        assert image.shape == label.shape
        assert np.allclose(image.affine, label.affine)
        assert np.asarray(label.dataobj).any()
