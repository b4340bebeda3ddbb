"""DICOM as a PACS exports it, end to end through ``spleen-seg segment`` with the demo weights.

One command over a study folder: a JPEG Lossless (SV1) CT series with its localizer, dose
report and dose screen, the same series again as RLE Lossless (another series, files
without preamble or extension in nested folders), a DICOMDIR with nested extension-less
files, one copy of a file (same SOP Instance UID), one duplicated slice (another SOP
Instance UID, identical pixels) and a second CT series: exit 0, one case per CT series,
each mask voxel-identical to the mask of the uncompressed series. A second command holds
the references: the uncompressed series, their dcm2niix conversions, a gantry-tilted series
and its conversion, and a series with a missing slice, which must be refused by name.
Every DICOM mask equals, in world space and voxel for voxel, the mask of dcm2niix's NIfTI.
"""

from __future__ import annotations

import csv
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.orientations import io_orientation, ornt_transform
from pydicom.fileset import FileSet
from pydicom.uid import RLELossless, generate_uid

from spleen_seg.batch.inputs import collect_inputs, load_input
from spleen_seg.pipeline.backends import Runner
from spleen_seg.pipeline.network import demo_weights_path
from spleen_seg.pipeline.segmenter import Segmenter
from spleen_seg.training.phantom import make_phantom

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from synthetic_dicom import (  # noqa: E402
    REAL_SERIES,
    dcmtk_encode,
    pydicom_encode,
    require_tool,
    run_tool,
    write_dose_report,
    write_dose_screen,
    write_headless,
    write_localizer,
    write_phantom_series,
)

# 144 x 144 x 144 mm around the phantom's centre: one survey window, about a second per case.
SHAPE = (48, 48, 24)
SPACING_MM = (3.0, 3.0, 6.0)
STUDY_UID = "1.2.826.0.1.3680043.8.498.7001"
MISSING_SLICE = 12
TILT_DEG = 12.0
THRESHOLD = 0.5  # a threshold network: spleen where the windowed HU (-57..164 -> 0..1) exceeds it


@dataclass(frozen=True)
class Runs:
    pacs: Path  # output folder of the PACS study command
    pacs_stdout: str
    pacs_stderr: str
    reference: Path  # output folder of the reference command
    reference_code: int
    reference_stderr: str
    series_uids: dict[str, str]  # name -> SeriesInstanceUID


def _phantom_series(folder: Path, seed: int, series_uid: str, series_number: int, description: str) -> list[Path]:
    case = make_phantom(seed, shape=SHAPE, spacing_mm=SPACING_MM, orientation="LPS")
    assert case.spleen_mask.sum() > 1000, "the phantom's spleen must be in view"
    return write_phantom_series(folder, case, series_uid=series_uid, study_uid=STUDY_UID,
                                series_number=series_number, description=description)


def _copy_all(paths: list[Path], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(path, folder / path.name)) for path in paths]


def _with_new_uids(paths: list[Path], series_uid: str, series_number: int, description: str) -> None:
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series_uid, series_number, description
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(path)


def _tilt(paths: list[Path]) -> None:
    """Shift slice k along y by k * spacing * tan(tilt): a gantry tilt as scanners write it."""
    shift = SPACING_MM[2] * np.tan(np.deg2rad(TILT_DEG))
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [f"{x:.6f}", f"{y + k * shift:.6f}", f"{z:.6f}"]
        ds.GantryDetectorTilt = TILT_DEG
        ds.save_as(path)


