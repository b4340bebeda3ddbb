"""Reading DICOM CT series: finding series in folders, geometry, checks on what is not a volume."""

import logging
import random
import shutil

import numpy as np
import pydicom
import pytest
from synthetic_dicom import (
    REAL_SERIES,
    REAL_SERIES_MASK,
    SPACING,
    expected_affine_ras,
    mask_on_grid,
    only_series,
    random_volume,
    write_series,
)

from spleen_seg.errors import InputImageError
from spleen_seg.io.dicom import DicomSeries, find_series, is_dicom_folder
from spleen_seg.io.dicom_volume import read_series


@pytest.fixture(scope="module")
def real_series() -> tuple[DicomSeries, np.ndarray, object]:
    if not REAL_SERIES.is_dir() or not REAL_SERIES_MASK.exists():
        pytest.skip(f"shared DICOM test data not found: {REAL_SERIES} (only present beside the project checkout)")
    series, messages = find_series(REAL_SERIES)
    assert len(series) == 1 and [m.level for m in messages] == [logging.WARNING]
    assert "files lack SeriesInstanceUID, StudyInstanceUID (anonymised?); derived UIDs are used instead" in messages[0].text
    array, geo = read_series(series[0])
    return series[0], array, geo


# --- synthetic series -----------------------------------------------------------------


def test_read_series_returns_hu_and_geometry(tmp_path):
    hu = random_volume()
    write_series(tmp_path / "ct", hu)
    array, geo = read_series(only_series(tmp_path / "ct"))
    assert array.dtype == np.float32 and array.shape == geo.shape == hu.shape
    np.testing.assert_array_equal(array, hu)
    np.testing.assert_allclose(geo.affine_ras, expected_affine_ras(), atol=1e-6)
    assert geo.axcodes == "LPS" and geo.spacing_mm == pytest.approx(SPACING)


def test_rescale_slope_and_intercept_are_applied(tmp_path):
    hu = np.round(random_volume() / 2) * 2  # representable with slope 2
    write_series(tmp_path / "ct", hu, slope=2.0, intercept=-2048.0)
    array, _ = read_series(only_series(tmp_path / "ct"))
    np.testing.assert_array_equal(array, hu)
    assert array.min() < -990  # uint16 storage, negative HU only through the intercept


def test_oblique_series_affine_follows_dicom_orientation(tmp_path):
    angle = np.deg2rad(20)
    orientation = (np.cos(angle), np.sin(angle), 0.0, 0.0, np.cos(angle), -np.sin(angle))
    row_dir, col_dir = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    col_dir = col_dir - row_dir * np.dot(row_dir, col_dir)
    orientation = (*row_dir, *(col_dir / np.linalg.norm(col_dir)))
    write_series(tmp_path / "ct", random_volume(), orientation=orientation)
    _, geo = read_series(only_series(tmp_path / "ct"))
    np.testing.assert_allclose(geo.affine_ras, expected_affine_ras(orientation), atol=1e-5)


def test_shuffled_names_and_nested_folders_read_identically(tmp_path):
    hu = random_volume(shape=(6, 5, 7))
    write_series(tmp_path / "ordered", hu, series_uid="1.2.3.9")
    random_names = [f"{sub}/{name}" for sub, name in zip("abcabca", ["x9", "q1", "IM0004", "z", "17.dcm", "aa", "m.IMA"], strict=True)]
    write_series(tmp_path / "messy", hu, series_uid="1.2.3.9", names=random.Random(1).sample(random_names, 7))
    (tmp_path / "messy" / "README.txt").write_text("not dicom")
    expected_array, expected_geo = read_series(only_series(tmp_path / "ordered"))
    messy = only_series(tmp_path / "messy")
    array, geo = read_series(messy)
    np.testing.assert_array_equal(array, expected_array)
    np.testing.assert_array_equal(geo.affine_ras, expected_geo.affine_ras)
    positions = [float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in messy.files]
    assert positions == sorted(positions)


def test_descending_positions_are_sorted_increasing(tmp_path):
    hu = random_volume()
    write_series(tmp_path / "ct", hu[:, :, ::-1], positions=[6.0, 4.0, 2.0, 0.0])
    array, geo = read_series(only_series(tmp_path / "ct"))
    np.testing.assert_array_equal(array, hu)
    np.testing.assert_allclose(geo.affine_ras, expected_affine_ras(), atol=1e-6)


