"""NIfTI reading with input checks, and atomic mask writing.

``read_volume`` is the boundary where user files enter: everything a user can get
wrong about an input image is checked here and reported as one ``InputImageError``
line naming the file.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from spleen_seg.errors import InputImageError
from spleen_seg.io.atomic import atomic_path

NIFTI_SUFFIXES = (".nii", ".nii.gz")
MIN_VOXELS_PER_AXIS = 2


@dataclass(frozen=True)
class Geometry:
    """Where the voxels lie: ``affine_ras`` maps (i, j, k, 1) to RAS+ millimetres."""

    shape: tuple[int, int, int]
    affine_ras: np.ndarray
    header: nib.Nifti1Header | None = None

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        sx, sy, sz = np.sqrt((self.affine_ras[:3, :3] ** 2).sum(axis=0))
        return float(sx), float(sy), float(sz)

    @property
    def voxel_volume_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine_ras[:3, :3]))) / 1000.0

    @property
    def axcodes(self) -> str:
        return "".join(nib.aff2axcodes(self.affine_ras))


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def case_id(path: str | Path) -> str:
    """File name without the NIfTI extension: ``spleen_1.nii.gz`` -> ``spleen_1``."""
    name = Path(path).name
    for suffix in sorted(NIFTI_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _load(path: Path) -> nib.Nifti1Image:
    if not path.exists():
        raise InputImageError(f"{path}: file not found")
    if not path.is_file():
        raise InputImageError(f"{path}: not a file")
    try:
        image = nib.load(str(path))
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile) as err:
        raise InputImageError(f"{path}: not a readable NIfTI image ({err.__class__.__name__})") from err
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputImageError(f"{path}: not a NIfTI image (found {type(image).__name__})")
    return image


def _squeeze_to_3d(data_shape: tuple[int, ...], path: Path) -> tuple[int, int, int]:
    # A 4D file with one time point is a 3D volume; anything else is not a CT volume.
    shape = data_shape[:3] if len(data_shape) == 4 and data_shape[3] == 1 else data_shape
    if len(shape) != 3:
        raise InputImageError(f"{path}: expected a 3D volume, got {len(data_shape)}D shape {tuple(data_shape)}")
    if min(shape) < MIN_VOXELS_PER_AXIS:
        raise InputImageError(f"{path}: expected a 3D volume, got a 2D image of shape {tuple(shape)}")
    return (int(shape[0]), int(shape[1]), int(shape[2]))


def read_volume(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Read a 3D CT volume.

    Returns ``(array, geometry)``: ``array`` is float32 of shape (X, Y, Z) in the
    file's voxel order (not reoriented), values in Hounsfield units after the
    header's scaling; ``geometry.affine_ras`` is the file's best affine (sform, else
    qform). Raises ``InputImageError`` for a missing or unreadable file, a non-3D
    image, NaN/inf values or an all-constant image.
    """
    path = Path(path)
    image = _load(path)
    shape = _squeeze_to_3d(tuple(image.shape), path)
    try:
        array = np.asarray(image.dataobj, dtype=np.float32).reshape(shape)
    except (OSError, EOFError, ValueError, zlib.error) as err:
        raise InputImageError(f"{path}: truncated or corrupt voxel data ({err.__class__.__name__})") from err
    if not np.isfinite(array).all():
        raise InputImageError(f"{path}: image contains NaN or infinite values")
    if array.min() == array.max():
        raise InputImageError(f"{path}: image is constant ({array.flat[0]:g} everywhere), nothing to segment")
    affine = np.asarray(image.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputImageError(f"{path}: header affine is singular or not finite")
    return array, Geometry(shape=shape, affine_ras=affine, header=image.header)


def write_mask(mask: np.ndarray, geometry: Geometry, dest: str | Path) -> Path:
    """Write a uint8 mask with exactly the geometry (shape, affine, codes) of its source."""
    if tuple(mask.shape) != geometry.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the image shape {geometry.shape}")
    header = geometry.header.copy() if geometry.header is not None else None
    image = nib.Nifti1Image(np.asarray(mask, dtype=np.uint8), geometry.affine_ras, header=header)
    image.set_data_dtype(np.uint8)
    image.header.set_slope_inter(1.0, 0.0)
    if header is None:
        image.set_sform(geometry.affine_ras, code=1)
        image.set_qform(geometry.affine_ras, code=1)
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        nib.save(image, str(tmp))
    return dest
