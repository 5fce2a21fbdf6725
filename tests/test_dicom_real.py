"""Real radiographs from pydicom-data (installed with the dev extra; found offline)."""

from __future__ import annotations

import functools

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from cxr_io.readers import LoadCXRd, load_cxr


def _real(name: str):
    path = get_testdata_file(name, download=False)  # never a pattern: that goes to the network
    assert path is not None, f"{name} missing: install the dev extra (pydicom-data)"
    return path


@functools.cache
def _pixels(name: str) -> np.ndarray:
    return load_cxr(_real(name)).pixels


def test_rg1_lossless_jpeg2000_equals_uncompressed():
    assert _pixels("RG1_UNCR.dcm").shape == (1955, 1841)
    np.testing.assert_array_equal(_pixels("RG1_J2KR.dcm"), _pixels("RG1_UNCR.dcm"))


def test_rg1_lossy_jpeg2000_is_close():
    lossy, exact = _pixels("RG1_J2KI.dcm"), _pixels("RG1_UNCR.dcm")
    diff = np.abs(lossy - exact)
    # Measured: max 0.0134, mean 0.0017 (in units of the 30000-wide window).
    assert diff.max() < 0.02 and diff.mean() < 0.003
    assert diff.max() > 0  # it really is lossy
    # RG1_UNCI is the decompressed lossy image stored uncompressed: identical.
    np.testing.assert_array_equal(lossy, _pixels("RG1_UNCI.dcm"))


def test_rg1_mediastinum_is_brighter_than_lungs_after_monochrome1_inversion():
    img = load_cxr(_real("RG1_UNCR.dcm"))
    assert img.meta["photometric"] == "MONOCHROME1" and img.meta["inverted"] is True
    px = img.pixels
    h, w = px.shape
    rows = slice(int(0.30 * h), int(0.60 * h))
    mediastinum = px[rows, int(0.45 * w) : int(0.55 * w)].mean()
    left = px[rows, int(0.15 * w) : int(0.35 * w)].mean()
    right = px[rows, int(0.65 * w) : int(0.85 * w)].mean()
    assert mediastinum > left + 0.1 and mediastinum > right + 0.1  # measured 0.87 vs 0.64/0.60


def test_rg1_meta_spacing_window_and_privacy(settings):
    img = load_cxr(_real("RG1_UNCR.dcm"), settings=settings)
    meta = img.meta
    assert meta["modality"] == "CR" and meta["view_position"] == "PA"
    assert meta["body_part"] == "CHEST" and meta["original_size"] == (1955, 1841)
    assert meta["spacing"] is None and meta["spacing_source"] is None  # "0.000\0.000"
    assert meta["voi"] == "window 15000/30000 LINEAR"
    assert meta["pseudo_id"].startswith("anon-")
    for secret in ("CompressedSamples", "9RG1", "19400305", "exam Number", "26210"):
        assert secret not in repr(meta)
    assert float(img.pixels.min()) >= 0.0 and float(img.pixels.max()) <= 1.0


def test_real_file_without_voi_uses_the_stored_range():
    path = _real("RG1_UNCR.dcm")
    stored = pydicom.dcmread(path).pixel_array  # 15-bit MONOCHROME1
    img = load_cxr(path, apply_voi=False)
    np.testing.assert_allclose(img.pixels, 1.0 - stored / 32767.0, atol=1e-6)


def test_rg3_knee_loads_and_reports_its_body_part():
    img = load_cxr(_real("RG3_UNCR.dcm"))
    assert img.pixels.shape == (1760, 1760)
    assert img.meta["body_part"] == "EXTREMITY" and img.meta["modality"] == "CR"
    np.testing.assert_array_equal(load_cxr(_real("RG3_J2KR.dcm")).pixels, img.pixels)


@pytest.mark.parametrize("name", ["mlut_18.dcm", "vlut_04.dcm", "SC_rgb.dcm"])
def test_other_real_files_through_the_dict_transform(name):
    out = LoadCXRd(keys="image")({"image": _real(name)})["image"]
    assert out.ndim == 3 and out.shape[0] == 1 and out.dtype.is_floating_point
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert float(out.max()) > float(out.min())
