"""Finding CT volumes in a PACS export: what is skipped (one info line each), duplicates,
split acquisitions, files without preamble or extension."""

import logging
import shutil

import numpy as np
import pydicom
import pytest
from pydicom.fileset import FileSet
from pydicom.uid import JPEG2000Lossless, RLELossless, generate_uid
from synthetic_dicom import (
    CORONAL,
    pydicom_encode,
    random_volume,
    write_dose_report,
    write_dose_screen,
    write_headless,
    write_localizer,
    write_presentation_state,
    write_rt_structure_set,
    write_series,
)

from spleen_seg.errors import InputImageError
from spleen_seg.io.dicom import find_series, is_dicom_folder
from spleen_seg.io.dicom_files import dicom_kind
from spleen_seg.io.dicom_volume import read_series

FUZZ_TRIALS = 60


def _texts(notices, level=None) -> list[str]:
    return [n.text for n in notices if level is None or n.level == level]


def test_every_non_ct_object_of_a_study_is_skipped_with_one_info_line(tmp_path):
    hu = random_volume(shape=(6, 5, 4))
    study = tmp_path / "study"
    write_series(study / "ct", hu, series_uid="1.2.3.100")
    write_localizer(study / "scout" / "IM1")
    write_dose_report(study / "dose" / "SR1")
    write_dose_screen(study / "dose" / "SC1")
    write_presentation_state(study / "pr" / "PR1")
    write_rt_structure_set(study / "rt" / "RT1")
    volumes, notices = find_series(study)
    assert [v.series_uid for v in volumes] == ["1.2.3.100"]
    np.testing.assert_array_equal(read_series(volumes[0])[0], hu)
    assert all(n.level == logging.INFO for n in notices) and len(notices) == 5
    expected = [
        f"(CT, 'Patient Protocol') in {study / 'dose'}: 1 file(s), Secondary Capture Image Storage, not a CT image",
        f"(SR, 'Dose Report') in {study / 'dose'}: 1 file(s), X-Ray Radiation Dose SR Storage, not a CT image",
        f"(PR, 'Presentation') in {study / 'pr'}: 1 file(s), Grayscale Softcopy Presentation State Storage, not a CT image",
        f"(RTSTRUCT, 'Contours') in {study / 'rt'}: 1 file(s), RT Structure Set Storage, not a CT image",
        f"(CT, 'Topogram') in {study / 'scout'} (ImageType LOCALIZER), e.g. {study / 'scout' / 'IM1'}",
    ]
    for text, tail in zip(_texts(notices), expected, strict=True):
        assert text.startswith("skipped ") and text.endswith(tail), (text, tail)


def test_dicomdir_and_nested_files_without_extension(tmp_path):
    hu = random_volume(shape=(6, 5, 4))
    fileset = FileSet()
    for path in write_series(tmp_path / "export", hu):
        fileset.add(path)
    fileset.write(tmp_path / "cd")  # DICOMDIR + PT000000/ST000000/SE000000/IM00000n
    assert is_dicom_folder(tmp_path / "cd")
    (volume,), notices = find_series(tmp_path / "cd")
    assert volume.folder == tmp_path / "cd" / "PT000000" / "ST000000" / "SE000000"
    assert [f.name for f in volume.files] == [f"IM00000{k}" for k in range(4)]
    assert _texts(notices) == [f"skipped file {tmp_path / 'cd' / 'DICOMDIR'}: DICOMDIR (a media directory, not an image)"]
    assert notices[0].level == logging.INFO
    np.testing.assert_array_equal(read_series(volume)[0], hu)


