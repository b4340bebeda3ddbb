"""Fixtures of the end-to-end tests: a small phantom dataset in the MSD layout, the demo
weights as an fp32 state dict, and a runner for CLI and bundle commands in fresh processes."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from phantoms import save_nifti, small_phantom

from spleen_seg.pipeline.network import demo_weights_path

REPO = Path(__file__).resolve().parents[2]

DATASET_SEEDS = (1, 2, 3, 4, 5)
# Cases cycle through the orientations so evaluation inverts every kind of reorientation.
DATASET_ORIENTATIONS = ("RAS", "LPS", "LAS")
COMMAND_TIMEOUT_S = 300
OUTPUT_TAIL_CHARS = 6000


@dataclass(frozen=True)
class PhantomDataset:
    """MSD-layout folder ``root`` (imagesTr/, labelsTr/, no dataset.json); read-only for tests."""

    root: Path
    cases: tuple[str, ...]  # file names, sorted as the datalist sorts them

    def validation(self, val_count: int) -> tuple[str, ...]:
        """The bundle validates the last ``val_count`` labelled cases by file name."""
        return self.cases[-val_count:]

    def label(self, case: str) -> Path:
        return self.root / "labelsTr" / case


@pytest.fixture(scope="session")
def phantom_dataset(tmp_path_factory) -> PhantomDataset:
    root = tmp_path_factory.mktemp("Task09_Spleen")
    names = []
    for index, seed in enumerate(DATASET_SEEDS, start=1):
        case = small_phantom(seed, DATASET_ORIENTATIONS[index % len(DATASET_ORIENTATIONS)])
        assert case.spleen_mask.any(), f"phantom seed {seed} has no spleen in view"
        name = f"spleen_{index}.nii.gz"
        save_nifti(case.image_hu.astype(np.int16), case.affine, root / "imagesTr" / name)
        save_nifti(case.spleen_mask.astype(np.uint8), case.affine, root / "labelsTr" / name)
        names.append(name)
    return PhantomDataset(root=root, cases=tuple(sorted(names)))


@pytest.fixture(scope="session")
def demo_fp32_weights(tmp_path_factory) -> Path:
    """The packaged fp16 demo weights as a plain fp32 state dict, like a bundle's models/model.pt."""
    state = torch.load(demo_weights_path(), map_location="cpu", weights_only=True)
    path = tmp_path_factory.mktemp("weights") / "demo_fp32.pt"
    torch.save({k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}, path)
    return path


@pytest.fixture(scope="session")
def run_command(tmp_path_factory) -> Callable[..., subprocess.CompletedProcess]:
    """``run_command(args, env=None, timeout=...)``: run in the repository root, capture text output.

    The commands get their own, initially empty, caches: no test reads or fills the user's
    (official weights, exported networks), so results do not depend on what was run before.
    """
    caches = tmp_path_factory.mktemp("caches")
    isolated = {"SPLEEN_SEG_WEIGHTS": str(caches / "weights"), "SPLEEN_SEG_CACHE": str(caches / "models"),
                "SPLEEN_SEG_DATA": str(caches / "data")}

    def run(args: list[str], *, env: dict[str, str] | None = None, timeout: float = COMMAND_TIMEOUT_S):
        return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **isolated, **(env or {})})

    return run


def output_tail(proc: subprocess.CompletedProcess) -> str:
    """The end of the output without library deprecation warnings (they crowd out errors)."""
    lines = (proc.stdout + "\n" + proc.stderr).splitlines()
    kept = [line for i, line in enumerate(lines)
            if "Warning:" not in line and not (i > 0 and "Warning:" in lines[i - 1] and line.startswith("  "))]
    return "\n".join(kept)[-OUTPUT_TAIL_CHARS:]


@pytest.fixture(scope="session")
def tail() -> Callable[[subprocess.CompletedProcess], str]:
    """The end of a finished command's output, for assertion messages."""
    return output_tail


@pytest.fixture(scope="session")
def write_nifti() -> Callable[[np.ndarray, np.ndarray, Path], Path]:
    return save_nifti


@pytest.fixture(scope="session")
def phantom() -> Callable[[int, str], object]:
    """``phantom(seed, orientation)``: a small phantom of the e2e geometry."""
    return small_phantom
