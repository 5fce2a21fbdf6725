"""Phantom anatomy (body, lungs, heart, spine, ribs, diaphragm, vessels) and the lung findings
that define the classes (density maps, float32 ``[S, S]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from synthetic.lung_shapes import sample_lung_pair
from synthetic.sites import CLASSES

# --------------------------------------------------------------------------------------------
# Anatomy
# --------------------------------------------------------------------------------------------


def _upsampler(size: int, cells: int) -> np.ndarray:
    """``[size, cells + 2]`` row-normalised Gaussian interpolation weights (separable)."""
    pos = np.linspace(0.5, cells + 0.5, size)[:, None]
    w = np.exp(-(((pos - np.arange(cells + 2)[None, :]) / 0.75) ** 2))
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean smooth random field ``[size, size]`` float32 (std ~0.5-1): a ``cells x cells``
    normal grid upsampled with Gaussian weights (two small matrix products)."""
    cells = max(2, min(cells, size))
    low = rng.standard_normal((cells + 2, cells + 2)).astype(np.float32)
    a = _upsampler(size, cells)
    return a @ low @ a.T


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


@dataclass
class _Lung:
    side: int  # +1: image right (patient's left), -1: image left (patient's right)
    u_med: float
    u_lat: float
    y_apex: float
    y_cp: float
    mask: np.ndarray  # bool [H, W], whole lung incl. retrocardiac part


@dataclass
class Anatomy:
    """A drawn chest without findings, markers or acquisition effects.

    Attributes:
        density: float32 ``[H, W]``, roughly in [0, 1], bright = dense.
        lung_mask: bool ``[H, W]``, lung fields (both lungs, heart excluded): the ground truth.
        body_mask: bool ``[H, W]``, inside the body outline.
        lungs: per-lung geometry (for placing findings).
        grid: ``(yy, xx)`` normalised coordinates in [-1, 1], each ``[H, W]``.
    """

    density: np.ndarray
    lung_mask: np.ndarray
    body_mask: np.ndarray
    lungs: list[_Lung]
    grid: tuple[np.ndarray, np.ndarray]


