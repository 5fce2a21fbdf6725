"""ISNet loss pieces on hand-computed tensors, selectors, C1/C2 tuning, and one full step."""

from __future__ import annotations

import math

import pytest
import torch

from classification.isnet_loss import (
    ISNetLossConfig,
    SelectStochastic,
    background_loss,
    foreground_loss,
    gwrp,
    heatmap_loss,
    isnet_losses,
    isnet_total_loss,
    make_selector,
    pool_mask,
    select_original,
    select_selective,
    tune_c1_c2,
)
from classification.models import build_backbone


def test_gwrp_limits_and_hand_value():
    v = torch.tensor([[1.0, 3.0, 2.0], [0.0, -1.0, 5.0]], dtype=torch.float64)
    torch.testing.assert_close(gwrp(v, 0.0), torch.tensor([3.0, 5.0], dtype=torch.float64))
    torch.testing.assert_close(gwrp(v, 1.0), v.mean(dim=1))
    torch.testing.assert_close(gwrp(v, 1 - 1e-9), v.mean(dim=1), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(gwrp(v, 1e-12), torch.tensor([3.0, 5.0], dtype=torch.float64))
    expected = (3 + 0.5 * 2 + 0.25 * 1) / 1.75
    assert gwrp(v, 0.5)[0].item() == pytest.approx(expected, rel=1e-12)


def test_gwrp_large_input_matches_full_sort_reference():
    gen = torch.Generator().manual_seed(0)
    v = torch.rand(3, 224 * 224, generator=gen, dtype=torch.float64)
    for d in (0.9, 0.99, 0.9999):
        srt = v.sort(dim=1, descending=True).values
        w = d ** torch.arange(v.shape[1], dtype=torch.float64)
        ref = (srt * w).sum(1) / w.sum()
        torch.testing.assert_close(gwrp(v, d), ref, rtol=1e-12, atol=0)
    v32 = v.float()
    assert torch.isfinite(gwrp(v32, 0.9)).all()
    with pytest.raises(ValueError):
        gwrp(v, 1.5)


def test_pool_mask_is_conservative_and_rejects_non_binary():
    m = torch.zeros(1, 1, 4, 4)
    m[0, 0, 0, 0] = 1  # one foreground pixel
    m[0, 0, 3, 2:4] = 1
    p = pool_mask(m, (2, 2))
    torch.testing.assert_close(p, torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]]))
    assert pool_mask(m, (4, 4)) is m
    with pytest.raises(ValueError, match="binary"):
        pool_mask(m * 0.5, (2, 2))


def test_background_loss_2x2_hand_example():
    R = torch.tensor([[1.0, -2.0], [0.5, 4.0]], dtype=torch.float64).view(1, 1, 1, 2, 2)
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=torch.float64).view(1, 1, 2, 2)
    d, E = 0.5, 2.0
    fg_mean = (1.0 + 2.0) / 2.0
    bg = sorted([0.5 / fg_mean, 4.0 / fg_mean, 0.0, 0.0], reverse=True)
    weights = [d**i for i in range(4)]
    G = sum(w * b for w, b in zip(weights, bg, strict=True)) / sum(weights)
    expected = -math.log(1 - G / (G + E))
    out = background_loss(R, mask, d, E)
    assert out.shape == (1,)
    assert out.item() == pytest.approx(expected, rel=1e-8)
    # all relevance inside the mask -> zero background loss
    assert background_loss(R * mask[:, None], mask, d, E).item() == pytest.approx(0.0)


def test_foreground_loss_zero_between_c1_and_c2():
    mask = torch.ones(1, 1, 2, 2, dtype=torch.float64)

    def fg(total, **kw):
        R = torch.full((1, 1, 1, 2, 2), total / 4, dtype=torch.float64)
        return foreground_loss(R, mask, 2.0, 10.0, **kw).item()

    assert fg(2.0) == 0.0 and fg(5.0) == 0.0 and fg(10.0) == 0.0
    assert fg(1.0) == pytest.approx(((1 - 2) / 2) ** 2)
    assert fg(13.0) == pytest.approx(((13 - 10) / 2) ** 2)
    # Huber-like upper side: quadratic up to C1 + C2 = 12, then linear with matching slope
    assert fg(11.0, huber_upper=True) == pytest.approx(fg(11.0))
    assert fg(16.0, huber_upper=True) == pytest.approx(2 * 3.0 - 1)
    # relevance outside the mask does not count
    R = torch.zeros(1, 1, 1, 2, 2, dtype=torch.float64)
    R[..., 0, 0] = 5.0
    half = torch.tensor([[0.0, 1.0], [1.0, 1.0]], dtype=torch.float64).view(1, 1, 2, 2)
    assert foreground_loss(R, half, 2.0, 10.0).item() == pytest.approx(1.0)


