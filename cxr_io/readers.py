"""Chest X-ray ingestion: any supported file -> float32 ``[H, W]`` in [0, 1], bright = dense.

Formats: DICOM (CR/DX and any single-frame greyscale or colour image), PNG (8/16-bit, grey or
RGB), JPEG, NIfTI (``.nii``/``.nii.gz``) and MHA/MHD.

DICOM greyscale pipeline (pydicom 3, ``pydicom.pixels``), in this order:

1. stored pixels (``BitsStored < BitsAllocated``: high bits masked, signed values sign-extended,
   as pydicom does);
2. modality LUT: ``RescaleSlope``/``RescaleIntercept`` or the Modality LUT Sequence;
3. VOI: the VOI LUT Sequence if present, else the *first* ``WindowCenter``/``WindowWidth`` with
   its ``VOILUTFunction`` (LINEAR, LINEAR_EXACT, SIGMOID); skipped when ``apply_voi=False``;
4. normalisation to [0, 1] by the *theoretical* output range of the last step, never by the
   image min/max: with VOI, the range pydicom gives the VOI output (windowing: the modality
   output range of the stored bit depth, so window bounds map to 0 and 1; VOI LUT:
   ``[0, 2**bits_per_entry - 1]``); without VOI (``apply_voi=False``, or no usable VOI in the
   header), ``[min, max]`` of every possible stored value (from ``BitsStored`` and
   ``PixelRepresentation``) mapped through the modality LUT;
5. inversion ``1 - x`` when ``PhotometricInterpretation`` is MONOCHROME1 or
   ``PresentationLUTShape`` is INVERSE (once, if both: the DX IOD pairs them).

Linear cases (rescale + LINEAR/LINEAR_EXACT window, or no VOI) run as one fused float32
multiply-add-clip; the others (LUT sequences, SIGMOID) evaluate pydicom's own functions once per
possible stored value and index that table. Colour DICOM (RGB, YBR_*) and colour PNG/JPEG are
converted to grey with the ITU-R BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` divided by the
stored maximum; ``meta["converted_from"]`` names the source photometric/mode.

Other formats: PNG/JPEG are divided by their bit depth's maximum (255 or 65535), as displayed.
NIfTI/MHA images carry no display range: they are min-max normalised (a constant image gives 0).

Axis convention everywhere: ``[row, column]`` = ``[H, W]`` as displayed. nibabel returns NIfTI
data as ``(x, y)``: we transpose, so rows are ``y`` (``save_mask_nifti`` writes the inverse).
SimpleITK already returns ``(y, x)``. Spacing is ``(row_mm, col_mm)``.

Privacy: no patient name, id, birth date or accession number leaves this module; ``pseudo_id``
is an HMAC-SHA256 of PatientID and StudyInstanceUID under the installation secret.

Every failure raises a subclass of :class:`CXRReadError` naming the file, the problem and a fix
(anything unforeseen becomes :class:`UnexpectedReadError`, naming only the exception type); a
returned image is always finite (NaN/inf: :class:`NonFiniteImageError`). pydicom's warnings and
log records, which may quote header values, are silenced while reading (:func:`quiet_pydicom`).

:func:`check_radiograph` is the gate before classification: it refuses what is not a chest
radiograph (SOP class / Modality not CR or DX, another body part, colour, too small, blank) with
its own :class:`CXRReadError` subclass and returns flags for what may be one but is not known to
be (unknown body part, lateral view). See docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import math
import struct
import warnings
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from cxr_io.privacy import pseudonymous_id
from cxr_io.settings import Settings

__all__ = [
    "AbsurdDimensionsError",
    "BadLUTError",
    "CXRImage",
    "CXRReadError",
    "ColourImageError",
    "ConstantImageError",
    "CorruptHeaderError",
    "CorruptPixelDataError",
    "LoadCXR",
    "LoadCXRd",
    "LoadMask",
    "LoadMaskd",
    "MissingDecoderError",
    "MultiFrameError",
    "NoPixelDataError",
    "NonBinaryMaskError",
    "NonFiniteImageError",
    "NotChestError",
    "NotDicomError",
    "NotRadiographError",
    "RadiographPolicy",
    "ReadLimits",
    "TooSmallImageError",
    "TruncatedFileError",
    "UnexpectedReadError",
    "UnsupportedImageError",
    "check_radiograph",
    "load_cxr",
    "load_mask",
    "save_mask_nifti",
    "quiet_pydicom",
    "save_mask_png",
]


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class CXRReadError(Exception):
    """A file could not be read as a chest X-ray (or mask).

    ``str(err)`` is ``"<path>: <reason>. <what to do>"``.
    """

    hint = "Check the file, or remove it from the manifest."

    def __init__(self, path: str | Path, reason: str, hint: str | None = None) -> None:
        self.path = str(path)
        self.reason = reason.rstrip(". ")
        self.hint = hint or type(self).hint
        super().__init__(f"{self.path}: {self.reason}. {self.hint}")

    def __reduce__(self):  # picklable across DataLoader workers
        return (type(self), (self.path, self.reason, self.hint))


@contextlib.contextmanager
def surfaced_read_errors():
    """Re-raise a :class:`CXRReadError` that MONAI wrapped in its ``"applying transform"``
    ``RuntimeError``, so callers and users see which file failed and why."""
    try:
        yield
    except RuntimeError as exc:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, CXRReadError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause.with_traceback(cause.__traceback__) from None


@contextlib.contextmanager
def quiet_pydicom():
    """Silence pydicom while reading a header: its warnings and log records may quote header
    values (an invalid UID, a patient name), which must never reach stderr or a log file.

    Warnings are recorded and dropped, the ``pydicom`` logger is muted, and value validation
    on read is switched off (it only warns) for the duration.
    """
    import logging

    from pydicom import config

    logger = logging.getLogger("pydicom")  # its child loggers inherit the level
    old_level, old_mode = logger.level, config.settings.reading_validation_mode
    logger.setLevel(logging.CRITICAL + 1)
    config.settings.reading_validation_mode = config.IGNORE
    try:
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            yield
    finally:
        logger.setLevel(old_level)
        config.settings.reading_validation_mode = old_mode


class NotDicomError(CXRReadError):
    hint = (
        "Expected a DICOM file (with the 'DICM' marker) or a PNG, JPEG, NIfTI or MHA image; "
        "check that the path points to an image and not to another kind of file."
    )


class NoPixelDataError(CXRReadError):
    hint = (
        "A report or structured document holds no image: drop it from the manifest; if it "
        "should be an image, the file may be cut short: copy it again from the source."
    )


class MultiFrameError(CXRReadError):
    hint = "Only single-frame radiographs are supported; export the frame you need as its own file."


class MissingDecoderError(CXRReadError):
    hint = "Install the decoder plugin, or convert the file to an uncompressed transfer syntax."


class TruncatedFileError(CXRReadError):
    hint = "The file is cut short (incomplete copy or download); copy it again from the source."


class CorruptPixelDataError(CXRReadError):
    hint = "The pixel data is damaged; re-export the image from the source system."


class AbsurdDimensionsError(CXRReadError):
    hint = (
        "The header gives impossible or too large dimensions (possibly a decompression bomb); "
        "if the image is genuine, raise ReadLimits.max_pixels."
    )


class UnsupportedImageError(CXRReadError):
    hint = "Convert it to a single 2D greyscale image (DICOM, PNG, JPEG, NIfTI or MHA)."


class CorruptHeaderError(CXRReadError):
    hint = "The DICOM header is damaged; re-export the file from the source."


class NonFiniteImageError(CXRReadError):
    hint = (
        "The header or the pixels hold NaN or infinite values (e.g. RescaleSlope), so the image "
        "has no defined grey levels; re-export it from the source system."
    )


class BadLUTError(CXRReadError):
    hint = (
        "The modality or VOI lookup table in the header is malformed; re-export the image, or "
        "load it with apply_voi=False if only the VOI LUT is broken."
    )


class UnexpectedReadError(CXRReadError):
    hint = "The reader met a case it does not handle; please report it (the file stays local)."


class NotRadiographError(CXRReadError):
    hint = (
        "Only chest radiographs (Modality CR or DX, CR/DX image storage) are classified; "
        "leave other modalities and secondary captures out of the input."
    )


class NotChestError(CXRReadError):
    hint = "BodyPartExamined names another body part; only chest films are classified."


class ColourImageError(CXRReadError):
    hint = "A radiograph is greyscale; a colour DICOM is a photo, a screenshot or a rendering."


class TooSmallImageError(CXRReadError):
    hint = "The image is too small to hold a radiograph; check the export (a thumbnail or icon?)."


class ConstantImageError(CXRReadError):
    hint = "Every pixel has the same value: the image is blank (or its window hides everything)."


class NonBinaryMaskError(CXRReadError):
    hint = "Masks must hold exactly two levels, 0 and 1 (or 0 and 255); threshold it first."


# --------------------------------------------------------------------------------------------
# Configuration and result types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReadLimits:
    """Limits checked from headers before any pixel is decoded.

    Attributes:
        max_pixels: largest accepted ``H * W`` (default 100 megapixels).
    """

    max_pixels: int = 100_000_000


@dataclass
class CXRImage:
    """A loaded image.

    Attributes:
        pixels: float32 ``[H, W]`` in [0, 1], bright = dense.
        meta: ``pseudo_id, modality, view_position, body_part, photometric, original_size (H, W),
            transfer_syntax, spacing (row_mm, col_mm) or None, spacing_source, filename, format,
            voi, inverted, converted_from, sop_class`` (SOP Class UID, DICOM only).
            ``spacing_source`` is "ImagerPixelSpacing", "PixelSpacing" or None for DICOM,
            "file header" for NIfTI/MHA with a valid spacing.
            ``pseudo_id`` is None when the file has neither PatientID nor StudyInstanceUID
            (and for non-DICOM files).
    """

    pixels: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601, the Y of DICOM YBR_FULL

# pip packages that give pydicom a decoder, by transfer syntax UID (used in messages).
_DECODER_PACKAGES: Mapping[str, str] = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.51": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.57": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.70": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.80": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.81": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.90": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.91": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.201": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pylibjpeg pylibjpeg-rle",
}

_DEFER_BYTES = 64 * 1024  # elements larger than this (pixel data) are read only when needed
_PIXEL_DATA_TAGS = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")  # (7FE0,0010) LE / BE
_OTHER_IMAGE_SUFFIXES = (".tif", ".tiff", ".bmp", ".gif", ".webp", ".jp2", ".j2k", ".npy")


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def load_cxr(
    path: str | Path,
    *,
    apply_voi: bool = True,
    settings: Settings | None = None,
    limits: ReadLimits | None = None,
) -> CXRImage:
    """Load one chest X-ray as float32 ``[H, W]`` in [0, 1], bright = dense.

    Args:
        path: DICOM, PNG, JPEG, NIfTI (.nii/.nii.gz) or MHA/MHD file.
        apply_voi: apply the DICOM VOI LUT/window (see the module docstring for the ranges).
        settings: where the pseudonymisation secret lives (default ``Settings.from_env()``).
        limits: header checks made before decoding (default ``ReadLimits()``).

    Raises:
        CXRReadError: a subclass naming the file, the problem and what to do.
    """
    path = Path(path)
    limits = limits or ReadLimits()
    try:
        with quiet_pydicom():
            image = _load_any(path, apply_voi, settings, limits)
    except CXRReadError:
        raise
    except MemoryError:
        raise
    except Exception as err:  # the message may quote header values: name only the type
        raise UnexpectedReadError(
            path, f"reading failed with {type(err).__name__} (no specific diagnosis)"
        ) from err
    if not np.isfinite(image.pixels).all():
        raise NonFiniteImageError(path, "the image holds NaN or infinite values")
    return image


def _load_any(
    path: Path, apply_voi: bool, settings: Settings | None, limits: ReadLimits
) -> CXRImage:
    """:func:`load_cxr` without its final checks and error wrapping."""
    kind = _sniff_format(path)
    if kind == "dicom":
        return _load_dicom(path, apply_voi, settings, limits)
    if kind in ("png", "jpeg"):
        arr, mode = _read_pil(path, limits)
        pixels, converted = _pil_to_unit(path, arr, mode)
        spacing = None
    else:
        arr, spacing = _read_nifti(path, limits) if kind == "nifti" else _read_itk(path, limits)
        arr, converted = _colour_to_grey(arr)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = int(arr.size - np.isfinite(arr).sum())
            raise NonFiniteImageError(path, f"{bad} pixel(s) are NaN or infinite")
        pixels = _minmax_unit(arr)
    meta = _base_meta(path, kind, pixels.shape, spacing, "file header" if spacing else None)
    meta["converted_from"] = converted
    return CXRImage(pixels=pixels, meta=meta)


def load_mask(path: str | Path, *, limits: ReadLimits | None = None) -> np.ndarray:
    """Load a binary mask as bool ``[H, W]`` from PNG, NIfTI or MHA.

    Accepted levels: {0, 1} or {0, 255} (also a mask holding a single level). Any other value
    raises :class:`NonBinaryMaskError`.
    """
    return _read_mask(Path(path), limits or ReadLimits())[0]


def save_mask_png(mask: np.ndarray, path: str | Path) -> Path:
    """Write a bool ``[H, W]`` mask as an 8-bit PNG holding 0/255 (exact inverse of load_mask)."""
    from PIL import Image

    arr = _check_mask_array(mask, path)
    path = Path(path)
    Image.fromarray(arr.astype(np.uint8) * np.uint8(255), mode="L").save(path)
    return path


def save_mask_nifti(
    mask: np.ndarray, path: str | Path, spacing: tuple[float, float] | None = None
) -> Path:
    """Write a bool ``[H, W]`` mask as NIfTI uint8 0/1 with data ``(x, y) = mask.T``.

    ``spacing`` is ``(row_mm, col_mm)``; the affine is ``diag(col_mm, row_mm, 1, 1)``.
    The exact inverse of :func:`load_mask`.
    """
    import nibabel as nib

    arr = _check_mask_array(mask, path)
    row_mm, col_mm = spacing if spacing is not None else (1.0, 1.0)
    affine = np.diag([float(col_mm), float(row_mm), 1.0, 1.0])
    img = nib.Nifti1Image(np.ascontiguousarray(arr.T.astype(np.uint8)), affine)
    path = Path(path)
    nib.save(img, path)
    return path


# --------------------------------------------------------------------------------------------
# MONAI transforms
# --------------------------------------------------------------------------------------------


def _affine_2d(spacing: tuple[float, float] | None) -> torch.Tensor:
    """MONAI-style 3x3 affine for a channel-first ``[C, H, W]`` image: diag(row, col, 1)."""
    row, col = spacing if spacing is not None else (1.0, 1.0)
    return torch.diag(torch.tensor([row, col, 1.0], dtype=torch.float64))


def _collatable(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Meta for a MetaTensor: MONAI collation rejects None, so unknowns become "" or NaN."""
    out: dict[str, Any] = {}
    for key, value in meta.items():
        if key == "spacing":
            out[key] = tuple(value) if value is not None else (math.nan, math.nan)
        elif value is None:
            out[key] = ""
        else:
            out[key] = value
    # NIfTI-style pixdim ([1, row_mm, col_mm, 1, ...]): MONAI's spatial transforms write the new
    # spacing into pixdim[1:3] in place, which a tuple would refuse.
    out["pixdim"] = np.array([1.0, *out["spacing"], 1.0, 1.0, 1.0, 1.0, 1.0])
    out["filename_or_obj"] = meta.get("filename", "")
    return out


