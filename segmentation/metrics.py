"""Segmentation metrics: Dice, IoU, 95th-percentile Hausdorff distance (MONAI metrics) and
lesion coverage.

Masks are bool/0-1 arrays ``[H, W]``; all three overlap metrics treat the lung field as one class.
HD95 is in pixels, or in millimetres when a spacing ``(row_mm, col_mm)`` is given. An empty
prediction or reference gives ``nan`` for HD95 (and Dice 0 when only one of them is empty).

Lesion coverage (:func:`lesion_coverage`) asks what Dice hides: of the density a finding adds to
a film (the film rendered with minus without its finding, positive part), which fraction lies
inside the predicted mask. A mask with Dice 0.99 can still cut a dense consolidation out of the
lung field; the ISNet loss then penalises relevance on that part of the lesion, and
segment-then-classify zeroes it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU


@dataclass(frozen=True)
class MaskScores:
    """Scores of one predicted mask against its reference."""

    dice: float
    iou: float
    hd95: float


def _as_batch(mask: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``[H, W]`` -> float ``[1, 1, H, W]``."""
    t = torch.as_tensor(np.asarray(mask, dtype=bool)).float()
    if t.ndim != 2:
        raise ValueError(f"expected a 2-D mask [H, W], got shape {tuple(t.shape)}")
    return t[None, None]


def score_mask(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: tuple[float, float] | None = None,
) -> MaskScores:
    """Dice, IoU and HD95 of bool masks ``pred``, ``ref`` ``[H, W]`` (same shape)."""
    if np.shape(pred) != np.shape(ref):
        raise ValueError(f"prediction shape {np.shape(pred)} != reference shape {np.shape(ref)}")
    p, r = _as_batch(pred), _as_batch(ref)
    both_empty = not p.any() and not r.any()
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(p, r)
    iou = MeanIoU(include_background=True, reduction="none", ignore_empty=False)(p, r)
    if p.any() and r.any():
        hd = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(
            p, r, spacing=list(spacing) if spacing else None
        )
        hd95 = float(hd.item())
    else:
        hd95 = 0.0 if both_empty else math.nan
    return MaskScores(dice=float(dice.item()), iou=float(iou.item()), hd95=hd95)


def added_density(with_finding: np.ndarray, without_finding: np.ndarray) -> np.ndarray:
    """Density a finding adds: ``max(with - without, 0)`` float64 ``[H, W]``.

    Both images are the same film (same anatomy, pose, exposure, noise) rendered with and without
    its finding, bright = dense, same shape.
    """
    w = np.asarray(with_finding, dtype=np.float64)
    wo = np.asarray(without_finding, dtype=np.float64)
    if w.shape != wo.shape or w.ndim != 2:
        raise ValueError(f"expected two [H, W] images of one shape, got {w.shape} and {wo.shape}")
    return np.clip(w - wo, 0.0, None)


def lesion_coverage(
    pred: np.ndarray, with_finding: np.ndarray, without_finding: np.ndarray
) -> float:
    """Fraction of a finding's added density (:func:`added_density`) inside mask ``pred``.

    Args:
        pred: bool mask ``[H, W]`` (the segmenter's lung field).
        with_finding, without_finding: the film ``[H, W]`` with and without its finding.

    Returns:
        ``sum(added * pred) / sum(added)`` in [0, 1]; ``nan`` when the finding adds nothing
        (a normal film, or a finding cut away entirely by collimation).
    """
    return coverage_of(pred, added_density(with_finding, without_finding))


def coverage_of(pred: np.ndarray, added: np.ndarray) -> float:
    """Fraction of the non-negative density ``added`` ``[H, W]`` inside bool mask ``pred``
    ``[H, W]`` (``nan`` when ``added`` sums to 0); see :func:`lesion_coverage`."""
    a = np.asarray(added, dtype=np.float64)
    m = np.asarray(pred, dtype=bool)
    if m.shape != a.shape:
        raise ValueError(f"mask shape {m.shape} != image shape {a.shape}")
    if (a < 0).any():
        raise ValueError("added density must be non-negative (use added_density)")
    total = float(a.sum())
    if total <= 0.0:
        return math.nan
    return float(a[m].sum() / total)


def summarise_coverage(values: Sequence[float], low: float = 0.9) -> dict[str, float]:
    """Mean, median, min of lesion coverages (``nan`` ignored) and how many are below ``low``."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if not v.size:
        return {"n": 0.0, "mean": math.nan, "median": math.nan, "min": math.nan, "below": 0.0}
    return {
        "n": float(v.size),
        "mean": float(v.mean()),
        "median": float(np.median(v)),
        "min": float(v.min()),
        "below": float((v < low).sum()),
    }


def summarise(scores: Sequence[MaskScores]) -> dict[str, float]:
    """Mean, median, std and min of each metric over images (``nan`` HD95 ignored; its count is
    reported as ``hd95_undefined``)."""
    out: dict[str, float] = {"n": float(len(scores))}
    if not scores:
        return out
    for name in ("dice", "iou", "hd95"):
        vals = np.array([asdict(s)[name] for s in scores], dtype=float)
        ok = vals[np.isfinite(vals)]
        out[f"{name}_mean"] = float(ok.mean()) if ok.size else math.nan
        out[f"{name}_median"] = float(np.median(ok)) if ok.size else math.nan
        out[f"{name}_std"] = float(ok.std()) if ok.size else math.nan
        out[f"{name}_min" if name != "hd95" else "hd95_max"] = (
            (float(ok.min()) if name != "hd95" else float(ok.max())) if ok.size else math.nan
        )
    out["hd95_undefined"] = float(sum(1 for s in scores if not math.isfinite(s.hd95)))
    return out
