"""STL surface mesh of a mask, in DICOM patient coordinates (LPS) and millimetres."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from spleen_seg.io.atomic import atomic_path

STL_HEADER = b"spleen-seg surface mesh, DICOM patient coordinates (LPS), millimetres"
STL_DTYPE = np.dtype([("normal", "<f4", (3,)), ("vertices", "<f4", (3, 3)), ("attribute", "<u2")])


def _mesh_lps(mask: np.ndarray, affine_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (V, 3) in LPS mm and outward-wound faces (F, 3) of the mask's 0.5 iso-surface."""
    from skimage.measure import marching_cubes

    nonzero = np.nonzero(mask)
    low = [int(axis.min()) for axis in nonzero]
    high = [int(axis.max()) + 1 for axis in nonzero]
    crop = mask[low[0]:high[0], low[1]:high[1], low[2]:high[2]]
    # A zero border closes the surface where the mask touches the crop's edge.
    padded = np.pad(crop.astype(np.float32), 1)
    vertices, faces, _, _ = marching_cubes(padded, level=0.5)
    voxel = vertices.astype(np.float64) - 1.0 + np.asarray(low, dtype=np.float64)
    ras = voxel @ affine_ras[:3, :3].T + affine_ras[:3, 3]
    lps = ras * np.array([-1.0, -1.0, 1.0])
    # Orientation flips with the affine's handedness: wind so the signed volume is positive.
    if _signed_volume(lps[faces]) < 0:
        faces = faces[:, ::-1]
    return lps, np.ascontiguousarray(faces)


def _signed_volume(triangles: np.ndarray) -> float:
    """Volume enclosed by a closed mesh given as (F, 3 vertices, 3 coordinates); positive if wound outward."""
    return float(np.einsum("ij,ij->i", triangles[:, 0], np.cross(triangles[:, 1], triangles[:, 2])).sum() / 6.0)


def write_stl(mask: np.ndarray, affine_ras: np.ndarray, dest: str | Path) -> Path:
    """Write the surface of ``mask`` as a binary STL file.

    ``mask`` is (X, Y, Z), non-zero inside, on the grid of ``affine_ras`` (voxel
    (i, j, k, 1) -> RAS+ mm). The mesh is the marching-cubes 0.5 iso-surface, closed at
    the volume border, with vertices in DICOM patient coordinates (LPS) in millimetres,
    i.e. RAS with x and y negated, as 3D Slicer and most DICOM tools expect.
    Triangles are wound counter-clockwise seen from outside, normals point outward.
    Raises ``ValueError`` for an empty mask (there is no surface). Written atomically.
    """
    mask = np.asarray(mask) != 0
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3D (X, Y, Z), got shape {mask.shape}")
    if not mask.any():
        raise ValueError("mask is empty: there is no surface to write")
    vertices, faces = _mesh_lps(mask, np.asarray(affine_ras, dtype=np.float64))
    triangles = vertices[faces]
    normals = np.cross(triangles[:, 1] - triangles[:, 0], triangles[:, 2] - triangles[:, 0])
    lengths = np.linalg.norm(normals, axis=1, keepdims=True)
    normals = np.divide(normals, lengths, out=np.zeros_like(normals), where=lengths > 0)
    records = np.zeros(len(faces), dtype=STL_DTYPE)
    records["normal"] = normals
    records["vertices"] = triangles
    dest = Path(dest)
    with atomic_path(dest) as tmp, open(tmp, "wb") as handle:
        handle.write(STL_HEADER.ljust(80, b" ")[:80])
        handle.write(np.uint32(len(faces)).tobytes())
        handle.write(records.tobytes())
    return dest
