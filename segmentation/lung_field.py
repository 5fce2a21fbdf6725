"""An independent, network-free estimate of the lung fields, and checks of a mask against it.

Two cheap checks (numpy/scipy/scikit-image on the network's working-size image, about 128 px),
used by :func:`segmentation.infer.assess_quality`:

1. **Image estimate** (:func:`estimate_lung_fields`): smooth the image, call the dark region
   connected to the film border "outside the body", erode the body by a margin (the chest wall,
   arms and shoulders lie there), threshold the body at its Otsu level (lung fields are the large
   dark regions inside it), then keep per side of the body's midline the dark component that lies
   best where a lung lies (weighted by a broad prior centred half-way down the film, a fifth of the
   width from the midline), and take its convex hull (ribs and vessels filled). The estimate
   is "credible" on a side when it is not tiny, its centre row lies in the middle part of the
   film (shoulder soft tissue, picked on some paediatric films, lies at the top), it fills most of
   its hull, stays on its side and does not run along the body's edge (a leak into the chest wall).
   :func:`field_agreement` then measures, per credible side, the fraction of the estimate the
   mask covers, and the fraction of the mask that lies outside the body (a mask in the air beside
   a knee does; lungs never do).
2. **Shape statistic** (:func:`base_gaps`): the lowest row of each lung below the top of the pair's
   bounding box. In the 434 real lung-mask pairs of ``synthetic.lung_shapes`` (V7 Labs masks), the
   image-left lung (patient's right) ends at most 0.28 of the pair's height above the other lung's
   base, the image-right lung at most 0.20; a lung whose base sits far higher has lost its lower
   part.

Arrays are ``[H, W]``; the image is the network input (normalised, any range), the mask bool.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.morphology import convex_hull_image


@dataclass(frozen=True)
class FieldEstimateConfig:
    """Parameters of :func:`estimate_lung_fields` (fractions of the image side).

    Attributes:
        smooth: Gaussian sigma / image side (blurs ribs and noise).
        background: a border-connected pixel below this fraction of the image's Otsu level is
            outside the body.
        body_margin: erosion of the body / image width (chest wall, arms, shoulders).
        opening: opening of the dark region / image width (cuts thin bridges between a lung and
            the soft tissue outside the ribs).
        min_side_area: a side's estimate smaller than this image fraction is not credible.
        credible_rows: the estimate's centre row / image height must lie in this range.
        min_fill: the dark component must fill at least this fraction of its convex hull (a
            lung merged with the soft tissue outside the ribs through a thin bridge does not).
        max_cross: the hull may reach at most this fraction of the width past the midline.
        max_rim: at most this fraction of the dark component's outline may run along the edge of
            the eroded body (a lung is walled in by ribs; a region that follows the body's edge
            is the soft tissue of the chest wall or a shoulder, or a lung merged with it).
    """

    smooth: float = 0.015
    background: float = 0.5
    body_margin: float = 0.05
    opening: float = 0.008
    min_side_area: float = 0.02
    credible_rows: tuple[float, float] = (0.3, 0.7)
    min_fill: float = 0.75
    max_cross: float = 0.02
    max_rim: float = 0.2


@dataclass
class FieldEstimate:
    """The estimate: ``sides[k]`` bool ``[H, W]`` (k = 0 image left, 1 image right),
    ``credible[k]``, the body's midline column ``mid`` and the body itself (bool ``[H, W]``:
    all but the dark region connected to the film border)."""

    sides: tuple[np.ndarray, np.ndarray]
    credible: tuple[bool, bool]
    mid: float
    body: np.ndarray


def _frame(h: int, w: int) -> np.ndarray:
    """Bool ``[h, w]``, True on the outermost pixel ring."""
    f = np.zeros((h, w), dtype=bool)
    f[[0, -1], :] = True
    f[:, [0, -1]] = True
    return f


def _body(smooth: np.ndarray, cfg: FieldEstimateConfig) -> np.ndarray:
    """Bool ``[H, W]``: everything but the dark region connected to the film border."""
    h, w = smooth.shape
    labels, _ = ndimage.label(smooth < cfg.background * threshold_otsu(smooth))
    border = np.unique(labels[_frame(h, w)])
    return ~np.isin(labels, border[border > 0])


def _best_component(
    labels: np.ndarray, n: int, mid: float, side: int, shape: tuple[int, int]
) -> int:
    """Label (1..n) of the component on ``side`` of ``mid`` with the most prior weight; 0 if
    none. The prior is a broad Gaussian at (0.5 H, mid -/+ 0.2 W)."""
    if n == 0:
        return 0
    h, w = shape
    centres = ndimage.center_of_mass(labels > 0, labels, range(1, n + 1))
    col = mid + (-1 if side == 0 else 1) * 0.2 * w
    yy, xx = np.mgrid[0:h, 0:w]
    prior = np.exp(-0.5 * (((yy - 0.5 * h) / (0.25 * h)) ** 2 + ((xx - col) / (0.15 * w)) ** 2))
    score = ndimage.sum(prior, labels, range(1, n + 1))
    on_side = [i for i in range(1, n + 1) if (centres[i - 1][1] < mid) == (side == 0)]
    return max(on_side, key=lambda i: score[i - 1]) if on_side else 0


def estimate_lung_fields(
    image: np.ndarray, cfg: FieldEstimateConfig = FieldEstimateConfig()
) -> FieldEstimate:
    """Estimate the two lung fields of ``image`` ``[H, W]`` from intensities alone."""
    img = np.asarray(image, dtype=np.float32)
    h, w = img.shape
    smooth = ndimage.gaussian_filter(img, cfg.smooth * max(h, w))
    body = _body(smooth, cfg)
    empty = np.zeros((h, w), dtype=bool)
    cols = np.nonzero(body.any(axis=0))[0]
    mid = (cols[0] + cols[-1]) / 2.0 if cols.size else w / 2.0
    core = ndimage.binary_erosion(body, iterations=max(1, round(cfg.body_margin * w)))
    if core.sum() < 10:
        return FieldEstimate((empty, empty.copy()), (False, False), mid, body)
    dark = ndimage.binary_opening(
        (smooth < threshold_otsu(smooth[core])) & core, iterations=max(1, round(cfg.opening * w))
    )
    labels, n = ndimage.label(dark)
    sides, credible = [], []
    for side in (0, 1):
        best = _best_component(labels, n, mid, side, (h, w))
        comp = labels == best if best else empty
        est = convex_hull_image(comp) if best else empty.copy()
        walled = _rim_fraction(comp, core) <= cfg.max_rim
        credible.append(walled and _credible(est, int(comp.sum()), mid, side, cfg))
        sides.append(est)
    return FieldEstimate((sides[0], sides[1]), (credible[0], credible[1]), mid, body)


def _rim_fraction(comp: np.ndarray, core: np.ndarray) -> float:
    """Fraction of the outline of ``comp`` ``[H, W]`` within one pixel of the edge of ``core``."""
    edge = comp & ~ndimage.binary_erosion(comp)
    if not edge.any():
        return 1.0
    rim = ndimage.binary_dilation(core & ~ndimage.binary_erosion(core))
    return float((edge & rim).sum() / edge.sum())


def _credible(
    hull: np.ndarray, n_dark: int, mid: float, side: int, cfg: FieldEstimateConfig
) -> bool:
    """Is one side's hull ``[H, W]`` (from ``n_dark`` dark pixels) a plausible lung field?"""
    h, w = hull.shape
    area = int(hull.sum())
    if area < cfg.min_side_area * h * w or n_dark < cfg.min_fill * area:
        return False
    rows, cols = np.nonzero(hull)
    lo, hi = cfg.credible_rows
    cross = (cols.max() - mid) if side == 0 else (mid - cols.min())
    return bool(lo <= rows.mean() / h <= hi and cross <= cfg.max_cross * w)


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask ``[H, W]`` to ``shape`` (pixel centres)."""
    mask = np.asarray(mask, dtype=bool)
    hh, ww = mask.shape
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * hh / shape[0]).astype(int), hh - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * ww / shape[1]).astype(int), ww - 1)
    return mask[np.ix_(rows, cols)]


@dataclass
class FieldAgreement:
    """Mask versus estimate: ``coverage[k]`` = fraction of side k's estimate inside the mask
    (``nan`` when side k's estimate is not credible); ``outside_body`` = fraction of the mask
    outside the body (in the film's background air: no lung lies there)."""

    coverage: tuple[float, float]
    outside_body: float


def field_agreement(mask: np.ndarray, est: FieldEstimate) -> FieldAgreement:
    """Compare ``mask`` (bool, at the estimate's size) with ``est``."""
    mask = np.asarray(mask, dtype=bool)
    cov = []
    for side, ok in zip(est.sides, est.credible, strict=True):
        cov.append(float((side & mask).sum() / side.sum()) if ok else float("nan"))
    outside = float((mask & ~est.body).sum() / mask.sum()) if mask.any() else float("nan")
    return FieldAgreement((cov[0], cov[1]), outside)


def split_sides(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mask's 8-connected components grouped by their centre column: (image left, image
    right) of the image's vertical midline, bool ``[H, W]`` each."""
    mask = np.asarray(mask, dtype=bool)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    left, right = np.zeros_like(mask), np.zeros_like(mask)
    if n:
        centres = ndimage.center_of_mass(mask, labels, range(1, n + 1))
        half = mask.shape[1] / 2.0
        for i, (_, col) in enumerate(centres, start=1):
            (left if col < half else right)[labels == i] = True
    return left, right


def base_gaps(mask: np.ndarray) -> tuple[float, float]:
    """How far each lung's lowest row sits above the pair's lowest row, as a fraction of the
    pair's height: (image left, image right); ``nan`` for both unless both sides hold lung."""
    left, right = split_sides(mask)
    if not (left.any() and right.any()):
        return float("nan"), float("nan")
    rows = np.nonzero(left.any(axis=1) | right.any(axis=1))[0]
    height = float(rows[-1] - rows[0] + 1)
    bottom = rows[-1]
    gaps = [(bottom - np.nonzero(s.any(axis=1))[0][-1]) / height for s in (left, right)]
    return float(gaps[0]), float(gaps[1])
