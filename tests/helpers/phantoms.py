"""Small phantom CTs for end-to-end tests, written as NIfTI the way the MSD files are."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from spleen_seg.training.phantom import PhantomCase, make_phantom

# Small phantoms keep a CPU epoch at seconds. At this geometry (240 x 240 x 192 mm) seeds 1-5
# hold the whole spleen (108-283 mL) at least 7 voxels away from every border.
PHANTOM_SHAPE = (96, 96, 48)
PHANTOM_SPACING_MM = (2.5, 2.5, 4.0)


def save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    """Write ``array`` with ``affine`` as sform and qform (code 1), as the MSD files are."""
    image = nib.Nifti1Image(array, affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    image.header.set_data_dtype(array.dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


def small_phantom(seed: int, orientation: str) -> PhantomCase:
    return make_phantom(seed, shape=PHANTOM_SHAPE, spacing_mm=PHANTOM_SPACING_MM, orientation=orientation)
