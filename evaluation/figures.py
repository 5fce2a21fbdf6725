"""Every overlay and figure of a radiograph: the lung mask outlined, and the LRP heatmap.

One module so that every door (CLI preview, segmentation QC, batch runs, reports) draws the same
picture with the same colours.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from scipy import ndimage
from skimage.segmentation import find_boundaries

#: Lung-mask outline on a grey radiograph.
OUTLINE_RGB = (255, 48, 48)
#: Lung-mask outline over a heatmap (yellow: apart from the heatmap's red and blue).
HEATMAP_MASK_RGB = (255.0, 220.0, 0.0)


def overlay_rgb(
    image: np.ndarray, mask: np.ndarray | None = None, thickness: int = 2
) -> np.ndarray:
    """Grey image ``[H, W]`` in [0, 1] (+ optional bool mask ``[H, W]``) -> uint8 RGB
    ``[H, W, 3]`` with the mask's outline, ``thickness`` pixels wide, in :data:`OUTLINE_RGB`."""
    image = np.asarray(image, dtype=np.float32)
    grey = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    if mask is None:
        return rgb
    mask = np.asarray(mask, dtype=bool)
    if image.shape != mask.shape:
        raise ValueError(f"image shape {image.shape} differs from mask shape {mask.shape}")
    inner = ndimage.binary_erosion(mask, iterations=max(1, thickness))
    rgb[mask & ~inner] = OUTLINE_RGB
    return rgb


def save_overlay(
    image: np.ndarray,
    mask: np.ndarray | None,
    path: str | os.PathLike,
    max_size: int | None = 1024,
    caption: str | None = None,
) -> Path:
    """Write :func:`overlay_rgb` as a PNG, downscaled so its long side is <= ``max_size``, with an
    optional caption in the top-left corner."""
    h, w = np.shape(image)
    thickness = max(1, round(max(h, w) / (max_size or max(h, w)) * 1.5))
    img = Image.fromarray(overlay_rgb(image, mask, thickness))
    if max_size and max(h, w) > max_size:
        scale = max_size / max(h, w)
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    if caption:
        ImageDraw.Draw(img).text((4, 4), caption, fill=(255, 255, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def heatmap_overlay_rgb(
    image: np.ndarray, heatmap: np.ndarray, mask: np.ndarray | None = None, max_side: int = 512
) -> np.ndarray:
    """A radiograph with its LRP heatmap and lung outline, uint8 RGB ``[h, w, 3]``.

    Args:
        image: ``[H, W]`` in [0, 1].
        heatmap: ``[h, w]`` relevance at the network size (resized to the display size);
            positive relevance in red, negative in blue, scaled by the 99.5th percentile of
            ``|R|`` and blended over the image.
        mask: optional bool ``[H, W]`` lung mask, outlined in :data:`HEATMAP_MASK_RGB`.
        max_side: the display's long side (the image is only ever shrunk).
    """
    h, w = image.shape
    scale = min(1.0, max_side / max(h, w))
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    img = F.interpolate(
        torch.from_numpy(np.ascontiguousarray(image, np.float32))[None, None], size, mode="area"
    )[0, 0]
    hm = F.interpolate(
        torch.from_numpy(np.ascontiguousarray(heatmap, np.float32))[None, None],
        size,
        mode="bilinear",
        align_corners=False,
    )[0, 0].numpy()
    small_mask = None
    if mask is not None:
        small_mask = (
            F.interpolate(
                torch.from_numpy(mask.astype(np.float32))[None, None], size, mode="nearest"
            )[0, 0].numpy()
            > 0.5
        )
    grey = np.clip(img.numpy(), 0.0, 1.0) * 255.0
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    ref = float(np.percentile(np.abs(hm), 99.5)) if hm.size else 0.0
    if ref > 0:
        r = np.clip(hm / ref, -1.0, 1.0)
        alpha = 0.6 * np.abs(r)[..., None]
        colour = np.where(r[..., None] >= 0, [255.0, 0.0, 0.0], [0.0, 64.0, 255.0])
        rgb = (1.0 - alpha) * rgb + alpha * colour
    if small_mask is not None:
        rgb[find_boundaries(small_mask, mode="inner")] = HEATMAP_MASK_RGB
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
