"""read_volume's header guards: declared size against the file, orientation oddities, fuzzed headers."""

import bz2
import gzip
import resource

import nibabel as nib
import numpy as np
import pytest
from memory_trace import traced_peak

from spleen_seg.errors import InputImageError, ResourceError, SpleenSegError
from spleen_seg.io import nifti
from spleen_seg.io.nifti import read_geometry, read_volume, write_mask

AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])
MB = 1 << 20


def _ct(shape=(12, 10, 8)) -> np.ndarray:
    return (np.random.default_rng(0).normal(size=shape) * 100).astype(np.int16)


def _write(path, header: nib.Nifti1Header, data: np.ndarray) -> None:
    """Header and voxels as stored bytes, bypassing nibabel's fixes (single-file .nii, .nii.gz or .nii.bz2)."""
    header = header.copy()
    header["vox_offset"] = 352
    raw = header.binaryblock + b"\0" * 4 + data.astype(header.get_data_dtype()).tobytes(order="F")
    compress = {".gz": gzip.compress, ".bz2": bz2.compress}.get(path.suffix, bytes)
    path.write_bytes(compress(raw))


def _header(data: np.ndarray, *, sform=1, qform=1, affine=AFFINE) -> nib.Nifti1Header:
    image = nib.Nifti1Image(data, affine)
    image.set_sform(affine, code=sform)
    image.set_qform(affine, code=qform)
    image.update_header()
    return image.header


def _huge_header(dtype) -> nib.Nifti1Header:
    header = nib.Nifti1Header()
    header.set_data_shape((4000, 4000, 4000))
    header.set_data_dtype(dtype)
    header.set_sform(AFFINE, code=1)
    return header


@pytest.mark.parametrize("name, dtype, declared", [
    ("huge.nii", np.int16, "4000x4000x4000 int16 voxels (128.0 GB) at offset 352 but the file holds 1.0 kB"),
    ("huge.nii.gz", np.int16, "4000x4000x4000 int16 voxels (128.0 GB) but the compressed file holds"),
    ("huge.nii.gz", np.float32, "4000x4000x4000 float32 voxels (256.0 GB) but the compressed file holds"),
    ("huge.nii.bz2", np.int16, "4000x4000x4000 int16 voxels (128.0 GB) but the compressed file holds"),
])
def test_a_1kb_file_declaring_4000_cubed_voxels_is_refused_without_allocating(tmp_path, name, dtype, declared):
    path = tmp_path / name
    _write(path, _huge_header(dtype), np.zeros(336, dtype=np.int16))  # 1,024 bytes as .nii
    assert path.stat().st_size <= 1024
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    err, traced = traced_peak(lambda: read_volume(path))
    assert isinstance(err, InputImageError) and "truncated file or corrupt header" in str(err), err
    assert declared in str(err) and str(path) in str(err) and "\n" not in str(err)
    assert traced < 4 * MB  # nothing volume-sized was allocated
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before < 64 * MB
    with pytest.raises(InputImageError, match="truncated file or corrupt header"):
        read_geometry(path)


def test_a_bz2_file_declaring_more_than_bzip2_can_hold_is_refused_though_it_would_fit(tmp_path):
    """bzip2 expands a byte into at most about 1.5 million: 1 GB of voxels cannot be in a file of
    a few hundred bytes. The memory check alone lets such a volume be allocated and read."""
    header = _huge_header(np.int16)
    header.set_data_shape((1000, 1000, 500))
    path = tmp_path / "cut.nii.bz2"
    _write(path, header, np.zeros(336, dtype=np.int16))
    size = path.stat().st_size
    assert size < 500
    with pytest.raises(InputImageError) as err:
        read_geometry(path)
    assert str(err.value) == (f"{path}: the header declares 1000x1000x500 int16 voxels (1.0 GB) but the compressed "
                              f"file holds {size} bytes, which bzip2 cannot expand beyond "
                              f"{nifti.BZIP2_MAX_RATIO * size / 1e6:.1f} MB: truncated file or corrupt header")


