"""MSD Task09 Spleen: folder layout, train/validation split and downloads.

The split reproduces MONAI's ``spleen_ct_segmentation`` bundle: cases sorted by file
name, the last ``val_count`` labelled cases validate and the rest train. Unlike the
bundle, hidden files (the macOS ``._spleen_2.nii.gz`` resource forks shipped inside the
real MSD archive) are skipped instead of being read as images.

The archive is fetched by ``io.download.download_file`` (resume, retries, md5, atomic).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from spleen_seg.errors import ConfigError, DatasetError, DownloadError
from spleen_seg.io.download import download_file

logger = logging.getLogger(__name__)

# Same archive and checksum as monai.apps.DecathlonDataset.resource/md5["Task09_Spleen"].
MSD_SPLEEN_URL = "https://msd-for-monai.s3-us-west-2.amazonaws.com/Task09_Spleen.tar"
MSD_SPLEEN_MD5 = "410d4a301da4e5b2f6f86ec3ddba524e"
MSD_SPLEEN_TASK = "Task09_Spleen"

# The bundle validates on the last 9 labelled cases (sorted by file name).
VAL_COUNT = 9
SPLITS = ("training", "validation", "all", "test")

DATA_ROOT_ENV = "SPLEEN_SEG_DATA"
DEFAULT_DATA_ROOT = Path("~/.cache/spleen-seg/data")

NIFTI_SUFFIX = ".nii.gz"
DATASET_JSON = "dataset.json"
IMAGES_TRAIN_DIR = "imagesTr"
LABELS_TRAIN_DIR = "labelsTr"
IMAGES_TEST_DIR = "imagesTs"

DOWNLOAD_HINT = "run `spleen-seg data download` or `spleen-seg data phantom`"
# dataset.json may declare the orientation convention of its headers (pipeline.network's "true":
# they place the anatomy where it is, as a corrections export's do; "msd": MSD Task09's mirrored
# ones); a training run checks its init weights and flags against it (training/train.py).
ORIENTATION_KEY = "orientation_convention"


# --------------------------------------------------------------------------- datalists


def default_data_root() -> Path:
    """Folder where datasets are downloaded and cached.

    Returns ``$SPLEEN_SEG_DATA`` when set and non-empty, else ``~/.cache/spleen-seg/data``
    (user folder expanded). The folder is not created.
    """
    from_env = os.environ.get(DATA_ROOT_ENV, "").strip()
    root = Path(from_env) if from_env else DEFAULT_DATA_ROOT
    return root.expanduser()


def msd_datalist(dataset_dir: str | Path, split: str, val_count: int = VAL_COUNT) -> list[dict[str, str]]:
    """List the cases of an MSD-layout dataset (``imagesTr``, ``labelsTr``, ``imagesTs``).

    Cases come from ``dataset.json`` when present, else from globbing
    ``imagesTr/*.nii.gz`` and ``labelsTr/*.nii.gz``. Either way they are sorted by file
    name, as the bundle's ``sorted(glob(...))`` does, so ``"validation"`` is the last
    ``val_count`` labelled cases and ``"training"`` the rest; ``"all"`` is every labelled
    case and ``"test"`` the unlabelled ``imagesTs`` images. Files whose name starts with
    ``.`` (macOS ``._*`` resource forks) are ignored.

    Args:
        dataset_dir: the task folder, e.g. ``.../Task09_Spleen``.
        split: one of ``"training"``, ``"validation"``, ``"all"``, ``"test"``.
        val_count: number of validation cases; ``"training"`` and ``"validation"`` need at
            least ``val_count + 1`` labelled cases.

    Returns:
        ``[{"image": abs_path, "label": abs_path}, ...]`` (``{"image": ...}`` for
        ``"test"``), absolute paths as ``str``.

    Raises:
        ConfigError: unknown ``split`` or ``val_count < 1``.
        DatasetError: missing folder or file, image without label, too few cases.
    """
    if split not in SPLITS:
        raise ConfigError(f"split {split!r} is not one of {', '.join(SPLITS)}; pick one of those")
    if isinstance(val_count, bool) or not isinstance(val_count, int) or val_count < 1:
        raise ConfigError(f"val_count={val_count!r} must be an integer >= 1; pass e.g. val_count={VAL_COUNT}")
    root = Path(dataset_dir).expanduser()
    if not root.is_dir():
        raise DatasetError(
            f"dataset folder {root} does not exist; {DOWNLOAD_HINT} to create it, "
            "or point to an MSD-layout folder (imagesTr/, labelsTr/)"
        )
    root = Path(os.path.abspath(root))
    json_path = root / DATASET_JSON
    manifest = _read_dataset_json(json_path) if json_path.is_file() else None

    if split == "test":
        return [{"image": str(path)} for path in _test_images(root, manifest)]

    cases = _labelled_cases(root, manifest)
    if split == "all":
        if not cases:
            raise DatasetError(f"dataset folder {root} has no labelled cases in {IMAGES_TRAIN_DIR}/; {DOWNLOAD_HINT}")
        return cases
    if len(cases) < val_count + 1:
        raise DatasetError(
            f"dataset folder {root} has {len(cases)} labelled cases but the "
            f"{split!r} split needs at least val_count + 1 = {val_count + 1}; "
            "add cases or lower val_count"
        )
    return cases[:-val_count] if split == "training" else cases[-val_count:]


def msd_training_entry(file_name: str) -> dict[str, str]:
    """``dataset.json``'s entry of a labelled case: its image and label, same file name, relative paths."""
    return {"image": f"./{IMAGES_TRAIN_DIR}/{file_name}", "label": f"./{LABELS_TRAIN_DIR}/{file_name}"}


def msd_dataset_json(*, description: str, reference: str, licence: str, training: list[dict[str, str]],
                     test: list[str] | None = None, extra: dict[str, object] | None = None) -> dict[str, object]:
    """An MSD Task09 ``dataset.json`` (the Decathlon's keys, one label: spleen) listing ``training``
    (:func:`msd_training_entry`) and ``test`` (``./imagesTs/...``); ``extra`` keys are added as given."""
    test = list(test or [])
    return {"name": "Spleen", "description": description, "reference": reference, "licence": licence,
            "release": "1.0", "tensorImageSize": "3D", "modality": {"0": "CT"},
            "labels": {"0": "background", "1": "spleen"}, "numTraining": len(training), "numTest": len(test),
            "training": training, "test": test, **(extra or {})}


def dataset_orientation_convention(dataset_dir: str | Path) -> str | None:
    """The orientation convention ``dataset_dir/dataset.json`` declares (:data:`ORIENTATION_KEY`), or
    None when it declares none (or there is no dataset.json): unknown, as for the MSD archive."""
    from spleen_seg.pipeline.network import ORIENTATION_CONVENTIONS

    path = Path(dataset_dir).expanduser() / DATASET_JSON
    if not path.is_file():
        return None
    value = _read_dataset_json(path).get(ORIENTATION_KEY)
    if value is not None and value not in ORIENTATION_CONVENTIONS:
        raise DatasetError(f"{path}: {ORIENTATION_KEY} is {value!r}, not one of {', '.join(ORIENTATION_CONVENTIONS)}; "
                           "fix it or remove the key")
    return None if value is None else str(value)


def _is_hidden(path: Path) -> bool:
    """True for dot files, including the ``._*`` macOS resource forks in the MSD tar."""
    return path.name.startswith(".")


def _read_dataset_json(json_path: Path) -> dict[str, object]:
    """Parse an MSD ``dataset.json``; only its ``training`` and ``test`` keys are used."""
    try:
        manifest = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(
            f"{json_path} is not readable JSON ({err}); fix or delete it "
            "(without it the images are found by globbing imagesTr/ and labelsTr/)"
        ) from err
    if not isinstance(manifest, dict):
        raise DatasetError(
            f"{json_path} holds a {type(manifest).__name__}, expected an object with "
            "'training' and 'test' lists; fix or delete it"
        )
    return manifest


def _resolve_entry(root: Path, entry: object, json_key: str) -> Path:
    """Turn a ``dataset.json`` path such as ``./imagesTr/x.nii.gz`` into an absolute path."""
    if not isinstance(entry, str) or not entry:
        raise DatasetError(
            f"{root / DATASET_JSON}: {json_key} entry {entry!r} is not a path string; "
            "fix dataset.json or delete it to glob the folders instead"
        )
    return Path(os.path.normpath(root / entry))


def _labelled_cases(root: Path, manifest: dict[str, object] | None) -> list[dict[str, str]]:
    """All (image, label) pairs, sorted by image file name, checked to exist and match."""
    if manifest is None:
        pairs = _glob_pairs(root)
    else:
        entries = manifest.get("training")
        if not isinstance(entries, list):
            raise DatasetError(
                f"{root / DATASET_JSON} has no 'training' list; fix it or delete it to "
                "glob imagesTr/ and labelsTr/ instead"
            )
        pairs = []
        for entry in entries:
            if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
                raise DatasetError(
                    f"{root / DATASET_JSON}: training entry {entry!r} lacks 'image' or "
                    "'label'; each entry must be {'image': path, 'label': path}"
                )
            image = _resolve_entry(root, entry["image"], "training image")
            label = _resolve_entry(root, entry["label"], "training label")
            if _is_hidden(image):
                continue
            if image.name != label.name:
                raise DatasetError(
                    f"{root / DATASET_JSON}: image {image.name} is paired with label "
                    f"{label.name}; each label must have its image's file name"
                )
            pairs.append((image, label))
    pairs.sort(key=lambda pair: pair[0].name)
    for image, label in pairs:
        for path in (image, label):
            if not path.is_file():
                raise DatasetError(
                    f"{path} is listed in {root} but does not exist; restore it or {DOWNLOAD_HINT} again"
                )
    return [{"image": str(image), "label": str(label)} for image, label in pairs]


def _glob_nifti(folder: Path) -> list[Path]:
    """Sorted ``*.nii.gz`` files of ``folder`` without hidden files; [] when it is absent."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*" + NIFTI_SUFFIX) if not _is_hidden(p))


def _glob_pairs(root: Path) -> list[tuple[Path, Path]]:
    """Pair ``imagesTr`` and ``labelsTr`` files by file name; every file needs its partner."""
    images = {p.name: p for p in _glob_nifti(root / IMAGES_TRAIN_DIR)}
    labels = {p.name: p for p in _glob_nifti(root / LABELS_TRAIN_DIR)}
    for name, image in images.items():
        if name not in labels:
            raise DatasetError(
                f"image {image} has no label {root / LABELS_TRAIN_DIR / name}; add the label or remove the image"
            )
    for name, label in labels.items():
        if name not in images:
            raise DatasetError(
                f"label {label} has no image {root / IMAGES_TRAIN_DIR / name}; add the image or remove the label"
            )
    return [(images[name], labels[name]) for name in sorted(images)]


def _test_images(root: Path, manifest: dict[str, object] | None) -> list[Path]:
    """The unlabelled ``imagesTs`` images, sorted by file name and checked to exist."""
    if manifest is not None and "test" in manifest:
        entries = manifest["test"]
        if not isinstance(entries, list):
            raise DatasetError(f"{root / DATASET_JSON}: 'test' is not a list of paths; fix dataset.json")
        images = [_resolve_entry(root, entry, "test") for entry in entries]
        images = sorted((p for p in images if not _is_hidden(p)), key=lambda p: p.name)
    else:
        images = _glob_nifti(root / IMAGES_TEST_DIR)
    if not images:
        raise DatasetError(
            f"dataset folder {root} has no test images in {IMAGES_TEST_DIR}/; "
            "use split 'validation' to evaluate on labelled cases"
        )
    for path in images:
        if not path.is_file():
            raise DatasetError(
                f"test image {path} is listed in {root / DATASET_JSON} but does not exist; "
                "restore it or fix dataset.json"
            )
    return images


# --------------------------------------------------------------------------- MSD archive


def download_msd_spleen(
    root: str | Path,
    *,
    url: str = MSD_SPLEEN_URL,
    md5: str = MSD_SPLEEN_MD5,
    progress: bool = True,
) -> Path:
    """Download and extract MSD Task09 Spleen into ``root``; returns ``root/Task09_Spleen``.

    Nothing is fetched when ``root/Task09_Spleen/dataset.json`` already exists. Otherwise
    the tar is downloaded to ``root/Task09_Spleen.tar`` (kept as a cache, reused when its
    md5 matches), extracted with tarfile's ``"data"`` filter (which refuses members that
    escape the folder, absolute paths and unsafe links) into a temporary folder inside
    ``root``, and renamed into place, so a crash never leaves a half-extracted dataset.

    Raises:
        DownloadError: the download failed or the tar is unreadable.
        DatasetError: the tar holds unsafe members or no ``Task09_Spleen/dataset.json``,
            or ``root/Task09_Spleen`` exists without ``dataset.json``.
    """
    root = Path(root).expanduser()
    dataset_dir = root / MSD_SPLEEN_TASK
    if (dataset_dir / DATASET_JSON).is_file():
        logger.info("%s already extracted; skipping download", dataset_dir)
        return dataset_dir
    if dataset_dir.exists():
        raise DatasetError(
            f"{dataset_dir} exists but has no {DATASET_JSON}; delete it and rerun to download a fresh copy"
        )
    root.mkdir(parents=True, exist_ok=True)
    archive = download_file(url, root / f"{MSD_SPLEEN_TASK}.tar", md5, progress=progress)

    staging = Path(tempfile.mkdtemp(prefix=f".{MSD_SPLEEN_TASK}.extract-", dir=root))
    try:
        _extract_tar(archive, staging)
        extracted = staging / MSD_SPLEEN_TASK
        if not (extracted / DATASET_JSON).is_file():
            raise DatasetError(
                f"archive {archive} ({url}) has no {MSD_SPLEEN_TASK}/{DATASET_JSON}; "
                "check the URL points at the MSD Task09_Spleen tar"
            )
        try:
            os.replace(extracted, dataset_dir)
        except OSError:
            # Another process may have finished the same extraction first.
            if not (dataset_dir / DATASET_JSON).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dataset_dir


def _extract_tar(archive: Path, dest_dir: Path) -> None:
    """Extract every member of ``archive`` under ``dest_dir``, refusing unsafe members."""
    if not hasattr(tarfile, "data_filter"):
        # Extraction filters arrived in Python 3.10.12 / 3.11.4; without them a crafted
        # member could write outside dest_dir.
        raise DatasetError(
            f"cannot safely extract {archive}: this Python lacks tarfile extraction filters; "
            "upgrade to Python >= 3.10.12 or >= 3.11.4"
        )
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(dest_dir, filter="data")
    except tarfile.FilterError as err:
        raise DatasetError(
            f"archive {archive} has an unsafe member ({err}); refusing to extract it: "
            "delete the archive and check where it came from"
        ) from err
    except tarfile.TarError as err:
        raise DownloadError(f"archive {archive} is not a readable tar ({err}); delete it and download again") from err
