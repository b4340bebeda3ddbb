"""``spleen-seg corrections export``: exactly the accepted and corrected cases, with the right masks, on the
CT's grid; a failing case alone fails; a dataset folder of someone else's is refused untouched.

The output folder is a real batch's (``segment_files``) with a threshold in place of the network, so
the model's mask of each case is known voxel for voxel; the review records are written with
outputs/review_state.py's dataclasses, as the review app writes them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from review_records import record_review
from synthetic_dicom import write_series
from threshold_network import SPLEEN_HU, install_threshold_network, sphere

from spleen_seg import cli
from spleen_seg.batch.case import SegmentOptions
from spleen_seg.batch.inputs import collect_inputs
from spleen_seg.batch.run import segment_files
from spleen_seg.errors import ConfigError
from spleen_seg.io.dicom_volume import read_series
from spleen_seg.io.download import file_sha256
from spleen_seg.io.nifti import read_volume
from spleen_seg.pipeline.network import CONVENTION_MSD, SIDECAR_KEY, sidecar_path
from spleen_seg.review.corrections import EXPORT_KEY, MARKER_FILENAME, export_corrections
from spleen_seg.training.data import dataset_orientation_convention, msd_datalist
from spleen_seg.training.train import InitWeights, trained_convention

NO_PREVIEW = SegmentOptions(preview=False)
SHAPE = (24, 22, 16)


def _ball(radius_vox: float, centre_shift=(0, 0, 0)) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 - s for n, s in zip(SHAPE, centre_shift, strict=True)],
                                indexing="ij"))
    return ((grid**2).sum(0) <= radius_vox**2).astype(np.uint8)


def _voxels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def _affine(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).affine)


@pytest.fixture
def reviewed(tmp_path, monkeypatch):
    """An output folder of six cases (five NIfTI, one DICOM series), reviewed five ways and one not."""
    install_threshold_network(monkeypatch)
    scans = tmp_path / "scans"
    names = {"corrected": 5, "accepted": 6, "rejected": 4, "unreviewed": 5, "moved": 6}
    inputs: list = [sphere(scans / f"{name}.nii.gz", radius, SHAPE) for name, radius in names.items()]
    hu = np.where(_ball(5) > 0, SPLEEN_HU, -100.0).astype(np.float32)
    write_series(tmp_path / "dicom" / "ct", hu, series_number=7)
    inputs += collect_inputs([tmp_path / "dicom" / "ct"])
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"stand-in weights")
    out = tmp_path / "out"
    results = segment_files(inputs, out, weights, "cpu", progress=False, options=NO_PREVIEW)
    assert [r.status for r in results] == ["ok"] * 6
    dicom_case = results[-1].case
    correction = _ball(3, centre_shift=(2, -1, 1))  # differs from the model's ball of 5
    record_review(out / "corrected", "rejected", correction)
    record_review(out / "accepted", "accepted")
    record_review(out / "rejected", "rejected")
    record_review(out / "moved", "accepted")
    record_review(out / dicom_case, "accepted")
    (scans / "moved.nii.gz").unlink()
    return out, dicom_case, correction, tmp_path


def test_export_takes_the_corrected_and_accepted_cases_with_their_masks(reviewed, tmp_path):
    out, dicom_case, correction, root = reviewed
    lines: list[str] = []
    summary = export_corrections(out, tmp_path / "dataset", progress=False, on_line=lines.append)
    dataset = tmp_path / "dataset"
    names = ["accepted.nii.gz", "corrected.nii.gz", f"{dicom_case}.nii.gz"]
    assert sorted(case.name for case in summary.exported) == names
    # Left out with a line each: the rejected case; not reviewed: counted; moved: failed, one line.
    assert lines == [f"failed: moved: its CT {root / 'scans' / 'moved.nii.gz'} cannot be found (moved or deleted "
                     "since it was segmented)", "left out: rejected: rejected without a correction"]  # by case name
    assert summary.not_reviewed == ["unreviewed"]
    assert summary.line() == (f"3 exported: 1 corrected, 2 accepted; 2 left out (1 rejected without correction, "
                              f"1 not reviewed); 1 failed -> {dataset} (orientation convention true)")
    # The project's own MSD reader lists exactly these cases, image and label by the same name.
    listed = msd_datalist(dataset, "all")
    assert [Path(case["image"]).name for case in listed] == names
    assert sorted(p.name for p in (dataset / "imagesTr").iterdir()) == names
    assert sorted(p.name for p in (dataset / "labelsTr").iterdir()) == names

    # corrected -> the corrected mask voxel for voxel (not the model's); accepted -> the model's mask.
    label = _voxels(dataset / "labelsTr" / "corrected.nii.gz")
    assert label.dtype == np.uint8 and np.array_equal(label, correction)
    assert not np.array_equal(label, _voxels(out / "corrected" / "spleen.nii.gz"))
    assert np.array_equal(_voxels(dataset / "labelsTr" / "accepted.nii.gz"), _voxels(out / "accepted" / "spleen.nii.gz"))
    # The image is the case's CT, voxel for voxel, on the mask's grid.
    source, _ = read_volume(root / "scans" / "corrected.nii.gz")
    assert np.array_equal(_voxels(dataset / "imagesTr" / "corrected.nii.gz"), source)
    assert np.array_equal(_affine(dataset / "imagesTr" / "corrected.nii.gz"), _affine(out / "corrected" / "spleen.nii.gz"))

    # DICOM: the series converted by the project's reader, with the mask's affine.
    (series,) = collect_inputs([root / "dicom" / "ct"])
    hu, geometry = read_series(series)
    image = dataset / "imagesTr" / f"{dicom_case}.nii.gz"
    mask_affine = _affine(out / dicom_case / "spleen.nii.gz")
    assert _voxels(image).dtype == np.int16 and np.array_equal(_voxels(image), hu)
    assert np.array_equal(_affine(image), mask_affine)
    assert np.array_equal(_affine(dataset / "labelsTr" / f"{dicom_case}.nii.gz"), mask_affine)
    assert np.allclose(mask_affine, geometry.affine_ras, atol=1e-4)
    assert np.array_equal(_voxels(dataset / "labelsTr" / f"{dicom_case}.nii.gz"), _ball(5))

    # dataset.json records where each case came from.
    manifest = json.loads((dataset / "dataset.json").read_text())
    assert manifest["numTraining"] == 3 and manifest["orientation_convention"] == "true"
    cases = manifest[EXPORT_KEY]["cases"]
    assert manifest[EXPORT_KEY]["output_folder"] == str(out)
    assert cases["corrected.nii.gz"]["label_from"] == "corrected"
    assert cases["corrected.nii.gz"]["mask_sha256"] == file_sha256(out / "corrected" / "spleen_corrected.nii.gz")
    assert cases["corrected.nii.gz"]["model_mask_sha256"] == file_sha256(out / "corrected" / "spleen.nii.gz")
    assert cases["accepted.nii.gz"]["label_from"] == "model"
    assert cases["accepted.nii.gz"]["mask_sha256"] == file_sha256(out / "accepted" / "spleen.nii.gz")
    assert cases["accepted.nii.gz"]["source_sha256"] == file_sha256(root / "scans" / "accepted.nii.gz")
    assert cases[f"{dicom_case}.nii.gz"]["source"] == str(root / "dicom" / "ct")
    assert cases["corrected.nii.gz"]["label_voxels"] == int(correction.sum())


def test_a_case_that_does_not_fit_fails_alone_with_one_line(reviewed, tmp_path):
    out, dicom_case, correction, root = reviewed
    # A corrected mask edited after it was saved, and an accepted case whose CT changed since.
    corrected = out / "corrected" / "spleen_corrected.nii.gz"
    nib.save(nib.Nifti1Image(_ball(2), _affine(corrected)), str(corrected))
    image, _ = read_volume(root / "scans" / "accepted.nii.gz")
    nib.save(nib.Nifti1Image(image + 1.0, _affine(out / "accepted" / "spleen.nii.gz")),
             str(root / "scans" / "accepted.nii.gz"))
    lines: list[str] = []
    summary = export_corrections(out, tmp_path / "dataset", progress=False, on_line=lines.append)
    assert [case.name for case in summary.exported] == [f"{dicom_case}.nii.gz"]
    failed = sorted(summary.failed)
    assert len(failed) == 3 and all("\n" not in line for line in failed)
    assert failed[0].startswith(f"failed: {corrected}: changed since the correction was saved")
    assert failed[1].startswith(f"failed: accepted: its CT {root / 'scans' / 'accepted.nii.gz'} changed since it "
                                "was segmented")
    assert failed[2].startswith("failed: moved: its CT")
    assert sorted(p.name for p in (tmp_path / "dataset" / "labelsTr").iterdir()) == [f"{dicom_case}.nii.gz"]


def test_a_mask_off_the_ct_grid_fails(reviewed, tmp_path):
    out, dicom_case, _, _ = reviewed
    mask = out / "accepted" / "spleen.nii.gz"
    wrong = np.zeros((SHAPE[0], SHAPE[1], SHAPE[2] + 2), dtype=np.uint8)
    wrong[5:10, 5:10, 5:10] = 1
    nib.save(nib.Nifti1Image(wrong, _affine(mask)), str(mask))
    # A correction one voxel off the CT's grid, its record naming that very file (so only the grid is wrong).
    shifted = out / "corrected" / "spleen_corrected.nii.gz"
    affine = _affine(shifted)
    affine[0, 3] += 1.5
    nib.save(nib.Nifti1Image(_voxels(shifted), affine), str(shifted))
    report = json.loads((out / "corrected" / "report.json").read_text())
    report["review"]["correction"]["sha256"] = file_sha256(shifted)
    (out / "corrected" / "report.json").write_text(json.dumps(report))
    summary = export_corrections(out, tmp_path / "dataset", progress=False, on_line=lambda _: None)
    assert [case.name for case in summary.exported] == [f"{dicom_case}.nii.gz"]
    by_case = {line.split(": ")[1]: line for line in summary.failed}
    assert by_case[str(mask)] == (f"failed: {mask}: shape {(*SHAPE[:2], SHAPE[2] + 2)} differs from its CT "
                                  f"{tmp_path / 'scans' / 'accepted.nii.gz'} ({SHAPE})")
    assert by_case[str(shifted)] == (f"failed: {shifted}: its affine differs from its CT "
                                     f"{tmp_path / 'scans' / 'corrected.nii.gz'} by up to 1.5 mm (more than 0.001); "
                                     "the mask is not on the CT's grid")


def test_a_report_cannot_name_a_mask_elsewhere_and_a_label_is_0_or_1(reviewed, tmp_path):
    out, dicom_case, _, root = reviewed
    report = json.loads((out / "corrected" / "report.json").read_text())
    report["review"]["correction"]["file"] = "../accepted/spleen.nii.gz"
    (out / "corrected" / "report.json").write_text(json.dumps(report))
    mask = out / "accepted" / "spleen.nii.gz"
    nib.save(nib.Nifti1Image(_voxels(mask) * 2, _affine(mask)), str(mask))  # spleen = 2: not a label
    summary = export_corrections(out, tmp_path / "dataset", progress=False, on_line=lambda _: None)
    assert [case.name for case in summary.exported] == [f"{dicom_case}.nii.gz"]
    assert sorted(summary.failed)[:2] == [
        f"failed: {mask}: the mask holds values other than 0 and 1; a label is 0 (background) or 1 (spleen)",
        f"failed: {out / 'corrected' / 'report.json'}: the corrected mask '../accepted/spleen.nii.gz' is not a file "
        "name in the case folder"]


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("contents", [
    {"notes.txt": "my own notes"},
    # An MSD dataset.json of someone else's (the real Task09's keys, no export record).
    {"dataset.json": json.dumps({"name": "Spleen", "training": []}), "imagesTr/spleen_2.nii.gz": "x"},
    {".hidden": ""},
])
def test_a_dataset_folder_of_someone_elses_is_refused_untouched(reviewed, tmp_path, contents):
    out = reviewed[0]
    dataset = tmp_path / "theirs"
    for name, text in contents.items():
        (dataset / name).parent.mkdir(parents=True, exist_ok=True)
        (dataset / name).write_text(text)
    before = _snapshot(dataset)
    with pytest.raises(ConfigError, match="holds files spleen-seg did not write.*nothing was changed"):
        export_corrections(out, dataset, progress=False)
    assert _snapshot(dataset) == before
    file_path = tmp_path / "a_file"
    file_path.write_text("x")
    with pytest.raises(ConfigError, match="is not a folder"):
        export_corrections(out, file_path, progress=False)
    assert file_path.read_text() == "x"


def test_an_earlier_export_is_updated_and_its_stale_cases_removed(reviewed, tmp_path):
    out, dicom_case, _, _ = reviewed
    dataset = tmp_path / "dataset"
    dataset.mkdir()  # an empty folder is accepted
    export_corrections(out, dataset, progress=False)
    # The accepted case is rejected on second thought; the user's own file in our folder stays.
    record_review(out / "accepted", "rejected")
    (dataset / "README.txt").write_text("mine")
    summary = export_corrections(out, dataset, progress=False)
    assert sorted(case.name for case in summary.exported) == ["corrected.nii.gz", f"{dicom_case}.nii.gz"]
    assert summary.removed == [str(dataset / "imagesTr" / "accepted.nii.gz"), str(dataset / "labelsTr" / "accepted.nii.gz")]
    assert sorted(p.name for p in (dataset / "labelsTr").iterdir()) == ["corrected.nii.gz", f"{dicom_case}.nii.gz"]
    assert (dataset / "README.txt").read_text() == "mine" and (dataset / MARKER_FILENAME).is_file()
    # An export killed before its dataset.json leaves the marker: the folder is still ours.
    (dataset / "dataset.json").unlink()
    assert len(export_corrections(out, dataset, progress=False).exported) == 2


def test_the_command_prints_a_line_per_case_and_the_summary(reviewed, tmp_path, capsys):
    out = reviewed[0]
    code = cli.main(["corrections", "export", str(out), "-o", str(tmp_path / "dataset"), "-q"])
    captured = capsys.readouterr()
    assert code == cli.EXIT_USER_ERROR  # a case failed
    assert captured.out.strip().startswith("3 exported: 1 corrected, 2 accepted; 2 left out")
    assert captured.err.splitlines() == [line for line in captured.err.splitlines() if line.startswith(("left out: ",
                                                                                                         "failed: "))]
    assert len(captured.err.splitlines()) == 2
    os.remove(out / "moved" / "report.json")  # the failing case gone: success
    assert cli.main(["corrections", "export", str(out), "-o", str(tmp_path / "dataset"), "-q"]) == 0


@pytest.fixture
def msd_reviewed(tmp_path, monkeypatch):
    """Two accepted cases whose masks came from weights of the msd convention (as the official ones)."""
    install_threshold_network(monkeypatch)
    inputs = [sphere(tmp_path / "scans" / f"{name}.nii.gz", radius, SHAPE) for name, radius in (("a", 5), ("b", 6))]
    weights = tmp_path / "msd_weights.pt"
    weights.write_bytes(b"stand-in weights")
    sidecar_path(weights).write_text(json.dumps({SIDECAR_KEY: CONVENTION_MSD}))
    out = tmp_path / "out"
    results = segment_files(inputs, out, weights, "cpu", progress=False, options=NO_PREVIEW)
    assert [r.status for r in results] == ["ok", "ok"]
    for case in ("a", "b"):
        assert json.loads((out / case / "report.json").read_text())["model"]["orientation_convention"] == "msd"
        record_review(out / case, "accepted")
    return out


def test_masks_of_msd_weights_export_with_msd_headers_that_those_weights_fine_tune_on(msd_reviewed, tmp_path):
    out = msd_reviewed
    summary = export_corrections(out, tmp_path / "dataset", progress=False)
    dataset = tmp_path / "dataset"
    assert summary.convention == "msd" and summary.line().endswith("(orientation convention msd)")
    assert json.loads((dataset / "dataset.json").read_text())["orientation_convention"] == "msd"
    mirror = np.diag([-1.0, -1.0, 1.0, 1.0])
    for case in ("a", "b"):
        mask_affine = _affine(out / case / "spleen.nii.gz")
        for folder in ("imagesTr", "labelsTr"):  # the voxels as they are, the header mirrored as MSD's
            assert np.allclose(_affine(dataset / folder / f"{case}.nii.gz"), mirror @ mask_affine, atol=1e-5)
            assert not np.allclose(_affine(dataset / folder / f"{case}.nii.gz"), mask_affine, atol=1)
        assert np.array_equal(_voxels(dataset / "labelsTr" / f"{case}.nii.gz"), _voxels(out / case / "spleen.nii.gz"))
        assert np.array_equal(_voxels(dataset / "imagesTr" / f"{case}.nii.gz"),
                              read_volume(tmp_path / "scans" / f"{case}.nii.gz")[0])
    # train accepts msd init weights (the official ones) on it, and refuses true ones (the reverse of a true export).
    declared = dataset_orientation_convention(dataset)
    assert trained_convention(_init("msd"), False, declared) == "msd"
    with pytest.raises(ConfigError, match="'true' orientation convention but the dataset teaches 'msd'"):
        trained_convention(_init("true"), False, declared)
    # --convention true writes the reader's headers, whatever the weights were.
    forced = export_corrections(out, tmp_path / "true_dataset", convention="true", progress=False)
    assert forced.convention == "true"
    assert np.array_equal(_affine(tmp_path / "true_dataset" / "labelsTr" / "a.nii.gz"), _affine(out / "a" / "spleen.nii.gz"))


def test_masks_of_both_conventions_need_the_convention_named(msd_reviewed, tmp_path):
    out = msd_reviewed
    report = out / "b" / "report.json"  # as if b had been segmented by other weights into the same folder
    record = json.loads(report.read_text())
    record["model"]["orientation_convention"] = "true"
    report.write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=r"both orientation conventions \(msd: a, true: b"):
        export_corrections(out, tmp_path / "dataset", progress=False)
    assert not (tmp_path / "dataset").exists()  # nothing written
    assert len(export_corrections(out, tmp_path / "dataset", convention="msd", progress=False).exported) == 2


def _init(convention: str) -> InitWeights:
    return InitWeights(path=Path("/w.pt"), sha256="0" * 64, orientation_convention=convention)
