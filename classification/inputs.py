"""What the classifier sees at inference: the one place a radiograph becomes a network input.

Every door (batch runs, the inference bundle, study evaluation, the Python API) goes through
:func:`network_inputs`, so the same image and model give the same probabilities everywhere. The
operations are those of training's deterministic transforms (:func:`classification.data.
build_transforms`): area resize of the image, "any part is lung" resize of the mask
(:func:`resize_mask`), then the method's ``prepare_inputs`` (segment-then-classify multiplies by
the mask).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from classification.methods import Method

__all__ = ["network_inputs", "resize_image", "resize_mask"]


def resize_image(image: Tensor, size: int) -> Tensor:
    """``[1, H, W]`` in [0, 1] -> ``[1, S, S]`` float32, area interpolation (as in training)."""
    x = torch.as_tensor(image, dtype=torch.float32)
    return F.interpolate(x[None], size=(size, size), mode="area")[0]


def resize_mask(mask: np.ndarray | Tensor, size: int) -> Tensor:
    """Bool/0-1 ``[H, W]`` or ``[1, H, W]`` -> ``[1, S, S]`` float32 in {0, 1}: a pixel is lung
    if any part of it is lung (area interpolation > 0).

    The ISNet convention for a mask at a coarser resolution (Bassi et al. 2024: only pure
    background is penalised). Nearest neighbour would drop border pixels that are partly lung,
    and with them the part of a finding at the lung border that the area-resized image spreads
    into them (about 3% of a finding's density, down to 91% kept on single films, for 256 px films
    at 64 px: ``benchmarks/mask_resize_coverage.py``)."""
    m = torch.as_tensor(np.asarray(mask, dtype=np.float32))
    if m.dim() == 3:
        m = m[0]
    return (F.interpolate(m[None, None], size=(size, size), mode="area")[0] > 0).float()


def network_inputs(
    images: Sequence[Tensor],
    masks: Sequence[np.ndarray | Tensor] | None,
    *,
    size: int,
    in_channels: int,
    method: Method,
) -> tuple[Tensor, Tensor | None]:
    """Build the classifier's batch.

    Args:
        images: radiographs ``[1, H_i, W_i]`` in [0, 1] (any sizes).
        masks: lung masks ``[H_i, W_i]`` at each image's size, or None (then methods that need
            a mask at inference refuse).
        size: the network input side S; in_channels: C.

    Returns:
        ``x`` ``[B, C, S, S]`` (what the network is fed) and the masks ``[B, 1, S, S]`` (None
        without masks).
    """
    imgs = torch.stack([resize_image(im, size) for im in images])
    m = torch.stack([resize_mask(mk, size) for mk in masks]) if masks is not None else None
    if method.masks_at_inference and m is None:
        raise ValueError(
            f"method '{method.name}' classifies the lung-masked image: give a mask per image "
            "(or a segmenter)"
        )
    x = method.prepare_inputs(imgs, m)
    if in_channels > 1:
        x = x.repeat(1, in_channels, 1, 1)
    return x, m