def test_localizer_inside_the_ct_series_is_skipped(tmp_path):
    """A scout in the CT's own series: by ImageType LOCALIZER, or only by its odd orientation."""
    hu = random_volume(shape=(6, 5, 5))
    paths = write_series(tmp_path / "ct", hu, series_uid="1.2.3.100")
    write_series(tmp_path / "ct", random_volume(shape=(6, 5, 1), seed=3), series_uid="1.2.3.100",
                 orientation=CORONAL, names=["scout_coronal"])
    write_series(tmp_path / "ct", random_volume(shape=(6, 5, 1), seed=4), series_uid="1.2.3.100",
                 image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), positions=[3.0], names=["scout_typed"])
    (volume,), notices = find_series(tmp_path)
    assert volume.files == tuple(paths)
    np.testing.assert_array_equal(read_series(volume)[0], hu)
    texts = _texts(notices, logging.INFO)
    assert len(texts) == 2
    assert "skipped 1 localizer image(s) of series 1.2.3.100" in texts[0] and "scout_typed" in texts[0]
    assert "skipped 1 image(s) of series 1.2.3.100" in texts[1] and "orientation differs" in texts[1]
    assert "scout_coronal" in texts[1]


def test_coronal_reformat_is_skipped(tmp_path):
    write_series(tmp_path / "axial", random_volume(), series_uid="1.2.3.100")
    write_series(tmp_path / "coronal", random_volume(), series_uid="1.2.3.200", orientation=CORONAL,
                 description="COR 3mm")
    volumes, notices = find_series(tmp_path)
    assert [v.series_uid for v in volumes] == ["1.2.3.100"]
    (text,) = _texts(notices, logging.INFO)
    assert "series 1.2.3.200 (CT, 'COR 3mm')" in text and "not an axial volume" in text


@pytest.mark.parametrize("syntax", [None, RLELossless])
def test_identical_slice_at_the_same_position_is_kept_once_with_a_warning(tmp_path, syntax):
    """Another SOP Instance UID, the same pixels (compared decoded, so also across transfer syntaxes)."""
    hu = random_volume(shape=(6, 5, 4))
    paths = write_series(tmp_path / "ct", hu)
    copy = tmp_path / "ct" / "sub" / "again"
    copy.parent.mkdir()
    shutil.copy(paths[2], copy)
    ds = pydicom.dcmread(copy)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(copy)
    if syntax is not None:
        pydicom_encode([copy], syntax)
    (volume,), notices = find_series(tmp_path / "ct")
    assert len(volume.files) == 4 and copy not in volume.files
    (text,) = _texts(notices, logging.WARNING)
    assert text.endswith(f"ignored {copy}: same position (54.00 mm) and identical pixels as {paths[2]} (duplicate slice)")
    np.testing.assert_array_equal(read_series(volume)[0], hu)


@pytest.mark.parametrize("keyword, values, parts", [
    ("AcquisitionNumber", (1, 2), ("a1", "a2")),
    ("TemporalPositionIndex", (1, 2), ("t1", "t2")),
    ("ContrastBolusAgentPhase", ("ARTERIAL", "PORTAL_VENOUS"), ("pARTERIAL", "pPORTAL_VENOUS")),
])
def test_different_images_at_the_same_positions_split_into_volumes(tmp_path, keyword, values, parts):
    first, second = random_volume(seed=1), random_volume(seed=2)
    for volume, value in zip((first, second), values, strict=True):
        write_series(tmp_path / "ct", volume, series_uid="1.2.3.100", extra={keyword: value},
                     names=[f"{value}_{k}" for k in range(4)])
    volumes, notices = find_series(tmp_path)
    assert [v.part for v in volumes] == list(parts)
    assert {v.series_uid for v in volumes} == {"1.2.3.100"} and [len(v.files) for v in volumes] == [4, 4]
    np.testing.assert_array_equal(read_series(volumes[0])[0], first)
    np.testing.assert_array_equal(read_series(volumes[1])[0], second)
    (text,) = _texts(notices, logging.INFO)
    assert f"split by {keyword} into 2 volumes" in text


