"""Segment CT volumes: the reference bundle's inference pipeline as a library call.

Preprocessing is the bundle's own chain (``transforms.inference_preprocessing``),
the network runs by sliding window (96^3, overlap 0.5), and the prediction is
inverted to the input grid with MONAI's ``Invertd``. Two exact savings over the
bundle: only the spleen-minus-background probability margin ``p1 - p0`` is
inverted (interpolation is linear, so ``invert(p1) - invert(p0) == invert(p1 - p0)``
and ``argmax`` over two channels is ``margin > 0``), which halves the inversion work.
"""

from __future__ import annotations

import json
import logging
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from spleen_seg import __version__
from spleen_seg.config import RECIPE, Recipe
from spleen_seg.errors import InputImageError, SpleenSegError
from spleen_seg.io.atomic import atomic_write_text
from spleen_seg.io.nifti import Geometry, case_id, is_nifti, read_volume, write_mask

logger = logging.getLogger(__name__)
MASK_FILENAME = "spleen.nii.gz"
RUN_INFO_FILENAME = "run_info.json"


def collect_inputs(inputs: list[str | Path]) -> list[Path]:
    """Expand folders into the NIfTI files they hold (sorted); keep files as given.

    Missing paths are kept so that the batch reports them as failures one by one.
    """
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files = sorted(p for p in item.iterdir() if p.is_file() and is_nifti(p) and not p.name.startswith("."))
            if not files:
                raise InputImageError(f"{item}: folder holds no .nii or .nii.gz files")
            found.extend(files)
        else:
            found.append(item)
    return found


def to_metatensor(array: np.ndarray, geometry: Geometry, source: str | Path):
    """(X, Y, Z) float32 array -> channel-first MetaTensor as MONAI's LoadImaged+EnsureChannelFirstd give."""
    from monai.data import MetaTensor

    affine = torch.as_tensor(geometry.affine_ras, dtype=torch.float64)
    meta = {
        "filename_or_obj": str(source),
        "original_affine": affine.clone(),
        "spatial_shape": np.asarray(geometry.shape),
        "original_channel_dim": "no_channel",
        "space": "RAS",
    }
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(array)), affine=affine, meta=meta)


@dataclass
class Segmenter:
    """A loaded network plus the recipe's preprocessing and sliding-window settings."""

    network: torch.nn.Module
    device: torch.device
    recipe: Recipe = RECIPE
    progress: bool = True
    # Weights trained on MSD Task09 as shipped learned mirrored anatomy: its voxels are
    # stored LPS while the headers claim RAS (model-zoo issue #766). For such weights the
    # RAS-oriented input is mirrored left-right and front-back before the network, and
    # the prediction mirrored back, so the network sees anatomy as it did in training.
    mirror_xy: bool = False
    _preprocess: object = field(init=False, repr=False)

    def __post_init__(self) -> None:
        from spleen_seg.transforms import inference_preprocessing

        self._preprocess = inference_preprocessing(self.recipe.preprocessing, with_loader=False)

    def _spleen_margin(self, image) -> torch.Tensor:
        """Network probability margin ``p(spleen) - p(background)`` on the preprocessed grid."""
        from monai.inferers import sliding_window_inference

        inf = self.recipe.inference
        batch = image.as_tensor()[None].to(self.device)
        if self.mirror_xy:
            batch = torch.flip(batch, dims=(2, 3))
        with torch.inference_mode():
            logits = sliding_window_inference(
                batch,
                roi_size=inf.roi_size,
                sw_batch_size=inf.sw_batch_size,
                predictor=self.network,
                overlap=inf.overlap,
                progress=self.progress,
            )
            if self.mirror_xy:
                logits = torch.flip(logits, dims=(2, 3))
            probs = torch.softmax(logits[0].float(), dim=0)
            return (probs[1:2] - probs[0:1]).cpu()

    def predict(self, array: np.ndarray, geometry: Geometry, source: str | Path = "") -> np.ndarray:
        """Segment one volume. ``array``: (X, Y, Z) HU in file voxel order.

        Returns a uint8 mask of shape (X, Y, Z) on the input grid, 1 = spleen.
        """
        from monai.data import MetaTensor
        from monai.transforms import Invertd

        data = self._preprocess({"image": to_metatensor(array, geometry, source)})
        image = data["image"]
        margin = MetaTensor(self._spleen_margin(image), affine=image.affine, meta=image.meta)
        invert = Invertd(keys="pred", transform=self._preprocess, orig_keys="image", nearest_interp=False)
        restored = invert({"image": image, "pred": margin})["pred"]
        mask = (torch.as_tensor(restored)[0] > 0).numpy().astype(np.uint8)
        if mask.shape != geometry.shape:
            raise RuntimeError(f"inverted mask shape {mask.shape} differs from input {geometry.shape}")
        return mask


@dataclass
class CaseResult:
    source: Path
    output: Path | None = None
    error: str | None = None
    spleen_ml: float = 0.0
    seconds: float = 0.0


def write_run_info(out_dir: Path, weights: Path, device: torch.device, inputs: list[Path]) -> None:
    """Record how the outputs were made: versions, weights checksum, recipe, inputs."""
    from dataclasses import asdict

    import monai

    from spleen_seg.network import file_sha256

    info = {
        "spleen_seg_version": __version__,
        "monai_version": monai.__version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "command": sys.argv,
        "weights": str(weights),
        "weights_sha256": file_sha256(weights),
        "device": str(device),
        "recipe": asdict(RECIPE),
        "inputs": [str(p) for p in inputs],
    }
    atomic_write_text(out_dir / RUN_INFO_FILENAME, json.dumps(info, indent=2, default=str) + "\n")


def segment_one(segmenter: Segmenter, source: Path, out_dir: Path) -> CaseResult:
    """Read, segment and write one input; user errors become ``CaseResult.error``."""
    start = time.perf_counter()
    try:
        array, geometry = read_volume(source)
        mask = segmenter.predict(array, geometry, source)
        dest = write_mask(mask, geometry, out_dir / case_id(source) / MASK_FILENAME)
    except SpleenSegError as err:
        return CaseResult(source=source, error=str(err))
    volume_ml = float(mask.sum()) * geometry.voxel_volume_ml
    return CaseResult(source=source, output=dest, spleen_ml=volume_ml, seconds=time.perf_counter() - start)


def segment_files(
    inputs: list[Path], out_dir: Path, weights: Path, device: torch.device, *, progress: bool = True
) -> list[CaseResult]:
    """Segment every input into ``out_dir/<case>/spleen.nii.gz``; failures do not stop the batch."""
    from spleen_seg.network import load_network

    network = load_network(weights, device)
    segmenter = Segmenter(network=network, device=device, progress=progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_run_info(out_dir, weights, device, inputs)
    results = []
    for index, source in enumerate(inputs, start=1):
        logger.info("[%d/%d] %s", index, len(inputs), source)
        results.append(segment_one(segmenter, source, out_dir))
    return results
