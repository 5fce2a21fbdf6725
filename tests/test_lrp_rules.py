"""Rule-level oracle: for each supported layer type, the LRP-epsilon rule written in matrix form
(W from the Jacobian, float64) equals LRP-Flex to rtol 1e-10; same for the z^B first-layer rule."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.autograd.functional import jacobian

from classification.lrp import lrp_heatmaps

EPS = 0.05


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        return self.conv(x) + x


class _Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 2, 3, padding=1)
        self.b = nn.Conv2d(2, 1, 1)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x), x], dim=1)


def _bn(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(-1.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return bn


FIRST_BLOCKS = {
    "conv": lambda: nn.Conv2d(2, 3, 3, padding=1, stride=2),
    "linear": lambda: nn.Sequential(nn.Flatten(1), nn.Linear(2 * 6 * 6, 7)),
    "batchnorm": lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), _bn(3)),
    "avgpool": lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.AvgPool2d(2)),
    "maxpool": lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.MaxPool2d(2)),
    "adaptive_avgpool": lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.AdaptiveAvgPool2d(3)),
    "residual_add": _Residual,
    "concat": _Concat,
}


def _net(first: nn.Module, x: torch.Tensor) -> tuple[nn.Sequential, list[nn.Module]]:
    with torch.no_grad():
        width = first(x[:1]).numel()
    seg2 = nn.Sequential(nn.Flatten(1), nn.Linear(width, 8))
    head = nn.Linear(8, 2)
    net = nn.Sequential(first, nn.ReLU(), seg2, nn.ReLU(), head).double().eval()
    return net, [net[0], net[2]]


def _oracle_eps(segments, head, x1, k, eps):
    """Matrix-form LRP-epsilon for one sample x1 [1, ...]: returns R with x1's shape."""
    acts, zs, Ws = [x1], [], []
    a = x1
    for seg in segments:
        z = seg(a)
        W = jacobian(seg, a).reshape(z.numel(), a.numel())
        zs.append(z.flatten())
        Ws.append(W)
        a = torch.relu(z)
        acts.append(a)
    R = acts[-1].flatten() * head.weight[k]
    for i in range(len(segments) - 1, -1, -1):
        z = zs[i]
        s = torch.where(z > 0, R / (z + eps), torch.zeros_like(z))
        R = acts[i].flatten() * (Ws[i].T @ s)
    return R.reshape(x1.shape[1:])


@pytest.mark.parametrize("kind", sorted(FIRST_BLOCKS))
def test_epsilon_rule_matches_matrix_oracle(kind):
    torch.manual_seed(11)
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    first = FIRST_BLOCKS[kind]().double()
    net, segments = _net(first, x)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.bias.uniform_(-0.1, 0.1)
        net[2][1].bias.uniform_(0.3, 0.6)  # keep some second-layer units active
    _, R = lrp_heatmaps(net, x, lambda logits: logits, eps=EPS, input_bounds=None)
    assert R.shape == (2, 2, 2, 6, 6)
    for b in range(2):
        for k in range(2):
            expected = _oracle_eps(segments, net[4], x[b : b + 1], k, EPS)
            assert expected.abs().sum() > 0
            torch.testing.assert_close(R[b, k], expected, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("bounds", [(0.0, 1.0), (-0.5, 1.5)])
def test_zb_first_layer_matches_matrix_oracle(bounds):
    torch.manual_seed(5)
    low, high = bounds
    x = low + (high - low) * torch.rand(2, 2, 6, 6, dtype=torch.float64)
    first = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), _bn(3)).double()
    net, segments = _net(first, x)
    _, R = lrp_heatmaps(net, x, lambda logits: logits[:, 1:], eps=EPS, input_bounds=bounds)
    for b in range(2):
        x1 = x[b : b + 1]
        z1 = segments[0](x1)
        a1 = torch.relu(z1)
        # relevance at the first ReLU output: epsilon rule from the head down
        z2 = segments[1](a1)
        W2 = jacobian(segments[1], a1).reshape(z2.numel(), a1.numel())
        a2 = torch.relu(z2).flatten()
        r2 = a2 * net[4].weight[1]
        s2 = torch.where(z2.flatten() > 0, r2 / (z2.flatten() + EPS), torch.zeros_like(r2))
        r1 = a1.flatten() * (W2.T @ s2)
        # z^B with W = Jacobian of conv+BN (no biases), W+ / W- its elementwise parts
        W1 = jacobian(segments[0], x1).reshape(z1.numel(), x1.numel())
        Wp, Wn = W1.clamp(min=0), W1.clamp(max=0)
        ones = torch.ones(x1.numel(), dtype=torch.float64)
        zb = W1 @ x1.flatten() - low * (Wp @ ones) - high * (Wn @ ones)
        s1 = torch.where(zb != 0, r1 / zb, torch.zeros_like(zb))
        expected = x1.flatten() * (W1.T @ s1) - low * (Wp.T @ s1) - high * (Wn.T @ s1)
        torch.testing.assert_close(R[b, 0], expected.reshape(x1.shape[1:]), rtol=1e-10, atol=1e-13)


def test_train_mode_batchnorm_uses_batch_statistics_as_constants():
    """A train-mode batch's heatmaps equal, sample by sample, those of the same network in eval
    mode with running statistics set to that batch's statistics (no leak between samples)."""
    torch.manual_seed(2)
    x = torch.rand(4, 2, 6, 6, dtype=torch.float64)
    first = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), _bn(3)).double()
    net, _ = _net(first, x)
    net.train()
    with torch.no_grad():
        z = net[0][0](x)
    mean, var = z.mean(dim=(0, 2, 3)), z.var(dim=(0, 2, 3), unbiased=False)
    _, R = lrp_heatmaps(net, x, lambda logits: logits, eps=EPS, input_bounds=(0.0, 1.0))
    frozen = copy.deepcopy(net).eval()
    frozen[0][1].running_mean.copy_(mean)
    frozen[0][1].running_var.copy_(var)
    for b in range(4):
        _, Rb = lrp_heatmaps(
            frozen, x[b : b + 1], lambda logits: logits, eps=EPS, input_bounds=(0.0, 1.0)
        )
        torch.testing.assert_close(R[b], Rb[0], rtol=1e-10, atol=1e-13)
    # and a sample's map from the batched backward equals its map from its own score alone
    _, Rsingle = lrp_heatmaps(
        net, x, lambda logits: logits[:, :1] * (torch.arange(4) == 2)[:, None], eps=EPS
    )
    torch.testing.assert_close(Rsingle[2, 0], R[2, 0], rtol=1e-10, atol=1e-13)
    assert Rsingle[[0, 1, 3]].abs().max() == 0
