"""A follow-up comparison of two scans of one patient: the spleen's volume change and a side-by-side preview.

``compare.json`` records both scans (source, report, volume, patient and study date), the
change ``current - prior`` in mL and in percent of the prior volume, and ``growth_flag``:
the growth exceeds ``growth_threshold_percent`` (``config.GROWTH_THRESHOLD_PERCENT``, 10 %: well above the few
percent by which automated volumetry of one spleen varies between scans, so a flag means a
change worth a look; pass your own threshold for your protocol). When the spleen is found
in only one of the scans no change is computed and a warning says why.

``compare.png`` shows each scan in one row, at matching anatomical levels: axial slices at
25, 50 and 75 % of that scan's spleen height (from its lowest slice), since the patient lies
at a different table position in each scan, and a coronal slice through the spleen's
centre; each panel names its world z (mm). Images are shown in the radiological
convention, as ``outputs.preview`` draws them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from spleen_seg.config import GROWTH_THRESHOLD_PERCENT
from spleen_seg.io.atomic import atomic_path, atomic_write_text
from spleen_seg.outputs.preview import DPI, draw_panel

COMPARE_FILENAME = "compare.json"
COMPARE_PREVIEW_FILENAME = "compare.png"
COMPARE_VERSION = 1
# What marks the two files as this program's, so that a rerun replaces them and nothing
# else of the same name (batch.compare checks both before it computes anything).
COMPARE_RECORD_HEAD = b'{\n  "compare_version":'
COMPARE_PREVIEW_SOFTWARE = "spleen-seg compare"  # the PNG's Software text chunk, before its pixels
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LEVELS = (0.25, 0.5, 0.75)  # fractions of the spleen's head-feet extent, from its lowest slice
FIGURE_SIZE_IN = (16.0, 8.5)


@dataclass(frozen=True)
class ScanSide:
    """One scan of the pair, as ``compare.json`` records it."""

    role: str  # "prior" or "current"
    source: str
    case_dir: str
    report: str
    spleen_found: bool
    volume_ml: float
    # PatientID, PatientName, PatientBirthDate, StudyDate, StudyInstanceUID ("" unknown; NIfTI has none).
    patient: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Comparison:
    prior: ScanSide
    current: ScanSide
    change_ml: float | None
    change_percent: float | None
    growth_threshold_percent: float
    growth_flag: bool
    interval_days: int | None
    patient_check: str
    warnings: list[str]

    def to_json(self) -> str:
        return json.dumps({"compare_version": COMPARE_VERSION, **asdict(self)}, indent=2) + "\n"


def _study_days(prior: ScanSide, current: ScanSide) -> int | None:
    from datetime import datetime

    dates = [side.patient.get("StudyDate", "") for side in (prior, current)]
    try:
        first, second = (datetime.strptime(d, "%Y%m%d") for d in dates)
    except ValueError:  # absent or not a DICOM date (DA: YYYYMMDD)
        return None
    return (second - first).days


def compare_scans(prior: ScanSide, current: ScanSide, patient_check: str, warnings: list[str] | None = None,
                  growth_threshold_percent: float = GROWTH_THRESHOLD_PERCENT) -> Comparison:
    """The volume change from ``prior`` to ``current`` and whether it exceeds the growth threshold (percent)."""
    notes = list(warnings or [])
    change_ml = change_percent = None
    missing = [side.role for side in (prior, current) if not side.spleen_found]
    if missing:
        notes.append(f"spleen not found in the {' and '.join(missing)} scan: no volume change computed")
    else:
        change_ml = current.volume_ml - prior.volume_ml
        change_percent = 100.0 * change_ml / prior.volume_ml
    days = _study_days(prior, current)
    if days is not None and days < 0:
        notes.append(f"the prior scan's StudyDate is {-days} days after the current one's: are PRIOR and CURRENT "
                     "swapped?")
    flag = change_percent is not None and change_percent > growth_threshold_percent
    return Comparison(prior=prior, current=current, change_ml=change_ml, change_percent=change_percent,
                      growth_threshold_percent=growth_threshold_percent, growth_flag=flag, interval_days=days,
                      patient_check=patient_check, warnings=notes)


def write_comparison(comparison: Comparison, dest: Path) -> Path:
    atomic_write_text(dest, comparison.to_json())
    return dest


def _canonical(image: np.ndarray, mask: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image and mask reordered to RAS voxel axes, and the RAS affine."""
    ornt = nib.orientations.io_orientation(affine)
    ras_affine = affine @ nib.orientations.inv_ornt_aff(ornt, image.shape)
    return (nib.orientations.apply_orientation(image, ornt), nib.orientations.apply_orientation(mask, ornt),
            ras_affine)


