"""Exact pixels for every branch of the DICOM greyscale chain (modality LUT -> VOI -> invert)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.sequence import Sequence
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, RLELossless

from cxr_io.readers import load_cxr
from tests.dicom_factory import ramp, write_cxr_dicom

ATOL = 1e-6  # float32 output
ALL_12BIT = ramp(64, 64, 4095)  # every 12-bit stored value once, in raster order


def _load(tmp_path, pixels, *, apply_voi=True, name="x.dcm", **tags):
    path = write_cxr_dicom(tmp_path / name, pixels, **tags)
    return load_cxr(path, apply_voi=apply_voi)


def _linear_window(m, center, width):
    return np.clip((m - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def test_no_voi_in_header_uses_full_stored_range(tmp_path):
    img = _load(tmp_path, ALL_12BIT, BitsStored=12)
    assert img.pixels.dtype == np.float32 and img.pixels.shape == (64, 64)
    np.testing.assert_allclose(img.pixels, ALL_12BIT / 4095.0, atol=ATOL)
    assert img.meta["voi"] == "none (no VOI in header)"
    assert img.meta["inverted"] is False


def test_high_bits_beyond_bits_stored_are_masked(tmp_path):
    garbage = ALL_12BIT | np.uint16(0xA000)  # bits 13 and 15 set in every stored word
    raw = garbage.astype("<u2").tobytes()
    img = _load(tmp_path, ALL_12BIT, BitsStored=12, raw_pixel_bytes=raw)
    np.testing.assert_allclose(img.pixels, ALL_12BIT / 4095.0, atol=ATOL)


def test_signed_pixels_are_sign_extended_from_bits_stored(tmp_path):
    values = ramp(64, 64, 2047, dtype=np.int16, start=-2048)
    raw = (values.astype(np.int32) & 0x0FFF).astype("<u2").tobytes()  # 12-bit two's complement
    img = _load(tmp_path, values, BitsStored=12, raw_pixel_bytes=raw)
    np.testing.assert_allclose(img.pixels, (values + 2048.0) / 4095.0, atol=ATOL)


def test_rescale_then_linear_window_matches_formula_and_pydicom(tmp_path):
    tags = dict(BitsStored=12, RescaleSlope="2", RescaleIntercept="-100")
    tags.update(WindowCenter="3000", WindowWidth="2001")
    path = write_cxr_dicom(tmp_path / "w.dcm", ALL_12BIT, **tags)
    img = load_cxr(path)
    m = ALL_12BIT * 2.0 - 100.0
    expected = _linear_window(m, 3000.0, 2001.0)
    np.testing.assert_allclose(img.pixels, expected, atol=ATOL)
    assert 0 < (expected == 0).sum() < expected.size and (expected == 1).sum() > 0
    # Same as pydicom's own chain, normalised by pydicom's windowing output range.
    ds = pydicom.dcmread(path)
    y = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    y_min, y_max = 0 * 2 - 100, 4095 * 2 - 100
    np.testing.assert_allclose(img.pixels, (y - y_min) / (y_max - y_min), atol=ATOL)
    assert img.meta["voi"] == "window 3000/2001 LINEAR"


def test_linear_exact_window(tmp_path):
    img = _load(
        tmp_path,
        ALL_12BIT,
        BitsStored=12,
        WindowCenter="1000.5",
        WindowWidth="700",
        VOILUTFunction="LINEAR_EXACT",
    )
    expected = np.clip((ALL_12BIT - 1000.5) / 700.0 + 0.5, 0.0, 1.0)
    np.testing.assert_allclose(img.pixels, expected, atol=ATOL)


def test_sigmoid_window_on_signed_pixels(tmp_path):
    values = ramp(64, 64, 2047, dtype=np.int16, start=-2048)
    img = _load(
        tmp_path,
        values,
        BitsStored=12,
        RescaleSlope="1",
        RescaleIntercept="-24",
        WindowCenter="100",
        WindowWidth="900",
        VOILUTFunction="SIGMOID",
    )
    m = values - 24.0
    expected = 1.0 / (1.0 + np.exp(-4.0 * (m - 100.0) / 900.0))
    np.testing.assert_allclose(img.pixels, expected, atol=ATOL)
    assert img.meta["voi"] == "window 100/900 SIGMOID"


def test_first_of_several_windows_is_used(tmp_path):
    img = _load(
        tmp_path, ALL_12BIT, BitsStored=12, WindowCenter=[1000, 3000], WindowWidth=[501, 2001]
    )
    first = _linear_window(ALL_12BIT.astype(float), 1000.0, 501.0)
    second = _linear_window(ALL_12BIT.astype(float), 3000.0, 2001.0)
    np.testing.assert_allclose(img.pixels, first, atol=ATOL)
    assert np.abs(img.pixels - second).max() > 0.5


def test_window_width_one_is_a_threshold(tmp_path):
    img = _load(tmp_path, ALL_12BIT, BitsStored=12, WindowCenter="2000", WindowWidth="1")
    expected = (ALL_12BIT > 1999.5).astype(np.float32)
    np.testing.assert_array_equal(img.pixels, expected)


def test_invalid_window_falls_back_to_full_range(tmp_path):
    img = _load(tmp_path, ALL_12BIT, BitsStored=12, WindowCenter="2000", WindowWidth="0")
    np.testing.assert_allclose(img.pixels, ALL_12BIT / 4095.0, atol=ATOL)
    assert "invalid window width" in img.meta["voi"]


def test_apply_voi_false_uses_stored_range_through_modality_lut(tmp_path):
    # Negative slope: range of {0, 4095} * -1 + 4095 is [0, 4095], reversed order.
    tags = dict(BitsStored=12, RescaleSlope="-1", RescaleIntercept="4095")
    tags.update(WindowCenter="100", WindowWidth="50")
    img = _load(tmp_path, ALL_12BIT, apply_voi=False, **tags)
    np.testing.assert_allclose(img.pixels, (4095.0 - ALL_12BIT) / 4095.0, atol=ATOL)
    assert img.meta["voi"] == "off (apply_voi=False)"
    img = _load(
        tmp_path,
        ALL_12BIT,
        apply_voi=False,
        name="b.dcm",
        BitsStored=12,
        RescaleSlope="0.5",
        RescaleIntercept="-1024",
    )
    np.testing.assert_allclose(img.pixels, ALL_12BIT / 4095.0, atol=ATOL)


def _lut_item(first_map: int, depth: int, data: np.ndarray) -> Dataset:
    item = Dataset()
    item.add_new(0x00283002, "US", [len(data) % 65536, first_map, depth])  # LUT Descriptor
    item.add_new(0x00283006, "OW", data.astype("<u2").tobytes())  # LUT Data
    return item


def test_modality_lut_sequence(tmp_path):
    lut = (np.arange(4096, dtype=np.int64) ** 2 // 256).astype(np.uint16)  # 0 .. 65504
    item = _lut_item(0, 16, lut)
    item.ModalityLUTType = "US"
    tags = dict(BitsStored=12, ModalityLUTSequence=Sequence([item]))
    mapped = lut[ALL_12BIT].astype(float)
    img = _load(tmp_path, ALL_12BIT, apply_voi=False, **tags)
    np.testing.assert_allclose(img.pixels, mapped / 65504.0, atol=ATOL)
    # With a window on the modality output (range [0, 2**16 - 1] as pydicom defines it).
    img = _load(
        tmp_path, ALL_12BIT, name="w.dcm", WindowCenter="30000", WindowWidth="20001", **tags
    )
    np.testing.assert_allclose(img.pixels, _linear_window(mapped, 30000.0, 20001.0), atol=ATOL)


def test_voi_lut_sequence_is_preferred_and_clamps_outside_entries(tmp_path):
    stored = ramp(16, 16, 255, dtype=np.uint8)  # every 8-bit value
    lut = (255 - np.arange(200)).astype(np.uint16)  # 8-bit entries, first mapped value 30
    tags = dict(VOILUTSequence=Sequence([_lut_item(30, 8, lut)]))
    tags.update(WindowCenter="128", WindowWidth="256")  # ignored: the LUT wins
    img = _load(tmp_path, stored, **tags)
    expected = lut[np.clip(stored.astype(int) - 30, 0, 199)] / 255.0
    np.testing.assert_allclose(img.pixels, expected, atol=ATOL)
    assert img.meta["voi"] == "VOI LUT Sequence (8-bit)"
    inv = _load(tmp_path, stored, name="m1.dcm", PhotometricInterpretation="MONOCHROME1", **tags)
    np.testing.assert_allclose(inv.pixels, 1.0 - expected, atol=ATOL)


@pytest.mark.parametrize(
    ("photometric", "shape", "inverted"),
    [
        ("MONOCHROME1", None, True),
        ("MONOCHROME2", "INVERSE", True),
        ("MONOCHROME1", "INVERSE", True),  # the DX pairing: inverted once, not twice
        ("MONOCHROME2", "IDENTITY", False),
    ],
)
def test_inversion(tmp_path, photometric, shape, inverted):
    tags = dict(BitsStored=12, WindowCenter="2048", WindowWidth="4096")
    img = _load(
        tmp_path,
        ALL_12BIT,
        PhotometricInterpretation=photometric,
        PresentationLUTShape=shape,
        **tags,
    )
    t = _linear_window(ALL_12BIT.astype(float), 2048.0, 4096.0)
    np.testing.assert_allclose(img.pixels, 1.0 - t if inverted else t, atol=ATOL)
    assert img.meta["inverted"] is inverted


def test_rgb_is_converted_with_luma(tmp_path, rng):
    rgb = rng.integers(0, 256, (12, 10, 3)).astype(np.uint8)
    img = _load(tmp_path, rgb)
    expected = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255.0
    np.testing.assert_allclose(img.pixels, expected, atol=ATOL)
    assert img.meta["converted_from"] == "RGB"


def test_ybr_full_is_converted_to_grey(tmp_path, rng):
    y = rng.integers(0, 256, (12, 10)).astype(np.uint8)
    ybr = np.stack([y, np.full_like(y, 128), np.full_like(y, 128)], axis=-1)
    img = _load(tmp_path, ybr, PhotometricInterpretation="YBR_FULL")
    np.testing.assert_allclose(img.pixels, y / 255.0, atol=ATOL)
    assert img.meta["converted_from"] == "YBR_FULL"


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, JPEGLosslessSV1, RLELossless])
def test_compressed_syntaxes_give_the_uncompressed_pixels(tmp_path, syntax):
    tags = dict(
        BitsStored=12,
        WindowCenter="1500",
        WindowWidth="2001",
        PhotometricInterpretation="MONOCHROME1",
    )
    plain = _load(tmp_path, ALL_12BIT, name="plain.dcm", **tags)
    path = write_cxr_dicom(tmp_path / "c.dcm", ALL_12BIT, transfer_syntax=syntax, **tags)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
    img = load_cxr(path)
    np.testing.assert_array_equal(img.pixels, plain.pixels)
    assert img.meta["transfer_syntax"] == str(syntax)
