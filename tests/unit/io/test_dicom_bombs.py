"""Deflated DICOM bombs (issue 15, item 3): headers read without inflating the pixels, pixels
inflated only up to what the header declares, and a series' geometry checked before any
pixel is decoded, for single-frame and multi-frame (enhanced) CT alike.

Memory is measured with tracemalloc, which sees the bytes zlib inflates and numpy's arrays.
"""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from memory_trace import traced_peak
from synthetic_dicom import (
    only_series,
    random_volume,
    write_deflated,
    write_deflated_bomb_series,
    write_multiframe,
    write_series,
)

from spleen_seg.errors import InputImageError
from spleen_seg.io.dicom import find_series
from spleen_seg.io.dicom_files import read_dataset
from spleen_seg.io.dicom_volume import read_series

MB = 1 << 20
BOMB_SIDE = 8192  # 8192 x 8192 16-bit zeros: 128 MiB inflated, about 128 KiB deflated
BOMB_PIXEL_BYTES = BOMB_SIDE * BOMB_SIDE * 2
HEADER_TRACED_MAX = 2 * MB


def test_deflated_header_is_read_without_inflating_the_pixels(tmp_path):
    (path,) = write_deflated_bomb_series(tmp_path, 1)
    assert path.stat().st_size < 160_000
    ds, traced = traced_peak(lambda: read_dataset(path, stop_before_pixels=True))
    assert traced < HEADER_TRACED_MAX, f"{traced / MB:.0f} MiB traced to read a header"  # pydicom: 256 MiB
    assert (ds.Rows, ds.Columns, ds.Modality) == (BOMB_SIDE, BOMB_SIDE, "CT")
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.DeflatedExplicitVRLittleEndian
    assert "PixelData" not in ds


def test_finding_a_folder_of_deflated_bombs_inflates_none(tmp_path):
    """pydicom's header keeps the inflated stream: 4 headers held 512 MiB during find_series."""
    write_deflated_bomb_series(tmp_path / "bombs", 4)
    found, traced = traced_peak(lambda: find_series(tmp_path / "bombs"))
    assert traced < 4 * HEADER_TRACED_MAX, f"{traced / MB:.0f} MiB traced"
    volumes, _ = found
    assert [len(volume.files) for volume in volumes] == [4]


def test_a_deflated_file_reads_in_full_as_pydicom_reads_it(tmp_path):
    paths = write_series(tmp_path / "plain", random_volume(shape=(24, 20, 2)))
    source = pydicom.dcmread(paths[0])
    source.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    source.save_as(tmp_path / "deflated.dcm")
    ours = read_dataset(tmp_path / "deflated.dcm", stop_before_pixels=False)
    theirs = pydicom.dcmread(tmp_path / "deflated.dcm")
    assert ours == theirs and ours.file_meta == theirs.file_meta
    np.testing.assert_array_equal(ours.pixel_array, theirs.pixel_array)


def test_a_stream_that_inflates_beyond_its_header_is_refused_before_it_inflates(tmp_path):
    """The header says 64 x 64 pixels; the PixelData element holds (and declares) 128 MiB."""
    write_deflated_bomb_series(tmp_path / "lie", 2, rows=64, columns=64, zero_bytes=BOMB_PIXEL_BYTES)
    (series,) = find_series(tmp_path / "lie")[0]
    err, traced = traced_peak(lambda: read_series(series))
    assert isinstance(err, InputImageError), err
    assert "inflates beyond 1.1 MB, more than its header declares" in str(err)
    assert str(series.files[0]) in str(err) and "\n" not in str(err)
    assert traced < 4 * MB, f"{traced / MB:.0f} MiB traced"


