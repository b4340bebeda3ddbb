"""A DICOM case in the review app: its CT view read from the series, and a correction saved as a new
DICOM SEG series (SEMIAUTOMATIC, the model still named) that dciodvfy accepts."""

from __future__ import annotations

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
from review_outputs import SPLEEN_HU, CaseSpec, make_dicom_case, phantom_ct
from synthetic_dicom import dciodvfy

from spleen_seg.outputs.review_state import CORRECTED_SEG_FILENAME
from spleen_seg.review.cases import load_index
from spleen_seg.review.source import seg_writer
from spleen_seg.review.store import ReviewStore
from spleen_seg.review.views import CaseViews

MAX_VOXELS = 1 << 22


def test_a_dicom_case_is_viewed_from_its_series_and_its_correction_is_a_new_seg_series(tmp_path):
    spec = CaseSpec("series", shape=(32, 28, 12))
    case = make_dicom_case(tmp_path / "out", tmp_path / "dicom" / "series", spec)
    index = load_index(tmp_path / "out")
    entry = index.get(case)
    store = ReviewStore(index, "tester")
    report = store.state(entry).report
    views = CaseViews(MAX_VOXELS)

    ct = nib.load(views.ct_file(entry, report, "full"))
    grid, geometry = views.grid(entry, "full")
    assert ct.shape == grid.shape and np.allclose(ct.affine, grid.affine, atol=1e-3)
    # The view is the series itself in RAS order: the world position of its brightest voxels is the ball's.
    hu = np.asarray(ct.dataobj)
    assert hu.max() == SPLEEN_HU
    model = np.asarray(nib.load(entry.folder / "spleen.nii.gz").dataobj)
    ball_world = nib.affines.apply_affine(geometry.affine_ras, np.argwhere(model > 0)).mean(axis=0)
    bright_world = nib.affines.apply_affine(ct.affine, np.argwhere(hu == SPLEEN_HU)).mean(axis=0)
    np.testing.assert_allclose(bright_world, ball_world, atol=1e-3)
    assert (phantom_ct(spec) > 100).sum() == (model > 0).sum()

    corrected = model.copy()
    corrected[0:3, 0:3, 0] = 1
    state = store.save_correction(entry, 0, lambda base: corrected, seg_writer(entry, report))
    assert state.correction.seg_file == CORRECTED_SEG_FILENAME
    assert state.correction.change_voxels == 9

    path = entry.folder / CORRECTED_SEG_FILENAME
    errors, _warnings = dciodvfy(path)
    assert errors == []
    seg = hd.seg.segread(path)
    model_seg = pydicom.dcmread(entry.folder / "spleen_seg.dcm", stop_before_pixels=True)
    segment = seg.SegmentSequence[0]
    assert segment.SegmentAlgorithmType == "SEMIAUTOMATIC"
    assert segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "spleen-seg"
    assert seg.SeriesInstanceUID != model_seg.SeriesInstanceUID and seg.SeriesNumber == 902
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == model_seg.ReferencedSeriesSequence[0].SeriesInstanceUID
    assert seg.StudyInstanceUID == model_seg.StudyInstanceUID and seg.FrameOfReferenceUID == model_seg.FrameOfReferenceUID
    # The frames hold the corrected mask: as many voxels, slice by slice.
    frames = seg.pixel_array.reshape(-1, spec.shape[1], spec.shape[0])
    assert int(frames.sum()) == int(corrected.sum())
