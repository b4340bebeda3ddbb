"""spleen-seg: 3D spleen segmentation in CT, compatible with MONAI's spleen_ct_segmentation bundle.

Packages by stage: ``io`` (formats), ``pipeline`` (one volume in, one mask out),
``outputs`` (report, preview), ``batch`` (many cases), ``training`` (bundle training and
evaluation); ``config`` holds the recipe and ``cli`` the commands.
"""

__version__ = "0.1.0"
