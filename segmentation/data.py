"""Data for the lung U-Net: records from a manifest and the MONAI transform chains.

Images are read by :class:`cxr_io.readers.LoadCXRd` (float ``[1, H, W]`` in [0, 1], bright =
dense, MONOCHROME1 already inverted) and masks by :class:`cxr_io.readers.LoadMaskd`
(``[1, H, W]`` in {0, 1}). Both are resized to the network size; intensities are rescaled per
image between the 1st and 99th percentile, so exposure differences between sites matter less.

Augmentation is what a radiograph meets in practice: small rotations and scaling, translation,
gamma and contrast changes, noise and blur. There is deliberately no horizontal flip: the heart is
on the patient's left, and a flipped film is not a film the model will ever see.

Disease is lung: :class:`RandLungOpacityd` paints random dense consolidations and peripheral haze
*inside* the lung mask (the mask is unchanged), so the network learns that an opacity does not
move the lung border. Without it a mask with Dice 0.99 still cut dense lesions out of the lung
field (see ``benchmarks/seg_lesion_coverage.py``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    RandAdjustContrastd,
    RandAffined,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandomizableTransform,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSimulateLowResolutiond,
    Resized,
    ScaleIntensityRangePercentilesd,
    ThresholdIntensityd,
)
from monai.utils import convert_to_dst_type
from scipy import ndimage

from cxr_io.manifest import load_manifest, select, to_records
from cxr_io.readers import LoadCXRd, LoadMaskd


@dataclass(frozen=True)
class AugmentConfig:
    """Strength of the training augmentation (all probabilities per image)."""

    rotate_deg: float = 8.0
    scale: float = 0.10
    translate_fraction: float = 0.06
    prob_affine: float = 0.8
    gamma: tuple[float, float] = (0.7, 1.5)
    prob_gamma: float = 0.5
    contrast: tuple[float, float] = (-0.15, 0.15)
    prob_contrast: float = 0.5
    noise_std: float = 0.03
    prob_noise: float = 0.3
    blur_sigma: tuple[float, float] = (0.3, 1.2)
    prob_blur: float = 0.3
    prob_opacity: float = 0.5
    prob_haze: float = 0.5
    opacity_edge: float = 0.0
    #: a film of lower resolution (e.g. 64 px) as the network sees it: area-downsampled by a
    #: zoom drawn from ``lowres_zoom``, then upsampled back by nearest neighbour, the image only
    #: (the mask keeps the true lung extent). Off by default (a candidate, docs/segmentation.md).
    prob_lowres: float = 0.0
    lowres_zoom: tuple[float, float] = (0.4, 0.9)


class RandLungOpacityd(RandomizableTransform, MapTransform):
    """Paint random opacities inside the lung mask; the mask (the label) is unchanged.

    With probability ``prob`` one to ``max_blobs`` consolidations are added: soft-edged, textured
    ellipses centred on random lung pixels, radius ``radius`` (fractions of the image side),
    peak ``amplitude`` (in the [0, 1] normalised intensity, bright = dense), cut at the mask
    edge like the synthetic findings; each blob is centred on the lung's edge (pixels within
    ``edge_px`` of the mask border) with probability ``edge_prob``, where a lesion cut by the
    border is hardest to keep inside the mask (tried, not adopted: it did not raise coverage).
    With probability ``prob_haze`` (given the transform fires) a peripheral haze is added
    instead of / besides them: amplitude ``haze_amplitude`` times
    ``exp(-distance to the mask edge / (haze_width * side))`` times a smooth random field.

    Keys: ``keys`` the image(s) ``[1, H, W]`` in [0, 1]; ``mask_key`` the lung mask ``[1, H, W]``.
    Output intensities are clipped to [0, 1].
    """

    backend = [*MapTransform.backend]

    def __init__(
        self,
        keys: KeysCollection,
        mask_key: str = "mask",
        prob: float = 0.5,
        prob_haze: float = 0.5,
        edge_prob: float = 0.0,
        edge_px: int = 3,
        max_blobs: int = 3,
        radius: tuple[float, float] = (0.04, 0.13),
        amplitude: tuple[float, float] = (0.2, 0.8),
        haze_amplitude: tuple[float, float] = (0.1, 0.4),
        haze_width: tuple[float, float] = (0.06, 0.25),
    ):
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.mask_key, self.prob_haze, self.max_blobs = mask_key, prob_haze, max_blobs
        self.edge_prob, self.edge_px = edge_prob, edge_px
        self.radius, self.amplitude = radius, amplitude
        self.haze_amplitude, self.haze_width = haze_amplitude, haze_width

    def _texture(self, shape: tuple[int, int], cells: int) -> np.ndarray:
        """Smooth random field ``shape`` with values around 0 (std about 1)."""
        low = self.R.standard_normal((cells, cells)).astype(np.float32)
        return ndimage.zoom(low, (shape[0] / cells, shape[1] / cells), order=3)[
            : shape[0], : shape[1]
        ]

    def opacity(self, lung: np.ndarray) -> np.ndarray:
        """Density ``[H, W]`` float32 to add inside bool ``lung`` ``[H, W]`` (zero outside)."""
        h, w = lung.shape
        side = float(max(h, w))
        out = np.zeros((h, w), dtype=np.float32)
        rows, cols = np.nonzero(lung)
        edge = lung & ~ndimage.binary_erosion(lung, iterations=self.edge_px)
        e_rows, e_cols = np.nonzero(edge)
        if rows.size == 0:
            return out
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        tex = self._texture((h, w), 8)
        haze = self.R.random() < self.prob_haze
        n_blobs = int(self.R.randint(0 if haze else 1, self.max_blobs + 1))
        for _ in range(n_blobs):
            if self.edge_prob > 0 and e_rows.size and self.R.random() < self.edge_prob:
                k = int(self.R.randint(e_rows.size))
                cy, cx = e_rows[k], e_cols[k]
            else:
                k = int(self.R.randint(rows.size))
                cy, cx = rows[k], cols[k]
            r = self.R.uniform(*self.radius) * side
            e = self.R.uniform(0.7, 1.3)
            d = np.sqrt(((xx - cx) / (r * e)) ** 2 + ((yy - cy) * e / r) ** 2)
            blob = np.clip(1.0 - (d * (1.0 + 0.2 * tex)) ** 2, 0.0, 1.0) ** 1.5
            amp = self.R.uniform(*self.amplitude)
            out = np.maximum(out, amp * blob * (0.85 + 0.15 * np.clip(tex, -2, 2)))
        if haze:
            dist = ndimage.distance_transform_edt(lung).astype(np.float32)
            width = self.R.uniform(*self.haze_width) * side
            field = 1.0 / (1.0 + np.exp(-(self._texture((h, w), 6) + 0.3) / 0.35))
            amp = self.R.uniform(*self.haze_amplitude)
            out = np.maximum(out, amp * field * np.exp(-dist / width))
        return (out * lung).astype(np.float32)

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        mask = np.asarray(
            d[self.mask_key].detach().cpu()
            if hasattr(d[self.mask_key], "detach")
            else d[self.mask_key]
        )
        lung = mask.reshape(mask.shape[-2:]) > 0.5
        add = self.opacity(lung)
        for key in self.key_iterator(d):
            img = d[key]
            arr = np.asarray(img.detach().cpu() if hasattr(img, "detach") else img)
            new = np.clip(arr + add.reshape((1,) * (arr.ndim - 2) + add.shape), 0.0, 1.0)
            d[key] = convert_to_dst_type(new.astype(arr.dtype), img)[0]
        return d


def spacing_from_meta(meta: dict[str, Any]) -> tuple[float, float] | None:
    """``(row_mm, col_mm)`` from a CXR meta dict (collated or not), or ``None`` when unknown."""
    value = meta.get("spacing") if meta else None
    if value is None or isinstance(value, str):
        return None
    try:
        vals = [float(np.asarray(v).reshape(-1)[0]) for v in value]
    except (TypeError, ValueError, IndexError):
        return None
    if len(vals) != 2 or not all(math.isfinite(v) and v > 0 for v in vals):
        return None
    return (vals[0], vals[1])


def load_transforms(with_mask: bool) -> list:
    """Readers: ``image`` (and ``mask``) -> ``MetaTensor [1, H, W]`` float32.

    The reader's meta is collatable (unknown spacing is ``(nan, nan)``, not ``None``)."""
    ts: list = [LoadCXRd(keys="image")]
    if with_mask:
        ts.append(LoadMaskd(keys="mask"))
    return ts


