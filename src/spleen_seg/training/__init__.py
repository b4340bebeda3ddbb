"""Training and evaluation through the MONAI bundle: data, phantoms, transforms, bundle JSON, DDP."""
