"""A threshold in place of the network for batch tests: ``load_segmenter`` is replaced, so a batch
checks its bookkeeping (resume, parts, summaries) in well under a second, and sphere inputs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
from stub_segmenter import ThresholdSegmenter

SPLEEN_HU = 150.0
THRESHOLD_HU = 100.0


def install_threshold_network(monkeypatch, fake: ThresholdSegmenter | None = None) -> ThresholdSegmenter:
    """Make every batch in this test load ``fake`` (a new ThresholdSegmenter by default) as its network."""
    import spleen_seg.pipeline.segmenter as segmenter_module

    fake = fake or ThresholdSegmenter(THRESHOLD_HU)
    fake.loads = 0  # type: ignore[attr-defined]  # how often a batch loaded it

    def load(*args, **kwargs):
        fake.loads += 1
        return fake

    monkeypatch.setattr(segmenter_module, "load_segmenter", load)
    return fake


def sphere(path: Path, radius_vox: float, shape=(24, 22, 16)) -> Path:
    """A NIfTI of a ``SPLEEN_HU`` ball of ``radius_vox`` voxels in -100 HU, 1.5 x 1.5 x 2 mm voxels."""
    grid = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij"))
    image = np.where((grid**2).sum(0) <= radius_vox**2, SPLEEN_HU, -100.0).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, np.diag([1.5, 1.5, 2.0, 1.0])), str(path))
    return path


def sphere_batch(folder: Path, cases: tuple[str, ...] = ("a", "b", "c")) -> SimpleNamespace:
    """Sphere inputs of radii 4, 5, 6... voxels named after ``cases``, stand-in weights and an output folder."""
    inputs = [sphere(folder / f"{case}.nii.gz", radius) for radius, case in enumerate(cases, start=4)]
    weights = folder / "weights.pt"
    weights.write_bytes(b"stand-in weights")
    return SimpleNamespace(inputs=inputs, weights=weights, out=folder / "out")


def run_batch(batch: SimpleNamespace, **kwargs):
    """``segment_files`` over a :func:`sphere_batch` on the CPU, without previews unless ``options`` says."""
    from spleen_seg.batch.case import SegmentOptions
    from spleen_seg.batch.run import segment_files

    kwargs.setdefault("options", SegmentOptions(preview=False))
    return segment_files(batch.inputs, batch.out, batch.weights, "cpu", progress=False, **kwargs)
