"""The MSD orientation convention end to end: ``spleen-seg segment`` with weights declared
``msd`` (sidecar) against a reference built by hand, voxel for voxel.

Weights trained on MSD Task09 as shipped saw every scan mirrored in x and y (voxels stored
LPS under a header that says RAS). For such weights ``segment`` mirrors the RAS-oriented
input in x and y before the network and mirrors the prediction back. The reference: mirror
the anatomy by hand (reverse the voxels along x and y, keep the header), segment that with
the same weights declared ``true``; mirrored back, it must be the ``msd`` mask exactly.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np

from spleen_seg.pipeline.network import SIDECAR_KEY, demo_weights_path, sidecar_path
from spleen_seg.training.evaluate import dice
from spleen_seg.training.phantom import make_phantom

CLI = [sys.executable, "-m", "spleen_seg.cli", "-q"]
# At the preprocessing spacing the resampling is the identity, so mirroring the file and
# mirroring the preprocessed image are the same operation and the masks compare exactly.
# LPS storage makes the run reorient to RAS before it mirrors.
PHANTOM_SPACING_MM = (1.5, 1.5, 2.0)
PHANTOM_SHAPE = (160, 160, 96)  # 240 x 240 x 192 mm: the whole spleen in view
PHANTOM_SEED = 4
MIN_DICE = 0.85
# Mirrored anatomy must change the demo network's answer (else the test could not fail).
MAX_DICE_MIRRORED_WITHOUT_CONVENTION = 0.5


def _mask(folder: Path, case: str) -> np.ndarray:
    image = cast(nib.Nifti1Image, nib.load(str(folder / case / "spleen.nii.gz")))
    return np.asarray(image.dataobj)


def _convention(folder: Path, case: str) -> str:
    return json.loads((folder / case / "report.json").read_text())["model"]["orientation_convention"]


def test_msd_weights_equal_mirrored_input_with_true_weights(write_nifti, run_command, tail, tmp_path):
    case = make_phantom(PHANTOM_SEED, shape=PHANTOM_SHAPE, spacing_mm=PHANTOM_SPACING_MM, orientation="LPS")
    image = case.image_hu.astype(np.int16)
    inputs = tmp_path / "inputs"
    original = write_nifti(image, case.affine, inputs / "original.nii.gz")
    # The same header, the voxels reversed along x and y: the anatomy mirrored left-right
    # and front-back, as the MSD weights saw it in training.
    mirrored = write_nifti(np.ascontiguousarray(image[::-1, ::-1, :]), case.affine, inputs / "mirrored.nii.gz")

    # Two copies of the demo weights: one declares msd in its sidecar, one is plain (true).
    msd_weights = tmp_path / "msd" / "model.pt"
    true_weights = tmp_path / "true" / "model.pt"
    for weights in (msd_weights, true_weights):
        weights.parent.mkdir()
        shutil.copyfile(demo_weights_path(), weights)
    sidecar_path(msd_weights).write_text(json.dumps({SIDECAR_KEY: "msd"}))

    msd_out, true_out = tmp_path / "out_msd", tmp_path / "out_true"
    proc = run_command([*CLI, "segment", str(mirrored), str(original), "-o", str(msd_out), "--weights", str(msd_weights)])
    assert proc.returncode == 0, tail(proc)
    proc = run_command([*CLI, "segment", str(original), str(mirrored), "-o", str(true_out),
                        "--weights", str(true_weights)])
    assert proc.returncode == 0, tail(proc)
    assert _convention(msd_out, "mirrored") == "msd" and _convention(true_out, "original") == "true"

    reference = _mask(true_out, "original")
    assert dice(reference, case.spleen_mask) >= MIN_DICE
    # The mirrored scan under msd weights: the network sees the original anatomy.
    np.testing.assert_array_equal(_mask(msd_out, "mirrored")[::-1, ::-1, :], reference)
    # And the original scan under msd weights is the mirrored scan under true weights, mirrored.
    np.testing.assert_array_equal(_mask(msd_out, "original"), _mask(true_out, "mirrored")[::-1, ::-1, :])
    # The convention matters: without it the mirrored anatomy is (mostly) not found.
    assert dice(_mask(true_out, "mirrored")[::-1, ::-1, :], case.spleen_mask) < MAX_DICE_MIRRORED_WITHOUT_CONVENTION
