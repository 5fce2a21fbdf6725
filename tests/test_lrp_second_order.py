"""Second-order exactness: gradients of the ISNet loss through LRP-Flex heatmaps equal those of an
explicit LRP written with plain autograd ops (nothing detached), itself checked by central finite
differences (float64, tiny net, train-mode BatchNorm, max pooling, z^B first layer)."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from classification.isnet_loss import (
    ISNetLossConfig,
    heatmap_loss,
    isnet_total_loss,
    select_selective,
)
from classification.lrp import lrp_heatmaps

EPS = 0.1
BOUNDS = (0.0, 1.0)


def _tiny_net() -> nn.Module:
    torch.manual_seed(3)
    net = nn.Sequential(
        OrderedDict(
            [
                ("conv1", nn.Conv2d(1, 3, 3, padding=1)),
                ("bn1", nn.BatchNorm2d(3)),
                ("relu1", nn.ReLU()),
                ("pool1", nn.MaxPool2d(2)),
                ("conv2", nn.Conv2d(3, 4, 3, padding=1)),
                ("relu2", nn.ReLU()),
                ("gap", nn.AdaptiveAvgPool2d(1)),
                ("flat", nn.Flatten(1)),
                ("fc", nn.Linear(4, 3)),
            ]
        )
    ).double()
    with torch.no_grad():
        net.bn1.weight.uniform_(0.5, 1.5)
        net.bn1.bias.uniform_(-0.2, 0.2)
        net.conv2.bias.uniform_(0.0, 0.2)
    return net.train()


def _reference_losses(params: dict[str, torch.Tensor], x, y, mask, cfg):
    """Forward + explicit LRP-epsilon/z^B backward with plain autograd ops; returns
    (total, R)."""
    w1, b1 = params["conv1.weight"], params["conv1.bias"]
    g, beta = params["bn1.weight"], params["bn1.bias"]
    w2, b2 = params["conv2.weight"], params["conv2.bias"]
    wf, bf = params["fc.weight"], params["fc.bias"]
    z0 = F.conv2d(x, w1, b1, padding=1)
    mean = z0.mean(dim=(0, 2, 3))
    var = ((z0 - mean.view(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3))
    scale = g / torch.sqrt(var + 1e-5)
    z1 = (z0 - mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)
    a1 = torch.relu(z1)
    p1, idx = F.max_pool2d(a1, 2, return_indices=True)
    z2 = F.conv2d(p1, w2, b2, padding=1)
    a2 = torch.relu(z2)
    feat = a2.mean(dim=(2, 3))
    logits = feat @ wf.T + bf
    # explained score and its gradient w.r.t. the logits (plain autograd, create_graph)
    score = select_selective(logits)
    (c_logits,) = torch.autograd.grad(score.sum(), logits, create_graph=True)
    # explicit LRP: modified gradient through the network
    c_feat = c_logits @ wf
    c_a2 = c_feat[:, :, None, None].expand_as(a2) / (a2.shape[2] * a2.shape[3])
    c_z2 = c_a2 * a2 / (a2 + EPS)
    c_p1 = F.conv_transpose2d(c_z2, w2, padding=1)
    c_a1 = F.max_unpool2d(c_p1, idx, 2, output_size=a1.shape[-2:])
    r_a1 = a1 * c_a1
    # z^B rule through the fused first layer (conv1 * BN scale), bounds (0, 1)
    wfused = w1 * scale.view(-1, 1, 1, 1)
    wn = wfused.clamp(max=0)
    ones = torch.ones_like(x[:1])
    zb = F.conv2d(x, wfused, padding=1) - BOUNDS[1] * F.conv2d(ones, wn, padding=1)
    s = r_a1 / zb
    R = x * F.conv_transpose2d(s, wfused, padding=1) - BOUNDS[1] * F.conv_transpose2d(
        s, wn, padding=1
    )
    R = R[:, None]
    ce = F.cross_entropy(logits, y)
    return isnet_total_loss(ce, heatmap_loss(R, mask, cfg), cfg.P), R


@pytest.fixture(scope="module")
def setup():
    net = _tiny_net()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 2, 1])
    mask = torch.zeros(3, 1, 8, 8, dtype=torch.float64)
    mask[:, :, 2:6, 1:7] = 1
    cfg = ISNetLossConfig(eps=EPS, C1=0.5, C2=2.0, d=0.7)
    return net, x, y, mask, cfg


def test_flex_gradients_equal_explicit_reference(setup):
    net, x, y, mask, cfg = setup
    net = copy.deepcopy(net)
    logits, R = lrp_heatmaps(
        net, x, select_selective, eps=EPS, input_bounds=BOUNDS, create_graph=True
    )
    total = isnet_total_loss(F.cross_entropy(logits, y), heatmap_loss(R, mask, cfg), cfg.P)
    names = [n for n, _ in net.named_parameters()]
    grads = torch.autograd.grad(total, list(net.parameters()))

    ref_params = {n: p.detach().clone().requires_grad_(True) for n, p in net.named_parameters()}
    ref_total, ref_R = _reference_losses(ref_params, x, y, mask, cfg)
    ref_grads = torch.autograd.grad(ref_total, [ref_params[n] for n in names])

    torch.testing.assert_close(R, ref_R, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(total, ref_total, rtol=1e-10, atol=1e-12)
    for n, gf, gr in zip(names, grads, ref_grads, strict=True):
        assert gr.abs().max() > 0, n
        torch.testing.assert_close(gf, gr, rtol=1e-9, atol=1e-11, msg=f"parameter {n}")


def test_explicit_reference_matches_finite_differences(setup):
    net, x, y, mask, cfg = setup
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    req = {n: p.clone().requires_grad_(True) for n, p in params.items()}
    total, _ = _reference_losses(req, x, y, mask, cfg)
    grads = dict(zip(req, torch.autograd.grad(total, list(req.values())), strict=True))
    h = 1e-6
    checked = 0
    for n, p in params.items():
        flat = p.flatten()
        for i in range(0, flat.numel(), max(1, flat.numel() // 6)):
            plus, minus = dict(params), dict(params)
            e = torch.zeros_like(flat)
            e[i] = h
            plus[n] = (flat + e).view_as(p)
            minus[n] = (flat - e).view_as(p)
            plus = {k: v.clone().requires_grad_(True) for k, v in plus.items()}
            minus = {k: v.clone().requires_grad_(True) for k, v in minus.items()}
            fd = (
                _reference_losses(plus, x, y, mask, cfg)[0].detach()
                - _reference_losses(minus, x, y, mask, cfg)[0].detach()
            ) / (2 * h)
            analytic = grads[n].flatten()[i]
            assert abs(float(fd - analytic)) <= 1e-6 * max(1.0, abs(float(fd))), (n, i)
            checked += 1
    assert checked > 30


def test_leaving_the_modification_on_breaks_second_order(setup):
    """Negative control for condition 2: back-propagating with the LRP switch still ON changes
    the weight gradients (so the test above can fail)."""
    from classification.lrp import LRPFlex

    net, x, y, mask, cfg = setup
    net = copy.deepcopy(net)
    with LRPFlex(net, eps=EPS, input_bounds=BOUNDS) as flex:
        logits = net(x)
        R = flex.relevance(select_selective(logits), create_graph=True)
        total = isnet_total_loss(F.cross_entropy(logits, y), heatmap_loss(R, mask, cfg), cfg.P)
        wrong = torch.autograd.grad(total, [net.conv2.weight])[0]
    ref_params = {n: p.detach().clone().requires_grad_(True) for n, p in net.named_parameters()}
    ref_total, _ = _reference_losses(ref_params, x, y, mask, cfg)
    right = torch.autograd.grad(ref_total, [ref_params["conv2.weight"]])[0]
    assert (wrong - right).abs().max() > 1e-3 * right.abs().max()


def _densenet_like() -> nn.Module:
    from monai.networks.nets import DenseNet

    from classification.models import make_lrp_ready

    torch.manual_seed(4)
    net = DenseNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=3,
        init_features=4,
        growth_rate=3,
        block_config=(2, 2),
        bn_size=2,
    )
    return make_lrp_ready(net).double().train()


@pytest.mark.parametrize(
    ("factory", "at"),
    [(_densenet_like, None), (_densenet_like, "features.transition1.pool")],
    ids=["densenet_like_input", "densenet_like_hidden"],
)
def test_flex_gradients_match_finite_differences(factory, at):
    """Whole pipeline (concat, transitions, train-mode BatchNorm, z^B or hidden-layer relevance,
    loss): autograd through LRP-Flex vs central differences of the same loss."""
    net = factory()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(3, 1, 16, 16, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 2, 1])
    mask = torch.zeros(3, 1, 16, 16, dtype=torch.float64)
    mask[:, :, 3:13, 2:14] = 1
    cfg = ISNetLossConfig(eps=0.05, C1=0.2, C2=1.0, d=0.8)

    def loss(create_graph: bool):
        logits, R = lrp_heatmaps(
            net,
            x,
            select_selective,
            eps=cfg.eps,
            create_graph=create_graph,
            at=at,
            retain_graph=True,
        )
        if at is not None:
            R = R.sum(dim=2, keepdim=True)
        return isnet_total_loss(F.cross_entropy(logits, y), heatmap_loss(R, mask, cfg), cfg.P)

    params = dict(net.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(loss(True), list(params.values())), strict=True))
    h = 1e-6
    checked = 0
    for name in (
        "features.conv0.weight",
        "features.norm0.weight",
        "features.denseblock1.denselayer1.layers.conv1.weight",
        "features.denseblock1.denselayer2.layers.norm2.bias",
        "features.transition1.conv.weight",
        "features.denseblock2.denselayer2.layers.conv2.weight",
        "features.norm5.weight",
        "class_layers.out.weight",
    ):
        p = params[name]
        for i in (0, p.numel() // 2, p.numel() - 1):
            with torch.no_grad():
                flat = p.view(-1)
                old = flat[i].item()
                flat[i] = old + h
                up = loss(False).item()
                flat[i] = old - h
                down = loss(False).item()
                flat[i] = old
            fd = (up - down) / (2 * h)
            analytic = grads[name].reshape(-1)[i].item()
            assert abs(fd - analytic) <= 1e-6 * max(1.0, abs(fd)), (name, i, fd, analytic)
            checked += 1
    assert checked == 24
