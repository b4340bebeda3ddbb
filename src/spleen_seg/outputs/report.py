"""Measurements of a spleen mask and the per-input ``report.json``.

World coordinates follow nibabel's RAS+ convention: +x towards the patient's Right,
+y Anterior, +z Superior. So the patient's left is the smaller x and posterior the
smaller y. Every measurement is taken in world millimetres through the affine, so the
same anatomy stored LPS or RAS gives the same numbers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spleen_seg.errors import InputImageError
from spleen_seg.io.atomic import atomic_write_text
from spleen_seg.io.nifti import Geometry

REPORT_FILENAME = "report.json"
# 2: adds "identity" (what the outputs depend on; a later run resumes by it).
# 3: adds "quality" (the per-case quality score and review_suggested; pipeline/quality.py).
# 4: adds "review" (the reviewer's decision and correction; outputs/review_state.py). A version 3
#    report reads as one not reviewed.
REPORT_VERSION = 4
READABLE_REPORT_VERSIONS = (3, 4)

# 26-connectivity: voxels touching by a face, edge or corner belong to one component.
CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)
# Splenomegaly by CT volume: the paper's threshold for mild splenomegaly, 314.47 mL (mean +
# 1 SD of 45 healthy spleens); a craniocaudal length > 13 cm is another common criterion.
SPLENOMEGALY_THRESHOLD_ML = 314.5
SPLENOMEGALY_CRITERION = f"spleen volume > {SPLENOMEGALY_THRESHOLD_ML} mL"
SPLENOMEGALY_CITATION = (
    "Linguraru MG, Sandberg JK, Jones EC, Summers RM. Assessing splenomegaly: automated "
    "volumetric analysis of the spleen. Acad Radiol. 2013;20(6):675-684. doi:10.1016/j.acra.2013.01.011"
)
# Body = everything denser than this (air -1000 HU and lung about -850 HU are outside).
BODY_THRESHOLD_HU = -500.0
# CT intensity plausibility: a body CT holds air or fat (-1000 / -100 HU), so its lowest
# half-percent lies well below zero, and soft tissue keeps its median far below bone.
INTENSITY_LOW_PERCENTILE = 0.5
INTENSITY_LOW_MAX_HU = -50.0
INTENSITY_MEDIAN_MAX_HU = 500.0
# Percentiles need no more voxels than this; a regular stride keeps them deterministic.
INTENSITY_SAMPLE_VOXELS = 2_000_000
AXIS_NAMES = ("left_right", "anterior_posterior", "superior_inferior")
# The body-centre search reads the image in chunks of about this many voxels.
BODY_CHUNK_VOXELS = 8_000_000
# CT stored without its HU offset: air at 0 instead of -1024, values within 12 bits.
UNSIGNED_CT_MAX = 4095

FLAG_SPLENOMEGALY = "splenomegaly"
FLAG_TOUCHES_BORDER = "touches_border"
FLAG_HEADER_FLIP = "probable_header_flip"
FLAG_NON_CT = "non_ct_intensity"
FLAG_REVIEW = "review_suggested"


@dataclass(frozen=True)
class ComponentResult:
    """Connected components of a mask (26-connectivity) and which were kept."""

    mask: np.ndarray
    found: int
    kept: int
    voxels_per_component: list[int]


@dataclass(frozen=True)
class AnatomyCheck:
    """Where the spleen lies relative to the body at its own level, in world RAS+ mm."""

    spleen_centroid_ras_mm: list[float]
    body_centre_ras_mm: list[float]
    on_patient_left: bool
    posterior: bool

    @property
    def probable_header_flip(self) -> bool:
        return not (self.on_patient_left and self.posterior)


@dataclass
class CaseReport:
    """Everything ``report.json`` holds for one input; ``to_json`` gives the file's text."""

    case: str
    source: str
    spleen_found: bool
    volume_ml: float
    voxel_count: int
    extents_mm: dict[str, float] | None
    hu_mean: float | None
    hu_std: float | None
    components_found: int
    components_kept: int
    touches_border: bool
    probable_header_flip: bool
    anatomy: dict[str, Any] | None
    splenomegaly: dict[str, Any]
    input_geometry: dict[str, Any]
    model: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    message: str = ""
    # Input, weights and options digests and versions: a later run skips the case when equal.
    identity: dict[str, Any] = field(default_factory=dict)
    # The quality score (pipeline.quality.QualityScore.as_dict); None when the segmenter gave none.
    quality: dict[str, Any] | None = None
    # The review app's record (outputs.review_state.ReviewState.as_dict); None until reviewed.
    review: dict[str, Any] | None = None

    @property
    def review_suggested(self) -> bool:
        return bool(self.quality and self.quality.get("review_suggested"))

    @property
    def flags(self) -> list[str]:
        names = []
        if self.splenomegaly["flag"]:
            names.append(FLAG_SPLENOMEGALY)
        if self.touches_border:
            names.append(FLAG_TOUCHES_BORDER)
        if self.probable_header_flip:
            names.append(FLAG_HEADER_FLIP)
        if any(w.startswith(FLAG_NON_CT) for w in self.warnings):
            names.append(FLAG_NON_CT)
        if self.review_suggested:
            names.append(FLAG_REVIEW)
        return names

    def to_json(self) -> str:
        data = {"report_version": REPORT_VERSION, **asdict(self), "flags": self.flags}
        return json.dumps(data, indent=2) + "\n"