def test_heatmap_and_total_loss_compose():
    gen = torch.Generator().manual_seed(0)
    R = torch.randn(2, 3, 1, 4, 4, generator=gen, dtype=torch.float64)
    mask = torch.zeros(2, 1, 4, 4, dtype=torch.float64)
    mask[:, :, 1:3, 1:3] = 1
    cfg = ISNetLossConfig(A=2.0, B=0.5)
    expected = (
        2.0 * background_loss(R, mask, cfg.d, cfg.E) + 0.5 * foreground_loss(R, mask, 1.0, 25.0)
    ).mean()
    torch.testing.assert_close(heatmap_loss(R, mask, cfg), expected)
    # a coarser heatmap gets the mask max-pooled to its size
    Rc = torch.randn(2, 1, 1, 2, 2, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(
        heatmap_loss(Rc, mask, cfg), heatmap_loss(Rc, pool_mask(mask, (2, 2)), cfg)
    )
    ce, lh = torch.tensor(2.0), torch.tensor(4.0)
    assert isnet_total_loss(ce, lh, 0.25).item() == pytest.approx(0.75 * 2 + 0.25 * 4)


def test_config_validation():
    with pytest.raises(ValueError, match="P="):
        ISNetLossConfig(P=1.5)
    with pytest.raises(ValueError, match="C1 <= C2"):
        ISNetLossConfig(C1=5.0, C2=2.0)
    with pytest.raises(ValueError, match="variant"):
        ISNetLossConfig(variant="nope")
    with pytest.raises(ValueError, match="d="):
        ISNetLossConfig(d=-0.1)


def test_selectors():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, 1.0]], dtype=torch.float64)
    assert select_original(logits) is logits
    s = select_selective(logits)
    p = torch.softmax(logits, 1)
    expected = torch.stack(
        [
            torch.log(p[0, 1] + 1e-5) - torch.log(1 - p[0, 1] + 1e-5),
            torch.log(p[1, 0] + 1e-5) - torch.log(1 - p[1, 0] + 1e-5),
        ]
    )[:, None]
    torch.testing.assert_close(s, expected)
    assert make_selector("original") is select_original
    assert make_selector("selective") is select_selective
    with pytest.raises(ValueError, match="unknown ISNet variant"):
        make_selector("x")


def test_stochastic_selector_uses_own_generator():
    state = torch.random.get_rng_state()
    logits = torch.randn(4000, 5, generator=torch.Generator().manual_seed(1))
    sel = make_selector("stochastic", torch.Generator().manual_seed(7))
    assert isinstance(sel, SelectStochastic)
    out = sel(logits)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert out.shape == (4000, 1)
    top = logits.max(dim=1).values[:, None]
    frac_top = (out == top).float().mean().item()
    assert 0.45 < frac_top < 0.55
    # other picks cover every non-top rank roughly uniformly
    ranks = (logits > out).sum(dim=1)
    counts = torch.bincount(ranks, minlength=5)
    assert ((counts[1:] > 400) & (counts[1:] < 600)).all(), counts  # ~ 4000 / 2 / 4 each
    again = SelectStochastic(torch.Generator().manual_seed(7))(logits)
    assert torch.equal(out, again)


def test_tune_c1_c2():
    t = torch.tensor([10.0, 12.0, 8.0, 10.0])
    mean, std = 10.0, t.std().item()
    c1, c2 = tune_c1_c2(t)
    assert c1 == pytest.approx(max(mean / 5, mean - 3 * std))
    assert c2 == pytest.approx(min(25 * c1, mean + 3 * std))
    wide = torch.tensor([1.0, 100.0, 3.0, 50.0])
    c1, c2 = tune_c1_c2(wide)
    assert c1 == pytest.approx(wide.mean().item() / 5)
    with pytest.raises(ValueError):
        tune_c1_c2(torch.tensor([1.0]))


@pytest.mark.parametrize("variant", ["original", "selective", "stochastic"])
def test_isnet_losses_one_step(variant):
    torch.manual_seed(0)
    net = build_backbone("small_cnn", 3).train()
    x = torch.rand(4, 1, 32, 32)
    y = torch.tensor([0, 1, 2, 0])
    mask = torch.zeros(4, 1, 32, 32)
    mask[:, :, 8:24, 6:26] = 1
    cfg = ISNetLossConfig(variant=variant)
    out = isnet_losses(net, x, y, mask, cfg)
    K = 3 if variant == "original" else 1
    assert out.R.shape == (4, K, 1, 32, 32)
    assert out.logits.shape == (4, 3)
    out.total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    hidden = isnet_losses(net, x, y, mask, ISNetLossConfig(heatmap_layer="features.pool1"))
    assert hidden.R.shape == (4, 1, 1, 8, 8)
    assert torch.isfinite(hidden.total)


def test_isnet_losses_P_override_parts_and_values_without_graph():
    torch.manual_seed(0)
    model = build_backbone("small_cnn", 3).eval()
    x = torch.rand(4, 1, 32, 32)
    y = torch.tensor([0, 1, 2, 0])
    mask = torch.zeros(4, 1, 32, 32)
    mask[:, :, 6:26, 5:27] = 1
    cfg = ISNetLossConfig(variant="selective", C1=0.5, C2=4.0)
    full = isnet_losses(model, x, y, mask, cfg)
    half = isnet_losses(model, x, y, mask, cfg, P=0.5)
    torch.testing.assert_close(half.total, 0.5 * full.ce + 0.5 * full.lh)
    torch.testing.assert_close(full.lh, cfg.A * full.bg + cfg.B * full.fg)
    plain = isnet_losses(model, x, y, mask, cfg, create_graph=False)
    torch.testing.assert_close(plain.total.detach(), full.total.detach())
