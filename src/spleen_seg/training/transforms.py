"""Pre- and post-processing shared by train, evaluate and infer.

The transform chains are written once, as MONAI bundle component dicts
(``{"_target_": "Spacingd", ...}``) that the generated bundle JSON embeds, so train,
evaluate and the bundle's inference run one definition. ``spleen-seg segment``
computes the same inference preprocessing without MONAI (``pipeline/resample.py``, tested
against these transforms), reading its values from the same ``PreprocessingConfig``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:

    from spleen_seg.config import PreprocessingConfig, Recipe, TrainingConfig

Component = dict[str, Any]

# MONAI's random mirroring: RandFlip(d) mirrors its ``spatial_axis`` (None: all at once),
# RandAxisFlip(d) one axis chosen at random; both with ``prob`` (MONAI's default 0.1).
AXIS_FLIPS = ("RandFlipd", "RandFlip")
RANDOM_AXIS_FLIPS = ("RandAxisFlipd", "RandAxisFlip")
MONAI_FLIP_PROB = 0.1
# The spatial axes of the RAS-oriented training image, as TTA names them (pipeline/tta.py).
SPATIAL_AXES = "xyz"

# Mirror of world x and y: what the MSD Task09 headers get wrong (model-zoo issue #766).
MSD_HEADER_FIX = ((-1.0, 0.0, 0.0, 0.0), (0.0, -1.0, 0.0, 0.0), (0.0, 0.0, 1.0, 0.0), (0.0, 0.0, 0.0, 1.0))


class FixMSDOrientationd:
    """Correct MSD Task09 headers: their voxels are stored LPS while the affine claims RAS.

    With ``enabled`` the affine of each key becomes ``diag(-1, -1, 1, 1) @ affine``: world
    x and y are mirrored, which moves every voxel to where its anatomy really is (the
    spleen to the patient's left, world x < 0 in RAS+). RAS reorientation then shows the
    network true anatomy and the weights learn the "true" convention. Disabled (the
    default, as in the reference bundle) it passes the data through unchanged.
    Must follow ``LoadImaged`` (it edits the MetaTensor's affine, not the voxels).
    """

    def __init__(self, keys: str | list[str], enabled: bool = False) -> None:
        self.keys = [keys] if isinstance(keys, str) else list(keys)
        self.enabled = bool(enabled)

    def __call__(self, data: dict) -> dict:
        if not self.enabled:
            return data
        import torch

        fix = torch.tensor(MSD_HEADER_FIX, dtype=torch.float64)
        out = dict(data)
        for key in self.keys:
            image = out[key]
            image.affine = fix @ image.affine.to(torch.float64)
            out[key] = image
        return out


def _geometry(keys: list[str], pre: PreprocessingConfig, modes: str | list[str]) -> list[Component]:
    return [
        {"_target_": "EnsureChannelFirstd", "keys": keys},
        {"_target_": "Orientationd", "keys": keys, "axcodes": pre.axcodes},
        {"_target_": "Spacingd", "keys": keys, "pixdim": list(pre.spacing_mm), "mode": modes},
    ]


def intensity_config(pre: PreprocessingConfig) -> Component:
    """HU window -> [0, 1], clipped."""
    low, high = pre.hu_window
    return {
        "_target_": "ScaleIntensityRanged",
        "keys": "image",
        "a_min": low,
        "a_max": high,
        "b_min": 0.0,
        "b_max": 1.0,
        "clip": True,
    }


def inference_preprocessing_config(pre: PreprocessingConfig) -> list[Component]:
    """Image-only chain of the reference inference.json: load, RAS, resample, window."""
    return [
        {"_target_": "LoadImaged", "keys": "image"},
        *_geometry(["image"], pre, "bilinear"),
        intensity_config(pre),
        {"_target_": "EnsureTyped", "keys": "image"},
    ]


def training_deterministic_config(pre: PreprocessingConfig, roi_size: tuple[int, ...]) -> list[Component]:
    """Image + label chain (cached once per case): load, RAS, resample, window, crop to body."""
    keys = ["image", "label"]
    return [
        {"_target_": "LoadImaged", "keys": keys},
        {"_target_": "spleen_seg.training.transforms.FixMSDOrientationd", "keys": keys, "enabled": "@fix_msd_orientation"},
        *_geometry(keys, pre, ["bilinear", "nearest"]),
        intensity_config(pre),
        # Drop the air around the body: after windowing, air and fat are 0.
        {"_target_": "CropForegroundd", "keys": keys, "source_key": "image", "allow_smaller": True},
        # A scan shorter than the patch (few slices) would make RandCropByPosNegLabeld fail.
        {"_target_": "SpatialPadd", "keys": keys, "spatial_size": list(roi_size)},
        {"_target_": "EnsureTyped", "keys": keys},
    ]


def training_random_config(recipe: Recipe, tr: TrainingConfig) -> list[Component]:
    """Per-iteration augmentation: balanced 96^3 crops and an intensity shift."""
    pos, neg = tr.pos_neg
    return [
        {
            "_target_": "RandCropByPosNegLabeld",
            "keys": ["image", "label"],
            "label_key": "label",
            "spatial_size": list(recipe.inference.roi_size),
            "pos": pos,
            "neg": neg,
            "num_samples": tr.num_samples,
            "image_key": "image",
            "image_threshold": 0,
        },
        {
            "_target_": "RandShiftIntensityd",
            "keys": "image",
            "offsets": tr.intensity_shift,
            "prob": tr.intensity_shift_prob,
        },
    ]


def inversion_config(keys: str | list[str], transform_ref: str, nearest: bool | list[bool]) -> Component:
    """Invert the preprocessing on ``keys`` back to the original image grid."""
    return {
        "_target_": "Invertd",
        "keys": keys,
        "transform": transform_ref,
        "orig_keys": "image",
        "nearest_interp": nearest,
        "to_tensor": True,
    }


def mirrored_axes(transforms: Sequence[Any]) -> str:
    """The axes (``"xyz"`` letters of the RAS-oriented image) that ``transforms``' random flips mirror.

    ``transforms``: bundle component dicts as :func:`training_random_config` writes them.
    A flip whose ``prob`` or ``spatial_axis`` is not a literal (a ``@`` reference or ``$``
    expression) or whose ``prob`` is 0 is not counted: claiming no flips only makes flip
    TTA ask for explicit axes, claiming flips that did not run would allow it silently.
    """
    axes: set[int] = set()
    for item in transforms:
        if not isinstance(item, dict):
            continue
        name = str(item.get("_target_", "")).rsplit(".", 1)[-1]
        prob = item.get("prob", MONAI_FLIP_PROB)
        if name not in AXIS_FLIPS + RANDOM_AXIS_FLIPS or not isinstance(prob, (int, float)) or prob <= 0:
            continue
        spatial = None if name in RANDOM_AXIS_FLIPS else item.get("spatial_axis")
        chosen = range(len(SPATIAL_AXES)) if spatial is None else [spatial] if isinstance(spatial, int) else spatial
        if isinstance(chosen, (list, tuple, range)) and all(isinstance(a, int) for a in chosen):
            axes.update(a % len(SPATIAL_AXES) for a in chosen)
    return "".join(SPATIAL_AXES[a] for a in sorted(axes))
