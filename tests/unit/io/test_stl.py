"""STL surfaces: volume, centroid and outward normals of a sphere, in LPS millimetres."""

from pathlib import Path

import numpy as np
import pytest

from spleen_seg.io.stl import write_stl


def _read_stl(path: Path) -> tuple[np.ndarray, np.ndarray]:
    data = path.read_bytes()
    count = int(np.frombuffer(data, dtype="<u4", count=1, offset=80)[0])
    assert len(data) == 84 + 50 * count
    records = np.frombuffer(data, dtype=np.dtype([("n", "<f4", (3,)), ("v", "<f4", (3, 3)), ("a", "<u2")]), offset=84)
    return records["n"].astype(np.float64), records["v"].astype(np.float64)


@pytest.mark.parametrize("axis_signs", [(-1, 1, 1), (1, 1, 1), (-1, -1, 1)], ids=["LAS", "RAS", "LPS"])
def test_stl_of_a_sphere_has_its_volume_centroid_and_outward_normals(tmp_path, axis_signs):
    spacing, radius_mm = np.array([0.9, 1.1, 2.5]), 15.0
    affine_ras = np.diag([*(np.asarray(axis_signs) * spacing), 1.0])  # both handednesses
    affine_ras[:3, 3] = (120.0, -40.0, 300.0)
    centre_voxel = np.array([20.3, 17.6, 9.2])
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in (40, 36, 20)], indexing="ij"), axis=-1)
    mask = (np.linalg.norm((grid - centre_voxel) * spacing, axis=-1) <= radius_mm).astype(np.uint8)
    normals, triangles = _read_stl(write_stl(mask, affine_ras, tmp_path / "sphere.stl"))

    volume = np.einsum("ij,ij->i", triangles[:, 0], np.cross(triangles[:, 1], triangles[:, 2])).sum() / 6.0
    assert volume == pytest.approx(mask.sum() * spacing.prod(), rel=0.05)
    assert volume == pytest.approx(4 / 3 * np.pi * radius_mm**3, rel=0.05)
    centre_lps = (affine_ras[:3, :3] @ centre_voxel + affine_ras[:3, 3]) * np.array([-1, -1, 1])
    areas = np.linalg.norm(np.cross(triangles[:, 1] - triangles[:, 0], triangles[:, 2] - triangles[:, 0]), axis=1) / 2
    centroid = (triangles.mean(axis=1) * areas[:, None]).sum(axis=0) / areas.sum()
    np.testing.assert_allclose(centroid, centre_lps, atol=1.0)
    outward = np.einsum("ij,ij->i", normals, triangles.mean(axis=1) - centre_lps)
    assert (outward[areas > 1e-6] > 0).mean() > 0.99


def test_stl_of_an_empty_mask_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        write_stl(np.zeros((4, 4, 4), dtype=np.uint8), np.eye(4), tmp_path / "empty.stl")
    assert not (tmp_path / "empty.stl").exists()