def mask_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The bounding box of the nonzero voxels of ``mask`` (any shape), or None when empty.

    Whole-volume work on a mask stays in this box: on a whole-body CT the spleen is a
    thousandth of the voxels, and full-size temporaries (a bool copy, float64 index
    grids) would cost gigabytes.
    """
    spans = []
    for axis in range(mask.ndim):
        present = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if present.size == 0:
            return None
        spans.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(spans)


def keep_components(mask: np.ndarray, largest_only: bool) -> ComponentResult:
    """Label ``mask`` (uint8, any shape) with 26-connectivity; optionally keep the largest.

    Components are listed largest first. Ties keep the lowest label (first in C order).
    The result's mask is uint8 0/1; it is ``mask`` itself when that already is one and
    nothing is removed (no whole-volume copy).
    """
    from scipy import ndimage  # here, not at import: readers of reports (the review app) need no scipy

    box = mask_box(mask)
    if box is None:
        return ComponentResult(mask=np.zeros_like(mask, dtype=np.uint8) if mask.dtype != np.uint8 else mask,
                               found=0, kept=0, voxels_per_component=[])
    # Label only the mask's bounding box: the spleen is a small part of a CT volume.
    labels, found = ndimage.label(mask[box] > 0, structure=CONNECTIVITY_26)
    sizes = np.bincount(labels.ravel(), minlength=found + 1)[1:]
    order = sorted(range(found), key=lambda i: (-int(sizes[i]), i))
    binary = mask.dtype == np.uint8 and int(mask[box].max()) <= 1
    kept_mask = mask if binary else (mask > 0).astype(np.uint8)
    kept = found
    if largest_only and found > 1:
        kept_mask = kept_mask.copy() if kept_mask is mask else kept_mask
        kept_mask[box] = labels == order[0] + 1
        kept = 1
    return ComponentResult(mask=kept_mask, found=int(found), kept=kept, voxels_per_component=[int(sizes[i]) for i in order])


def voxel_extent_mm(affine_ras: np.ndarray) -> np.ndarray:
    """Size of one voxel's bounding box along each world axis (spacing when axis-aligned)."""
    return np.abs(np.asarray(affine_ras)[:3, :3]).sum(axis=1)


def _mask_indices(mask: np.ndarray) -> np.ndarray:
    """(N, 3) float64 voxel indices of the mask's voxels, found inside its bounding box."""
    box = mask_box(mask)
    if box is None:
        return np.zeros((0, mask.ndim))
    return (np.argwhere(mask[box] > 0) + [b.start for b in box]).astype(np.float64)


def extents_mm(mask: np.ndarray, affine_ras: np.ndarray) -> dict[str, float]:
    """Spleen size along the patient axes (mm): span of voxel centres plus one voxel.

    Computed from the world coordinates of the mask voxels, so it does not depend on the
    voxel order. ``mask`` must not be empty.
    """
    world = _mask_indices(mask) @ np.asarray(affine_ras)[:3, :3].T
    span = world.max(axis=0) - world.min(axis=0) + voxel_extent_mm(affine_ras)
    return {name: round(float(value), 4) for name, value in zip(AXIS_NAMES, span, strict=True)}


def touches_border(mask: np.ndarray) -> bool:
    """True when any mask voxel lies in the first or last slice along any axis."""

    def face(axis: int, index: int) -> np.ndarray:
        # A view: np.take would copy the whole volume first when it is not C-ordered.
        return mask[(slice(None),) * axis + (index,)]

    return any(bool(face(axis, 0).any() or face(axis, -1).any()) for axis in range(mask.ndim))