def _to_metatensor(pixels: np.ndarray, meta: Mapping[str, Any]) -> MetaTensor:
    spacing = meta.get("spacing")
    return MetaTensor(
        torch.from_numpy(pixels[None]), affine=_affine_2d(spacing), meta=_collatable(meta)
    )


class LoadCXR(Transform):
    """Path -> ``MetaTensor`` float32 ``[1, H, W]`` in [0, 1] (see :func:`load_cxr`).

    ``.meta`` holds the :class:`CXRImage` meta with unknowns as "" (spacing/pixdim: NaN), the
    affine is ``diag(row_mm, col_mm, 1)`` (identity when the spacing is unknown).
    """

    def __init__(
        self,
        apply_voi: bool = True,
        settings: Settings | None = None,
        limits: ReadLimits | None = None,
    ) -> None:
        self.apply_voi = apply_voi
        self.settings = settings
        self.limits = limits

    def __call__(self, path: str | Path) -> MetaTensor:
        image = load_cxr(path, apply_voi=self.apply_voi, settings=self.settings, limits=self.limits)
        return _to_metatensor(image.pixels, image.meta)


class LoadCXRd(MapTransform):
    """Dictionary version of :class:`LoadCXR`: replaces each path under ``keys``."""

    def __init__(
        self,
        keys: KeysCollection,
        apply_voi: bool = True,
        allow_missing_keys: bool = False,
        settings: Settings | None = None,
        limits: ReadLimits | None = None,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadCXR(apply_voi=apply_voi, settings=settings, limits=limits)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
        return d


class LoadMask(Transform):
    """Path -> ``MetaTensor`` float32 ``[1, H, W]`` in {0, 1} (see :func:`load_mask`)."""

    def __init__(self, limits: ReadLimits | None = None) -> None:
        self.limits = limits or ReadLimits()

    def __call__(self, path: str | Path) -> MetaTensor:
        path = Path(path)
        mask, spacing = _read_mask(path, self.limits)
        meta = _base_meta(
            path, _sniff_format(path), mask.shape, spacing, "file header" if spacing else None
        )
        return _to_metatensor(mask.astype(np.float32), meta)


class LoadMaskd(MapTransform):
    """Dictionary version of :class:`LoadMask`."""

    def __init__(
        self,
        keys: KeysCollection,
        allow_missing_keys: bool = False,
        limits: ReadLimits | None = None,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadMask(limits=limits)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
        return d


# --------------------------------------------------------------------------------------------
# Format detection and shared helpers
# --------------------------------------------------------------------------------------------


def _sniff_format(path: Path) -> str:
    """'dicom', 'png', 'jpeg', 'nifti' or 'mha', from magic bytes first, then the suffix."""
    if not path.is_file():
        raise CXRReadError(path, "no such file", "Check the path (and the manifest's folder).")
    with path.open("rb") as fh:
        head = fh.read(132)
    name = path.name.lower()
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[128:132] == b"DICM":
        return "dicom"
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith((".mha", ".mhd")):
        return "mha"
    if name.endswith(_OTHER_IMAGE_SUFFIXES):
        raise UnsupportedImageError(path, f"'{path.suffix}' images are not supported")
    return "dicom"  # let pydicom decide (it raises NotDicomError when there is no DICM marker)


def _check_size(path: Path, rows: int, cols: int, limits: ReadLimits, what: str) -> None:
    if rows <= 0 or cols <= 0:
        raise AbsurdDimensionsError(path, f"{what} gives an empty image ({rows} x {cols})")
    if rows * cols > limits.max_pixels:
        raise AbsurdDimensionsError(
            path,
            f"{what} gives {rows} x {cols} = {rows * cols / 1e6:.1f} megapixels, above the "
            f"limit of {limits.max_pixels / 1e6:g} megapixels",
        )


def _valid_spacing(values: Any) -> tuple[float, float] | None:
    """Two finite, positive numbers, else None (unknown)."""
    try:
        seq = list(values) if isinstance(values, Sequence | np.ndarray) else [values]
        if len(seq) != 2:
            return None
        out = (float(seq[0]), float(seq[1]))
    except (TypeError, ValueError):
        return None
    if all(math.isfinite(v) and v > 0 for v in out):
        return out
    return None


def _base_meta(
    path: Path,
    kind: str,
    shape: tuple[int, ...],
    spacing: tuple[float, float] | None,
    spacing_source: str | None,
) -> dict[str, Any]:
    return {
        "pseudo_id": None,
        "modality": None,
        "view_position": None,
        "body_part": None,
        "photometric": None,
        "original_size": (int(shape[0]), int(shape[1])),
        "transfer_syntax": None,
        "spacing": spacing,
        "spacing_source": spacing_source,
        "filename": path.name,
        "format": kind,
        "voi": None,
        "inverted": False,
        "converted_from": None,
        "sop_class": None,
    }


def _colour_to_grey(arr: np.ndarray) -> tuple[np.ndarray, str | None]:
    """``[H, W, 3|4]`` -> luma ``[H, W]`` float32 (alpha dropped); ``[H, W]`` passes through."""
    if arr.ndim == 2:
        return arr, None
    weights = np.asarray(LUMA_WEIGHTS, dtype=np.float32)
    return np.dot(arr[..., :3].astype(np.float32, copy=False), weights), "RGB"


def _minmax_unit(arr: np.ndarray) -> np.ndarray:
    """Min-max normalise to float32 [0, 1] (a constant image gives zeros)."""
    lo, hi = float(arr.min()), float(arr.max())
    out = np.empty(arr.shape, dtype=np.float32)
    np.subtract(arr, lo, out=out, casting="unsafe")
    if hi > lo:
        out *= np.float32(1.0 / (hi - lo))
    else:
        out.fill(0.0)
    return out


# --------------------------------------------------------------------------------------------
# PNG / JPEG (Pillow)
# --------------------------------------------------------------------------------------------


def _read_pil(path: Path, limits: ReadLimits) -> tuple[np.ndarray, str]:
    """Decode with Pillow after checking the header size: (array as stored, Pillow mode)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # our own limit decides, not Pillow's global one
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            cols, rows = img.size  # from the header; nothing decoded yet
            _check_size(path, rows, cols, limits, "the image header")
            mode = img.mode
            if mode == "P":
                img = img.convert("RGBA" if "transparency" in img.info else "RGB")
            elif mode == "CMYK":
                img = img.convert("RGB")
            arr = np.asarray(img)
            return arr, mode
    except Image.DecompressionBombError as err:
        raise AbsurdDimensionsError(path, f"Pillow refused the image size ({err})") from err
    except UnidentifiedImageError as err:
        raise UnsupportedImageError(path, "Pillow cannot identify this image") from err
    except (OSError, SyntaxError, ValueError) as err:
        if "truncated" in str(err).lower():
            raise TruncatedFileError(path, f"the image data ends early ({err})") from err
        raise CorruptPixelDataError(path, f"Pillow could not decode the image ({err})") from err


def _pil_to_unit(path: Path, arr: np.ndarray, mode: str) -> tuple[np.ndarray, str | None]:
    """Pillow array -> float32 [0, 1] divided by the bit depth's maximum."""
    if mode == "1":
        return arr.astype(np.float32), None
    if mode in ("L", "LA"):
        grey = arr if mode == "L" else arr[..., 0]
        return np.multiply(grey, np.float32(1 / 255), dtype=np.float32), None
    if mode.startswith("I;16") or mode == "I":
        if mode == "I" and (arr.min() < 0 or arr.max() > 65535):
            raise UnsupportedImageError(path, "32-bit integer images are not supported")
        return np.multiply(arr, np.float32(1 / 65535), dtype=np.float32), None
    if arr.ndim == 3 and arr.dtype == np.uint8:
        grey, _ = _colour_to_grey(arr)
        grey *= np.float32(1 / 255)
        return grey, mode
    raise UnsupportedImageError(path, f"Pillow mode '{mode}' is not supported")


# --------------------------------------------------------------------------------------------
# NIfTI (nibabel) and MHA/MHD (SimpleITK)
# --------------------------------------------------------------------------------------------


def _squeeze_2d(path: Path, shape: tuple[int, ...]) -> tuple[int, int]:
    """Drop trailing singleton axes; the rest must be 2D."""
    dims = list(shape)
    while len(dims) > 2 and dims[-1] == 1:
        dims.pop()
    if len(dims) != 2:
        raise UnsupportedImageError(path, f"expected a 2D image, found shape {tuple(shape)}")
    return dims[0], dims[1]


def _read_nifti(path: Path, limits: ReadLimits) -> tuple[np.ndarray, tuple[float, float] | None]:
    """NIfTI -> ``[H, W]`` array (data ``(x, y)`` transposed so rows are y), spacing (row, col)."""
    import nibabel as nib

    try:
        img = nib.load(path)
        dims = _squeeze_2d(path, img.shape)
        _check_size(path, dims[1], dims[0], limits, "the NIfTI header")
        data = np.asanyarray(img.dataobj).reshape(dims)
    except CXRReadError:
        raise
    except (EOFError, OSError) as err:
        raise TruncatedFileError(path, f"the NIfTI data ends early ({err})") from err
    except Exception as err:  # nibabel raises several unrelated types for bad files
        raise CorruptPixelDataError(path, f"nibabel could not read the file ({err})") from err
    zooms = img.header.get_zooms()
    spacing = _valid_spacing((zooms[1], zooms[0])) if len(zooms) >= 2 else None
    return np.ascontiguousarray(data.T), spacing


def _read_itk(path: Path, limits: ReadLimits) -> tuple[np.ndarray, tuple[float, float] | None]:
    """MHA/MHD -> ``[H, W]`` (or ``[H, W, C]``) array as SimpleITK gives it, spacing (row, col)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        size = reader.GetSize()  # (x, y[, z...])
        ncomp = reader.GetNumberOfComponents()
        if len(size) < 2 or any(s != 1 for s in size[2:]) or ncomp not in (1, 3, 4):
            raise UnsupportedImageError(
                path, f"expected a 2D image, found size {size} with {ncomp} components"
            )
        dims = (size[1], size[0], ncomp) if ncomp > 1 else (size[1], size[0])
        _check_size(path, size[1], size[0], limits, "the MetaImage header")
        img = reader.Execute()
    except CXRReadError:
        raise
    except RuntimeError as err:
        raise CorruptPixelDataError(path, f"SimpleITK could not read the file ({err})") from err
    arr = sitk.GetArrayFromImage(img).reshape(dims)
    sp = img.GetSpacing()
    return arr, _valid_spacing((sp[1], sp[0]))


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------


def _check_mask_array(mask: np.ndarray, path: str | Path) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise UnsupportedImageError(path, f"a mask must be [H, W], got shape {arr.shape}")
    if arr.dtype != np.bool_:
        if not np.isin(arr, (0, 1)).all():
            raise NonBinaryMaskError(path, "the mask to write holds values other than 0 and 1")
        arr = arr.astype(bool)
    return arr


def _read_mask(path: Path, limits: ReadLimits) -> tuple[np.ndarray, tuple[float, float] | None]:
    kind = _sniff_format(path)
    spacing = None
    if kind == "jpeg":
        raise UnsupportedImageError(
            path, "JPEG is lossy and cannot hold an exact mask", "Save masks as PNG."
        )
    if kind == "png":
        arr, _ = _read_pil(path, limits)
    elif kind == "nifti":
        arr, spacing = _read_nifti(path, limits)
    elif kind == "mha":
        arr, spacing = _read_itk(path, limits)
    else:
        raise UnsupportedImageError(path, "masks must be PNG, NIfTI or MHA", "Save masks as PNG.")
    if arr.ndim == 3:  # grey stored as LA/RGB(A): accept only if the colour channels agree
        colour = arr[..., : 3 if arr.shape[-1] >= 3 else 1]
        if not (colour == colour[..., :1]).all():
            raise NonBinaryMaskError(path, "the mask is a colour image")
        arr = arr[..., 0]
    top = arr.max()
    if top not in (0, 1, 255) or arr.min() < 0:
        bad = np.unique(arr[(arr != 0) & (arr != 1) & (arr != 255)])[:5].tolist()
        raise NonBinaryMaskError(path, f"the mask holds values other than 0/1 or 0/255: {bad}")
    mask = arr == top
    if top != 0 and not (mask | (arr == 0)).all():
        bad = np.unique(arr[(arr != 0) & (arr != top)])[:5].tolist()
        raise NonBinaryMaskError(path, f"the mask holds more than two levels: 0, {top} and {bad}")
    return mask, spacing


# --------------------------------------------------------------------------------------------
# Is it a chest radiograph? (the gate before classification)
# --------------------------------------------------------------------------------------------

CR_DX_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
        "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
        "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
    }
)
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "LLD", "RLD"})


@dataclass(frozen=True)
class RadiographPolicy:
    """What :func:`check_radiograph` accepts.

    Attributes:
        modalities: accepted DICOM ``Modality`` values.
        body_parts: substrings of ``BodyPartExamined`` that mean a chest.
        min_side: smallest accepted image side in pixels (smaller: :class:`TooSmallImageError`).
        min_range: smallest accepted ``max - min`` of the [0, 1] pixels (below:
            :class:`ConstantImageError`).
    """

    modalities: tuple[str, ...] = ("CR", "DX")
    body_parts: tuple[str, ...] = ("CHEST", "THORAX", "LUNG")
    min_side: int = 32
    min_range: float = 1e-3


def check_radiograph(
    path: str | Path, pixels: np.ndarray, meta: Mapping[str, Any], policy: RadiographPolicy
) -> list[str]:
    """Refuse what is not a chest radiograph; return the reasons to doubt the rest.

    Args:
        path: the file (for the error message).
        pixels: ``[H, W]`` (or ``[1, H, W]``) in [0, 1] as :func:`load_cxr` returns them.
        meta: the loader's meta (``format``, ``modality``, ``sop_class``, ``body_part``,
            ``view_position``, ``photometric``; unknowns as None or "").
        policy: the accepted modalities, body parts and sizes.

    Returns:
        Flags (short reasons) for images that may be chests but are not known to be: empty
        ``BodyPartExamined`` or ``Modality`` in a DICOM, a lateral view. Flagged images are
        listed, not classified.

    Raises:
        NotRadiographError: SOP class or Modality of another kind of image.
        NotChestError: ``BodyPartExamined`` names another body part.
        ColourImageError: a colour DICOM (RGB, YBR_*, PALETTE COLOR).
        TooSmallImageError: a side below ``policy.min_side``.
        ConstantImageError: ``max - min`` of the pixels below ``policy.min_range``.
    """
    arr = np.asarray(pixels)
    h, w = arr.shape[-2:]
    if min(h, w) < policy.min_side:
        raise TooSmallImageError(
            path, f"the image is {h} x {w} pixels, below the minimum side of {policy.min_side}"
        )
    flags: list[str] = []
    if meta.get("format") == "dicom":
        flags += _check_header(path, meta, policy)
    lo, hi = float(arr.min()), float(arr.max())
    if hi - lo < policy.min_range:
        raise ConstantImageError(path, f"the pixel values span {hi - lo:.2g} (a blank image)")
    return flags


def _check_header(path: str | Path, meta: Mapping[str, Any], policy: RadiographPolicy) -> list[str]:
    """The DICOM header part of :func:`check_radiograph`."""
    keys = ("sop_class", "modality", "photometric", "body_part", "view_position")
    text = {k: str(meta.get(k) or "").strip() for k in keys}
    sop, modality = text.get("sop_class", ""), text.get("modality", "").upper()
    if sop and sop not in CR_DX_SOP_CLASSES:
        from pydicom.uid import UID

        name = UID(sop).name if UID(sop).is_valid else "an unknown SOP class"
        raise NotRadiographError(path, f"the SOP class is {name}, not CR or DX image storage")
    if modality and modality not in policy.modalities:
        raise NotRadiographError(
            path, f"Modality is {modality[:16]}, not one of {policy.modalities}"
        )
    photometric = text.get("photometric", "").upper()
    if photometric and not photometric.startswith("MONOCHROME"):
        raise ColourImageError(path, f"the photometric interpretation is {photometric[:16]}")
    flags = [] if modality else ["no Modality in the header"]
    body = text.get("body_part", "").upper()
    if not body:
        flags.append("no BodyPartExamined in the header (unknown body part)")
    elif not any(part in body for part in policy.body_parts):
        raise NotChestError(path, f"BodyPartExamined is {body[:16]}, not a chest")
    view = text.get("view_position", "").upper()
    if view in LATERAL_VIEWS:
        flags.append(f"lateral view ({view}); the classifier reads frontal films")
    return flags


# --------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------


def _text(ds: Any, keyword: str) -> str | None:
    """A plain string (multi-values joined with '\\'), or None when absent/empty."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value.strip() or None
    try:
        return "\\".join(str(v) for v in value) or None
    except TypeError:
        return str(value).strip() or None


def _first_number(value: Any) -> float:
    """First value of a (possibly multi-valued) numeric element."""
    if isinstance(value, str):
        value = value.split("\\")[0]
    elif not isinstance(value, int | float) and isinstance(value, Sequence):
        value = value[0]
    return float(value)


def _dicom_spacing(ds: Any) -> tuple[tuple[float, float] | None, str | None]:
    for keyword in ("ImagerPixelSpacing", "PixelSpacing"):
        try:
            value = ds.get(keyword)
        except Exception:  # an unparsable DS may raise on access, depending on pydicom's config
            continue
        spacing = _valid_spacing(value) if value is not None else None
        if spacing is not None:
            return spacing, keyword
    return None, None


@dataclass(frozen=True)
class _GreyPlan:
    """How stored values become [0, 1] for one greyscale DICOM header.

    ``linear`` is ``(a, b)`` when the whole chain is ``clip(x * a + b, 0, 1)``; otherwise the
    chain runs through pydicom's own LUT functions (``voi`` in 'lut', 'window').
    """

    voi: str  # 'off', 'none', 'window', 'lut'
    voi_desc: str
    out_lo: float
    out_hi: float
    invert: bool
    linear: tuple[float, float] | None


def _stored_range(ds: Any) -> tuple[int, int]:
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _window(ds: Any) -> tuple[float, float, str] | str:
    """(center, width, function) of the first window, or a reason string when unusable."""
    try:
        center = _first_number(ds.WindowCenter)
        width = _first_number(ds.WindowWidth)
    except (AttributeError, TypeError, ValueError, IndexError):
        return "none (window center/width unreadable)"
    func = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if func not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        return f"none (unknown VOI LUT function {func!r})"
    if not (math.isfinite(center) and math.isfinite(width)):
        return "none (non-finite window)"
    if (func == "LINEAR" and width < 1) or (func != "LINEAR" and width <= 0):
        return f"none (invalid window width {width:g} for {func})"
    return center, width, func


def _grey_plan(ds: Any, apply_voi: bool) -> _GreyPlan:
    from pydicom.pixels import apply_modality_lut

    smin, smax = _stored_range(ds)
    has_mlut = bool(ds.get("ModalityLUTSequence"))
    # pydicom rescales only when both values are present (and no Modality LUT Sequence).
    has_rescale = not has_mlut and "RescaleSlope" in ds and "RescaleIntercept" in ds
    slope = float(ds.RescaleSlope) if has_rescale else 1.0
    intercept = float(ds.RescaleIntercept) if has_rescale else 0.0
    # Modality output range of every possible stored value.
    if has_mlut:
        # Stored values outside the LUT are clamped to its ends: the LUT's own input range,
        # clipped to the stored range, reaches every output.
        n_entries, first = (int(v) for v in ds.ModalityLUTSequence[0].LUTDescriptor[:2])
        values = np.clip(np.arange(first, first + (n_entries or 65536)), smin, smax)
        mapped = apply_modality_lut(values, ds)
        m_lo, m_hi = float(mapped.min()), float(mapped.max())
    else:
        ends = (smin * slope + intercept, smax * slope + intercept)
        m_lo, m_hi = min(ends), max(ends)
    invert = (
        str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1"
        or str(ds.get("PresentationLUTShape", "")).strip().upper() == "INVERSE"
    )

    voi, desc, lo, hi = "none", "none (no VOI in header)", m_lo, m_hi
    window: tuple[float, float, str] | None = None
    if not apply_voi:
        voi, desc = "off", "off (apply_voi=False)"
    elif _valid_voi_lut(ds):
        depth = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        voi, desc, lo, hi = "lut", f"VOI LUT Sequence ({depth}-bit)", 0.0, 2.0**depth - 1
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        parsed = _window(ds)
        if isinstance(parsed, str):
            desc = parsed
        else:
            window = parsed
            center, width, func = parsed
            voi, desc = "window", f"window {center:g}/{width:g} {func}"
            # pydicom's windowing output range (kept from its input range, unsorted).
            if has_mlut:
                depth = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
                lo, hi = 0.0, 2.0**depth - 1
            else:
                lo, hi = smin * slope + intercept, smax * slope + intercept

    linear: tuple[float, float] | None = None
    if not has_mlut:
        if voi in ("none", "off"):
            span = m_hi - m_lo
            linear = (slope / span, (intercept - m_lo) / span) if span else (0.0, 0.0)
        elif window is not None and window[2] == "LINEAR" and window[1] > 1:
            center, width, _ = window
            a = slope / (width - 1)
            linear = (a, (intercept - center + 0.5) / (width - 1) + 0.5)
        elif window is not None and window[2] == "LINEAR_EXACT":
            center, width, _ = window
            linear = (slope / width, (intercept - center) / width + 0.5)
    if linear is not None and invert:
        linear = (-linear[0], 1.0 - linear[1])
    return _GreyPlan(voi, desc, lo, hi, invert, linear)


def _valid_voi_lut(ds: Any) -> bool:
    seq = ds.get("VOILUTSequence")
    if not seq:
        return False
    item = seq[0]
    return item.get("LUTDescriptor") is not None and item.get("LUTData") is not None


def _transfer(values: np.ndarray, ds: Any, plan: _GreyPlan) -> np.ndarray:
    """The general chain with pydicom's functions: stored values -> float64 [0, 1]."""
    from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

    y = apply_modality_lut(values, ds)
    if plan.voi == "lut":
        if y.dtype.kind == "f" and np.array_equal(y, np.round(y)):
            y = y.astype(np.int64)
        y = apply_voi(y, ds, 0)
    elif plan.voi == "window":
        y = apply_windowing(y, ds, 0)
    span = plan.out_hi - plan.out_lo
    t = (np.asarray(y, dtype=np.float64) - plan.out_lo) / span if span else np.zeros(y.shape)
    np.clip(t, 0.0, 1.0, out=t)
    return 1.0 - t if plan.invert else t


def _grey_to_unit(arr: np.ndarray, ds: Any, plan: _GreyPlan) -> np.ndarray:
    """Stored greyscale ``[H, W]`` -> float32 [0, 1] by the plan."""
    if plan.linear is not None and arr.dtype.kind in "ui":
        a, b = plan.linear
        out = np.multiply(arr, np.float32(a), dtype=np.float32)
        out += np.float32(b)
        np.clip(out, 0.0, 1.0, out=out)
        return out
    if arr.dtype.kind in "ui" and arr.dtype.itemsize <= 2:
        # One table entry per bit pattern of the dtype, indexed by the unsigned view.
        unsigned = np.dtype(f"u{arr.dtype.itemsize}")
        patterns = np.arange(2 ** (8 * arr.dtype.itemsize), dtype=unsigned).view(arr.dtype)
        lut = _transfer(patterns, ds, plan).astype(np.float32)
        return np.take(lut, arr.view(unsigned))
    return _transfer(arr, ds, plan).astype(np.float32)


def _file_has_pixel_tag(path: Path) -> bool:
    data = path.read_bytes()
    return any(tag in data[132:] for tag in _PIXEL_DATA_TAGS)


def _last_element_end(ds: Any) -> int | None:
    """File offset just past the last top-level element pydicom parsed (file meta included),
    or None when it cannot be known (undefined lengths, already converted elements).

    Must be called right after ``dcmread``, before elements are accessed (they are still
    pydicom ``RawDataElement`` with ``value_tell`` and ``length``)."""
    for dataset in (ds, getattr(ds, "file_meta", None)):
        elements = getattr(dataset, "_dict", None)
        if not elements:
            continue
        last = elements[max(elements)]
        tell, length = getattr(last, "value_tell", None), getattr(last, "length", None)
        if tell is None or length is None or length == 0xFFFFFFFF:
            return None
        return int(tell) + int(length)
    return None


def _sop_class(ds: Any) -> Any:
    """The SOP Class UID (file meta first, then the dataset), or None."""
    uid = getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID") or ds.get("SOPClassUID")
    return uid or None


def _header_checks(
    path: Path, ds: Any, limits: ReadLimits, ended_early: bool, complete: bool | None
) -> None:
    """Everything that must hold before pixel data is touched.

    ``ended_early``: pydicom reported the end of the file inside an element (it then drops
    an incomplete encapsulated Pixel Data element). ``complete``: the last parsed element
    ends exactly at the end of the file (None: unknown).
    """
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise UnsupportedImageError(path, "float pixel data is not supported")
        if ended_early or _file_has_pixel_tag(path):
            raise TruncatedFileError(path, "the file ends inside its pixel data")
        sop_class = _sop_class(ds)
        name = getattr(sop_class, "name", str(sop_class)) if sop_class else "no SOP class"
        # a cut at an element boundary inside the Image Pixel module: it started, Rows or
        # Columns (which precede Pixel Data) are missing
        pixel_module = any(k in ds for k in ("SamplesPerPixel", "PhotometricInterpretation"))
        cut_in_module = pixel_module and not ("Rows" in ds and "Columns" in ds)
        empty = len(ds) == 0 and not getattr(ds, "file_meta", None)
        if complete is False or cut_in_module or empty:
            raise TruncatedFileError(path, "the file ends inside its header, before any pixel data")
        name = getattr(sop_class, "name", str(sop_class))
        raise NoPixelDataError(path, f"the file is complete but holds no image ({name})")
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        if keyword in ds:
            try:
                value = _first_number(ds[keyword].value)
            except (TypeError, ValueError, IndexError):
                raise NonFiniteImageError(path, f"{keyword} is not a number") from None
            if not math.isfinite(value):
                raise NonFiniteImageError(path, f"{keyword} is {value}")
    try:
        frames = int(_first_number(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        frames = 1
    if frames > 1:
        raise MultiFrameError(path, f"the file holds {frames} frames")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits_alloc, bits_stored = int(ds.BitsAllocated), int(ds.BitsStored)
        spp = int(ds.get("SamplesPerPixel", 1))
    except (AttributeError, TypeError, ValueError) as err:
        raise AbsurdDimensionsError(path, f"the image header is incomplete ({err})") from err
    _check_size(path, rows, cols, limits, "the DICOM header")
    if bits_alloc not in (1, 8, 16, 32) or not 0 < bits_stored <= bits_alloc:
        raise AbsurdDimensionsError(
            path, f"BitsAllocated {bits_alloc} / BitsStored {bits_stored} are not valid"
        )
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    grey = spp == 1 and photometric in ("MONOCHROME1", "MONOCHROME2")
    colour = spp == 3 and photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
    if not (grey or colour):
        raise UnsupportedImageError(
            path, f"photometric interpretation {photometric!r} with {spp} samples per pixel"
        )


def _decode(path: Path, ds: Any) -> np.ndarray:
    """Decode the single frame, with specific errors for missing decoders and short data."""
    from pydicom.pixels import get_decoder

    tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if tsyntax is None:
        raise UnsupportedImageError(path, "the file meta has no Transfer Syntax UID")
    try:
        compressed = tsyntax.is_compressed
    except ValueError:  # pydicom does not know this UID
        raise UnsupportedImageError(
            path, f"unknown transfer syntax {str(tsyntax)[:64]!r}"
        ) from None
    if compressed:
        packages = _DECODER_PACKAGES.get(str(tsyntax))
        install = f"the decoder (pip install {packages})" if packages else "a pydicom plugin"
        try:
            decoder = get_decoder(tsyntax)
            missing = decoder.missing_dependencies if not decoder.is_available else None
        except NotImplementedError:
            missing = ["pydicom has no decoder for it"]
        if missing is not None:
            detail = "; ".join(missing) if missing else "no plugin installed"
            raise MissingDecoderError(
                path,
                f"pixel data is compressed as {tsyntax.name} ({tsyntax}) and no installed "
                f"decoder reads it ({detail})",
                f"Install {install}, or convert the file to an uncompressed transfer syntax.",
            )
    else:
        expected = _native_bytes(ds)
        have = len(ds.PixelData)
        if have < expected:
            raise TruncatedFileError(
                path, f"the pixel data has {have} of the {expected} bytes the header declares"
            )
        # trailing zero padding is tolerated; other excess bytes mean the header's size is
        # wrong (reading it would skew the image) or the data holds several frames
        if have > expected + 1 and (have >= 2 * expected or _nonzero_tail(ds, expected)):
            raise CorruptPixelDataError(
                path,
                f"the pixel data has {have} bytes, more than the {expected} the header "
                f"declares (wrong Rows/Columns/BitsAllocated, or several frames)",
            )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            arr = ds.pixel_array
    except Exception as err:
        raise CorruptPixelDataError(
            path, f"decoding {tsyntax.name} pixel data failed ({type(err).__name__})"
        ) from err
    rows, cols, spp = int(ds.Rows), int(ds.Columns), int(ds.get("SamplesPerPixel", 1))
    want = (rows, cols) if spp == 1 else (rows, cols, spp)
    if arr.shape != want:
        raise CorruptPixelDataError(
            path, f"the decoded pixel data has shape {arr.shape}, the header declares {want}"
        )
    return arr


def _nonzero_tail(ds: Any, start: int) -> bool:
    """Whether the native pixel data holds any non-zero byte after ``start``."""
    return any(np.frombuffer(ds.PixelData, dtype=np.uint8, offset=start))


def _native_bytes(ds: Any) -> int:
    """Bytes of one uncompressed frame, counting 4:2:2 chroma subsampling (YBR_FULL_422:
    two samples per pixel on average) and 1-bit packing."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    spp = int(ds.get("SamplesPerPixel", 1))
    if spp == 3 and str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422":
        spp = 2  # Y0 Y1 Cb Cr for every two pixels
    bits = rows * cols * spp * int(ds.BitsAllocated)
    return (bits + 7) // 8


def _load_dicom(
    path: Path, apply_voi: bool, settings: Settings | None, limits: ReadLimits
) -> CXRImage:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        # pydicom's warnings may quote header values (patient data): keep them, don't show them.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES)
            end = _last_element_end(ds)
    except InvalidDicomError as err:
        raise NotDicomError(path, "not a DICOM file (no 'DICM' marker) nor a known image") from err
    except EOFError as err:
        raise TruncatedFileError(path, f"the file ends inside its header ({err})") from err
    except Exception as err:
        # The message may quote header values (patient data): name only the error type.
        raise CorruptHeaderError(
            path, f"the DICOM header is unreadable ({type(err).__name__})"
        ) from err

    ended_early = any("End of file reached" in str(w.message) for w in caught)
    complete = None if end is None else end == path.stat().st_size
    try:
        return _dicom_image(path, ds, apply_voi, settings, limits, ended_early, complete)
    except CXRReadError:
        raise
    except Exception as err:  # a damaged element fails when it is first read
        raise CorruptHeaderError(
            path, f"a header element cannot be read ({type(err).__name__})"
        ) from err


def _dicom_image(
    path: Path,
    ds: Any,
    apply_voi: bool,
    settings: Settings | None,
    limits: ReadLimits,
    ended_early: bool,
    complete: bool | None,
) -> CXRImage:
    """Checks, decoding and grey-level conversion of a parsed DICOM header."""
    _header_checks(path, ds, limits, ended_early, complete)
    arr = _decode(path, ds)

    photometric = str(ds.PhotometricInterpretation).strip()
    spacing, source = _dicom_spacing(ds)
    meta = _base_meta(path, "dicom", (int(ds.Rows), int(ds.Columns)), spacing, source)
    if int(ds.get("SamplesPerPixel", 1)) == 3:
        grey, _ = _colour_to_grey(arr)
        grey *= np.float32(1.0 / (2 ** int(ds.BitsStored) - 1))
        pixels, meta["converted_from"], meta["voi"] = grey, photometric, "none (colour image)"
    else:
        try:
            plan = _grey_plan(ds, apply_voi)
            pixels = _grey_to_unit(arr, ds, plan)
        except (
            IndexError,
            TypeError,
            ValueError,
            KeyError,
            AttributeError,
            OverflowError,
            struct.error,
        ) as err:
            raise BadLUTError(
                path, f"the modality/VOI transform cannot be applied ({type(err).__name__})"
            ) from err
        meta["voi"], meta["inverted"] = plan.voi_desc, plan.invert

    patient_id = _text(ds, "PatientID") or ""
    study_uid = _text(ds, "StudyInstanceUID") or ""
    if patient_id or study_uid:
        secret = (settings or Settings.from_env()).pseudonym_secret()
        meta["pseudo_id"] = pseudonymous_id(patient_id, study_uid, secret)
    meta.update(
        modality=_text(ds, "Modality"),
        view_position=_text(ds, "ViewPosition"),
        body_part=_text(ds, "BodyPartExamined"),
        photometric=photometric,
        transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
        sop_class=str(_sop_class(ds) or "") or None,
    )
    return CXRImage(pixels=pixels, meta=meta)
