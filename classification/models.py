"""LRP-ready backbones: unique, non-in-place ReLU modules; no unsupported activations.

``make_lrp_ready`` converts MONAI DenseNet121 (in-place ReLUs) and MONAI ResNet (blocks that reuse
one ``self.act`` twice in forward) into equivalent models that ``classification.lrp`` can explain
exactly. ``build_backbone`` builds the project's backbones already converted.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.nets import DenseNet121, ResNet, resnet18
from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck
from torch import Tensor, nn

from classification.lrp import LRPUnsupportedError, check_lrp_ready

__all__ = [
    "BACKBONES",
    "DropoutLinear",
    "LRPReadyResNetBlock",
    "LRPReadyResNetBottleneck",
    "MaxPool2x2",
    "ScaleNorm2d",
    "SmallCNN",
    "build_backbone",
    "make_lrp_ready",
]

BACKBONES = (
    "densenet121",
    "resnet18",
    "small_cnn",
    "small_cnn_deep",
    "small_cnn_max",
    "small_cnn_nobias",
)


class LRPReadyResNetBlock(ResNetBlock):
    """MONAI ``ResNetBlock`` with a second ReLU module ``act2`` for the post-residual activation.

    Same parameters and buffers (same state_dict keys) and same outputs as the MONAI block.
    """

    act2: nn.Module

    def forward(self, x: Tensor) -> Tensor:
        residual = x
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        return self.act2(out + residual)


class LRPReadyResNetBottleneck(ResNetBottleneck):
    """MONAI ``ResNetBottleneck`` with separate ReLU modules ``act``, ``act2``, ``act3``."""

    act2: nn.Module
    act3: nn.Module

    def forward(self, x: Tensor) -> Tensor:
        residual = x
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        return self.act3(out + residual)


class DropoutLinear(nn.Linear):
    """``nn.Linear`` preceded by dropout (keeps the ``weight``/``bias`` state_dict keys)."""

    def __init__(self, in_features: int, out_features: int, p: float = 0.5) -> None:
        super().__init__(in_features, out_features)
        self.dropout = nn.Dropout(p)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(self.dropout(x))


def _fresh_relu(name: str, m: nn.Module) -> nn.ReLU:
    if type(m) is not nn.ReLU:
        raise LRPUnsupportedError(
            f"module '{name}' is {type(m).__name__}, not nn.ReLU: LRP-Flex supports ReLU "
            f"networks only (build the MONAI network with act='relu')"
        )
    return nn.ReLU(inplace=False)


def make_lrp_ready(
    model: nn.Module, *, inplace: bool = False, example_input: Tensor | None = None
) -> nn.Module:
    """Return an LRP-ready version of ``model``.

    * every ``nn.ReLU`` becomes a fresh non-in-place ``nn.ReLU`` (so no instance is shared);
    * MONAI ``ResNetBlock`` / ``ResNetBottleneck`` (which call ``self.act`` twice/three times)
      become ``LRPReadyResNetBlock`` / ``LRPReadyResNetBottleneck`` with one ReLU per use;
    * unsupported activations (GELU, SiLU, ELU, LeakyReLU, ...) raise ``LRPUnsupportedError``.

    Parameters, buffers and state_dict keys are unchanged, and so are the outputs (ReLUs carry no
    parameters). By default the model is deep-copied (``inplace=False``); with ``inplace=True``
    it is modified and returned. With ``example_input`` a probe forward also checks for reused
    ReLUs and functional activations that cannot be fixed automatically.
    """
    if not inplace:
        model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if type(m) is ResNetBlock:
            m.__class__ = LRPReadyResNetBlock
            m.act2 = _fresh_relu(f"{name}.act", m.act)
        elif type(m) is ResNetBottleneck:
            m.__class__ = LRPReadyResNetBottleneck
            m.act2 = _fresh_relu(f"{name}.act", m.act)
            m.act3 = _fresh_relu(f"{name}.act", m.act)
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU):
                full = f"{parent_name}.{child_name}" if parent_name else child_name
                setattr(parent, child_name, _fresh_relu(full, child))
    check_lrp_ready(model, example_input)
    return model


def _corners(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The top-left, top-right, bottom-left and bottom-right pixel of every 2x2 window of
    ``[..., H, W]`` as four strided views ``[..., H // 2, W // 2]`` (odd trailing row/column
    dropped)."""
    v = x[..., : x.shape[-2] // 2 * 2, : x.shape[-1] // 2 * 2]
    return v[..., 0::2, 0::2], v[..., 0::2, 1::2], v[..., 1::2, 0::2], v[..., 1::2, 1::2]


def _max_pool_2x2(x: Tensor) -> Tensor:
    """``[..., H, W] -> [..., H // 2, W // 2]``: the maximum of each 2x2 window (top pair,
    bottom pair, then the two)."""
    a, b, c, d = _corners(x)
    return torch.maximum(torch.maximum(a, b), torch.maximum(c, d))


def _share(p: Tensor, q: Tensor) -> Tensor:
    """The share of ``torch.maximum(p, q)``'s gradient that goes to ``p``: 1 where ``p > q``, 1/2
    on a tie, 0 where ``p < q`` (``q`` gets 1 minus it). Same shape as ``p``."""
    return (torch.sign(p - q) + 1.0) * 0.5


class _MaxPool2x2Fn(torch.autograd.Function):
    """:func:`_max_pool_2x2` with the gradient ``torch.maximum`` gives it, computed from shares
    taken once in the forward: the autograd graph of the three ``torch.maximum`` calls and four
    strided views costs about half of a small CNN's training step on a CPU (comparisons redone
    and full-size zero tensors filled at every backward). Its backward is written with
    differentiable ops on the incoming gradient in the order autograd applies them (top/bottom
    share, then the pair's share; each a power of two, so every product is exact), so first- and
    second-order gradients (LRP with ``create_graph=True``, the ISNet and RRR losses) are the
    same numbers as the plain graph's."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        a, b, c, d = _corners(x)
        top, bottom = torch.maximum(a, b), torch.maximum(c, d)
        ctx.save_for_backward(_share(a, b), _share(c, d), _share(top, bottom))
        ctx.pad = (0, x.shape[-1] % 2, 0, x.shape[-2] % 2)  # the dropped row/column: no gradient
        return torch.maximum(top, bottom)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        s_ab, s_cd, s_top = ctx.saved_tensors
        g_top, g_bottom = g * s_top, g * (1.0 - s_top)
        row0 = torch.stack((g_top * s_ab, g_top * (1.0 - s_ab)), dim=-1).flatten(-2)
        row1 = torch.stack((g_bottom * s_cd, g_bottom * (1.0 - s_cd)), dim=-1).flatten(-2)
        gx = torch.stack((row0, row1), dim=-2).flatten(-3, -2)
        return F.pad(gx, ctx.pad) if any(ctx.pad) else gx


class MaxPool2x2(nn.Module):
    """2x2 max pooling, stride 2 (odd trailing row/column dropped), equal to ``nn.MaxPool2d(2)``
    but computed as the maximum of four strided views: several times faster than the CPU
    ``max_pool2d`` kernel. Its gradient goes to the maximum (split equally on exact ties), so it
    is the winner-take-all LRP rule like max pooling; when a gradient is needed it comes from
    :class:`_MaxPool2x2Fn` (the same numbers, a fraction of the cost). Input ``[B, C, H, W]``,
    output ``[B, C, H // 2, W // 2]``."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _MaxPool2x2Fn.apply(x)
        return _max_pool_2x2(x)


class ScaleNorm2d(nn.Module):
    """Per-channel scale normalisation without centring or shift: ``y = gamma * x / rms(x)``.

    ``rms`` is the root mean square of each channel over the batch and the pixels in training
    (a running average of it, like BatchNorm's, in eval), taken as a constant (no gradient
    flows into it): the layer is a per-channel scaling, linear and bias-free, so a
    network of conv / ScaleNorm2d / ReLU / pooling layers stays positively homogeneous and its
    LRP relevance cannot be absorbed by a bias. Input and output ``[B, C, H, W]``."""

    def __init__(self, channels: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.register_buffer("running_ms", torch.ones(channels))
        self.momentum = momentum
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            with torch.no_grad():
                ms = x.detach().pow(2).mean(dim=(0, 2, 3))
                self.running_ms.lerp_(ms, self.momentum)
        else:
            ms = self.running_ms
        scale = self.weight * torch.rsqrt(ms + self.eps)
        return x * scale.view(1, -1, 1, 1)


class SmallCNN(nn.Module):
    """Small fast ReLU CNN: one block (conv3x3-BN-ReLU) per entry of ``widths``, 2x2 max pooling
    after every block but the last, global average pool (``head_pool="avg"``) or global max pool
    (``"max"``: each feature is its strongest response anywhere, so its relevance flows back
    through that one position only), dropout, linear. Input
    ``[B, in_channels, H, W]`` (H, W >= 2 ** (len(widths) - 1)), output logits
    ``[B, num_classes]``. With 4 blocks about 20 ms per eval batch of 8 at 128x128 on one CPU
    core.

    ``bias_free=True`` drops the last linear layer's bias and replaces BatchNorm by
    ``ScaleNorm2d`` (none in the first block, where the z^B rule needs conv -> ReLU): the network
    is then positively homogeneous (``f(t x) = t f(x)`` for ``t > 0``) and nothing but the input
    pixels can carry LRP relevance, so the relevance of a logit sums to the logit (up to the
    epsilon rule's small absorption) and no unit can hide evidence in a bias."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        widths: tuple[int, ...] = (16, 32, 64, 64),
        dropout: float = 0.5,
        head_pool: str = "avg",
        bias_free: bool = False,
    ) -> None:
        super().__init__()
        pools = {"avg": nn.AdaptiveAvgPool2d, "max": nn.AdaptiveMaxPool2d}
        if head_pool not in pools:
            raise ValueError(f"head_pool must be one of {sorted(pools)}, got {head_pool!r}")
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        c = in_channels
        for i, w in enumerate(widths):
            layers[f"conv{i}"] = nn.Conv2d(c, w, kernel_size=3, padding=1, bias=False)
            if not bias_free:
                layers[f"norm{i}"] = nn.BatchNorm2d(w)
            elif i > 0:
                layers[f"norm{i}"] = ScaleNorm2d(w)
            layers[f"relu{i}"] = nn.ReLU()
            layers[f"pool{i}"] = MaxPool2x2() if i < len(widths) - 1 else nn.Identity()
            c = w
        self.features = nn.Sequential(layers)
        self.pool = pools[head_pool](1)
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(c, num_classes, bias=not bias_free)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.dropout(self.flatten(self.pool(self.features(x)))))


def build_backbone(
    name: str, num_classes: int, in_channels: int = 1, dropout: float = 0.5, width: int = 16
) -> nn.Module:
    """Build an LRP-ready 2D backbone.

    Args:
        name: ``"densenet121"`` (MONAI DenseNet121, the paper's; 224x224 inputs),
            ``"resnet18"`` (MONAI ResNet-18), ``"small_cnn"`` (``SmallCNN``, 4 blocks, for
            demos/tests, 64x64..256x256; its last features see 38 x 38 px) or
            ``"small_cnn_deep"`` (``SmallCNN`` with 6 blocks and 5 poolings: its last features
            see the whole of a 64x64 image, about 158 x 158 px; inputs >= 32x32) or
            ``"small_cnn_max"`` (``small_cnn`` with a global max pool instead of the average) or
            ``"small_cnn_nobias"`` (``small_cnn`` without BatchNorm and biases: relevance cannot
            be absorbed by a bias, see ``SmallCNN``).
        num_classes: number of logits N.
        in_channels: image channels (1 for chest X-rays).
        dropout: dropout probability right before the last linear layer.
        width: ``small_cnn*`` only: channels of its first block; the blocks have
            ``(width, 2 * width, 4 * width, 4 * width[, 4 * width, 4 * width])`` channels
            (default 16: 16, 32, 64, 64).
            Other backbones accept only the default.

    Returns:
        A model mapping ``[B, in_channels, H, W]`` to logits ``[B, num_classes]``.
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    if width != 16 and not name.startswith("small_cnn"):
        raise ValueError(f"width={width} applies to small_cnn only, not {name!r}")
    if name == "densenet121":
        net: nn.Module = DenseNet121(
            spatial_dims=2, in_channels=in_channels, out_channels=num_classes
        )
        cl = net.class_layers
        out = cl.out
        net.class_layers = nn.Sequential(
            OrderedDict(
                [
                    ("relu", cl.relu),
                    ("pool", cl.pool),
                    ("flatten", cl.flatten),
                    ("dropout", nn.Dropout(dropout)),
                    ("out", out),
                ]
            )
        )
    elif name == "resnet18":
        net = resnet18(spatial_dims=2, n_input_channels=in_channels, num_classes=num_classes)
        assert isinstance(net, ResNet)
        fc = net.fc
        assert isinstance(fc, nn.Linear)
        new_fc = DropoutLinear(fc.in_features, fc.out_features, dropout)
        new_fc.load_state_dict(fc.state_dict())
        net.fc = new_fc
    elif name.startswith("small_cnn") and name in BACKBONES:
        widths = (width, 2 * width, 4 * width, 4 * width)
        if name == "small_cnn_deep":
            widths += (4 * width, 4 * width)
        net = SmallCNN(
            num_classes,
            in_channels,
            widths=widths,
            dropout=dropout,
            head_pool="max" if name == "small_cnn_max" else "avg",
            bias_free=name == "small_cnn_nobias",
        )
    else:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return make_lrp_ready(net, inplace=True)
