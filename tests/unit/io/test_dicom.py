import os
import random
import shutil
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.orientations import io_orientation, ornt_transform
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from spleen_seg.errors import InputImageError
from spleen_seg.io.dicom import (
    AlgorithmInfo,
    DicomSeries,
    find_series,
    is_dicom_folder,
    read_series,
    write_dicom_seg,
    write_stl,
)

SHARED = Path(os.environ.get("SPLEEN_SEG_SHARED", Path(__file__).resolve().parents[3].parent / "shared"))
REAL_SERIES = SHARED / "data" / "real_ct" / "dicom_series"
REAL_SERIES_MASK = SHARED / "data" / "real_ct" / "dicom_series_spleen.nii.gz"
ALGORITHM = AlgorithmInfo(name="spleen-seg", version="0.1.0", weights_sha256="ab" * 32)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SPACING = (0.8, 0.7, 2.0)  # between columns, between rows, between slices
ORIGIN = (-100.0, -80.0, 50.0)


def _volume(shape=(6, 5, 4), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 1500, size=shape).astype(np.float32)


def _write_series(folder: Path, hu: np.ndarray, *, modality="CT", series_uid=None, study_uid="1.2.3.4",
                  orientation=AXIAL, spacing=SPACING, origin=ORIGIN, positions=None, intercept=-1024.0,
                  slope=1.0, description="synthetic", names=None) -> list[Path]:
    """Write ``hu`` (X=columns, Y=rows, Z=slices) as one single-frame DICOM file per slice."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid() if series_uid is None else series_uid
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    row_dir, col_dir = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    normal = np.cross(row_dir, col_dir)
    paths = []
    for k in range(hu.shape[2]):
        position = np.asarray(origin) + (positions[k] if positions is not None else k * spacing[2]) * normal
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = modality, description, 3, k + 1
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, "1.2.3.5"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Test", "P1", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "20240101", "120000", "1", "", ""
        ds.Manufacturer = "test"
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.PixelSpacing = [spacing[1], spacing[0]]  # (between rows, between columns)
        ds.SliceThickness = spacing[2]
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = intercept, slope, "HU"
        ds.PixelData = np.round((hu[:, :, k].T - intercept) / slope).astype(np.uint16).tobytes()
        path = folder / (names[k] if names is not None else f"slice_{k:03d}.dcm")
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _expected_affine_ras(orientation=AXIAL, spacing=SPACING, origin=ORIGIN) -> np.ndarray:
    row_dir, col_dir = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = row_dir * spacing[0], col_dir * spacing[1]
    lps[:3, 2], lps[:3, 3] = np.cross(row_dir, col_dir) * spacing[2], origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _only_series(folder: Path) -> DicomSeries:
    series, _ = find_series(folder)
    assert len(series) == 1
    return series[0]


# --- synthetic series -----------------------------------------------------------------


def test_read_series_returns_hu_and_geometry(tmp_path):
    hu = _volume()
    _write_series(tmp_path / "ct", hu)
    array, geo = read_series(_only_series(tmp_path / "ct"))
    assert array.dtype == np.float32 and array.shape == geo.shape == hu.shape
    np.testing.assert_array_equal(array, hu)
    np.testing.assert_allclose(geo.affine_ras, _expected_affine_ras(), atol=1e-6)
    assert geo.axcodes == "LPS" and geo.spacing_mm == pytest.approx(SPACING)


def test_rescale_slope_and_intercept_are_applied(tmp_path):
    hu = np.round(_volume() / 2) * 2  # representable with slope 2
    _write_series(tmp_path / "ct", hu, slope=2.0, intercept=-2048.0)
    array, _ = read_series(_only_series(tmp_path / "ct"))
    np.testing.assert_array_equal(array, hu)
    assert array.min() < -990  # uint16 storage, negative HU only through the intercept


def test_oblique_series_affine_follows_dicom_orientation(tmp_path):
    angle = np.deg2rad(20)
    orientation = (np.cos(angle), np.sin(angle), 0.0, 0.0, np.cos(angle), -np.sin(angle))
    row_dir, col_dir = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    col_dir = col_dir - row_dir * np.dot(row_dir, col_dir)
    orientation = (*row_dir, *(col_dir / np.linalg.norm(col_dir)))
    _write_series(tmp_path / "ct", _volume(), orientation=orientation)
    _, geo = read_series(_only_series(tmp_path / "ct"))
    np.testing.assert_allclose(geo.affine_ras, _expected_affine_ras(orientation), atol=1e-5)


def test_shuffled_names_and_nested_folders_read_identically(tmp_path):
    hu = _volume(shape=(6, 5, 7))
    _write_series(tmp_path / "ordered", hu, series_uid="1.2.3.9")
    random_names = [f"{sub}/{name}" for sub, name in zip("abcabca", ["x9", "q1", "IM0004", "z", "17.dcm", "aa", "m.IMA"], strict=True)]
    _write_series(tmp_path / "messy", hu, series_uid="1.2.3.9", names=random.Random(1).sample(random_names, 7))
    (tmp_path / "messy" / "README.txt").write_text("not dicom")
    expected_array, expected_geo = read_series(_only_series(tmp_path / "ordered"))
    messy = _only_series(tmp_path / "messy")
    array, geo = read_series(messy)
    np.testing.assert_array_equal(array, expected_array)
    np.testing.assert_array_equal(geo.affine_ras, expected_geo.affine_ras)
    positions = [float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in messy.files]
    assert positions == sorted(positions)


def test_descending_positions_are_sorted_increasing(tmp_path):
    hu = _volume()
    _write_series(tmp_path / "ct", hu[:, :, ::-1], positions=[6.0, 4.0, 2.0, 0.0])
    array, geo = read_series(_only_series(tmp_path / "ct"))
    np.testing.assert_array_equal(array, hu)
    np.testing.assert_allclose(geo.affine_ras, _expected_affine_ras(), atol=1e-6)


@pytest.mark.parametrize("positions, message", [
    ([0.0, 2.0, 6.0, 8.0], r"missing slice: gap of 4\.0 mm between positions 52\.00 and 56\.00 mm where spacing is 2\.0 mm"),
    ([0.0, 2.0, 2.0, 4.0], "duplicate slice position"),
    ([0.0, 2.0, 4.0, 7.0], "uneven slice spacing: gap of 3.0 mm"),
])
def test_bad_slice_positions_are_rejected(tmp_path, positions, message):
    _write_series(tmp_path / "ct", _volume(), positions=positions)
    with pytest.raises(InputImageError, match=message) as err:
        read_series(_only_series(tmp_path / "ct"))
    assert str(tmp_path / "ct") in str(err.value)


def test_single_slice_is_not_a_volume(tmp_path):
    _write_series(tmp_path / "ct", _volume(shape=(6, 5, 1)))
    with pytest.raises(InputImageError, match="single slice is not a 3D volume"):
        read_series(_only_series(tmp_path / "ct"))


def test_constant_image_is_rejected(tmp_path):
    _write_series(tmp_path / "ct", np.full((6, 5, 4), 40.0, dtype=np.float32))
    with pytest.raises(InputImageError, match="constant"):
        read_series(_only_series(tmp_path / "ct"))


@pytest.mark.parametrize("tag, value, message", [
    ("ImageOrientationPatient", [0, 1, 0, 0, 0, -1], "inconsistent ImageOrientationPatient"),
    ("PixelSpacing", [0.5, 0.5], "inconsistent PixelSpacing"),
])
def test_mixed_slice_geometry_is_rejected(tmp_path, tag, value, message):
    paths = _write_series(tmp_path / "ct", _volume())
    ds = pydicom.dcmread(paths[2])
    setattr(ds, tag, value)
    ds.save_as(paths[2])
    with pytest.raises(InputImageError, match=message):
        read_series(_only_series(tmp_path / "ct"))


def test_two_series_in_one_folder(tmp_path):
    first, second = _volume(seed=1), _volume(shape=(4, 4, 3), seed=2)
    _write_series(tmp_path / "study", first, series_uid="1.2.3.100", description="first", names=[f"a{k}" for k in range(4)])
    _write_series(tmp_path / "study", second, series_uid="1.2.3.200", description="second", spacing=(1.0, 1.0, 3.0),
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
    _write_series(tmp_path / "ct", _volume(), series_uid="1.2.3.100")
    _write_series(tmp_path / "mr", _volume(), series_uid="1.2.3.300", modality="MR", description="T1 axial")
    series, messages = find_series(tmp_path)
    assert [s.series_uid for s in series] == ["1.2.3.100"] and series[0].modality == "CT"
    assert messages == ["skipped series 1.2.3.300 (MR, 'T1 axial'): not CT"]


def test_only_mr_is_rejected(tmp_path):
    _write_series(tmp_path / "mr", _volume(), modality="MR", description="T1 axial")
    with pytest.raises(InputImageError, match="no CT series found.*not CT"):
        find_series(tmp_path)


def test_secondary_capture_with_ct_modality_is_skipped(tmp_path):
    paths = _write_series(tmp_path / "sc", _volume(), series_uid="1.2.3.400")
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        ds.save_as(path)
    with pytest.raises(InputImageError, match="secondary capture"):
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
    paths = _write_series(tmp_path / "nested" / "deeper", _volume())
    assert is_dicom_folder(tmp_path / "nested")
    assert not is_dicom_folder(tmp_path / "empty")
    assert not is_dicom_folder(tmp_path / "text")
    assert not is_dicom_folder(paths[0])


def test_missing_series_uid_is_derived_deterministically(tmp_path):
    hu = _volume()
    _write_series(tmp_path / "anon", hu, series_uid="", study_uid="")
    first, second = _only_series(tmp_path / "anon"), _only_series(tmp_path / "anon")
    assert first.series_uid == second.series_uid and pydicom.uid.UID(first.series_uid).is_valid
    assert first.missing_uids == ("SeriesInstanceUID", "StudyInstanceUID")
    np.testing.assert_array_equal(read_series(first)[0], hu)


def test_duplicate_copies_are_ignored(tmp_path):
    paths = _write_series(tmp_path / "ct", _volume())
    (tmp_path / "ct" / "copy").mkdir()
    shutil.copy(paths[1], tmp_path / "ct" / "copy" / "again.dcm")
    series, messages = find_series(tmp_path / "ct")
    assert len(series[0].files) == 4
    assert len(messages) == 1 and "duplicate copy" in messages[0]


# --- DICOM SEG ------------------------------------------------------------------------


def _decode_seg(path: Path, series: DicomSeries) -> np.ndarray:
    """Rebuild the (X, Y, Z) mask from the SEG frames via each frame's referenced source slice."""
    seg = pydicom.dcmread(path)
    source_uids = [pydicom.dcmread(f, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID for f in series.files]
    first = pydicom.dcmread(series.files[0], stop_before_pixels=True)
    volume = np.zeros((first.Columns, first.Rows, len(series.files)), dtype=np.uint8)
    frames = seg.pixel_array.reshape(-1, first.Rows, first.Columns)
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        source = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = source_uids.index(source)
        position = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        np.testing.assert_allclose(position, np.asarray(pydicom.dcmread(series.files[k]).ImagePositionPatient, dtype=float))
        volume[:, :, k] = frame.T
    return volume


def _check_seg_header(path: Path, series: DicomSeries, study_uid: str | None = None) -> hd.seg.Segmentation:
    seg = hd.seg.segread(path)
    source = pydicom.dcmread(series.files[0], stop_before_pixels=True)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.SegmentationType == "BINARY"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series.series_uid
    assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == len(series.files)
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    if study_uid is not None:
        assert seg.StudyInstanceUID == study_uid
    assert seg.Manufacturer == "spleen-seg"
    segment = seg.SegmentSequence[0]
    assert len(seg.SegmentSequence) == 1 and segment.SegmentLabel == "Spleen"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "78961009"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (ALGORITHM.name, ALGORITHM.version)
    assert ALGORITHM.weights_sha256 in algorithm.AlgorithmParameters
    return seg


def test_seg_round_trip_on_synthetic_series(tmp_path):
    _write_series(tmp_path / "ct", _volume(shape=(6, 5, 4)), study_uid="1.2.3.77")
    series = _only_series(tmp_path / "ct")
    mask = np.zeros((6, 5, 4), dtype=np.uint8)
    mask[1:4, 2:5, 1:3] = 1
    mask[0, 0, 1] = 1
    dest = write_dicom_seg(mask, series, tmp_path / "out" / "seg.dcm", ALGORITHM)
    _check_seg_header(dest, series, study_uid="1.2.3.77")
    np.testing.assert_array_equal(_decode_seg(dest, series), mask)
    assert [p.name for p in dest.parent.iterdir()] == ["seg.dcm"]


def test_empty_mask_still_gives_a_valid_seg(tmp_path):
    _write_series(tmp_path / "ct", _volume(), study_uid="1.2.3.77")
    series = _only_series(tmp_path / "ct")
    dest = write_dicom_seg(np.zeros((6, 5, 4), dtype=np.uint8), series, tmp_path / "seg.dcm", ALGORITHM)
    seg = _check_seg_header(dest, series, study_uid="1.2.3.77")
    assert seg.NumberOfFrames == 4
    assert not _decode_seg(dest, series).any()


def test_seg_rejects_a_mask_on_another_grid(tmp_path):
    _write_series(tmp_path / "ct", _volume())
    with pytest.raises(ValueError, match="differs from the grid"):
        write_dicom_seg(np.zeros((5, 6, 4), dtype=np.uint8), _only_series(tmp_path / "ct"), tmp_path / "seg.dcm", ALGORITHM)
    assert not (tmp_path / "seg.dcm").exists()


# --- real CT series -------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_series() -> tuple[DicomSeries, np.ndarray, object]:
    if not REAL_SERIES.is_dir() or not REAL_SERIES_MASK.exists():
        pytest.skip(f"shared DICOM test data not found: {REAL_SERIES} (only present beside the project checkout)")
    series, messages = find_series(REAL_SERIES)
    assert len(series) == 1 and messages == []
    array, geo = read_series(series[0])
    return series[0], array, geo


def _mask_on_grid(geo) -> np.ndarray:
    """The shared mask (LAS) reoriented onto our grid, after checking both grids are the same voxels."""
    image = nib.load(REAL_SERIES_MASK)
    reoriented = image.as_reoriented(ornt_transform(io_orientation(image.affine), io_orientation(geo.affine_ras)))
    np.testing.assert_allclose(reoriented.affine, geo.affine_ras, atol=0.01)
    corners = np.array([[i, j, k] for i in (0, 511) for j in (0, 511) for k in (0, 19)] + [[256, 256, 10]], dtype=float)
    ours = corners @ geo.affine_ras[:3, :3].T + geo.affine_ras[:3, 3]
    in_mask = nib.affines.apply_affine(np.linalg.inv(image.affine), ours)
    np.testing.assert_allclose(in_mask, np.round(in_mask), atol=0.01 / 0.9765625)  # lands on voxel centres
    mask = np.asarray(reoriented.dataobj, dtype=np.uint8)
    # The same voxel, found through world coordinates, holds the same label.
    for corner, index in zip(corners.astype(int), np.round(in_mask).astype(int), strict=True):
        assert mask[tuple(corner)] == np.asarray(image.dataobj)[tuple(index)]
    return mask


def test_real_series_volume_and_geometry(real_series):
    series, array, geo = real_series
    assert series.modality == "CT" and len(series.files) == 20
    assert set(series.missing_uids) == {"SeriesInstanceUID", "StudyInstanceUID"}  # anonymised files
    assert array.shape == geo.shape == (512, 512, 20)
    assert geo.spacing_mm == pytest.approx((0.9765625, 0.9765625, 2.0))
    assert array.min() <= -1000 + 50 and array.max() > 300
    mask = _mask_on_grid(geo)
    assert mask.shape == array.shape and 100_000 < mask.sum() < 200_000
    assert 0 < np.median(array[mask > 0]) < 200  # spleen parenchyma in HU


def test_seg_round_trip_on_real_series(real_series, tmp_path):
    series, _, geo = real_series
    mask = _mask_on_grid(geo)
    dest = write_dicom_seg(mask, series, tmp_path / "spleen.seg.dcm", ALGORITHM)
    seg = _check_seg_header(dest, series)
    source_uids = {pydicom.dcmread(f, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID for f in series.files}
    referenced = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == source_uids
    np.testing.assert_array_equal(_decode_seg(dest, series), mask)


# --- STL ------------------------------------------------------------------------------


def _read_stl(path: Path) -> tuple[np.ndarray, np.ndarray]:
    data = path.read_bytes()
    count = int(np.frombuffer(data, dtype="<u4", count=1, offset=80)[0])
    assert len(data) == 84 + 50 * count
    records = np.frombuffer(data, dtype=np.dtype([("n", "<f4", (3,)), ("v", "<f4", (3, 3)), ("a", "<u2")]), offset=84)
    return records["n"].astype(np.float64), records["v"].astype(np.float64)


@pytest.mark.parametrize("axis_signs", [(-1, 1, 1), (1, 1, 1), (-1, -1, 1)], ids=["LAS", "RAS", "LPS"])
def test_stl_of_a_sphere_has_its_volume_centroid_and_outward_normals(tmp_path, axis_signs):
    spacing, radius_mm = np.array([0.9, 1.1, 2.5]), 15.0
    affine_ras = np.diag([*(np.asarray(axis_signs) * spacing), 1.0])  # both handednesses
    affine_ras[:3, 3] = (120.0, -40.0, 300.0)
    centre_voxel = np.array([20.3, 17.6, 9.2])
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in (40, 36, 20)], indexing="ij"), axis=-1)
    mask = (np.linalg.norm((grid - centre_voxel) * spacing, axis=-1) <= radius_mm).astype(np.uint8)
    normals, triangles = _read_stl(write_stl(mask, affine_ras, tmp_path / "sphere.stl"))

    volume = np.einsum("ij,ij->i", triangles[:, 0], np.cross(triangles[:, 1], triangles[:, 2])).sum() / 6.0
    assert volume == pytest.approx(mask.sum() * spacing.prod(), rel=0.05)
    assert volume == pytest.approx(4 / 3 * np.pi * radius_mm**3, rel=0.05)
    centre_lps = (affine_ras[:3, :3] @ centre_voxel + affine_ras[:3, 3]) * np.array([-1, -1, 1])
    areas = np.linalg.norm(np.cross(triangles[:, 1] - triangles[:, 0], triangles[:, 2] - triangles[:, 0]), axis=1) / 2
    centroid = (triangles.mean(axis=1) * areas[:, None]).sum(axis=0) / areas.sum()
    np.testing.assert_allclose(centroid, centre_lps, atol=1.0)
    outward = np.einsum("ij,ij->i", normals, triangles.mean(axis=1) - centre_lps)
    assert (outward[areas > 1e-6] > 0).mean() > 0.99