def _build_study(root: Path) -> dict[str, str]:
    """The folders of both commands; returns the SeriesInstanceUID of each CT series by name."""
    uids = {name: generate_uid() for name in ("a", "a_rle", "b", "tilt", "gap")}
    plain_a = _phantom_series(root / "reference" / "a", 1, uids["a"], 2, "abdomen A")
    plain_b = _phantom_series(root / "reference" / "b", 2, uids["b"], 5, "abdomen B")

    staging = root / "staging"
    jpeg_a, jpeg_b = _copy_all(plain_a, staging / "a"), _copy_all(plain_b, staging / "b")
    dcmtk_encode(jpeg_a + jpeg_b, "dcmcjpeg", "+e1")  # JPEG Lossless, process 14 SV1
    others = [write_localizer(staging / "scout" / "IM1", study_uid=STUDY_UID),
              write_dose_report(staging / "dose" / "SR1", study_uid=STUDY_UID),
              write_dose_screen(staging / "dose" / "SC1", study_uid=STUDY_UID)]
    fileset = FileSet()  # DICOMDIR + PT000000/ST000000/SE00000n/IM00000n, as on a PACS export medium
    for path in [*jpeg_a, *jpeg_b, *others]:
        fileset.add(path)
    pacs = root / "pacs"
    fileset.write(pacs)

    rle = _copy_all(plain_a, staging / "rle")
    _with_new_uids(rle, uids["a_rle"], 3, "abdomen A (RLE)")
    pydicom_encode(rle, RLELossless)
    for k, path in enumerate(rle):  # no preamble, no extension, two levels deep
        write_headless(path, pacs / "rle" / f"part{k % 2}" / f"IM{k}")

    a_files = sorted(p for p in pacs.glob("PT*/*/*/IM*") if pydicom.dcmread(p, stop_before_pixels=True).get("SeriesInstanceUID") == uids["a"])
    (pacs / "copies").mkdir()
    shutil.copy(a_files[3], pacs / "copies" / "again")  # the same SOP Instance UID twice
    duplicate = pydicom.dcmread(a_files[7])
    duplicate.SOPInstanceUID = duplicate.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    duplicate.save_as(pacs / "copies" / "duplicated_slice")  # another UID, identical pixels

    tilt = _phantom_series(root / "reference" / "tilt", 3, uids["tilt"], 7, "tilted")
    _tilt(tilt)
    gap = _phantom_series(root / "gap", 2, uids["gap"], 9, "incomplete")
    gap[MISSING_SLICE].unlink()
    shutil.rmtree(staging)
    return uids


@pytest.fixture(scope="module")
def runs(tmp_path_factory, run_command) -> Runs:
    dcm2niix = require_tool("dcm2niix")
    require_tool("dcmcjpeg")
    root = tmp_path_factory.mktemp("pacs")
    uids = _build_study(root)
    (root / "nifti").mkdir()
    for name in ("a", "b", "tilt"):  # the field's reference converter; gzip'd, named after the folder
        run_tool([dcm2niix, "-z", "y", "-f", "%f", "-o", root / "nifti", root / "reference" / name])
    niftis = sorted(p for p in (root / "nifti").glob("*.nii.gz") if "_Tilt" not in p.name)
    assert [p.name for p in niftis] == ["a.nii.gz", "b.nii.gz", "tilt.nii.gz"]

    weights = ["--weights", str(demo_weights_path())]
    cli = [sys.executable, "-m", "spleen_seg.cli", "segment"]
    pacs = run_command([*cli, str(root / "pacs"), "-o", str(root / "out_pacs"), *weights])
    assert pacs.returncode == 0, pacs.stdout + pacs.stderr
    reference = run_command([*cli, *(str(root / "reference" / n) for n in ("a", "b", "tilt")), *map(str, niftis),
                             str(root / "gap"), "-o", str(root / "out_reference"), *weights])
    return Runs(root / "out_pacs", pacs.stdout, pacs.stderr, root / "out_reference", reference.returncode,
                reference.stderr, uids)


def _cases_by_series(out: Path) -> dict[str, Path]:
    """Case folders of a run keyed by the SeriesInstanceUID their SEG references."""
    cases = {}
    for seg in sorted(out.glob("*/spleen_seg.dcm")):
        uid = pydicom.dcmread(seg, stop_before_pixels=True).ReferencedSeriesSequence[0].SeriesInstanceUID
        assert uid not in cases
        cases[uid] = seg.parent
    return cases


def _mask(case: Path) -> nib.Nifti1Image:
    return nib.load(str(case / "spleen.nii.gz"))


def _same_world_voxels(image: nib.Nifti1Image, onto: nib.Nifti1Image) -> np.ndarray:
    """``image``'s mask reoriented onto ``onto``'s voxel order, after checking that both grids are the
    same voxels in world space (an axis flip or permutation apart)."""
    reoriented = image.as_reoriented(ornt_transform(io_orientation(image.affine), io_orientation(onto.affine)))
    assert reoriented.shape == onto.shape
    np.testing.assert_allclose(reoriented.affine, onto.affine, atol=1e-3)
    return np.asarray(reoriented.dataobj)


