"""spleen-seg segment and the bundle's inference.json on the shared real CT, with the
yardstick weights, against the official inference.json pipeline (MONAI transforms)."""

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from spleen_seg.training.evaluate import dice

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def official(real_ct, yardstick):
    from reference_bundle import official_mask, official_network

    return official_mask(str(real_ct), official_network(str(yardstick)))


def _run(args, cwd=REPO):
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_cli_segment_equals_official_pipeline(official, real_ct, real_ct_mask, yardstick, tmp_path):
    proc = _run([sys.executable, "-m", "spleen_seg.cli", "-q", "segment", str(real_ct), "-o", str(tmp_path), "--weights", str(yardstick)])
    assert proc.returncode == 0, proc.stderr
    out = nib.load(str(tmp_path / "ct_abdomen_3mm" / "spleen.nii.gz"))
    src = nib.load(str(real_ct))
    assert out.shape == src.shape
    np.testing.assert_allclose(out.affine, src.affine, atol=1e-6)
    mask = np.asarray(out.dataobj)
    assert out.get_data_dtype() == np.uint8
    assert dice(mask, official) >= 0.999
    # The yardstick was fitted to this CT: agreement with its reference mask (README: 0.955).
    assert dice(mask, np.asarray(nib.load(str(real_ct_mask)).dataobj)) > 0.93


def test_bundle_inference_json_equals_official_pipeline(official, real_ct, yardstick, tmp_path):
    dataset = tmp_path / "Task09_Spleen"
    (dataset / "imagesTs").mkdir(parents=True)
    (dataset / "imagesTs" / "ct_abdomen_3mm.nii.gz").symlink_to(real_ct)
    bundle_root = tmp_path / "bundle"
    (bundle_root / "models").mkdir(parents=True)
    (bundle_root / "models" / "model.pt").symlink_to(yardstick)
    proc = _run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
                 "--bundle_root", str(bundle_root), "--dataset_dir", str(dataset),
                 "--output_dir", str(tmp_path / "eval")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = nib.load(str(tmp_path / "eval" / "ct_abdomen_3mm" / "ct_abdomen_3mm_trans.nii.gz"))
    assert out.shape == nib.load(str(real_ct)).shape
    assert dice(np.asarray(out.dataobj), official) >= 0.999
