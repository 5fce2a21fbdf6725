"""Background-relevance metrics: how much of a heatmap's attention falls inside the lung mask.

All functions take a heatmap ``R`` of shape ``[B, C, H, W]`` (any number of channels; the absolute
relevance is summed over channels) and a binary mask ``M`` of shape ``[B, 1, H, W]`` (1 = lungs)
and return one value per image, shape ``[B]``. An image whose heatmap is all zero, or whose mask
is empty, gets NaN (the share is undefined), never a made-up number.
"""

from __future__ import annotations

import torch

__all__ = [
    "background_share",
    "chance_level",
    "relevance_mass_accuracy",
    "relevance_metrics",
    "relevance_rank_accuracy",
]


def _abs_map(heatmaps: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Check shapes; return ``|R|`` summed over channels ``[B, H*W]`` and the mask ``[B, H*W]``."""
    if heatmaps.ndim != 4 or masks.ndim != 4 or masks.shape[1] != 1:
        raise ValueError(
            f"expected heatmaps [B, C, H, W] and masks [B, 1, H, W], got {tuple(heatmaps.shape)} "
            f"and {tuple(masks.shape)}"
        )
    if heatmaps.shape[0] != masks.shape[0] or heatmaps.shape[-2:] != masks.shape[-2:]:
        raise ValueError(
            f"heatmaps {tuple(heatmaps.shape)} and masks {tuple(masks.shape)} differ in batch or "
            "spatial size; resize the mask to the heatmap first"
        )
    m = masks.detach().to(torch.float64)
    if not torch.all((m == 0) | (m == 1)):
        raise ValueError("masks must be binary (0/1); threshold them before computing metrics")
    r = heatmaps.detach().to(torch.float64).abs().sum(dim=1)
    return r.flatten(1), m.flatten(1)


def relevance_mass_accuracy(heatmaps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of the total ``|R|`` inside the mask, ``[B]`` in [0, 1] (NaN if no relevance)."""
    r, m = _abs_map(heatmaps, masks)
    total = r.sum(dim=1)
    inside = (r * m).sum(dim=1)
    return torch.where(total > 0, inside / total.clamp_min(1e-300), torch.nan)


def background_share(heatmaps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of the total ``|R|`` that lies outside the mask, ``[B]`` (= 1 - mass accuracy)."""
    return 1.0 - relevance_mass_accuracy(heatmaps, masks)


def relevance_rank_accuracy(heatmaps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Fraction of the ``k`` highest-``|R|`` pixels inside the mask, ``k`` = mask area; ``[B]``.

    Ties at the k-th value are broken by pixel order (``torch.topk``); NaN for an empty mask or an
    all-zero heatmap.
    """
    r, m = _abs_map(heatmaps, masks)
    out = torch.full((r.shape[0],), torch.nan, dtype=torch.float64)
    for b in range(r.shape[0]):
        k = int(m[b].sum().item())
        if k == 0 or not bool((r[b] > 0).any()):
            continue
        top = torch.topk(r[b], k).indices
        out[b] = m[b, top].sum() / k
    return out


def chance_level(masks: torch.Tensor) -> torch.Tensor:
    """Mask area fraction ``[B]``: the mass and rank accuracy of a uniform heatmap."""
    if masks.ndim != 4 or masks.shape[1] != 1:
        raise ValueError(f"expected masks [B, 1, H, W], got {tuple(masks.shape)}")
    return masks.detach().to(torch.float64).flatten(1).mean(dim=1)


def relevance_metrics(heatmaps: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """All per-image metrics at once: ``background_share``, ``mass_accuracy``, ``rank_accuracy``,
    ``chance``, each ``[B]`` float64."""
    mass = relevance_mass_accuracy(heatmaps, masks)
    return {
        "background_share": 1.0 - mass,
        "mass_accuracy": mass,
        "rank_accuracy": relevance_rank_accuracy(heatmaps, masks),
        "chance": chance_level(masks),
    }
