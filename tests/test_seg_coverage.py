"""Lesion coverage metric and the in-lung opacity augmentation (hand-made arrays, tiny films)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from segmentation.data import AugmentConfig, RandLungOpacityd, augmentations, train_transforms
from segmentation.metrics import (
    added_density,
    coverage_of,
    lesion_coverage,
    summarise_coverage,
)


def _films() -> tuple[np.ndarray, np.ndarray]:
    """A 10x10 film without / with a finding: density 0.2 added on rows 2-3, 0.1 on rows 6-7."""
    without = np.full((10, 10), 0.3)
    with_f = without.copy()
    with_f[2:4, 2:8] += 0.2
    with_f[6:8, 2:8] += 0.1
    return with_f, without


def test_added_density_is_the_positive_difference():
    with_f, without = _films()
    with_f[0, 0] -= 0.5  # a darker pixel is not added density
    added = added_density(with_f, without)
    assert added[0, 0] == 0.0
    assert added.sum() == pytest.approx(12 * 0.2 + 12 * 0.1)
    with pytest.raises(ValueError):
        added_density(with_f, without[:5])


def test_coverage_is_density_weighted():
    with_f, without = _films()
    full = np.ones((10, 10), bool)
    assert lesion_coverage(full, with_f, without) == pytest.approx(1.0)
    upper = np.zeros((10, 10), bool)
    upper[:5] = True  # keeps the dense part (2.4 of 3.6)
    assert lesion_coverage(upper, with_f, without) == pytest.approx(2.4 / 3.6)
    assert lesion_coverage(~upper, with_f, without) == pytest.approx(1.2 / 3.6)
    # Dice-like pixel counting would say 0.5 for both halves; the metric weighs density
    assert lesion_coverage(np.zeros((10, 10), bool), with_f, without) == 0.0


def test_coverage_undefined_without_a_finding_and_checks_inputs():
    film = np.full((6, 6), 0.4)
    assert math.isnan(lesion_coverage(np.ones((6, 6), bool), film, film))
    with pytest.raises(ValueError):
        coverage_of(np.ones((5, 5), bool), np.ones((6, 6)))
    with pytest.raises(ValueError):
        coverage_of(np.ones((6, 6), bool), -np.ones((6, 6)))


def test_summarise_coverage_ignores_nan():
    s = summarise_coverage([1.0, 0.8, math.nan, 0.95], low=0.9)
    assert s["n"] == 3
    assert s["mean"] == pytest.approx((1.0 + 0.8 + 0.95) / 3)
    assert s["median"] == pytest.approx(0.95)
    assert s["min"] == pytest.approx(0.8)
    assert s["below"] == 1
    assert summarise_coverage([math.nan])["n"] == 0


def test_rendered_finding_lies_inside_the_reference_mask():
    """The premise of the metric: same seed with/without the finding differs only in the lungs."""
    from synthetic import default_sites, render_case

    site = default_sites()[0]
    with_f = render_case(site, "pneumonia", 7, size=64, difficulty=0.0)
    without = render_case(site, "pneumonia", 7, size=64, difficulty=0.0, with_finding=False)
    added = added_density(with_f.display, without.display)
    assert added.sum() > 1.0
    assert lesion_coverage(with_f.mask, with_f.display, without.display) == pytest.approx(1.0)
    assert lesion_coverage(~with_f.mask, with_f.display, without.display) == pytest.approx(0.0)


def _sample(h: int = 48) -> dict[str, np.ndarray]:
    img = np.full((1, h, h), 0.3, dtype=np.float32)
    mask = np.zeros((1, h, h), dtype=np.float32)
    mask[0, 8:40, 6:20] = 1.0
    mask[0, 8:40, 28:42] = 1.0
    return {"image": img, "mask": mask}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_opacity_only_inside_the_mask_and_label_unchanged(seed):
    t = RandLungOpacityd(keys="image", prob=1.0)
    t.set_random_state(seed)
    d = _sample()
    out = t(dict(d))
    diff = np.asarray(out["image"]) - d["image"]
    assert (diff >= 0).all()
    assert diff.max() > 0.05  # something was painted
    assert np.all(diff[d["mask"] == 0] == 0)  # nothing outside the lungs
    assert np.array_equal(np.asarray(out["mask"]), d["mask"])
    assert float(np.asarray(out["image"]).max()) <= 1.0


def test_opacity_is_reproducible_keeps_type_and_respects_prob():
    d = _sample()
    a, b = RandLungOpacityd(keys="image", prob=1.0), RandLungOpacityd(keys="image", prob=1.0)
    a.set_random_state(5)
    b.set_random_state(5)
    assert np.array_equal(np.asarray(a(dict(d))["image"]), np.asarray(b(dict(d))["image"]))
    t = RandLungOpacityd(keys="image", prob=1.0)
    t.set_random_state(1)
    meta = {"image": MetaTensor(torch.as_tensor(d["image"])), "mask": torch.as_tensor(d["mask"])}
    out = t(meta)
    assert isinstance(out["image"], MetaTensor) and out["image"].shape == (1, 48, 48)
    off = RandLungOpacityd(keys="image", prob=0.0)
    assert np.array_equal(np.asarray(off(dict(d))["image"]), d["image"])


def test_train_chain_has_the_opacity_augmentation_and_can_switch_it_off():
    names = [type(t).__name__ for t in train_transforms((32, 32)).transforms]
    assert "RandLungOpacityd" in names
    off = train_transforms((32, 32), AugmentConfig(prob_opacity=0.0)).transforms
    assert "RandLungOpacityd" not in [type(t).__name__ for t in off]


def test_low_resolution_augmentation_blocks_the_image_and_keeps_the_mask():
    """``prob_lowres`` (off by default) makes the image what a film of half the size looks like
    to the network: 2x2 blocks of its area average; the mask is untouched."""
    names = [type(t).__name__ for t in train_transforms((32, 32)).transforms]
    assert "RandSimulateLowResolutiond" not in names  # the committed recipe is unchanged
    cfg = AugmentConfig(prob_lowres=1.0, lowres_zoom=(0.5, 0.5))
    (lowres,) = [
        t for t in augmentations(cfg, (48, 48)) if type(t).__name__ == "RandSimulateLowResolutiond"
    ]
    d = _sample()
    d["image"] = np.random.default_rng(0).random((1, 48, 48), dtype=np.float32)
    out = lowres(dict(d))
    img = np.asarray(out["image"])[0]
    area = d["image"][0].reshape(24, 2, 24, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(img[::2, ::2], area, atol=1e-6)
    np.testing.assert_array_equal(img[1::2, 1::2], img[::2, ::2])
    assert np.array_equal(np.asarray(out["mask"]), d["mask"])
