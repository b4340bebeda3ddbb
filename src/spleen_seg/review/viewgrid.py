"""The grid the viewer shows a case on, and the way a drawing on it becomes a mask on the case's own grid.

Why not the case's own grid: NiiVue turns the CT into a 3D texture and computes its
gradients for the 3D render on the GPU; in a browser without one (SwiftShader, as in the
tests and on this machine) that costs about 0.8 us per voxel, a minute for 512 x 512 x 300.
So the viewer gets a *view*: the box of the model's mask plus a margin (``roi``), or the
whole volume (``full``; also for an empty mask), and, only when that still holds more than
``max_voxels``, averaged over blocks of whole voxels, along the finest axes first. Most
cases fit at their own resolution (an MSD spleen box with its margin is about 2.5 M voxels).

The view is stored in RAS+ voxel order (NiiVue's own, so it does no reordering) with an
affine that puts every view voxel where its block lies in the world. A drawing comes back
on that grid; :func:`apply_drawing` changes the case's mask only in the blocks whose view
voxel the reviewer changed, so every voxel elsewhere keeps its exact value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import nibabel as nib
import numpy as np

VIEW_ROI = "roi"
VIEW_FULL = "full"
VIEWS = (VIEW_ROI, VIEW_FULL)
# Context around the spleen's box: its neighbours (kidney, stomach, diaphragm, ribs) stay in view.
ROI_MARGIN_MM = 40.0
# A view voxel is inside the mask when at least half of its block is.
MASK_BLOCK_FRACTION = 0.5
SAME_SPACING_TOLERANCE = 0.01  # voxel sizes within 1% count as equal (0.78 and 0.781 mm pixels)
RAS_ORNT = np.array([[0, 1], [1, 1], [2, 1]], dtype=np.float64)


@dataclass(frozen=True)
class ViewGrid:
    """Where a view lies in the case's grid.

    ``start``/``stop``: the box in the case's voxels (source order, stop exclusive); ``factors``:
    the block size per axis; ``ornt``: nibabel's orientation from the source axes to RAS+.
    ``shape`` and ``affine`` are the view's (RAS+ order), ``source_shape`` the case's.
    """

    view: str
    source_shape: tuple[int, int, int]
    start: tuple[int, int, int]
    stop: tuple[int, int, int]
    factors: tuple[int, int, int]
    ornt: np.ndarray
    affine: np.ndarray

    @property
    def reduced_shape(self) -> tuple[int, int, int]:
        """The view's shape in source order (before reordering to RAS+)."""
        return tuple(math.ceil((b - a) / f) for a, b, f in zip(self.start, self.stop, self.factors, strict=True))  # type: ignore[return-value]

    @property
    def shape(self) -> tuple[int, int, int]:
        reduced = self.reduced_shape
        return tuple(reduced[int(axis)] for axis in self.ornt[:, 0].argsort())  # type: ignore[return-value]

    def as_dict(self) -> dict[str, object]:
        return {"view": self.view, "shape": list(self.shape), "start": list(self.start), "stop": list(self.stop),
                "factors": list(self.factors), "source_shape": list(self.source_shape)}


def _mask_box(mask: np.ndarray) -> tuple[tuple[int, int], ...] | None:
    spans = []
    for axis in range(3):
        present = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(3) if a != axis)))
        if present.size == 0:
            return None
        spans.append((int(present[0]), int(present[-1]) + 1))
    return tuple(spans)


def plan_view(mask: np.ndarray, affine: np.ndarray, view: str, max_voxels: int,
              margin_mm: float = ROI_MARGIN_MM) -> ViewGrid:
    """The view of a case whose model mask is ``mask`` (X, Y, Z), 0/1, on the grid of ``affine``.

    ``roi``: the mask's box grown by ``margin_mm`` (the whole volume when the mask is empty);
    ``full``: the whole volume. Blocks grow along the axes whose block is thinnest in mm
    (together when equal), until the view holds at most ``max_voxels``.
    """
    if view not in VIEWS:
        raise ValueError(f"view {view!r} is not one of {', '.join(VIEWS)}")
    shape = tuple(int(n) for n in mask.shape)
    spacing = np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
    box = _mask_box(mask) if view == VIEW_ROI else None
    if box is None:
        start, stop = [0, 0, 0], list(shape)
    else:
        grow = [math.ceil(margin_mm / s) for s in spacing]
        start = [max(0, lo - g) for (lo, _), g in zip(box, grow, strict=True)]
        stop = [min(n, hi + g) for (_, hi), g, n in zip(box, grow, shape, strict=True)]
    factors = [1, 1, 1]
    lengths = [b - a for a, b in zip(start, stop, strict=True)]
    while math.prod(math.ceil(n / f) for n, f in zip(lengths, factors, strict=True)) > max_voxels:
        candidates = [axis for axis in range(3) if factors[axis] < lengths[axis]]
        if not candidates:
            break
        finest = min(spacing[a] * factors[a] for a in candidates)
        # Axes as fine as the finest grow together, so square pixels stay square.
        for axis in candidates:
            if spacing[axis] * factors[axis] <= finest * (1 + SAME_SPACING_TOLERANCE):
                factors[axis] += 1
    for axis in range(3):
        # Whole blocks where the volume allows (a partial block's centre is not where the affine says).
        whole = math.ceil(lengths[axis] / factors[axis]) * factors[axis]
        stop[axis] = min(shape[axis], start[axis] + whole)
        start[axis] = max(0, stop[axis] - whole)
        lengths[axis] = stop[axis] - start[axis]
    ornt = nib.orientations.io_orientation(affine)
    reduced = tuple(math.ceil(n / f) for n, f in zip(lengths, factors, strict=True))
    block = np.eye(4)
    for axis in range(3):
        block[axis, axis] = factors[axis]
        # A block's centre: the mean of its voxels' centres.
        block[axis, 3] = start[axis] + (factors[axis] - 1) / 2.0
    affine_view = np.asarray(affine, dtype=np.float64) @ block @ nib.orientations.inv_ornt_aff(ornt, reduced)
    return ViewGrid(view=view, source_shape=shape, start=tuple(start), stop=tuple(stop),  # type: ignore[arg-type]
                    factors=tuple(factors), ornt=ornt, affine=affine_view)  # type: ignore[arg-type]


