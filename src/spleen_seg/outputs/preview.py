"""A PNG preview per input: axial, coronal and sagittal slices with the mask's contour.

Images are reoriented to RAS (nibabel's closest canonical orientation) and shown in the
radiological convention: axial with the patient's left on the image's right and anterior
at the top; coronal with superior at the top and the patient's left on the right; sagittal
with anterior on the left and superior at the top. Pixels are drawn at their size in
millimetres, so anisotropic voxels display isotropically.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from spleen_seg.io.atomic import atomic_path

PREVIEW_FILENAME = "preview.png"
# The cohort page shows this instead of the preview: a real CT's preview.png is about 360 kB
# (1350 x 500), this 400-pixel-wide JPEG about 15 kB, so 1,000 rows weigh 15 MB, not 365 MB.
THUMBNAIL_FILENAME = "preview_thumb.jpg"
THUMBNAIL_WIDTH_PX = 400
THUMBNAIL_JPEG_QUALITY = 85
# Soft-tissue window: width 400 HU, level 40 HU.
WINDOW_WIDTH_HU = 400.0
WINDOW_LEVEL_HU = 40.0
CONTOUR_COLOUR = "#ff3b30"
CONTOUR_WIDTH = 1.2
FIGURE_SIZE_IN = (13.5, 5.0)
DPI = 100
SUBPLOT_LAYOUT = {"left": 0.011, "right": 0.989, "bottom": 0.03, "top": 0.903, "wspace": 0.035}
LABEL_STYLE = {"color": "yellow", "fontsize": 11, "fontweight": "bold"}
# Titles hold case ids, which come from file names: plain text, never matplotlib mathtext
# (a name with two "$" was parsed as TeX and failed its case: "scan$\\foo$").
PLAIN_TEXT = {"parse_math": False}


def to_ras(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder (X, Y, Z) voxels so that the axes increase towards Right, Anterior, Superior.

    Returns the reordered array and its spacing (mm) per axis.
    """
    ornt = nib.orientations.io_orientation(affine)
    ras = nib.orientations.apply_orientation(volume, ornt)
    new_affine = affine @ nib.orientations.inv_ornt_aff(ornt, volume.shape)
    spacing = np.sqrt((new_affine[:3, :3] ** 2).sum(axis=0))
    return ras, spacing


