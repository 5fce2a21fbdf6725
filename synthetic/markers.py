"""Burned-in background bias markers (lead letters, text, shapes, borders) and their placement
outside the lungs.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from synthetic.sites import CLASSES, MARKER_CORNERS, MARKER_STYLES, SiteConfig

# Per-class marker content for each style (index = class index in CLASSES).
_LETTERS = ("L", "R", "A")
# Lead-marker (block, glyph) display values per class: the blocks differ in brightness (bright,
# mid-grey, dark) so the marker's class stays readable after down-sampling to 64 px, where an
# 8-pixel glyph alone (L vs R vs A) is nearly unreadable and the shortcut would be too subtle.
_LETTER_TONES = ((0.93, 0.35), (0.55, 0.05), (0.12, 0.9))
_WORDS = ("ERECT", "PORTABLE", "ICU")
_SHAPES = ("square", "triangle", "disc")

# --------------------------------------------------------------------------------------------
# Markers
# --------------------------------------------------------------------------------------------


def _text_stamp(text: str, height: int) -> np.ndarray:
    """Bool ``[h, w]`` of ``text`` in PIL's default bitmap font, scaled to ``height`` rows."""
    font = ImageFont.load_default_imagefont()
    left, top, right, bottom = font.getbbox(text)
    img = Image.new("L", (right - left + 2, bottom - top + 2), 0)
    ImageDraw.Draw(img).text((1 - left, 1 - top), text, fill=255, font=font)
    img = img.crop(img.getbbox())
    scale = max(height, 3) / img.height
    img = img.resize(
        (max(1, round(img.width * scale)), max(3, round(img.height * scale))),
        Image.Resampling.NEAREST,
    )
    return np.asarray(img) > 127


def marker_stamp(style: str, cls: str, size: int, site_name: str = "") -> tuple[np.ndarray, float]:
    """The marker of class ``cls`` in ``style`` for an image of side ``size``.

    Returns:
        ``(values, alpha)``: float32 ``[h, w]`` display values in [0, 1] with NaN where the
        marker is transparent, and the opacity used when burning it in.
    """
    k = CLASSES.index(cls)
    s = max(8, round(0.085 * size))
    if style == "letter":
        glyph = _text_stamp(_LETTERS[k], s - 2 * max(1, s // 8))
        glyph = ndimage.binary_dilation(glyph, iterations=max(0, s // 16))
        block, ink = _LETTER_TONES[k]
        vals = np.full((s, s), block, dtype=np.float32)
        gh, gw = glyph.shape
        gw = min(gw, s)
        r0, c0 = (s - gh) // 2, (s - gw) // 2
        vals[r0 : r0 + gh, c0 : c0 + gw][glyph[:, :gw]] = ink
        return vals, 1.0
    if style == "text":
        glyph = _text_stamp(_WORDS[k], max(5, round(0.04 * size)))
        vals = np.where(glyph, 1.0, np.nan).astype(np.float32)
        return vals, 1.0
    if style == "shape":
        img = Image.new("L", (s, s), 0)
        d = ImageDraw.Draw(img)
        if _SHAPES[k] == "square":
            d.rectangle((0, 0, s - 1, s - 1), fill=255)
        elif _SHAPES[k] == "triangle":
            d.polygon([(0, s - 1), (s - 1, s - 1), ((s - 1) / 2, 0)], fill=255)
        else:
            d.ellipse((0, 0, s - 1, s - 1), fill=255)
        vals = np.where(np.asarray(img) > 127, 0.95, np.nan).astype(np.float32)
        return vals, 1.0
    if style == "border":
        h = max(3, round(0.025 * size))
        w = round(0.6 * size)
        cols = np.arange(w)
        if k == 0:
            on = np.ones(w, dtype=bool)
        elif k == 1:
            on = (cols // max(2, h * 2)) % 2 == 0
        else:
            on = (cols // max(1, h // 2 + 1)) % 3 == 0
        rows = np.ones((h, 1), dtype=bool)
        vals = np.where(rows & on[None, :], 0.97, np.nan).astype(np.float32)
        return vals, 1.0
    raise ValueError(f"marker style {style!r} has no stamp; expected one of {MARKER_STYLES[:-1]}")


def place_marker(
    site: SiteConfig,
    cls: str,
    lung_mask: np.ndarray,
    margin_px: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Choose where to burn the marker in: returns ``(values [H, W] with NaN elsewhere, bool
    marker mask [H, W])`` or None when no candidate position avoids the lungs."""
    size = lung_mask.shape[0]
    vals, _ = marker_stamp(site.marker_style, cls, size, site.name)
    h, w = vals.shape
    pad = margin_px + max(2, round(0.02 * size))
    if h + 2 * pad > size or w + 2 * pad > size:
        return None
    keep_out = ndimage.binary_dilation(lung_mask, iterations=max(2, size // 64))
    jitter = max(1, round(0.02 * size))
    if site.marker_style == "border":
        candidates = [(pad, (size - w) // 2), (size - pad - h, (size - w) // 2)]
    else:
        order = [site.marker_corner] + [c for c in MARKER_CORNERS if c != site.marker_corner]
        candidates = []
        for corner in order:
            r = pad if corner.startswith("top") else size - pad - h
            c = pad if corner.endswith("left") else size - pad - w
            candidates.append((r, c))
    for r, c in candidates:
        dr = int(rng.integers(0, jitter + 1)) * (1 if r == pad else -1)
        dc = int(rng.integers(-jitter, jitter + 1)) if site.marker_style == "border" else 0
        if site.marker_style != "border":
            dc = int(rng.integers(0, jitter + 1)) * (1 if c == pad else -1)
        r0 = int(np.clip(r + dr, margin_px, size - margin_px - h))
        c0 = int(np.clip(c + dc, margin_px, size - margin_px - w))
        on = ~np.isnan(vals)
        if keep_out[r0 : r0 + h, c0 : c0 + w][on].any():
            continue
        full = np.full((size, size), np.nan, dtype=np.float32)
        full[r0 : r0 + h, c0 : c0 + w] = vals
        return full, ~np.isnan(full)
    return None
