"""DICOM SEG written from a mask: header, references, frames decoded back onto the source grid."""

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from synthetic_dicom import (
    REAL_SERIES,
    REAL_SERIES_MASK,
    dciodvfy,
    mask_on_grid,
    only_series,
    random_volume,
    smooth_volume,
    write_multiframe,
    write_series,
)

from spleen_seg.io.dicom import DicomSeries, find_series
from spleen_seg.io.dicom_volume import read_series
from spleen_seg.io.seg import AlgorithmInfo, write_dicom_seg

ALGORITHM = AlgorithmInfo(name="spleen-seg", version="0.1.0", weights_sha256="ab" * 32)


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
    write_series(tmp_path / "ct", random_volume(shape=(6, 5, 4)), study_uid="1.2.3.77")
    series = only_series(tmp_path / "ct")
    mask = np.zeros((6, 5, 4), dtype=np.uint8)
    mask[1:4, 2:5, 1:3] = 1
    mask[0, 0, 1] = 1
    dest = write_dicom_seg(mask, series, tmp_path / "out" / "seg.dcm", ALGORITHM)
    _check_seg_header(dest, series, study_uid="1.2.3.77")
    np.testing.assert_array_equal(_decode_seg(dest, series), mask)
    assert [p.name for p in dest.parent.iterdir()] == ["seg.dcm"]
    errors, _ = dciodvfy(dest)
    assert errors == []


def test_empty_mask_still_gives_a_valid_seg(tmp_path):
    write_series(tmp_path / "ct", random_volume(), study_uid="1.2.3.77")
    series = only_series(tmp_path / "ct")
    dest = write_dicom_seg(np.zeros((6, 5, 4), dtype=np.uint8), series, tmp_path / "seg.dcm", ALGORITHM)
    seg = _check_seg_header(dest, series, study_uid="1.2.3.77")
    assert seg.NumberOfFrames == 4
    assert not _decode_seg(dest, series).any()
    errors, _ = dciodvfy(dest)
    assert errors == []


def test_seg_rejects_a_mask_on_another_grid(tmp_path):
    write_series(tmp_path / "ct", random_volume())
    with pytest.raises(ValueError, match="differs from the grid"):
        write_dicom_seg(np.zeros((5, 6, 4), dtype=np.uint8), only_series(tmp_path / "ct"), tmp_path / "seg.dcm", ALGORITHM)
    assert not (tmp_path / "seg.dcm").exists()


@pytest.fixture(scope="module")
def real_series() -> tuple[DicomSeries, np.ndarray, object]:
    if not REAL_SERIES.is_dir() or not REAL_SERIES_MASK.exists():
        pytest.skip(f"shared DICOM test data not found: {REAL_SERIES} (only present beside the project checkout)")
    series, messages = find_series(REAL_SERIES)
    assert len(series) == 1 and "derived UIDs are used instead" in messages[0].text
    array, geo = read_series(series[0])
    return series[0], array, geo


def test_seg_round_trip_on_real_series(real_series, tmp_path):
    series, _, geo = real_series
    mask = mask_on_grid(geo)
    dest = write_dicom_seg(mask, series, tmp_path / "spleen.seg.dcm", ALGORITHM)
    seg = _check_seg_header(dest, series)
    source_uids = {pydicom.dcmread(f, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID for f in series.files}
    referenced = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == source_uids
    np.testing.assert_array_equal(_decode_seg(dest, series), mask)
    # The anonymised source lacks Patient ID and Study ID, and carries a private coding
    # scheme (SECTRA) that the SEG copies: warnings, not errors.
    errors, warnings = dciodvfy(dest)
    assert errors == [] and len(warnings) <= 3, warnings


@pytest.mark.parametrize("enhanced", [False, True])
def test_seg_of_a_multiframe_ct_references_its_frames(tmp_path, enhanced):
    """Legacy Converted Enhanced CT (frames in decreasing position) or Enhanced CT: frame f of the
    SEG lies on and references the source frame holding the same slice."""
    paths = write_series(tmp_path / "ct", smooth_volume(shape=(24, 20, 5)), study_uid="1.2.3.77")
    source = write_multiframe(tmp_path / "mf" / "ct.dcm", paths, enhanced=enhanced)
    series = only_series(source.parent)
    image, geometry = read_series(series)
    mask = np.zeros(image.shape, dtype=np.uint8)
    mask[3:9, 4:12, 1:4] = 1
    mask[0, 0, 0] = 1
    dest = write_dicom_seg(mask, series, tmp_path / "seg.dcm", ALGORITHM)
    seg = pydicom.dcmread(dest)
    source_ds = pydicom.dcmread(source, stop_before_pixels=True)
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source_ds.SOPInstanceUID
    decoded = np.zeros_like(mask)
    frames = seg.pixel_array.reshape(-1, *mask.shape[1::-1])
    inverse = np.linalg.inv(np.diag([-1.0, -1.0, 1.0, 1.0]) @ geometry.affine_ras)
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        reference = item.DerivationImageSequence[0].SourceImageSequence[0]
        source_frame = source_ds.PerFrameFunctionalGroupsSequence[int(reference.ReferencedFrameNumber) - 1]
        position = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float)
        np.testing.assert_allclose(position, np.asarray(source_frame.PlanePositionSequence[0].ImagePositionPatient, float))
        k = int(round((inverse @ [*position, 1.0])[2]))
        decoded[:, :, k] = frame.T
    np.testing.assert_array_equal(decoded, mask)
    errors, _ = dciodvfy(dest)
    assert errors == []


