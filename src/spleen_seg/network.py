"""Build the network; load state dicts, TorchScript files and the packaged demo weights."""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

import torch

from spleen_seg.config import DEVICE_PATTERN, RECIPE, NetworkConfig
from spleen_seg.errors import ConfigError, WeightsError

DEMO_WEIGHTS_RESOURCE = "demo_unet_fp16.pt"
# Prefixes that wrappers add to parameter names: DDP/DataParallel, torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def build(config: NetworkConfig = RECIPE.network) -> torch.nn.Module:
    """The reference bundle's residual 3D UNet: (B, 1, X, Y, Z) -> (B, 2, X, Y, Z) logits."""
    from monai.networks.nets import UNet

    return UNet(**config.kwargs())


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` if available else ``cpu``; an unavailable device is an error."""
    if not DEVICE_PATTERN.match(name):
        raise ConfigError(f"device '{name}' is not one of auto, cpu, cuda, cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device '{name}' requested but CUDA is not available on this machine; use --device cpu")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device '{name}' does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    return torch.device(name)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_torchscript(path: str | Path) -> bool:
    """TorchScript archives are zip files holding a ``code/`` folder; state dicts hold none."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def extract_state_dict(obj: object, path: str | Path) -> dict[str, torch.Tensor]:
    """Accept a plain state dict, or one nested under ``model``/``state_dict`` (checkpoints)."""
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "network"):
            if key in obj and isinstance(obj[key], Mapping):
                return extract_state_dict(obj[key], path)
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            state: dict[str, torch.Tensor] = {}
            for name, tensor in obj.items():
                for prefix in _WRAPPER_PREFIXES:
                    if name.startswith(prefix):
                        name = name[len(prefix) :]
                state[name] = tensor.float() if tensor.is_floating_point() else tensor
            return state
    raise WeightsError(f"{path}: not a state dict of tensors (expected torch.save(net.state_dict()))")


def load_network(path: str | Path, device: torch.device, config: NetworkConfig = RECIPE.network) -> torch.nn.Module:
    """Load weights from a state dict (fp32 or fp16), checkpoint or TorchScript file, in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    if is_torchscript(path):
        try:
            return torch.jit.load(str(path), map_location=device).eval()
        except RuntimeError as err:
            raise WeightsError(f"{path}: unreadable TorchScript file ({err.__class__.__name__})") from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip/EOF errors differ by corruption: report them all as one
        raise WeightsError(f"{path}: not a readable PyTorch weights file ({err.__class__.__name__})") from err
    net = build(config)
    try:
        net.load_state_dict(extract_state_dict(obj, path), strict=True)
    except RuntimeError as err:
        first_line = str(err).splitlines()[0]
        raise WeightsError(f"{path}: weights do not fit the bundle's UNet: {first_line}") from err
    return net.to(device).eval()


def demo_weights_path() -> Path:
    """The packaged fp16 demo weights (trained on phantoms by ``spleen-seg train``)."""
    return Path(str(resources.files("spleen_seg") / "weights" / DEMO_WEIGHTS_RESOURCE))


def save_fp16_state_dict(state: Mapping[str, torch.Tensor], dest: str | Path) -> None:
    """Store float tensors as fp16 (halves the size; loading casts back to fp32)."""
    from spleen_seg.io.atomic import atomic_path

    half = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
    with atomic_path(dest) as tmp:
        torch.save(half, tmp)