def _world(affine_ras: np.ndarray, index: np.ndarray) -> np.ndarray:
    return np.asarray(affine_ras)[:3, :3] @ np.asarray(index, dtype=np.float64) + np.asarray(affine_ras)[:3, 3]


def _body_centre_index(image_hu: np.ndarray, si_axis: int, first: int, last: int) -> np.ndarray:
    """Index-space centre of mass of the voxels above ``BODY_THRESHOLD_HU`` in slices
    ``first..last`` along ``si_axis`` (of all of them when none is), accumulated a few
    slices at a time from per-axis voxel counts, so no slab-sized temporary exists."""
    shape = list(image_hu.shape)
    shape[si_axis] = last - first + 1
    profiles = [np.zeros(n, dtype=np.int64) for n in shape]
    step = max(1, BODY_CHUNK_VOXELS // max(image_hu.size // image_hu.shape[si_axis], 1))
    for start in range(first, last + 1, step):
        stop = min(start + step, last + 1)
        index = tuple(slice(start, stop) if a == si_axis else slice(None) for a in range(3))
        body = image_hu[index] > BODY_THRESHOLD_HU
        for axis in range(3):
            counts = body.sum(axis=tuple(a for a in range(3) if a != axis), dtype=np.int64)
            target = profiles[axis][start - first : stop - first] if axis == si_axis else profiles[axis]
            target += counts
    total = int(profiles[0].sum())
    if total == 0:
        centre = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    else:
        centre = np.array([float((p * np.arange(p.size)).sum()) / total for p in profiles])
    centre[si_axis] += first
    return centre


def anatomical_check(mask: np.ndarray, image_hu: np.ndarray, affine_ras: np.ndarray) -> AnatomyCheck:
    """Is the spleen on the patient's left and in the posterior half of the body?

    The body centre is the centre of mass of voxels above ``BODY_THRESHOLD_HU`` in the
    slab of slices the spleen spans (along the voxel axis closest to superior-inferior),
    so legs or thorax elsewhere in the scan do not move it. ``mask`` must not be empty.
    A spleen on the right or in front points at a header that mirrors the anatomy (MSD
    Task09's LPS voxels under RAS headers) rather than a real situs inversus.
    """
    affine_ras = np.asarray(affine_ras)
    indices = _mask_indices(mask)
    spleen = _world(affine_ras, indices.mean(axis=0))
    si_axis = int(np.argmax(np.abs(affine_ras[2, :3])))
    first, last = int(indices[:, si_axis].min()), int(indices[:, si_axis].max())
    body_centre = _world(affine_ras, _body_centre_index(image_hu, si_axis, first, last))
    return AnatomyCheck(
        spleen_centroid_ras_mm=[round(float(v), 3) for v in spleen],
        body_centre_ras_mm=[round(float(v), 3) for v in body_centre],
        on_patient_left=bool(spleen[0] < body_centre[0]),
        posterior=bool(spleen[1] < body_centre[1]),
    )


def intensity_warning(image: np.ndarray) -> str | None:
    """A warning when ``image`` does not look like CT in Hounsfield units, else None.

    CT of a body holds air (-1000 HU) or fat (-100 HU) and mostly soft tissue; MR and
    other modalities are mostly 0..4000 with nothing negative. CT stored without its
    rescale intercept (0..4095, air at 0) fails the same test, with a hint saying so.
    """
    flat = image.ravel(order="K")  # no copy for nibabel's Fortran-ordered arrays
    step = max(1, flat.size // INTENSITY_SAMPLE_VOXELS)
    sample = flat[::step]
    low, median = np.percentile(sample, [INTENSITY_LOW_PERCENTILE, 50.0])
    if low > INTENSITY_LOW_MAX_HU or median > INTENSITY_MEDIAN_MAX_HU:
        hint = ""
        if float(sample.min()) >= 0.0 and float(sample.max()) <= UNSIGNED_CT_MAX:
            hint = (f" (values 0..{UNSIGNED_CT_MAX}: CT stored without its -1024 HU offset? set the header's "
                    "scl_inter / RescaleIntercept)")
        return (f"{FLAG_NON_CT}: intensities do not look like CT in HU (p{INTENSITY_LOW_PERCENTILE:g} = {low:.0f}, "
                f"median = {median:.0f}; CT has air/fat below {INTENSITY_LOW_MAX_HU:g} HU){hint}: is this an MR or a "
                "non-calibrated image? The segmentation is unreliable")
    return None


def check_intensity(image: np.ndarray, source: str, strict: bool) -> list[str]:
    """Warnings for a non-CT intensity range; with ``strict`` raise ``InputImageError`` instead."""
    warning = intensity_warning(image)
    if warning is None:
        return []
    if strict:
        raise InputImageError(f"{source}: {warning.removeprefix(FLAG_NON_CT + ': ')} (refused because of --strict)")
    return [warning]


def check_geometry(geometry: Geometry, source: str, strict: bool) -> list[str]:
    """The reader's assumptions about the header (``geometry.warnings``); with ``strict``
    the first of them raises ``InputImageError`` instead (``build_report`` records them)."""
    if strict and geometry.warnings:
        raise InputImageError(f"{source}: {geometry.warnings[0]} (refused because of --strict)")
    return list(geometry.warnings)


def geometry_summary(geometry: Geometry) -> dict[str, Any]:
    return {
        "shape": list(geometry.shape),
        "spacing_mm": [round(s, 6) for s in geometry.spacing_mm],
        "orientation": geometry.axcodes,
        "affine_ras": np.round(geometry.affine_ras, 6).tolist(),
    }


def build_report(case: str, source: str, mask: np.ndarray, image_hu: np.ndarray, geometry: Geometry,
                 components: ComponentResult, warnings: list[str] | None = None) -> CaseReport:
    """Measure the final ``mask`` (uint8 (X, Y, Z), 1 = spleen) on its source image.

    ``image_hu`` is the original float32 HU array, same shape and voxel order as ``mask``.
    An empty mask gives ``spleen_found = False`` with a message and no measurements.
    """
    # The reader's assumptions about the header come first, once.
    warnings = list(dict.fromkeys([*geometry.warnings, *(warnings or [])]))
    voxels = int(np.count_nonzero(mask))
    volume_ml = voxels * geometry.voxel_volume_ml
    splenomegaly = {"flag": volume_ml > SPLENOMEGALY_THRESHOLD_ML, "criterion": SPLENOMEGALY_CRITERION,
                    "threshold_ml": SPLENOMEGALY_THRESHOLD_ML, "citation": SPLENOMEGALY_CITATION}
    report = CaseReport(
        case=case, source=source, spleen_found=voxels > 0, volume_ml=volume_ml, voxel_count=voxels,
        extents_mm=None, hu_mean=None, hu_std=None, components_found=components.found,
        components_kept=components.kept, touches_border=False, probable_header_flip=False, anatomy=None,
        splenomegaly=splenomegaly, input_geometry=geometry_summary(geometry), warnings=warnings,
    )
    if voxels == 0:
        report.message = "spleen not found: the mask is empty (is the spleen in the field of view?)"
        warnings.append(report.message)
        return report
    box = mask_box(mask)
    inside = image_hu[box][mask[box] > 0].astype(np.float64)
    report.extents_mm = extents_mm(mask, geometry.affine_ras)
    report.hu_mean = float(inside.mean())
    report.hu_std = float(inside.std())
    report.touches_border = touches_border(mask)
    if report.touches_border:
        warnings.append(f"{FLAG_TOUCHES_BORDER}: the spleen touches the image border and is likely cut off; "
                        "its volume and extents are lower bounds")
    anatomy = anatomical_check(mask, image_hu, geometry.affine_ras)
    report.anatomy = {**asdict(anatomy), "rule": "spleen centroid left of (x <) and posterior to (y <) the body centre"}
    report.probable_header_flip = anatomy.probable_header_flip
    if anatomy.probable_header_flip:
        sides = ("left" if anatomy.on_patient_left else "RIGHT", "posterior" if anatomy.posterior else "ANTERIOR")
        warnings.append(f"{FLAG_HEADER_FLIP}: the spleen lies on the patient's {sides[0]} and {sides[1]} side in "
                        "world coordinates; the image header probably mirrors the anatomy (MSD-style LPS voxels "
                        "under an RAS header), or the weights' orientation convention is wrong")
    return report


def write_report(report: CaseReport, dest: Path) -> Path:
    atomic_write_text(dest, report.to_json())
    return dest


def read_report(path: Path) -> CaseReport | None:
    """The report a :func:`write_report` of a readable version wrote, or None (missing, other version, invalid)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.pop("report_version", None) not in READABLE_REPORT_VERSIONS:
            return None
        data.pop("flags", None)  # derived, not a field
        return CaseReport(**data)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError):
        return None
