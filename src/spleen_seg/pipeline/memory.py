"""How much memory a case needs, how much is free, and the guards built on the two.

``estimate_case_memory`` adds up what the pipeline allocates for one input of V bytes
(N voxels as float32) whose preprocessed (1.5 x 1.5 x 2 mm) grid has G voxels (Gp once
padded to the window), stage by stage, beyond the process's own memory (Python, the
libraries and the network runtime, paid once per process). The volume stays in memory
from its read to the outputs, so every stage holds V and adds:

* read: one slab of the file's voxels, raw and scaled (``nifti.READ_SLAB_BYTES``);
* resample: at the worst 1D pass (``resample.pass_order``), its input (the previous
  pass's output), its output and the two gathered neighbour arrays of one chunk;
* windows: the windowed image (4G), its zero-padded copy where an axis is shorter than
  the window, the window sum (4Gp), the counts and the focus's three masks (voxels a
  window called spleen, the region, its growth: 1Gp each) and the window batches (in,
  out and copies);
* inversion: the margin (4Gp), its sign (1Gp), its tanh in the spleen's box (two 4-byte
  arrays), the mask (N bytes) and one slab of interpolated values;
* outputs: the mask, the components' labels and a bool copy in the spleen's box, and
  the preview figure.

The spleen's box is taken as at most ``SPLEEN_BOX_MM`` along each axis; a network output
spread wider than that needs up to 6 more bytes per voxel of its box. The windowed image
is released before the inversion, and the mask is written into its final array.
``benchmarks/bench_memory.py --table`` measures the peak RSS of whole cases against it.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spleen_seg.config import RECIPE, SIZE_EXAMPLES, Recipe, parse_byte_size
from spleen_seg.errors import ConfigError, ResourceError, format_bytes
from spleen_seg.io.nifti import READ_SLAB_BYTES
from spleen_seg.pipeline.resample import RESAMPLE_CHUNK_BYTES, Reorientation, pass_order, spacing_grid

FLOAT32_BYTES = 4
# The raw slab (up to 8 bytes a voxel) or nibabel's scaled copy, per float32 slab byte.
READ_TEMPORARY_FACTOR = 2
SPLEEN_BOX_MM = 250.0
# Grid-sized bool masks of the focused windows (windows.py): seen, region, the region's growth.
FOCUS_MASKS = 3
# Labels (int32) and a bool copy of the spleen's box, per box voxel.
COMPONENT_BYTES_PER_VOXEL = 5
PREVIEW_BYTES = 32 << 20
# Left free beyond the estimate: allocator fragmentation, the page cache the reads need.
HEADROOM_BYTES = 256 << 20
# cgroup v1 reports "no limit" as a number near 2**63.
CGROUP_NO_LIMIT = 1 << 60
CGROUP_ROOT = Path("/sys/fs/cgroup")
# A limit on this process's memory where no cgroup sets one (a shared machine, a scheduler
# that does not enforce its memory request): bytes, or with a binary suffix K, M, G or T.
MEMORY_LIMIT_ENV = "SPLEEN_SEG_MEMORY_LIMIT"


@dataclass(frozen=True)
class CaseMemory:
    """Bytes one case needs beyond the process's baseline (see the module docstring)."""

    read_bytes: int  # held once the volume is read (the float32 volume)
    peak_bytes: int  # the whole case's peak
    peak_stage: str
    stages: dict[str, int]
    grid_shape: tuple[int, ...]

    @property
    def after_read_bytes(self) -> int:
        """What the case still allocates once its volume is in memory."""
        return max(self.peak_bytes - self.read_bytes, 0)


def _affine(spacing_or_affine: Sequence[float] | np.ndarray) -> np.ndarray:
    values = np.asarray(spacing_or_affine, dtype=np.float64)
    return values if values.shape == (4, 4) else np.diag([*values.tolist(), 1.0])


