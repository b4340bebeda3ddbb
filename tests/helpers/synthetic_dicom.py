"""Synthetic CT DICOM for tests: single-frame series, phantoms, the other objects a PACS
export holds (localizer, dose report, presentation state, RT structure set, DICOMDIR),
re-encoding in every transfer syntax, multi-frame (enhanced) CT; and the shared real
series' mask on our grid."""

from __future__ import annotations

import functools
import os
import shutil
import struct
import subprocess
import zlib
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from ci import in_ci
from nibabel.orientations import io_orientation, ornt_transform
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    GrayscaleSoftcopyPresentationStateStorage,
    MRImageStorage,
    RTStructureSetStorage,
    SecondaryCaptureImageStorage,
    XRayRadiationDoseSRStorage,
    generate_uid,
)
from shared_data import REAL_SERIES, REAL_SERIES_MASK  # noqa: F401 (re-exported for the DICOM tests)

from spleen_seg.io.dicom import DicomSeries, find_series

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SPACING = (0.8, 0.7, 2.0)  # between columns, between rows, between slices
ORIGIN = (-100.0, -80.0, 50.0)
TOOL_TIMEOUT_S = 60
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def require_tool(name: str) -> str:
    """The path of a command-line tool the test needs: skipped without it, but a failure under CI=true."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not installed (Debian packages: dcmtk, dcm2niix, dicom3tools, libgdcm-tools; see .ci/run)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return path


def run_tool(args: Sequence[str | Path]) -> str:
    """Run a command-line tool (bounded), fail the test with its output if it fails; returns stdout + stderr."""
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    assert proc.returncode == 0, f"{' '.join(map(str, args))} exited {proc.returncode}: {proc.stdout}{proc.stderr}"
    return proc.stdout + proc.stderr


def random_volume(shape=(6, 5, 4), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 1500, size=shape).astype(np.float32)


def _slice_geometry(ds: Dataset, k: int, position: np.ndarray, orientation, spacing, rows: int, columns: int,
                    intercept: float, slope: float) -> None:
    """The attributes of slice ``k`` of an axial-series CT image: position, grid, pixel format, rescale."""
    ds.InstanceNumber = k + 1
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.PixelSpacing = [spacing[1], spacing[0]]  # (between rows, between columns)
    ds.SliceThickness = spacing[2]
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = intercept, slope, "HU"


def write_series(folder: Path, hu: np.ndarray, *, modality="CT", series_uid=None, study_uid="1.2.3.4",
                  orientation=AXIAL, spacing=SPACING, origin=ORIGIN, positions=None, intercept=-1024.0,
                  slope=1.0, description="synthetic", names=None, series_number=3, sop_class=None,
                  image_type=("ORIGINAL", "PRIMARY", "AXIAL"), extra=None) -> list[Path]:
    """Write ``hu`` (X=columns, Y=rows, Z=slices) as one single-frame DICOM file per slice.

    ``positions`` (mm along the slice normal from ``origin``, one per slice) default to
    k * spacing; ``extra`` sets further attributes on every slice (``AcquisitionNumber``...).
    """
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid() if series_uid is None else series_uid
    sop_class = sop_class or (CTImageStorage if modality == "CT" else MRImageStorage)
    row_dir, col_dir = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    normal = np.cross(row_dir, col_dir)
    paths = []
    for k in range(hu.shape[2]):
        position = np.asarray(origin) + (positions[k] if positions is not None else k * spacing[2]) * normal
        ds = _base_dataset(sop_class, modality, series_uid, study_uid, description, series_number)
        ds.ImageType = list(image_type)
        _slice_geometry(ds, k, position, orientation, spacing, hu.shape[1], hu.shape[0], intercept, slope)
        for keyword, value in (extra or {}).items():
            setattr(ds, keyword, value)
        ds.PixelData = np.round((hu[:, :, k].T - intercept) / slope).astype(np.uint16).tobytes()
        path = folder / (names[k] if names is not None else f"slice_{k:03d}.dcm")
        paths.append(_save(ds, path))
    return paths


def _base_dataset(sop_class: str, modality: str, series_uid: str, study_uid: str, description: str,
                  series_number: int) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesDescription, ds.SeriesNumber = modality, description, series_number
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, "1.2.3.5"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Test", "P1", "", "O"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "20240101", "120000", "1", "", ""
    ds.SeriesDate, ds.SeriesTime, ds.ContentDate, ds.ContentTime = "20240101", "120000", "20240101", "120000"
    ds.Manufacturer = "test"
    return ds


def _save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def smooth_volume(shape=(24, 20, 4), seed=0) -> np.ndarray:
    """Integer HU of a smooth body-like image (air, soft tissue, a bright disc): fair to lossy codecs too."""
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    rng = np.random.default_rng(seed)
    slices = []
    for k in range(shape[2]):
        body = (x / 0.9) ** 2 + (y / 0.7) ** 2 < 1
        disc = (x - 0.3 + 0.05 * k) ** 2 + (y + 0.1) ** 2 < 0.08
        hu = np.where(body, 40.0 + 30.0 * np.sin(3 * x + k) + 20.0 * y, -1000.0) + np.where(disc, 700.0, 0.0)
        slices.append(hu + rng.normal(0, 2, size=hu.shape))
    return np.round(np.stack(slices, axis=2)).astype(np.float32)


def write_phantom_series(folder: Path, case, **kwargs) -> list[Path]:
    """A phantom (``training.phantom.make_phantom`` with orientation "LPS") as an axial series at its place in space."""
    spacing = tuple(float(v) for v in np.sqrt((case.affine[:3, :3] ** 2).sum(axis=0)))
    assert np.allclose(case.affine[:3, :3], np.diag([-1, -1, 1]) * spacing), "write LPS-ordered phantoms only"
    origin = tuple((LPS_TO_RAS[:3, :3] @ case.affine[:3, 3]).tolist())
    return write_series(folder, case.image_hu.astype(np.float32), spacing=spacing, origin=origin, **kwargs)


# --- the other objects of a PACS export -----------------------------------------------------


def write_localizer(path: Path, study_uid="1.2.3.4", series_uid=None, series_number=1) -> Path:
    """A coronal scout image, ImageType ORIGINAL\\PRIMARY\\LOCALIZER, in a series of its own."""
    folder = path.parent
    (written,) = write_series(folder, random_volume(shape=(32, 16, 1), seed=5), study_uid=study_uid,
                              series_uid=series_uid, orientation=CORONAL, spacing=(4.0, 4.0, 4.0),
                              description="Topogram", series_number=series_number,
                              image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), names=[path.name])
    return written


def write_dose_report(path: Path, study_uid="1.2.3.4") -> Path:
    """An X-Ray Radiation Dose SR (what scanners send as the dose report): no pixels."""
    ds = _base_dataset(XRayRadiationDoseSRStorage, "SR", generate_uid(), study_uid, "Dose Report", 997)
    ds.InstanceNumber = 1
    ds.ValueType, ds.CompletionFlag, ds.VerificationFlag = "CONTAINER", "COMPLETE", "UNVERIFIED"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = "113701", "DCM", "X-Ray Radiation Dose Report"
    ds.ConceptNameCodeSequence = [title]
    return _save(ds, path)


def write_dose_screen(path: Path, study_uid="1.2.3.4") -> Path:
    """A dose screen: a Secondary Capture image with Modality CT."""
    (written,) = write_series(path.parent, random_volume(shape=(16, 12, 1), seed=6), study_uid=study_uid,
                              sop_class=SecondaryCaptureImageStorage, description="Patient Protocol",
                              series_number=999, image_type=("DERIVED", "SECONDARY", "OTHER"), names=[path.name])
    return written


def write_presentation_state(path: Path, study_uid="1.2.3.4") -> Path:
    ds = _base_dataset(GrayscaleSoftcopyPresentationStateStorage, "PR", generate_uid(), study_uid, "Presentation", 998)
    ds.InstanceNumber, ds.ContentLabel = 1, "VIEW"
    return _save(ds, path)


def write_rt_structure_set(path: Path, study_uid="1.2.3.4") -> Path:
    ds = _base_dataset(RTStructureSetStorage, "RTSTRUCT", generate_uid(), study_uid, "Contours", 996)
    ds.InstanceNumber, ds.StructureSetLabel = 1, "Organs"
    return _save(ds, path)


def write_headless(source: Path, dest: Path, *, file_meta: bool = True) -> Path:
    """``source`` rewritten without the 128-byte preamble and "DICM" (and without file meta unless asked)."""
    ds = pydicom.dcmread(source)
    ds.preamble = None
    dest.parent.mkdir(parents=True, exist_ok=True)
    if file_meta:
        ds.save_as(dest, enforce_file_format=False)
    else:  # a bare data set, implicit VR little endian (the DICOM default)
        del ds.file_meta
        ds.save_as(dest, enforce_file_format=False, implicit_vr=True, little_endian=True)
    return dest


# --- decompression bombs ---------------------------------------------------------------------

# Explicit VR little endian element header of PixelData (7FE0,0010) OW with a 4-byte length.
PIXEL_DATA_HEADER = struct.Struct("<HH2s2xI")


def _raw_deflate(data: bytes, *, final: bool) -> bytes:
    """``data`` as raw deflate blocks (no zlib header): the last block final, else ending on a byte
    boundary (sync flush), so that a final stream can follow it as the rest of one deflate stream."""
    packer = zlib.compressobj(zlib.Z_BEST_COMPRESSION, zlib.DEFLATED, -zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush(zlib.Z_FINISH if final else zlib.Z_SYNC_FLUSH)


@functools.lru_cache(maxsize=4)
def _deflated_zeros(count: int) -> bytes:
    return _raw_deflate(bytes(count), final=True)


def write_deflated(path: Path, ds: Dataset, zero_bytes: int, *, declared_bytes: int | None = None) -> Path:
    """``ds`` (without PixelData) and a PixelData of ``zero_bytes`` zeros as a Deflated Explicit VR
    Little Endian file; the element declares ``declared_bytes`` (default: what it holds).

    The zeros are deflated once per size and appended to the file's own deflated header (a
    sync-flushed deflate stream may be continued by another's blocks), so that hundreds of
    such files are written in about a second.
    """
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    header = DicomBytesIO()
    header.is_little_endian, header.is_implicit_VR = True, False
    write_dataset(header, ds)
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    element = PIXEL_DATA_HEADER.pack(0x7FE0, 0x0010, b"OW", zero_bytes if declared_bytes is None else declared_bytes)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + meta.getvalue() + _raw_deflate(header.getvalue() + element, final=False)
                     + _deflated_zeros(zero_bytes))
    return path


def write_deflated_bomb_series(folder: Path, count: int, *, rows: int = 8192, columns: int = 8192,
                               spacing=(0.1, 0.1, 2.0), zero_bytes: int | None = None,
                               declared_bytes: int | None = None) -> list[Path]:
    """``count`` Deflated CT slices of ``rows`` x ``columns`` 16-bit zeros, one series (``write_deflated``).

    8192 x 8192 zeros (128 MiB) deflate to about 128 KiB a file: a decompression bomb that
    is still a valid DICOM file. ``zero_bytes`` and ``declared_bytes`` make the pixel data
    hold, and its element declare, another size than the header's rows and columns.
    """
    series_uid = generate_uid()
    paths = []
    for k in range(count):
        ds = _base_dataset(CTImageStorage, "CT", series_uid, "1.2.3.4", "bomb", 3)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        _slice_geometry(ds, k, np.array([0.0, 0.0, k * spacing[2]]), AXIAL, spacing, rows, columns, -1024.0, 1.0)
        paths.append(write_deflated(folder / f"bomb_{k:04d}.dcm", ds,
                                    rows * columns * 2 if zero_bytes is None else zero_bytes,
                                    declared_bytes=declared_bytes))
    return paths


# --- transfer syntaxes ------------------------------------------------------------------------


def dcmtk_encode(paths: Sequence[Path], tool: str, *options: str) -> None:
    """Re-encode each file in place with a dcmtk tool (``dcmcjpeg +e1``, ``dcmcrle``, ``dcmconv +tb``...)."""
    executable = require_tool(tool)
    for path in paths:
        tmp = path.with_name(path.name + ".tmp")
        run_tool([executable, *options, path, tmp])
        os.replace(tmp, path)


def pydicom_encode(paths: Sequence[Path], syntax: str, **kwargs) -> None:
    """Re-encode each file in place with pydicom's own encoders (RLE; JPEG 2000 through pylibjpeg-openjpeg)."""
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.compress(syntax, **kwargs)
        ds.save_as(path)


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
def write_multiframe(dest: Path, slices: Sequence[Path], *, enhanced: bool = False) -> Path:
    """The single-frame ``slices`` as one Legacy Converted Enhanced CT file (highdicom; its frames
    in decreasing position), optionally relabelled Enhanced CT."""
    import highdicom as hd
    from pydicom.uid import EnhancedCTImageStorage

    legacy = [pydicom.dcmread(path) for path in slices]
    image = hd.legacy.LegacyConvertedEnhancedCTImage(legacy, series_instance_uid=generate_uid(),
                                                     series_number=int(legacy[0].SeriesNumber) + 100,
                                                     sop_instance_uid=generate_uid(), instance_number=1)
    if enhanced:
        image.SOPClassUID = image.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    dest.parent.mkdir(parents=True, exist_ok=True)
    image.save_as(dest)
    return dest


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """dicom3tools' DICOM object validator on ``path``: its (error lines, warning lines)."""
    proc = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    lines = [line.strip() for line in (proc.stdout + proc.stderr).splitlines()]
    return [line for line in lines if line.startswith("Error")], [line for line in lines if line.startswith("Warning")]
