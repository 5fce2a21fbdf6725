"""Mask export round trips (PNG, NIfTI, DICOM SEG) and the overlay preview."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from PIL import Image

from cxr_io.readers import load_mask
from evaluation.figures import OUTLINE_RGB, save_overlay
from segmentation.export import (
    read_dicom_seg,
    save_dicom_seg,
    write_mask_nifti,
    write_mask_png,
)
from tests.dicom_factory import write_cxr_dicom


def known_mask(h: int = 48, w: int = 40) -> np.ndarray:
    """An asymmetric two-lung mask (a transposition or flip would change it): bool [H, W]."""
    rr, cc = np.mgrid[:h, :w]
    m = ((rr - 22) / 16) ** 2 + ((cc - 11) / 7) ** 2 <= 1
    m |= ((rr - 25) / 13) ** 2 + ((cc - 29) / 6) ** 2 <= 1
    m[2, 0] = True  # a corner pixel pins the orientation
    return m


def test_png_and_nifti_round_trip_exactly(tmp_path):
    mask = known_mask()
    png = write_mask_png(mask, tmp_path / "a" / "m.png")
    nii = write_mask_nifti(mask, tmp_path / "b" / "m.nii.gz", spacing=(0.2, 0.3))
    for path in (png, nii):
        back = load_mask(path)
        assert back.dtype == bool and back.shape == mask.shape
        np.testing.assert_array_equal(back, mask)
    assert set(np.unique(np.asarray(Image.open(png)))) == {0, 255}


@pytest.mark.parametrize("spacing", [None, [0.25, 0.25]])
def test_dicom_seg_round_trip_references_source(tmp_path, spacing):
    mask = known_mask()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 4096, size=mask.shape, dtype=np.uint16)
    tags = {"PixelSpacing": spacing} if spacing else {}
    src = write_cxr_dicom(tmp_path / "src.dcm", pixels, **tags)
    out = save_dicom_seg(mask, src, tmp_path / "seg" / "lungs.dcm")

    back, ref_uid = read_dicom_seg(out)
    np.testing.assert_array_equal(back, mask)
    source = pydicom.dcmread(src)
    seg = pydicom.dcmread(out)
    assert ref_uid == source.SOPInstanceUID
    assert seg.Modality == "SEG"
    assert seg.StudyInstanceUID == source.StudyInstanceUID  # filed with its image
    assert seg.SOPInstanceUID != source.SOPInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    # plain pydicom decoding agrees with highdicom's
    np.testing.assert_array_equal(seg.pixel_array.astype(bool), mask)
    assert seg.SegmentSequence[0].SegmentLabel == "Lung field"


def test_dicom_seg_rejects_wrong_size_and_non_dicom(tmp_path):
    mask = known_mask()
    src = write_cxr_dicom(tmp_path / "src.dcm", np.zeros((10, 12), np.uint16))
    with pytest.raises(ValueError, match="differs from the image"):
        save_dicom_seg(mask, src, tmp_path / "x.dcm")
    png = write_mask_png(mask, tmp_path / "m.png")
    with pytest.raises(ValueError, match="not a readable DICOM"):
        save_dicom_seg(mask, png, tmp_path / "y.dcm")


def test_overlay_outlines_the_mask(tmp_path):
    mask = known_mask()
    image = np.linspace(0, 1, mask.size, dtype=np.float32).reshape(mask.shape)
    path = save_overlay(image, mask, tmp_path / "ov.png", max_size=None)
    rgb = np.asarray(Image.open(path).convert("RGB"))
    assert rgb.shape == (*mask.shape, 3)
    red = np.all(rgb == OUTLINE_RGB, axis=-1)
    assert red.any()
    assert not red[~mask].any(), "outline drawn outside the mask"
    assert not red[12:32, 8:14].any(), "interior painted"  # inside the right lung
    grey = rgb[~red]
    assert np.all(grey[:, 0] == grey[:, 1])
    small = save_overlay(image, mask, tmp_path / "small.png", max_size=20)
    assert max(Image.open(small).size) == 20
