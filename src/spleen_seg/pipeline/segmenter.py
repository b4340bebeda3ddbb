"""The reference bundle's inference pipeline as a library call: one volume in, one mask out.

``Segmenter`` computes what the bundle's ``inference.json`` computes (see its docstring
for the exact savings).
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spleen_seg.config import RECIPE, Recipe
from spleen_seg.io.nifti import Geometry
from spleen_seg.pipeline.backends import Runner, make_runner, resolve_backend
from spleen_seg.pipeline.memory import require_case_memory
from spleen_seg.pipeline.quality import QualityScore, quality_score
from spleen_seg.pipeline.resample import (
    RESAMPLE_CHUNK_BYTES,
    Reorientation,
    index_box,
    pass_order,
    resample_linear,
    spacing_grid,
)
from spleen_seg.pipeline.tta import check_tta_axes, mirrored_margin
from spleen_seg.pipeline.windows import WindowStats, spleen_margin, true_span

logger = logging.getLogger(__name__)

FLAG_CUDA_OOM = "cuda_out_of_memory"
# The inversion interpolates the spleen's box in slabs of at most this many voxels.
INVERT_SLAB_VOXELS = RESAMPLE_CHUNK_BYTES // 4


def is_out_of_memory(err: BaseException) -> bool:
    """A device out-of-memory error: torch's ``OutOfMemoryError``, or a runtime's error
    whose message says so (ONNX Runtime's CUDA provider, TensorRT through torch buffers).
    A host ``MemoryError`` is not one: the CPU would not have more memory."""
    return type(err).__name__ == "OutOfMemoryError" or "out of memory" in str(err).lower()


def _release_device_memory() -> None:
    torch = sys.modules.get("torch")  # only if a CUDA runtime was ever imported
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


class _OutOfMemoryRetry:
    """Runs window batches; on device out of memory halves the batch down to one window,
    then continues with the CPU runner that ``fallback`` builds. ``warn`` records each step."""

    def __init__(self, runner: Runner, fallback: Callable[[], Runner] | None, warn: Callable[[str], None]) -> None:
        self.runner = runner
        self.batch_size = runner.batch_size
        self.fallback = fallback
        self.warn = warn
        self.on_cpu = False

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        outputs = []
        start = 0
        while start < len(batch):
            part = batch[start : start + self.batch_size]
            try:
                outputs.append(self.runner(part))
            except Exception as err:  # runtimes raise their own types; anything but out of memory goes on up
                if self.on_cpu or not is_out_of_memory(err):
                    raise
                self._shrink(err)
                continue
            start += len(part)
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)

    def stream(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """A pipelined runner (only CPU runtimes are: no device memory to run out of) streams
        the batches; any other runs them one at a time with the retries above."""
        if self.runner.pipelined is not None:
            return self.runner.stream(batches)
        return map(self, batches)

    def _shrink(self, err: Exception) -> None:
        _release_device_memory()
        if self.batch_size > 1:
            smaller = max(1, self.batch_size // 2)
            self.warn(f"{FLAG_CUDA_OOM}: sliding-window batch reduced from {self.batch_size} to {smaller} windows "
                      f"after device out of memory")
            self.batch_size = smaller
        elif self.fallback is None:
            raise err
        else:
            self.warn(f"{FLAG_CUDA_OOM}: out of device memory with one window per batch; the remaining windows "
                      "were computed on the CPU (slower)")
            self.runner = self.fallback()
            self.batch_size = self.runner.batch_size
            self.on_cpu = True


@dataclass
class PreparedImage:
    """One volume between the stages of :class:`Segmenter`: preprocessed, then its margin, then its mask.

    ``image``: (X', Y', Z') float32 in [0, 1] on the 1.5 x 1.5 x 2 mm RAS grid (mirrored
    left-right and front-back when the segmenter's ``mirror_xy``), released (None) once
    the network has run. ``margin``: the network's (X', Y', Z') float32 margin on the same
    grid and in the same (possibly mirrored) frame. ``array_device``: where resampling and
    inversion run ("cpu" after device out of memory). ``warnings``: what the stages had to
    change to finish (out of memory), for the case's report. ``quality``: the margin's
    quality score (with TTA, the mirrored predictions' disagreement).
    """

    image: np.ndarray | None
    grid_affine: np.ndarray
    reorientation: Reorientation
    geometry: Geometry
    array_device: str = "cpu"
    warnings: list[str] = field(default_factory=list)
    margin: np.ndarray | None = None
    windows: WindowStats | None = None
    # The network stage's quality score (quality.py), for the case's report.
    quality: QualityScore | None = None


def _no_network(batch: np.ndarray) -> np.ndarray:
    raise RuntimeError("this segmenter only preprocesses and inverts: its network runs elsewhere")


@dataclass
class Segmenter:
    """The bundle's inference on one volume, computed on a numpy fast path.

    Steps, each equal to the bundle's (see ``resample`` and ``windows``): reorient to
    RAS, resample to 1.5 x 1.5 x 2.0 mm (trilinear), window HU -57..164 to 0..1, sliding
    window 96^3 at overlap 0.5, softmax, invert to the input grid (trilinear), argmax.
    Exact savings: the network returns only the margin ``logit1 - logit0`` (argmax over
    two channels is its sign); inversion interpolates ``p1 - p0 = tanh(margin / 2)``
    (linear, so equal to inverting both channels) and only around the predicted spleen;
    windows far from any spleen candidate are skipped (``windows.spleen_margin``).

    ``predict`` runs the three stages in turn; a pipeline runs them separately, for
    different cases at once (``prepare`` and ``invert`` on CPU workers, ``compute_margin``
    where the network is): they keep their per-case state in the :class:`PreparedImage`.
    """

    runner: Runner
    recipe: Recipe = RECIPE
    # Weights trained on MSD Task09 as shipped learned mirrored anatomy: its voxels are
    # stored LPS while the headers claim RAS (model-zoo issue #766). For such weights the
    # RAS-oriented input is mirrored left-right and front-back before the network, and
    # the prediction mirrored back, so the network sees anatomy as it did in training.
    mirror_xy: bool = False
    progress: bool = True
    # None computes every sliding window (MONAI's average everywhere; see windows.py).
    focus_radius: int | None = RECIPE.inference.focus_radius
    # On "cuda..." the resampling, windowing and inversion run on the GPU (torch tensors).
    device: str = "cpu"
    # Builds a CPU runner for when the device runs out of memory even at one window a batch.
    fallback: Callable[[], Runner] | None = None
    # Flip TTA: the margin averaged over mirror images along these axes ("xyz" letters of
    # the RAS grid; "" = none; see tta.py).
    tta_axes: str = ""
    # What TTA over ``tta_axes`` risks with these weights (tta.check_tta_axes), for every case's report.
    tta_warning: str | None = None
    last_windows: WindowStats | None = field(default=None, init=False)
    # The last ``predict``'s quality score (quality.py): unsure margins, with TTA also the flips' disagreement.
    last_quality: QualityScore | None = field(default=None, init=False)
    # What the last ``predict`` had to change to finish (out of memory): for the report.
    last_warnings: list[str] = field(default_factory=list, init=False)

    @classmethod
    def without_network(cls, mirror_xy: bool = False) -> Segmenter:
        """A segmenter for ``prepare`` and ``invert`` only (CPU workers of a pipeline whose network runs elsewhere)."""
        return cls(runner=Runner(_no_network, 1, "none"), mirror_xy=mirror_xy, progress=False)

    def _to_device(self, array: np.ndarray, device: str):
        if not device.startswith("cuda"):
            return array
        import torch

        return torch.from_numpy(np.ascontiguousarray(array)).to(device)

    def preprocess(self, array: np.ndarray, geometry: Geometry,
                   device: str = "cpu") -> tuple[np.ndarray, np.ndarray, Reorientation]:
        """(X, Y, Z) HU -> (windowed image on the 1.5 x 1.5 x 2 mm RAS grid, its affine, reorientation).

        ``device``: where the arrays are computed ("cuda...": torch tensors); the image returned is numpy.
        """
        pre = self.recipe.preprocessing
        reorientation = Reorientation.for_affine(geometry.affine_ras, geometry.shape, pre.axcodes)
        ras = reorientation.apply(self._to_device(array, device))
        ras_affine = reorientation.affine(geometry.affine_ras)
        grid_shape, grid_affine = spacing_grid(tuple(ras.shape), ras_affine, pre.spacing_mm)
        image = resample_linear(ras, ras_affine, grid_affine, grid_shape)
        low, high = pre.hu_window
        image -= low
        image *= 1.0 / (high - low)
        if isinstance(image, np.ndarray):
            np.clip(image, 0.0, 1.0, out=image)
        else:  # the windows are cut on the host: the runner moves each batch to its device
            image = image.clamp_(0.0, 1.0).cpu().numpy()
        return image, grid_affine, reorientation

    def predict(self, array: np.ndarray, geometry: Geometry, source: str | Path = "") -> np.ndarray:
        """Segment one volume. ``array``: (X, Y, Z) HU in file voxel order.

        Returns a uint8 mask of shape (X, Y, Z) on the input grid, 1 = spleen. Raises
        ``ResourceError`` before allocating when the case's estimated memory is not free.
        On CUDA, out of memory shrinks the window batch, then moves to the CPU; each step
        is in ``last_warnings``.
        """
        self.last_warnings = []
        prepared = self.prepare(array, geometry, source)
        self.last_warnings = prepared.warnings
        self.compute_margin(prepared)
        self.last_windows = prepared.windows
        return self.invert(prepared)

    def prepare(self, array: np.ndarray, geometry: Geometry, source: str | Path = "") -> PreparedImage:
        """Stage 1: check the memory, reorient, resample and window ``array`` ((X, Y, Z) HU, file voxel order).

        Raises ``ResourceError`` before allocating when the case's estimated memory is not free.
        """
        require_case_memory(geometry.shape, geometry.affine_ras, source or "input volume")
        warnings: list[str] = []
        array_device, (image, grid_affine, reorientation) = self._arrays_or_cpu(
            self.device, warnings, lambda on: self.preprocess(array, geometry, on))
        if self.mirror_xy:
            image = np.ascontiguousarray(image[::-1, ::-1])
        return PreparedImage(image=image, grid_affine=grid_affine, reorientation=reorientation, geometry=geometry,
                             array_device=array_device, warnings=warnings)

    def compute_margin(self, prepared: PreparedImage) -> PreparedImage:
        """Stage 2, the network: ``prepared.margin`` from ``prepared.image`` (then released). Returns ``prepared``."""
        if prepared.image is None:
            raise ValueError("compute_margin needs the prepared image; it was already released")

        def warn(message: str) -> None:
            logger.warning(message)
            prepared.warnings.append(message)

        inf = self.recipe.inference
        if self.tta_axes and self.tta_warning is not None:
            prepared.warnings.append(self.tta_warning)
        runner = _OutOfMemoryRetry(self.runner, self.fallback, warn)
        prepared.margin, prepared.windows, agreement = mirrored_margin(prepared.image, lambda view: spleen_margin(
            view, runner, inf.roi_size, inf.overlap, self.runner.batch_size, self.focus_radius, self.progress
        ), self.tta_axes)
        # A fraction of the mask's voxels: the same whether or not the grid is mirrored.
        prepared.quality = self.last_quality = quality_score(prepared.margin, agreement)
        prepared.image = None  # the inversion needs only the margin: release the windowed image first
        return prepared

    def invert(self, prepared: PreparedImage) -> np.ndarray:
        """Stage 3: the (X, Y, Z) uint8 mask on the input grid from ``prepared.margin``."""
        margin = prepared.margin
        if margin is None:
            raise ValueError("invert needs the margin: run compute_margin first")
        _, mask = self._arrays_or_cpu(prepared.array_device, prepared.warnings,
                                      lambda on: self._invert(prepared, margin, on))
        return mask

    def _arrays_or_cpu(self, device: str, warnings: list[str], compute: Callable[[str], Any]) -> tuple[str, Any]:
        """``(device, compute(device))``; on device out of memory ``("cpu", compute("cpu"))``, with a warning."""
        try:
            return device, compute(device)
        except Exception as err:  # see _OutOfMemoryRetry: only device out of memory is handled
            if not (device.startswith("cuda") and is_out_of_memory(err)):
                raise
        _release_device_memory()
        message = (f"{FLAG_CUDA_OOM}: out of device memory while resampling or inverting; the case was computed "
                   "again on the CPU (slower)")
        logger.warning(message)
        warnings.append(message)
        return "cpu", compute("cpu")

    def _invert(self, prepared: PreparedImage, margin: np.ndarray, device: str) -> np.ndarray:
        if self.mirror_xy:
            margin = margin[::-1, ::-1]
        geometry, reorientation = prepared.geometry, prepared.reorientation
        ras_affine = reorientation.affine(geometry.affine_ras)
        margin = self._to_device(margin, device)
        if isinstance(margin, np.ndarray):
            # Written through the RAS view into the input-ordered mask: no reoriented copy.
            # Fortran order, as the input is read: nibabel then writes it without a transposing copy (0.03 s, not 0.11).
            mask = np.zeros(geometry.shape, dtype=np.uint8, order="F")
            invert_margin(margin, prepared.grid_affine, reorientation.ras_shape, ras_affine,
                          out=reorientation.apply(mask))
        else:
            mask = np.ascontiguousarray(reorientation.undo(
                invert_margin(margin, prepared.grid_affine, reorientation.ras_shape, ras_affine)).cpu().numpy())
        if mask.shape != geometry.shape:
            raise RuntimeError(f"inverted mask shape {mask.shape} differs from input {geometry.shape}")
        return mask


def _positive_box(margin) -> tuple[list[int], list[int]] | None:
    """(first, last) index per axis of the voxels with a positive margin; None if there are none."""
    if isinstance(margin, np.ndarray):
        return true_span(margin > 0)
    import torch

    found = torch.nonzero(margin > 0)
    if found.shape[0] == 0:
        return None
    return found.min(dim=0).values.tolist(), found.max(dim=0).values.tolist()


def invert_margin(margin, grid_affine: np.ndarray, ras_shape: tuple[int, ...], ras_affine: np.ndarray,
                  out: np.ndarray | None = None):
    """Spleen mask on the RAS input grid from the margin on the preprocessed grid.

    Interpolates ``p1 - p0 = tanh(margin / 2)`` trilinearly (as ``Invertd`` does for the
    two softmax channels) and only inside the box of positive margin: outside it every
    interpolation neighbour is negative, so the mask is 0 there. ``margin`` is a numpy
    array or a torch tensor; the mask (uint8) is of the same kind and device. ``out``: a
    zeroed uint8 numpy array (or view) of ``ras_shape`` to write the mask into.
    """
    mask: Any
    tanh: Any
    if isinstance(margin, np.ndarray):
        mask = np.zeros(ras_shape, dtype=np.uint8) if out is None else out
        tanh = np.tanh
    else:
        import torch

        mask = torch.zeros(ras_shape, dtype=torch.uint8, device=margin.device)
        tanh = torch.tanh
    box = _positive_box(margin)
    if box is None:
        return mask
    src_box = tuple(slice(max(lo - 1, 0), min(hi + 2, n)) for lo, hi, n in zip(*box, margin.shape, strict=True))
    crop_affine = grid_affine.copy()
    crop_affine[:3, 3] = grid_affine[:3, :3] @ [b.start for b in src_box] + grid_affine[:3, 3]
    probs = tanh(margin[src_box] * 0.5)
    dst_box = index_box(ras_affine, grid_affine, src_box, ras_shape, tuple(margin.shape))
    dst_shape = tuple(b.stop - b.start for b in dst_box)
    if min(dst_shape) <= 0:
        return mask
    # Map destination voxels into the crop's index space (border padding as MONAI), in
    # slabs along the axis interpolated first (so each slab's later passes stay slab-sized),
    # with the whole box's pass order: every voxel is computed as in one call.
    order = pass_order(tuple(probs.shape), dst_shape)
    axis = order[0]
    depth = max(1, INVERT_SLAB_VOXELS * dst_shape[axis] // math.prod(dst_shape))
    for first in range(dst_box[axis].start, dst_box[axis].stop, depth):
        slab = tuple(slice(first, min(first + depth, b.stop)) if a == axis else b for a, b in enumerate(dst_box))
        values = resample_linear(probs, crop_affine, ras_affine, tuple(b.stop - b.start for b in slab),
                                 tuple(b.start for b in slab), order=order)
        mask[slab] = values > 0
    return mask


def load_segmenter(weights: Path, device: str, backend: str = "auto", *, mirror_xy: bool = False,
                   progress: bool = True, all_windows: bool = False, precision: str = "fp32",
                   tta_axes: str = "", tta_axes_explicit: bool = True) -> Segmenter:
    """Build the runner for ``weights`` on ``device`` with ``backend`` (see ``backends``).

    ``precision="fp16"``: AMP autocast for torch on CUDA, an fp16 engine for TensorRT.
    ``tta_axes``: flip TTA over these axes; ``tta_axes_explicit=False`` when they are only
    ``--tta``'s default. Checked against the weights' record before any model loads
    (``tta.check_tta_axes``): refused, or run with a warning in every case's report.
    """
    tta_warning = check_tta_axes(weights, tta_axes, explicit=tta_axes_explicit)
    focus = None if all_windows else RECIPE.inference.focus_radius

    def cpu_runner() -> Runner:
        return make_runner(weights, resolve_backend("auto", "cpu"), "cpu")

    return Segmenter(runner=make_runner(weights, backend, device, precision), mirror_xy=mirror_xy, progress=progress,
                     focus_radius=focus, device=device, fallback=cpu_runner if device.startswith("cuda") else None,
                     tta_axes=tta_axes, tta_warning=tta_warning)