def read_peak_bytes(shape: Sequence[int]) -> int:
    """Peak bytes of ``read_volume`` for ``shape`` voxels: the float32 volume and one slab's temporaries."""
    volume = FLOAT32_BYTES * math.prod(shape)
    return volume + READ_TEMPORARY_FACTOR * min(READ_SLAB_BYTES, volume)


def _resample_bytes(ras_shape: Sequence[int], grid_shape: Sequence[int]) -> int:
    """The worst pass of ``resample_linear``: its input, output and one chunk's two gathers."""
    worst, previous, current = 0, 0, list(ras_shape)
    for axis in pass_order(tuple(ras_shape), tuple(grid_shape)):
        current[axis] = grid_shape[axis]
        size = FLOAT32_BYTES * math.prod(current)
        worst = max(worst, previous + size + 2 * min(RESAMPLE_CHUNK_BYTES, size))
        previous = size
    return worst


def estimate_case_memory(shape: Sequence[int], spacing_or_affine: Sequence[float] | np.ndarray,
                         recipe: Recipe = RECIPE) -> CaseMemory:
    """Estimate the memory of one case of ``shape`` (X, Y, Z) voxels.

    ``spacing_or_affine``: the voxel-to-RAS affine (4 x 4), or the voxel spacing in mm
    of an RAS-ordered volume. Pure arithmetic: nothing the size of the volume is allocated.
    """
    affine = _affine(spacing_or_affine)
    reorientation = Reorientation.for_affine(affine, tuple(shape), recipe.preprocessing.axcodes)
    ras_shape = reorientation.ras_shape
    grid_shape, _ = spacing_grid(ras_shape, reorientation.affine(affine), recipe.preprocessing.spacing_mm)
    roi = recipe.inference.roi_size
    voxels, grid = math.prod(shape), math.prod(grid_shape)
    padded = math.prod(max(n, r) for n, r in zip(grid_shape, roi, strict=True))
    volume = FLOAT32_BYTES * voxels
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    box = math.prod(min(n, math.ceil(SPLEEN_BOX_MM / s)) for n, s in zip(shape, spacing, strict=True))
    grid_box = min(padded, math.prod(math.ceil(SPLEEN_BOX_MM / s) for s in recipe.preprocessing.spacing_mm))
    # The stacked batch, the network's output, and their copies on the way (measured).
    batches = 4 * recipe.inference.sw_batch_size * math.prod(roi) * FLOAT32_BYTES
    stages = {
        "read": read_peak_bytes(shape),
        "resample": volume + _resample_bytes(ras_shape, grid_shape),
        "windows": volume + FLOAT32_BYTES * grid + (FLOAT32_BYTES * padded if padded > grid else 0)
        + (FLOAT32_BYTES + 1 + FOCUS_MASKS) * padded + batches,
        "inversion": volume + (FLOAT32_BYTES + 1) * padded + 2 * FLOAT32_BYTES * grid_box + voxels
        + 3 * min(RESAMPLE_CHUNK_BYTES, FLOAT32_BYTES * box),
        "outputs": volume + voxels + COMPONENT_BYTES_PER_VOXEL * box + PREVIEW_BYTES,
    }
    stage = max(stages, key=lambda name: stages[name])
    return CaseMemory(read_bytes=volume, peak_bytes=stages[stage], peak_stage=stage, stages=stages,
                      grid_shape=tuple(grid_shape))


def estimate_case_peak_bytes(shape: Sequence[int], spacing_or_affine: Sequence[float] | np.ndarray) -> int:
    """Peak bytes one case of ``shape`` voxels needs beyond the process's baseline."""
    return estimate_case_memory(shape, spacing_or_affine).peak_bytes


def _cgroup_folders() -> list[Path]:
    """This process's cgroup folders (v2 and v1 memory controller), innermost first."""
    folders: list[Path] = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return folders
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        relative = path.lstrip("/")
        if hierarchy == "0" and controllers == "":
            folders += [CGROUP_ROOT / relative, CGROUP_ROOT]
        elif "memory" in controllers.split(","):
            folders += [CGROUP_ROOT / "memory" / relative, CGROUP_ROOT / "memory"]
    return folders


