"""MONAI datasets and transforms for classification, built from manifest records.

A record is a dict from :func:`cxr_io.manifest.to_records`: ``image`` (path), ``label`` (int
index), ``mask`` (path, optional) and string columns. Only ``image``, ``label`` and ``mask`` enter
the dataset (no patient identifiers travel with the batches). After the transforms a sample is
``{"image": [1, S, S] float32 in [0, 1], "mask": [1, S, S] float32 in {0, 1}, "label": long []}``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from monai.data import CacheDataset, DataLoader, Dataset, get_track_meta, set_track_meta
from monai.transforms import (
    Compose,
    EnsureTyped,
    Lambdad,
    RandAdjustContrastd,
    RandAffined,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Resized,
)

from classification.inputs import resize_mask
from cxr_io.readers import LoadCXRd, LoadMaskd

__all__ = [
    "AUGMENT_POLICIES",
    "GAMMA_SUFFIX",
    "AugmentConfig",
    "build_dataset",
    "build_loader",
    "build_transforms",
    "clean_records",
    "plain_tensors",
]

KEEP_KEYS = ("image", "mask", "label")


AUGMENT_POLICIES = ("none", "intensity", "geometric", "full")
#: appended to a policy name (``intensity+gamma``, ``full+gamma``): a random contrast gamma too
GAMMA_SUFFIX = "+gamma"


@dataclass(frozen=True)
class AugmentConfig:
    """Light geometric + intensity augmentation, applied identically to image and mask.

    ``rotate_deg``: max rotation in degrees; ``scale``: max relative zoom; ``translate``: max shift
    as a fraction of the side; ``intensity``: max relative scale / absolute shift of intensities;
    ``gamma``: a random contrast curve ``x ** g`` (on the image's own min-max range, MONAI
    ``RandAdjustContrastd``) with ``g`` uniform in ``[2 ** -gamma, 2 ** gamma]``, a monotone
    non-linear change of the acquisition's intensity curve that a scale and shift cannot make.
    A part whose magnitudes are all 0 is left out of the transform chain. The default is the
    ``full`` policy (geometric + intensity); see :meth:`from_policy`.
    """

    prob: float = 0.8
    rotate_deg: float = 5.0
    scale: float = 0.05
    translate: float = 0.04
    intensity: float = 0.1
    gamma: float = 0.0

    @property
    def geometric(self) -> bool:
        """Whether the affine (rotation / zoom / shift) part is on."""
        return self.rotate_deg > 0 or self.scale > 0 or self.translate > 0

    @classmethod
    def from_policy(cls, policy: str) -> AugmentConfig | None:
        """A named policy: ``none`` (None: no random transform), ``intensity`` (intensity scale
        and shift only), ``geometric`` (rotation / zoom / shift only) or ``full`` (both); any of
        them with :data:`GAMMA_SUFFIX` adds a random gamma in ``[0.5, 2]`` (``gamma=1``)."""
        key = str(policy).lower()
        base = key.removesuffix(GAMMA_SUFFIX)
        gamma = 1.0 if base != key else 0.0
        if base == "none":
            if not gamma:
                return None
            return cls(rotate_deg=0.0, scale=0.0, translate=0.0, intensity=0.0, gamma=gamma)
        if base == "intensity":
            return cls(rotate_deg=0.0, scale=0.0, translate=0.0, gamma=gamma)
        if base == "geometric":
            return cls(intensity=0.0, gamma=gamma)
        if base == "full":
            return cls(gamma=gamma)
        raise ValueError(
            f"unknown augmentation policy {policy!r}; choose one of {AUGMENT_POLICIES}, "
            f"each optionally with {GAMMA_SUFFIX!r}"
        )


def clean_records(records: Sequence[dict[str, Any]], *, need_masks: bool) -> list[dict[str, Any]]:
    """Keep ``image``, ``label`` and ``mask`` of each record; check masks when they are needed.

    Raises:
        ValueError: a record lacks ``image``/``label``, or ``need_masks`` and a record has no mask
            (the message names the image and what to do).
    """
    out = []
    for i, rec in enumerate(records):
        if "image" not in rec or "label" not in rec:
            raise ValueError(f"record {i} has no 'image' or 'label' key: {sorted(rec)}")
        mask = rec.get("mask") or ""
        if need_masks and not mask:
            raise ValueError(
                f"record {i} (image {rec['image']}) has no lung mask, but this method trains with "
                "masks; add a 'mask' column to the manifest (e.g. with the segmentation model)"
            )
        item = {"image": rec["image"], "label": int(rec["label"])}
        if mask:
            item["mask"] = mask
        out.append(item)
    if need_masks is False and any("mask" in r for r in out) and not all("mask" in r for r in out):
        # mixed: drop masks so every sample has the same keys (collation needs it)
        out = [{k: v for k, v in r.items() if k != "mask"} for r in out]
    return out


def build_transforms(
    size: int, *, with_mask: bool, augment: AugmentConfig | None = None
) -> Compose:
    """Loading, resizing to ``size x size`` and optional augmentation.

    Image: read by :class:`cxr_io.readers.LoadCXRd` (DICOM/PNG/... to ``[1, H, W]`` in [0, 1]),
    resized with area interpolation. Mask: :class:`cxr_io.readers.LoadMaskd`, resized by
    :func:`classification.inputs.resize_mask` (a pixel is lung if any part of it is; stays
    binary), as at inference. The affine augmentation draws one transform per sample and applies
    it to both (bilinear for the image, nearest for the mask), zero padding outside.
    """

    keys = ["image", "mask"] if with_mask else ["image"]
    xs: list[Any] = [LoadCXRd(keys=["image"])]
    if with_mask:
        xs.append(LoadMaskd(keys=["mask"]))
    # plain tensors from here on: no per-sample metadata (file names) travels with the batches,
    # and the spatial transforms need no affine bookkeeping
    xs.append(EnsureTyped(keys=keys, dtype=torch.float32, track_meta=False))
    xs.append(Resized(keys=["image"], spatial_size=(size, size), mode="area"))
    if with_mask:
        xs.append(Lambdad(keys=["mask"], func=partial(resize_mask, size=size)))
    if augment is not None and augment.geometric:
        a = augment
        xs.append(
            RandAffined(
                keys=keys,
                prob=a.prob,
                rotate_range=(a.rotate_deg * torch.pi / 180.0,),
                scale_range=(a.scale, a.scale),
                translate_range=(a.translate * size, a.translate * size),
                mode=["bilinear", "nearest"][: len(keys)],
                padding_mode="zeros",
                spatial_size=(size, size),
                cache_grid=True,  # the same output, the sampling grid built once
            )
        )
    if augment is not None and augment.gamma > 0:
        g = 2.0**augment.gamma
        xs.append(RandAdjustContrastd(keys=["image"], prob=augment.prob, gamma=(1.0 / g, g)))
    if augment is not None and augment.intensity > 0:
        a = augment
        xs.append(RandScaleIntensityd(keys=["image"], factors=a.intensity, prob=a.prob))
        xs.append(RandShiftIntensityd(keys=["image"], offsets=a.intensity, prob=a.prob))
        xs.append(Lambdad(keys=["image"], func=partial(torch.clamp, min=0.0, max=1.0)))
    xs.append(EnsureTyped(keys=keys, dtype=torch.float32, track_meta=False))
    xs.append(EnsureTyped(keys=["label"], dtype=torch.long, track_meta=False))
    return Compose(xs)


@contextmanager
def plain_tensors() -> Iterator[None]:
    """Inside: MONAI transforms compute on plain ``torch.Tensor`` s, not ``MetaTensor`` s (MONAI's
    ``set_track_meta(False)``; the previous setting is restored on exit). The samples already
    leave the chain as plain tensors (:func:`build_transforms`); this only spares the
    per-sample metadata bookkeeping inside the chain (about half the cost of ``RandAffined``),
    with the same numbers (tests/test_train.py)."""
    before = get_track_meta()
    set_track_meta(False)
    try:
        yield
    finally:
        set_track_meta(before)


def build_dataset(
    records: Sequence[dict[str, Any]],
    size: int,
    *,
    need_masks: bool = False,
    augment: AugmentConfig | None = None,
    cache: bool = False,
) -> Dataset:
    """A MONAI ``Dataset`` (or ``CacheDataset`` with ``cache=True``, caching up to the first random
    transform) of cleaned records; masks are loaded when every record has one."""
    recs = clean_records(records, need_masks=need_masks)
    if not recs:
        raise ValueError("no records to build a dataset from (empty split?)")
    with_mask = all("mask" in r for r in recs)
    xform = build_transforms(size, with_mask=with_mask, augment=augment)
    if cache:
        return CacheDataset(recs, transform=xform, progress=False, num_workers=0)
    return Dataset(recs, transform=xform)


def build_loader(
    dataset: Dataset, batch_size: int, *, shuffle: bool, num_workers: int = 0
) -> DataLoader:
    """A MONAI ``DataLoader`` (its random transforms are seeded from torch's generator, so
    :func:`monai.utils.set_determinism` makes epochs repeatable)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers)
