"""Tests for spleen_seg.training.data: MSD datalists and the archive download and extraction."""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import io
import json
import tarfile
from pathlib import Path

import pytest
from http_server import serve

from spleen_seg.errors import ConfigError, DatasetError
from spleen_seg.io import download
from spleen_seg.training.data import (
    MSD_SPLEEN_MD5,
    MSD_SPLEEN_URL,
    VAL_COUNT,
    default_data_root,
    download_msd_spleen,
    msd_datalist,
)

PAYLOAD_BYTES = 200_000
DROP_AT = 70_000


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries wait RETRY_BACKOFF_S * 2**n; tests do not need to wait."""
    monkeypatch.setattr(download, "RETRY_BACKOFF_S", 0.0)


def _payload() -> bytes:
    """Deterministic non-repeating bytes, so an offset error changes the md5."""
    return bytes((i * 7 + i // 251) % 256 for i in range(PAYLOAD_BYTES))


def _md5(blob: bytes) -> str:
    return hashlib.md5(blob).hexdigest()


# --------------------------------------------------------------------------- constants


def _monai_decathlon_tables() -> dict[str, dict[str, str]]:
    """DecathlonDataset's ``resource`` and ``md5`` dicts, read from source: importing
    monai.apps pulls in torch and costs seconds."""
    spec = importlib.util.find_spec("monai")
    assert spec is not None and spec.submodule_search_locations
    source = Path(spec.submodule_search_locations[0], "apps", "datasets.py").read_text()
    tables: dict[str, dict[str, str]] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == "DecathlonDataset":
            for stmt in node.body:
                if not isinstance(stmt, ast.Assign):
                    continue
                target = stmt.targets[0]
                if isinstance(target, ast.Name) and target.id in ("resource", "md5"):
                    tables[target.id] = ast.literal_eval(stmt.value)
    return tables


def test_constants_match_monai_decathlon() -> None:
    tables = _monai_decathlon_tables()
    assert tables["resource"]["Task09_Spleen"] == MSD_SPLEEN_URL
    assert tables["md5"]["Task09_Spleen"] == MSD_SPLEEN_MD5
    assert VAL_COUNT == 9


def test_default_data_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SPLEEN_SEG_DATA", str(tmp_path / "cache"))
    assert default_data_root() == tmp_path / "cache"
    monkeypatch.delenv("SPLEEN_SEG_DATA")
    assert default_data_root() == Path.home() / ".cache" / "spleen-seg" / "data"


# --------------------------------------------------------------------------- MSD archive


def _tar_bytes(members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buffer.getvalue()


def _msd_members(case_ids: list[int]) -> dict[str, bytes]:
    training = [{"image": f"./imagesTr/spleen_{i}.nii.gz", "label": f"./labelsTr/spleen_{i}.nii.gz"} for i in case_ids]
    manifest = {"name": "Spleen", "training": training, "test": ["./imagesTs/spleen_1.nii.gz"]}
    members = {"Task09_Spleen/dataset.json": json.dumps(manifest).encode()}
    for i in case_ids:
        members[f"Task09_Spleen/imagesTr/spleen_{i}.nii.gz"] = f"image {i}".encode()
        members[f"Task09_Spleen/labelsTr/spleen_{i}.nii.gz"] = f"label {i}".encode()
    members["Task09_Spleen/imagesTs/spleen_1.nii.gz"] = b"test 1"
    # The real MSD tar ships macOS resource forks next to the images.
    members["Task09_Spleen/imagesTr/._spleen_2.nii.gz"] = b"\x00\x05\x16\x07junk"
    members["Task09_Spleen/labelsTr/._spleen_2.nii.gz"] = b"\x00\x05\x16\x07junk"
    return members


def test_download_msd_spleen_extracts(tmp_path: Path) -> None:
    members = _msd_members([2, 3, 10, 19, 6])
    blob = _tar_bytes(members)
    root = tmp_path / "root"
    with serve({"Task09_Spleen.tar": blob}) as server:
        url = server.url_for("Task09_Spleen.tar")
        dataset = download_msd_spleen(root, url=url, md5=_md5(blob), progress=False)
        assert dataset == root / "Task09_Spleen"
        again = download_msd_spleen(root, url=url, md5=_md5(blob), progress=False)
    assert again == dataset
    assert len(server.requests) == 1
    for name, content in members.items():
        assert (root / name).read_bytes() == content
    assert sorted(p.name for p in root.iterdir()) == ["Task09_Spleen", "Task09_Spleen.tar"]
    assert (root / "Task09_Spleen.tar").read_bytes() == blob

    validation = msd_datalist(dataset, "validation", val_count=2)
    names = [Path(case["image"]).name for case in validation]
    assert names == ["spleen_3.nii.gz", "spleen_6.nii.gz"]
    training = msd_datalist(dataset, "training", val_count=2)
    assert [Path(c["image"]).name for c in training] == [
        "spleen_10.nii.gz",
        "spleen_19.nii.gz",
        "spleen_2.nii.gz",
    ]


def test_download_msd_spleen_reuses_cached_tar(tmp_path: Path) -> None:
    blob = _tar_bytes(_msd_members([1, 2]))
    root = tmp_path / "root"
    root.mkdir()
    (root / "Task09_Spleen.tar").write_bytes(blob)
    with serve({}) as server:
        dataset = download_msd_spleen(root, url=server.url_for("Task09_Spleen.tar"), md5=_md5(blob), progress=False)
    assert server.requests == []
    assert (dataset / "dataset.json").is_file()


@pytest.mark.parametrize(
    ("members", "symlinks"),
    [
        ({"Task09_Spleen/dataset.json": b"{}", "../evil": b"pwned"}, None),
        ({"Task09_Spleen/dataset.json": b"{}"}, {"Task09_Spleen/link": "../../../evil"}),
    ],
    ids=["dotdot-member", "symlink-outside"],
)
def test_download_msd_spleen_rejects_traversal(
    tmp_path: Path, members: dict[str, bytes], symlinks: dict[str, str] | None
) -> None:
    blob = _tar_bytes(members, symlinks)
    root = tmp_path / "root"
    with serve({"Task09_Spleen.tar": blob}) as server, pytest.raises(DatasetError, match="unsafe member"):
        download_msd_spleen(root, url=server.url_for("Task09_Spleen.tar"), md5=_md5(blob), progress=False)
    assert not (tmp_path / "evil").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]
    # Only the cached archive remains: no dataset folder, no staging folder.
    assert sorted(p.name for p in root.iterdir()) == ["Task09_Spleen.tar"]


def test_download_msd_spleen_wrong_layout(tmp_path: Path) -> None:
    blob = _tar_bytes({"Other/dataset.json": b"{}"})
    root = tmp_path / "root"
    with (
        serve({"Task09_Spleen.tar": blob}) as server,
        pytest.raises(DatasetError, match="Task09_Spleen/dataset.json"),
    ):
        download_msd_spleen(root, url=server.url_for("Task09_Spleen.tar"), md5=_md5(blob), progress=False)
    assert sorted(p.name for p in root.iterdir()) == ["Task09_Spleen.tar"]


def test_download_msd_spleen_refuses_partial_folder(tmp_path: Path) -> None:
    (tmp_path / "Task09_Spleen").mkdir()
    with pytest.raises(DatasetError, match="delete it"):
        download_msd_spleen(tmp_path, url="http://127.0.0.1:9/x.tar", progress=False)


# --------------------------------------------------------------------------- datalists


def _make_msd(root: Path, case_ids: list[int], *, with_json: bool = True) -> Path:
    """Tiny placeholder MSD folder; ``dataset.json`` lists cases in the given order."""
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (root / folder).mkdir(parents=True)
    for i in case_ids:
        (root / "imagesTr" / f"spleen_{i}.nii.gz").write_bytes(b"img")
        (root / "labelsTr" / f"spleen_{i}.nii.gz").write_bytes(b"lbl")
    for folder in ("imagesTr", "labelsTr"):
        (root / folder / "._spleen_2.nii.gz").write_bytes(b"junk")
    (root / "imagesTs" / "spleen_7.nii.gz").write_bytes(b"img")
    (root / "imagesTs" / "spleen_11.nii.gz").write_bytes(b"img")
    (root / "imagesTs" / "._spleen_7.nii.gz").write_bytes(b"junk")
    if with_json:
        manifest = {
            "training": [
                {"image": f"./imagesTr/spleen_{i}.nii.gz", "label": f"./labelsTr/spleen_{i}.nii.gz"} for i in case_ids
            ],
            "test": ["./imagesTs/spleen_7.nii.gz", "./imagesTs/spleen_11.nii.gz"],
        }
        (root / "dataset.json").write_text(json.dumps(manifest))
    return root


TWELVE_IDS = [5, 12, 1, 9, 3, 10, 2, 7, 11, 4, 8, 6]  # unordered, like MSD's dataset.json
SORTED_NAMES = [f"spleen_{i}.nii.gz" for i in [1, 10, 11, 12, 2, 3, 4, 5, 6, 7, 8, 9]]


def _names(cases: list[dict[str, str]], key: str = "image") -> list[str]:
    return [Path(case[key]).name for case in cases]


@pytest.mark.parametrize("with_json", [True, False], ids=["dataset-json", "glob"])
def test_datalist_split_sizes(tmp_path: Path, with_json: bool) -> None:
    root = _make_msd(tmp_path / "Task09_Spleen", TWELVE_IDS, with_json=with_json)
    training = msd_datalist(root, "training", val_count=9)
    validation = msd_datalist(root, "validation", val_count=9)
    everything = msd_datalist(root, "all")
    assert _names(training) == SORTED_NAMES[:3]
    assert _names(validation) == SORTED_NAMES[3:]
    assert _names(everything) == SORTED_NAMES
    assert _names(everything, "label") == SORTED_NAMES
    for case in everything:
        assert set(case) == {"image", "label"}
        assert Path(case["image"]) == root / "imagesTr" / Path(case["image"]).name
        assert Path(case["label"]) == root / "labelsTr" / Path(case["label"]).name
    test = msd_datalist(root, "test")
    assert test == [
        {"image": str(root / "imagesTs" / "spleen_11.nii.gz")},
        {"image": str(root / "imagesTs" / "spleen_7.nii.gz")},
    ]


def test_glob_fallback_equals_dataset_json(tmp_path: Path) -> None:
    with_json = _make_msd(tmp_path / "a" / "Task09_Spleen", TWELVE_IDS)
    globbed = _make_msd(tmp_path / "b" / "Task09_Spleen", TWELVE_IDS, with_json=False)
    for split in ("training", "validation", "all", "test"):
        a = [{k: str(Path(v).relative_to(with_json)) for k, v in c.items()} for c in msd_datalist(with_json, split)]
        b = [{k: str(Path(v).relative_to(globbed)) for k, v in c.items()} for c in msd_datalist(globbed, split)]
        assert a == b, split


def test_datalist_returns_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _make_msd(tmp_path / "Task09_Spleen", TWELVE_IDS)
    monkeypatch.chdir(tmp_path)
    cases = msd_datalist("Task09_Spleen", "all")
    assert cases[0]["image"] == str(tmp_path / "Task09_Spleen" / "imagesTr" / "spleen_1.nii.gz")


def test_datalist_default_val_count_is_bundle_split(tmp_path: Path) -> None:
    root = _make_msd(tmp_path / "ds", list(range(1, 42)), with_json=False)
    assert len(msd_datalist(root, "training")) == 32
    assert len(msd_datalist(root, "validation")) == 9


@pytest.mark.parametrize("with_json", [True, False], ids=["dataset-json", "glob"])
def test_missing_label_names_file(tmp_path: Path, with_json: bool) -> None:
    root = _make_msd(tmp_path / "ds", TWELVE_IDS, with_json=with_json)
    (root / "labelsTr" / "spleen_4.nii.gz").unlink()
    with pytest.raises(DatasetError, match="spleen_4.nii.gz"):
        msd_datalist(root, "training")


def test_label_without_image(tmp_path: Path) -> None:
    root = _make_msd(tmp_path / "ds", TWELVE_IDS, with_json=False)
    (root / "imagesTr" / "spleen_4.nii.gz").unlink()
    with pytest.raises(DatasetError, match="spleen_4.nii.gz"):
        msd_datalist(root, "all")


def test_dataset_json_mismatched_pair(tmp_path: Path) -> None:
    root = _make_msd(tmp_path / "ds", TWELVE_IDS)
    manifest = json.loads((root / "dataset.json").read_text())
    manifest["training"][0]["label"] = "./labelsTr/spleen_1.nii.gz"
    (root / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="spleen_5.nii.gz is paired with label spleen_1"):
        msd_datalist(root, "all")


def test_dataset_json_unreadable(tmp_path: Path) -> None:
    root = _make_msd(tmp_path / "ds", TWELVE_IDS)
    (root / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match="dataset.json"):
        msd_datalist(root, "all")


def test_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as info:
        msd_datalist(missing, "training")
    assert str(missing) in str(info.value)
    assert "spleen-seg data download" in str(info.value)
    assert "spleen-seg data phantom" in str(info.value)


@pytest.mark.parametrize("split", ["training", "validation"])
def test_too_few_cases(tmp_path: Path, split: str) -> None:
    root = _make_msd(tmp_path / "ds", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    with pytest.raises(DatasetError) as info:
        msd_datalist(root, split, val_count=9)
    assert "has 9 labelled cases" in str(info.value)
    assert "at least val_count + 1 = 10" in str(info.value)
    assert "lower val_count" in str(info.value)
    assert _names(msd_datalist(root, split, val_count=8)) == (
        ["spleen_1.nii.gz"] if split == "training" else [f"spleen_{i}.nii.gz" for i in range(2, 10)]
    )


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no labelled cases"):
        msd_datalist(tmp_path, "all")
    with pytest.raises(DatasetError, match="no test images"):
        msd_datalist(tmp_path, "test")


@pytest.mark.parametrize("val_count", [0, -1, 2.5, True])
def test_bad_val_count(tmp_path: Path, val_count: object) -> None:
    root = _make_msd(tmp_path / "ds", TWELVE_IDS)
    with pytest.raises(ConfigError, match="val_count"):
        msd_datalist(root, "training", val_count=val_count)  # type: ignore[arg-type]


def test_bad_split(tmp_path: Path) -> None:
    root = _make_msd(tmp_path / "ds", TWELVE_IDS)
    with pytest.raises(ConfigError, match="'train'"):
        msd_datalist(root, "train")
