"""Degraded phantoms: the image faults a quality score must notice, applied to a ``PhantomCase``.

Each degradation has a ``severity`` in [0, 1] mapped linearly onto a physical range, so a
benchmark can draw mild and strong cases alike:

* ``noise``: white Gaussian noise of 40-160 HU standard deviation (the phantom's own is
  8-20 HU, a low-dose abdominal CT about 30-50).
* ``streaks``: metal-like streaks: 6-14 thin lines (1 mm) through one point inside the
  body in every axial slice, alternately bright and dark, 150-900 HU.
* ``truncated_fov``: the field of view cut on the spleen's side along the patient's
  left-right axis, through the spleen, keeping 70 % down to 25 % of its width; the label is
  cut with it.
* ``hu_offset``: a calibration error, every value shifted by 60-300 HU, up or down.
* ``motion_blur``: breathing during the acquisition, a box blur of 8-40 mm along the
  front-back or head-feet axis.

Axes are found through the affine, so the same anatomy degrades alike in any orientation.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from scipy import ndimage

from spleen_seg.errors import ConfigError
from spleen_seg.training.phantom import PhantomCase

DEGRADATIONS = ("noise", "streaks", "truncated_fov", "hu_offset", "motion_blur")
NOISE_SIGMA_HU = (40.0, 160.0)
STREAK_COUNT = (6, 14)
STREAK_AMPLITUDE_HU = (150.0, 900.0)
STREAK_WIDTH_MM = 1.0
# The streaks' source lies this fraction of the body's half-width around the image centre.
STREAK_SOURCE_SPREAD = 0.3
# Fraction of the spleen's left-right width kept by the truncation (severity 0 -> first).
TRUNCATION_KEEP = (0.7, 0.25)
HU_OFFSET = (60.0, 300.0)
MOTION_BLUR_MM = (8.0, 40.0)
WORLD_X, WORLD_Y, WORLD_Z = 0, 1, 2


def _scale(severity: float, low_high: tuple[float, float]) -> float:
    return low_high[0] + severity * (low_high[1] - low_high[0])


def voxel_axis(affine: np.ndarray, world_axis: int) -> int:
    """The voxel axis whose direction is closest to world axis ``world_axis`` (0 = x, 1 = y, 2 = z)."""
    return int(np.argmax(np.abs(np.asarray(affine)[world_axis, :3])))


def _spacing(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def _noise(image: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    sigma = _scale(severity, NOISE_SIGMA_HU)
    return image + rng.standard_normal(image.shape, dtype=np.float32) * np.float32(sigma)


def _streaks(image: np.ndarray, affine: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    ax, ay = voxel_axis(affine, WORLD_X), voxel_axis(affine, WORLD_Y)
    spacing = _spacing(affine)
    centre = [(0.5 + rng.uniform(-STREAK_SOURCE_SPREAD, STREAK_SOURCE_SPREAD)) * image.shape[a] for a in (ax, ay)]
    u = (np.arange(image.shape[ax]) - centre[0]) * spacing[ax]
    v = (np.arange(image.shape[ay]) - centre[1]) * spacing[ay]
    uu, vv = np.meshgrid(u, v, indexing="ij")
    amplitude = _scale(severity, STREAK_AMPLITUDE_HU)
    plane = np.zeros(uu.shape, dtype=np.float32)
    for index in range(int(rng.integers(*STREAK_COUNT, endpoint=True))):
        angle = rng.uniform(0.0, np.pi)
        distance = np.abs(uu * np.sin(angle) - vv * np.cos(angle))
        plane += np.float32((1 if index % 2 else -1) * amplitude) * np.exp(-0.5 * (distance / STREAK_WIDTH_MM) ** 2,
                                                                          dtype=np.float32)
    # The same streaks in every axial slice: broadcast the (ax, ay) plane along the third axis.
    shape = [1, 1, 1]
    shape[ax], shape[ay] = plane.shape
    if ax > ay:
        plane = plane.T
    return image + plane.reshape(shape)


def _truncate(case: PhantomCase, image: np.ndarray, severity: float) -> PhantomCase:
    axis = voxel_axis(case.affine, WORLD_X)
    present = np.flatnonzero(case.spleen_mask.any(axis=tuple(a for a in range(3) if a != axis)))
    if present.size == 0:
        raise ConfigError("truncated_fov needs a phantom whose spleen is in view")
    keep = _scale(severity, TRUNCATION_KEEP)
    first, last = int(present[0]), int(present[-1])
    # The spleen lies towards the patient's left (world x < 0): cut that side off.
    left_is_low = case.affine[WORLD_X, axis] > 0
    index = [slice(None)] * 3
    affine = case.affine.copy()
    if left_is_low:
        cut = last - int(round(keep * (last - first + 1))) + 1
        index[axis] = slice(cut, None)
        affine[:3, 3] += affine[:3, axis] * cut
    else:
        cut = first + int(round(keep * (last - first + 1)))
        index[axis] = slice(0, cut)
    box = tuple(index)
    return replace(case, image_hu=np.ascontiguousarray(image[box]), affine=affine,
                   spleen_mask=np.ascontiguousarray(case.spleen_mask[box]))


def _motion(image: np.ndarray, affine: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    axis = voxel_axis(affine, int(rng.choice([WORLD_Y, WORLD_Z])))
    length = max(1, int(round(_scale(severity, MOTION_BLUR_MM) / _spacing(affine)[axis])))
    return ndimage.uniform_filter1d(image, length, axis=axis, mode="nearest")


def degrade_phantom(case: PhantomCase, kind: str, seed: int, severity: float | None = None) -> PhantomCase:
    """``case`` with the degradation ``kind`` (one of ``DEGRADATIONS``) at ``severity`` in [0, 1].

    ``severity`` None draws it uniformly from ``seed``. The returned image is float32 HU;
    only ``truncated_fov`` changes the shape, affine and mask (cut with the image).
    Deterministic by ``seed``. Raises ``ConfigError`` for an unknown kind or a severity
    outside [0, 1].
    """
    if kind not in DEGRADATIONS:
        raise ConfigError(f"degradation must be one of {', '.join(DEGRADATIONS)}, got '{kind}'")
    rng = np.random.default_rng(seed)
    drawn = float(rng.uniform())
    severity = drawn if severity is None else float(severity)
    if not 0.0 <= severity <= 1.0:
        raise ConfigError(f"severity must be within [0, 1], got {severity}")
    image = case.image_hu.astype(np.float32)
    if kind == "truncated_fov":
        return _truncate(case, image, severity)
    if kind == "noise":
        image = _noise(image, severity, rng)
    elif kind == "streaks":
        image = _streaks(image, case.affine, severity, rng)
    elif kind == "hu_offset":
        image = image + np.float32(rng.choice([-1.0, 1.0]) * _scale(severity, HU_OFFSET))
    else:
        image = _motion(image, case.affine, severity, rng)
    return replace(case, image_hu=image.astype(np.float32, copy=False))
