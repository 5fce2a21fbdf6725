"""Writing lung masks: PNG, NIfTI, DICOM SEG, and an overlay preview.

PNG and NIfTI go through :mod:`cxr_io.readers`'s writers, so a mask read back with
:func:`cxr_io.readers.load_mask` is the same array ``[H, W]``.

DICOM SEG (:func:`save_dicom_seg`) references the source DICOM image (SOP class/instance UID,
series) so a viewer shows the mask over its image. A SEG must carry the source's patient and study
modules to be filed with its image; highdicom copies exactly those and nothing else from the source
header. The SEG is therefore an output **for the hospital's PACS**, not for MLflow or logs: it is
never logged as an artifact, and nothing from its header is written anywhere else.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxr_io.readers import load_cxr, save_mask_nifti, save_mask_png
from evaluation.figures import save_overlay

SEG_ALGORITHM_NAME = "isnet-cxr lung U-Net"
# Type 2 attributes of the patient and study modules a SEG copies from its source; a source that
# lacks them (allowed for some, common in the wild) gets them empty in the in-memory copy.
_TYPE2_SOURCE_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def write_mask_png(mask: np.ndarray, path: str | os.PathLike) -> Path:
    """Bool mask ``[H, W]`` -> 0/255 PNG via :func:`cxr_io.readers.save_mask_png` (folders made)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return save_mask_png(np.asarray(mask, dtype=bool), path)