def test_pacs_study_gives_one_case_per_ct_series(runs):
    cases = _cases_by_series(runs.pacs)
    assert set(cases) == {runs.series_uids[name] for name in ("a", "a_rle", "b")}
    assert sorted(p.name for p in runs.pacs.iterdir() if p.is_dir()) == sorted(p.name for p in cases.values())
    with (runs.pacs / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 and {row["status"] for row in rows} == {"ok"}


def test_pacs_study_skips_what_is_not_a_ct_volume_with_one_line_each(runs):
    log = runs.pacs_stdout + runs.pacs_stderr
    assert log.count("DICOMDIR (a media directory, not an image)") == 1
    assert log.count("localizer image(s)") == 1
    assert log.count("X-Ray Radiation Dose SR Storage, not a CT image") == 1
    assert log.count("Secondary Capture Image Storage, not a CT image") == 1
    assert log.count("(duplicate copies), e.g. ") == 1 and str(Path("copies") / "again") in log
    assert log.count("identical pixels as") == 1 and "duplicated_slice" in log
    assert "Traceback" not in log and "error" not in log.lower()


def test_pacs_masks_equal_the_uncompressed_series_masks(runs):
    pacs, reference = _cases_by_series(runs.pacs), _cases_by_series(runs.reference)
    for name, source in (("a", "a"), ("a_rle", "a"), ("b", "b")):
        got, expected = _mask(pacs[runs.series_uids[name]]), _mask(reference[runs.series_uids[source]])
        np.testing.assert_array_equal(got.affine, expected.affine)
        voxels = np.asarray(got.dataobj)
        assert voxels.sum() > 100, f"{name}: an empty mask would make the comparison trivial"
        np.testing.assert_array_equal(voxels, np.asarray(expected.dataobj), err_msg=name)


def test_dicom_masks_equal_dcm2niix_masks_in_world_space(runs):
    reference = _cases_by_series(runs.reference)
    for name in ("a", "b", "tilt"):
        dicom_mask = _mask(reference[runs.series_uids[name]])
        nifti_mask = _mask(runs.reference / name)
        voxels = _same_world_voxels(nifti_mask, dicom_mask)
        assert voxels.sum() > 100
        np.testing.assert_array_equal(voxels, np.asarray(dicom_mask.dataobj), err_msg=name)


def test_tilted_series_mask_lies_on_its_source_slices(runs):
    case = _cases_by_series(runs.reference)[runs.series_uids["tilt"]]
    affine = _mask(case).affine
    shift = SPACING_MM[2] * np.tan(np.deg2rad(TILT_DEG))
    # Slice k's corner is the source slice's ImagePositionPatient (LPS), y shifted by k * shift.
    for k in (0, SHAPE[2] - 1):
        corner_lps = np.diag([-1.0, -1.0, 1.0]) @ (affine @ [0, 0, k, 1])[:3]
        first_lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, 3]
        np.testing.assert_allclose(corner_lps - first_lps, [0.0, k * shift, k * SPACING_MM[2]], atol=1e-3)
    seg = pydicom.dcmread(case / "spleen_seg.dcm")
    positions = {tuple(np.round(np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float), 3))
                 for item in seg.PerFrameFunctionalGroupsSequence}
    sources = {tuple(np.round(np.asarray(pydicom.dcmread(p).ImagePositionPatient, float), 3))
               for p in (runs.reference.parent / "reference" / "tilt").iterdir()}
    assert positions and positions <= sources


def test_missing_slice_is_refused_by_name(runs):
    assert runs.reference_code == 2
    expected = f"missing slice: gap of {2 * SPACING_MM[2]:.1f} mm"
    assert expected in runs.reference_stderr and str(runs.reference.parent / "gap") in runs.reference_stderr
    with (runs.reference / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    statuses = [row["status"] for row in rows]
    assert statuses.count("failed") == 1 and len(statuses) == 7
    (failed,) = [row for row in rows if row["status"] == "failed"]
    assert expected in failed["error"]


def test_real_series_mask_equals_dcm2niix_mask_in_world_space(tmp_path):
    """The shared real series (Siemens, JPEG 2000, anonymised UIDs) against dcm2niix's conversion,
    through the batch's own reader and the segmenter with a threshold network (the demo weights
    would take half a minute per 512 x 512 case here; the geometry is what is tested)."""
    if not REAL_SERIES.is_dir():
        pytest.skip(f"shared DICOM test data not found: {REAL_SERIES} (only present beside the project checkout)")
    (tmp_path / "nifti").mkdir()
    run_tool([require_tool("dcm2niix"), "-z", "y", "-f", "%f", "-o", tmp_path / "nifti", REAL_SERIES])
    nifti = tmp_path / "nifti" / f"{REAL_SERIES.name}.nii.gz"
    (series,) = collect_inputs([REAL_SERIES])
    segmenter = Segmenter(runner=Runner(lambda batch: batch - THRESHOLD, batch_size=4, backend="test"), progress=False)
    masks = []
    for item in (series, nifti):
        image, geometry = load_input(item)
        masks.append(nib.Nifti1Image(segmenter.predict(image, geometry), geometry.affine_ras))
    dicom_mask, nifti_mask = masks
    assert dicom_mask.shape == (512, 512, 20)
    voxels = _same_world_voxels(nifti_mask, dicom_mask)
    assert voxels.sum() > 10_000
    np.testing.assert_array_equal(voxels, np.asarray(dicom_mask.dataobj))
