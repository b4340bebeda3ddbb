"""The official spleen_ct_segmentation inference.json pipeline, built with MONAI's own
transforms exactly as the official config lists them (the comparison reference).

Kept independent of ``spleen_seg`` on purpose: values are typed here as in the official
bundle, so a drift in our recipe shows up as a mismatch.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer
from monai.networks.nets import UNet
from monai.transforms import (
    Activationsd,
    AsDiscreted,
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    Invertd,
    LoadImaged,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
)


def official_network(state_dict_path: str) -> torch.nn.Module:
    net = UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=2,
        channels=(16, 32, 64, 128, 256),
        strides=(2, 2, 2, 2),
        num_res_units=2,
        norm="batch",
    )
    net.load_state_dict(torch.load(state_dict_path, map_location="cpu", weights_only=True))
    return net.eval()


def official_mask(image_path: str, net: torch.nn.Module) -> np.ndarray:
    """uint8 mask (X, Y, Z) on the input grid, as the official inference.json computes it."""
    pre = Compose(
        [
            LoadImaged(keys="image"),
            EnsureChannelFirstd(keys="image"),
            Orientationd(keys="image", axcodes="RAS"),
            Spacingd(keys="image", pixdim=[1.5, 1.5, 2.0], mode="bilinear"),
            ScaleIntensityRanged(keys="image", a_min=-57, a_max=164, b_min=0, b_max=1, clip=True),
            EnsureTyped(keys="image"),
        ]
    )
    post = Compose(
        [
            Activationsd(keys="pred", softmax=True),
            Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True),
            AsDiscreted(keys="pred", argmax=True),
        ]
    )
    data = pre({"image": image_path})
    inferer = SlidingWindowInferer(roi_size=[96, 96, 96], sw_batch_size=4, overlap=0.5)
    with torch.no_grad():
        data["pred"] = inferer(data["image"][None], net)[0]
    data = post(data)
    return np.asarray(data["pred"][0]).astype(np.uint8)