def resize_normalise(spatial_size: Sequence[int], with_mask: bool) -> list:
    """Resize to the network size and rescale intensities (1st-99th percentile -> [0, 1])."""
    ts: list = [
        Resized(keys="image", spatial_size=tuple(spatial_size), mode="area"),
        ScaleIntensityRangePercentilesd(
            keys="image", lower=1, upper=99, b_min=0.0, b_max=1.0, clip=True
        ),
    ]
    if with_mask:
        ts.append(Resized(keys="mask", spatial_size=tuple(spatial_size), mode="nearest"))
    return ts


def augmentations(cfg: AugmentConfig, spatial_size: Sequence[int], with_mask: bool = True) -> list:
    """Random transforms a radiograph meets in practice (no horizontal flip), plus opacities
    painted inside the lung mask (:class:`RandLungOpacityd`, only ``with_mask``).

    Applied after resizing, so translations are ``translate_fraction`` of ``spatial_size``.
    """
    keys = ["image", "mask"] if with_mask else ["image"]
    modes = ["bilinear", "nearest"] if with_mask else ["bilinear"]
    rot = math.radians(cfg.rotate_deg)
    opacity: list = []
    if with_mask and cfg.prob_opacity > 0:
        opacity = [
            RandLungOpacityd(
                keys="image",
                prob=cfg.prob_opacity,
                prob_haze=cfg.prob_haze,
                edge_prob=cfg.opacity_edge,
            )
        ]
    lowres: list = []
    if cfg.prob_lowres > 0:
        lowres = [
            RandSimulateLowResolutiond(
                keys="image",
                prob=cfg.prob_lowres,
                downsample_mode="area",
                upsample_mode="nearest",
                zoom_range=cfg.lowres_zoom,
            )
        ]
    return [
        RandAffined(
            keys=keys,
            prob=cfg.prob_affine,
            rotate_range=(rot,),
            scale_range=(cfg.scale, cfg.scale),
            translate_range=tuple(cfg.translate_fraction * s for s in spatial_size),
            mode=modes,
            padding_mode="zeros",
        ),
        *opacity,
        *lowres,
        RandAdjustContrastd(keys="image", prob=cfg.prob_gamma, gamma=cfg.gamma),
        RandScaleIntensityd(keys="image", factors=cfg.contrast, prob=cfg.prob_contrast),
        RandShiftIntensityd(keys="image", offsets=0.05, prob=cfg.prob_contrast),
        RandGaussianNoised(keys="image", prob=cfg.prob_noise, std=cfg.noise_std),
        RandGaussianSmoothd(
            keys="image", prob=cfg.prob_blur, sigma_x=cfg.blur_sigma, sigma_y=cfg.blur_sigma
        ),
        ThresholdIntensityd(keys="image", threshold=0.0, above=True, cval=0.0),
        ThresholdIntensityd(keys="image", threshold=1.0, above=False, cval=1.0),
    ]


