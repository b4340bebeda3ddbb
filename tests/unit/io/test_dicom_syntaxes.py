"""Every transfer syntax a PACS sends, one test each: the test encodes a CT series itself (dcmtk's
command-line tools or pydicom's encoders) and reads it back through the declared decoders.

Lossless syntaxes must give the exact HU. Lossy ones are bounded by what each allows:
JPEG-LS near-lossless by its NEAR parameter (a guarantee of the standard), JPEG baseline
by two steps of the 8-bit scale dcmtk rescales CT into (RescaleSlope), JPEG extended
(12 bit) and JPEG 2000 by a small error against the HU range.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pydicom
import pytest
from pydicom import uid
from pylibjpeg.utils import Version, get_pixel_data_decoders
from synthetic_dicom import dcmtk_encode, only_series, pydicom_encode, smooth_volume, write_series

from spleen_seg.io.dicom_files import decoding_plugin
from spleen_seg.io.dicom_volume import read_series

JPEG_LS_NEAR = 2  # dcmcjpls +en: near-lossless with NEAR = 2 (dcmtk's default)
LOSSY_RMS_OF_RANGE = 0.01  # JPEG extended and JPEG 2000: RMS error at most 1 % of the HU range


@dataclass(frozen=True)
class Syntax:
    transfer_syntax: str
    encode: Callable[[list], None]
    pylibjpeg_plugin: str | None  # which of pylibjpeg's plugins decodes it; None: pydicom's own code
    max_error_slopes: float | None = 0.0  # max |error| in RescaleSlope units; None: the RMS bound


def dcmtk(tool: str, *options: str) -> Callable[[list], None]:
    return lambda paths: dcmtk_encode(paths, tool, *options)


def native(syntax: str, **kwargs) -> Callable[[list], None]:
    return lambda paths: pydicom_encode(paths, syntax, **kwargs)


SYNTAXES = {
    "implicit-vr-little-endian": Syntax(uid.ImplicitVRLittleEndian, dcmtk("dcmconv", "+ti"), None),
    "explicit-vr-little-endian": Syntax(uid.ExplicitVRLittleEndian, lambda paths: None, None),
    "deflated-explicit-vr": Syntax(uid.DeflatedExplicitVRLittleEndian, dcmtk("dcmconv", "+td"), None),
    "explicit-vr-big-endian": Syntax(uid.ExplicitVRBigEndian, dcmtk("dcmconv", "+tb"), None),
    "jpeg-baseline": Syntax(uid.JPEGBaseline8Bit, dcmtk("dcmcjpeg", "+eb", "+q", "100"), "libjpeg", 2.0),
    "jpeg-extended": Syntax(uid.JPEGExtended12Bit, dcmtk("dcmcjpeg", "+ee", "+q", "100"), "libjpeg", None),
    # Process 14 with selection value 7 (not 1, so that it differs from the SV1 stream).
    "jpeg-lossless-process14": Syntax(uid.JPEGLossless, dcmtk("dcmcjpeg", "+el", "+sv", "7"), "libjpeg"),
    "jpeg-lossless-sv1": Syntax(uid.JPEGLosslessSV1, dcmtk("dcmcjpeg", "+e1"), "libjpeg"),
    "jpeg-ls-lossless": Syntax(uid.JPEGLSLossless, dcmtk("dcmcjpls", "+el"), "libjpeg"),
    "jpeg-ls-near-lossless": Syntax(uid.JPEGLSNearLossless, dcmtk("dcmcjpls", "+en"), "libjpeg", float(JPEG_LS_NEAR)),
    "jpeg2000-lossless": Syntax(uid.JPEG2000Lossless, native(uid.JPEG2000Lossless), "openjpeg"),
    "jpeg2000": Syntax(uid.JPEG2000, native(uid.JPEG2000, j2k_psnr=[80]), "openjpeg", None),
    "rle-lossless": Syntax(uid.RLELossless, native(uid.RLELossless), None),
}


@pytest.mark.parametrize("name", list(SYNTAXES))
def test_transfer_syntax_is_decoded(tmp_path, name):
    syntax = SYNTAXES[name]
    hu = smooth_volume(shape=(64, 48, 3))
    paths = write_series(tmp_path / "plain", hu, series_uid="1.2.3.100")
    _, expected_geometry = read_series(only_series(tmp_path / "plain"))
    paths = write_series(tmp_path / name, hu, series_uid="1.2.3.100")
    syntax.encode(paths)
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in paths]
    assert {str(ds.file_meta.TransferSyntaxUID) for ds in headers} == {syntax.transfer_syntax}

    # The declared plugin decodes it: pydicom is pointed at pylibjpeg, and pylibjpeg at this plugin.
    native_plugin = "pydicom" if syntax.transfer_syntax == uid.RLELossless else ""
    assert decoding_plugin(headers[0]) == ("pylibjpeg" if syntax.pylibjpeg_plugin else native_plugin)
    if syntax.pylibjpeg_plugin:
        assert list(get_pixel_data_decoders(Version.v2)[syntax.transfer_syntax]) == [syntax.pylibjpeg_plugin]

    array, geometry = read_series(only_series(tmp_path / name))
    np.testing.assert_array_equal(geometry.affine_ras, expected_geometry.affine_ras)
    error = np.abs(array - hu)
    slope = float(headers[0].RescaleSlope)
    if syntax.max_error_slopes == 0.0:
        np.testing.assert_array_equal(array, hu)
    elif syntax.max_error_slopes is not None:
        assert error.max() <= syntax.max_error_slopes * slope, (error.max(), slope)
        assert error.max() > 0  # lossy indeed: the bound is what is tested
    else:
        rms = float(np.sqrt(np.mean(error**2)))
        assert 0 < rms <= LOSSY_RMS_OF_RANGE * float(np.ptp(hu)), rms