@pytest.mark.parametrize("second_slices", [4, 1])
def test_conflicting_images_are_an_error_naming_the_files(tmp_path, second_slices):
    """No attribute tells them apart (4 slices each), or the other acquisition is no volume (1 slice)."""
    write_series(tmp_path / "ct", random_volume(seed=1), series_uid="1.2.3.100", extra={"AcquisitionNumber": 1},
                 names=[f"a_{k}" for k in range(4)])
    write_series(tmp_path / "ct", random_volume(shape=(6, 5, second_slices), seed=2), series_uid="1.2.3.100",
                 extra={"AcquisitionNumber": 1 if second_slices == 4 else 2}, names=[f"b_{k}" for k in range(second_slices)])
    write_series(tmp_path / "other", random_volume(seed=3), series_uid="1.2.3.200")
    volumes, _ = find_series(tmp_path)
    assert [v.series_uid for v in volumes] == ["1.2.3.100", "1.2.3.200"]
    assert volumes[1].error == "" and read_series(volumes[1])[0].shape == (6, 5, 4)
    conflict = f"{tmp_path / 'ct' / 'a_0'}, {tmp_path / 'ct' / 'b_0'}"
    with pytest.raises(InputImageError, match=r"2 files at the same position \(50\.00 mm\) hold different images") as err:
        read_series(volumes[0])
    assert conflict in str(err.value) and "export each acquisition as a series of its own" in str(err.value)


def test_files_without_preamble_or_extension_in_nested_folders(tmp_path):
    hu = random_volume(shape=(6, 5, 4))
    paths = write_series(tmp_path / "source", hu)
    headless = [write_headless(path, tmp_path / "export" / f"d{k % 2}" / "deeper" / f"IM{k}", file_meta=k % 2 == 0)
                for k, path in enumerate(paths)]
    assert [dicom_kind(path) for path in headless] == ["headless"] * 4
    assert is_dicom_folder(tmp_path / "export")
    (volume,), _ = find_series(tmp_path / "export")
    assert sorted(volume.files) == sorted(headless)
    np.testing.assert_array_equal(read_series(volume)[0], hu)


def test_other_files_are_never_read_as_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("hello " * 100)
    (tmp_path / "noise.bin").write_bytes(np.random.default_rng(0).bytes(512))
    (tmp_path / "almost").write_bytes(b"\x08\x00\x16\x00" + b"\xff" * 300)  # group 0008, absurd length
    assert [dicom_kind(p) for p in sorted(tmp_path.iterdir())] == ["", "", ""]
    assert not is_dicom_folder(tmp_path)
    with pytest.raises(InputImageError, match="no DICOM image files found"):
        find_series(tmp_path)


def test_damaged_files_give_project_errors_only(tmp_path):
    """Flipped bytes, damaged headers and truncations in plain, RLE, JPEG 2000 and preamble-less
    files: finding and reading raise ``InputImageError`` or skip the file, never anything else."""
    source = tmp_path / "source"
    paths = write_series(source, random_volume(shape=(64, 64, 4)))
    pydicom_encode(paths[2:3], RLELossless)
    pydicom_encode(paths[3:], JPEG2000Lossless)
    write_headless(paths[1], source / "headless", file_meta=False)
    paths[1].unlink()
    rng = np.random.default_rng(0)
    outcomes = {"read": 0, "refused": 0}
    for trial in range(FUZZ_TRIALS):
        folder = tmp_path / f"trial{trial}"
        shutil.copytree(source, folder)
        victim = sorted(folder.iterdir())[trial % 4]
        data = bytearray(victim.read_bytes())
        if trial % 3 == 0:
            data = data[: int(rng.integers(1, len(data)))]
        else:  # the header (first 700 bytes) or anywhere
            end = 700 if trial % 3 == 1 else len(data)
            for at in rng.integers(0, min(end, len(data)), size=int(rng.integers(1, 16))):
                data[at] = int(rng.integers(256))
        victim.write_bytes(bytes(data))
        try:
            for volume in find_series(folder)[0]:
                read_series(volume)
            outcomes["read"] += 1
        except InputImageError:
            outcomes["refused"] += 1
        shutil.rmtree(folder)
    assert outcomes["read"] > 0 and outcomes["refused"] > 0, outcomes
