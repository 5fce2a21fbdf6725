"""Bad input raises the specific CXRReadError subclass, naming the file and what to do."""

from __future__ import annotations

import pickle
import tracemalloc

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import MPEG2MPML, JPEG2000Lossless, JPEGLosslessSV1

from cxr_io.readers import (
    AbsurdDimensionsError,
    CXRReadError,
    MissingDecoderError,
    MultiFrameError,
    NoPixelDataError,
    NotDicomError,
    ReadLimits,
    TruncatedFileError,
    UnsupportedImageError,
    load_cxr,
)
from tests.dicom_factory import decoder_plugins_disabled, ramp, write_cxr_dicom

PIXELS = ramp(64, 64, 4095)  # J2K needs >= ~32 x 32 for its default resolutions


def _raises(exc_type, path, **kwargs):
    with pytest.raises(exc_type) as info:
        load_cxr(path, **kwargs)
    err = info.value
    assert err.path == str(path)
    assert str(err).startswith(f"{path}: {err.reason}. ")
    assert len(str(err)) > len(f"{path}: {err.reason}. ") + 10  # a hint follows
    return err


def test_random_bytes_and_text_are_not_dicom(tmp_path, rng):
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    _raises(NotDicomError, junk)
    text = tmp_path / "notes.txt"
    text.write_text("patient looked fine\n" * 20)
    err = _raises(NotDicomError, text)
    assert "DICM" in err.reason


def test_missing_file_is_a_read_error(tmp_path):
    _raises(CXRReadError, tmp_path / "nope.dcm")


def test_no_pixel_data(tmp_path):
    path = write_cxr_dicom(tmp_path / "x.dcm", PIXELS)
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    _raises(NoPixelDataError, path)


def test_multi_frame(tmp_path):
    two = np.concatenate([PIXELS, PIXELS])
    path = write_cxr_dicom(
        tmp_path / "x.dcm", PIXELS, raw_pixel_bytes=two.tobytes(), NumberOfFrames=2
    )
    err = _raises(MultiFrameError, path)
    assert "2 frames" in err.reason


@pytest.mark.parametrize("syntax", [JPEGLosslessSV1, JPEG2000Lossless])
def test_missing_decoder_plugin_names_syntax_and_package(tmp_path, syntax):
    path = write_cxr_dicom(tmp_path / "x.dcm", PIXELS, transfer_syntax=syntax, BitsStored=12)
    with decoder_plugins_disabled(syntax):
        err = _raises(MissingDecoderError, path)
    assert syntax.name in err.reason
    package = "pylibjpeg-libjpeg" if syntax == JPEGLosslessSV1 else "pylibjpeg-openjpeg"
    assert f"(pip install pylibjpeg {package})" in str(err)
    # The plugins are back: the same file decodes.
    np.testing.assert_allclose(load_cxr(path).pixels, PIXELS / 4095.0, atol=1e-6)


def test_transfer_syntax_without_any_decoder(tmp_path):
    path = write_cxr_dicom(tmp_path / "x.dcm", PIXELS)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 60])
    ds.save_as(path)
    err = _raises(MissingDecoderError, path)
    assert "MPEG2" in err.reason


def test_truncated_native_pixel_data(tmp_path):
    path = write_cxr_dicom(tmp_path / "x.dcm", ramp(64, 64, 4095))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 3000])
    err = _raises(TruncatedFileError, path)
    assert "8192" in err.reason  # the declared byte count


def test_truncated_compressed_pixel_data(tmp_path, rng):
    noisy = rng.integers(0, 4096, (64, 64)).astype(np.uint16)
    path = write_cxr_dicom(tmp_path / "x.dcm", noisy, transfer_syntax=JPEG2000Lossless)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1500])
    _raises(TruncatedFileError, path)


def test_file_cut_inside_its_header(tmp_path):
    path = write_cxr_dicom(tmp_path / "x.dcm", PIXELS)
    data = path.read_bytes()
    cut = data.index(b"\x28\x00\x10\x00")  # before (0028,0010) Rows
    path.write_bytes(data[:cut])
    _raises(TruncatedFileError, path)


@pytest.mark.parametrize(("rows", "cols"), [(0, 64), (64, 0)])
def test_empty_dimensions(tmp_path, rows, cols):
    path = write_cxr_dicom(tmp_path / "x.dcm", PIXELS, Rows=rows, Columns=cols)
    _raises(AbsurdDimensionsError, path)


def test_limit_is_configurable(tmp_path):
    path = write_cxr_dicom(tmp_path / "x.dcm", PIXELS)
    err = _raises(AbsurdDimensionsError, path, limits=ReadLimits(max_pixels=4095))
    assert "64 x 64" in err.reason
    assert load_cxr(path, limits=ReadLimits(max_pixels=4096)).pixels.shape == (64, 64)


def test_dicom_bomb_is_refused_from_the_header(tmp_path):
    # A tiny JPEG 2000 stream whose header claims 60000 x 60000 (3.6 Gpixel, 7 GB as uint16).
    small = write_cxr_dicom(tmp_path / "s.dcm", PIXELS, transfer_syntax=JPEG2000Lossless)
    ds = pydicom.dcmread(small)
    ds.Rows = ds.Columns = 60000
    bomb = tmp_path / "bomb.dcm"
    ds.save_as(bomb)
    tracemalloc.start()
    try:
        err = _raises(AbsurdDimensionsError, bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "60000 x 60000" in err.reason and "100 megapixels" in err.reason
    assert peak < 50e6


def test_png_size_is_checked_before_decoding(tmp_path):
    # 120 Mpixel, 1-bit: under Pillow's own bomb error (2 x 89 Mpixel), over our default limit.
    path = tmp_path / "big.png"
    Image.new("1", (12000, 10000)).save(path)
    tracemalloc.start()
    try:
        err = _raises(AbsurdDimensionsError, path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "10000 x 12000" in err.reason
    assert peak < 50e6  # decoding would allocate >= 120 MB


@pytest.mark.parametrize("suffix", [".tif", ".bmp"])
def test_other_image_formats_are_unsupported(tmp_path, suffix):
    path = tmp_path / f"x{suffix}"
    Image.new("L", (8, 8)).save(path)
    _raises(UnsupportedImageError, path)


def test_errors_pickle_for_dataloader_workers(tmp_path):
    err = TruncatedFileError(tmp_path / "a.dcm", "cut short")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is TruncatedFileError and str(back) == str(err) and back.path == err.path
