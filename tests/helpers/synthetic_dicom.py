"""Synthetic single-frame CT DICOM series for tests, and the shared real series' mask on our grid."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import io_orientation, ornt_transform
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from spleen_seg.io.dicom import DicomSeries, find_series

SHARED = Path(os.environ.get("SPLEEN_SEG_SHARED", Path(__file__).resolve().parents[3] / "shared"))
REAL_SERIES = SHARED / "data" / "real_ct" / "dicom_series"
REAL_SERIES_MASK = SHARED / "data" / "real_ct" / "dicom_series_spleen.nii.gz"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SPACING = (0.8, 0.7, 2.0)  # between columns, between rows, between slices
ORIGIN = (-100.0, -80.0, 50.0)


def random_volume(shape=(6, 5, 4), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 1500, size=shape).astype(np.float32)


def write_series(folder: Path, hu: np.ndarray, *, modality="CT", series_uid=None, study_uid="1.2.3.4",
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


def expected_affine_ras(orientation=AXIAL, spacing=SPACING, origin=ORIGIN) -> np.ndarray:
    row_dir, col_dir = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = row_dir * spacing[0], col_dir * spacing[1]
    lps[:3, 2], lps[:3, 3] = np.cross(row_dir, col_dir) * spacing[2], origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def only_series(folder: Path) -> DicomSeries:
    series, _ = find_series(folder)
    assert len(series) == 1
    return series[0]


def mask_on_grid(geo) -> np.ndarray:
    """The shared real series' mask (LAS) reoriented onto our grid, after checking both grids are the same voxels."""
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
