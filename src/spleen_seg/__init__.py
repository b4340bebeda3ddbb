"""spleen-seg: 3D spleen segmentation in CT, compatible with MONAI's spleen_ct_segmentation bundle."""

import importlib
from types import ModuleType

__version__ = "0.1.0"

_SUBMODULES = {"config", "data", "demo", "distributed", "evaluate", "infer", "network", "phantom", "train", "transforms"}


def __getattr__(name: str) -> ModuleType:
    # Bundle expressions import the package ("$import spleen_seg") and call
    # spleen_seg.network.resolve_device(...): load submodules on first use.
    if name in _SUBMODULES:
        return importlib.import_module(f"spleen_seg.{name}")
    raise AttributeError(f"module 'spleen_seg' has no attribute '{name}'")
