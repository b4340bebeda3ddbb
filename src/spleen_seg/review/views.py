"""What the viewer loads for a case (its CT and mask on the view grid, as NIfTI) and the check of what it saves.

The CT of a view is made once per case and view, from the input read again
(``review.source``), and kept in the case folder as ``review_view_<view>.nii.gz`` (int16 HU,
the soft-tissue window in its header); a file of that name whose grid is not the view's is
made again. The mask is made for each request from the mask on disk (the correction once
there is one), so it is never stale. Both carry the same header, so NiiVue takes the mask as
the drawing layer of the CT.

A saved drawing is checked before anything is written: a NIfTI image (gzip or not) of at most
:func:`drawing_limit_bytes` (inflated too), of the view's shape and affine, uint8, values 0 and 1.
"""

from __future__ import annotations

import gzip
import threading
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np

from spleen_seg.errors import SpleenSegError
from spleen_seg.io.nifti import Geometry, read_geometry
from spleen_seg.outputs.report import CaseReport
from spleen_seg.outputs.review_state import AFFINE_TOLERANCE_MM
from spleen_seg.review.cases import CaseEntry, case_file, case_folder
from spleen_seg.review.store import ReviewRefused, durable_write, read_mask
from spleen_seg.review.viewgrid import VIEWS, ViewGrid, plan_view, view_image, view_mask

VIEW_CT_FILENAME = "review_view_{view}.nii.gz"
# The soft-tissue window W 400 / L 40 HU (-160..240): fat, fluid, organs and vessels apart, as a
# radiologist reads the abdomen (the recipe's -57..164 HU clips fat to black).
WINDOW_HU = (-160.0, 240.0)
NIFTI_HEADER_BYTES = 352
# Room for header extensions in an upload beyond the voxels themselves.
DRAWING_SLACK_BYTES = 64 << 10
GZIP_MAGIC = b"\x1f\x8b"
GZIP_LEVEL = 1  # the views are made while a reviewer waits; level 1 is within 10% of the best size for CT
GRID_CACHE_SIZE = 64
DESCRIPTION = b"spleen-seg review view"


def drawing_limit_bytes(grid: ViewGrid) -> int:
    """The most bytes a saved drawing of ``grid`` may take (compressed or inflated): header + 1 byte a voxel."""
    return NIFTI_HEADER_BYTES + DRAWING_SLACK_BYTES + int(np.prod(grid.shape))


def _view_image(array: np.ndarray, grid: ViewGrid, dtype: type) -> nib.Nifti1Image:
    image = nib.Nifti1Image(np.asarray(array, dtype=dtype), grid.affine)
    image.set_sform(grid.affine, code=1)
    image.set_qform(grid.affine, code=1)
    image.header.set_slope_inter(1.0, 0.0)
    image.header["descrip"] = DESCRIPTION
    image.header["cal_min"], image.header["cal_max"] = WINDOW_HU
    return image


def nifti_gz_bytes(array: np.ndarray, grid: ViewGrid, dtype: type) -> bytes:
    return gzip.compress(_view_image(array, grid, dtype).to_bytes(), compresslevel=GZIP_LEVEL)