def _block_sums(array: np.ndarray, grid: ViewGrid, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """Sums of ``array`` over each block of the view (source order) and the voxel count of each block."""
    box = tuple(slice(a, b) for a, b in zip(grid.start, grid.stop, strict=True))
    sums: np.ndarray = np.asarray(array[box], dtype=dtype)
    counts = np.ones(1, dtype=np.int64)
    for axis, factor in enumerate(grid.factors):
        if factor > 1:
            edges = np.arange(0, sums.shape[axis], factor)
            sums = np.add.reduceat(sums, edges, axis=axis, dtype=dtype)
            sizes = np.diff(np.append(edges, grid.stop[axis] - grid.start[axis]))
            counts = counts * sizes.reshape([-1 if a == axis else 1 for a in range(3)])
    return sums, counts


def _to_ras(array: np.ndarray, grid: ViewGrid) -> np.ndarray:
    return np.asfortranarray(nib.orientations.apply_orientation(array, grid.ornt))


def _from_ras(array: np.ndarray, grid: ViewGrid) -> np.ndarray:
    back = nib.orientations.ornt_transform(RAS_ORNT, grid.ornt)
    return nib.orientations.apply_orientation(array, back)


def view_image(image_hu: np.ndarray, grid: ViewGrid) -> np.ndarray:
    """The CT ``image_hu`` (X, Y, Z, HU) on the view: block means, int16, RAS+ order (shape ``grid.shape``)."""
    sums, counts = _block_sums(image_hu, grid, np.float64 if max(grid.factors) > 1 else np.float32)
    info = np.iinfo(np.int16)
    return _to_ras(np.clip(np.rint(sums / counts), info.min, info.max).astype(np.int16), grid)


def view_mask(mask: np.ndarray, grid: ViewGrid) -> np.ndarray:
    """The mask (X, Y, Z, 0/1) on the view: 1 where at least half of a block is, uint8, RAS+ order."""
    if max(grid.factors) == 1:
        box = tuple(slice(a, b) for a, b in zip(grid.start, grid.stop, strict=True))
        return _to_ras((np.asarray(mask[box]) > 0).astype(np.uint8), grid)
    sums, counts = _block_sums(np.asarray(mask) > 0, grid, np.int64)
    return _to_ras((sums >= MASK_BLOCK_FRACTION * counts).astype(np.uint8), grid)


def apply_drawing(base: np.ndarray, drawing: np.ndarray, grid: ViewGrid) -> np.ndarray:
    """``base`` (the case's mask, X, Y, Z, 0/1) with the reviewer's changes on the view applied.

    ``drawing`` is the view (``grid.shape``, RAS+ order, 0/1) as the reviewer left it. A view
    voxel whose value differs from :func:`view_mask` of ``base`` sets its whole block to the
    drawn value; every other voxel of ``base`` is kept. Returns a new uint8 array.
    """
    if tuple(drawing.shape) != grid.shape:
        raise ValueError(f"drawing shape {tuple(drawing.shape)} differs from the view's {grid.shape}")
    drawn = _from_ras(np.asarray(drawing, dtype=np.uint8), grid)
    changed = drawn != _from_ras(view_mask(base, grid), grid)
    result = (np.asarray(base) > 0).astype(np.uint8)
    if not changed.any():
        return result
    box = tuple(slice(a, b) for a, b in zip(grid.start, grid.stop, strict=True))
    # For each voxel of the box, the index of its view voxel along each axis.
    blocks = np.ix_(*[np.arange(b - a) // f for a, b, f in zip(grid.start, grid.stop, grid.factors, strict=True)])
    up_changed = changed[blocks]
    result[box] = np.where(up_changed, drawn[blocks], result[box])
    return result
