"""Whole-network checks of LRP-Flex: eps = 0 is gradient x input, conservation on bias-free nets,
relevance at a hidden layer, the cross-entropy gradient through the returned logits, no side
effects, and refusal of unsupported models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import DenseNet
from torch import nn

from classification.isnet_loss import select_selective
from classification.lrp import LRPFlex, LRPUnsupportedError, check_lrp_ready, lrp_heatmaps
from classification.models import build_backbone, make_lrp_ready


def _small_densenet() -> nn.Module:
    net = DenseNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=3,
        init_features=8,
        growth_rate=4,
        block_config=(2, 2),
        bn_size=2,
    )
    return make_lrp_ready(net)


def _randomise_bn(model: nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
            m.weight.data.copy_(0.5 + torch.rand(m.num_features, generator=gen))
            m.bias.data.copy_(0.1 * torch.randn(m.num_features, generator=gen))


NETS = {
    "small_cnn": (lambda: build_backbone("small_cnn", 3), 16),
    "small_cnn_deep": (lambda: build_backbone("small_cnn_deep", 3), 32),
    "small_cnn_max": (lambda: build_backbone("small_cnn_max", 3), 16),
    "small_cnn_nobias": (lambda: build_backbone("small_cnn_nobias", 3), 16),
    "densenet_like": (_small_densenet, 16),
    "densenet121": (lambda: build_backbone("densenet121", 3), 32),
    "resnet18": (lambda: build_backbone("resnet18", 3), 32),
}


@pytest.mark.parametrize("name", sorted(NETS))
def test_eps0_equals_gradient_times_input(name):
    torch.manual_seed(0)
    factory, size = NETS[name]
    net = factory().double().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        _randomise_bn(net, gen)
    x = torch.rand(2, 1, size, size, dtype=torch.float64, generator=gen)
    xr = x.clone().requires_grad_(True)
    logits_ref = net(xr)
    (g,) = torch.autograd.grad(logits_ref[:, 2].sum(), xr)
    logits, R = lrp_heatmaps(net, x, lambda lg: lg[:, 2:], eps=0.0, input_bounds=None)
    torch.testing.assert_close(logits, logits_ref.detach(), rtol=1e-12, atol=1e-12)
    assert (g * x).abs().max() > 0
    torch.testing.assert_close(R[:, 0], g * x, rtol=1e-12, atol=1e-13)
    # eps > 0 really changes the map (the modification is applied)
    _, R_eps = lrp_heatmaps(net, x, lambda lg: lg[:, 2:], eps=0.1, input_bounds=None)
    assert (R_eps - R).abs().max() > 1e-6 * R.abs().max()


def _bias_free(net: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.zero_()
                m.bias.zero_()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.zero_()
    return net.eval()


@pytest.mark.parametrize(
    "name", ["small_cnn", "small_cnn_deep", "small_cnn_max", "small_cnn_nobias", "densenet_like"]
)
@pytest.mark.parametrize("bounds", [None, (0.0, 1.0)])
def test_conservation_on_bias_free_nets(name, bounds):
    torch.manual_seed(0)
    factory, size = NETS[name]
    net = _bias_free(factory().double())
    x = torch.rand(3, 1, size, size, dtype=torch.float64)
    logits, R = lrp_heatmaps(net, x, lambda lg: lg, eps=0.0, input_bounds=bounds)
    assert logits.abs().min() > 0
    torch.testing.assert_close(R.sum(dim=(2, 3, 4)), logits, rtol=1e-10, atol=1e-12)


def test_relevance_at_hidden_layer_is_conserved_and_consistent():
    torch.manual_seed(0)
    net = _bias_free(build_backbone("small_cnn", 3).double())
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    logits, R_at = lrp_heatmaps(net, x, lambda lg: lg, eps=0.0, at="features.pool1")
    assert R_at.shape == (2, 3, 32, 4, 4)
    torch.testing.assert_close(R_at.sum(dim=(2, 3, 4)), logits, rtol=1e-10, atol=1e-12)
    # eps > 0: finite, non-zero and less than fully conserved
    _, R_eps = lrp_heatmaps(net, x, lambda lg: lg[:, :1], eps=0.05, at="features.pool1")
    assert torch.isfinite(R_eps).all() and R_eps.abs().sum() > 0
    with pytest.raises(KeyError, match="no module named"):
        lrp_heatmaps(net, x, lambda lg: lg, at="features.nope")


def test_cross_entropy_gradient_through_returned_logits_is_ordinary():
    torch.manual_seed(0)
    net = build_backbone("small_cnn", 3, dropout=0.0).double().train()
    ref = copy.deepcopy(net)
    x = torch.rand(4, 1, 16, 16, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    logits, R = lrp_heatmaps(net, x, select_selective, create_graph=True)
    g = torch.autograd.grad(F.cross_entropy(logits, y), list(net.parameters()))
    g_ref = torch.autograd.grad(F.cross_entropy(ref(x), y), list(ref.parameters()))
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # and one forward updated the running statistics exactly like a normal forward
    for (n, buf), (_, buf_ref) in zip(net.named_buffers(), ref.named_buffers(), strict=True):
        torch.testing.assert_close(buf, buf_ref, rtol=1e-12, atol=1e-12, msg=n)


def test_no_side_effects():
    torch.manual_seed(0)
    net = build_backbone("small_cnn", 3).eval()
    x = torch.rand(2, 1, 16, 16)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ids = {n: id(p) for n, p in net.named_parameters()}
    out_before = net(x)
    lrp_heatmaps(net, x, lambda lg: lg, create_graph=True)
    with pytest.raises(RuntimeError, match="boom"), LRPFlex(net):
        net(x)
        raise RuntimeError("boom")
    out_after = net(x)
    assert torch.equal(out_before, out_after)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert {n: id(p) for n, p in net.named_parameters()} == ids
    for m in net.modules():
        assert "forward" not in m.__dict__
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert all(p.grad is None for p in net.parameters())


class _ReusedReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3)
        self.conv2 = nn.Conv2d(2, 2, 3)
        self.act = nn.ReLU()
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        x = self.act(self.conv2(self.act(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


class _FunctionalReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(F.relu(self.conv1(x)).mean(dim=(2, 3)))


def test_refuses_reused_relu_naming_the_module():
    net = _ReusedReLU()
    x = torch.rand(1, 1, 8, 8)
    with pytest.raises(LRPUnsupportedError, match=r"'act'.*reused.*make_lrp_ready"):
        lrp_heatmaps(net, x, lambda lg: lg)
    with pytest.raises(LRPUnsupportedError, match=r"'act'.*more than once"):
        check_lrp_ready(net, x)
    assert all("forward" not in m.__dict__ for m in net.modules())


def test_refuses_inplace_relu_and_gelu_naming_the_module():
    inplace = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(inplace=True), nn.Flatten(1))
    with pytest.raises(LRPUnsupportedError, match=r"'1'.*in-place.*make_lrp_ready"):
        check_lrp_ready(inplace)
    fixed = make_lrp_ready(inplace)
    check_lrp_ready(fixed, torch.rand(1, 1, 5, 5))
    assert inplace[1].inplace  # deep copy: the original is untouched
    gelu = nn.Sequential()
    gelu.add_module("stem", nn.Conv2d(1, 2, 3))
    gelu.add_module("act", nn.GELU())
    with pytest.raises(LRPUnsupportedError, match=r"'act' is GELU"):
        lrp_heatmaps(gelu, torch.rand(1, 1, 5, 5), lambda lg: lg.flatten(1)[:, :1])
    with pytest.raises(LRPUnsupportedError, match=r"'act' is GELU"):
        make_lrp_ready(gelu)


def test_probe_finds_functional_relu():
    with pytest.raises(
        LRPUnsupportedError,
        match=r"'<root>' calls F.relu.*nn.ReLU\(\) module instance per activation",
    ):
        check_lrp_ready(_FunctionalReLU(), torch.rand(1, 1, 6, 6))
    check_lrp_ready(build_backbone("small_cnn", 2), torch.rand(1, 1, 16, 16))


def test_train_mode_batchnorm_double_backward_outside_lrp_is_ordinary():
    """After LRPFlex, a create_graph backward through the returned graph (e.g. an input-gradient
    penalty) equals the one of the plain model."""
    torch.manual_seed(0)
    net = build_backbone("small_cnn", 2, dropout=0.0).double().train()
    ref = copy.deepcopy(net)
    x = torch.rand(3, 1, 16, 16, dtype=torch.float64, requires_grad=True)
    logits, _ = lrp_heatmaps(net, x, lambda lg: lg[:, :1], create_graph=True)
    (gx,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    (gw,) = torch.autograd.grad((gx**2).sum(), net.features.conv1.weight)
    x_ref = x.detach().clone().requires_grad_(True)
    (gx_ref,) = torch.autograd.grad(ref(x_ref).sum(), x_ref, create_graph=True)
    (gw_ref,) = torch.autograd.grad((gx_ref**2).sum(), ref.features.conv1.weight)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-9, atol=1e-11)


def test_lrpflex_context_gives_modified_gradient():
    """Inside the context, x.grad is the LRP-epsilon modified gradient (R = x * grad)."""
    torch.manual_seed(0)
    net = build_backbone("small_cnn", 3).double().eval()
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    _, R = lrp_heatmaps(net, x, lambda lg: lg[:, 1:2], eps=0.05, input_bounds=None)
    xr = x.clone().requires_grad_(True)
    with LRPFlex(net, eps=0.05, input_bounds=None):
        net(xr)[:, 1].sum().backward()
    torch.testing.assert_close(xr.grad * x, R[:, 0], rtol=1e-12, atol=1e-14)


def test_metatensor_input_gives_plain_tensors():
    from monai.data import MetaTensor

    torch.manual_seed(0)
    net = build_backbone("small_cnn", 3).eval()
    x = torch.rand(2, 1, 16, 16)
    logits, R = lrp_heatmaps(net, MetaTensor(x.clone()), select_selective)
    ref_logits, ref_R = lrp_heatmaps(net, x, select_selective)
    assert type(logits) is torch.Tensor and type(R) is torch.Tensor
    torch.testing.assert_close(R, ref_R)
    torch.testing.assert_close(logits, ref_logits)


def test_input_outside_bounds_is_refused():
    net = build_backbone("small_cnn", 2).eval()
    x = torch.rand(1, 1, 16, 16) * 2 - 0.5
    with pytest.raises(ValueError, match=r"input_bounds=\(0.0, 1.0\).*true pixel range"):
        lrp_heatmaps(net, x, lambda lg: lg)
    _, R = lrp_heatmaps(net, x, lambda lg: lg, input_bounds=(-0.5, 1.5))
    assert torch.isfinite(R).all()
    # a score that does not depend on the input gives a zero map, not an autograd error
    _, R0 = lrp_heatmaps(net, x, lambda lg: torch.zeros_like(lg[:, :1]), input_bounds=None)
    assert R0.abs().max() == 0


@pytest.mark.parametrize("bounds", [None, (0.0, 1.0)])
def test_small_cnn_nobias_conserves_as_trained_where_small_cnn_does_not(bounds):
    """The bias-free backbone needs no zeroing: after training-mode forwards (running statistics
    set) its relevance sums to the logit in train and eval mode; the BatchNorm small CNN's does
    not (its BatchNorm shifts and last bias absorb part)."""
    torch.manual_seed(0)
    x = torch.rand(4, 1, 16, 16, dtype=torch.float64)
    gaps = {}
    for name in ("small_cnn_nobias", "small_cnn"):
        net = build_backbone(name, 3, dropout=0.0).double().train()
        with torch.no_grad():
            for _ in range(3):
                net(torch.rand(8, 1, 16, 16, dtype=torch.float64))
            for m in net.modules():  # give BatchNorm shifts a size real training would
                if isinstance(m, nn.BatchNorm2d):
                    m.bias.normal_(0.0, 0.3)
        for mode in (True, False):
            net.train(mode)
            logits, R = lrp_heatmaps(net, x, lambda lg: lg, eps=0.0, input_bounds=bounds)
            gaps[name, mode] = float((R.sum(dim=(2, 3, 4)) - logits).detach().abs().max())
    assert max(gaps["small_cnn_nobias", m] for m in (True, False)) < 1e-10
    assert min(gaps["small_cnn", m] for m in (True, False)) > 1e-3
    # positively homogeneous: doubling the image doubles every logit
    net = build_backbone("small_cnn_nobias", 3).double().eval()
    torch.testing.assert_close(net(2 * x), 2 * net(x), rtol=1e-12, atol=1e-12)


class _StatScaled(nn.Module):
    """conv -> per-channel scale from a statistic -> ReLU -> mean -> linear; the statistic is
    computed under no_grad (``detach_stat``) or from the activation itself."""

    def __init__(self, detach_stat: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(3, 2, bias=False)
        self.detach_stat = detach_stat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(x)
        ms = z.detach().pow(2).mean(dim=(0, 2, 3)) if self.detach_stat else z.pow(2).mean()
        z = z * torch.rsqrt(ms + 1e-5).view(1, -1, 1, 1)
        return self.fc(self.relu(z).mean(dim=(2, 3)))


def test_nonlinearity_on_a_constant_statistic_is_accepted_on_activations_refused():
    """``rsqrt`` of a statistic taken without gradient is a constant scale for the backward:
    accepted, and the heatmap is exact (eps 0 equals gradient x input with the statistic held
    fixed). The same call on a tensor that carries gradient is refused, also when the probe
    runs on a model whose parameters are frozen."""
    torch.manual_seed(0)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    good = _StatScaled(detach_stat=True).double().eval()
    check_lrp_ready(good, x)
    logits, R = lrp_heatmaps(good, x, lambda lg: lg[:, :1], eps=0.0, input_bounds=None)
    torch.testing.assert_close(R.sum(dim=(2, 3, 4)), logits[:, :1], rtol=1e-10, atol=1e-12)
    bad = _StatScaled(detach_stat=False).double().eval().requires_grad_(False)
    with pytest.raises(LRPUnsupportedError, match=r"'<root>' calls Tensor.pow"):
        check_lrp_ready(bad, x)
    for bounds in (None, (0.0, 1.0)):
        with pytest.raises(LRPUnsupportedError, match=r"calls Tensor.pow"):
            lrp_heatmaps(bad, x, lambda lg: lg[:, :1], input_bounds=bounds)
