"""Seeded, randomly corrupted NIfTI files and DICOM folders for the batch fuzz test (issue 7, item 3).

Each corruption starts from a small valid CT (a NIfTI file, or a DICOM series of one file
per slice) and damages it: header bytes, header fields a reader depends on, voxel bytes,
truncation, gzip stream bytes. Some damaged files stay readable (a changed description,
a few voxels): the batch segments those; the rest must fail one by one.

Declared sizes are bounded: a mutation whose header declares more than
``MAX_DECLARED_BYTES`` of voxels, or a grid that resamples to more than
``MAX_RESAMPLED_VOXELS``, is drawn again. Refusing such headers before allocating is the
resource guard's job (issue 7, item 5); a fuzz test must not exhaust the machine's memory
on a branch without it.
"""

from __future__ import annotations

import bz2
import gzip
import io
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from synthetic_dicom import write_series

NIFTI_HEADER_BYTES = 348
NIFTI_SHAPE = (20, 20, 10)
NIFTI_SPACING_MM = (2.0, 2.0, 4.0)
DICOM_SHAPE = (16, 16, 6)
# (start, stop) byte ranges of the NIfTI-1 fields a reader depends on: sizeof_hdr, dim,
# datatype + bitpix, pixdim, vox_offset, scl_slope + scl_inter, qform/sform codes,
# quaternion + offsets, srow_x/y/z, magic.
NIFTI_CRITICAL_FIELDS = ((0, 4), (40, 56), (70, 74), (76, 108), (108, 112), (112, 120), (252, 256), (256, 280),
                         (280, 328), (344, 348))
GZIP_HEADER_BYTES = 10
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian
DICOM_PREAMBLE_BYTES = 132
MAX_DECLARED_BYTES = 256 * 2**20
MAX_RESAMPLED_VOXELS = 40_000_000
FINEST_TARGET_SPACING_MM = 1.5  # the recipe resamples to 1.5 x 1.5 x 2 mm
MAX_DRAWS = 100

# The kinds in turn, weighted towards truncation (an interrupted copy, the commonest damage):
# damaged voxels and most changed header bytes leave a readable image, and each readable
# image costs a segmentation (about a second), which bounds how many a test can afford.
NIFTI_KINDS = ("truncate", "header_field", "gzip_truncate", "truncate", "header_byte", "gzip_truncate",
               "truncate", "data_bytes", "gzip_truncate", "truncate", "header_field", "gzip_truncate",
               "truncate", "gzip_bytes", "gzip_truncate", "truncate")
DICOM_KINDS = ("header_byte", "data_bytes", "truncate")
# Of every five rounds of DICOM_KINDS, four are one damaged slice alone in its folder, one a
# series with one damaged slice.
DICOM_ALONE_EVERY = 5


# Decompression bombs: zeros compressed once per step and repeated as further members of
# one stream (gzip and bzip2 readers continue across members), so a bomb of hundreds of MB
# is written in a fraction of a second.
BOMB_STEP_BYTES = 32 << 20
COMPRESSORS = {".gz": gzip.compress, ".bz2": bz2.compress}
NIFTI_EXTENSION_FLAG = b"\x01\x00\x00\x00"
EXTENSION_HEAD = struct.Struct("<ii")  # esize, ecode
# An extension's size rounded up to this: a multiple of 16 (as NIfTI asks) that keeps
# vox_offset (352 + esize, a float32) exact up to 1 GiB.
EXTENSION_ALIGN_BYTES = 64


def write_compressed_zeros_after(path: Path, head: bytes, zero_bytes: int) -> Path:
    """``head`` then ``zero_bytes`` zeros, compressed by ``path``'s suffix (.gz or .bz2) as several members."""
    compress = COMPRESSORS[path.suffix]
    steps, rest = divmod(zero_bytes, BOMB_STEP_BYTES)
    step = compress(bytes(BOMB_STEP_BYTES)) if steps else b""
    path.write_bytes(compress(head) + step * steps + compress(bytes(rest)))
    return path


