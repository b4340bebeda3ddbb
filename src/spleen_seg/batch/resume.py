"""Resume: which case folders an earlier run already finished with the same input, weights and options.

A finished case records in its ``report.json`` an *identity*: what its outputs depend on.
A later run skips the case when the folder is complete (``report.json`` and every output
it lists) and the identity it would record is the same.

The identity holds the input's sha256, the weights' sha256 and orientation convention,
the options that change what is written (see :data:`RUNTIME_OPTIONS` for those left out),
the recipe and the spleen-seg version. Device, backend and precision are left out on
purpose: they choose how the same recipe is computed (OpenVINO or torch, CPU or CUDA,
fp32 or AMP), and the masks they give differ only by floating-point rounding at the
spleen's edge. A batch started on one machine and finished on another resumes instead of
recomputing everything; ``--overwrite`` recomputes when that difference matters. Each
report's ``model`` section still records the device and backend that computed it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spleen_seg import __version__
from spleen_seg.batch.inputs import FailedInput, InputItem
from spleen_seg.batch.ownership import complete_report
from spleen_seg.config import RECIPE

if TYPE_CHECKING:
    from spleen_seg.batch.case import SegmentOptions
    from spleen_seg.outputs.report import CaseReport

logger = logging.getLogger(__name__)

INPUT_DIGEST_KEY = "input_sha256"
# SegmentOptions fields that choose how the result is computed, not what it is: the
# convention flag is recorded resolved (``orientation_convention``), precision as above;
# how the TTA axes were asked for (``tta_axes`` are recorded).
RUNTIME_OPTIONS = frozenset({"precision", "weights_convention", "tta_axes_explicit"})


def input_sha256(item: InputItem) -> str | None:
    """sha256 identifying an input's content, or None when it cannot be read (its read will fail).

    A NIfTI file: the file's sha256. A DICOM series: the sha256 of its files' sorted
    sha256 digests, so neither file names nor folder location change it.
    """
    from spleen_seg.io.download import file_sha256

    if isinstance(item, FailedInput):
        return None
    try:
        if isinstance(item, Path):
            return file_sha256(item)
        digests = sorted(file_sha256(path) for path in item.files)
    # Any exception (missing or unreadable files mostly): one bad input never stops the
    # batch, and reading the input reports what is wrong with it.
    except Exception as err:
        logger.debug("no digest of %s: %r", item, err)
        return None
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def recipe_sha256() -> str:
    """sha256 of the resolved recipe (spacing, HU window, ROI, network...)."""
    return hashlib.sha256(json.dumps(asdict(RECIPE), sort_keys=True, default=str).encode()).hexdigest()


def batch_identity(weights_sha256: str, orientation_convention: str, options: SegmentOptions) -> dict[str, Any]:
    """The identity every case of a batch shares; a case's adds its :data:`INPUT_DIGEST_KEY`."""
    chosen = {name: value for name, value in asdict(options).items() if name not in RUNTIME_OPTIONS}
    return {"weights_sha256": weights_sha256, "orientation_convention": orientation_convention,
            "options": chosen, "recipe_sha256": recipe_sha256(), "spleen_seg_version": __version__}


def case_identity(base: dict[str, Any], digest: str | None) -> dict[str, Any]:
    return {INPUT_DIGEST_KEY: digest, **base}


def _difference(recorded: dict[str, Any], base: dict[str, Any]) -> str:
    for key, value in base.items():
        if recorded.get(key) != value:
            return f"{key.replace('_', ' ')} changed"
    return ""


def finished_report(case_dir: Path, base: dict[str, Any],
                    digest: Callable[[], str | None]) -> tuple[CaseReport | None, str]:
    """``(report, "")`` when ``case_dir`` is complete and was made with this identity, else ``(None, why)``.

    ``base`` is :func:`batch_identity`; ``digest`` computes the input's digest, called
    only when everything else matches (hashing a large input is the one costly step).
    """
    report, why = complete_report(case_dir)
    if report is None:
        return None, why
    why = _difference(report.identity, base)
    if why:
        return None, why
    recorded = report.identity.get(INPUT_DIGEST_KEY)
    if recorded is None or recorded != digest():
        return None, "input changed"
    return report, ""
