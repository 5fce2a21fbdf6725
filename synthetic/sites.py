"""Synthetic hospitals as data: :class:`SiteConfig`, the default sites, per-image seeds and
random streams, and the bias-marker assignment.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

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


def portable_site() -> SiteConfig:
    """``hospital-d``: a portable (ICU) DX acquisition without markers: washed-out contrast
    (gamma 0.5), a narrow window, more blur and noise, AP view. The lung segmenter trained on
    the default sites cuts more of the findings out of its masks here (lower lesion coverage):
    the external site where test-time segmentation is imperfect, so a study can measure the
    paper's argument for ISNet (no mask needed at test time) against segment-then-classify."""
    return SiteConfig(
        name="hospital-d",
        marker_style="none",
        modality="DX",
        photometric="MONOCHROME2",
        bits_stored=12,
        window_center=0.5,
        window_width=0.6,
        noise=0.04,
        gamma=0.5,
        pixel_spacing_mm=1.5,
        blur=1.5,
        view_position="AP",
        manufacturer="SynthRay Portable",
    )


def blind_site() -> SiteConfig:
    """``hospital-e``: a high-kV DR of another vendor, fixed on 2026-12-03 *before* any model
    was evaluated on it (a blind external site for the ISNet recipe, whose contrast-gamma
    augmentation was chosen by looking at ``hospital-d``): a steep contrast curve (gamma 1.6),
    a low narrow window, little blur and noise, MONOCHROME1 16-bit storage, a dark collimator
    frame and border-band markers that carry no class information (a marker style no training
    site has)."""
    return SiteConfig(
        name="hospital-e",
        bias_correlation=0.0,
        marker_style="border",
        modality="DX",
        photometric="MONOCHROME1",
        bits_stored=16,
        window_center=0.45,
        window_width=0.8,
        rescale_slope=1.0,
        rescale_intercept=0.0,
        noise=0.01,
        gamma=1.6,
        pixel_spacing_mm=1.1,
        blur=0.3,
        collimation=0.05,
        collimation_bright=False,
        manufacturer="SynthRay HighKV",
    )


# --------------------------------------------------------------------------------------------
# Random streams
# --------------------------------------------------------------------------------------------


@dataclass
class Streams:
    """Independent generators for one image (so switching a part off leaves the rest unchanged)."""

    anatomy: np.random.Generator
    finding: np.random.Generator
    marker: np.random.Generator
    noise: np.random.Generator
    header: np.random.Generator
    bias: np.random.Generator
    entropy: str

    @classmethod
    def from_seed(cls, seed: np.random.SeedSequence) -> Streams:
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


def bias_free_sites(sites: Sequence[SiteConfig], suffix: str = "") -> list[SiteConfig]:
    """The same sites with every marker removed (``marker_style="none"``), keeping each site's
    seed key: with the same ``seed``, :func:`synthetic.make_dataset` renders the same patients,
    findings, labels and splits, only without markers. A classifier trained on them is the
    bias-free reference (the accuracy the lungs allow) for a model trained on ``sites``.
    ``suffix`` is appended to the names (to keep both sets in one manifest)."""
    return [
        replace(s, name=f"{s.name}{suffix}", seed_key=s.key, marker_style="none") for s in sites
    ]


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
