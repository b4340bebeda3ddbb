"""Manifests, case ids over a whole cohort, and the parts of a job array (batch.inputs)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import spleen_seg.batch.inputs as inputs_module
from spleen_seg.batch.inputs import (
    BATCH_FILE_NAME,
    FailedInput,
    Part,
    collect_cases,
    collect_part,
    read_manifest,
    select_part,
    unique_case_ids,
)
from spleen_seg.errors import ConfigError

# Quadratic id assignment would take minutes here, linear well under a second.
MANY_CASES = 20_000
MAX_ID_SECONDS = 2.0


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_manifest_rows_resolve_against_the_manifest_folder(tmp_path):
    manifest = tmp_path / "lists" / "cases.csv"
    manifest.parent.mkdir()
    absolute = touch(tmp_path / "elsewhere" / "c.nii.gz")
    # A byte-order mark and spaces around names, as spreadsheets write; other columns are ignored.
    manifest.write_text("\ufeff site , path , case_id\nA, ../scans/a.nii.gz, alpha\n,,\nB,b.nii.gz,\n"
                        f"C,{absolute},  gamma  \n", encoding="utf-8")
    rows = read_manifest(manifest)
    assert [(row.path, row.case_id, row.line) for row in rows] == [
        (manifest.parent / "../scans/a.nii.gz", "alpha", 2), (manifest.parent / "b.nii.gz", None, 4),
        (absolute, "gamma", 5)]


@pytest.mark.parametrize("content, message", [
    (b"file,case_id\na.nii.gz,a\n", "no 'path' column (header: file, case_id)"),
    (b"path,case_id\na.nii.gz,same\nb.nii.gz,other\nc.nii.gz,same\n", "case_id 'same' on lines 2 and 4"),
    (b"path\n\xff\xfe broken", "cannot read the manifest (UnicodeDecodeError"),
    (b"path\n" + b"a" * 200_000, "cannot read the manifest (Error: field larger than field limit"),
    (b"", "no 'path' column (header: empty)"),
    (b"path,case_id\n", "lists no inputs"),
    (b"path,case_id\n ,a\n", "line 2 has an empty 'path'"),
    (b"path,case_id\na.nii.gz,x/y\n", "case_id 'x/y' cannot name an output folder: it holds a path separator"),
    (b"path,case_id\na.nii.gz,.hidden\n", "starts with '.'"),
    (b"path,case_id\na.nii.gz,index.html\n", "is the name of one of the batch's own files"),
    (b"path,case_id\na.nii.gz,\"a\tb\"\n", "holds a control character"),
])
def test_a_bad_manifest_is_a_one_line_error_naming_it(tmp_path, content, message):
    manifest = tmp_path / "cases.csv"
    manifest.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        read_manifest(manifest)
    text = str(caught.value)
    assert text.startswith(f"{manifest}: ") and message in text and "\n" not in text


def test_a_missing_manifest_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match=r"cases\.csv: cannot read the manifest \(FileNotFoundError"):
        read_manifest(tmp_path / "cases.csv")


def test_case_ids_of_manifest_rows_and_command_line_inputs(tmp_path):
    folder = tmp_path / "site"
    for name in ("x.nii.gz", "y.nii.gz"):
        touch(folder / name)
    loose = touch(tmp_path / "alpha.nii.gz")
    reserved = touch(tmp_path / "index.html.nii.gz")
    manifest = tmp_path / "cases.csv"
    manifest.write_text("path,case_id\nsite,s1\nmissing.nii.gz,alpha\nmissing2.nii.gz,\n")
    items, cases = collect_cases([loose, reserved], read_manifest(manifest))
    # The manifest's "alpha" keeps its name; the command-line file of that name yields it.
    assert cases == ["alpha_2", "index.html_2", "s1_x", "s1_y", "alpha", "missing2"]
    assert items[:4] == [loose, reserved, folder / "x.nii.gz", folder / "y.nii.gz"]
    assert items[4:] == [tmp_path / "missing.nii.gz", tmp_path / "missing2.nii.gz"]  # they fail when read


def test_a_folder_that_cannot_be_expanded_keeps_its_manifest_id(tmp_path):
    (tmp_path / "empty").mkdir()
    manifest = tmp_path / "cases.csv"
    manifest.write_text("path,case_id\nempty,patient7\n")
    (item,), cases = collect_cases([], read_manifest(manifest))
    assert isinstance(item, FailedInput) and cases == ["patient7"]


def test_reserved_names_are_the_batch_files():
    from spleen_seg.batch.case import RUN_INFO_FILENAME
    from spleen_seg.batch.inputs import Part as PartType
    from spleen_seg.batch.summary import JOURNAL_SUFFIX, SUMMARY_FILENAME, part_summary_name
    from spleen_seg.outputs.cohort import PAGE_FILENAME

    for name in (SUMMARY_FILENAME, "summary" + JOURNAL_SUFFIX, part_summary_name(PartType(2, 5)),
                 "summary.part-2-of-5" + JOURNAL_SUFFIX, "summary.part-2-of-5.done", PAGE_FILENAME, RUN_INFO_FILENAME):
        assert BATCH_FILE_NAME.match(name), name


@pytest.mark.parametrize("count", [1, 2, 3, 7, 12])
def test_parts_cover_every_case_exactly_once_with_ids_independent_of_the_split(tmp_path, count):
    paths = [tmp_path / f"{name}.nii.gz" for name in ("m", "b", "k", "a", "z", "b_dup", "q", "c", "x", "e")]
    paths.append(tmp_path / "other" / "b.nii.gz")  # same file name: "b_2" whatever the split
    items, cases = collect_cases(paths)
    seen: list[str] = []
    sizes = []
    for index in range(count):
        part_items, part_cases = select_part(items, cases, Part(index, count))
        assert part_cases == [cases[items.index(item)] for item in part_items]  # ids from the whole cohort
        assert part_items == sorted(part_items, key=items.index)  # input order inside a part
        seen += part_cases
        sizes.append(len(part_cases))
    assert sorted(seen) == sorted(cases) and len(set(seen)) == len(cases)
    assert max(sizes) - min(sizes) <= 1
    assert "b_2" in cases and cases == unique_case_ids(items)


def test_part_dealing_follows_case_id_order(tmp_path):
    items, cases = collect_cases([tmp_path / f"{name}.nii.gz" for name in ("d", "a", "c", "b", "e")])
    # In id order a b c d e, dealt in turn: part 0 gets a, c, e and part 1 b, d, each in input order.
    assert select_part(items, cases, Part(0, 2))[1] == ["a", "c", "e"]
    assert select_part(items, cases, Part(1, 2))[1] == ["d", "b"]


def test_a_manifest_with_every_case_id_expands_only_the_rows_of_the_part(tmp_path, monkeypatch):
    """Each task searches only its own rows (a DICOM tree is scanned once per cohort, not once per task)."""
    names = ["p5", "p0", "p3", "p1", "p4", "p2"]
    for name in names:
        touch(tmp_path / f"folder_{name}" / "scan.nii.gz")
    touch(tmp_path / "folder_p3" / "other.nii.gz")  # a row of two cases: p3_other, p3_scan
    manifest = tmp_path / "cases.csv"
    manifest.write_text("path,case_id\n" + "".join(f"folder_{name},{name}\n" for name in names))
    rows = read_manifest(manifest)
    expanded: list[str] = []
    real_expand = inputs_module._expand
    monkeypatch.setattr(inputs_module, "_expand", lambda item: expanded.append(item.name) or real_expand(item))
    all_cases = collect_cases([], rows)[1]
    assert sorted(all_cases) == ["p0", "p1", "p2", "p3_other", "p3_scan", "p4", "p5"]
    seen = []
    for index in range(3):
        expanded.clear()
        items, cases = collect_part([], rows, Part(index, 3))
        # Rows in case-id order p0..p5, dealt in turn: part 0 gets p0 and p3, in manifest order.
        mine = ["p0", "p1", "p2", "p3", "p4", "p5"][index::3]
        assert expanded == [f"folder_{name}" for name in names if name in mine]
        assert [item.parent.name for item in items] == [f"folder_{name}" for name in names
                                                        for _ in range(2 if name == "p3" else 1) if name in mine]
        seen += cases
    assert sorted(seen) == sorted(all_cases)


@pytest.mark.parametrize("index, count", [(3, 3), (-1, 2)])
def test_a_part_outside_the_split_is_refused(index, count):
    with pytest.raises(ConfigError, match="array task ids must run from 0"):
        Part(index, count)


def test_case_ids_of_a_large_cohort_with_one_name(tmp_path):
    """Inputs named alike (DICOM folders all called CT) get their ids in linear time."""
    items = [tmp_path / str(n) / "CT.nii.gz" for n in range(MANY_CASES)]
    start = time.perf_counter()
    cases = unique_case_ids(items)
    assert time.perf_counter() - start < MAX_ID_SECONDS
    assert cases[:3] == ["CT", "CT_2", "CT_3"] and cases[-1] == f"CT_{MANY_CASES}" and len(set(cases)) == MANY_CASES