def write_nifti_extension_bomb(path: Path, extension_bytes: int) -> Path:
    """A small valid CT whose header carries one extension of about ``extension_bytes`` zeros (.nii.gz or .nii.bz2).

    The header is consistent (vox_offset after the extension, the voxels after it): what
    a reader must refuse is the extension's size, which nibabel reads whole.
    """
    image = nib.Nifti1Image(ct_like(NIFTI_SHAPE, 0), np.diag([*NIFTI_SPACING_MM, 1.0]))
    header = image.header
    esize = -(-(EXTENSION_HEAD.size + extension_bytes) // EXTENSION_ALIGN_BYTES) * EXTENSION_ALIGN_BYTES
    header["vox_offset"] = NIFTI_HEADER_BYTES + len(NIFTI_EXTENSION_FLAG) + esize
    head = header.binaryblock + NIFTI_EXTENSION_FLAG + EXTENSION_HEAD.pack(esize, 0)
    voxels = np.asarray(image.dataobj).tobytes(order="F")
    compress = COMPRESSORS[path.suffix]
    write_compressed_zeros_after(path, head, esize - EXTENSION_HEAD.size)
    with path.open("ab") as handle:
        handle.write(compress(voxels))
    return path


@dataclass(frozen=True)
class Corrupted:
    """One damaged input: ``path`` is what the batch is given (a NIfTI file or a DICOM folder)."""

    path: Path
    kind: str


def ct_like(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """int16 HU: air around an elliptic body of soft tissue with noise, so it reads as a CT."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape[:2]], indexing="ij"))
    body = (grid**2).sum(0) < 0.7
    image = np.where(body[..., None], 40.0, -1000.0) + rng.normal(0, 20, shape)
    return np.broadcast_to(image, shape).astype(np.int16)


def _nifti_bytes(array: np.ndarray) -> bytes:
    image = nib.Nifti1Image(array, np.diag([*NIFTI_SPACING_MM, 1.0]))
    image.set_sform(image.affine, code=1)
    image.set_qform(image.affine, code=1)
    return image.to_bytes()


def _within_bounds(raw: bytes) -> bool:
    """False when the header declares more voxel bytes, or a finer resampled grid, than the fuzz allows."""
    try:
        header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw[:NIFTI_HEADER_BYTES]), check=False)
        shape = header.get_data_shape()
        itemsize = header.get_data_dtype().itemsize
    except Exception:  # the reader fails on the same header before allocating anything
        return True
    voxels = math.prod(int(n) for n in shape)
    if voxels * max(itemsize, 4) > MAX_DECLARED_BYTES:
        return False
    try:
        affine = header.get_best_affine()
    except Exception:
        return True
    spans = np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
    if not np.isfinite(spans).all():
        return True  # refused as a non-finite affine
    dims = [int(n) for n in (tuple(shape) + (1, 1, 1))[:3]]
    resampled = math.prod(max(1.0, n * s / FINEST_TARGET_SPACING_MM) for n, s in zip(dims, spans, strict=True))
    return resampled <= MAX_RESAMPLED_VOXELS


def _flip(raw: bytearray, rng: np.random.Generator, start: int, stop: int, count: int) -> None:
    for offset in rng.integers(start, stop, size=count):
        raw[offset] = (raw[offset] + int(rng.integers(1, 256))) % 256  # never the same byte


def _damage_nifti(kind: str, raw: bytes, rng: np.random.Generator) -> bytes:
    data = bytearray(raw)
    if kind == "header_byte":
        _flip(data, rng, 0, NIFTI_HEADER_BYTES, int(rng.integers(1, 4)))
    elif kind == "header_field":
        start, stop = NIFTI_CRITICAL_FIELDS[int(rng.integers(len(NIFTI_CRITICAL_FIELDS)))]
        _flip(data, rng, start, stop, 1)
    elif kind == "data_bytes":
        vox_offset = int(nib.Nifti1Header.from_fileobj(io.BytesIO(raw[:NIFTI_HEADER_BYTES]))["vox_offset"])
        _flip(data, rng, vox_offset, len(data), int(rng.integers(1, 9)))
    elif kind == "truncate":
        return bytes(data[: int(rng.integers(0, len(data)))])
    return bytes(data)


def _damage_gzip(kind: str, raw: bytes, rng: np.random.Generator) -> bytes:
    packed = bytearray(gzip.compress(raw, mtime=0))
    if kind == "gzip_truncate":
        return bytes(packed[: int(rng.integers(0, len(packed)))])
    _flip(packed, rng, GZIP_HEADER_BYTES, len(packed), int(rng.integers(1, 4)))
    return bytes(packed)


def corrupt_nifti_files(folder: Path, count: int, seed: int) -> list[Corrupted]:
    """``count`` damaged NIfTI files in ``folder``, cycling through ``NIFTI_KINDS``.

    One in three damaged files is compressed after the damage (``.nii.gz``: stream reads),
    the others stay ``.nii`` (memory-mapped reads); the gzip kinds damage the compressed
    stream. Base voxels alternate between int16 and float32 (flipped float bytes can make
    NaN or infinity).
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    volume = ct_like(NIFTI_SHAPE, seed)
    bases = (_nifti_bytes(volume), _nifti_bytes(volume.astype(np.float32)))
    made = []
    for number in range(count):
        kind = NIFTI_KINDS[number % len(NIFTI_KINDS)]
        raw = bases[number % 2]
        for _ in range(MAX_DRAWS):
            if kind.startswith("gzip"):
                damaged, suffix = _damage_gzip(kind, raw, rng), ".nii.gz"
                if _within_bounds(_gunzip_prefix(damaged)):
                    break
            else:
                damaged = _damage_nifti(kind, raw, rng)
                compressed = number % 3 == 2
                suffix = ".nii.gz" if compressed else ".nii"
                if _within_bounds(damaged):
                    damaged = gzip.compress(damaged, mtime=0) if compressed else damaged
                    break
        else:
            raise RuntimeError(f"no {kind} damage within bounds after {MAX_DRAWS} draws")
        path = folder / f"{number:03d}_{kind}{suffix}"
        path.write_bytes(damaged)
        made.append(Corrupted(path, f"nifti.{kind}"))
    return made


def _gunzip_prefix(packed: bytes) -> bytes:
    """As much of the header as a damaged gzip stream still gives (what a reader would see)."""
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(packed)) as stream:
            return stream.read(NIFTI_HEADER_BYTES)
    except Exception:  # the stream breaks within the header: the reader gets no further
        return b""


def _damage_dicom(kind: str, raw: bytes, rng: np.random.Generator) -> bytes:
    data = bytearray(raw)
    pixels = raw.rfind(PIXEL_DATA_TAG)
    if kind == "header_byte":
        _flip(data, rng, DICOM_PREAMBLE_BYTES, pixels, int(rng.integers(1, 4)))
    elif kind == "data_bytes":
        _flip(data, rng, pixels + len(PIXEL_DATA_TAG), len(data), int(rng.integers(1, 9)))
    elif kind == "truncate":
        return bytes(data[: int(rng.integers(0, len(data)))])
    return bytes(data)


def corrupt_dicom_folders(folder: Path, count: int, seed: int) -> list[Corrupted]:
    """``count`` DICOM folders in ``folder``: one damaged slice alone, or a series with one damaged slice."""
    rng = np.random.default_rng(seed)
    good = write_series(folder / "_base", ct_like(DICOM_SHAPE, seed).astype(np.float32))
    slices = [path.read_bytes() for path in good]
    made = []
    for number in range(count):
        kind = DICOM_KINDS[number % len(DICOM_KINDS)]
        alone = number // len(DICOM_KINDS) % DICOM_ALONE_EVERY != 0
        target = folder / f"{number:03d}_{'alone' if alone else 'series'}_{kind}"
        target.mkdir()
        damaged = int(rng.integers(len(slices)))
        for index, raw in enumerate(slices):
            if alone and index != damaged:
                continue
            (target / f"slice_{index:03d}.dcm").write_bytes(_damage_dicom(kind, raw, rng) if index == damaged else raw)
        made.append(Corrupted(target, f"dicom.{'alone' if alone else 'series'}.{kind}"))
    for path in good:
        path.unlink()
    (folder / "_base").rmdir()
    return made