@pytest.mark.parametrize("positions, message", [
    ([0.0, 2.0, 6.0, 8.0], r"missing slice: gap of 4\.0 mm between positions 52\.00 and 56\.00 mm where spacing is 2\.0 mm"),
    ([0.0, 2.0, 2.0, 4.0], r"2 files at the same position \(52\.00 mm\) hold different images \(.*slice_001.dcm, .*slice_002.dcm\)"),
    ([0.0, 2.0, 4.0, 7.0], "uneven slice spacing: gap of 3.0 mm"),
])
def test_bad_slice_positions_are_rejected(tmp_path, positions, message):
    write_series(tmp_path / "ct", random_volume(), positions=positions)
    with pytest.raises(InputImageError, match=message) as err:
        read_series(only_series(tmp_path / "ct"))
    assert str(tmp_path / "ct") in str(err.value)


def test_single_slice_is_not_a_volume(tmp_path):
    write_series(tmp_path / "ct", random_volume(shape=(6, 5, 1)))
    with pytest.raises(InputImageError, match="single slice is not a 3D volume"):
        read_series(only_series(tmp_path / "ct"))


def test_constant_image_is_rejected(tmp_path):
    write_series(tmp_path / "ct", np.full((6, 5, 4), 40.0, dtype=np.float32))
    with pytest.raises(InputImageError, match="constant"):
        read_series(only_series(tmp_path / "ct"))


@pytest.mark.parametrize("tag, value, message", [
    ("ImageOrientationPatient", [0, 1, 0, 0, 0, -1], "inconsistent ImageOrientationPatient"),
    ("PixelSpacing", [0.5, 0.5], "inconsistent PixelSpacing"),
])
def test_mixed_slice_geometry_is_rejected(tmp_path, tag, value, message):
    # Two slices of four: no orientation is the series' majority, so none is taken for a localizer.
    paths = write_series(tmp_path / "ct", random_volume())
    for path in paths[2:]:
        ds = pydicom.dcmread(path)
        setattr(ds, tag, value)
        ds.save_as(path)
    with pytest.raises(InputImageError, match=message):
        read_series(only_series(tmp_path / "ct"))


def test_two_series_in_one_folder(tmp_path):
    first, second = random_volume(seed=1), random_volume(shape=(4, 4, 3), seed=2)
    write_series(tmp_path / "study", first, series_uid="1.2.3.100", description="first", names=[f"a{k}" for k in range(4)])
    write_series(tmp_path / "study", second, series_uid="1.2.3.200", description="second", spacing=(1.0, 1.0, 3.0),
                  names=[f"b{k}" for k in range(3)])
    series, messages = find_series(tmp_path)
    assert messages == []
    by_uid = {s.series_uid: s for s in series}
    assert set(by_uid) == {"1.2.3.100", "1.2.3.200"} and by_uid["1.2.3.100"].description == "first"
    np.testing.assert_array_equal(read_series(by_uid["1.2.3.100"])[0], first)
    array, geo = read_series(by_uid["1.2.3.200"])
    np.testing.assert_array_equal(array, second)
    assert geo.spacing_mm == pytest.approx((1.0, 1.0, 3.0))


def test_mr_series_is_skipped_with_a_message(tmp_path):
    write_series(tmp_path / "ct", random_volume(), series_uid="1.2.3.100")
    write_series(tmp_path / "mr", random_volume(), series_uid="1.2.3.300", modality="MR", description="T1 axial")
    series, messages = find_series(tmp_path)
    assert [s.series_uid for s in series] == ["1.2.3.100"] and series[0].modality == "CT"
    assert [(m.level, m.text) for m in messages] == [
        (logging.INFO, f"skipped series 1.2.3.300 (MR, 'T1 axial') in {tmp_path / 'mr'}: 4 file(s), MR Image Storage, not a CT image")]


def test_only_mr_is_rejected(tmp_path):
    write_series(tmp_path / "mr", random_volume(), modality="MR", description="T1 axial")
    with pytest.raises(InputImageError, match="no CT series found.*MR Image Storage, not a CT image"):
        find_series(tmp_path)


def test_secondary_capture_with_ct_modality_is_skipped(tmp_path):
    paths = write_series(tmp_path / "sc", random_volume(), series_uid="1.2.3.400")
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        ds.save_as(path)
    with pytest.raises(InputImageError, match="4 file.*, Secondary Capture Image Storage, not a CT image"):
        find_series(tmp_path)