class CaseViews:
    """The views of the cases of one output folder; ``max_voxels`` bounds a view (``viewgrid``)."""

    def __init__(self, max_voxels: int) -> None:
        self.max_voxels = max_voxels
        self._grids: OrderedDict[tuple[str, str], tuple[ViewGrid, Geometry]] = OrderedDict()
        self._grid_lock = threading.Lock()
        # One CT read at a time: a 512 x 512 x 300 case is 300 MB of float32 while it is reduced.
        self._build_lock = threading.Lock()

    def grid(self, entry: CaseEntry, view: str) -> tuple[ViewGrid, Geometry]:
        """The view grid of a case (planned from the model's mask, which never changes) and the mask's geometry."""
        if view not in VIEWS:
            raise ReviewRefused(404, f"view {view!r} is not one of {', '.join(VIEWS)}")
        key = (entry.case, view)
        with self._grid_lock:
            if key in self._grids:
                self._grids.move_to_end(key)
                return self._grids[key]
        from spleen_seg.batch.case import MASK_FILENAME

        path = case_file(entry, MASK_FILENAME)
        if path is None:
            raise ReviewRefused(404, f"{entry.case}: {MASK_FILENAME} is missing from its folder")
        geometry = read_geometry(path)
        mask = read_mask(path, geometry.shape)
        planned = (plan_view(mask, geometry.affine_ras, view, self.max_voxels), geometry)
        with self._grid_lock:
            self._grids[key] = planned
            while len(self._grids) > GRID_CACHE_SIZE:
                self._grids.popitem(last=False)
        return planned

    def ct_file(self, entry: CaseEntry, report: CaseReport, view: str) -> Path:
        """The CT of the view as a .nii.gz in the case folder, made (once) when missing or stale."""
        grid, geometry = self.grid(entry, view)
        folder = case_folder(entry)
        if folder is None:
            raise ReviewRefused(404, f"{entry.case}: its folder is missing or is not a real folder")
        dest = folder / VIEW_CT_FILENAME.format(view=view)
        with self._build_lock:
            if _matches(dest, grid):
                return dest
            from spleen_seg.review.source import read_case_source

            try:
                source = read_case_source(entry, report, geometry)
            except SpleenSegError as err:
                raise ReviewRefused(409, str(err)) from None
            image = _view_image(view_image(source.image_hu, grid), grid, np.int16)
            del source
            durable_write(dest, lambda tmp: nib.save(image, str(tmp)))
        return dest

    def mask_bytes(self, entry: CaseEntry, mask_path: Path, view: str) -> bytes:
        """``mask_path`` (the model's mask or the correction) on the view, as .nii.gz bytes."""
        grid, geometry = self.grid(entry, view)
        mask = read_mask(mask_path, geometry.shape)
        return nifti_gz_bytes(view_mask(mask, grid), grid, np.uint8)


def _matches(path: Path, grid: ViewGrid) -> bool:
    try:
        header = cast(nib.Nifti1Header, nib.load(path).header)
    except (OSError, ValueError, nib.filebasedimages.ImageFileError):
        return False
    return tuple(int(n) for n in header.get_data_shape()) == grid.shape and np.allclose(
        header.get_best_affine(), grid.affine, atol=AFFINE_TOLERANCE_MM)


def inflate(body: bytes, limit: int) -> bytes:
    """``body`` itself, or inflated when it is gzip; refused (413) beyond ``limit`` bytes without inflating further."""
    if not body.startswith(GZIP_MAGIC):
        return body
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
    try:
        raw = inflater.decompress(body, limit + 1)
    except zlib.error as err:
        raise ReviewRefused(400, f"the drawing is not valid gzip ({err})") from None
    if len(raw) > limit or inflater.unconsumed_tail:
        raise ReviewRefused(413, f"the drawing inflates to more than {limit} bytes, more than a mask of this view")
    if not inflater.eof:
        raise ReviewRefused(400, "the drawing's gzip stream is cut short")
    return raw


def read_drawing(body: bytes, grid: ViewGrid) -> np.ndarray:
    """The drawing an upload holds, checked against the view: (X, Y, Z) uint8 0/1 in RAS+ order, or ReviewRefused."""
    raw = inflate(body, drawing_limit_bytes(grid))
    try:
        image = nib.Nifti1Image.from_bytes(raw)
        shape = tuple(int(n) for n in image.header.get_data_shape())
        dtype = image.header.get_data_dtype()
        affine = image.header.get_best_affine()
    except (ValueError, TypeError, nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError) as err:
        raise ReviewRefused(400, f"the drawing is not a NIfTI-1 image ({err})") from None
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if shape != grid.shape:
        raise ReviewRefused(422, f"the drawing has shape {shape}, the case's view {grid.shape}")
    if dtype != np.uint8:
        raise ReviewRefused(422, f"the drawing's voxels are {dtype}, expected uint8 (0 and 1)")
    if not np.allclose(affine, grid.affine, atol=AFFINE_TOLERANCE_MM):
        raise ReviewRefused(422, "the drawing's affine (sform/qform) differs from the case's view: it was drawn on "
                                 "another image")
    if len(raw) < int(image.header["vox_offset"]) + int(np.prod(shape)):
        raise ReviewRefused(400, "the drawing's voxel data is cut short")
    data = np.asarray(image.dataobj, dtype=np.uint8).reshape(shape)
    if int(data.max(initial=0)) > 1:
        raise ReviewRefused(422, f"the drawing holds the value {int(data.max())}; a mask holds only 0 and 1")
    return data
