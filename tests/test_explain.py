"""Heatmaps of trained models and background-relevance metrics on hand-made heatmaps."""

from __future__ import annotations

import math

import pytest
import torch

from classification.explain import explain
from classification.lrp import lrp_heatmaps
from classification.metrics import (
    background_share,
    chance_level,
    relevance_mass_accuracy,
    relevance_metrics,
    relevance_rank_accuracy,
)
from classification.models import build_backbone


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone("small_cnn", 3, in_channels=1)


def test_explain_shape_mode_and_targets() -> None:
    model = _model().train()
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    R = explain(model, x)
    assert R.shape == (3, 1, 32, 32) and not R.requires_grad
    assert model.training  # mode restored
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no side effects
    # "predicted" = the argmax class's map in eval mode; a fixed class gives that class's map
    model.eval()
    with torch.no_grad():
        pred = model(x).argmax(1)
    for b in range(3):
        Rk = explain(model, x[b : b + 1], target=int(pred[b]))
        assert torch.allclose(Rk, R[b : b + 1], atol=1e-6)
    _, R_all = lrp_heatmaps(model, x, lambda z: z, eps=0.01)
    assert torch.allclose(explain(model, x, target=2), R_all[:, 2].sum(1, keepdim=True), atol=1e-6)
    with pytest.raises(ValueError, match="target"):
        explain(model, x, target="best")


def test_relevance_metrics_hand_computed() -> None:
    # 1 x 1 x 2 x 3 heatmap, mask covers the left column pair (area 4 of 6)
    R = torch.tensor([[[[4.0, -2.0, 1.0], [0.5, 0.5, -2.0]]]])
    M = torch.tensor([[[[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]]])
    # |R| = 4, 2, 1, 0.5, 0.5, 2 ; total 10 ; inside 7
    assert relevance_mass_accuracy(R, M).item() == pytest.approx(0.7)
    assert background_share(R, M).item() == pytest.approx(0.3)
    # top-4 by |R|: 4 (in), 2 (in), 2 (out), 1 (out) -> 2/4 (ties at 2 both counted)
    assert relevance_rank_accuracy(R, M).item() == pytest.approx(0.5)
    assert chance_level(M).item() == pytest.approx(4 / 6)
    m = relevance_metrics(R, M)
    assert set(m) == {"background_share", "mass_accuracy", "rank_accuracy", "chance"}


def test_relevance_metrics_channels_batch_and_degenerate() -> None:
    R = torch.zeros(2, 2, 2, 2)
    R[0, 0, 0, 0] = 1.0
    R[0, 1, 1, 1] = -3.0  # channels are summed as |R|
    M = torch.zeros(2, 1, 2, 2)
    M[:, 0, 0, 0] = 1.0
    mass = relevance_mass_accuracy(R, M)
    assert mass[0].item() == pytest.approx(0.25)
    assert math.isnan(mass[1].item())  # all-zero heatmap: undefined, not 0 or 1
    assert relevance_rank_accuracy(R, M)[0].item() == 0.0  # top-1 pixel is outside
    with pytest.raises(ValueError, match="binary"):
        relevance_mass_accuracy(R, M * 0.5)
    with pytest.raises(ValueError, match="spatial"):
        relevance_mass_accuracy(R, torch.ones(2, 1, 3, 3))
