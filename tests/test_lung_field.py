"""The image-based lung-field estimate and the two lung-field quality flags (numpy, fast).

Films are drawn phantoms (``synthetic.render_case``, 128 px) with their ground-truth masks, so a
good mask is known; a bad one is made by cutting half of one lung away.
"""

from __future__ import annotations

import numpy as np
import pytest

from segmentation.infer import QualityThresholds, assess_quality
from segmentation.lung_field import (
    base_gaps,
    estimate_lung_fields,
    field_agreement,
    resize_mask,
    split_sides,
)
from synthetic import default_sites, portable_site, render_case

NEW_FLAGS = {"lung_base_high", "lung_field_mismatch"}


def normalise(image: np.ndarray) -> np.ndarray:
    """1st-99th percentile -> [0, 1], as the network input is prepared."""
    lo, hi = np.percentile(image, [1, 99])
    return np.clip((image - lo) / (hi - lo), 0.0, 1.0)


def phantom(site_index: int = 0, seed: int = 0, label: str = "normal"):
    """(working image [128, 128] in [0, 1], ground-truth lung mask [128, 128])."""
    site = [*default_sites(), portable_site()][site_index]
    case = render_case(site, label, seed, size=128, difficulty=0.0)
    return normalise(case.display), case.mask


def without_half(mask: np.ndarray, side: int, lower: bool) -> np.ndarray:
    """``mask`` with the lower (or upper) half of one lung's rows removed (side 0: image left)."""
    lung = split_sides(mask)[side]
    rows = np.nonzero(lung.any(axis=1))[0]
    middle = (rows[0] + rows[-1]) // 2
    cut = mask.copy()
    band = slice(middle, None) if lower else slice(None, middle)
    cut[band] &= ~lung[band]
    return cut


@pytest.mark.parametrize(
    ("site_index", "seed", "label"),
    [(0, 0, "normal"), (1, 1, "pneumonia"), (2, 2, "covid"), (3, 0, "pneumonia")],
)
def test_good_mask_is_not_flagged(site_index, seed, label):
    image, mask = phantom(site_index, seed, label)
    est = estimate_lung_fields(image)
    assert all(est.credible), "the phantom's lung fields should be found on both sides"
    q = assess_quality(mask, image=image)
    assert q.ok, q.flags
    assert q.field_coverage > 0.65 and q.outside_body == 0.0
    assert q.base_gap_ratio < 1.0


@pytest.mark.parametrize("side", [0, 1])
def test_mask_missing_lower_half_of_a_lung_is_flagged(side):
    image, mask = phantom()
    cut = without_half(mask, side, lower=True)
    # the area and balance checks alone do not catch it (a smaller lung is plausible) ...
    old = assess_quality(cut, image=None, thresholds=QualityThresholds())
    assert not set(old.flags) - NEW_FLAGS, old.flags
    # ... the base check does, from the mask alone, and with the image the field check too
    assert "lung_base_high" in old.flags
    q = assess_quality(cut, image=image)
    assert "lung_base_high" in q.flags
    assert not q.ok


def test_mask_missing_upper_half_of_a_lung_misses_the_image_estimate():
    image, mask = phantom()
    cut = without_half(mask, 0, lower=False)  # upper half of the image-left lung
    assert base_gaps(cut)[0] < 0.05  # its base is intact: the shape statistic cannot see it
    q = assess_quality(cut, image=image)
    assert "lung_field_mismatch" in q.flags, (q.flags, q.field_coverage)
    assert q.field_coverage < 0.55
    # without the image the loss goes unnoticed: the image estimate is what catches it
    assert "lung_field_mismatch" not in assess_quality(cut).flags


def knee_like(size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """A bright leg in dark air, and a "lung" mask in the air on both sides of it (rows 15-80 %,
    so the extent check does not fire): ``(image, mask)``, ``[size, size]``."""
    rr, cc = np.mgrid[:size, :size] / size
    leg = np.abs(cc - 0.5) < 0.16 + 0.04 * np.exp(-(((rr - 0.85) / 0.08) ** 2))
    bone = np.abs(cc - 0.5) < 0.06
    image = 0.05 + 0.55 * leg + 0.35 * bone + 0.02 * np.random.default_rng(0).random(rr.shape)
    mask = ((rr > 0.15) & (rr < 0.8)) & (np.abs(cc - 0.5) > 0.25) & (np.abs(cc - 0.5) < 0.42)
    return image.astype(np.float32), mask


def test_mask_on_a_knee_like_image_is_flagged():
    image, mask = knee_like()
    q = assess_quality(mask, image=image)
    assert "extent_high" not in q.flags
    assert "lung_field_mismatch" in q.flags, (q.flags, q.outside_body)
    assert q.outside_body > 0.9


def test_estimate_is_computed_at_the_image_size_for_a_larger_mask():
    image, mask = phantom()
    big = np.kron(mask, np.ones((4, 3), dtype=bool))  # a film of 512 x 384 px
    np.testing.assert_array_equal(resize_mask(big, image.shape), mask)
    agree = field_agreement(resize_mask(big, image.shape), estimate_lung_fields(image))
    assert min(agree.coverage) > 0.65
    assert assess_quality(big, image=image).ok


def test_no_image_leaves_the_field_measures_undefined():
    _, mask = phantom()
    q = assess_quality(mask)
    assert np.isnan(q.field_coverage) and np.isnan(q.outside_body)
    assert q.ok