@pytest.mark.parametrize("suffix", [".gz", ".bz2"])
def test_a_header_extension_bomb_is_refused_before_it_inflates(tmp_path, suffix):
    """One header extension of 128 MiB of zeros in a few kB: nibabel reads extensions whole, so
    opening it inflated 128 MiB before any check; it is refused from the header's first bytes."""
    from corrupt_inputs import write_nifti_extension_bomb

    path = write_nifti_extension_bomb(tmp_path / f"bomb.nii{suffix}", 128 * MB)
    assert path.stat().st_size < 200_000
    err, traced = traced_peak(lambda: read_geometry(path))
    assert isinstance(err, InputImageError), err
    assert traced < 4 * MB
    assert str(err) == (f"{path}: the header leaves 134.2 MB for header extensions before the voxels "
                              "(vox_offset 134218144), more than any image needs (67.1 MB): corrupt header")
    small = write_nifti_extension_bomb(tmp_path / f"small.nii{suffix}", 1 * MB)  # within the bound: read
    assert read_geometry(small).shape == (20, 20, 10)


def test_an_extension_larger_than_vox_offset_leaves_is_refused(tmp_path):
    """vox_offset leaves 64 bytes; the extension declares 1 GB and 64 MiB of it are there: nibabel
    read all it found before failing."""
    from corrupt_inputs import write_compressed_zeros_after

    header = _header(_ct())
    raw = bytearray(header.binaryblock)
    raw[108:112] = np.float32(352 + 64).tobytes()  # vox_offset
    head = bytes(raw) + b"\x01\0\0\0" + np.array([1 << 30, 0], dtype="<i4").tobytes()
    path = write_compressed_zeros_after(tmp_path / "lying.nii.gz", head, 64 * MB)
    err, traced = traced_peak(lambda: read_geometry(path))
    assert isinstance(err, InputImageError), err
    assert "a header extension declares 1.1 GB where vox_offset leaves room for 64 bytes: corrupt header" in str(err)
    assert traced < 4 * MB


def test_a_volume_larger_than_the_memory_budget_is_a_resource_error(tmp_path, monkeypatch):
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(_ct((64, 64, 64)), AFFINE), str(path))
    with pytest.raises(ResourceError, match=r"reading needs ~1\.0 MB \(64x64x64 voxels as float32\), 100\.0 kB free"):
        read_volume(path, max_bytes=100_000)
    assert read_volume(path, max_bytes=2_000_000)[0].shape == (64, 64, 64)

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(nifti.np, "empty", no_memory)
    with pytest.raises(ResourceError, match="more than this machine can allocate"):
        read_volume(path)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_slab_reading_equals_nibabel_whole_read(tmp_path, suffix, monkeypatch):
    """Scaled int16 in many slabs gives exactly nibabel's float32 array."""
    monkeypatch.setattr(nifti, "READ_SLAB_BYTES", 4096)  # 2 slices per slab
    image = nib.Nifti1Image(_ct((32, 16, 21)), AFFINE)
    image.header.set_slope_inter(0.7, -1024.3)
    path = tmp_path / f"ct{suffix}"
    nib.save(image, str(path))
    array, _ = read_volume(path)
    expected = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    assert array.dtype == np.float32 and array.shape == (32, 16, 21)
    np.testing.assert_array_equal(array, expected)


def _gzip_member(raw: bytes) -> bytearray:
    """A one-member gzip file without a file name: header 10 bytes, deflate data, CRC-32 (4), length (4)."""
    return bytearray(gzip.compress(raw, mtime=0))