def _to_pixels(x: np.ndarray, y: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    return (y + 1.0) * 0.5 * (size - 1), (x + 1.0) * 0.5 * (size - 1)


def _fill_polygon(rows: np.ndarray, cols: np.ndarray, size: int) -> np.ndarray:
    img = Image.new("L", (size, size), 0)
    ImageDraw.Draw(img).polygon(list(zip(cols.tolist(), rows.tolist(), strict=True)), fill=1)
    return np.asarray(img, dtype=bool)


def _lung_outline(rng: np.random.Generator, side: int, g: dict[str, float]) -> dict[str, Any]:
    """Closed outline (u outward from the midline, y down) of one lung, randomised."""
    left = side > 0  # patient's left lung: smaller, lower dome
    u_med = g["u_med"] + rng.normal(0, 0.012) + (0.015 if left else 0.0)
    u_lat = g["u_lat"] + rng.normal(0, 0.025) - (0.02 if left else 0.0)
    y_apex = g["y_apex"] + rng.normal(0, 0.02)
    y_cp = g["y_cp"] + rng.normal(0, 0.025) + (0.035 if left else 0.0)
    dome_h = rng.uniform(0.15, 0.24)
    u_ap = u_med + (u_lat - u_med) * rng.uniform(0.35, 0.5)
    u_pk = u_med + (u_lat - u_med) * rng.uniform(0.35, 0.55)
    y_pk = y_cp - dome_h
    y_mb = y_pk + rng.uniform(0.02, 0.07)
    p_lat = rng.uniform(0.4, 0.6)
    p_med = rng.uniform(0.3, 0.5)

    t = np.linspace(0.0, 1.0, 48)
    # lateral edge: apex -> costophrenic angle (horizontal tangent at the apex, vertical below)
    lat_u = u_ap + (u_lat - u_ap) * np.sin(0.5 * np.pi * t) ** p_lat
    lat_y = y_apex + (y_cp - y_apex) * t
    # diaphragm dome: costophrenic angle -> medial end
    du = np.linspace(u_lat, u_med, 48)
    dome_y = np.where(
        du >= u_pk,
        y_pk + (y_cp - y_pk) * ((du - u_pk) / max(u_lat - u_pk, 1e-3)) ** 2,
        y_pk + (y_mb - y_pk) * ((u_pk - du) / max(u_pk - u_med, 1e-3)) ** 2,
    )
    # medial edge: bottom -> apex
    med_y = y_mb + (y_apex - y_mb) * t
    med_u = u_ap - (u_ap - u_med) * np.sin(0.5 * np.pi * (1.0 - t)) ** p_med
    u = np.concatenate([lat_u, du[1:], med_u[1:]])
    y = np.concatenate([lat_y, dome_y[1:], med_y[1:]])
    # low-frequency radial wobble around the lung centre
    cu, cy = u.mean(), y.mean()
    ang = np.arctan2(y - cy, u - cu)
    wob = np.zeros_like(ang)
    for k in (2, 3, 4):
        wob += rng.normal(0, 0.012) * np.sin(k * ang + rng.uniform(0, 2 * np.pi))
    u = cu + (u - cu) * (1.0 + wob)
    y = cy + (y - cy) * (1.0 + wob)
    return {"u": u, "y": y, "u_med": u_med, "u_lat": u_lat, "y_apex": y_apex, "y_cp": y_cp}


def _real_lungs(
    shapes: np.ndarray,
    size: int,
    rng: np.random.Generator,
    g: dict[str, float],
    scale: float,
    cx: float,
    cy: float,
) -> list[_Lung]:
    """The two lungs (image left, image right) from a sampled real pair fitted into the box the
    drawn lungs would span (``g``, patient frame); geometry in the patient frame as drawn."""

    top, bot = _to_pixels(
        np.zeros(2), np.array([g["y_apex"], g["y_cp"] + 0.02]) * scale + cy, size
    )[0]
    lo, hi = _to_pixels(np.array([-g["u_lat"], g["u_lat"]]) * scale + cx, np.zeros(2), size)[1]
    pair = sample_lung_pair(shapes, size, rng, box=(top, bot, lo, hi))
    lin = np.linspace(-1.0, 1.0, size)
    lungs = []
    for side, m in zip((-1, 1), pair, strict=True):
        rows, cols = np.nonzero(m)
        if rows.size == 0:  # warped out of the frame: cannot happen with a box inside it
            raise ValueError("sampled lung shape is empty")
        u = side * (lin[cols] - cx) / scale
        y = (lin[rows] - cy) / scale
        lungs.append(_Lung(side, float(u.min()), float(u.max()), float(y.min()), float(y.max()), m))
    return lungs


def _band(dist: np.ndarray, half: float) -> np.ndarray:
    """Bone-like band profile across ``dist``: plateau with brighter cortical edges."""
    a = np.abs(dist) / half
    return 1.0 / (1.0 + a**8) * (0.75 + 0.25 * np.exp(-(((a - 0.9) / 0.25) ** 2)))


def draw_anatomy(
    size: int, rng: np.random.Generator, lung_shapes: np.ndarray | None = None
) -> Anatomy:
    """Draw a normal chest (no findings) of ``size x size`` pixels from ``rng``.

    ``lung_shapes``: bool ``[N, 2, S, S]`` real lung pairs (:mod:`synthetic.lung_shapes`); when
    given, one pair, slightly warped into the drawn lungs' bounding box, replaces the drawn lung
    outlines (heart, ribs, diaphragm and the mask rule are unchanged).

    Returns:
        :class:`Anatomy` with density ``[size, size]`` float32 and masks ``[size, size]`` bool.
    """
    lin = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    yy, xx = np.meshgrid(lin, lin, indexing="ij")
    px = 2.0 / max(size - 1, 1)  # one pixel in normalised units

    scale = rng.uniform(0.93, 1.05)
    cx = rng.normal(0.0, 0.02)
    cy = rng.normal(0.0, 0.02)
    xs = (xx - cx) / scale  # patient frame
    ys = (yy - cy) / scale

    # body outline: neck, sloping shoulders, torso
    torso = rng.uniform(0.9, 1.02)
    neck = rng.uniform(0.2, 0.26)
    y_sh = rng.uniform(-0.8, -0.7)
    hw = neck + (torso - neck) * _sigmoid((ys - y_sh) / 0.06)
    hw = hw * (1.0 - 0.05 * np.clip((ys - 0.55) / 0.4, 0, 1))
    body = _sigmoid((hw - np.abs(xs)) / (1.5 * px + 0.01))
    body_mask = body > 0.5
    rel = np.clip(np.abs(xs) / hw, 0, 1)
    thick = np.sqrt(np.clip(1.0 - rel**2, 0, 1))
    density = body * (0.4 + 0.2 * thick)
    density += body * 0.08 * np.clip((ys - 0.35) / 0.4, 0, 1)  # abdomen
    density += body * 0.05 * smooth_noise(rng, size, 5)

    # lungs
    g = {
        "u_med": rng.uniform(0.05, 0.09),
        "u_lat": rng.uniform(0.7, 0.8),
        "y_apex": rng.uniform(-0.66, -0.56),
        "y_cp": rng.uniform(0.42, 0.56),
    }
    lungs: list[_Lung] = []
    lung_full = np.zeros((size, size), dtype=bool)
    if lung_shapes is not None:
        lungs = _real_lungs(lung_shapes, size, rng, g, scale, cx, cy)
    for side in (-1, 1):
        if lung_shapes is not None:
            lung_full |= lungs[(side + 1) // 2].mask
            continue
        o = _lung_outline(rng, side, g)
        x = (side * o["u"]) * scale + cx
        y = o["y"] * scale + cy
        r, c = _to_pixels(x, y, size)
        m = _fill_polygon(r, c, size)
        lungs.append(_Lung(side, o["u_med"], o["u_lat"], o["y_apex"], o["y_cp"], m))
        lung_full |= m

    # heart: rotated ellipse, apex towards the image right (patient's left)
    hx, hy = rng.uniform(0.1, 0.17), rng.uniform(0.2, 0.28)
    rx, ry = rng.uniform(0.32, 0.39), rng.uniform(0.22, 0.27)
    th = rng.uniform(-0.4, -0.15)
    dx, dy = xs - hx, ys - hy
    hu = (dx * np.cos(th) + dy * np.sin(th)) / rx
    hv = (-dx * np.sin(th) + dy * np.cos(th)) / ry
    heart_r = np.sqrt(hu**2 + hv**2)
    heart_mask = heart_r < 1.0
    heart = _sigmoid((1.0 - heart_r) / 0.03)

    lung_mask = lung_full & ~heart_mask & body_mask

    # lung air: darker in the middle/lateral zones, less at apex and bases
    sig = max(0.6, 1.2 * size / 256)
    lung_soft = ndimage.gaussian_filter(lung_full.astype(np.float32), sig)
    vert = np.clip((ys + 0.6) / 0.5, 0, 1) * np.clip((0.75 - ys) / 0.5, 0, 1)
    lat = np.clip(np.abs(xs) / 0.35, 0, 1)
    depth = 0.30 + 0.1 * vert + 0.06 * lat + 0.03 * smooth_noise(rng, size, 6)
    density -= lung_soft * depth * (1.0 - 0.6 * heart)  # the heart hides the lung behind it

    # vessels: ridges of band-limited fields, strongest near the hila
    hil_y = rng.uniform(-0.15, -0.02)
    ridge = np.exp(-((smooth_noise(rng, size, max(8, size // 14)) / 0.25) ** 2))
    fine = np.exp(-((smooth_noise(rng, size, max(12, size // 8)) / 0.3) ** 2))
    d_hil = np.sqrt((np.abs(xs) - 0.14) ** 2 + (ys - hil_y) ** 2)
    density += lung_soft * (0.09 * ridge * np.exp(-d_hil / 0.3) + 0.04 * fine)
    density += lung_soft * 0.12 * np.exp(-((d_hil / 0.09) ** 2))  # hilar shadows

    # mediastinum (aortic knob) and heart as one opaque shadow, trachea
    y_top_heart = hy - ry * 0.8
    wm = 0.085 + 0.05 * np.exp(-(((ys + 0.3) / 0.08) ** 2)) * (xs > 0)
    medi = _sigmoid((wm - np.abs(xs - 0.01)) / 0.015) * _sigmoid((y_top_heart + 0.1 - ys) / 0.05)
    y_cut = 0.5 * (lungs[0].y_cp + lungs[1].y_cp) * scale + cy - 0.12
    heart = heart * _sigmoid((y_cut - yy) / 0.03)  # merges into the abdomen below the domes
    density += np.maximum(0.24 * medi, 0.3 * heart) * body
    trachea = _sigmoid((0.028 - np.abs(xs + 0.005)) / 0.006) * _sigmoid((-0.25 - ys) / 0.04)
    density -= 0.09 * trachea * body

    # spine with vertebrae (faint behind the mediastinum)
    spine = _sigmoid((0.065 - np.abs(xs)) / 0.01) * body
    period = rng.uniform(0.085, 0.1)
    vert_pat = 0.5 + 0.5 * np.cos(2 * np.pi * (ys - rng.uniform(0, period)) / period)
    density += spine * (0.03 + 0.035 * np.clip(vert_pat * 1.4 - 0.2, 0, 1))

    # ribs: posterior (arched: up, then down laterally) and anterior (down towards the
    # midline), both sides; clearer over the lungs than over soft tissue
    u = np.abs(xs)
    y0 = rng.uniform(-0.74, -0.68)
    step = rng.uniform(0.1, 0.115)
    curv = rng.uniform(0.8, 1.0)
    bone = np.zeros_like(density)
    for side in (-1, 1):
        on_side = (xs * side) > 0.05
        fade = _sigmoid((hw - 0.04 - u) / 0.03) * _sigmoid((u - 0.07) / 0.02) * on_side
        for i in range(10):
            c2 = curv * (1.0 - 0.03 * i)
            yc = y0 + i * step - 0.6 * c2 * u + c2 * u**2 + rng.normal(0, 0.008)
            bone += 0.075 * _band(ys - yc, 0.02 + 0.0015 * i) * fade
        afade = fade * _sigmoid((u - 0.3) / 0.03)
        for i in range(7):
            yc = y0 + 0.02 + i * step * 1.05 + 0.45 * (0.8 - u)
            bone += 0.035 * _band(ys - yc, 0.022) * afade
        # clavicle: from the sternal end laterally and upwards to the shoulder
        yc = -0.62 + rng.normal(0, 0.02) - 0.18 * np.clip(u - 0.1, 0, None) + 0.2 * (u - 0.4) ** 2
        cfade = _sigmoid((u - 0.06) / 0.02) * _sigmoid((0.68 - u) / 0.03)
        bone += 0.12 * _band(ys - yc, 0.03) * cfade * ((xs * side) > 0)
    density += bone * body * (0.55 + 0.45 * lung_soft)

    # gastric bubble under the left dome
    left = lungs[1]
    gx = rng.uniform(0.3, 0.45)
    gy = left.y_cp - 0.02 + rng.uniform(0.0, 0.08)
    gb = np.exp(-((((xs - gx) / 0.09) ** 2 + ((ys - gy) / 0.05) ** 2) ** 2))
    density -= 0.12 * gb * body * ~lung_full

    density = np.clip(density, 0.0, None).astype(np.float32)
    return Anatomy(density, lung_mask, body_mask, lungs, (yy, xx))


# --------------------------------------------------------------------------------------------
# Findings
# --------------------------------------------------------------------------------------------


def finding_amplitude(label: str, difficulty: float) -> float:
    """Peak density added by a class's finding (lung air is ~0.3-0.45 darker than tissue)."""
    d = float(np.clip(difficulty, 0.0, 1.0))
    if label == "pneumonia":
        return 0.36 * (1.0 - 0.7 * d)
    if label == "covid":
        return 0.3 * (1.0 - 0.65 * d)
    return 0.0


def draw_finding(
    label: str, anatomy: Anatomy, difficulty: float, rng: np.random.Generator
) -> np.ndarray:
    """Density ``[H, W]`` float32 added by the class's finding, zero outside the lung fields.

    ``pneumonia``: one or two soft-edged, textured consolidations in one lung.
    ``covid``: bilateral hazy opacities weighted to the periphery and the lower zones.
    ``difficulty`` in [0, 1] lowers amplitude and size.
    """
    if label not in CLASSES:
        raise ValueError(f"unknown class {label!r}; expected one of {CLASSES}")
    size = anatomy.density.shape[0]
    yy, xx = anatomy.grid
    out = np.zeros((size, size), dtype=np.float32)
    if label == "normal":
        return out
    amp = finding_amplitude(label, difficulty)
    shrink = 1.0 - 0.25 * float(np.clip(difficulty, 0, 1))
    tex = smooth_noise(rng, size, max(6, size // 16))
    if label == "pneumonia":
        lung = anatomy.lungs[int(rng.integers(0, 2))]
        field = lung.mask & anatomy.lung_mask
        rows, cols = np.nonzero(field)
        if rows.size == 0:
            return out
        for _ in range(int(rng.integers(1, 3))):
            k = int(rng.integers(0, rows.size))
            by, bx = yy[rows[k], cols[k]], xx[rows[k], cols[k]]
            r = rng.uniform(0.1, 0.17) * shrink
            e = rng.uniform(0.7, 1.3)
            dist = np.sqrt(((xx - bx) / (r * e)) ** 2 + ((yy - by) * e / r) ** 2)
            dist = dist * (1.0 + 0.2 * tex)
            blob = np.clip(1.0 - dist**2, 0.0, 1.0) ** 1.5
            out = np.maximum(out, blob * (0.85 + 0.15 * tex))
    else:  # covid
        haze = _sigmoid((smooth_noise(rng, size, 7) + 0.3) / 0.35)
        w = np.zeros_like(out)
        for lung in anatomy.lungs:
            u = lung.side * xx
            per = np.clip((u - lung.u_med) / max(lung.u_lat - lung.u_med, 1e-3), 0, 1) ** 1.3
            low = 0.45 + 0.55 * np.clip(
                (yy - lung.y_apex) / max(lung.y_cp - lung.y_apex, 1e-3), 0, 1
            )
            w = np.where(lung.mask, per * low, w)
        out = haze * w * (0.85 + 0.15 * tex)
    return (amp * out * anatomy.lung_mask).astype(np.float32)
