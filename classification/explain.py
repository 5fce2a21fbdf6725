"""LRP heatmaps for any trained classifier (eval mode, nothing kept for training)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from torch import Tensor, nn

from classification.lrp import lrp_heatmaps

__all__ = ["explain", "target_selector"]


def target_selector(target: Literal["predicted"] | int) -> Callable[[Tensor], Tensor]:
    """A selector for :func:`classification.lrp.lrp_heatmaps`: logits ``[B, N]`` -> ``[B, 1]``,
    the predicted class's logit (``"predicted"``) or the logit of class index ``target``."""
    if target == "predicted":

        def select(logits: Tensor) -> Tensor:
            return logits.gather(1, logits.argmax(dim=1, keepdim=True))

        return select
    if isinstance(target, bool) or not isinstance(target, int):
        raise ValueError(f"target must be 'predicted' or a class index, got {target!r}")

    def select_class(logits: Tensor) -> Tensor:
        if not 0 <= target < logits.shape[1]:
            raise ValueError(f"target class {target} out of range for {logits.shape[1]} classes")
        return logits[:, target : target + 1]

    return select_class


def explain(
    model: nn.Module,
    images: Tensor,
    *,
    target: Literal["predicted"] | int = "predicted",
    eps: float = 0.01,
    input_bounds: tuple[float, float] | None = (0.0, 1.0),
) -> Tensor:
    """LRP-epsilon heatmaps of ``model`` for ``images``.

    Args:
        model: an LRP-ready classifier (see :func:`classification.models.make_lrp_ready`).
        images: ``[B, C, H, W]``, in ``input_bounds``.
        target: explain the predicted class, or a fixed class index.
        eps: LRP epsilon.

    Returns:
        Heatmaps ``[B, 1, H, W]`` (relevance summed over input channels), detached. The model is
        explained in eval mode and its train/eval mode is restored afterwards.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got {tuple(images.shape)}")
    was_training = model.training
    model.eval()
    try:
        _, R = lrp_heatmaps(
            model,
            images.detach(),
            target_selector(target),
            eps=eps,
            input_bounds=input_bounds,
            create_graph=False,
        )
    finally:
        model.train(was_training)
    return R[:, 0].sum(dim=1, keepdim=True).detach()