def _centre(mask_ras: np.ndarray) -> tuple[int, int, int]:
    # The mean voxel index is the centre of mass of a 0/1 mask, from the mask's count per
    # index along each axis: ndimage.center_of_mass would build float64 index grids the size
    # of the volume (4 GB on a whole-body CT), np.nonzero took 0.16 s on an MSD-sized mask.
    counts = [np.count_nonzero(mask_ras, axis=tuple(a for a in range(3) if a != axis)) for axis in range(3)]
    voxels = int(counts[0].sum())
    if not voxels:
        return tuple(s // 2 for s in mask_ras.shape)  # type: ignore[return-value]
    return tuple(int(round(int(np.dot(np.arange(c.size), c)) / voxels)) for c in counts)  # type: ignore[return-value]


def draw_panel(ax, image: np.ndarray, mask: np.ndarray, spacing: tuple[float, float], labels: tuple[str, str, str, str],
           title: str) -> None:
    """Draw a 2D slice indexed (horizontal, vertical) with both axes increasing towards R/A/S.

    The horizontal axis is then inverted (radiological convention shows R/A on the left)
    and the vertical axis runs upward. ``labels`` are the (left, right, top, bottom) edges.
    """
    width_mm = image.shape[0] * spacing[0]
    height_mm = image.shape[1] * spacing[1]
    extent = (0.0, width_mm, 0.0, height_mm)
    low = WINDOW_LEVEL_HU - WINDOW_WIDTH_HU / 2
    ax.imshow(image.T, cmap="gray", vmin=low, vmax=low + WINDOW_WIDTH_HU, origin="lower", extent=extent,
              interpolation="bilinear")
    if mask.any():
        ax.contour(mask.T.astype(np.float32), levels=[0.5], colors=CONTOUR_COLOUR, linewidths=CONTOUR_WIDTH,
                   origin="lower", extent=extent)
    ax.set_xlim(width_mm, 0.0)
    ax.set_ylim(0.0, height_mm)
    ax.set_aspect("equal")
    ax.set_axis_off()
    # y given: matplotlib then skips placing the title above tick labels (there are none),
    # which measured every axis' text (0.2 s a preview).
    ax.set_title(title, y=1.0, **PLAIN_TEXT)
    left, right, top, bottom = labels
    ax.text(0.02, 0.5, left, transform=ax.transAxes, ha="left", va="center", **LABEL_STYLE)
    ax.text(0.98, 0.5, right, transform=ax.transAxes, ha="right", va="center", **LABEL_STYLE)
    ax.text(0.5, 0.98, top, transform=ax.transAxes, ha="center", va="top", **LABEL_STYLE)
    ax.text(0.5, 0.02, bottom, transform=ax.transAxes, ha="center", va="bottom", **LABEL_STYLE)


def write_preview(image_hu: np.ndarray, mask: np.ndarray, affine_ras: np.ndarray, dest: str | Path,
                  title: str) -> Path:
    """Write a PNG with axial, coronal and sagittal slices through the spleen's centre.

    ``image_hu`` (float HU) and ``mask`` (uint8, 1 = spleen) have shape (X, Y, Z) in the
    voxel order of ``affine_ras`` (voxel index -> world RAS+ mm). Slices pass through the
    mask's centre of mass, or the volume's centre when the mask is empty.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    image, spacing = to_ras(np.asarray(image_hu, dtype=np.float32), np.asarray(affine_ras, dtype=np.float64))
    mask_ras, _ = to_ras(np.asarray(mask, dtype=np.uint8), np.asarray(affine_ras, dtype=np.float64))
    ci, cj, ck = _centre(mask_ras)
    figure = Figure(figsize=FIGURE_SIZE_IN, dpi=DPI, facecolor="black")
    axes = figure.subplots(1, 3)
    sx, sy, sz = (float(s) for s in spacing)
    draw_panel(axes[0], image[:, :, ck], mask_ras[:, :, ck], (sx, sy), ("R", "L", "A", "P"), f"axial (slice {ck})")
    draw_panel(axes[1], image[:, cj, :], mask_ras[:, cj, :], (sx, sz), ("R", "L", "S", "I"), f"coronal (row {cj})")
    draw_panel(axes[2], image[ci, :, :], mask_ras[ci, :, :], (sy, sz), ("A", "P", "S", "I"), f"sagittal (column {ci})")
    for ax in axes:
        ax.title.set_color("white")
    figure.suptitle(title, color="white", fontsize=13, **PLAIN_TEXT)
    # What tight_layout computes for this figure size and these titles, without its
    # extra draw (0.13 s a preview).
    figure.subplots_adjust(**SUBPLOT_LAYOUT)
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        # Fast zlib level: the preview is a few hundred kB either way.
        figure.savefig(tmp, format="png", facecolor=figure.get_facecolor(), pil_kwargs={"compress_level": 1})
    return dest


def write_thumbnail(preview: str | Path, dest: str | Path, width_px: int = THUMBNAIL_WIDTH_PX) -> Path:
    """A ``width_px``-wide JPEG of the preview PNG (aspect ratio kept) for the cohort page."""
    from PIL import Image

    dest = Path(dest)
    with Image.open(preview) as image:
        height_px = max(1, round(image.height * width_px / image.width))
        small = image.convert("RGB").resize((width_px, height_px), Image.Resampling.LANCZOS)
    with atomic_path(dest) as tmp:
        small.save(tmp, format="JPEG", quality=THUMBNAIL_JPEG_QUALITY)
    return dest
