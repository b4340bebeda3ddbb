"""Whether the tests run under CI (``CI`` set to true, 1 or yes, in any case), and what that changes.

Under CI a test that would skip because something it needs is missing (the ``../shared``
data, a Debian program, the Ray extra) fails instead: CI installs all of them (``.ci/run``),
so a skip there can only hide a broken setup. Every test that reads ``CI`` asks here.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

CI_VALUES = frozenset({"true", "1", "yes"})


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in CI_VALUES


def skip_or_fail(message: str, *, module_level: bool = False) -> None:
    """Skip with ``message``; under CI fail with it (a missing requirement is a broken CI setup).
    ``module_level``: called while a test module is collected (it skips, or fails, the whole module)."""
    if in_ci():
        pytest.fail(f"{message}; CI=true needs it", pytrace=False)
    pytest.skip(message, allow_module_level=module_level)


def import_or_skip(name: str, reason: str) -> ModuleType:
    """``pytest.importorskip`` that fails under CI; at module level it skips or fails the whole module.
    Only a module that is not installed skips: one that fails while importing is an error, as for pytest."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError:
        skip_or_fail(reason, module_level=True)
        raise  # not reached: skip_or_fail raises
