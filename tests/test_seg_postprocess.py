"""Post-processing, quality flags and metrics of the lung segmentation (pure numpy, fast)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from segmentation.infer import (
    PostprocessConfig,
    QualityThresholds,
    assess_quality,
    postprocess_mask,
)
from segmentation.metrics import score_mask, summarise


def two_lungs(h: int = 96, w: int = 96) -> np.ndarray:
    """Two upright ellipses, the left one (image right) a little smaller: bool [H, W]."""
    rr, cc = np.mgrid[:h, :w]
    right = ((rr - 0.5 * h) / (0.32 * h)) ** 2 + ((cc - 0.3 * w) / (0.14 * w)) ** 2 <= 1
    left = ((rr - 0.5 * h) / (0.30 * h)) ** 2 + ((cc - 0.7 * w) / (0.12 * w)) ** 2 <= 1
    return right | left


def test_postprocess_removes_speck_and_fills_hole():
    lungs = two_lungs()
    prob = np.where(lungs, 0.95, 0.02).astype(np.float32)
    prob[5:8, 45:48] = 0.9  # a speck between/above the lungs
    prob[45:50, 26:31] = 0.1  # a hole inside the right lung
    raw = prob > 0.5
    assert raw[6, 46] and not raw[47, 28]
    out = postprocess_mask(prob)
    assert not out[5:8, 45:48].any(), "the speck survived"
    assert out[45:50, 26:31].all(), "the hole was not filled"
    np.testing.assert_array_equal(out, lungs)


def test_postprocess_keeps_two_largest_and_drops_tiny_second():
    lungs = two_lungs()
    prob = np.where(lungs, 0.9, 0.0)
    blob = np.zeros_like(lungs)
    blob[2:6, 2:6] = True  # third component, smaller than both lungs
    out = postprocess_mask(np.where(blob, 0.9, prob))
    assert not out[blob].any()
    single = np.zeros_like(lungs)
    single[20:70, 10:40] = True
    single[80:82, 80:82] = True  # 4 px vs 1500 px: not a lung
    out = postprocess_mask(single.astype(float))
    assert out.sum() == 50 * 30


def test_margin_is_in_millimetres_and_needs_spacing():
    mask = np.zeros((64, 64), bool)
    mask[30:34, 30:34] = True
    cfg = PostprocessConfig(margin_mm=2.0, min_component_ratio=0.0)
    prob = mask.astype(float)
    unchanged = postprocess_mask(prob, cfg, spacing=None)
    np.testing.assert_array_equal(unchanged, mask)  # no spacing: no dilation
    fine = postprocess_mask(prob, cfg, spacing=(0.5, 0.5))  # 2 mm = 4 px
    coarse = postprocess_mask(prob, cfg, spacing=(1.0, 1.0))  # 2 mm = 2 px
    assert fine[30, 26] and not fine[30, 25]
    assert coarse[30, 28] and not coarse[30, 27]
    anis = postprocess_mask(prob, cfg, spacing=(1.0, 0.5))  # rows 2 px, columns 4 px
    assert anis[28, 31] and not anis[27, 31] and anis[31, 26] and not anis[31, 25]


def test_plausible_two_lungs_pass():
    lungs = two_lungs()
    q = assess_quality(lungs, np.where(lungs, 0.97, 0.01))
    assert q.ok, q.flags
    assert q.n_components == 2
    assert 0.6 < q.lr_balance < 1.0
    assert q.mean_confidence == pytest.approx(0.97, abs=1e-6)


@pytest.mark.parametrize(
    ("mask_fn", "flag"),
    [
        (lambda m: np.pad(np.ones((80, 80), bool), 8), "area_high"),  # ~70% of the image
        (lambda m: m & (np.arange(96)[None, :] < 48), "components_1"),  # one lung only
        (lambda m: np.zeros_like(m), "empty"),
        (lambda m: m & (np.arange(96)[:, None] < 30), "area_low"),
    ],
)
def test_flags_fire_on_implausible_masks(mask_fn, flag):
    mask = mask_fn(two_lungs())
    q = assess_quality(mask, mask.astype(float))
    assert flag in q.flags
    assert not q.ok
    assert q.to_dict()["ok"] is False


def test_one_blob_of_plausible_area_is_flagged():
    rr, cc = np.mgrid[:96, :96]
    blob = ((rr - 48) / 30) ** 2 + ((cc - 48) / 24) ** 2 <= 1  # ~25% area, one component
    q = assess_quality(blob, blob.astype(float))
    assert q.flags == ["components_1"]


def test_imbalance_same_side_and_low_confidence():
    lungs = two_lungs()
    small = lungs.copy()
    small[:, 48:] = False
    small[40:46, 64:70] = True  # a tiny 'left lung'
    assert "lr_imbalance" in assess_quality(small).flags
    same = np.zeros((96, 96), bool)
    same[10:40, 5:40] = True
    same[50:90, 5:40] = True
    assert "lungs_same_side" in assess_quality(same).flags
    q = assess_quality(lungs, np.where(lungs, 0.6, 0.0))
    assert q.flags == ["low_confidence"]
    strict = QualityThresholds(min_confidence=0.5)
    assert assess_quality(lungs, np.where(lungs, 0.6, 0.0), strict).ok


def test_mask_spanning_the_film_height_is_flagged():
    lungs = two_lungs()
    columns = np.zeros_like(lungs)
    columns[0:96, 10:30] = True  # air columns beside a limb run the full height
    columns[0:96, 66:86] = True
    q = assess_quality(columns, columns.astype(float))
    assert "extent_high" in q.flags
    assert q.height_fraction == 1.0
    assert assess_quality(lungs).height_fraction < 0.9


def test_fragmented_raw_prediction_is_flagged():
    lungs = two_lungs()
    raw = lungs.copy()
    for k in range(6):
        raw[2:7, 4 + 15 * k : 9 + 15 * k] = True  # 25 px each, above 0.2% of the image
    q = assess_quality(lungs, lungs.astype(float), raw_mask=raw)
    assert "fragmented" in q.flags


def test_metrics_dice_iou_hd95():
    a = np.zeros((64, 64), bool)
    a[10:30, 10:30] = True
    b = np.zeros_like(a)
    b[10:30, 12:32] = True  # shifted by 2 columns
    s = score_mask(a, b)
    assert s.dice == pytest.approx(2 * 360 / 800)
    assert s.iou == pytest.approx(360 / 440)
    assert s.hd95 == pytest.approx(2.0)
    assert score_mask(a, b, spacing=(0.5, 0.5)).hd95 == pytest.approx(1.0)
    same = score_mask(a, a)
    assert (same.dice, same.iou, same.hd95) == (1.0, 1.0, 0.0)
    empty = score_mask(a, np.zeros_like(a))
    assert empty.dice == 0.0 and math.isnan(empty.hd95)
    summ = summarise([s, same, empty])
    assert summ["n"] == 3 and summ["hd95_undefined"] == 1
    assert summ["dice_mean"] == pytest.approx((s.dice + 1.0 + 0.0) / 3)
    with pytest.raises(ValueError, match="shape"):
        score_mask(a, np.zeros((10, 10), bool))


def test_checkpoint_without_its_spec_is_refused(tmp_path):
    """A U-Net's weights load into a network of any input size, so a checkpoint copied without
    its sidecar JSON would run at the default size and give wrong masks silently: refused, with
    the missing file named; with the spec given explicitly it loads."""
    from segmentation.model import (
        SegModelSpec,
        build_from_spec,
        load_seg_model,
        save_checkpoint,
        sidecar_path,
    )

    spec = SegModelSpec(channels=(4, 8), strides=(2,), spatial_size=(32, 32))
    ckpt = save_checkpoint(build_from_spec(spec), tmp_path / "model.pt", spec)
    assert load_seg_model(ckpt)[1].spatial_size == (32, 32)
    copied = tmp_path / "copy" / "candidate.pt"
    copied.parent.mkdir()
    copied.write_bytes(ckpt.read_bytes())
    with pytest.raises(FileNotFoundError, match=r"candidate\.json is missing"):
        load_seg_model(copied)
    assert load_seg_model(copied, spec=spec)[1] == spec
    assert not sidecar_path(copied).exists()