def test_stl_of_an_empty_mask_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        write_stl(np.zeros((4, 4, 4), dtype=np.uint8), np.eye(4), tmp_path / "empty.stl")
    assert not (tmp_path / "empty.stl").exists()


def test_undecodable_pixel_data_names_the_transfer_syntax(tmp_path):
    paths = _write_series(tmp_path / "ct", _volume())
    ds = pydicom.dcmread(paths[1])
    # Not valid JPEG Lossless data: either no decoder is installed or decoding fails.
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGLosslessSV1
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8 not really jpeg \xff\xd9"])
    ds.save_as(paths[1])
    with pytest.raises(InputImageError, match=f"cannot decode the pixels of .*{paths[1].name}.*{pydicom.uid.JPEGLosslessSV1}"):
        read_series(_only_series(tmp_path / "ct"))


@pytest.mark.parametrize("shift_y_mm, ok", [([0.0, 0.5, 1.0, 1.5], True), ([0.0, 0.5, 0.0, 0.5], False)])
def test_in_plane_shift_gives_a_sheared_affine_or_an_error(tmp_path, shift_y_mm, ok):
    paths = _write_series(tmp_path / "ct", _volume())
    for path, shift in zip(paths, shift_y_mm, strict=True):
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient = [ds.ImagePositionPatient[0], float(ds.ImagePositionPatient[1]) + shift, ds.ImagePositionPatient[2]]
        ds.save_as(path)
    series = _only_series(tmp_path / "ct")
    if not ok:
        with pytest.raises(InputImageError, match="do not lie on a straight line"):
            read_series(series)
        return
    _, geo = read_series(series)  # gantry tilt: slice k's corner is exactly its ImagePositionPatient
    for k, path in enumerate(series.files):
        lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ geo.affine_ras @ np.array([0.0, 0.0, k, 1.0])
        np.testing.assert_allclose(lps[:3], np.asarray(pydicom.dcmread(path).ImagePositionPatient, dtype=float), atol=1e-6)
