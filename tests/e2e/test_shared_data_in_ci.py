"""Real-CT tests skip where ``../shared`` is absent (a user's clone), and fail under ``CI=true``.

Runs pytest itself on three tests that need the shared folder, each checking for it its own
way (the ``real_ct`` fixture, test_clinical's own check, the DICOM fixture), with
``SPLEEN_SEG_SHARED`` pointing at a folder that does not exist. The same for the Ray cluster
tests without the Ray extra (``ray`` hidden by a package that says it is not installed), with ``CI``
spelled as CI services spell it (``tests/helpers/ci.py``).
"""

from __future__ import annotations

import os
import re
import sys

import pytest

NEEDS_SHARED = [
    "tests/e2e/test_real_ct.py::test_cli_segment_equals_official_pipeline",
    "tests/e2e/test_clinical.py::test_real_ct_passes_anatomical_check",
    "tests/unit/io/test_dicom.py::test_real_series_volume_and_geometry",
]
PYTEST_TIMEOUT_S = 180


def _outcomes(output: str) -> dict[str, int]:
    """pytest's last summary line, e.g. "3 errors in 2.1s" -> {"error": 3}."""
    return {word: int(count) for count, word in re.findall(r"(\d+) (passed|failed|skipped|error)", output)}


def test_missing_shared_folder_skips_locally_and_fails_under_ci(run_command, tail, tmp_path):
    absent = tmp_path / "no_shared_here"
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rEs", *NEEDS_SHARED]
    local = run_command(base, env={"SPLEEN_SEG_SHARED": str(absent), "CI": "false"}, timeout=PYTEST_TIMEOUT_S)
    assert local.returncode == 0, tail(local)
    assert _outcomes(local.stdout.splitlines()[-1]) == {"skipped": 3}, tail(local)

    ci = run_command(base, env={"SPLEEN_SEG_SHARED": str(absent), "CI": "true"}, timeout=PYTEST_TIMEOUT_S)
    assert ci.returncode == 1, tail(ci)
    # Fixtures fail in setup: pytest counts those as errors, which fail the suite.
    assert _outcomes(ci.stdout.splitlines()[-1]) == {"error": 3}, tail(ci)
    failures = [line for line in ci.stdout.splitlines() if line.startswith("ERROR")]
    assert len(failures) == 3 and all("CI=true needs it" in line and str(absent) in line for line in failures), tail(ci)


RAY_TESTS = "tests/e2e/test_ray_cluster.py"


def test_missing_ray_extra_skips_locally_and_fails_under_ci(run_command, tail, tmp_path):
    hidden = tmp_path / "no_ray" / "ray"  # found before the installed ray, and says what a missing one says
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text('raise ModuleNotFoundError("No module named \'ray\'", name="ray")\n')
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rEs", RAY_TESTS]
    env = {"PYTHONPATH": os.pathsep.join([str(hidden.parent), os.environ.get("PYTHONPATH", "")])}
    local = run_command(base, env={**env, "CI": "false"}, timeout=PYTEST_TIMEOUT_S)
    assert local.returncode == pytest.ExitCode.NO_TESTS_COLLECTED, tail(local)  # the module skipped whole
    assert _outcomes(local.stdout.splitlines()[-1]) == {"skipped": 1}, tail(local)

    ci = run_command(base, env={**env, "CI": "Yes"}, timeout=PYTEST_TIMEOUT_S)
    assert ci.returncode == pytest.ExitCode.INTERRUPTED, tail(ci)  # a collection error stops the run
    assert _outcomes(ci.stdout.splitlines()[-1]) == {"error": 1}, tail(ci)
    assert "the Ray extra is not installed" in ci.stdout and "CI=true needs it" in ci.stdout, tail(ci)