def test_folder_without_dicom_is_rejected(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputImageError, match="no DICOM image files found"):
        find_series(tmp_path)
    with pytest.raises(InputImageError, match="not a folder"):
        find_series(tmp_path / "missing")


def test_is_dicom_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("x" * 200)
    paths = write_series(tmp_path / "nested" / "deeper", random_volume())
    assert is_dicom_folder(tmp_path / "nested")
    assert not is_dicom_folder(tmp_path / "empty")
    assert not is_dicom_folder(tmp_path / "text")
    assert not is_dicom_folder(paths[0])


def test_missing_series_uid_is_derived_deterministically(tmp_path):
    hu = random_volume()
    write_series(tmp_path / "anon", hu, series_uid="", study_uid="")
    first, second = only_series(tmp_path / "anon"), only_series(tmp_path / "anon")
    assert first.series_uid == second.series_uid and pydicom.uid.UID(first.series_uid).is_valid
    assert first.missing_uids == ("SeriesInstanceUID", "StudyInstanceUID")
    np.testing.assert_array_equal(read_series(first)[0], hu)


def test_duplicate_copies_are_ignored(tmp_path):
    paths = write_series(tmp_path / "ct", random_volume())
    (tmp_path / "ct" / "copy").mkdir()
    shutil.copy(paths[1], tmp_path / "ct" / "copy" / "again.dcm")
    series, messages = find_series(tmp_path / "ct")
    assert len(series[0].files) == 4
    assert len(messages) == 1 and messages[0].level == logging.INFO
    assert f"read once 1 file(s) with the SOPInstanceUID of another (duplicate copies), e.g. {tmp_path / 'ct' / 'copy' / 'again.dcm'}" in messages[0].text


def test_real_series_volume_and_geometry(real_series):
    series, array, geo = real_series
    assert series.modality == "CT" and len(series.files) == 20
    assert set(series.missing_uids) == {"SeriesInstanceUID", "StudyInstanceUID"}  # anonymised files
    assert array.shape == geo.shape == (512, 512, 20)
    assert geo.spacing_mm == pytest.approx((0.9765625, 0.9765625, 2.0))
    assert array.min() <= -1000 + 50 and array.max() > 300
    mask = mask_on_grid(geo)
    assert mask.shape == array.shape and 100_000 < mask.sum() < 200_000
    assert 0 < np.median(array[mask > 0]) < 200  # spleen parenchyma in HU


def test_undecodable_pixel_data_names_the_transfer_syntax(tmp_path):
    paths = write_series(tmp_path / "ct", random_volume())
    ds = pydicom.dcmread(paths[1])
    # Not valid JPEG Lossless data: either no decoder is installed or decoding fails.
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGLosslessSV1
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8 not really jpeg \xff\xd9"])
    ds.save_as(paths[1])
    with pytest.raises(InputImageError, match=f"cannot decode the pixels of .*{paths[1].name}.*{pydicom.uid.JPEGLosslessSV1}"):
        read_series(only_series(tmp_path / "ct"))


@pytest.mark.parametrize("shift_y_mm, ok", [([0.0, 0.5, 1.0, 1.5], True), ([0.0, 0.5, 0.0, 0.5], False)])
def test_in_plane_shift_gives_a_sheared_affine_or_an_error(tmp_path, shift_y_mm, ok):
    paths = write_series(tmp_path / "ct", random_volume())
    for path, shift in zip(paths, shift_y_mm, strict=True):
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient = [ds.ImagePositionPatient[0], float(ds.ImagePositionPatient[1]) + shift, ds.ImagePositionPatient[2]]
        ds.save_as(path)
    series = only_series(tmp_path / "ct")
    if not ok:
        with pytest.raises(InputImageError, match="do not lie on a straight line"):
            read_series(series)
        return
    _, geo = read_series(series)  # gantry tilt: slice k's corner is exactly its ImagePositionPatient
    for k, path in enumerate(series.files):
        lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ geo.affine_ras @ np.array([0.0, 0.0, k, 1.0])
        np.testing.assert_allclose(lps[:3], np.asarray(pydicom.dcmread(path).ImagePositionPatient, dtype=float), atol=1e-6)
