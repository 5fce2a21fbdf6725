"""Multi-site synthetic chest X-rays with a controllable background bias ("phantom" mode).

Every image is a seeded, vectorised drawing of a PA chest radiograph: body outline, two lungs of
randomised shape, heart and mediastinum, spine, ribs, clavicles, diaphragm domes, hila, vessels.
The class is defined ONLY by a finding inside the lung fields:

* ``normal``: none;
* ``pneumonia``: one or two dense, soft-edged consolidations in one lung;
* ``covid``: bilateral, peripheral, lower-zone hazy ground-glass opacities.

Each :class:`SiteConfig` fixes the acquisition (CR/DX, MONOCHROME1/2, bits stored, window tags,
rescale, gamma, noise, blur, pixel spacing, collimation) and a background *bias marker* style
(lead letter, burned-in text, shape, border pattern) placed outside the lungs. The marker's class
agrees with the image's class with a per-site probability (see :func:`assign_bias`), which is the
shortcut an ordinary classifier takes and an ISNet should ignore.

Files written by :func:`make_dataset`::

    out_dir/manifest.csv                      image,label,site,mask,patient_id,split,bias
    out_dir/images/<site>/<site>_<i>.dcm      CR or DX DICOM, 16-bit, fake patient header
    out_dir/masks/<site>/<site>_<i>.png       lung fields (heart excluded), 0/255, same size

Determinism: each image is drawn from ``np.random.SeedSequence(seed, spawn_key=(site key, i))``
split into independent streams (anatomy, finding, marker, noise, header), so the same seed gives
the same pixel data whatever the number of workers, and a finding can be switched off without
changing any other pixel.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import os
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

CLASSES: tuple[str, ...] = ("normal", "pneumonia", "covid")
MARKER_STYLES: tuple[str, ...] = ("letter", "text", "shape", "border", "none")
MARKER_CORNERS: tuple[str, ...] = ("top-left", "top-right", "bottom-left", "bottom-right")
MANIFEST_COLUMNS: tuple[str, ...] = (
    "image",
    "label",
    "site",
    "mask",
    "patient_id",
    "split",
    "bias",
)
SPLIT_FRACTIONS: tuple[float, float, float] = (0.70, 0.15, 0.15)

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation

# Per-class marker content for each style (index = class index in CLASSES).
_LETTERS = ("L", "R", "A")
# Lead-marker (block, glyph) display values per class: the blocks differ in brightness (bright,
# mid-grey, dark) so the marker's class stays readable after down-sampling to 64 px, where an
# 8-pixel glyph alone (L vs R vs A) is nearly unreadable and the shortcut would be too subtle.
_LETTER_TONES = ((0.93, 0.35), (0.55, 0.05), (0.12, 0.9))
_WORDS = ("ERECT", "PORTABLE", "ICU")
_SHAPES = ("square", "triangle", "disc")

_FAKE_GIVEN = ("ALEX", "SAM", "JORDAN", "KIM", "ROBIN", "CHRIS", "NOA", "ELI", "MAX", "ANDY")
_FAKE_FAMILY = ("DOE", "ROE", "SMITH", "MARTIN", "GARCIA", "MUELLER", "ROSSI", "SILVA", "NOVAK")


@dataclass(frozen=True)
class SiteConfig:
    """One synthetic acquisition site.

    Attributes:
        name: site name (manifest ``site`` column, folder name; letters, digits, ``-``, ``_``).
        bias_correlation: probability in [0, 1] that an image carries its own class's marker;
            otherwise the marker is drawn independently of the class: none or one of the three
            class markers, each with probability 1/4 (see :func:`assign_bias`).
        confounding: if True every image carries the marker of a *different* class (uniform over
            the other classes) and ``bias_correlation`` is ignored.
        marker_style: ``letter`` (lead marker block with L/R/A; the block is bright / grey /
            dark per class), ``text`` (burned-in text, PIL bitmap font: ERECT/PORTABLE/ICU),
            ``shape`` (square/triangle/disc), ``border`` (solid/dashed/dotted band along the top
            edge), or ``none`` (no markers at all).
        marker_corner: preferred corner for letter/text/shape markers (others tried if the lungs
            are in the way).
        modality: ``CR`` or ``DX`` (SOP class chosen accordingly).
        photometric: ``MONOCHROME2`` (high = bright) or ``MONOCHROME1`` (stored inverted).
        bits_stored: 10, 12, 14 or 15 (BitsAllocated is always 16).
        window_center, window_width: VOI window as fractions of the stored range, in display
            orientation (0 = black, 1 = white); written as WindowCenter/Width in modality units.
        rescale_slope, rescale_intercept: RescaleSlope/Intercept tags (modality = slope*stored+int).
        noise: standard deviation of the additive detector noise (display units, 0..1).
        gamma: contrast curve exponent applied to the [0, 1] density image (< 1 brightens).
        pixel_spacing_mm: ImagerPixelSpacing at 256 px (scaled by 256/size for other sizes).
        blur: Gaussian blur sigma in pixels at 256 px (detector/processing resolution).
        collimation: width of the collimator frame bands as a fraction of the image side.
        collimation_bright: frame bands bright (unexposed) or dark (processed/cropped).
        view_position: ``PA`` or ``AP``.
        manufacturer: Manufacturer tag.
        seed_key: name used to derive per-image seeds (default: ``name``). Sites sharing a key
            get the same anatomy and findings (used by the bias test sets).
    """

    name: str
    bias_correlation: float = 0.0
    confounding: bool = False
    marker_style: str = "letter"
    marker_corner: str = "top-left"
    modality: str = "DX"
    photometric: str = "MONOCHROME2"
    bits_stored: int = 12
    window_center: float = 0.5
    window_width: float = 1.0
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    noise: float = 0.015
    gamma: float = 1.0
    pixel_spacing_mm: float = 1.5
    blur: float = 0.6
    collimation: float = 0.0
    collimation_bright: bool = True
    view_position: str = "PA"
    manufacturer: str = "SynthRay"
    seed_key: str | None = None

    def __post_init__(self) -> None:
        problems = []
        if not self.name or not all(c.isalnum() or c in "-_" for c in self.name):
            problems.append(f"name {self.name!r} must be non-empty letters, digits, '-' or '_'")
        if not 0.0 <= self.bias_correlation <= 1.0:
            problems.append(f"bias_correlation {self.bias_correlation} is not in [0, 1]")
        if self.marker_style not in MARKER_STYLES:
            problems.append(f"marker_style {self.marker_style!r} is not one of {MARKER_STYLES}")
        if self.marker_corner not in MARKER_CORNERS:
            problems.append(f"marker_corner {self.marker_corner!r} is not one of {MARKER_CORNERS}")
        if self.modality not in ("CR", "DX"):
            problems.append(f"modality {self.modality!r} must be 'CR' or 'DX'")
        if self.photometric not in ("MONOCHROME1", "MONOCHROME2"):
            problems.append(f"photometric {self.photometric!r} must be MONOCHROME1 or MONOCHROME2")
        if self.bits_stored not in (10, 12, 14, 15, 16):
            problems.append(f"bits_stored {self.bits_stored} must be 10, 12, 14, 15 or 16")
        if not 0.0 < self.window_width <= 2.0:
            problems.append(f"window_width {self.window_width} must be in (0, 2]")
        if self.rescale_slope <= 0:
            problems.append(f"rescale_slope {self.rescale_slope} must be > 0")
        if not 0.0 <= self.noise <= 0.2:
            problems.append(f"noise {self.noise} must be in [0, 0.2]")
        if not 0.2 <= self.gamma <= 5.0:
            problems.append(f"gamma {self.gamma} must be in [0.2, 5]")
        if self.pixel_spacing_mm <= 0:
            problems.append(f"pixel_spacing_mm {self.pixel_spacing_mm} must be > 0")
        if not 0.0 <= self.blur <= 5.0:
            problems.append(f"blur {self.blur} must be in [0, 5]")
        if not 0.0 <= self.collimation <= 0.08:
            problems.append(f"collimation {self.collimation} must be in [0, 0.08]")
        if self.view_position not in ("PA", "AP"):
            problems.append(f"view_position {self.view_position!r} must be 'PA' or 'AP'")
        if problems:
            raise ValueError(f"SiteConfig {self.name!r}: " + "; ".join(problems))

    @property
    def key(self) -> str:
        return self.seed_key or self.name


def default_sites() -> list[SiteConfig]:
    """The embedded default: two strongly biased training sites and one clean external site.

    ``hospital-a``: CR, MONOCHROME1, 15 bits, bright collimation, lead-letter markers, corr 0.95.
    ``hospital-b``: DX, MONOCHROME2, 12 bits, dark frame, burned-in text markers, corr 0.90.
    ``hospital-c``: DX, MONOCHROME2, 14 bits, shape markers independent of the class (corr 0).
    """
    return [
        SiteConfig(
            name="hospital-a",
            bias_correlation=0.95,
            marker_style="letter",
            marker_corner="top-left",
            modality="CR",
            photometric="MONOCHROME1",
            bits_stored=15,
            window_center=0.5,
            window_width=1.0,
            rescale_slope=1.0,
            rescale_intercept=0.0,
            noise=0.02,
            gamma=0.9,
            pixel_spacing_mm=1.4,
            blur=0.8,
            collimation=0.04,
            collimation_bright=True,
            manufacturer="SynthRay CR-1",
        ),
        SiteConfig(
            name="hospital-b",
            bias_correlation=0.90,
            marker_style="text",
            marker_corner="top-right",
            modality="DX",
            photometric="MONOCHROME2",
            bits_stored=12,
            window_center=0.48,
            window_width=0.9,
            rescale_slope=1.0,
            rescale_intercept=-1024.0,
            noise=0.012,
            gamma=1.15,
            pixel_spacing_mm=1.6,
            blur=0.4,
            collimation=0.025,
            collimation_bright=False,
            view_position="AP",
            manufacturer="SynthRay DR-2",
        ),
        SiteConfig(
            name="hospital-c",
            bias_correlation=0.0,
            marker_style="shape",
            marker_corner="top-right",
            modality="DX",
            photometric="MONOCHROME2",
            bits_stored=14,
            window_center=0.52,
            window_width=1.0,
            rescale_slope=0.5,
            rescale_intercept=0.0,
            noise=0.025,
            gamma=1.0,
            pixel_spacing_mm=1.5,
            blur=1.1,
            collimation=0.0,
            manufacturer="SynthRay DR-3",
        ),
    ]


# --------------------------------------------------------------------------------------------
# Random streams
# --------------------------------------------------------------------------------------------


@dataclass
class _Streams:
    """Independent generators for one image (so switching a part off leaves the rest unchanged)."""

    anatomy: np.random.Generator
    finding: np.random.Generator
    marker: np.random.Generator
    noise: np.random.Generator
    header: np.random.Generator
    bias: np.random.Generator
    entropy: str

    @classmethod
    def from_seed(cls, seed: np.random.SeedSequence) -> _Streams:
        # explicit child keys: SeedSequence.spawn() would advance the parent's counter, so a
        # second render from the same object would differ
        kids = [
            np.random.SeedSequence(seed.entropy, spawn_key=(*seed.spawn_key, j)) for j in range(6)
        ]
        gens = [np.random.default_rng(k) for k in kids]
        entropy = f"{seed.entropy}-{'-'.join(str(k) for k in seed.spawn_key)}"
        return cls(*gens, entropy=entropy)


def image_seed(seed: int, site: SiteConfig, index: int) -> np.random.SeedSequence:
    """The seed of image ``index`` of ``site``: independent of workers and of other sites."""
    return np.random.SeedSequence(seed, spawn_key=(zlib.crc32(site.key.encode()), index))


# --------------------------------------------------------------------------------------------
# Bias assignment
# --------------------------------------------------------------------------------------------


def assign_bias(site: SiteConfig, label: str, rng: np.random.Generator) -> str:
    """The class whose marker an image of class ``label`` carries ('' for none).

    * ``marker_style == "none"``: always ''.
    * ``confounding``: a class other than ``label``, uniformly.
    * otherwise: ``label`` with probability ``bias_correlation``; else drawn independently of the
      class from {none, normal, pneumonia, covid} uniformly. The expected fraction of images whose
      marker equals their class is therefore ``p + (1 - p) / 4`` (see :func:`expected_agreement`).
    """
    if label not in CLASSES:
        raise ValueError(f"unknown class {label!r}; expected one of {CLASSES}")
    if site.marker_style == "none":
        return ""
    u = rng.random()
    pick = int(rng.integers(0, 4))
    if site.confounding:
        others = [c for c in CLASSES if c != label]
        return others[pick % len(others)]
    if u < site.bias_correlation:
        return label
    return "" if pick == 3 else CLASSES[pick]


def expected_agreement(site: SiteConfig) -> float:
    """Expected fraction of a site's images whose marker class equals the image class."""
    if site.marker_style == "none" or site.confounding:
        return 0.0
    p = site.bias_correlation
    return p + (1.0 - p) / 4.0