@pytest.mark.parametrize("damage", ["crc", "length", "data"])
def test_damaged_gzip_that_still_inflates_is_refused(tmp_path, damage):
    """nibabel stops before the gzip trailer; the reader checks it, so silently wrong voxels never reach the network."""
    data = _ct((32, 30, 20))
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(data, AFFINE), str(path))
    raw = gzip.decompress(path.read_bytes())
    member = _gzip_member(raw)
    if damage == "crc":
        member[-6] ^= 0xFF
    elif damage == "length":
        member[-2] ^= 0x01
    else:  # the stored (uncompressed, level 0) voxels: a flipped byte still inflates, to a wrong voxel
        member = bytearray(gzip.compress(raw, compresslevel=0, mtime=0))
        member[len(member) - 8 - 100] ^= 0x40
    path.write_bytes(bytes(member))
    with pytest.raises(InputImageError, match=r"ct\.nii\.gz: damaged gzip data \(BadGzipFile"):
        read_volume(path)
    path.write_bytes(gzip.compress(raw, mtime=0))  # the same file undamaged reads exactly
    array, _ = read_volume(path)
    np.testing.assert_array_equal(array, data.astype(np.float32))


def test_nan_in_a_late_slab_is_found(tmp_path, monkeypatch):
    monkeypatch.setattr(nifti, "READ_SLAB_BYTES", 2048)
    data = np.random.default_rng(0).normal(size=(16, 16, 10)).astype(np.float32)
    data[3, 4, 9] = np.inf
    nib.save(nib.Nifti1Image(data, AFFINE), str(tmp_path / "ct.nii"))
    with pytest.raises(InputImageError, match="NaN or infinite"):
        read_volume(tmp_path / "ct.nii")


def test_no_orientation_with_positive_pixdim_is_read_as_nibabel_does_with_a_loud_warning(tmp_path):
    data = _ct()
    path = tmp_path / "ct.nii"
    _write(path, _header(data, sform=0, qform=0), data)
    array, geometry = read_volume(path)
    assert geometry.axcodes == "LAS"  # nibabel's (and so MONAI's) reading of such a header
    assert geometry.spacing_mm == pytest.approx((0.8, 0.8, 2.5))
    np.testing.assert_allclose(geometry.affine_ras, nib.load(str(path)).affine)
    assert len(geometry.warnings) == 1 and "qform_code = sform_code = 0" in geometry.warnings[0]
    assert "assumed" in geometry.warnings[0] and "LAS" in geometry.warnings[0]


