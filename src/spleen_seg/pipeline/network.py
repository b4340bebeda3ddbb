"""Build the network; load state dicts, TorchScript files and the packaged demo weights."""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spleen_seg.config import DEVICE_PATTERN, RECIPE, NetworkConfig
from spleen_seg.errors import ConfigError, WeightsError

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that need it: the CPU inference path uses this
# module (weights identity, caches) without paying torch's import time (about 1.2 s).

DEMO_WEIGHTS_RESOURCE = "demo_unet_fp16.pt"
# Prefixes that wrappers add to parameter names: DDP/DataParallel, torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def build(config: NetworkConfig = RECIPE.network) -> torch.nn.Module:
    """The reference bundle's residual 3D UNet: (B, 1, X, Y, Z) -> (B, 2, X, Y, Z) logits."""
    from monai.networks.nets import UNet

    return UNet(**config.kwargs())


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` if available else ``cpu``; an unavailable device is an error."""
    import torch

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


def is_torchscript(path: str | Path) -> bool:
    """TorchScript archives are zip files holding a ``code/`` folder; state dicts hold none."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def extract_state_dict(obj: object, path: str | Path) -> dict[str, torch.Tensor]:
    """Accept a plain state dict, or one nested under ``model``/``state_dict`` (checkpoints)."""
    import torch

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
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    if is_torchscript(path):
        try:
            return torch.jit.load(str(path), map_location=device).eval()
        except RuntimeError as err:
            raise WeightsError(f"{path}: unreadable TorchScript file ({err.__class__.__name__})") from err
    net = build(config)
    load_weights_into(net, path)
    return net.to(device).eval()


def load_weights_into(net: torch.nn.Module, path: str | Path) -> None:
    """Copy the weights of a state dict or checkpoint file (``load_network``'s rules) into ``net``, in place.

    The parameters stay the same tensor objects (an optimiser built on them keeps working);
    every parameter and buffer must fit (strict), fp16 files are cast to ``net``'s dtype.

    Raises:
        WeightsError: the file is missing, TorchScript, unreadable, or does not fit ``net``.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    if is_torchscript(path):
        raise WeightsError(f"{path}: a TorchScript file holds a compiled network, not weights to start from; "
                           "give the state dict it was exported from (models/model.pt)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip/EOF errors differ by corruption: report them all as one
        raise WeightsError(f"{path}: not a readable PyTorch weights file ({err.__class__.__name__})") from err
    try:
        net.load_state_dict(extract_state_dict(obj, path), strict=True)
    except RuntimeError as err:
        first_line = str(err).splitlines()[0]
        raise WeightsError(f"{path}: weights do not fit the bundle's UNet: {first_line}") from err


def demo_weights_path() -> Path:
    """The packaged fp16 demo weights (trained on phantoms by ``spleen-seg train``)."""
    return Path(str(resources.files("spleen_seg") / "weights" / DEMO_WEIGHTS_RESOURCE))


def save_fp16_state_dict(state: Mapping[str, torch.Tensor], dest: str | Path) -> None:
    """Store float tensors as fp16 (halves the size; loading casts back to fp32)."""
    import torch

    from spleen_seg.io.atomic import atomic_path

    half = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
    with atomic_path(dest) as tmp:
        torch.save(half, tmp)


# --------------------------------------------------------------------------- official weights

# The MONAI model-zoo bundle's released weights (spleen_ct_segmentation, models/model.pt).
OFFICIAL_WEIGHTS_URL = (
    "https://developer.download.nvidia.com/assets/Clara/monai/tutorials/model_zoo/model_spleen_ct_segmentation_v1.pt"
)
OFFICIAL_WEIGHTS_MD5 = "be4fa95e236df91766147c112ee6fafd"
# Cached under this name whatever mirror ``--url`` names, so ``segment`` finds it.
OFFICIAL_WEIGHTS_FILENAME = "model_spleen_ct_segmentation_v1.pt"
WEIGHTS_CACHE_ENV = "SPLEEN_SEG_WEIGHTS"
DEFAULT_WEIGHTS_CACHE = Path("~/.cache/spleen-seg/weights")
# Orientation conventions weights can be trained under: "msd" = MSD Task09 as shipped (voxels
# stored LPS, headers claiming RAS: model-zoo issue #766), so the network learned mirrored
# anatomy; "true" = anatomy as the headers say.
CONVENTION_MSD = "msd"
CONVENTION_TRUE = "true"
ORIENTATION_CONVENTIONS = (CONVENTION_MSD, CONVENTION_TRUE)
# ``<weights>.json`` beside a weights file: one record of what they were trained under, each
# key optional: the orientation convention (below) and the flips (pipeline/tta.py reads those).
SIDECAR_SUFFIX = ".json"
SIDECAR_KEY = "orientation_convention"
FLIPS_KEY = "trained_with_flips"
SAFE_TTA_AXES_KEY = "safe_tta_axes"


def weights_cache_dir() -> Path:
    """Folder for downloaded weights: ``$SPLEEN_SEG_WEIGHTS`` or ``~/.cache/spleen-seg/weights``."""
    import os

    return Path(os.environ.get(WEIGHTS_CACHE_ENV) or DEFAULT_WEIGHTS_CACHE).expanduser()


def official_weights_path() -> Path:
    """Where ``download_official_weights`` stores the official weights (it may not exist yet)."""
    return weights_cache_dir() / OFFICIAL_WEIGHTS_FILENAME


def download_official_weights(
    url: str = OFFICIAL_WEIGHTS_URL, md5: str = OFFICIAL_WEIGHTS_MD5, *, progress: bool = True
) -> Path:
    """Download the official bundle weights into :func:`weights_cache_dir` and verify the md5.

    Resumes a partial download, retries dropped connections and never leaves a partial or
    corrupt file under the final name (see ``spleen_seg.io.download.download_file``). A cached
    file with the right md5 is returned without network access.

    Raises:
        ConfigError: malformed URL or md5.
        DownloadError: HTTP error, retries exhausted or checksum mismatch.
    """
    from spleen_seg.io.download import download_file

    return download_file(url, official_weights_path(), md5, progress=progress)


def sidecar_path(weights: str | Path) -> Path:
    """``model.pt`` -> ``model.pt.json``: the record stored beside a weights file."""
    weights = Path(weights)
    return weights.with_name(weights.name + SIDECAR_SUFFIX)


def read_weights_record(weights: str | Path) -> dict[str, Any]:
    """The sidecar ``<weights>.json`` as a dict; ``{}`` when there is none.

    Raises:
        ConfigError: the sidecar exists but is not a readable JSON object.
    """
    import json

    sidecar = sidecar_path(weights)
    if not sidecar.is_file():
        return {}
    expected = f'expected for example {{"{SIDECAR_KEY}": "msd" | "true", "{FLIPS_KEY}": false}}'
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{sidecar}: not a JSON object ({err.__class__.__name__}); {expected}") from err
    if not isinstance(record, dict):
        raise ConfigError(f"{sidecar}: not a JSON object (a JSON {type(record).__name__}); {expected}")
    return record


def write_weights_record(weights: str | Path, record: Mapping[str, Any]) -> Path:
    """Write ``record`` as the sidecar of ``weights`` (new weights: an earlier record is replaced whole)."""
    import json

    from spleen_seg.io.atomic import atomic_write_text

    sidecar = sidecar_path(weights)
    atomic_write_text(sidecar, json.dumps(dict(record), indent=2, sort_keys=True) + "\n")
    return sidecar


def is_official_weights(weights: str | Path) -> bool:
    """Whether ``weights`` are the model zoo's released weights (by md5)."""
    from spleen_seg.io.download import file_md5

    return file_md5(Path(weights)) == OFFICIAL_WEIGHTS_MD5


def weights_orientation_convention(weights: str | Path, override: str | None = None) -> str:
    """The orientation convention ``weights`` were trained under: ``"msd"`` or ``"true"``.

    In order: ``override`` (the CLI's ``--weights-convention``); the sidecar
    ``<weights>.json``'s ``"orientation_convention": "msd" | "true"``; the official bundle
    weights (md5 match) are ``"msd"``; anything else is ``"true"``.

    Raises:
        ConfigError: an unknown override, or an unreadable or invalid sidecar.
    """
    if override is not None:
        if override not in ORIENTATION_CONVENTIONS:
            raise ConfigError(f"orientation convention must be one of {ORIENTATION_CONVENTIONS}, got '{override}'")
        return override
    record = read_weights_record(weights)
    if SIDECAR_KEY in record:
        value = record[SIDECAR_KEY]
        if value not in ORIENTATION_CONVENTIONS:
            raise ConfigError(f"{sidecar_path(weights)}: '{SIDECAR_KEY}' must be one of {ORIENTATION_CONVENTIONS}, "
                              f"got {value!r}")
        return str(value)
    return CONVENTION_MSD if is_official_weights(weights) else CONVENTION_TRUE


def default_segment_weights(weights: str | Path | None) -> Path:
    """``weights`` if given, else the cached official weights.

    Raises:
        ConfigError: no weights given and none cached, naming the command that fetches them.
    """
    if weights is not None:
        return Path(weights)
    cached = official_weights_path()
    if not cached.is_file():
        raise ConfigError(f"no weights given and no official weights cached at {cached}: run "
                          "'spleen-seg weights download' (or pass --weights PATH to a state dict or TorchScript file)")
    return cached
