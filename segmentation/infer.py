"""Inference: network probabilities -> a clean lung mask at the original size + quality flags.

Steps per image: resize to the network size (preprocessing), sigmoid, resize the probability map
back to the original size (:class:`monai.transforms.Invertd`), threshold, keep the two largest
connected components, fill holes, optionally dilate by a margin in millimetres (only when the
pixel spacing is known), then measure quality (:func:`assess_quality`).

A mask outside plausible ranges is flagged (``flags``, ``ok=False``), never silently passed on.
All thresholds live in :class:`QualityThresholds` and :class:`PostprocessConfig`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedEvaluator
from monai.inferers import SimpleInferer
from monai.transforms import Activationsd, Compose, Invertd, MapTransform
from scipy import ndimage

from cxr_io.manifest import load_manifest
from segmentation.data import infer_transforms, spacing_from_meta
from segmentation.lung_field import (
    FieldEstimateConfig,
    base_gaps,
    estimate_lung_fields,
    field_agreement,
    resize_mask,
)
from segmentation.model import SegModelSpec, load_seg_model


@dataclass(frozen=True)
class PostprocessConfig:
    """How probabilities become a mask.

    Attributes:
        threshold: probability above which a pixel is lung.
        keep_components: how many of the largest connected components to keep (2 lungs).
        min_component_ratio: a kept component smaller than this fraction of the largest is
            dropped (a speck is not a lung).
        fill_holes: fill holes inside each kept component.
        margin_mm: dilate the mask by this many millimetres when the spacing is known (0: off).
    """

    threshold: float = 0.5
    keep_components: int = 2
    min_component_ratio: float = 0.1
    fill_holes: bool = True
    margin_mm: float = 0.0


@dataclass(frozen=True)
class QualityThresholds:
    """Plausible ranges for a frontal chest radiograph's lung mask.

    Attributes:
        min_area_fraction, max_area_fraction: lung area / image area.
        expected_components: the number of lungs.
        min_lr_balance: smaller / larger lung area (the left lung is smaller, not tiny).
        min_confidence: mean predicted probability inside the mask.
        max_height_fraction: vertical extent of the mask / image height; lung fields do not run
            from the top to the bottom of a chest film (a limb film's air columns do).
        max_raw_components: significant components before post-processing (more = fragmented).
        raw_component_fraction: a raw component counts as significant above this image fraction.
        min_field_coverage: the mask must cover at least this fraction of the image-based lung
            field estimate on each side where that estimate is credible
            (:mod:`segmentation.lung_field`; only when the image is given).
        max_outside_body: at most this fraction of the mask may lie outside the body (in the
            film's background air, found from the image alone).
        max_base_gap: (image left, image right) lung: its lowest row may sit at most this
            fraction of the pair's height above the other lung's base (just above the largest
            value in 434 real lung-mask pairs: 0.28 and 0.20).
    """

    min_area_fraction: float = 0.08
    max_area_fraction: float = 0.55
    expected_components: int = 2
    min_lr_balance: float = 0.35
    min_confidence: float = 0.85
    max_height_fraction: float = 0.9
    max_raw_components: int = 4
    raw_component_fraction: float = 0.002
    min_field_coverage: float = 0.55
    max_outside_body: float = 0.3
    max_base_gap: tuple[float, float] = (0.3, 0.2)


@dataclass
class QualityReport:
    """Measurements and flags of one mask; ``ok`` is False when any flag fired.

    ``field_coverage``: the lowest per-side fraction of the image-based lung-field estimate
    inside the mask (``nan`` without an image or a credible estimate); ``outside_body``: the
    fraction of the mask in the film's background air (``nan`` without an image);
    ``base_gap_ratio``: the larger of each lung's base gap / its limit (> 1 flags
    ``lung_base_high``; ``nan`` without two sides).
    """

    area_fraction: float
    n_components: int
    n_raw_components: int
    height_fraction: float
    lr_balance: float
    mean_confidence: float
    flags: list[str] = field(default_factory=list)
    field_coverage: float = float("nan")
    outside_body: float = float("nan")
    base_gap_ratio: float = float("nan")

    @property
    def ok(self) -> bool:
        return not self.flags

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Label 8-connected components; return (labels ``[H, W]``, sizes indexed by label - 1)."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    return labels, sizes


def postprocess_mask(
    prob: np.ndarray,
    cfg: PostprocessConfig = PostprocessConfig(),
    spacing: tuple[float, float] | None = None,
) -> np.ndarray:
    """Probability map ``[H, W]`` -> bool mask ``[H, W]``.

    Threshold, keep the ``keep_components`` largest components (dropping ones smaller than
    ``min_component_ratio`` of the largest), fill holes, dilate by ``margin_mm`` when ``spacing``
    ``(row_mm, col_mm)`` is known.
    """
    mask = np.asarray(prob) > cfg.threshold
    labels, sizes = _components(mask)
    if sizes.size:
        order = np.argsort(sizes)[::-1][: cfg.keep_components]
        keep = [i + 1 for i in order if sizes[i] >= cfg.min_component_ratio * sizes[order[0]]]
        mask = np.isin(labels, keep)
    if cfg.fill_holes:
        labels, sizes = _components(mask)
        filled = np.zeros_like(mask)
        for i in range(1, sizes.size + 1):  # per component, so the gap between lungs stays open
            filled |= ndimage.binary_fill_holes(labels == i)
        mask = filled
    if cfg.margin_mm > 0 and spacing is not None and mask.any():
        dist = ndimage.distance_transform_edt(~mask, sampling=spacing)
        mask = dist <= cfg.margin_mm
    return mask


def assess_quality(
    mask: np.ndarray,
    prob: np.ndarray | None = None,
    thresholds: QualityThresholds = QualityThresholds(),
    raw_mask: np.ndarray | None = None,
    image: np.ndarray | None = None,
    field_cfg: FieldEstimateConfig = FieldEstimateConfig(),
) -> QualityReport:
    """Measure a lung mask ``[H, W]`` (bool) and flag implausible ones.

    Args:
        mask: the final mask.
        prob: the probability map ``[H, W]`` it came from (``None``: confidence taken as 1).
        thresholds: plausible ranges.
        raw_mask: the thresholded mask before post-processing, for the fragmentation count.
        image: the film ``[h, w]`` at any (working) size, e.g. the network input; when given
            and not larger than the mask, the mask (resized to it) is compared with an
            image-based lung-field estimate
            (:func:`segmentation.lung_field.estimate_lung_fields`).
        field_cfg: parameters of that estimate.

    Flags: ``empty``, ``area_low``, ``area_high``, ``components_<n>`` (not two lungs),
    ``lr_imbalance``, ``lungs_same_side``, ``extent_high``, ``fragmented``, ``low_confidence``,
    ``lung_base_high`` (one lung's base far above the other's), ``lung_field_mismatch`` (the
    mask misses much of the image-based estimate on one side, or lies partly outside the body).
    """
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    area = float(mask.sum()) / float(h * w)
    labels, sizes = _components(mask)
    n = int(sizes.size)
    raw = mask if raw_mask is None else np.asarray(raw_mask, dtype=bool)
    _, raw_sizes = _components(raw)
    n_raw = int((raw_sizes >= thresholds.raw_component_fraction * h * w).sum())
    rows = np.nonzero(mask.any(axis=1))[0]
    height = float(rows[-1] - rows[0] + 1) / h if rows.size else 0.0
    conf = float(np.asarray(prob)[mask].mean()) if (prob is not None and mask.any()) else 1.0
    if not mask.any():
        conf = 0.0

    balance = 0.0
    same_side = False
    if n >= 2:
        top2 = np.argsort(sizes)[::-1][:2]
        balance = float(sizes[top2[1]] / sizes[top2[0]])
        cols = [np.nonzero(labels == i + 1)[1].mean() for i in top2]
        same_side = (cols[0] < w / 2) == (cols[1] < w / 2)

    flags: list[str] = []
    if not mask.any():
        flags.append("empty")
    elif area < thresholds.min_area_fraction:
        flags.append("area_low")
    elif area > thresholds.max_area_fraction:
        flags.append("area_high")
    if mask.any() and n != thresholds.expected_components:
        flags.append(f"components_{n}")
    if n >= 2 and balance < thresholds.min_lr_balance:
        flags.append("lr_imbalance")
    if n >= 2 and same_side:
        flags.append("lungs_same_side")
    if height > thresholds.max_height_fraction:
        flags.append("extent_high")
    if n_raw > thresholds.max_raw_components:
        flags.append("fragmented")
    if mask.any() and conf < thresholds.min_confidence:
        flags.append("low_confidence")
    scale = min(1.0, 256.0 / max(h, w))  # the gaps are fractions: 256 px are plenty
    small = resize_mask(mask, (max(1, round(h * scale)), max(1, round(w * scale))))
    gap = float(np.max(np.divide(base_gaps(small), thresholds.max_base_gap)))
    if gap > 1.0:
        flags.append("lung_base_high")
    coverage, outside = _field_check(mask, image, field_cfg)
    if coverage < thresholds.min_field_coverage or outside > thresholds.max_outside_body:
        flags.append("lung_field_mismatch")
    return QualityReport(
        area_fraction=area,
        n_components=n,
        n_raw_components=n_raw,
        height_fraction=height,
        lr_balance=balance,
        mean_confidence=conf,
        flags=flags,
        field_coverage=coverage,
        outside_body=outside,
        base_gap_ratio=gap,
    )


def _field_check(
    mask: np.ndarray, image: np.ndarray | None, cfg: FieldEstimateConfig
) -> tuple[float, float]:
    """(lowest per-side coverage of the image-based estimate, fraction of the mask outside the
    body); ``nan`` where not measurable (no image, empty mask, no credible estimate)."""
    if image is None or not mask.any():
        return float("nan"), float("nan")
    img = np.asarray(image, dtype=np.float32)
    img = img.reshape(img.shape[-2:])
    if mask.shape[0] < img.shape[0] or mask.shape[1] < img.shape[1]:
        # a film smaller than the working image was upsampled: its chest wall and lungs blur
        # together (64 px phantoms), the estimate is not trustworthy
        return float("nan"), float("nan")
    agreement = field_agreement(resize_mask(mask, img.shape), estimate_lung_fields(img, cfg))
    cov = [c for c in agreement.coverage if not np.isnan(c)]
    return (min(cov) if cov else float("nan")), agreement.outside_body


class LungPostprocessd(MapTransform):
    """Dict transform on one decollated item: ``prob_key`` (``[1, H, W]`` probabilities at the
    original size) -> ``mask_key`` (bool ``[H, W]`` numpy) and ``"quality"`` (a dict from
    :meth:`QualityReport.to_dict`). The spacing is read from ``meta_key``'s meta."""

    def __init__(
        self,
        prob_key: str = "pred",
        mask_key: str = "seg",
        meta_key: str = "image",
        post: PostprocessConfig | None = None,
        thresholds: QualityThresholds | None = None,
    ):
        super().__init__(keys=prob_key)
        self.prob_key, self.mask_key, self.meta_key = prob_key, mask_key, meta_key
        self.post = post or PostprocessConfig()
        self.thresholds = thresholds or QualityThresholds()

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        d = dict(data)
        prob = d[self.prob_key]
        prob = prob.detach().cpu().numpy() if isinstance(prob, torch.Tensor) else np.asarray(prob)
        prob = prob.reshape(prob.shape[-2:]).astype(np.float32)
        spacing = spacing_from_meta(getattr(d.get(self.meta_key), "meta", {}))
        no_margin = PostprocessConfig(**{**asdict(self.post), "margin_mm": 0.0})
        core = postprocess_mask(prob, no_margin)
        mask = postprocess_mask(prob, self.post, spacing) if self.post.margin_mm > 0 else core
        image = d.get(self.meta_key)
        image = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image
        q = assess_quality(
            core, prob, self.thresholds, raw_mask=prob > self.post.threshold, image=image
        )
        d[self.mask_key] = mask
        d["prob"] = prob
        d["quality"] = q.to_dict()
        d["spacing"] = spacing
        return d


def infer_postprocessing(
    preprocessing: Compose,
    post: PostprocessConfig | None = None,
    thresholds: QualityThresholds | None = None,
) -> Compose:
    """Sigmoid -> back to the original size -> :class:`LungPostprocessd`."""
    return Compose(
        [
            Activationsd(keys="pred", sigmoid=True),
            Invertd(
                keys="pred",
                transform=preprocessing,
                orig_keys="image",
                nearest_interp=False,
                to_tensor=True,
            ),
            LungPostprocessd(post=post, thresholds=thresholds),
        ]
    )


@dataclass
class SegResult:
    """One image's segmentation: the bool mask ``[H, W]`` at the original size, the probability
    map ``[H, W]``, its quality report and the source path."""

    image: str
    mask: np.ndarray
    prob: np.ndarray
    quality: QualityReport
    spacing: tuple[float, float] | None = None


class ResultCollector:
    """Evaluator handler that keeps every item's result (or hands it to ``sink``).

    ``sink(result: SegResult)`` is called per image in data order; without a sink, results are
    kept in :attr:`results` (fine for a handful of images, not for a large batch run).
    """

    def __init__(self, sink=None, keep: bool | None = None):
        self.sink = sink
        self.keep = sink is None if keep is None else keep
        self.results: list[SegResult] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine) -> None:
        # inputs that are not network outputs (``source``) stay in the decollated batch
        for item, batch in zip(engine.state.output, engine.state.batch, strict=True):
            q = item["quality"]
            report = QualityReport(
                **{k: v for k, v in q.items() if k != "ok"},
            )
            src = str(batch.get("source", ""))
            res = SegResult(
                image=src,
                mask=item["seg"],
                prob=item["prob"],
                quality=report,
                spacing=item.get("spacing"),
            )
            if self.sink is not None:
                self.sink(res)
            if self.keep:
                self.results.append(res)


