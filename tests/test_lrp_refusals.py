"""Models LRP-Flex cannot explain exactly are refused, not explained wrongly (issue 9, item 6).

(a) a functional non-linearity in forward code (``F.relu``, ``x.relu()``, ``clamp(min=0)``,
    ``F.gelu``, ``torch.sigmoid``, ...) gets no LRP rule: `lrp_heatmaps` must refuse it, naming the
    module and the call. The check runs on the first LRP forward of each model structure only.
(b) under the z^B first-layer rule, relevance reaching the pixels through a second path from the
    input (a shortcut conv from the input, the first conv's / BatchNorm's pre-ReLU output reused)
    would be dropped: refused; the epsilon rule down to the input (``input_bounds=None``) is exact
    through every path and stays available.
All models are tiny and float64.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import _get_current_function_mode_stack

from classification.lrp import LRPFlex, LRPUnsupportedError, check_lrp_ready, lrp_heatmaps
from classification.models import build_backbone

# --------------------------------------------------------------------------------------------
# (a) functional activations
# --------------------------------------------------------------------------------------------

ACTIVATIONS: dict[str, tuple[str, Callable[[Tensor], Tensor]]] = {
    "F.relu": ("F.relu", F.relu),
    "torch.relu": ("torch.relu", torch.relu),
    "Tensor.relu": ("Tensor.relu", lambda t: t.relu()),
    "clamp_min0": ("Tensor.clamp", lambda t: t.clamp(min=0)),
    "torch.clamp": ("torch.clamp", lambda t: torch.clamp(t, min=0.0)),
    "F.gelu": ("F.gelu", F.gelu),
    "F.silu": ("F.silu", F.silu),
    "F.leaky_relu": ("F.leaky_relu", F.leaky_relu),
    "torch.sigmoid": ("torch.sigmoid", torch.sigmoid),
    "Tensor.tanh": ("Tensor.tanh", lambda t: t.tanh()),
}


class _Block(nn.Module):
    """conv -> activation given as a function (or an nn.ReLU module when ``act`` is None)."""

    def __init__(self, act: Callable[[Tensor], Tensor] | None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.act = act
        self.relu = nn.ReLU() if act is None else None

    def forward(self, x: Tensor) -> Tensor:
        z = self.conv(x)
        return self.relu(z) if self.act is None else self.act(z)


class _Net(nn.Module):
    """[B, 1, 6, 6] -> conv -> ReLU module -> ``block`` -> mean -> linear -> [B, 2]."""

    def __init__(self, act: Callable[[Tensor], Tensor] | None) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 3, 3, padding=1)
        self.stem_relu = nn.ReLU()
        self.block = _Block(act)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.block(self.stem_relu(self.stem(x))).mean(dim=(2, 3)))


def _nets(act: Callable[[Tensor], Tensor]) -> tuple[_Net, _Net]:
    """The functional-activation net and the same weights with an nn.ReLU module instead."""
    torch.manual_seed(0)
    bad = _Net(act).double()
    good = _Net(None).double()
    good.load_state_dict(bad.state_dict())
    return bad, good


@pytest.mark.parametrize("key", sorted(ACTIVATIONS))
@pytest.mark.parametrize("bounds", [(0.0, 1.0), None])
def test_functional_activation_is_refused_naming_module_and_call(key, bounds):
    shown, act = ACTIVATIONS[key]
    bad, good = _nets(act)
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64)
    with pytest.raises(LRPUnsupportedError, match=rf"module 'block' calls {shown} in its forward"):
        lrp_heatmaps(bad, x, lambda lg: lg[:, :1], eps=0.1, input_bounds=bounds)
    # nothing left patched or hooked on the refused model
    assert all("forward" not in m.__dict__ for m in bad.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in bad.modules())
    # the same network with an nn.ReLU module instance is accepted
    _, R = lrp_heatmaps(good, x, lambda lg: lg[:, :1], eps=0.1, input_bounds=bounds)
    assert torch.isfinite(R).all()


def test_functional_relu_advice_and_lrpflex_context():
    """The message says what to do; LRPFlex used directly refuses too (train mode as well)."""
    bad, _ = _nets(F.relu)
    bad.train()
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    with (
        pytest.raises(LRPUnsupportedError, match=r"one nn.ReLU\(\) module instance per activation"),
        LRPFlex(bad, eps=0.1, input_bounds=None),
    ):
        bad(x)
    with pytest.raises(LRPUnsupportedError, match=r"'block' calls F.relu"):
        check_lrp_ready(bad, x.detach())
    gelu, _ = _nets(F.gelu)
    with pytest.raises(LRPUnsupportedError, match=r"F.gelu.*ReLU networks only"):
        lrp_heatmaps(gelu, x.detach(), lambda lg: lg[:, :1])


def test_functional_probe_runs_once_per_model_structure():
    """The probe forward (a TorchFunctionMode) runs at the first LRP forward of a model, not at
    later ones; replacing a submodule (new structure) makes the next call probe again."""
    seen: list[int] = []

    class _Spy(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            seen.append(len(_get_current_function_mode_stack()))
            return x

    _, net = _nets(F.relu)
    net.block.add_module("spy", _Spy())
    net.block.forward = lambda x: net.block.spy(net.block.relu(net.block.conv(x)))
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64)
    for _ in range(3):
        lrp_heatmaps(net, x, lambda lg: lg[:, :1])
    assert seen == [1, 0, 0]
    net.block = _Block(F.relu).double()  # structure changed: refused at the next call
    with pytest.raises(LRPUnsupportedError, match=r"'block' calls F.relu"):
        lrp_heatmaps(net, x, lambda lg: lg[:, :1])


def test_supported_backbone_maps_are_unchanged_by_the_probe():
    """The first (probing) call and the next (cached) call give the same maps and logits; the
    caller's input is not modified."""
    torch.manual_seed(0)
    net = build_backbone("small_cnn", 3).double().eval()
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    for bounds in [(0.0, 1.0), None]:
        first_logits, first = lrp_heatmaps(net, x, lambda lg: lg, input_bounds=bounds)
        logits, again = lrp_heatmaps(net, x, lambda lg: lg, input_bounds=bounds)
        assert not x.requires_grad and first.requires_grad == again.requires_grad
        assert torch.equal(first, again) and torch.equal(first_logits, logits)


