"""evaluate.py's metrics: NSD against a closed form and an independent brute-force reference, the
empty-mask conventions, volume errors, and the CSV's summary rows and JSON twin."""

from __future__ import annotations

import csv
import io
import itertools
import json
import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy.spatial import cKDTree
from skimage.measure import marching_cubes

from spleen_seg.training.evaluate import (
    CSV_COLUMNS,
    NSD_TOLERANCES_MM,
    case_row,
    nsd,
    rows_to_csv,
    rows_to_json,
    volume_errors,
)

# Anisotropic voxels (mm): a one-voxel shift along z moves the surface by 2.5 mm, more than
# the 1 and 2 mm tolerances and less than 3 mm.
SPACING_MM = (1.0, 1.25, 2.5)
EPS = 1e-9


def _cuboid_shifted_in_z_expected(size: tuple[int, int, int], spacing: tuple[float, float, float],
                                  tolerance: float) -> float:
    """NSD of a voxel cuboid against itself shifted one voxel along +z, in closed form.

    With sub-voxel surfaces, the surface elements sit on the lattice of voxel corners
    (half-integer indices) on the cuboid's boundary; a face element has the area of a voxel
    face, an edge element (2 of its 8 voxels inside) a rectangle of length the edge's spacing
    and width half the diagonal across it, a corner element (1 inside) the triangle through
    three half-edges. A point of A's top face lies inside B, at distance min(dz, its in-plane
    distance to the border); A's bottom face lies dz below B; every other point of A is on
    B's surface. B against A mirrors A against B, so the NSD is A's covered area fraction.
    """
    sx, sy, sz = spacing
    axes = [np.arange(n + 1) - 0.5 for n in size]
    covered = total = 0.0
    for x, y, z in itertools.product(*axes):
        on_border = [value in (axis[0], axis[-1]) for value, axis in zip((x, y, z), axes, strict=True)]
        kind = sum(on_border)
        if kind == 0:
            continue
        if kind == 1:
            area = {0: sy * sz, 1: sx * sz, 2: sx * sy}[on_border.index(True)]
        elif kind == 2:
            along = spacing[on_border.index(False)]
            across = [s for s, border in zip(spacing, on_border, strict=True) if border]
            area = along * math.hypot(*across) / 2.0
        else:
            area = math.sqrt((sy * sz) ** 2 + (sx * sz) ** 2 + (sx * sy) ** 2) / 8.0
        if z == axes[2][-1]:
            distance = min(sz, (x - axes[0][0]) * sx, (axes[0][-1] - x) * sx, (y - axes[1][0]) * sy,
                           (axes[1][-1] - y) * sy)
        elif z == axes[2][0]:
            distance = sz
        else:
            distance = 0.0
        total += area
        covered += area * (distance <= tolerance + EPS)
    return covered / total


