"""spleen-seg: 3D spleen segmentation in CT, compatible with MONAI's spleen_ct_segmentation bundle."""

__version__ = "0.1.0"