# --------------------------------------------------------------------------------------------
# (b) a second path from the input under the z^B rule
# --------------------------------------------------------------------------------------------


class _InputShortcut(nn.Module):
    """x -> conv1 -> relu1 -> (+ 1x1 shortcut conv of x) -> relu2 -> mean -> fc; bias-free."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.relu1 = nn.ReLU()
        self.shortcut = nn.Conv2d(1, 4, 1, bias=False)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(4, 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.relu2(self.relu1(self.conv1(x)) + self.shortcut(x))
        return self.fc(h.mean(dim=(2, 3)))


class _PreReLUReused(nn.Module):
    """x -> conv1 -> [bn1] -> relu1 -> conv2, plus the pre-ReLU tensor added after conv2."""

    def __init__(self, with_bn: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4) if with_bn else nn.Identity()
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(4, 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.bn1(self.conv1(x))
        h = self.relu2(self.conv2(self.relu1(pre)) + pre)
        return self.fc(h.mean(dim=(2, 3)))


def test_shortcut_from_the_input_is_refused_under_zb():
    torch.manual_seed(0)
    net = _InputShortcut().double()
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64)
    with pytest.raises(
        LRPUnsupportedError,
        match=r"z\^B.*the model input reaches the output through 2 paths.*"
        r"input -> 'conv1' -> 'relu1'.*input_bounds=None",
    ):
        lrp_heatmaps(net, x, lambda lg: lg[:, :1], eps=0.0)
    assert all("forward" not in m.__dict__ for m in net.modules())
    # the epsilon rule down to the input follows both paths: conservation on this bias-free net
    logits, R = lrp_heatmaps(net, x, lambda lg: lg[:, :1], eps=0.0, input_bounds=None)
    torch.testing.assert_close(R.sum(dim=(1, 2, 3, 4)), logits[:, 0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("with_bn", "train", "what"),
    [
        (False, False, r"the output of 'conv1'"),
        (True, False, r"the output of the BatchNorm after it"),
        (True, True, r"the output of the BatchNorm after it"),
    ],
)
def test_reused_pre_relu_first_layer_output_is_refused_under_zb(with_bn, train, what):
    torch.manual_seed(0)
    net = _PreReLUReused(with_bn).double().train(train)
    x = torch.rand(3, 1, 6, 6, dtype=torch.float64)
    with pytest.raises(LRPUnsupportedError, match=rf"z\^B.*{what} reaches the output through 2"):
        lrp_heatmaps(net, x, lambda lg: lg[:, :1], create_graph=True)
    _, R = lrp_heatmaps(net, x, lambda lg: lg[:, :1], input_bounds=None)
    assert torch.isfinite(R).all()


def test_input_that_requires_grad_is_checked_too():
    """A caller's input that already requires grad (leaf) is used as is by the check."""
    torch.manual_seed(0)
    net = _InputShortcut().double()
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    with pytest.raises(LRPUnsupportedError, match=r"the model input reaches the output"):
        lrp_heatmaps(net, x, lambda lg: lg[:, :1])
    with pytest.raises(LRPUnsupportedError, match=r"the model input reaches the output"):
        lrp_heatmaps(net, x * 1.0, lambda lg: lg[:, :1])  # non-leaf input