def _read_number(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_free_bytes() -> int | None:
    """Free memory under this process's cgroup limit (v1 or v2), or None without a limit.

    psutil reports the machine's memory; in a container the cgroup's limit is what the
    kernel's OOM killer enforces, so it is read here (no library reads it). Reclaimable
    page cache (inactive file pages) counts as free, as the kernel would reclaim it.
    """
    for folder in _cgroup_folders():
        limit = _read_number(folder / "memory.max") or _read_number(folder / "memory.limit_in_bytes")
        usage = _read_number(folder / "memory.current") or _read_number(folder / "memory.usage_in_bytes")
        if limit is None or usage is None or limit >= CGROUP_NO_LIMIT:
            continue
        try:
            stat = (folder / "memory.stat").read_text()
        except OSError:
            stat = ""
        found = re.search(r"^(?:total_)?inactive_file (\d+)$", stat, flags=re.MULTILINE)
        return max(limit - usage + (int(found.group(1)) if found else 0), 0)
    return None


def memory_limit_bytes() -> int | None:
    """The limit ``SPLEEN_SEG_MEMORY_LIMIT`` sets on this process's memory (bytes), None when unset.

    Raises ``ConfigError`` for a value that is not a size (``config.parse_byte_size``: 8G, 512MB, bytes).
    """
    text = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
    if not text:
        return None
    limit = parse_byte_size(text)
    if limit is None:
        raise ConfigError(f"{MEMORY_LIMIT_ENV}={text!r}: expected a memory size in {SIZE_EXAMPLES}")
    return limit


def available_bytes() -> int:
    """Memory this process can still allocate: the machine's available memory (psutil),
    or less where a cgroup limit (a container's) or ``SPLEEN_SEG_MEMORY_LIMIT`` (less this
    process's resident memory) leaves less. Every memory guard reads free memory here."""
    import psutil

    free = int(psutil.virtual_memory().available)
    limited = _cgroup_free_bytes()
    if limited is not None:
        free = min(free, limited)
    limit = memory_limit_bytes()
    if limit is not None:
        free = min(free, max(limit - int(psutil.Process().memory_info().rss), 0))
    return free


def require_case_memory(shape: Sequence[int], spacing_or_affine: Sequence[float] | np.ndarray, source: str | Path,
                        *, volume_loaded: bool = True) -> CaseMemory:
    """Raise ``ResourceError`` unless the case fits in the memory that is free now.

    ``volume_loaded``: the float32 volume is already in memory (so counted as used, not
    needed). Returns the estimate when the case fits.
    """
    memory = estimate_case_memory(shape, spacing_or_affine)
    needed = memory.after_read_bytes if volume_loaded else memory.peak_bytes
    free = available_bytes()
    if needed + HEADROOM_BYTES > free:
        dims = "x".join(str(n) for n in shape)
        grid = "x".join(str(n) for n in memory.grid_shape)
        raise ResourceError(f"{source}: needs ~{format_bytes(needed + HEADROOM_BYTES)} of memory (its {dims} voxels, "
                            f"{grid} after resampling, peak at {memory.peak_stage}), {format_bytes(free)} free: "
                            "free memory or run it on a larger machine")
    return memory


def can_prefetch(next_shape: Sequence[int], running: CaseMemory | None = None) -> bool:
    """Whether the next case (``next_shape`` voxels) can be read while the running case computes.

    ``running``: the estimate of the case now in memory (its volume read), whose
    remaining allocations must still fit beside the read; None when nothing runs.
    """
    reading = read_peak_bytes(next_shape)
    still_needed = running.after_read_bytes if running is not None else 0
    return reading + still_needed + HEADROOM_BYTES <= available_bytes()