def write_mask_nifti(
    mask: np.ndarray, path: str | os.PathLike, spacing: tuple[float, float] | None = None
) -> Path:
    """Bool mask ``[H, W]`` -> NIfTI via :func:`cxr_io.readers.save_mask_nifti` (folders made)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return save_mask_nifti(np.asarray(mask, dtype=bool), path, spacing=spacing)


def _software_version() -> str:
    try:
        from importlib.metadata import version

        return version("isnet-cxr")
    except Exception:
        return "0.1.0"


def save_dicom_seg(
    mask: np.ndarray,
    source: str | os.PathLike,
    path: str | os.PathLike,
    *,
    series_number: int = 900,
    segment_label: str = "Lung field",
) -> Path:
    """Write a binary DICOM SEG of ``mask`` (bool ``[H, W]``, the source's size) that references
    the DICOM image ``source``.

    Raises:
        ValueError: when ``source`` is not DICOM or its size differs from the mask's.
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    source = Path(source)
    try:
        ds = pydicom.dcmread(source)
    except Exception as exc:
        raise ValueError(
            f"{source}: not a readable DICOM file ({exc}); a DICOM SEG can only reference a "
            "DICOM source image, write PNG or NIfTI masks for other formats"
        ) from exc
    for keyword in _TYPE2_SOURCE_ATTRIBUTES:  # empty when absent, as the standard allows
        if keyword not in ds:
            setattr(ds, keyword, "")
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (int(ds.Rows), int(ds.Columns)):
        raise ValueError(
            f"{source}: mask shape {mask.shape} differs from the image's "
            f"{(int(ds.Rows), int(ds.Columns))}; segment at the original size"
        )
    version = _software_version()
    algorithm = hd.AlgorithmIdentificationSequence(
        name=SEG_ALGORITHM_NAME,
        version=version,
        family=codes.cid7162.ArtificialIntelligence,
    )
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=segment_label,
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=codes.SCT.Lung,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    seg = hd.seg.Segmentation(
        source_images=[ds],
        pixel_array=mask[None],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="isnet-cxr",
        manufacturer_model_name="lung-unet",
        software_versions=version,
        device_serial_number="0",
        series_description="Lung segmentation (automatic)",
    )
    _drop_invalid_pixel_measures(seg)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return path


def _drop_invalid_pixel_measures(seg) -> None:
    """Remove a Pixel Measures item copied from a source whose spacing is invalid (real CR files
    carry ``0.000\\0.000``) or lacks a slice thickness (a projection radiograph has none): it is
    only required with a frame of reference, and readers (highdicom included) reject it."""
    shared = seg.SharedFunctionalGroupsSequence[0]
    if "PixelMeasuresSequence" not in shared:
        return
    item = shared.PixelMeasuresSequence[0]
    spacing = [float(v) for v in item.get("PixelSpacing", [])]
    if "SliceThickness" not in item or not (spacing and all(v > 0 for v in spacing)):
        del shared.PixelMeasuresSequence


def read_dicom_seg(path: str | os.PathLike) -> tuple[np.ndarray, str]:
    """A single-frame binary SEG -> (bool mask ``[H, W]``, referenced source SOP instance UID)."""
    import highdicom as hd

    seg = hd.seg.segread(str(path))
    frames = np.asarray(seg.pixel_array)
    if frames.ndim == 2:
        frames = frames[None]
    ref = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    uid = str(ref.SourceImageSequence[0].ReferencedSOPInstanceUID)
    return frames.any(axis=0), uid


def _is_dicom(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def safe_stem(path: str) -> str:
    """A file-name-safe stem of ``path`` (``scan.nii.gz`` -> ``scan``)."""
    name = Path(path).name
    for suffix in (".nii.gz", ".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".nii", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "image"


class SegmentationWriter:
    """Evaluator handler that writes each segmented image's outputs (see :mod:`segmentation.infer`
    for the item layout: ``seg`` bool ``[H, W]``, ``quality`` dict, ``image`` with its meta).

    Under ``output_dir``: ``masks/<stem>.png`` and/or ``masks/<stem>.nii.gz``,
    ``seg/<stem>.dcm`` (DICOM SEG, DICOM sources only), ``overlays/<stem>.png``, and at the end
    ``quality.csv`` + ``quality.json`` with one row per image (path, area, components, balance,
    confidence, flags, ok).

    Args:
        output_dir: where to write.
        formats: any of ``"png"``, ``"nifti"``, ``"dicom_seg"``.
        overlay: also write the overlay preview.
        overlay_max_size: long side of the previews.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        formats: Sequence[str] = ("png",),
        overlay: bool = True,
        overlay_max_size: int = 768,
    ):
        unknown = set(formats) - {"png", "nifti", "dicom_seg"}
        if unknown:
            raise ValueError(f"unknown mask format(s) {sorted(unknown)}; use png, nifti, dicom_seg")
        self.output_dir = Path(output_dir)
        self.formats, self.overlay, self.overlay_max_size = (
            tuple(formats),
            overlay,
            overlay_max_size,
        )
        self.rows: list[dict[str, Any]] = []
        self._stems: set[str] = set()

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self.write_batch)
        engine.add_event_handler(Events.COMPLETED, self.write_summary)

    def _stem(self, src: str) -> str:
        stem, i = safe_stem(src), 1
        while stem in self._stems:
            i += 1
            stem = f"{safe_stem(src)}_{i}"
        self._stems.add(stem)
        return stem

    def write_item(self, src: str, mask: np.ndarray, quality: dict[str, Any], spacing=None) -> dict:
        """Write one image's outputs; return its summary row."""
        stem = self._stem(src)
        row: dict[str, Any] = {"image": src, **quality, "flags": ";".join(quality["flags"])}
        if "png" in self.formats:
            row["mask_png"] = str(write_mask_png(mask, self.output_dir / "masks" / f"{stem}.png"))
        if "nifti" in self.formats:
            row["mask_nifti"] = str(
                write_mask_nifti(
                    mask, self.output_dir / "masks" / f"{stem}.nii.gz", spacing=spacing
                )
            )
        if "dicom_seg" in self.formats and _is_dicom(src):
            row["dicom_seg"] = str(
                save_dicom_seg(mask, src, self.output_dir / "seg" / f"{stem}.dcm")
            )
        if self.overlay:
            image = load_cxr(src).pixels
            caption = "OK" if quality["ok"] else "FLAGGED: " + ", ".join(quality["flags"])
            row["overlay"] = str(
                save_overlay(
                    image,
                    mask,
                    self.output_dir / "overlays" / f"{stem}.png",
                    self.overlay_max_size,
                    caption,
                )
            )
        self.rows.append(row)
        return row

    def write_batch(self, engine) -> None:
        for item, batch in zip(engine.state.output, engine.state.batch, strict=True):
            src = str(batch["source"])
            self.write_item(src, item["seg"], item["quality"], item.get("spacing"))

    def write_summary(self, engine=None) -> Path:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        out = self.output_dir / "quality.csv"
        with open(out, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)
        (self.output_dir / "quality.json").write_text(json.dumps(self.rows, indent=2, default=str))
        return out