def train_transforms(
    spatial_size: Sequence[int] = (256, 256), augment: AugmentConfig | None = None
) -> Compose:
    """Training chain: load image + mask, resize, normalise, augment.

    Output dict: ``image`` float ``[1, H, W]`` in [0, 1], ``mask`` float ``[1, H, W]`` in {0, 1}.
    """
    ts = load_transforms(True) + resize_normalise(spatial_size, True)
    ts += augmentations(augment or AugmentConfig(), spatial_size)
    ts.append(EnsureTyped(keys=["image", "mask"], track_meta=False))
    return Compose(ts)


def val_transforms(spatial_size: Sequence[int] = (256, 256)) -> Compose:
    """Validation chain: load image + mask, resize, normalise (no randomness)."""
    ts = load_transforms(True) + resize_normalise(spatial_size, True)
    ts.append(EnsureTyped(keys=["image", "mask"], track_meta=False))
    return Compose(ts)


def infer_transforms(spatial_size: Sequence[int] = (256, 256)) -> Compose:
    """Inference chain: load the image, resize, normalise; the resize is recorded so
    :class:`monai.transforms.Invertd` can bring predictions back to the original size."""
    return Compose(load_transforms(False) + resize_normalise(spatial_size, False))


def seg_records(
    manifest: str | os.PathLike,
    *,
    splits: Sequence[str] | None = None,
    sites: Sequence[str] | None = None,
    require_mask: bool = True,
) -> list[dict[str, Any]]:
    """Data dicts (``image``, ``mask``, ``site``, ...) for the selected manifest rows.

    Raises:
        ValueError: when no row is selected, or (``require_mask``) a selected row has no mask.
    """
    df = load_manifest(manifest, check_mask_sizes=False)
    df = select(df, sites=sites, splits=splits)
    if df.empty:
        raise ValueError(
            f"{manifest}: no rows with split in {list(splits) if splits else 'any'} and site in "
            f"{list(sites) if sites else 'any'}; check the manifest's split/site columns"
        )
    if require_mask:
        missing = [str(p) for p, m in zip(df["image"], df["mask"], strict=True) if not m]
        if missing:
            raise ValueError(
                f"{manifest}: {len(missing)} selected row(s) have no lung mask (first: "
                f"{missing[0]}); a segmentation set needs a mask for every image"
            )
    return to_records(df)


def manifest_path(dataset_dir: str | os.PathLike, manifest: str | None = None) -> Path:
    """The dataset's manifest: ``manifest`` when given, else ``<dataset_dir>/manifest.csv``."""
    path = Path(manifest) if manifest else Path(dataset_dir) / "manifest.csv"
    if not path.is_file():
        raise FileNotFoundError(
            f"no manifest at {path}: pass --dataset_dir pointing at a folder with manifest.csv "
            "(e.g. from `isnet-cxr data synth`) or set --manifest"
        )
    return path