IMAGE_SUFFIXES = (".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".nii", ".nii.gz", ".mha")


def list_images(dataset: str | os.PathLike) -> list[dict[str, str]]:
    """Inference data dicts ``{"image": path, "source": path}`` for ``dataset``.

    ``dataset`` may be a manifest CSV, a folder holding ``manifest.csv`` (its ``image`` column is
    used, so mask files beside the images are not segmented), a folder of images (searched
    recursively, sorted), or a single image file.

    Raises:
        FileNotFoundError: when nothing is found.
    """

    path = Path(dataset)
    if path.is_dir() and (path / "manifest.csv").is_file():
        path = path / "manifest.csv"
    if path.is_file() and path.suffix.lower() == ".csv":
        files = list(load_manifest(path, check_mask_sizes=False)["image"])
    elif path.is_file():
        files = [str(path)]
    elif path.is_dir():
        files = sorted(
            str(p)
            for p in path.rglob("*")
            if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES)
        )
    else:
        files = []
    if not files:
        raise FileNotFoundError(
            f"no images found at {dataset}: give a manifest CSV, a folder with manifest.csv, "
            f"a folder of images ({', '.join(IMAGE_SUFFIXES)}) or one image file"
        )
    return [{"image": f, "source": f} for f in files]


def build_infer_evaluator(
    network: torch.nn.Module,
    data: Sequence[dict[str, Any]],
    spatial_size: Sequence[int],
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 4,
    num_workers: int = 0,
    post: PostprocessConfig | None = None,
    thresholds: QualityThresholds | None = None,
    handlers: Sequence[Any] = (),
) -> SupervisedEvaluator:
    """A MONAI evaluator that segments ``data`` (dicts with ``image`` and ``source`` paths).

    Data loading runs in ``num_workers`` DataLoader processes, overlapped with the network.
    """
    pre = infer_transforms(spatial_size)
    loader = DataLoader(
        Dataset(list(data), transform=pre),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
    )
    return SupervisedEvaluator(
        device=torch.device(device),
        val_data_loader=loader,
        network=network,
        inferer=SimpleInferer(),
        postprocessing=infer_postprocessing(pre, post, thresholds),
        val_handlers=list(handlers),
        amp=False,
    )


def predict_files(
    images: Sequence[str | os.PathLike],
    ckpt: str | os.PathLike,
    *,
    spec: SegModelSpec | None = None,
    device: str = "cpu",
    batch_size: int = 4,
    num_workers: int = 0,
    post: PostprocessConfig | None = None,
    thresholds: QualityThresholds | None = None,
    sink=None,
) -> list[SegResult]:
    """Segment image files (DICOM, PNG, ...) with checkpoint ``ckpt``.

    Returns the results in input order (empty when ``sink`` is given: each result is handed to
    ``sink`` instead, so a large batch does not pile up in memory).
    """
    net, spec = load_seg_model(ckpt, spec, device)
    collector = ResultCollector(sink=sink)
    ev = build_infer_evaluator(
        net,
        [{"image": str(Path(p)), "source": str(Path(p))} for p in images],
        spec.spatial_size,
        device=device,
        batch_size=batch_size,
        num_workers=num_workers,
        post=post,
        thresholds=thresholds,
        handlers=[collector],
    )
    ev.run()
    return collector.results