def level_slices(mask_ras: np.ndarray, levels: tuple[float, ...] = LEVELS) -> list[int]:
    """Axial slice indices (RAS z) at ``levels`` of the mask's head-feet extent; the middle slice when empty."""
    present = np.flatnonzero(mask_ras.any(axis=(0, 1)))
    if present.size == 0:
        return [mask_ras.shape[2] // 2] * len(levels)
    low, high = int(present[0]), int(present[-1])
    return [int(round(low + level * (high - low))) for level in levels]


def _row(axes, role: str, image: np.ndarray, mask: np.ndarray, affine: np.ndarray) -> None:
    image, mask, ras = _canonical(np.asarray(image, dtype=np.float32), np.asarray(mask, dtype=np.uint8), affine)
    spacing = np.sqrt((ras[:3, :3] ** 2).sum(axis=0))
    found = bool(mask.any())
    for ax, level, k in zip(axes[:-1], LEVELS, level_slices(mask), strict=True):
        z_mm = float((ras @ [0, 0, k, 1])[2])
        where = f"{level:.0%} of spleen height" if found else "no spleen: middle slice"
        draw_panel(ax, image[:, :, k], mask[:, :, k], (spacing[0], spacing[1]), ("R", "L", "A", "P"),
                   f"{role}: axial, {where} (z {z_mm:.0f} mm)")
    row = int(round(float(np.flatnonzero(mask.any(axis=(0, 2))).mean()))) if found else mask.shape[1] // 2
    draw_panel(axes[-1], image[:, row, :], mask[:, row, :], (spacing[0], spacing[2]), ("R", "L", "S", "I"),
               f"{role}: coronal through the spleen")


def write_compare_preview(prior: tuple[np.ndarray, np.ndarray, np.ndarray], current: tuple[np.ndarray, np.ndarray, np.ndarray],
                          dest: Path, title: str) -> Path:
    """A PNG: one row per scan (prior on top), axial slices at matching spleen levels and a coronal slice.

    ``prior`` and ``current`` are (image HU (X, Y, Z), mask uint8 (X, Y, Z), affine_ras 4x4)
    in any voxel order.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=FIGURE_SIZE_IN, dpi=DPI, facecolor="black")
    axes = figure.subplots(2, len(LEVELS) + 1)
    _row(axes[0], "prior", *prior)
    _row(axes[1], "current", *current)
    for ax in axes.ravel():
        ax.title.set_color("white")
        ax.title.set_fontsize(9)
    figure.suptitle(title, color="white", fontsize=13)
    figure.tight_layout()
    with atomic_path(dest) as tmp:
        figure.savefig(tmp, format="png", facecolor=figure.get_facecolor(), pil_kwargs={"compress_level": 1},
                       metadata={"Software": COMPARE_PREVIEW_SOFTWARE})
    return dest


def is_compare_record(head: bytes) -> bool:
    """True for the first bytes of a ``compare.json`` this program wrote (``Comparison.to_json``)."""
    return head.startswith(COMPARE_RECORD_HEAD)


def is_compare_preview(head: bytes) -> bool:
    """True for the first bytes of a ``compare.png`` this program wrote (its Software text chunk)."""
    return head.startswith(PNG_SIGNATURE) and COMPARE_PREVIEW_SOFTWARE.encode() in head


def summary_line(comparison: Comparison) -> str:
    """One line for the terminal: the two volumes, the change and the flag."""
    volumes = ", ".join(f"{side.role} " + (f"{side.volume_ml:.1f} mL" if side.spleen_found else "spleen not found")
                        for side in (comparison.prior, comparison.current))
    if comparison.change_ml is None or comparison.change_percent is None:
        return f"{volumes}: no change computed"
    flag = (f"; growth above {comparison.growth_threshold_percent:g} %: FLAGGED" if comparison.growth_flag else "")
    return f"{volumes}: change {comparison.change_ml:+.1f} mL ({comparison.change_percent:+.1f} %){flag}"