@pytest.mark.parametrize("pixdim, sform, qform, message", [
    ((0.0, 0.8, 2.5), 0, 0, r"no orientation .* pixdim\[1\.\.3\] = \(0, 0\.8, 2\.5\) is not positive"),
    ((-0.8, 0.8, 2.5), 0, 0, r"no orientation .* pixdim\[1\.\.3\] = \(-0\.8, 0\.8, 2\.5\) is not positive"),
    ((0.8, np.nan, 2.5), 0, 0, "is not positive"),
    ((0.8, 0.0, 2.5), 0, 1, r"qform's voxel size pixdim\[1\.\.3\] = \(0\.8, 0, 2\.5\) is zero"),
])
def test_unusable_voxel_sizes_are_clear_errors(tmp_path, pixdim, sform, qform, message):
    data = _ct()
    header = _header(data, sform=sform, qform=qform)
    header["pixdim"][1:4] = pixdim
    path = tmp_path / "ct.nii"
    _write(path, header, data)
    with pytest.raises(InputImageError, match=message) as err:
        read_volume(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_negative_pixdim_under_a_qform_is_read_as_its_absolute_value_with_a_warning(tmp_path):
    data = _ct()
    header = _header(data, sform=0, qform=1)
    header["pixdim"][1] = -0.8
    path = tmp_path / "ct.nii"
    _write(path, header, data)
    _, geometry = read_volume(path)
    assert geometry.spacing_mm == pytest.approx((0.8, 0.8, 2.5))
    assert any("pixdim[1,2,3] should be positive" in w for w in geometry.warnings)


@pytest.mark.parametrize("field, index, value, sform, message", [
    ("srow_y", 1, np.nan, 1, r"sform \(sform_code 1\) holds NaN or infinite values"),
    ("quatern_b", None, 2.0, 0, "qform quaternion .* is not a rotation"),
])
def test_broken_orientation_fields_are_clear_errors(tmp_path, field, index, value, sform, message):
    data = _ct()
    header = _header(data, sform=sform, qform=1)
    if index is None:
        header[field] = value
    else:
        header[field][index] = value
    _write(tmp_path / "ct.nii.gz", header, data)
    with pytest.raises(InputImageError, match=message):
        read_volume(tmp_path / "ct.nii.gz")


def test_invalid_quaternion_beside_a_valid_sform_warns_and_the_mask_keeps_the_sform(tmp_path):
    data = _ct()
    header = _header(data, sform=1, qform=1)
    header["quatern_b"] = 2.0
    _write(tmp_path / "ct.nii", header, data)
    _, geometry = read_volume(tmp_path / "ct.nii")
    np.testing.assert_allclose(geometry.affine_ras, AFFINE)
    assert any("qform is not a valid rotation" in w for w in geometry.warnings)
    mask = np.zeros(geometry.shape, np.uint8)
    mask[2:5, 3:6, 1:4] = 1
    written = nib.load(str(write_mask(mask, geometry, tmp_path / "mask.nii.gz")))
    np.testing.assert_allclose(written.get_qform(), AFFINE, atol=1e-6)
    np.testing.assert_allclose(written.affine, AFFINE, atol=1e-6)


@pytest.mark.parametrize("field, index, value, message", [
    ("srow_y", 1, 32767.0, "field of view .* larger than any body"),
    ("srow_x", 2, -1e30, "sform"),
    ("scl_inter", None, np.nan, "not a readable NIfTI image|unusable header|corrupt"),
    ("vox_offset", None, np.inf, "not a readable NIfTI image|unusable header"),
])
def test_fuzzed_header_fields_give_input_errors(tmp_path, field, index, value, message):
    data = _ct()
    header = _header(data)
    if field == "scl_inter":
        header["scl_slope"] = -1.0
    raw = header.binaryblock
    header = nib.Nifti1Header(raw, check=False)
    if index is None:
        header[field] = value
    else:
        header[field][index] = value
    path = tmp_path / "ct.nii"
    body = header.binaryblock + b"\0" * 4 + data.tobytes(order="F")
    path.write_bytes(body)
    with pytest.raises(InputImageError, match=message):
        read_volume(path)


@pytest.mark.parametrize("shape, ok", [((6, 5, 4, 1), True), ((6, 5, 4, 1, 1), True), ((6, 5, 4, 1, 3), False)])
def test_trailing_singleton_axes_are_squeezed(tmp_path, shape, ok):
    data = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, AFFINE), str(tmp_path / "ct.nii.gz"))
    if ok:
        array, geometry = read_volume(tmp_path / "ct.nii.gz")
        assert array.shape == geometry.shape == (6, 5, 4)
        np.testing.assert_array_equal(array, data.reshape(6, 5, 4))
    else:
        with pytest.raises(InputImageError, match="expected a 3D volume, got 5D"):
            read_volume(tmp_path / "ct.nii.gz")


def test_random_header_bytes_give_project_errors_only(tmp_path):
    """Seeded fuzz: a few random bytes of the header changed; each file reads, or is one
    project error; what reads gets a memory estimate and writes a mask without exception."""
    from spleen_seg.pipeline.memory import estimate_case_memory

    data = _ct((20, 22, 18))
    base = bytearray(_header(data).binaryblock + b"\0" * 4 + data.tobytes(order="F"))
    rng = np.random.default_rng(7)
    outcomes = {"read": 0, "refused": 0}
    for index in range(150):
        raw = bytearray(base)
        for position in rng.integers(0, 348, size=rng.integers(1, 4)):
            raw[int(position)] = int(rng.integers(0, 256))
        path = tmp_path / f"fuzz_{index}.nii"
        path.write_bytes(bytes(raw))
        try:
            array, geometry = read_volume(path)
            estimate_case_memory(geometry.shape, geometry.affine_ras)
            write_mask((array > 0).astype(np.uint8), geometry, tmp_path / "mask.nii.gz")
            outcomes["read"] += 1
        except SpleenSegError as err:
            assert str(path) in str(err) and "\n" not in str(err)
            outcomes["refused"] += 1
    assert outcomes["read"] > 50 and outcomes["refused"] > 5, outcomes
