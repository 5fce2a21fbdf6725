"""Preview images: a radiograph with its lung mask outlined, as an RGB PNG."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.segmentation import find_boundaries

OUTLINE_RGB = (255, 64, 32)


def overlay_rgb(
    image: np.ndarray, mask: np.ndarray | None = None, thickness: int = 1
) -> np.ndarray:
    """Grey image ``[H, W]`` in [0, 1] (+ optional bool mask ``[H, W]``) -> uint8 RGB ``[H, W, 3]``
    with the mask's boundary drawn in :data:`OUTLINE_RGB`."""
    grey = np.clip(image, 0.0, 1.0)
    rgb = np.repeat((grey * 255.0 + 0.5).astype(np.uint8)[..., None], 3, axis=-1)
    if mask is not None:
        if mask.shape != image.shape:
            raise ValueError(f"mask shape {mask.shape} differs from image shape {image.shape}")
        edge = find_boundaries(mask.astype(bool), mode="inner")
        for _ in range(max(0, thickness - 1)):
            edge |= find_boundaries(edge, mode="outer")
        rgb[edge] = OUTLINE_RGB
    return rgb


def save_overlay(
    image: np.ndarray,
    path: str | os.PathLike,
    mask: np.ndarray | None = None,
    max_size: int | None = 1024,
) -> Path:
    """Write :func:`overlay_rgb` to ``path`` (PNG), downscaled so the long side <= ``max_size``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    thickness = max(1, max(image.shape) // 512)
    img = Image.fromarray(overlay_rgb(image, mask, thickness))
    if max_size and max(img.size) > max_size:
        img.thumbnail((max_size, max_size), Image.Resampling.LANCZOS)
    img.save(path)
    return path
