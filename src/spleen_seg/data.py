"""MSD Task09 Spleen: folder layout, train/validation split and downloads.

The split reproduces MONAI's ``spleen_ct_segmentation`` bundle: cases sorted by file
name, the last ``val_count`` labelled cases validate and the rest train. Unlike the
bundle, hidden files (the macOS ``._spleen_2.nii.gz`` resource forks shipped inside the
real MSD archive) are skipped instead of being read as images.

Downloads use only the standard library so that fetching data needs neither network
credentials nor extra packages: they resume, retry, verify an md5 and never leave a
half-written file under the final name.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from spleen_seg.errors import ConfigError, DatasetError, DownloadError

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

# Download tuning. The backoff doubles after every failed attempt.
CHUNK_BYTES = 1 << 20
RETRY_BACKOFF_S = 1.0
USER_AGENT = "spleen-seg-downloader"
PART_SUFFIX = ".part"
MD5_HEX_LENGTH = 32
HTTP_OK = 200
HTTP_PARTIAL_CONTENT = 206
HTTP_RANGE_NOT_SATISFIABLE = 416
HTTP_TOO_MANY_REQUESTS = 429
HTTP_SERVER_ERROR = 500
CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")

DOWNLOAD_HINT = "run `spleen-seg data download` or `spleen-seg data phantom`"


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


# --------------------------------------------------------------------------- downloads


class _TransientError(Exception):
    """A failure worth retrying: dropped connection, timeout, 5xx, short body."""


class _RestartError(_TransientError):
    """The ``.part`` cannot be resumed (bad Content-Range answer); retry from byte 0."""


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file (weights identity in reports, run records and export caches)."""
    return _file_digest(path, "sha256")


def file_md5(path: str | Path) -> str:
    """Hex md5 of a file, read in chunks so multi-GB archives need little memory."""
    return _file_digest(path, "md5")


def _file_digest(path: str | Path, algorithm: str) -> str:
    stat = Path(path).stat()
    return _digest_of(str(Path(path).resolve()), algorithm, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _digest_of(path: str, algorithm: str, size: int, mtime_ns: int) -> str:
    # Keyed by size and mtime too: a rewritten file is hashed again.
    digest = hashlib.new(algorithm)
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_download_args(url: str, md5: str | None, retries: int, timeout_s: float) -> None:
    """Reject bad arguments before touching the network."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise ConfigError(f"download URL {url!r} must start with http:// or https://")
    if md5 is not None and not re.fullmatch(rf"[0-9a-fA-F]{{{MD5_HEX_LENGTH}}}", md5):
        raise ConfigError(
            f"md5 {md5!r} for {url} is not {MD5_HEX_LENGTH} hex digits; pass the archive's "
            "md5 or None to skip the check"
        )
    if retries < 0:
        raise ConfigError(f"retries={retries} must be >= 0")
    if timeout_s <= 0:
        raise ConfigError(f"timeout_s={timeout_s} must be > 0 seconds")


def download_file(
    url: str,
    dest: Path,
    md5: str | None,
    *,
    progress: bool = True,
    timeout_s: float = 60,
    retries: int = 3,
) -> Path:
    """Download ``url`` to ``dest``, resuming and retrying, and verify its md5.

    Bytes stream into ``dest.name + ".part"``; a ``.part`` left by an earlier run is
    resumed with an HTTP ``Range`` request (a server that ignores ``Range`` restarts from
    byte 0). Dropped connections, timeouts, short bodies and 5xx/429 answers are retried
    up to ``retries`` times, each resuming where the last stopped. The finished file must
    match ``md5`` (skipped when ``None``) before it is atomically renamed to ``dest``, so
    ``dest`` is never half-written. An existing ``dest`` with the right md5 is returned
    without any network access; one with a wrong md5 is deleted and downloaded again.

    Returns:
        ``dest``.

    Raises:
        ConfigError: bad URL scheme, md5 format, ``retries`` or ``timeout_s``.
        DownloadError: HTTP 4xx, retries exhausted, or checksum mismatch (the ``.part``
            is then deleted).
    """
    _check_download_args(url, md5, retries, timeout_s)
    dest = Path(dest)
    expected = md5.lower() if md5 is not None else None
    if dest.is_file():
        if expected is None:
            logger.info("%s exists and no md5 was given; using it as is", dest)
            return dest
        actual = file_md5(dest)
        if actual == expected:
            logger.info("%s exists with the expected md5; skipping download", dest)
            return dest
        logger.warning("%s has md5 %s, expected %s; downloading again", dest, actual, expected)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + PART_SUFFIX)

    failures = 0
    while True:
        try:
            _download_attempt(url, part, timeout_s=timeout_s, progress=progress)
            break
        except _TransientError as err:
            failures += 1
            if failures > retries:
                raise DownloadError(
                    f"download of {url} failed after {failures} attempts ({err}); check the "
                    f"network and rerun: the {part.stat().st_size if part.exists() else 0} "
                    f"bytes kept in {part} will be resumed"
                ) from err
            delay_s = RETRY_BACKOFF_S * 2 ** (failures - 1)
            logger.warning("%s: %s; retry %d/%d in %.1f s", url, err, failures, retries, delay_s)
            time.sleep(delay_s)

    if expected is not None:
        actual = file_md5(part)
        if actual != expected:
            part.unlink()
            raise DownloadError(
                f"{url} downloaded with md5 {actual} but {expected} was expected; the "
                "partial file was deleted: rerun, and check the URL and md5 if it persists"
            )
    os.replace(part, dest)
    return dest


def _download_attempt(url: str, part: Path, *, timeout_s: float, progress: bool) -> None:
    """One HTTP request that continues (or restarts) ``part`` until the body ends."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset > 0:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code == HTTP_RANGE_NOT_SATISFIABLE and offset > 0:
            # The .part is as long as (or longer than) the file: it cannot be resumed.
            part.unlink()
            raise _TransientError(f"HTTP 416 resuming at byte {offset}; restarting") from err
        if err.code >= HTTP_SERVER_ERROR or err.code == HTTP_TOO_MANY_REQUESTS:
            raise _TransientError(f"HTTP {err.code} {err.reason}") from err
        raise DownloadError(f"download of {url} failed with HTTP {err.code} {err.reason}; check the URL") from err
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        reason = getattr(err, "reason", err)
        raise _TransientError(f"cannot reach {url}: {reason}") from err

    with response:
        try:
            offset, total = _resume_offset(response, offset)
        except _RestartError:
            part.unlink()
            raise
        length_header = response.headers.get("Content-Length")
        body_bytes = int(length_header) if length_header is not None else None
        with (
            part.open("ab" if offset > 0 else "wb") as handle,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=part.name.removesuffix(PART_SUFFIX),
                disable=not progress,
            ) as bar,
        ):
            received = _copy_body(response, handle, bar)
    if body_bytes is not None and received < body_bytes:
        raise _TransientError(f"connection closed after {offset + received} of {offset + body_bytes} bytes")


