"""Shared fixtures: paths to the shared real CT data (skipped with a reason when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from shared_data import REAL_CT, REAL_CT_MASK, YARDSTICK

# Two CPU cores: more threads than cores only adds contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True, scope="session")
def _model_cache(tmp_path_factory):
    """Exported models (ONNX, OpenVINO) go to a session folder, not the user's cache."""
    os.environ.setdefault("SPLEEN_SEG_CACHE", str(tmp_path_factory.mktemp("model_cache")))


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared test data not found: {path} (only present beside the project checkout)")
    return path


@pytest.fixture(scope="session")
def real_ct() -> Path:
    return _require(REAL_CT)


@pytest.fixture(scope="session")
def real_ct_mask() -> Path:
    return _require(REAL_CT_MASK)


@pytest.fixture(scope="session")
def yardstick() -> Path:
    return _require(YARDSTICK)
