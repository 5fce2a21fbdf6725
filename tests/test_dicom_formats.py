"""Other formats, masks, spacing, metadata privacy and the MONAI transforms."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from monai.data import MetaTensor, list_data_collate
from PIL import Image
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from cxr_io.privacy import pseudonymous_id
from cxr_io.readers import (
    LoadCXR,
    LoadCXRd,
    LoadMaskd,
    NonBinaryMaskError,
    UnsupportedImageError,
    load_cxr,
    load_mask,
    save_mask_nifti,
    save_mask_png,
)
from cxr_io.settings import Settings
from tests.dicom_factory import FAKE_PATIENT, ramp, write_cxr_dicom

ATOL = 1e-6


# ---------------------------------------------------------------- PNG / JPEG


def test_png_8bit_grey(tmp_path, rng):
    arr = rng.integers(0, 256, (9, 13)).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    img = load_cxr(tmp_path / "a.png")
    np.testing.assert_allclose(img.pixels, arr / 255.0, atol=ATOL)
    assert img.pixels.dtype == np.float32 and img.meta["format"] == "png"
    assert img.meta["spacing"] is None and img.meta["converted_from"] is None


def test_png_16bit_grey(tmp_path, rng):
    arr = rng.integers(0, 65536, (9, 13)).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode.startswith("I")
    np.testing.assert_allclose(load_cxr(tmp_path / "a.png").pixels, arr / 65535.0, atol=ATOL)


def test_png_rgb_uses_luma(tmp_path, rng):
    rgb = rng.integers(0, 256, (9, 13, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    img = load_cxr(tmp_path / "a.png")
    expected = (rgb @ np.array([0.299, 0.587, 0.114])) / 255.0
    np.testing.assert_allclose(img.pixels, expected, atol=ATOL)
    assert img.meta["converted_from"] == "RGB"


def test_jpeg_grey_gives_the_decoded_values(tmp_path):
    arr = ramp(32, 48, 255, dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.jpg", quality=95)
    decoded = np.asarray(Image.open(tmp_path / "a.jpg"))
    img = load_cxr(tmp_path / "a.jpg")
    np.testing.assert_allclose(img.pixels, decoded / 255.0, atol=ATOL)
    assert np.abs(img.pixels - arr / 255.0).max() < 0.05 and img.meta["format"] == "jpeg"


# ---------------------------------------------------------------- NIfTI / MHA


def test_nifti_rows_are_y_and_spacing_is_row_col(tmp_path, rng):
    hw = rng.random((5, 7)).astype(np.float32)  # [H=5, W=7] as displayed
    affine = np.diag([0.7, 0.4, 1.0, 1.0])  # x (columns) 0.7 mm, y (rows) 0.4 mm
    nib.save(nib.Nifti1Image(hw.T.copy(), affine), tmp_path / "a.nii.gz")
    img = load_cxr(tmp_path / "a.nii.gz")
    lo, hi = hw.min(), hw.max()
    np.testing.assert_allclose(img.pixels, (hw - lo) / (hi - lo), atol=ATOL)
    assert img.meta["spacing"] == pytest.approx((0.4, 0.7))
    assert img.pixels.flags.c_contiguous


def test_nifti_volume_is_unsupported(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 3), np.float32), np.eye(4)), tmp_path / "v.nii")
    with pytest.raises(UnsupportedImageError, match="2D"):
        load_cxr(tmp_path / "v.nii")


def test_mha_grey_and_spacing(tmp_path, rng):
    hw = rng.integers(0, 1000, (6, 8)).astype(np.int16)
    image = sitk.GetImageFromArray(hw)  # SimpleITK arrays are (y, x)
    image.SetSpacing((0.25, 0.5))  # (x, y)
    sitk.WriteImage(image, str(tmp_path / "a.mha"))
    img = load_cxr(tmp_path / "a.mha")
    lo, hi = float(hw.min()), float(hw.max())
    np.testing.assert_allclose(img.pixels, (hw - lo) / (hi - lo), atol=ATOL)
    assert img.meta["spacing"] == (0.5, 0.25) and img.meta["format"] == "mha"


# ---------------------------------------------------------------- masks


def _mask(rng, shape=(5, 7)) -> np.ndarray:
    mask = rng.random(shape) > 0.5
    mask[0, 0], mask[0, 1] = True, False
    return mask


@pytest.mark.parametrize("high", [1, 255])
def test_png_mask_levels(tmp_path, rng, high):
    mask = _mask(rng)
    Image.fromarray(mask.astype(np.uint8) * high).save(tmp_path / "m.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "m.png"), mask)


def test_mask_with_a_third_level_is_refused(tmp_path, rng):
    arr = _mask(rng).astype(np.uint8) * 255
    arr[2, 3] = 128
    Image.fromarray(arr).save(tmp_path / "m.png")
    with pytest.raises(NonBinaryMaskError, match="128"):
        load_mask(tmp_path / "m.png")
    arr[2, 3] = 1  # 0, 1 and 255 together: not two levels either
    Image.fromarray(arr).save(tmp_path / "m.png")
    with pytest.raises(NonBinaryMaskError):
        load_mask(tmp_path / "m.png")


def test_mask_writers_round_trip_exactly(tmp_path, rng):
    mask = _mask(rng)
    np.testing.assert_array_equal(load_mask(save_mask_png(mask, tmp_path / "m.png")), mask)
    path = save_mask_nifti(mask, tmp_path / "m.nii.gz", spacing=(0.4, 0.7))
    np.testing.assert_array_equal(load_mask(path), mask)
    stored = nib.load(path)
    assert stored.shape == (7, 5)  # NIfTI data is (x, y) = mask.T
    assert stored.header.get_zooms()[:2] == pytest.approx((0.7, 0.4))


def test_mha_and_nifti_masks_must_be_binary(tmp_path):
    arr = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / "m.mha"))
    with pytest.raises(NonBinaryMaskError):
        load_mask(tmp_path / "m.mha")
    arr[1, 0] = 0
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / "m.mha"))
    np.testing.assert_array_equal(load_mask(tmp_path / "m.mha"), arr == 1)


# ---------------------------------------------------------------- DICOM spacing and metadata


def _spacing_file(tmp_path, imager: bytes | None, pixel: bytes | None):
    path = write_cxr_dicom(tmp_path / "s.dcm", np.zeros((4, 4), np.uint16))
    ds = pydicom.dcmread(path)
    for tag, raw in ((0x00181164, imager), (0x00280030, pixel)):
        if raw is not None:  # raw bytes, so that invalid strings can be written too
            raw += b" " * (len(raw) % 2)
            ds[tag] = RawDataElement(Tag(tag), "DS", len(raw), raw, 0, False, True)
    ds.save_as(path)
    return load_cxr(path).meta


@pytest.mark.parametrize(
    ("imager", "pixel", "spacing", "source"),
    [
        (b"0.139\\0.14", b"0.2\\0.2", (0.139, 0.14), "ImagerPixelSpacing"),
        (b"0.000\\0.000", b"0.3\\0.4", (0.3, 0.4), "PixelSpacing"),
        (b"-0.1\\0.1", None, None, None),
        (b"nan\\0.1", b"inf\\1", None, None),
        (b"abc\\def", b"0.3\\0.4", (0.3, 0.4), "PixelSpacing"),
        (b"0.1", None, None, None),
        (None, None, None, None),
    ],
)
def test_spacing_sources(tmp_path, imager, pixel, spacing, source):
    meta = _spacing_file(tmp_path, imager, pixel)
    assert meta["spacing"] == (pytest.approx(spacing) if spacing else None)
    assert meta["spacing_source"] == source


def test_no_patient_identifier_leaves_the_loader(tmp_path, settings):
    path = write_cxr_dicom(
        tmp_path / "p.dcm",
        ramp(8, 8, 4095),
        Modality="DX",
        ViewPosition="AP",
        BodyPartExamined="CHEST",
    )
    img = load_cxr(path, settings=settings)
    tensor = LoadCXRd(keys="image", settings=settings)({"image": path})["image"]
    for text in (repr(img.meta), repr(tensor.meta)):
        for value in FAKE_PATIENT.values():
            assert value not in text
            assert value.split("^")[0] not in text
    ds = pydicom.dcmread(path)
    secret = settings.pseudonym_secret()
    assert img.meta["pseudo_id"] == pseudonymous_id(
        FAKE_PATIENT["PatientID"], ds.StudyInstanceUID, secret
    )
    assert img.meta["modality"] == "DX" and img.meta["view_position"] == "AP"
    assert (
        img.meta["filename"] == "p.dcm"
        and img.meta["transfer_syntax"] == ds.file_meta["TransferSyntaxUID"].value
    )


def test_pseudonymous_id_is_keyed():
    a = pseudonymous_id("P1", "1.2.3", b"k1")
    assert a.startswith("anon-") and len(a) == len("anon-") + 16
    assert a == pseudonymous_id("P1", "1.2.3", b"k1")
    assert a != pseudonymous_id("P1", "1.2.3", b"k2")
    assert a != pseudonymous_id("P1", "1.2.4", b"k1")
    assert a != pseudonymous_id("P11", ".2.3", b"k1")  # the separator matters


def test_pseudo_id_follows_the_installation_secret(tmp_path):
    path = write_cxr_dicom(tmp_path / "p.dcm", ramp(8, 8, 4095))
    one = load_cxr(path, settings=Settings(home=tmp_path / "h1")).meta["pseudo_id"]
    again = load_cxr(path, settings=Settings(home=tmp_path / "h1")).meta["pseudo_id"]
    other = load_cxr(path, settings=Settings(home=tmp_path / "h2")).meta["pseudo_id"]
    assert one == again != other


# ---------------------------------------------------------------- MONAI transforms


def test_load_cxrd_gives_channel_first_metatensor_with_spacing(tmp_path):
    pixels = ramp(6, 10, 4095)
    path = write_cxr_dicom(
        tmp_path / "a.dcm", pixels, BitsStored=12, ImagerPixelSpacing=["0.15", "0.2"]
    )
    out = LoadCXRd(keys=["image"])({"image": str(path), "label": 1})
    image = out["image"]
    assert isinstance(image, MetaTensor) and out["label"] == 1
    assert image.shape == (1, 6, 10) and image.dtype == torch.float32
    np.testing.assert_allclose(image[0].numpy(), pixels / 4095.0, atol=ATOL)
    assert image.meta["spacing"] == pytest.approx((0.15, 0.2))
    assert image.meta["pseudo_id"].startswith("anon-")
    np.testing.assert_allclose(image.pixdim.numpy(), [0.15, 0.2])
    np.testing.assert_allclose(image.affine.numpy(), np.diag([0.15, 0.2, 1.0]))


def test_transforms_batch_with_unknown_spacing_and_missing_keys(tmp_path):
    with_spacing = write_cxr_dicom(
        tmp_path / "a.dcm", ramp(6, 10, 255, np.uint8), PixelSpacing=["0.1", "0.1"]
    )
    png = tmp_path / "b.png"
    Image.fromarray(ramp(6, 10, 255, np.uint8)).save(png)
    mask = save_mask_png(np.eye(6, 10, dtype=bool), tmp_path / "m.png")
    load = LoadCXRd(keys=["image", "extra"], allow_missing_keys=True)
    load_mask = LoadMaskd(keys="mask")
    items = [load_mask(load({"image": p, "mask": mask})) for p in (with_spacing, png)]
    batch = list_data_collate(items)
    assert batch["image"].shape == (2, 1, 6, 10) and batch["mask"].shape == (2, 1, 6, 10)
    assert set(torch.unique(batch["mask"]).tolist()) == {0.0, 1.0}
    assert batch["mask"].dtype == torch.float32
    np.testing.assert_array_equal(batch["mask"][0, 0].numpy(), np.eye(6, 10))
    with pytest.raises(KeyError):
        LoadCXRd(keys="extra")({"image": png})


def test_array_transform_matches_function(tmp_path):
    path = write_cxr_dicom(
        tmp_path / "a.dcm", ramp(6, 10, 4095), WindowCenter="100", WindowWidth="50"
    )
    out = LoadCXR(apply_voi=False)(path)
    np.testing.assert_array_equal(out[0].numpy(), load_cxr(path, apply_voi=False).pixels)