# --------------------------------------------------------------------------------------------
# Anatomy
# --------------------------------------------------------------------------------------------


def _upsampler(size: int, cells: int) -> np.ndarray:
    """``[size, cells + 2]`` row-normalised Gaussian interpolation weights (separable)."""
    pos = np.linspace(0.5, cells + 0.5, size)[:, None]
    w = np.exp(-(((pos - np.arange(cells + 2)[None, :]) / 0.75) ** 2))
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
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
    from pipeline.lung_shapes import sample_lung_pair

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

    ``lung_shapes``: bool ``[N, 2, S, S]`` real lung pairs (:mod:`pipeline.lung_shapes`); when
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
    density += body * 0.05 * _smooth_noise(rng, size, 5)

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
    depth = 0.30 + 0.1 * vert + 0.06 * lat + 0.03 * _smooth_noise(rng, size, 6)
    density -= lung_soft * depth * (1.0 - 0.6 * heart)  # the heart hides the lung behind it

    # vessels: ridges of band-limited fields, strongest near the hila
    hil_y = rng.uniform(-0.15, -0.02)
    ridge = np.exp(-((_smooth_noise(rng, size, max(8, size // 14)) / 0.25) ** 2))
    fine = np.exp(-((_smooth_noise(rng, size, max(12, size // 8)) / 0.3) ** 2))
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
    tex = _smooth_noise(rng, size, max(6, size // 16))
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
        haze = _sigmoid((_smooth_noise(rng, size, 7) + 0.3) / 0.35)
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


# --------------------------------------------------------------------------------------------
# One image
# --------------------------------------------------------------------------------------------


def _single_threaded_blas() -> contextlib.AbstractContextManager[Any]:
    """Limit BLAS to one thread: the tiny matrix products here are slower multi-threaded,
    badly so on a busy machine (uses threadpoolctl when installed)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional speed-up
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


@dataclass
class SyntheticCase:
    """One rendered radiograph.

    Attributes:
        display: float32 ``[H, W]`` in [0, 1], bright = dense (what a viewer shows).
        stored: uint16 ``[H, W]``, the DICOM stored values (inverted for MONOCHROME1).
        mask: bool ``[H, W]`` lung fields (ground truth).
        body: bool ``[H, W]`` inside the body outline.
        marker: bool ``[H, W]`` pixels of the burned-in bias marker (all False when none).
        finding: float32 ``[H, W]`` density added by the finding (zero outside the lungs).
        label: class name; ``bias``: the marker's class ('' for none).
    """

    display: np.ndarray
    stored: np.ndarray
    mask: np.ndarray
    body: np.ndarray
    marker: np.ndarray
    finding: np.ndarray
    label: str
    bias: str
    streams: _Streams = field(repr=False)


def render_case(
    site: SiteConfig,
    label: str,
    seed: np.random.SeedSequence | int,
    *,
    size: int = 256,
    difficulty: float = 0.5,
    with_finding: bool = True,
    bias: str | None = None,
    lung_shapes: np.ndarray | None = None,
) -> SyntheticCase:
    """Render one image of ``site`` and class ``label``.

    Args:
        seed: the image's seed (see :func:`image_seed`), or an int.
        with_finding: False draws the same image without its finding (for tests).
        bias: force the marker class ('' for none); default: :func:`assign_bias`.
        lung_shapes: real lung pairs ``[N, 2, S, S]`` to use instead of drawn lungs
            (:func:`pipeline.lung_shapes.load_lung_shapes`); None draws them.
    """
    if label not in CLASSES:
        raise ValueError(f"unknown class {label!r}; expected one of {CLASSES}")
    if size < 32:
        raise ValueError(f"size {size} is too small; use at least 32 pixels")
    if not 0.0 <= difficulty <= 1.0:
        raise ValueError(f"difficulty {difficulty} is not in [0, 1]")
    with _single_threaded_blas():
        return _render(site, label, seed, size, difficulty, with_finding, bias, lung_shapes)


def _render(
    site: SiteConfig,
    label: str,
    seed: np.random.SeedSequence | int,
    size: int,
    difficulty: float,
    with_finding: bool,
    bias: str | None,
    lung_shapes: np.ndarray | None = None,
) -> SyntheticCase:
    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    st = _Streams.from_seed(ss)
    marker_cls = assign_bias(site, label, st.bias) if bias is None else bias

    anat = draw_anatomy(size, st.anatomy, lung_shapes)
    finding = draw_finding(label, anat, difficulty, st.finding)
    if not with_finding:
        finding = np.zeros_like(finding)
    return acquire(
        site, anat.density, finding, anat.lung_mask, anat.body_mask, label, marker_cls, st
    )


def acquire(
    site: SiteConfig,
    density: np.ndarray,
    finding: np.ndarray,
    lung_mask: np.ndarray,
    body_mask: np.ndarray,
    label: str,
    marker_cls: str,
    st: _Streams,
) -> SyntheticCase:
    """Turn a drawn chest into a site's radiograph: blur, gamma, noise, bias marker,
    collimation, quantisation to ``bits_stored`` (inverted for MONOCHROME1).

    Args:
        density: float32 ``[H, W]`` anatomy in [0, 1], bright = dense.
        finding: float32 ``[H, W]`` density added by the finding (masked to the lungs here).
        lung_mask, body_mask: bool ``[H, W]``.
        marker_cls: the marker's class ('' for none).
    """
    size = density.shape[0]
    res = size / 256.0
    coll = round(site.collimation * size)
    exposed = np.zeros((size, size), dtype=bool)
    exposed[coll : size - coll, coll : size - coll] = True
    mask = lung_mask & exposed
    finding = (finding * mask).astype(np.float32)

    sigma = site.blur * res
    if sigma > 0:
        density = ndimage.gaussian_filter(density, sigma)
        finding = ndimage.gaussian_filter(finding, sigma) * mask
    v = np.clip(density + finding, 0.0, 1.0) ** site.gamma
    v = v + site.noise * st.noise.standard_normal(v.shape).astype(np.float32)
    v = v + 0.5 * site.noise * _smooth_noise(st.noise, size, 8)

    marker = np.zeros((size, size), dtype=bool)
    if marker_cls:
        placed = place_marker(site, marker_cls, mask, coll, st.marker)
        if placed is None:
            marker_cls = ""
        else:
            vals, marker = placed
            v = np.where(marker, vals, v)

    if coll > 0:
        frame = 0.97 if site.collimation_bright else 0.03
        v = np.where(exposed, v, frame + 0.3 * site.noise * st.noise.standard_normal(v.shape))
    v = np.clip(v, 0.0, 1.0).astype(np.float32)

    maxval = (1 << site.bits_stored) - 1
    stored = np.round(v.astype(np.float64) * maxval).astype(np.uint16)
    if site.photometric == "MONOCHROME1":
        stored = (maxval - stored).astype(np.uint16)
    display = (stored.astype(np.float32) / maxval).astype(np.float32)
    if site.photometric == "MONOCHROME1":
        display = 1.0 - display
    return SyntheticCase(
        display=display,
        stored=stored,
        mask=mask,
        body=body_mask,
        marker=marker,
        finding=finding,
        label=label,
        bias=marker_cls,
        streams=st,
    )


# --------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------


def window_tags(site: SiteConfig) -> tuple[float, float]:
    """(WindowCenter, WindowWidth) in modality units (slope * stored + intercept)."""
    maxval = (1 << site.bits_stored) - 1
    c = site.window_center if site.photometric == "MONOCHROME2" else 1.0 - site.window_center
    center = site.rescale_slope * c * maxval + site.rescale_intercept
    width = site.rescale_slope * site.window_width * maxval
    return round(center, 2), round(width, 2)


def write_dicom(
    path: str | os.PathLike,
    stored: np.ndarray,
    site: SiteConfig,
    rng: np.random.Generator,
    entropy: str,
    size: int,
) -> Path:
    """Write ``stored`` (uint16 ``[H, W]``) as a CR/DX DICOM with a fake, seeded patient header."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    path = Path(path)
    sop_class = CR_STORAGE if site.modality == "CR" else DX_STORAGE
    sop_uid = generate_uid(entropy_srcs=[entropy, "sop"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = generate_uid(entropy_srcs=["isnet-cxr synthetic"])
    meta.ImplementationVersionName = "ISNETCXR_SYN"

    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[entropy, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[entropy, "series"])
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[entropy, "frame"])

    birth = _dt.date(1935, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 365 * 70)))
    study = _dt.date(2018, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 365 * 6)))
    ds.PatientName = f"{rng.choice(_FAKE_FAMILY)}^{rng.choice(_FAKE_GIVEN)}"
    ds.PatientID = f"{int(rng.integers(10**7, 10**8))}"
    ds.PatientBirthDate = birth.strftime("%Y%m%d")
    ds.PatientSex = str(rng.choice(["F", "M"]))
    ds.AccessionNumber = f"A{int(rng.integers(10**8, 10**9))}"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = f"{int(rng.integers(7, 20)):02d}1500"
    ds.StudyID = str(int(rng.integers(1, 99999)))
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ReferringPhysicianName = ""
    ds.InstitutionName = f"Synthetic {site.name}"
    ds.Manufacturer = site.manufacturer
    ds.Modality = site.modality
    ds.ConversionType = "WSD" if site.modality == "CR" else ""
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = site.view_position
    ds.PatientOrientation = ["L", "F"] if site.view_position == "AP" else ["R", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if site.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.DetectorType = "SCINTILLATOR"
        ds.RescaleType = "US"
    spacing = round(site.pixel_spacing_mm * 256.0 / size, 4)
    ds.ImagerPixelSpacing = [spacing, spacing]

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = site.photometric
    ds.Rows, ds.Columns = (int(n) for n in stored.shape)
    ds.BitsAllocated = 16
    ds.BitsStored = site.bits_stored
    ds.HighBit = site.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.RescaleSlope = f"{site.rescale_slope:g}"
    ds.RescaleIntercept = f"{site.rescale_intercept:g}"
    center, width = window_tags(site)
    ds.WindowCenter = f"{center:g}"
    ds.WindowWidth = f"{width:g}"
    ds.PixelData = np.ascontiguousarray(stored, dtype="<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


def _labels_and_splits(site: SiteConfig, n: int, seed: int) -> tuple[list[str], list[str]]:
    """Balanced, shuffled labels and a per-class 70/15/15 split for ``n`` images of a site."""
    rng = np.random.default_rng(
        np.random.SeedSequence(seed, spawn_key=(zlib.crc32(site.key.encode()), 1 << 30))
    )
    labels = np.array([CLASSES[i % len(CLASSES)] for i in range(n)])
    rng.shuffle(labels)
    splits = np.empty(n, dtype=object)
    for cls in CLASSES:
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        n_train = round(SPLIT_FRACTIONS[0] * idx.size)
        n_val = round(SPLIT_FRACTIONS[1] * idx.size)
        splits[idx[:n_train]] = "train"
        splits[idx[n_train : n_train + n_val]] = "val"
        splits[idx[n_train + n_val :]] = "test"
    return labels.tolist(), splits.tolist()


@dataclass(frozen=True)
class _Task:
    out_dir: str
    site: SiteConfig
    index: int
    label: str
    split: str
    seed: int
    size: int
    difficulty: float
    ct_dir: str = ""  # '' = phantom mode
    shapes_file: str = ""  # '' = drawn lungs, else a pipeline.lung_shapes cache file


def _make_one(task: _Task) -> dict[str, str]:
    site = task.site
    ss = image_seed(task.seed, site, task.index)
    if task.ct_dir:
        from pipeline.synthetic_ct import render_ct_case

        case = render_ct_case(
            site, task.label, ss, Path(task.ct_dir), size=task.size, difficulty=task.difficulty
        )
    else:
        shapes = None
        if task.shapes_file:
            from pipeline.lung_shapes import read_shapes

            shapes = read_shapes(task.shapes_file)
        case = render_case(
            site, task.label, ss, size=task.size, difficulty=task.difficulty, lung_shapes=shapes
        )
    stem = f"{site.name}_{task.index:05d}"
    rel_img = f"images/{site.name}/{stem}.dcm"
    rel_mask = f"masks/{site.name}/{stem}.png"
    out = Path(task.out_dir)
    write_dicom(
        out / rel_img, case.stored, site, case.streams.header, case.streams.entropy, task.size
    )
    (out / rel_mask).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((case.mask * 255).astype(np.uint8)).save(out / rel_mask)
    pid = hashlib.sha256(f"{site.key}:{task.seed}:{task.index}".encode()).hexdigest()[:12]
    return {
        "image": rel_img,
        "label": task.label,
        "site": site.name,
        "mask": rel_mask,
        "patient_id": f"syn-{pid}",
        "split": task.split,
        "bias": case.bias,
    }


def _run_tasks(tasks: list[_Task], workers: int | None, progress: bool) -> list[dict[str, str]]:
    from tqdm.auto import tqdm

    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    bar = tqdm(total=len(tasks), desc="synthetic CXR", unit="img", disable=not progress)
    try:
        if workers <= 1 or len(tasks) <= 4:
            rows = []
            for t in tasks:
                rows.append(_make_one(t))
                bar.update(1)
            return rows
        import multiprocessing as mp

        chunk = max(1, min(16, len(tasks) // (workers * 8)))
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            rows = []
            for row in pool.map(_make_one, tasks, chunksize=chunk):
                rows.append(row)
                bar.update(1)
            return rows
    finally:
        bar.close()


def _write_manifest(rows: list[dict[str, str]], path: Path) -> Path:
    import pandas as pd

    df = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    try:
        from pipeline.manifest import write_manifest
    except ImportError:  # pragma: no cover - the manifest module is part of the package
        path.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(path, index=False)
        return path
    return write_manifest(df, path)


def _build_tasks(
    out_dir: Path,
    sites: Sequence[SiteConfig],
    n_per_site: int,
    size: int,
    seed: int,
    difficulty: float,
    split: str | None = None,
    ct_dir: str = "",
    shapes_file: str = "",
) -> list[_Task]:
    tasks = []
    for site in sites:
        labels, splits = _labels_and_splits(site, n_per_site, seed)
        for i, (lab, spl) in enumerate(zip(labels, splits, strict=True)):
            tasks.append(
                _Task(
                    str(out_dir),
                    site,
                    i,
                    lab,
                    split or spl,
                    seed,
                    size,
                    difficulty,
                    ct_dir,
                    shapes_file,
                )
            )
    return tasks


def _prepare_mode(mode: str) -> str:
    """Validate ``mode``; for ``ct`` fetch the CT (once) and return its folder, else ''."""
    if mode == "phantom":
        return ""
    if mode == "ct":
        from pipeline.settings import Settings
        from pipeline.synthetic_ct import fetch_ct

        return str(fetch_ct(Settings.from_env()))
    raise ValueError(f"unknown mode {mode!r}; use 'phantom' or 'ct'")


def _check_args(sites: Sequence[SiteConfig], n_per_site: int, size: int, difficulty: float) -> None:
    if n_per_site < 1:
        raise ValueError(f"n_per_site must be >= 1, got {n_per_site}")
    if size < 32:
        raise ValueError(f"size {size} is too small; use at least 32 pixels")
    if not 0.0 <= difficulty <= 1.0:
        raise ValueError(f"difficulty {difficulty} is not in [0, 1]")
    names = [s.name for s in sites]
    if not names:
        raise ValueError("no sites given")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"site names must be unique; repeated: {', '.join(dup)}")


def make_dataset(
    out_dir: str | os.PathLike,
    sites: Sequence[SiteConfig] | None = None,
    n_per_site: int = 300,
    size: int = 256,
    seed: int = 0,
    difficulty: float = 0.5,
    workers: int | None = None,
    progress: bool = True,
    mode: str = "phantom",
    lung_shapes: str = "drawn",
) -> Path:
    """Generate a multi-site synthetic chest X-ray set; return ``out_dir/manifest.csv``.

    Args:
        out_dir: output folder (created).
        sites: site configurations; default :func:`default_sites`.
        n_per_site: images per site (classes balanced, split 70/15/15 per site and class).
        size: image side in pixels (all images ``size x size``).
        seed: master seed; same seed, same pixel data, whatever ``workers``.
        difficulty: 0 (obvious findings) .. 1 (subtle).
        workers: worker processes (default ``min(4, cpu_count)``; <= 1 runs in-process).
        progress: show a tqdm progress bar.
        mode: ``"phantom"`` (drawn anatomy, no download) or ``"ct"`` (radiographs projected
            from a real chest CT, see :mod:`pipeline.synthetic_ct`; fetches it once).
        lung_shapes: phantom mode only: ``"drawn"`` (default) or ``"real"`` (real lung-field
            shapes from :mod:`pipeline.lung_shapes`, fetched once, instead of drawn lungs).
    """
    sites = list(default_sites() if sites is None else sites)
    _check_args(sites, n_per_site, size, difficulty)
    ct_dir = _prepare_mode(mode)
    shapes_file = ""
    if lung_shapes == "real":
        if mode != "phantom":
            raise ValueError(f"lung_shapes='real' needs mode='phantom', got mode={mode!r}")
        from pipeline.lung_shapes import load_lung_shapes, shapes_path
        from pipeline.settings import Settings

        settings = Settings.from_env()
        load_lung_shapes(settings)
        shapes_file = str(shapes_path(settings))
    elif lung_shapes != "drawn":
        raise ValueError(f"unknown lung_shapes {lung_shapes!r}; use 'drawn' or 'real'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tasks = _build_tasks(
        out.resolve(),
        sites,
        n_per_site,
        size,
        seed,
        difficulty,
        ct_dir=ct_dir,
        shapes_file=shapes_file,
    )
    rows = _run_tasks(tasks, workers, progress)
    return _write_manifest(rows, out / "manifest.csv")


def bias_test_sites(base_site: SiteConfig) -> list[SiteConfig]:
    """The three test sites of the synthetic-bias protocol for ``base_site``.

    ``<name>-biased`` (same correlation), ``<name>-unbiased`` (no markers) and
    ``<name>-confounding`` (every image carries another class's marker). All three share the
    base site's seed key, so they hold the same images and differ only in their markers.
    """
    key = base_site.key
    return [
        replace(base_site, name=f"{base_site.name}-biased", seed_key=key, confounding=False),
        replace(base_site, name=f"{base_site.name}-unbiased", seed_key=key, marker_style="none"),
        replace(base_site, name=f"{base_site.name}-confounding", seed_key=key, confounding=True),
    ]


def bias_free_sites(sites: Sequence[SiteConfig]) -> list[SiteConfig]:
    """The same sites with every marker removed (``marker_style="none"``), keeping each site's
    name and seed key: with the same ``seed``, :func:`make_dataset` renders the same patients,
    findings, labels and splits, only without markers. A classifier trained on them is the
    bias-free reference (the accuracy the lungs allow) for a model trained on ``sites``."""
    return [replace(s, seed_key=s.key, marker_style="none") for s in sites]


def make_bias_test_sets(
    out_dir: str | os.PathLike,
    base_site: SiteConfig,
    n: int = 150,
    size: int = 256,
    seed: int = 1,
    difficulty: float = 0.5,
    workers: int | None = None,
    progress: bool = True,
    mode: str = "phantom",
) -> Path:
    """Write the biased / unbiased / confounding test sets (section 7 of the method) into one
    manifest (``split`` = ``test`` for all); return its path.

    Use a ``seed`` different from the training set's so the test images are new patients.
    """
    if base_site.marker_style == "none":
        raise ValueError(f"site {base_site.name!r} has no markers; pick a biased site")
    sites = bias_test_sites(base_site)
    _check_args(sites, n, size, difficulty)
    ct_dir = _prepare_mode(mode)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tasks = _build_tasks(
        out.resolve(), sites, n, size, seed, difficulty, split="test", ct_dir=ct_dir
    )
    rows = _run_tasks(tasks, workers, progress)
    return _write_manifest(rows, out / "manifest.csv")


# --------------------------------------------------------------------------------------------
# Previews
# --------------------------------------------------------------------------------------------


def _read_display(path: str) -> np.ndarray:
    """Stored DICOM pixels -> float ``[H, W]`` in [0, 1], bright = dense (full range, no VOI)."""
    import pydicom

    ds = pydicom.dcmread(path)
    arr = ds.pixel_array.astype(np.float32) / float((1 << int(ds.BitsStored)) - 1)
    return 1.0 - arr if ds.PhotometricInterpretation == "MONOCHROME1" else arr


def render_previews(manifest: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Write ``synthetic_classes.png`` (one image per class, lung mask outlined) and
    ``synthetic_sites.png`` (one image per site, marker visible) into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    manifest = Path(manifest)
    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    base = manifest.parent
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def load(row: pd.Series) -> tuple[np.ndarray, np.ndarray]:
        img = _read_display(str(base / row["image"]))
        mask = np.asarray(Image.open(base / row["mask"])) > 127
        return img, mask

    written = []
    first_site = df["site"].iloc[0]
    picks = []
    for cls in CLASSES:
        rows = df[(df["label"] == cls) & (df["site"] == first_site)]
        rows = rows if len(rows) else df[df["label"] == cls]
        if len(rows):
            picks.append(rows.iloc[0])
    fig, axes = plt.subplots(1, len(picks), figsize=(3.2 * len(picks), 3.5), squeeze=False)
    for ax, row in zip(axes[0], picks, strict=True):
        img, mask = load(row)
        ax.imshow(img, cmap="gray", vmin=0, vmax=1)
        ax.contour(mask, levels=[0.5], colors="tab:orange", linewidths=0.8)
        ax.set_title(f"{row['label']} ({row['site']})", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    path = out / "synthetic_classes.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    sites = list(dict.fromkeys(df["site"]))
    fig, axes = plt.subplots(1, len(sites), figsize=(3.2 * len(sites), 3.5), squeeze=False)
    for ax, site in zip(axes[0], sites, strict=True):
        rows = df[df["site"] == site]
        with_marker = rows[rows["bias"] != ""]
        row = (with_marker if len(with_marker) else rows).iloc[0]
        img, _ = load(row)
        ax.imshow(img, cmap="gray", vmin=0, vmax=1)
        bias = row["bias"] or "none"
        ax.set_title(f"{site}: {row['label']}, marker={bias}", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    path = out / "synthetic_sites.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written
