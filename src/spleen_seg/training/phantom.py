"""Synthetic abdominal CT phantoms with a spleen label, and an MSD Task09-style writer.

A phantom's field of view (shape, spacing, orientation) is drawn here; its anatomy is painted by
``training.phantom_anatomy`` in world RAS+ millimetres on a canonical RAS-ordered voxel grid, then flipped into the
requested orientation with the affine adjusted, so world positions do not depend on the orientation.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from spleen_seg.errors import ConfigError
from spleen_seg.training.data import msd_dataset_json, msd_training_entry
from spleen_seg.training.phantom_anatomy import (
    SPLEEN,
    SPLEEN_Z_REACH_MM,
    Body,
    Grid,
    draw_body,
    paint_anatomy,
    render_hu,
)

__all__ = ["PhantomCase", "make_phantom", "write_msd_dataset"]

ORIENTATIONS = ("RAS", "LPS", "LAS")
# Random geometry, drawn per case unless the caller fixes it.
INPLANE_SPACING_MM = (0.8, 1.6)
SLICE_SPACING_MM = (1.5, 5.0)
FOV_XY_MM = (200.0, 320.0)
FOV_Z_MM = (160.0, 260.0)
# Voxel-count bounds keep a case well under a second; the FOV wins over the spacing.
INPLANE_VOXELS = (128, 288)
SLICE_VOXELS = (40, 144)
FOV_CENTRE_JITTER_MM = 8.0
MIN_SHAPE = 8
NIFTI_SUFFIX = ".nii.gz"


@dataclass(frozen=True)
class PhantomCase:
    """One synthetic CT volume with its spleen label.

    ``image_hu`` is int16 Hounsfield units and ``spleen_mask`` uint8 (1 = spleen), both shape (X, Y, Z) in the voxel
    order given by ``affine`` (float64 4x4, voxel index to world RAS+ mm). ``orientation`` is the affine's axcodes
    joined, e.g. "LPS".
    """

    image_hu: np.ndarray
    spleen_mask: np.ndarray
    affine: np.ndarray
    orientation: str


def _draw_geometry(rng: np.random.Generator, body: Body, shape: tuple[int, int, int] | None,
                   spacing_mm: tuple[float, float, float] | None,
                   ) -> tuple[tuple[int, int, int], np.ndarray, np.ndarray]:
    """Shape, spacing (mm) and world centre (mm) of the field of view."""
    # Draw everything first so the random stream does not depend on the overrides.
    drawn_spacing = np.array([rng.uniform(*INPLANE_SPACING_MM)] * 2 + [rng.uniform(*SLICE_SPACING_MM)])
    body_width = 2.0 * body.half_width * (1.0 + body.wobble)
    fov = np.array([np.clip(body_width + rng.uniform(15.0, 50.0), *FOV_XY_MM)] * 2 + [rng.uniform(*FOV_Z_MM)])
    jitter = rng.uniform(-1.0, 1.0, size=2)
    z_shift = rng.uniform()
    spacing = drawn_spacing if spacing_mm is None else np.asarray(spacing_mm, float)
    if shape is None:
        bounds = np.array([INPLANE_VOXELS, INPLANE_VOXELS, SLICE_VOXELS], float)
        n = np.clip(np.round(fov / spacing), bounds[:, 0], bounds[:, 1])
        if spacing_mm is None:
            spacing = fov / n  # keep the drawn field of view when the count was clipped
        shape = (int(n[0]), int(n[1]), int(n[2]))
    extent = np.array(shape) * spacing
    room_xy = np.clip((extent[:2] - body_width) / 2.0, 0.0, FOV_CENTRE_JITTER_MM)
    # Keep the whole spleen in view: the FOV centre sits at or below the spleen.
    room_z = max(0.0, extent[2] / 2.0 - SPLEEN_Z_REACH_MM)
    centre = np.array([*(jitter * room_xy), body.z_spleen - z_shift * room_z])
    return shape, spacing, centre


def _reorient(arrays: list[np.ndarray], affine: np.ndarray, orientation: str) -> tuple[list[np.ndarray], np.ndarray]:
    """Flip canonical RAS arrays into ``orientation``; world positions stay unchanged."""
    affine = affine.copy()
    for axis, (code, ras) in enumerate(zip(orientation, "RAS", strict=True)):
        if code != ras:
            n = arrays[0].shape[axis]
            # New index i' = n-1-i: origin moves to the old last voxel, direction reverses.
            affine[:3, 3] += affine[:3, axis] * (n - 1)
            affine[:3, axis] *= -1.0
            arrays = [np.flip(a, axis=axis) for a in arrays]
    return [np.ascontiguousarray(a) for a in arrays], affine


def _validate(seed: int, shape: tuple[int, int, int] | None,
              spacing_mm: tuple[float, float, float] | None, orientation: str | None) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    if shape is not None and (len(shape) != 3 or any(
            isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < MIN_SHAPE for n in shape)):
        raise ConfigError(f"shape must be 3 integers >= {MIN_SHAPE}, got {shape!r}")
    if spacing_mm is not None and (len(spacing_mm) != 3 or not all(
            np.isfinite(s) and s > 0 for s in np.asarray(spacing_mm, float))):
        raise ConfigError(f"spacing_mm must be 3 positive finite numbers, got {spacing_mm!r}")
    if orientation is not None and orientation not in ORIENTATIONS:
        raise ConfigError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")


def make_phantom(seed: int, *, shape: tuple[int, int, int] | None = None,
                 spacing_mm: tuple[float, float, float] | None = None, orientation: str | None = None) -> PhantomCase:
    """Generate one synthetic abdominal CT with its spleen mask, deterministic by ``seed``.

    Args:
        seed: non-negative integer; the same seed gives identical arrays and affine.
        shape: voxel counts (X, Y, Z) in the output voxel order; drawn when None so the
            field of view is about 200-320 mm in-plane and 160-260 mm in z. A small
            fixed shape crops the anatomy (the spleen may then be partly out of view).
        spacing_mm: voxel size along the output axes; drawn when None (in-plane
            0.8-1.6 mm, slices 1.5-5.0 mm).
        orientation: "RAS", "LPS" or "LAS"; drawn when None. The anatomy and the random
            stream do not depend on it, so only the voxel order and affine change.

    Returns:
        PhantomCase with int16 HU and uint8 mask of shape (X, Y, Z) and a float64 4x4
        affine mapping voxel indices to world RAS+ mm.

    Raises:
        ConfigError: for a negative seed or a malformed shape, spacing or orientation.
    """
    _validate(seed, shape, spacing_mm, orientation)
    geom_rng, anat_rng, noise_rng = np.random.default_rng(seed).spawn(3)
    drawn_orientation = ORIENTATIONS[int(geom_rng.integers(len(ORIENTATIONS)))]
    orientation = orientation or drawn_orientation
    body = draw_body(anat_rng)
    shape, spacing, centre = _draw_geometry(geom_rng, body, shape, spacing_mm)
    # Flipped axes keep their length and spacing, so the canonical grid is the same one.
    grid = Grid(*[(centre[i] + (np.arange(shape[i]) - (shape[i] - 1) / 2.0) * spacing[i])
                  .astype(np.float32) for i in range(3)])
    labels = np.zeros(shape, dtype=np.uint8)
    paint_anatomy(labels, grid, body, anat_rng, float(np.prod(spacing)))
    image = render_hu(labels, noise_rng)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = centre - (np.array(shape) - 1) / 2.0 * spacing  # float64, unlike grid
    (image, mask), affine = _reorient([image, (labels == SPLEEN).astype(np.uint8)], affine, orientation)
    return PhantomCase(image_hu=image, spleen_mask=mask, affine=affine, orientation="".join(nib.aff2axcodes(affine)))


def _case_seed(seed: int, case_id: int) -> int:
    """Independent, reproducible per-case seed (no collisions between datasets' seeds)."""
    return int(np.random.SeedSequence([seed, case_id]).generate_state(1)[0])


def _save_atomic(payload: np.ndarray | dict, path: Path, affine: np.ndarray | None = None) -> None:
    """Write a NIfTI-1 array (with ``affine``) or a JSON dict under a hidden temporary name, then rename it."""
    # The temporary name keeps the suffix so nibabel still gzips; a crash leaves no file under the final name.
    tmp = path.with_name(f".{os.getpid()}.tmp.{path.name}")
    try:
        if isinstance(payload, dict):
            tmp.write_text(json.dumps(payload, indent=4) + "\n", encoding="utf-8")
        else:
            image = nib.Nifti1Image(payload, affine)
            image.set_qform(affine, code=1)
            image.set_sform(affine, code=1)
            image.header.set_data_dtype(payload.dtype)
            nib.save(image, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _check_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def write_msd_dataset(out_dir: str | Path, n_cases: int, seed: int, *, n_test: int = 0,
                      progress: bool = True) -> Path:
    """Write phantoms in the Medical Segmentation Decathlon Task09_Spleen layout.

    Creates ``imagesTr/spleen_{i}.nii.gz`` (int16 HU) and ``labelsTr/spleen_{i}.nii.gz``
    (uint8, same affine) for i = 1..n_cases, ``imagesTs/spleen_{j}.nii.gz`` for
    j = n_cases+1..n_cases+n_test, and ``dataset.json`` listing them in numeric order.
    Case ``i`` is ``make_phantom`` with a seed derived from (seed, i), so the dataset is
    reproducible and cases differ. Every file is written atomically; existing files of
    the same name are replaced.

    Returns:
        ``out_dir`` as a Path (the folder holding dataset.json).

    Raises:
        ConfigError: n_cases < 1, n_test < 0, a negative seed, or out_dir is a file.
    """
    _check_count("n_cases", n_cases, 1)
    _check_count("n_test", n_test, 0)
    _check_count("seed", seed, 0)
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"out_dir {str(root)!r} exists and is not a folder; pick another path")
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm  # imported here: only the writer shows progress

    training, test = [], []
    for case_id in tqdm(range(1, n_cases + n_test + 1), desc="phantoms", unit="case", disable=not progress):
        case = make_phantom(_case_seed(seed, case_id))
        name = f"spleen_{case_id}{NIFTI_SUFFIX}"
        if case_id <= n_cases:
            _save_atomic(case.image_hu, root / "imagesTr" / name, case.affine)
            _save_atomic(case.spleen_mask, root / "labelsTr" / name, case.affine)
            training.append(msd_training_entry(name))
        else:
            _save_atomic(case.image_hu, root / "imagesTs" / name, case.affine)
            test.append(f"./imagesTs/{name}")
    _save_atomic(msd_dataset_json(
        description=f"Synthetic spleen CT phantoms (spleen_seg.training.phantom, seed {seed})",
        reference="spleen_seg synthetic phantom generator", licence="CC-BY-SA 4.0", training=training, test=test),
        root / "dataset.json")
    return root
