"""Acquisition: from density to stored pixel values (site's detector, window, noise, blur,
collimation, marker) and the DICOM file with a fake patient header.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from synthetic.markers import place_marker
from synthetic.phantom import smooth_noise
from synthetic.sites import CR_STORAGE, DX_STORAGE, SiteConfig, Streams

_FAKE_GIVEN = ("ALEX", "SAM", "JORDAN", "KIM", "ROBIN", "CHRIS", "NOA", "ELI", "MAX", "ANDY")
_FAKE_FAMILY = ("DOE", "ROE", "SMITH", "MARTIN", "GARCIA", "MUELLER", "ROSSI", "SILVA", "NOVAK")
# --------------------------------------------------------------------------------------------
# One image
# --------------------------------------------------------------------------------------------


def single_threaded_blas() -> contextlib.AbstractContextManager[Any]:
    """Limit BLAS to one thread: the tiny matrix products here are slower multi-threaded,
    badly so on a busy machine (uses threadpoolctl when installed)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional speed-up
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


@dataclass
class SyntheticCase:
    """One rendered radiograph.

    Attributes:
        display: float32 ``[H, W]`` in [0, 1], bright = dense (what a viewer shows).
        stored: uint16 ``[H, W]``, the DICOM stored values (inverted for MONOCHROME1).
        mask: bool ``[H, W]`` lung fields (ground truth).
        body: bool ``[H, W]`` inside the body outline.
        marker: bool ``[H, W]`` pixels of the burned-in bias marker (all False when none).
        finding: float32 ``[H, W]`` density added by the finding (zero outside the lungs).
        label: class name; ``bias``: the marker's class ('' for none).
    """

    display: np.ndarray
    stored: np.ndarray
    mask: np.ndarray
    body: np.ndarray
    marker: np.ndarray
    finding: np.ndarray
    label: str
    bias: str
    streams: Streams = field(repr=False)


def acquire(
    site: SiteConfig,
    density: np.ndarray,
    finding: np.ndarray,
    lung_mask: np.ndarray,
    body_mask: np.ndarray,
    label: str,
    marker_cls: str,
    st: Streams,
) -> SyntheticCase:
    """Turn a drawn chest into a site's radiograph: blur, gamma, noise, bias marker,
    collimation, quantisation to ``bits_stored`` (inverted for MONOCHROME1).

    Args:
        density: float32 ``[H, W]`` anatomy in [0, 1], bright = dense.
        finding: float32 ``[H, W]`` density added by the finding (masked to the lungs here).
        lung_mask, body_mask: bool ``[H, W]``.
        marker_cls: the marker's class ('' for none).
    """
    size = density.shape[0]
    res = size / 256.0
    coll = round(site.collimation * size)
    exposed = np.zeros((size, size), dtype=bool)
    exposed[coll : size - coll, coll : size - coll] = True
    mask = lung_mask & exposed
    finding = (finding * mask).astype(np.float32)

    sigma = site.blur * res
    if sigma > 0:
        density = ndimage.gaussian_filter(density, sigma)
        finding = ndimage.gaussian_filter(finding, sigma) * mask
    v = np.clip(density + finding, 0.0, 1.0) ** site.gamma
    v = v + site.noise * st.noise.standard_normal(v.shape).astype(np.float32)
    v = v + 0.5 * site.noise * smooth_noise(st.noise, size, 8)

    marker = np.zeros((size, size), dtype=bool)
    if marker_cls:
        placed = place_marker(site, marker_cls, mask, coll, st.marker)
        if placed is None:
            marker_cls = ""
        else:
            vals, marker = placed
            v = np.where(marker, vals, v)

    if coll > 0:
        frame = 0.97 if site.collimation_bright else 0.03
        v = np.where(exposed, v, frame + 0.3 * site.noise * st.noise.standard_normal(v.shape))
    v = np.clip(v, 0.0, 1.0).astype(np.float32)

    maxval = (1 << site.bits_stored) - 1
    stored = np.round(v.astype(np.float64) * maxval).astype(np.uint16)
    if site.photometric == "MONOCHROME1":
        stored = (maxval - stored).astype(np.uint16)
    display = (stored.astype(np.float32) / maxval).astype(np.float32)
    if site.photometric == "MONOCHROME1":
        display = 1.0 - display
    return SyntheticCase(
        display=display,
        stored=stored,
        mask=mask,
        body=body_mask,
        marker=marker,
        finding=finding,
        label=label,
        bias=marker_cls,
        streams=st,
    )


# --------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------


def window_tags(site: SiteConfig) -> tuple[float, float]:
    """(WindowCenter, WindowWidth) in modality units (slope * stored + intercept)."""
    maxval = (1 << site.bits_stored) - 1
    c = site.window_center if site.photometric == "MONOCHROME2" else 1.0 - site.window_center
    center = site.rescale_slope * c * maxval + site.rescale_intercept
    width = site.rescale_slope * site.window_width * maxval
    return round(center, 2), round(width, 2)


def write_dicom(
    path: str | os.PathLike,
    stored: np.ndarray,
    site: SiteConfig,
    rng: np.random.Generator,
    entropy: str,
    size: int,
) -> Path:
    """Write ``stored`` (uint16 ``[H, W]``) as a CR/DX DICOM with a fake, seeded patient header."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    path = Path(path)
    sop_class = CR_STORAGE if site.modality == "CR" else DX_STORAGE
    sop_uid = generate_uid(entropy_srcs=[entropy, "sop"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = generate_uid(entropy_srcs=["isnet-cxr synthetic"])
    meta.ImplementationVersionName = "ISNETCXR_SYN"

    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[entropy, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[entropy, "series"])
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[entropy, "frame"])

    birth = _dt.date(1935, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 365 * 70)))
    study = _dt.date(2018, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 365 * 6)))
    ds.PatientName = f"{rng.choice(_FAKE_FAMILY)}^{rng.choice(_FAKE_GIVEN)}"
    ds.PatientID = f"{int(rng.integers(10**7, 10**8))}"
    ds.PatientBirthDate = birth.strftime("%Y%m%d")
    ds.PatientSex = str(rng.choice(["F", "M"]))
    ds.AccessionNumber = f"A{int(rng.integers(10**8, 10**9))}"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = f"{int(rng.integers(7, 20)):02d}1500"
    ds.StudyID = str(int(rng.integers(1, 99999)))
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ReferringPhysicianName = ""
    ds.InstitutionName = f"Synthetic {site.name}"
    ds.Manufacturer = site.manufacturer
    ds.Modality = site.modality
    ds.ConversionType = "WSD" if site.modality == "CR" else ""
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = site.view_position
    ds.PatientOrientation = ["L", "F"] if site.view_position == "AP" else ["R", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if site.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.DetectorType = "SCINTILLATOR"
        ds.RescaleType = "US"
    spacing = round(site.pixel_spacing_mm * 256.0 / size, 4)
    ds.ImagerPixelSpacing = [spacing, spacing]

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = site.photometric
    ds.Rows, ds.Columns = (int(n) for n in stored.shape)
    ds.BitsAllocated = 16
    ds.BitsStored = site.bits_stored
    ds.HighBit = site.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.RescaleSlope = f"{site.rescale_slope:g}"
    ds.RescaleIntercept = f"{site.rescale_intercept:g}"
    center, width = window_tags(site)
    ds.WindowCenter = f"{center:g}"
    ds.WindowWidth = f"{width:g}"
    ds.PixelData = np.ascontiguousarray(stored, dtype="<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
