"""Multi-frame (enhanced) CT: read as one volume on the same grid as its single-frame series, or a clear error."""

import shutil

import numpy as np
import pydicom
import pytest
from synthetic_dicom import only_series, smooth_volume, write_multiframe, write_series

from spleen_seg.errors import InputImageError
from spleen_seg.io.dicom import find_series
from spleen_seg.io.dicom_volume import read_series


@pytest.mark.parametrize("enhanced", [False, True])
def test_multiframe_ct_reads_like_its_single_frame_series(tmp_path, enhanced):
    hu = smooth_volume(shape=(24, 20, 5))
    angle = np.deg2rad(10)  # oblique, so that a swapped or flipped axis cannot pass unseen
    orientation = (np.cos(angle), np.sin(angle), 0.0, -np.sin(angle), np.cos(angle), 0.0)
    paths = write_series(tmp_path / "ct", hu, orientation=orientation, intercept=-1024.0, slope=2.0)
    expected, expected_geometry = read_series(only_series(tmp_path / "ct"))
    source = write_multiframe(tmp_path / "mf" / "IM1", paths, enhanced=enhanced)
    (series,), notices = find_series(tmp_path / "mf")
    assert series.multiframe and series.files == (source,) and notices == []
    array, geometry = read_series(series)
    # 1e-5 mm: the converter stores the positions as decimal strings.
    np.testing.assert_allclose(geometry.affine_ras, expected_geometry.affine_ras, atol=1e-4)
    np.testing.assert_array_equal(array, expected)
    np.testing.assert_array_equal(array, np.round((hu + 1024) / 2) * 2 - 1024)  # the functional groups' rescale


def test_single_and_multiframe_copies_of_one_series_are_separate_volumes(tmp_path):
    paths = write_series(tmp_path / "study" / "single", smooth_volume(shape=(24, 20, 4)))
    source = write_multiframe(tmp_path / "study" / "multi" / "IM1", paths)
    shutil.copy(source, tmp_path / "study" / "multi" / "IM1_copy")  # the same SOP Instance UID: read once
    volumes, notices = find_series(tmp_path / "study")
    assert sorted(v.multiframe for v in volumes) == [False, True]
    assert len(notices) == 1 and "read once 1 file(s)" in notices[0].text
    first, second = (read_series(v) for v in volumes)
    np.testing.assert_array_equal(first[0], second[0])


def test_multiframe_frames_sharing_a_position_are_a_clear_error(tmp_path):
    paths = write_series(tmp_path / "ct", smooth_volume(shape=(24, 20, 4)))
    source = write_multiframe(tmp_path / "mf" / "IM1", paths)
    ds = pydicom.dcmread(source)
    frames = ds.PerFrameFunctionalGroupsSequence
    frames[1].PlanePositionSequence[0].ImagePositionPatient = frames[0].PlanePositionSequence[0].ImagePositionPatient
    ds.save_as(source)
    with pytest.raises(InputImageError, match=f"cannot read the multi-frame CT {source} as one volume .*; export the "
                                              "series as single-frame CT images"):
        read_series(only_series(tmp_path / "mf"))
