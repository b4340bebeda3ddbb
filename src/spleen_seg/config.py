"""The one source of truth for hyper-parameters: the recipe as frozen dataclasses.

Every value of the recipe (network definition, voxel spacing, HU window, ROI size,
overlap, optimiser, loss, split) is defined once, below. The MONAI bundle JSON in
``configs/`` is generated from it by ``spleen_seg.training.bundle``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class NetworkConfig:
    """MONAI ``UNet`` arguments of the reference bundle (residual 3D UNet)."""

    spatial_dims: int = 3
    in_channels: int = 1
    out_channels: int = 2
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    strides: tuple[int, ...] = (2, 2, 2, 2)
    num_res_units: int = 2
    norm: str = "batch"

    def kwargs(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        d["strides"] = list(self.strides)
        return d


@dataclass(frozen=True)
class PreprocessingConfig:
    """Geometry and intensity normalisation shared by training and inference."""

    axcodes: str = "RAS"
    spacing_mm: tuple[float, float, float] = (1.5, 1.5, 2.0)
    # Soft-tissue window: HU below/above are clipped, then scaled linearly to 0..1.
    hu_window: tuple[float, float] = (-57.0, 164.0)


@dataclass(frozen=True)
class InferenceConfig:
    """Sliding-window inference, as in the reference bundle."""

    roi_size: tuple[int, int, int] = (96, 96, 96)
    overlap: float = 0.5
    sw_batch_size: int = 4
    # spleen-seg's own inference (not the bundle's) computes only the windows within this
    # many voxels of a voxel some computed window calls spleen (pipeline/windows.py).
    focus_radius: int | None = 8
    # The survey sees every voxel at least this many voxels inside one of its windows, so
    # an object near a window edge is also seen whole (at most half the overlap, 24).
    survey_margin: int = 8


@dataclass(frozen=True)
class TrainingConfig:
    """Training recipe of the reference bundle (spleen_ct_segmentation v0.5.x)."""

    learning_rate: float = 0.002
    max_epochs: int = 600
    val_interval: int = 5
    batch_size: int = 2
    num_samples: int = 4  # RandCropByPosNegLabeld patches per volume
    pos_neg: tuple[int, int] = (1, 1)
    intensity_shift: float = 0.1
    intensity_shift_prob: float = 0.5
    val_count: int = 9  # the last 9 labelled cases validate, as in the bundle
    seed: int = 123
    num_workers: int = 4
    cache_rate: float = 1.0


@dataclass(frozen=True)
class Recipe:
    network: NetworkConfig = field(default_factory=NetworkConfig)
    preprocessing: PreprocessingConfig = field(default_factory=PreprocessingConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)


RECIPE = Recipe()


@dataclass(frozen=True)
class TrainingRun:
    """A training run's own choices, not hyper-parameters: where it starts and how it reads its data.

    Kept apart from ``Recipe``, whose digest identifies segmentation outputs (batch/resume.py):
    what a training run starts from does not change how a mask is computed.
    """

    # Continue from the run's last every-epoch checkpoint (training/train.py attach_resume).
    resume: bool = False
    # Correct the MSD Task09 headers (voxels LPS, headers RAS; model-zoo #766) so that the
    # weights learn true anatomy; false, as the reference: MSD-convention weights.
    fix_msd_orientation: bool = False
    # Weights to start from (state dict or checkpoint: fine-tuning); None, as the reference,
    # starts from random weights. Given, the first validation runs before the first update,
    # so models/model.pt is never worse on the validation cases than these weights.
    init_weights: str | None = None


TRAINING_RUN = TrainingRun()

# spleen-seg compare flags a spleen volume growth above this many percent (outputs/compare.py).
GROWTH_THRESHOLD_PERCENT = 10.0

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")

# Byte sizes in flags and environment variables (--spool-quota, --max-instance-size,
# SPLEEN_SEG_MEMORY_LIMIT): one grammar, so that "8G" or "512MB" means the same everywhere.
# A bare letter (8G, as docker and ulimit write it) and KiB/MiB/GiB/TiB are binary; KB/MB/GB/TB
# are decimal, as format_bytes prints them.
SIZE_FORMAT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?|[KMGT]i?B|B)\s*$", flags=re.IGNORECASE)
SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
              "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
SIZE_EXAMPLES = "bytes, or with a unit: 8G or 8GiB (binary), 512MB (decimal)"


def parse_byte_size(text: str) -> int | None:
    """``8G``/``8GiB`` -> 8 * 2**30, ``512MB`` -> 512 * 10**6, ``4096`` -> 4096; None when not a size."""
    found = SIZE_FORMAT.match(text)
    if found is None:
        return None
    return int(float(found.group(1)) * SIZE_UNITS[found.group(2).lower()])
