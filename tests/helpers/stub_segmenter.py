"""A stand-in for ``pipeline.segmenter.Segmenter`` in batch and node tests: spleen = voxels above a threshold.

It has the segmenter's three stages (``prepare``, ``compute_margin``, ``invert``) and
``predict``, on the input grid (no resampling), so a test knows the mask exactly.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from spleen_seg.pipeline.segmenter import PreparedImage


class ThresholdSegmenter:
    """Spleen = voxels above ``threshold_hu``; ``calls`` lists the inputs it prepared, in order."""

    runner = SimpleNamespace(backend="threshold")

    def __init__(self, threshold_hu: float = 100.0) -> None:
        self.threshold_hu = threshold_hu
        self.calls: list[str] = []
        self.last_warnings: list[str] = []

    def prepare(self, array, geometry, source=""):
        self.calls.append(Path(source).name)
        return PreparedImage(image=np.asarray(array, dtype=np.float32) - self.threshold_hu, grid_affine=np.eye(4),
                             reorientation=None, geometry=geometry)  # type: ignore[arg-type]

    def compute_margin(self, prepared):
        prepared.margin, prepared.image = prepared.image, None
        return prepared

    def invert(self, prepared):
        return (prepared.margin > 0).astype(np.uint8)

    def predict(self, array, geometry, source=""):
        return self.invert(self.compute_margin(self.prepare(array, geometry, source)))
