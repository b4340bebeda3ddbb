"""The built-in demo: segment a synthetic phantom with the packaged demo weights.

The demo weights were trained on phantoms by ``spleen-seg train`` (see README) and
are used only here: they know phantoms, not patients.
"""

from __future__ import annotations

import time
from pathlib import Path

from spleen_seg.io.nifti import Geometry, write_mask


def run_demo(out_dir: str | Path, *, seed: int, device_name: str, progress: bool) -> str:
    """Make a phantom CT, segment it, write image/truth/mask to ``out_dir``; returns a summary."""
    import nibabel as nib
    import numpy as np

    from spleen_seg.pipeline.backends import resolve_device_name
    from spleen_seg.pipeline.network import demo_weights_path
    from spleen_seg.pipeline.segmenter import load_segmenter
    from spleen_seg.training.evaluate import dice
    from spleen_seg.training.phantom import make_phantom

    start = time.perf_counter()
    device = resolve_device_name(device_name)
    case = make_phantom(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    geometry = Geometry(shape=tuple(case.image_hu.shape), affine_ras=case.affine)  # type: ignore[arg-type]
    nib.save(nib.Nifti1Image(case.image_hu, case.affine), str(out / "phantom_ct.nii.gz"))
    write_mask(case.spleen_mask, geometry, out / "phantom_truth.nii.gz")

    segmenter = load_segmenter(demo_weights_path(), device, progress=progress)
    mask = segmenter.predict(case.image_hu.astype(np.float32), geometry, out / "phantom_ct.nii.gz")
    write_mask(mask, geometry, out / "spleen.nii.gz")

    score = dice(mask, case.spleen_mask)
    predicted_ml = float(mask.sum()) * geometry.voxel_volume_ml
    truth_ml = float(case.spleen_mask.sum()) * geometry.voxel_volume_ml
    seconds = time.perf_counter() - start
    return (
        f"phantom seed {seed}: shape {geometry.shape}, spacing {tuple(round(s, 2) for s in geometry.spacing_mm)} mm, "
        f"orientation {geometry.axcodes}\n"
        f"Dice vs phantom truth: {score:.4f}\n"
        f"spleen volume: {predicted_ml:.1f} mL predicted, {truth_ml:.1f} mL true\n"
        f"outputs in {out} ({seconds:.1f} s)"
    )
