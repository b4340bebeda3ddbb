"""Paths of the shared real-CT test data beside the checkout (``../shared``, or ``$SPLEEN_SEG_SHARED``).

Test modules import these names from here, never ``from conftest import ...``: several
conftest.py files exist and that module name resolves to whichever was imported first.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("SPLEEN_SEG_SHARED", REPO_ROOT.parent / "shared"))
REAL_CT = SHARED / "data" / "real_ct" / "ct_abdomen_3mm.nii.gz"
REAL_CT_MASK = SHARED / "data" / "real_ct" / "ct_abdomen_3mm_spleen.nii.gz"
REAL_SERIES = SHARED / "data" / "real_ct" / "dicom_series"
REAL_SERIES_MASK = SHARED / "data" / "real_ct" / "dicom_series_spleen.nii.gz"
YARDSTICK = SHARED / "models" / "yardstick.pt"
