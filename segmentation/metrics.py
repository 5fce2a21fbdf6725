"""Segmentation metrics: Dice, IoU and 95th-percentile Hausdorff distance (MONAI metrics).

Masks are bool/0-1 arrays ``[H, W]``; all three metrics treat the lung field as one class.
HD95 is in pixels, or in millimetres when a spacing ``(row_mm, col_mm)`` is given. An empty
prediction or reference gives ``nan`` for HD95 (and Dice 0 when only one of them is empty).
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
