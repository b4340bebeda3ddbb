"""Shared fixtures: paths to the shared real CT data (skipped with a reason when absent,
except under ``CI=true``, where a missing ``../shared`` fails the tests that need it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from ci import in_ci
from shared_data import REAL_CT, REAL_CT_MASK, SHARED, YARDSTICK

# CI must run the real-CT tests: there a missing shared folder is an error, not a skip.
IN_CI = in_ci()

# Two CPU cores: more threads than cores only adds contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True, scope="session")
def _model_cache(tmp_path_factory):
    """Exported models (ONNX, OpenVINO) go to a session folder, not the user's cache."""
    os.environ.setdefault("SPLEEN_SEG_CACHE", str(tmp_path_factory.mktemp("model_cache")))


def _missing_shared_message(path: Path) -> str:
    return f"shared test data not found: {path} (only present beside the project checkout)"


def _require(path: Path) -> Path:
    if not path.exists():
        if IN_CI:
            pytest.fail(f"{_missing_shared_message(path)}; CI=true needs it (set SPLEEN_SEG_SHARED)", pytrace=False)
        pytest.skip(_missing_shared_message(path))
    return path


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true, a test that skips because something under the shared folder is missing
    fails instead (the tests that check for shared files themselves, not through _require)."""
    report = yield
    if IN_CI and report.skipped and call.excinfo is not None:
        reason = str(call.excinfo.value)
        if str(SHARED) in reason:
            report.outcome = "failed"
            report.longrepr = f"{reason}; CI=true needs it (set SPLEEN_SEG_SHARED)"
    return report


@pytest.fixture(scope="session")
def real_ct() -> Path:
    return _require(REAL_CT)


@pytest.fixture(scope="session")
def real_ct_mask() -> Path:
    return _require(REAL_CT_MASK)


@pytest.fixture(scope="session")
def yardstick() -> Path:
    return _require(YARDSTICK)
