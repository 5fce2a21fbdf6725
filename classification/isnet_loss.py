"""ISNet heatmap loss (Bassi et al., Nature Communications 2024), see isnet-method.md section 2.

Shapes: ``R`` = LRP heatmaps ``[B, K, C, H, W]`` (K explained outputs per sample), ``mask`` = binary
lung mask ``[B, 1, H, W]`` (1 = lungs; pooled conservatively when its size differs from ``R``'s).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from classification.lrp import lrp_heatmaps

__all__ = [
    "VARIANTS",
    "ISNetLossConfig",
    "ISNetLosses",
    "SelectStochastic",
    "background_loss",
    "foreground_loss",
    "gwrp",
    "heatmap_loss",
    "heatmap_loss_parts",
    "isnet_losses",
    "isnet_total_loss",
    "make_selector",
    "pool_mask",
    "select_original",
    "select_selective",
    "tune_c1_c2",
]

VARIANTS = ("original", "selective", "stochastic")


@dataclass(frozen=True)
class ISNetLossConfig:
    """ISNet loss constants (defaults from the Nature paper's code).

    Attributes:
        P: weight of the heatmap loss, ``L = (1 - P) * CE + P * L_H``, in [0, 1].
        A: weight of the background term.
        B: weight of the foreground term.
        E: background GWRP scale, ``L_bg = log(1 + G / E)``; > 0.
        d: GWRP decay in [0, 1] (0 = max, 1 = mean, 0.9 ~ top 10 pixels).
        C1: lower bound of the total foreground relevance ``sum |R| M`` (> 0).
        C2: upper bound (>= C1).
        eps: LRP epsilon.
        variant: which outputs are explained: "original" (all classes), "selective" (softmax
            log-odds of the lowest-logit class) or "stochastic" (a random logit; the default:
            flatter and at least as accurate as selective on the bias benchmark, see
            docs/isnet-results.md rounds 3, 5 and 6).
        huber_upper: make the upper foreground penalty linear above ``C1 + C2``.
        heatmap_layer: None = heatmaps at the input (the paper's); a module name = exact LRP
            relevance at that module's output, summed over channels, with the mask max-pooled to
            that resolution (faster; a coarser loss than the paper's).
        input_bounds: ``(low, high)`` pixel range for the z^B rule at the first layer (the
            paper's), or None for the epsilon rule down to the input (relevance = modified
            gradient x input, so zero pixels get none). Ignored when ``heatmap_layer`` is set.
    """

    P: float = 0.7
    A: float = 1.0
    B: float = 3.0
    E: float = 1.0
    d: float = 0.9
    C1: float = 1.0
    C2: float = 25.0
    eps: float = 0.01
    variant: str = "stochastic"
    huber_upper: bool = False
    heatmap_layer: str | None = None
    input_bounds: tuple[float, float] | None = (0.0, 1.0)

    def __post_init__(self) -> None:
        problems = []
        if self.input_bounds is not None:
            bounds = tuple(float(v) for v in self.input_bounds)
            object.__setattr__(self, "input_bounds", bounds)  # e.g. a JSON list -> tuple
            if len(bounds) != 2 or not bounds[0] < bounds[1]:
                problems.append(f"input_bounds={self.input_bounds} must be None or (low < high)")
        if not 0.0 <= self.P <= 1.0:
            problems.append(f"P={self.P} must be in [0, 1]")
        if self.A < 0 or self.B < 0:
            problems.append(f"A={self.A} and B={self.B} must be >= 0")
        if not self.E > 0:
            problems.append(f"E={self.E} must be > 0")
        if not 0.0 <= self.d <= 1.0:
            problems.append(f"d={self.d} must be in [0, 1]")
        if not (self.C1 > 0 and self.C2 >= self.C1):
            problems.append(f"need 0 < C1 <= C2, got C1={self.C1}, C2={self.C2}")
        if self.eps < 0:
            problems.append(f"eps={self.eps} must be >= 0")
        if self.variant not in VARIANTS:
            problems.append(f"variant={self.variant!r} must be one of {VARIANTS}")
        for name in ("P", "A", "B", "E", "d", "C1", "C2", "eps"):
            if not math.isfinite(float(getattr(self, name))):
                problems.append(f"{name} must be finite")
        if problems:
            raise ValueError("invalid ISNetLossConfig: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------


def gwrp(values: Tensor, d: float) -> Tensor:
    """Global Weighted Ranked Pooling: ``sum_i d^i v_(i) / sum_i d^i`` with ``v`` sorted descending.

    Args:
        values: ``[N, L]``.
        d: decay in [0, 1]; d = 0 gives the max, d = 1 the mean.

    Returns:
        ``[N]``. Weights are computed in float64 and truncated where ``d^i`` is below float64
        resolution (the dropped tail is < 1e-18 of the result), so large L costs a top-k, not a
        full sort.
    """
    if values.dim() != 2:
        raise ValueError(f"gwrp expects [N, L], got shape {tuple(values.shape)}")
    if not 0.0 <= d <= 1.0:
        raise ValueError(f"d must be in [0, 1], got {d}")
    L = values.shape[1]
    if d == 1.0:
        return values.mean(dim=1)
    if d == 0.0:
        return values.max(dim=1).values
    # keep i with d^i / (sum_j d^j) >= 1e-18 * (1 - d)  (the tail beyond is negligible)
    keep = min(L, int(math.ceil(math.log(1e-18 * (1 - d)) / math.log(d))) + 1)
    top = torch.topk(values, keep, dim=1, sorted=True).values
    i = torch.arange(L if keep == L else keep, dtype=torch.float64, device=values.device)
    w = torch.pow(torch.tensor(d, dtype=torch.float64, device=values.device), i)
    # normaliser over all L terms: (1 - d^L) / (1 - d)
    total = (1.0 - d**L) / (1.0 - d)
    w = (w / total).to(values.dtype)
    return (top * w).sum(dim=1)


def _check_binary(mask: Tensor) -> None:
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be [B, 1, H, W], got shape {tuple(mask.shape)}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        bad = mask[(mask != 0) & (mask != 1)]
        raise ValueError(
            f"mask must be binary (0/1); found {bad.numel()} other values, e.g. "
            f"{float(bad.flatten()[0]):.4g}. Threshold it (mask > 0.5) first."
        )


def pool_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """Conservatively resize a binary mask ``[B, 1, H, W]`` to ``[B, 1, h, w]``.

    A pooled pixel is foreground (1) if any input pixel it covers is foreground (adaptive max
    pooling), so only pure background is penalised. A non-binary mask raises ValueError.
    """
    _check_binary(mask)
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.adaptive_max_pool2d(mask, tuple(size))


def _mask_for(R: Tensor, mask: Tensor) -> Tensor:
    """Mask broadcastable to R ``[B, K, C, H, W]``: ``[B, 1, 1, H, W]`` in R's dtype."""
    if R.dim() != 5:
        raise ValueError(f"R must be [B, K, C, H, W], got shape {tuple(R.shape)}")
    if mask.shape[0] != R.shape[0]:
        raise ValueError(f"mask batch {mask.shape[0]} != heatmap batch {R.shape[0]}")
    return pool_mask(mask, tuple(R.shape[-2:])).to(R.dtype).unsqueeze(1)


def background_loss(R: Tensor, mask: Tensor, d: float, E: float) -> Tensor:
    """Background term per sample ``[B]``.

    ``Ra = |R|``; ``Rn = Ra / (mean of Ra over foreground elements (all channels) + 1e-10)``
    per (b, k); ``Bg = Rn (1 - M)``; ``G`` = GWRP of each (b, k, c) map; ``L = -log(1 - G/(G+E))``
    with the ratio clamped below ``1 - 1e-7``; averaged over channels and K.
    """
    M = _mask_for(R, mask)
    Ra = R.abs()
    B_, K, C, H, W = R.shape
    fg_sum = (Ra * M).sum(dim=(2, 3, 4), keepdim=True)
    fg_count = M.sum(dim=(2, 3, 4), keepdim=True) * C
    Rn = Ra / (fg_sum / (fg_count + 1e-10) + 1e-10)
    Bg = Rn * (1 - M)
    G = gwrp(Bg.reshape(B_ * K * C, H * W), d).reshape(B_, K, C)
    ratio = (G / (G + E)).clamp(max=1 - 1e-7)
    return (-torch.log(1 - ratio)).mean(dim=(1, 2))


def foreground_loss(
    R: Tensor, mask: Tensor, C1: float, C2: float, huber_upper: bool = False
) -> Tensor:
    """Foreground term per sample ``[B]`` on the raw heatmap.

    ``F = sum(|R| M)`` over channels and pixels, per (b, k);
    ``L = ((min(F, C1) - C1)/C1)^2 + ((max(F, C2) - C2)/C1)^2``, averaged over K. With
    ``huber_upper`` the upper part ``u = (max(F, C2) - C2)/C1`` is ``u^2`` for ``u <= 1`` and
    ``2u - 1`` above (linear above ``F = C1 + C2``, continuous with continuous slope).
    """
    M = _mask_for(R, mask)
    Fg = (R.abs() * M).sum(dim=(2, 3, 4))
    low = ((torch.clamp(Fg, max=C1) - C1) / C1) ** 2
    u = (torch.clamp(Fg, min=C2) - C2) / C1
    high = torch.where(u <= 1, u**2, 2 * u - 1) if huber_upper else u**2
    return (low + high).mean(dim=1)


def heatmap_loss_parts(R: Tensor, mask: Tensor, cfg: ISNetLossConfig) -> tuple[Tensor, Tensor]:
    """Per-sample background and foreground terms ``([B], [B])``, unweighted."""
    bg = background_loss(R, mask, cfg.d, cfg.E)
    fg = foreground_loss(R, mask, cfg.C1, cfg.C2, cfg.huber_upper)
    return bg, fg


def heatmap_loss(R: Tensor, mask: Tensor, cfg: ISNetLossConfig) -> Tensor:
    """``L_H = mean_b(A * L_bg + B * L_fg)`` (scalar)."""
    bg, fg = heatmap_loss_parts(R, mask, cfg)
    return (cfg.A * bg + cfg.B * fg).mean()


def isnet_total_loss(ce: Tensor, lh: Tensor, P: float) -> Tensor:
    """``(1 - P) * ce + P * lh``."""
    return (1.0 - P) * ce + P * lh


# --------------------------------------------------------------------------------------------
# Which outputs are explained
# --------------------------------------------------------------------------------------------


def select_original(logits: Tensor) -> Tensor:
    """All logits, one heatmap per class: ``[B, N] -> [B, N]``."""
    return logits


def select_selective(logits: Tensor, eps_s: float = 1e-5) -> Tensor:
    """Softmax log-odds of the lowest-logit class c: ``log(p_c + eps_s) - log(1 - p_c + eps_s)``.

    ``[B, N] -> [B, 1]``.
    """
    c = logits.argmin(dim=1, keepdim=True)
    p = torch.softmax(logits, dim=1).gather(1, c)
    return torch.log(p + eps_s) - torch.log(1 - p + eps_s)


class SelectStochastic:
    """One random logit per sample: the top class with probability 1/2, else a uniformly random
    other class. ``[B, N] -> [B, 1]``. Uses its own ``torch.Generator`` (CPU), never the global
    RNG; ``generator=None`` creates one seeded with ``seed``."""

    def __init__(self, generator: torch.Generator | None = None, seed: int = 0) -> None:
        if generator is None:
            generator = torch.Generator().manual_seed(seed)
        self.generator = generator

    def __call__(self, logits: Tensor) -> Tensor:
        Bn, N = logits.shape
        top = logits.argmax(dim=1).cpu()
        if N == 1:
            return logits
        coin = torch.rand(Bn, generator=self.generator) < 0.5
        other = torch.randint(0, N - 1, (Bn,), generator=self.generator)
        other = other + (other >= top).long()  # skip the top class
        idx = torch.where(coin, top, other).to(logits.device)
        return logits.gather(1, idx[:, None])


def make_selector(
    variant: str, generator: torch.Generator | None = None
) -> Callable[[Tensor], Tensor]:
    """Selector for ``variant`` in ("original", "selective", "stochastic")."""
    if variant == "original":
        return select_original
    if variant == "selective":
        return select_selective
    if variant == "stochastic":
        return SelectStochastic(generator)
    raise ValueError(f"unknown ISNet variant {variant!r}; choose one of {VARIANTS}")


def tune_c1_c2(total_relevance: Tensor) -> tuple[float, float]:
    """Faster-ISNet auto-tuning from per-sample totals ``sum |R|`` ``[N]`` of a plain network:
    ``C1 = max(mean/5, mean - 3 std)``, ``C2 = min(25 C1, mean + 3 std)`` (std unbiased)."""
    t = torch.as_tensor(total_relevance, dtype=torch.float64).flatten()
    if t.numel() < 2 or not bool(torch.isfinite(t).all()):
        raise ValueError("tune_c1_c2 needs at least 2 finite relevance totals")
    mean, std = float(t.mean()), float(t.std())
    if mean <= 0:
        raise ValueError(f"mean total relevance must be > 0, got {mean}")
    c1 = max(mean / 5, mean - 3 * std)
    c2 = min(25 * c1, mean + 3 * std)
    return c1, c2


# --------------------------------------------------------------------------------------------
# One training step's losses
# --------------------------------------------------------------------------------------------


@dataclass
class ISNetLosses:
    """Losses of one ISNet step: ``logits [B, N]``, scalars ``ce``, ``lh``, ``total``, the
    heatmaps ``R [B, K, C, H, W]`` (differentiable), and the batch means of the unweighted
    background and foreground terms ``bg``, ``fg`` (scalars; ``lh = A bg + B fg``)."""

    logits: Tensor
    ce: Tensor
    lh: Tensor
    total: Tensor
    R: Tensor
    bg: Tensor
    fg: Tensor


def isnet_losses(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    mask: Tensor,
    cfg: ISNetLossConfig,
    selector: Callable[[Tensor], Tensor] | None = None,
    input_bounds: tuple[float, float] | None | str = "config",
    *,
    P: float | None = None,
    create_graph: bool = True,
) -> ISNetLosses:
    """One forward + one LRP backward (create_graph) -> CE, heatmap loss and total.

    This is THE ISNet step: :class:`classification.methods.ISNet` (the training loop) and the
    step benchmark call it. ``x [B, C, H, W]``, ``y [B]`` class indices, ``mask [B, 1, H, W]``
    binary. Call ``.total.backward()`` for exact gradients of ``(1-P) CE + P L_H``.
    ``input_bounds`` defaults to ``cfg.input_bounds``; pass a value (or None) to override it.
    ``P`` overrides ``cfg.P`` (e.g. during a warm-up). ``create_graph=False`` gives the same
    values without the second-order graph (validation: no ``backward`` through the heatmaps).
    """
    if isinstance(input_bounds, str):
        if input_bounds != "config":
            raise ValueError(
                f"input_bounds must be (low, high), None or 'config', got {input_bounds!r}"
            )
        input_bounds = cfg.input_bounds
    select = selector if selector is not None else make_selector(cfg.variant)
    logits, R = lrp_heatmaps(
        model,
        x,
        select,
        eps=cfg.eps,
        input_bounds=input_bounds,
        create_graph=create_graph,
        at=cfg.heatmap_layer,
    )
    if cfg.heatmap_layer is not None:  # hidden-layer relevance [B, K, C', h, w]: one map per (b, k)
        R = R.sum(dim=2, keepdim=True)
    ce = F.cross_entropy(logits, y)
    bg, fg = heatmap_loss_parts(R, mask, cfg)
    lh = (cfg.A * bg + cfg.B * fg).mean()
    total = isnet_total_loss(ce, lh, cfg.P if P is None else float(P))
    return ISNetLosses(logits, ce, lh, total, R, bg.mean(), fg.mean())