def _reference_surface(mask: np.ndarray, spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Surface elements by marching cubes (skimage): each 2x2x2 cube's centre (mm) and its triangles' area."""
    vertices, faces, _, _ = marching_cubes(np.pad(mask.astype(np.float32), 1), 0.5, spacing=spacing, method="lorensen")
    triangles = vertices[faces]
    areas = 0.5 * np.linalg.norm(np.cross(triangles[:, 1] - triangles[:, 0], triangles[:, 2] - triangles[:, 0]), axis=1)
    cubes = np.floor(triangles.mean(axis=1) / np.asarray(spacing)).astype(int)
    keys, inverse = np.unique(cubes, axis=0, return_inverse=True)
    return (keys + 0.5) * np.asarray(spacing), np.bincount(inverse.ravel(), weights=areas)


def _reference_nsd(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...], tolerance: float) -> float:
    """Brute force: nearest surface element of the other mask by a k-d tree, area-weighted."""
    centres_a, areas_a = _reference_surface(a, spacing)
    centres_b, areas_b = _reference_surface(b, spacing)
    to_b, _ = cKDTree(centres_b).query(centres_a)
    to_a, _ = cKDTree(centres_a).query(centres_b)
    covered = areas_a[to_b <= tolerance + EPS].sum() + areas_b[to_a <= tolerance + EPS].sum()
    return float(covered / (areas_a.sum() + areas_b.sum()))


def _sphere(radius_mm: float, spacing: tuple[float, ...]) -> np.ndarray:
    shape = [int(2 * radius_mm / s) + 8 for s in spacing]
    grid = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)], indexing="ij")
    return sum(g**2 for g in grid) <= radius_mm**2


def test_nsd_of_a_cuboid_shifted_one_voxel_equals_the_closed_form():
    a = np.zeros((20, 18, 14), dtype=np.uint8)
    a[4:14, 3:15, 3:10] = 1
    b = np.roll(a, 1, axis=2)
    expected = [_cuboid_shifted_in_z_expected((10, 12, 7), SPACING_MM, t) for t in NSD_TOLERANCES_MM]
    assert expected == pytest.approx([0.743103, 0.779251, 1.0], abs=1e-6)
    assert nsd(a, b, SPACING_MM) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("axis", [2, 0], ids=["z-shift-2.5mm", "x-shift-1mm"])
def test_nsd_of_a_sphere_shifted_one_voxel_equals_a_brute_force_reference(axis):
    a = _sphere(15.0, SPACING_MM)
    b = np.roll(a, 1, axis=axis)
    measured = nsd(a, b, SPACING_MM)
    reference = [_reference_nsd(a, b, SPACING_MM, t) for t in NSD_TOLERANCES_MM]
    assert measured == pytest.approx(reference, abs=1e-6)
    if axis == 2:  # a 2.5 mm shift: partial at 1 and 2 mm, complete at 3 mm
        assert measured[0] < measured[1] < 0.9 and measured[2] == pytest.approx(1.0)
        # Counting edge voxels instead of sub-voxel surface areas (MONAI's default) differs.
        from monai.metrics import compute_surface_dice

        voxels = compute_surface_dice(torch.as_tensor(a)[None, None].float(), torch.as_tensor(b)[None, None].float(),
                                      [1.0], include_background=True, spacing=list(SPACING_MM), use_subvoxels=False)
        assert abs(float(voxels) - measured[0]) > 0.1
    else:  # a 1 mm shift is within every tolerance
        assert measured == pytest.approx([1.0, 1.0, 1.0])


def test_empty_mask_conventions():
    empty = np.zeros((8, 8, 8), dtype=np.uint8)
    cube = empty.copy()
    cube[2:5, 2:5, 2:5] = 1
    assert nsd(empty, empty, SPACING_MM) == [1.0, 1.0, 1.0]
    assert nsd(cube, empty, SPACING_MM) == [0.0, 0.0, 0.0]
    assert nsd(empty, cube, SPACING_MM) == [0.0, 0.0, 0.0]
    assert volume_errors(0.0, 0.0)[0] == 0.0 and math.isnan(volume_errors(0.0, 0.0)[1])
    assert volume_errors(110.0, 100.0) == pytest.approx((10.0, 10.0))
    assert volume_errors(90.0, 100.0) == pytest.approx((10.0, -10.0))


def _one_hot(mask: np.ndarray, affine: np.ndarray, name: str) -> MetaTensor:
    fg = torch.as_tensor(mask, dtype=torch.float32)
    return MetaTensor(torch.stack([1 - fg, fg]), affine=torch.as_tensor(affine), meta={"filename_or_obj": name})


def test_case_row_on_the_original_grid():
    affine = np.diag([*SPACING_MM, 1.0])
    label = np.zeros((20, 18, 14), dtype=np.uint8)
    label[4:14, 3:15, 3:10] = 1
    pred = np.roll(label, 1, axis=2)
    pred[4:14, 3:15, 3] = 1  # one more slice: 10 x 12 + 840 voxels
    row = case_row(_one_hot(pred, affine, "/x/spleen_7.nii.gz"), _one_hot(label, affine, "/x/spleen_7.nii.gz"))
    assert tuple(row) == CSV_COLUMNS
    voxel_ml = float(np.prod(SPACING_MM)) / 1000.0
    assert row["case"] == "spleen_7.nii.gz"
    assert row["label_volume_ml"] == pytest.approx(840 * voxel_ml)
    assert row["pred_volume_ml"] == pytest.approx(960 * voxel_ml)
    assert row["abs_volume_error_ml"] == pytest.approx(120 * voxel_ml)
    assert row["rel_volume_error_percent"] == pytest.approx(100 * 120 / 840)
    assert row["dice"] == pytest.approx(2 * 840 / (840 + 960))
    assert row["nsd_1mm"] < row["nsd_2mm"] < row["nsd_3mm"] == pytest.approx(1.0)


def test_summary_rows_and_json_twin():
    rows = [{"case": f"c{i}", "dice": d, "hd95_mm": h, "nsd_1mm": n, "nsd_2mm": n, "nsd_3mm": 1.0,
             "pred_volume_ml": 100.0 + i, "label_volume_ml": 100.0, "abs_volume_error_ml": float(i),
             "rel_volume_error_percent": float(i)}
            for i, (d, h, n) in enumerate([(0.9, 2.0, 0.5), (0.8, math.nan, 0.7), (1.0, 4.0, 0.9), (0.6, 6.0, 0.1)])]
    lines = list(csv.DictReader(io.StringIO(rows_to_csv(rows))))
    assert [line["case"] for line in lines] == ["c0", "c1", "c2", "c3", "mean", "median", "iqr"]
    stats = {line["case"]: line for line in lines[4:]}
    assert float(stats["mean"]["dice"]) == pytest.approx(0.825)
    assert float(stats["median"]["dice"]) == pytest.approx(0.85)
    assert float(stats["iqr"]["dice"]) == pytest.approx(np.percentile([0.6, 0.8, 0.9, 1.0], 75)
                                                        - np.percentile([0.6, 0.8, 0.9, 1.0], 25))
    # HD95 undefined for c1: empty cell, and the statistics cover the three other cases.
    assert lines[1]["hd95_mm"] == ""
    assert float(stats["mean"]["hd95_mm"]) == pytest.approx(4.0) and float(stats["iqr"]["hd95_mm"]) == pytest.approx(2.0)
    twin = json.loads(rows_to_json(rows))
    assert [case["case"] for case in twin["cases"]] == ["c0", "c1", "c2", "c3"]
    assert twin["cases"][1]["hd95_mm"] is None
    assert twin["summary"]["hd95_mm"]["n"] == 3 and twin["summary"]["dice"]["n"] == 4
    assert twin["summary"]["dice"]["mean"] == pytest.approx(float(stats["mean"]["dice"]))
    assert twin["nsd_tolerances_mm"] == list(NSD_TOLERANCES_MM)
