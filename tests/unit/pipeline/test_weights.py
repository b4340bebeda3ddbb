"""Official weights: cache folder, download (local HTTP server), orientation convention, segment's default."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from http_server import serve

from spleen_seg.cli import main
from spleen_seg.errors import ConfigError, DownloadError
from spleen_seg.pipeline import network
from spleen_seg.pipeline.network import (
    OFFICIAL_WEIGHTS_FILENAME,
    build,
    download_official_weights,
    official_weights_path,
    weights_cache_dir,
    weights_orientation_convention,
)

SERVED_NAME = "model_spleen_ct_segmentation_v1.pt"


@pytest.fixture(scope="module")
def state_bytes() -> bytes:
    """A valid (untrained) state dict for the bundle's UNet, as torch.save writes it."""
    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.save(build().state_dict(), buffer)
    return buffer.getvalue()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("SPLEEN_SEG_WEIGHTS", str(folder))
    return folder


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def test_cache_dir_from_env_or_home(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLEEN_SEG_WEIGHTS", str(tmp_path / "w"))
    assert weights_cache_dir() == tmp_path / "w"
    assert official_weights_path() == tmp_path / "w" / OFFICIAL_WEIGHTS_FILENAME
    monkeypatch.delenv("SPLEEN_SEG_WEIGHTS")
    assert weights_cache_dir() == Path("~/.cache/spleen-seg/weights").expanduser()


def test_download_into_env_cache(cache, state_bytes):
    with serve({SERVED_NAME: state_bytes}) as server:
        path = download_official_weights(server.url_for(SERVED_NAME), md5(state_bytes), progress=False)
    assert path == cache / OFFICIAL_WEIGHTS_FILENAME
    assert path.read_bytes() == state_bytes
    assert sorted(p.name for p in cache.iterdir()) == [OFFICIAL_WEIGHTS_FILENAME]


def test_wrong_checksum_leaves_no_file(cache, state_bytes):
    with serve({SERVED_NAME: state_bytes}) as server, pytest.raises(DownloadError, match="md5"):
        download_official_weights(server.url_for(SERVED_NAME), "0" * 32, progress=False)
    assert not cache.exists() or list(cache.iterdir()) == []


def test_dropped_connection_is_resumed(cache, state_bytes, monkeypatch):
    monkeypatch.setattr("spleen_seg.io.download.RETRY_BACKOFF_S", 0.0)
    with serve({SERVED_NAME: state_bytes}, drop_after=len(state_bytes) // 3) as server:
        path = download_official_weights(server.url_for(SERVED_NAME), md5(state_bytes), progress=False)
        ranges = [r.range_header for r in server.requests]
    assert path.read_bytes() == state_bytes
    assert ranges == [None, f"bytes={len(state_bytes) // 3}-"]


def test_cli_weights_download(cache, state_bytes, capsys):
    with serve({SERVED_NAME: state_bytes}) as server:
        code = main(["-q", "weights", "download", "--url", server.url_for(SERVED_NAME), "--md5", md5(state_bytes)])
    assert code == 0
    assert (cache / OFFICIAL_WEIGHTS_FILENAME).read_bytes() == state_bytes
    assert str(cache / OFFICIAL_WEIGHTS_FILENAME) in capsys.readouterr().out


def test_cli_weights_download_bad_checksum_exits_2(cache, state_bytes, capsys):
    with serve({SERVED_NAME: state_bytes}) as server:
        code = main(["-q", "weights", "download", "--url", server.url_for(SERVED_NAME), "--md5", "f" * 32])
    assert code == 2
    assert "md5" in capsys.readouterr().err
    assert not (cache / OFFICIAL_WEIGHTS_FILENAME).exists()


def test_orientation_convention(tmp_path, state_bytes, monkeypatch):
    weights = tmp_path / "model.pt"
    weights.write_bytes(state_bytes)
    assert weights_orientation_convention(weights) == "true"
    assert weights_orientation_convention(weights, "msd") == "msd"
    with pytest.raises(ConfigError, match="'sideways'"):
        weights_orientation_convention(weights, "sideways")
    # The official weights are recognised by their md5.
    monkeypatch.setattr(network, "OFFICIAL_WEIGHTS_MD5", md5(state_bytes))
    assert weights_orientation_convention(weights) == "msd"
    monkeypatch.undo()
    sidecar = tmp_path / "model.pt.json"
    sidecar.write_text(json.dumps({"orientation_convention": "msd"}))
    assert weights_orientation_convention(weights) == "msd"
    assert weights_orientation_convention(weights, "true") == "true"
    sidecar.write_text(json.dumps({"orientation_convention": "ras"}))
    with pytest.raises(ConfigError, match=r"model\.pt\.json.*'ras'"):
        weights_orientation_convention(weights)
    sidecar.write_text("not json")
    with pytest.raises(ConfigError, match="not a JSON object"):
        weights_orientation_convention(weights)


def _small_ct(tmp_path) -> Path:
    from spleen_seg.training.phantom import make_phantom

    case = make_phantom(3, shape=(64, 64, 24), spacing_mm=(3.0, 3.0, 6.0), orientation="RAS")
    path = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(case.image_hu, case.affine), str(path))
    return path


def test_segment_without_weights_or_cache_exits_2(cache, tmp_path, capsys):
    code = main(["-q", "segment", str(_small_ct(tmp_path)), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "spleen-seg weights download" in err and "--weights" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_segment_uses_cached_weights(cache, state_bytes, tmp_path):
    with serve({SERVED_NAME: state_bytes}) as server:
        assert main(["-q", "weights", "download", "--url", server.url_for(SERVED_NAME), "--md5", md5(state_bytes)]) == 0
    out = tmp_path / "out"
    assert main(["-q", "segment", str(_small_ct(tmp_path)), "-o", str(out), "--backend", "torch"]) == 0
    report = json.loads((out / "small" / "report.json").read_text())
    cached = cache / OFFICIAL_WEIGHTS_FILENAME
    assert report["model"]["weights"] == str(cached.resolve())
    assert report["model"]["weights_sha256"] == hashlib.sha256(state_bytes).hexdigest()
    assert report["model"]["orientation_convention"] == "true"  # not the official md5
    run_info = json.loads((out / "run_info.json").read_text())
    assert run_info["weights"] == str(cached) and run_info["orientation_convention"] == "true"
    mask = np.asarray(nib.load(str(out / "small" / "spleen.nii.gz")).dataobj)
    assert mask.shape == (64, 64, 24) and report["voxel_count"] == int(mask.sum())
