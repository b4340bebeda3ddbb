"""The batch: inputs expanded from folders, a bad input does not stop the others."""

import nibabel as nib
import numpy as np
import torch

from spleen_seg.batch.inputs import FailedInput, collect_inputs
from spleen_seg.batch.run import segment_files
from spleen_seg.errors import InputImageError


def sphere_volume(shape, spacing, radius_mm=18.0):
    grid = np.stack(np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)], indexing="ij"))
    inside = (grid**2).sum(0) <= radius_mm**2
    image = np.where(inside, 150.0, -100.0).astype(np.float32)
    return image, np.diag([*spacing, 1.0])


def test_collect_inputs_expands_folders(tmp_path):
    for name in ("b.nii.gz", "a.nii", "._a.nii.gz", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in collect_inputs([tmp_path])] == ["a.nii", "b.nii.gz"]
    (tmp_path / "empty").mkdir()
    (failed,) = collect_inputs([tmp_path / "empty"])  # a failed case of the batch, not a stop
    assert isinstance(failed, FailedInput) and failed.path == tmp_path / "empty"
    assert isinstance(failed.error, InputImageError) and "no .nii" in str(failed.error)


def test_batch_continues_after_a_bad_input(tmp_path):
    image, affine = sphere_volume((40, 36, 30), (1.5, 1.5, 2.0))
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), str(good))
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"garbage")
    weights = tmp_path / "w.pt"
    from spleen_seg.pipeline.network import build

    torch.save(build().state_dict(), weights)
    results = segment_files([bad, good], tmp_path / "out", weights, "cpu", backend="torch", progress=False)
    assert results[0].error is not None and str(bad) in results[0].error
    assert results[1].error is None and results[1].output.exists()
    assert not (tmp_path / "out" / "bad").exists()
    assert nib.load(str(results[1].output)).shape == image.shape