def _resume_offset(response: http.client.HTTPResponse, offset: int) -> tuple[int, int | None]:
    """Where the response body starts in the file, and the file size when known.

    A 206 must continue exactly at ``offset``; a 200 (server ignored ``Range``) restarts
    from byte 0, so the caller rewrites the ``.part`` from scratch.
    """
    if response.status == HTTP_PARTIAL_CONTENT:
        match = CONTENT_RANGE_RE.fullmatch(response.headers.get("Content-Range", "").strip())
        if match is None or int(match.group(1)) != offset:
            raise _RestartError(
                f"server answered Range bytes={offset}- with Content-Range "
                f"{response.headers.get('Content-Range')!r}; restarting"
            )
        total = None if match.group(3) == "*" else int(match.group(3))
        return offset, total
    if offset > 0:
        logger.info("server ignored the Range request; restarting from byte 0")
    length_header = response.headers.get("Content-Length")
    return 0, int(length_header) if length_header is not None else None


def _copy_body(response: http.client.HTTPResponse, handle: BinaryIO, bar: tqdm) -> int:
    """Copy the response body into ``handle``; returns bytes written.

    Bytes received before a failure are flushed to disk first, so the retry resumes after
    them instead of downloading them again.
    """
    received = 0
    while True:
        try:
            # read1 returns what has arrived; read() would block for a full chunk and
            # lose the buffered bytes if the socket then times out.
            chunk = response.read1(CHUNK_BYTES)
        except http.client.IncompleteRead as err:
            handle.write(err.partial)
            received += len(err.partial)
            raise _TransientError(f"connection dropped after {received} body bytes") from err
        except (http.client.HTTPException, OSError) as err:
            raise _TransientError(f"connection failed after {received} body bytes: {err}") from err
        if not chunk:
            return received
        handle.write(chunk)
        received += len(chunk)
        bar.update(len(chunk))


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