def test_a_header_declaring_more_than_its_deflated_bytes_can_hold_is_refused(tmp_path):
    """A bomb cut to 16 kB: its header still declares 128 MiB, which 16 kB of deflate cannot make."""
    paths = write_deflated_bomb_series(tmp_path / "cut", 2)
    for path in paths:
        path.write_bytes(path.read_bytes()[:16_000])
    (series,) = find_series(tmp_path / "cut")[0]
    with pytest.raises(InputImageError) as err:
        read_series(series)
    assert f"cannot read {paths[0]} (InflateError: the header declares 8192 x 8192 pixels x 1 frames of 16 bits " \
           "(134.2 MB of pixel data) in 15.6 kB, which deflate cannot expand beyond 16.1 MB: truncated or corrupt" \
        in str(err.value)
    refused, traced = traced_peak(lambda: read_dataset(paths[0], stop_before_pixels=False))
    assert isinstance(refused, ValueError) and "cannot expand" in str(refused)
    assert traced < HEADER_TRACED_MAX


def test_declared_pixels_beyond_a_limit_are_refused_before_they_inflate(tmp_path):
    """The bounded reader on a data set in memory, as the node receives it."""
    from spleen_seg.io.dicom_files import InflateError, check_deflated, read_deflated

    (path,) = write_deflated_bomb_series(tmp_path, 1)
    raw = path.read_bytes()
    start = 132 + 12 + int.from_bytes(raw[140:144], "little")  # after the preamble and file meta group
    for reader in (lambda s: read_deflated(s, "peer", stop_before_pixels=False, max_pixel_bytes=64 * MB),
                   lambda s: check_deflated(s, "peer", max_pixel_bytes=64 * MB)):
        err, traced = traced_peak(lambda reader=reader: reader(io.BytesIO(raw[start:])))
        assert isinstance(err, InflateError) and "(134.2 MB of pixel data), more than the 67.1 MB allowed" in str(err)
        assert traced < HEADER_TRACED_MAX
    header, traced = traced_peak(lambda: check_deflated(io.BytesIO(raw[start:]), "peer", max_pixel_bytes=256 * MB))
    assert (header.Rows, header.Columns) == (BOMB_SIDE, BOMB_SIDE)  # the whole stream checked, counted, dropped
    assert traced < 4 * MB


@pytest.mark.parametrize("multiframe", [False, True])
def test_the_series_geometry_is_checked_before_any_pixel_is_decoded(tmp_path, multiframe):
    """``check_geometry`` sees what ``read_series`` returns; when it raises, nothing was decoded."""
    paths = write_series(tmp_path / "ct", random_volume(shape=(24, 20, 4)))
    folder = tmp_path / ("mf" if multiframe else "ct")
    if multiframe:
        write_multiframe(folder / "IM1", paths)
    seen = []
    array, geometry = read_series(only_series(folder), check_geometry=seen.append)
    assert [g.shape for g in seen] == [geometry.shape] == [array.shape]
    np.testing.assert_allclose(seen[0].affine_ras, geometry.affine_ras, atol=1e-6)

    # The same headers, declaring 4096 x 4096 pixels of zeros (Deflated, 32 MiB a frame).
    bomb = tmp_path / "bomb"
    sources = [folder / "IM1"] if multiframe else paths
    for index, source in enumerate(sources):
        ds = pydicom.dcmread(source)
        frames = int(ds.get("NumberOfFrames", 1))
        del ds.PixelData
        ds.Rows = ds.Columns = 4096
        write_deflated(bomb / f"f{index}.dcm", ds, 4096 * 4096 * 2 * frames)

    class Refused(Exception):
        pass

    def refuse(declared):
        seen.append(declared)
        raise Refused

    err, traced = traced_peak(lambda: read_series(only_series(bomb), check_geometry=refuse))
    assert isinstance(err, Refused), err
    assert seen[-1].shape == (4096, 4096, 4)
    assert traced < 4 * MB, f"{traced / MB:.0f} MiB traced before the geometry was checked"


def test_truncated_deflated_header_is_an_unreadable_file_not_a_crash(tmp_path):
    paths = write_deflated_bomb_series(tmp_path / "cut", 3, rows=64, columns=64)
    paths[1].write_bytes(paths[1].read_bytes()[:400])  # inside the deflated header
    volumes, notices = find_series(tmp_path / "cut")
    assert [len(volume.files) for volume in volumes] == [2]
    assert any(f"skipped file {paths[1]}: unreadable DICOM (InflateError: " in str(n) for n in notices), notices
