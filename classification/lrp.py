"""Trainable LRP-epsilon ("LRP-Flex") for ReLU networks.

For a ReLU network, LRP-epsilon is the gradient of the explained score in which the backward signal
at every ReLU is multiplied by ``a / (a + eps)`` (``a`` = that ReLU's output), times the input.
Everything between two ReLUs (conv, BatchNorm, pooling, concatenation, residual sums, dropout,
flatten, linear) is one linear map handled by ordinary autograd (method: ``docs/isnet-method.md``
section 4, after Bassi et al., Nat Commun 15:291 (2024) and Bach et al., PLoS ONE (2015); engine and
tests: ``docs/lrp.md``). The first layer (input -> Conv2d -> [BatchNorm] -> first ReLU) optionally
uses the z^B rule with the true input bounds.

How exactness of the second-order (training) gradients is obtained:

* ReLU and BatchNorm modules are temporarily given a forward that calls a custom
  ``torch.autograd.Function`` whose backward is written with differentiable torch ops on saved
  forward tensors (nothing detached). With ``create_graph=True`` the LRP backward therefore becomes
  part of the graph and depends on the weights exactly.
* Each such node holds a reference to a small switch object owned by one ``LRPFlex`` instance (no
  global state). While the switch is ON (inside the ``with`` block), the node's backward is the LRP
  backward (ReLU: ``g * a/(a+eps)``; BatchNorm: ``g * scale`` with no gradient into the batch
  statistics, so samples do not leak into each other's heatmaps). When the ``with`` block exits the
  switch goes OFF, so when the caller later back-propagates a loss through the same forward graph,
  the nodes give the ordinary ReLU and BatchNorm derivatives (condition 2 of
  ``docs/isnet-method.md`` section 4). The cross-entropy gradient through the returned logits
  is thus the normal gradient.

BatchNorm running statistics: in train mode the patched BatchNorm updates ``running_mean``,
``running_var`` and ``num_batches_tracked`` exactly like ``nn.BatchNorm`` does in one forward (one
update per forward, as in a standard training step). In eval mode nothing is changed.

Refused models (``LRPUnsupportedError``; ``docs/isnet-method.md`` sections 4 and 8): reused or
in-place ReLU modules, activation/normalisation modules without a rule, functional non-linearities
in forward code (``F.relu``, ``x.relu()``, ``clamp``, ``F.gelu``, ``torch.sigmoid``, ...: found by a
``TorchFunctionMode`` on the first LRP forward of each model structure and train/eval mode, then
cached), and, under the z^B rule, an input / first-layer tensor that also feeds another path to
the output (found from the autograd graph, also once per model structure).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

__all__ = [
    "LRPFlex",
    "LRPUnsupportedError",
    "check_lrp_ready",
    "lrp_heatmaps",
]

_FIX = (
    "Call classification.models.make_lrp_ready(model) first (or build the model with "
    "classification.models.build_backbone)."
)


class LRPUnsupportedError(TypeError):
    """The model cannot be explained exactly by LRP-Flex.

    The message names the module (its qualified name in the model), why, and what to do.
    """


# Module types that are not piecewise-linear-with-ReLU; LRP-Flex has no rule for them.
_UNSUPPORTED_MODULES: tuple[type[nn.Module], ...] = (
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Threshold,
    nn.LogSigmoid,
    nn.Softshrink,
    nn.Hardshrink,
    nn.GLU,
    nn.Softmax,
    nn.LogSoftmax,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.MultiheadAttention,
)
_INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)

# Functional non-linearities refused when called in a module's forward code (outside an nn.ReLU
# or BatchNorm module, whose forward LRP-Flex replaces): (namespace, names, relu_like).
_BANNED_SPEC: tuple[tuple[str, Any, tuple[str, ...], bool], ...] = (
    ("F", F, ("relu", "relu_", "threshold", "threshold_", "relu6", "hardtanh", "hardtanh_"), True),
    ("torch", torch, ("relu", "relu_", "threshold", "threshold_"), True),
    ("torch", torch, ("clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_max"), True),
    ("Tensor", torch.Tensor, ("relu", "relu_", "clamp", "clamp_", "clip", "clip_"), True),
    ("Tensor", torch.Tensor, ("clamp_min", "clamp_min_", "clamp_max", "clamp_max_"), True),
    (
        "F",
        F,
        (
            "gelu", "silu", "elu", "elu_", "selu", "celu", "leaky_relu", "leaky_relu_", "prelu",
            "rrelu", "mish", "hardswish", "hardsigmoid", "softplus", "softsign", "tanhshrink",
            "softshrink", "hardshrink", "logsigmoid", "glu", "softmax", "log_softmax", "softmin",
            "layer_norm", "group_norm", "instance_norm", "local_response_norm", "normalize",
            "scaled_dot_product_attention",
        ),
        False,
    ),
    (
        "torch",
        torch,
        (
            "sigmoid", "sigmoid_", "tanh", "tanh_", "selu", "celu", "prelu", "rrelu", "softmax",
            "log_softmax", "layer_norm", "group_norm", "instance_norm", "abs", "abs_", "exp",
            "log", "sqrt", "rsqrt", "pow", "square", "erf", "reciprocal", "sin", "cos", "norm",
        ),
        False,
    ),
    (
        "Tensor",
        torch.Tensor,
        (
            "sigmoid", "sigmoid_", "tanh", "tanh_", "softmax", "log_softmax", "abs", "abs_",
            "exp", "exp_", "log", "log_", "sqrt", "sqrt_", "rsqrt", "rsqrt_", "pow", "pow_",
            "square", "square_", "erf", "reciprocal", "sin", "cos", "norm",
        ),
        False,
    ),
)  # fmt: skip


def _banned_table() -> dict[Any, tuple[str, bool]]:
    """``{function: (display name, relu_like)}`` for every refused functional non-linearity."""
    table: dict[Any, tuple[str, bool]] = {}
    for prefix, namespace, names, relu_like in _BANNED_SPEC:
        for n in names:
            func = getattr(namespace, n, None)
            if func is not None:
                table.setdefault(func, (f"{prefix}.{n}", relu_like))
    return table


_BANNED_FUNCS = _banned_table()


def _functional_message(module_name: str, what: str, relu_like: bool) -> str:
    where = f"module '{module_name or '<root>'}' calls {what} in its forward code"
    if relu_like:
        fix = (
            f"Use one nn.ReLU() module instance per activation instead (e.g. `self.act2 = "
            f"nn.ReLU()` in __init__ and `self.act2(x)` in forward), never {what}"
        )
    else:
        fix = (
            "LRP-Flex supports ReLU networks only: replace it by an nn.ReLU module instance, or "
            "use a ReLU backbone (classification.models.build_backbone)"
        )
    return (
        f"{where}, not through an nn.ReLU module of its own: LRP-Flex gives its rule only at "
        f"nn.ReLU modules, so this non-linearity would get none and the heatmap would be "
        f"silently wrong. {fix}."
    )


def _static_check(model: nn.Module) -> None:
    for name, m in model.named_modules():
        label = name or "<root>"
        if isinstance(m, nn.ReLU) and m.inplace:
            raise LRPUnsupportedError(
                f"module '{label}' is an in-place nn.ReLU(inplace=True): LRP-Flex needs the "
                f"ReLU's input and output as separate tensors. {_FIX}"
            )
        if isinstance(m, (*_UNSUPPORTED_MODULES, *_INSTANCE_NORMS)):
            raise LRPUnsupportedError(
                f"module '{label}' is {type(m).__name__}, an activation/normalisation LRP-Flex has "
                f"no rule for (only ReLU networks with BatchNorm are supported). Replace it by "
                f"nn.ReLU / BatchNorm, or choose a ReLU backbone "
                f"(classification.models.build_backbone)."
            )


class _ProbeMode(TorchFunctionMode):
    """Raises `LRPUnsupportedError` at the first functional non-linearity called outside an
    nn.ReLU / BatchNorm module (``stack`` is the module call stack kept by forward hooks).

    Calls made inside those modules are allowed: LRP-Flex replaces their forward. So are calls
    on tensors that carry no gradient (statistics taken under ``torch.no_grad``, buffers): the
    backward never passes through them, so they cannot bend the heatmap. The mode sees only
    top-level torch calls (not the ones nested inside another torch function), which is what
    user forward code makes.
    """

    def __init__(self, stack: list[tuple[str, nn.Module]]) -> None:
        super().__init__()
        self.stack = stack

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        hit = _BANNED_FUNCS.get(func)
        if hit is not None and _carries_grad((args, kwargs)):
            name, inner = self.stack[-1] if self.stack else ("", None)
            if not isinstance(inner, (nn.ReLU, _BatchNorm)):
                raise LRPUnsupportedError(_functional_message(name, *hit))
        return func(*args, **kwargs)


def _carries_grad(obj: Any) -> bool:
    """Whether any tensor in a nested tuple / list / dict requires grad."""
    if isinstance(obj, Tensor):
        return obj.requires_grad
    if isinstance(obj, dict):
        obj = list(obj.values())
    return isinstance(obj, (tuple, list)) and any(_carries_grad(o) for o in obj)


def _stack_hooks(model: nn.Module, stack: list[tuple[str, nn.Module]]) -> list[Any]:
    """Forward pre/post hooks on every module that keep ``stack`` = the modules being run."""

    def pre(name: str, module: nn.Module):
        def hook(_m, _args):
            stack.append((name, module))

        return hook

    def post(_m, _args, _out):
        if stack:
            stack.pop()

    handles = []
    for name, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(pre(name, m)))
        handles.append(m.register_forward_hook(post))
    return handles


# Models (weakly referenced) whose forward passed the probes, per structure fingerprint:
# {model: (fingerprint, {("forward" | "zb", training flag)})}. The probes then run once per model
# structure and train/eval mode, not at every training step.
_VERIFIED: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[Any, ...], set[tuple[str, bool]]]] = (
    weakref.WeakKeyDictionary()
)


def _fingerprint(model: nn.Module) -> tuple[Any, ...]:
    """Identity of the module tree: every module's id, class and instance-level forward."""
    return tuple((id(m), type(m), id(m.__dict__.get("forward"))) for m in model.modules())


def _verified(model: nn.Module, fingerprint: tuple[Any, ...]) -> set[tuple[str, bool]]:
    entry = _VERIFIED.get(model)
    if entry is None or entry[0] != fingerprint:
        return set()
    return entry[1]


def _mark_verified(model: nn.Module, fingerprint: tuple[Any, ...], kind: tuple[str, bool]) -> None:
    entry = _VERIFIED.get(model)
    if entry is None or entry[0] != fingerprint:
        entry = (fingerprint, set())
        _VERIFIED[model] = entry
    entry[1].add(kind)


def _count_uses(roots: list[Tensor], targets: dict[str, Tensor]) -> dict[str, int]:
    """How many autograd edges reachable from ``roots`` consume each target tensor.

    A target with a ``grad_fn`` is matched by ``(grad_fn, output_nr)``, a leaf by its
    ``AccumulateGrad`` node. Uses that do not reach ``roots`` (or are not differentiable) carry
    no gradient, hence no relevance, and are not counted.
    """
    counts = dict.fromkeys(targets, 0)
    stack = [t.grad_fn for t in roots if t.grad_fn is not None]
    seen = {id(n): n for n in stack}  # values keep the node objects alive while ids are used
    while stack:
        node = stack.pop()
        for nxt, nr in node.next_functions:
            if nxt is None:
                continue
            variable = getattr(nxt, "variable", None)
            for key, t in targets.items():
                if (t.grad_fn is not None and nxt is t.grad_fn and nr == t.output_nr) or (
                    t.grad_fn is None and variable is t
                ):
                    counts[key] += 1
            if id(nxt) not in seen:
                seen[id(nxt)] = nxt
                stack.append(nxt)
    return counts


def check_lrp_ready(model: nn.Module, example_input: Tensor | None = None) -> None:
    """Raise `LRPUnsupportedError` if `model` is not LRP-ready.

    Static checks (always): no in-place ``nn.ReLU``; no unsupported activation or normalisation
    module (GELU, SiLU, ELU, LeakyReLU, Sigmoid, Tanh, LayerNorm, GroupNorm, InstanceNorm, ...).

    With ``example_input`` (e.g. ``[1, C, H, W]``) also a probe forward (eval mode; train
    flags, parameters and buffers are restored/untouched) that detects a ReLU module called more
    than once in one forward (reused ReLU) and functional non-linearities (``F.relu``,
    ``x.relu()``, ``clamp``, ``torch.sigmoid``, ``F.gelu``, ...) called in a module's forward
    code. ``LRPFlex`` runs the same functional probe on its first forward of each model (and the
    reused-ReLU check on every forward), so ``lrp_heatmaps`` refuses these models too.
    """
    _static_check(model)
    if example_input is None:
        return
    stack: list[tuple[str, nn.Module]] = []
    calls: dict[str, int] = {}
    reused: list[str] = []

    def count(name: str):
        def hook(_m, _args):
            calls[name] = calls.get(name, 0) + 1
            if calls[name] == 2:
                reused.append(name)

        return hook

    flags = {m: m.training for m in model.modules()}
    handles = []
    try:
        handles += _stack_hooks(model, stack)
        for name, m in model.named_modules():
            if isinstance(m, nn.ReLU):
                handles.append(m.register_forward_pre_hook(count(name)))
        model.eval()
        # grad on (a leaf copy of the input): the probe tells a non-linearity on activations
        # from one on constants (statistics, buffers) by whether its arguments carry gradient
        probe = example_input.detach().requires_grad_(True)
        with torch.enable_grad(), _ProbeMode(stack):
            model(probe)
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
    if reused:
        raise LRPUnsupportedError(
            f"module '{reused[0]}' (nn.ReLU) is called more than once in one forward (a reused "
            f"ReLU); LRP-Flex requires every ReLU to be its own module instance. {_FIX}"
        )


# --------------------------------------------------------------------------------------------
# Autograd nodes
# --------------------------------------------------------------------------------------------


@dataclass
class _Switch:
    """ON/OFF switch shared by one LRPFlex object and the graph nodes it created."""

    active: bool = False


class _EpsFactor(torch.autograd.Function):
    """``f = a / (a + eps)`` with ``a = relu(x)`` (eps > 0), fused; backward
    ``df/dx = eps / (a + eps)^2 = (1 - f)^2 / eps`` for x > 0, else 0."""

    @staticmethod
    def forward(ctx, x: Tensor, eps: float) -> Tensor:
        a = torch.relu(x)
        f = a / (a + eps)
        ctx.eps = eps
        ctx.save_for_backward(f)
        return f

    @staticmethod
    def backward(ctx, gf: Tensor):
        (f,) = ctx.saved_tensors
        t = 1 - f
        gx = (gf * t).mul_(t).mul_(1.0 / ctx.eps)
        return torch.ops.aten.threshold_backward(gx, f, 0), None  # zero where f == 0 (x <= 0)


class _FlexReLU(torch.autograd.Function):
    """y = relu(x). Backward: ON -> g * a/(a+eps) (a = relu(x), in graph); OFF -> g * 1[x>0]."""

    @staticmethod
    def forward(ctx, x: Tensor, switch: _Switch, eps: float) -> Tensor:
        ctx.switch = switch
        ctx.eps = eps
        ctx.save_for_backward(x)
        return torch.relu(x)

    @staticmethod
    def backward(ctx, g: Tensor):
        (x,) = ctx.saved_tensors
        if ctx.switch.active and ctx.eps != 0.0:
            if torch.is_grad_enabled():  # create_graph: the factor stays a function of x
                return g * _EpsFactor.apply(x, ctx.eps), None, None
            a = torch.relu(x)
            return g * (a / (a + ctx.eps)), None, None
        return torch.ops.aten.threshold_backward(g, x, 0), None, None


class _InvStd(torch.autograd.Function):
    """Returns the precomputed batch ``invstd`` [C] of ``x``; its backward is the analytic
    derivative ``d invstd / dx = -invstd^3 (x - mean) / n`` (so the batch statistics stay in the
    graph without recomputing them)."""

    @staticmethod
    def forward(ctx, x: Tensor, mean: Tensor, invstd: Tensor) -> Tensor:
        ctx.save_for_backward(x, mean, invstd)
        return invstd.clone()

    @staticmethod
    def backward(ctx, g: Tensor):
        x, mean, invstd = ctx.saved_tensors
        shape = [1, -1] + [1] * (x.dim() - 2)
        n = x.numel() // x.size(1)
        coef = (-(invstd**3) * g / n).view(shape)
        return (x - mean.view(shape)) * coef, None, None


class _FlexBatchNorm(torch.autograd.Function):
    """Train-mode BatchNorm (native kernel; updates running stats like ``nn.BatchNorm``).

    Backward: OFF -> the ordinary BatchNorm derivative (native kernel); ON -> only
    ``g * weight * invstd`` to x: the batch statistics act as constants for the heatmap (no leak
    between samples) but stay in the graph (via ``_InvStd``) for exact second order.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, factor, eps, switch, stash):
        out, mean, invstd = torch.ops.aten.native_batch_norm(
            x, weight, bias, running_mean, running_var, True, factor, eps
        )
        if stash is not None:  # batch statistics for the caller (first layer, z^B rule)
            stash["mean"], stash["invstd"] = mean, invstd
        ctx.switch = switch
        ctx.eps = eps
        ctx.save_for_backward(x, weight, running_mean, running_var, mean, invstd)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        x, weight, rm, rv, mean, invstd = ctx.saved_tensors
        none6 = (None,) * 6
        if ctx.switch.active:
            inv = _InvStd.apply(x, mean, invstd) if torch.is_grad_enabled() else invstd
            scale = inv * weight if weight is not None else inv
            gx = g * scale.view([1, -1] + [1] * (x.dim() - 2))
            return (gx, None, None, *none6)
        if torch.is_grad_enabled():  # double backward requested: differentiable composite form
            shape = [1, -1] + [1] * (x.dim() - 2)
            dims = [0, *range(2, x.dim())]
            inv = _InvStd.apply(x, mean, invstd).view(shape)
            xhat = (x - x.mean(dim=dims, keepdim=True)) * inv
            gb = g.sum(dims)
            gw = (g * xhat).sum(dims)
            n = x.numel() // x.size(1)
            w = weight.view(shape) if weight is not None else 1.0
            gx = w * inv * (g - gb.view(shape) / n - xhat * gw.view(shape) / n)
            gw_out = gw if ctx.needs_input_grad[1] else None
            gb_out = gb if ctx.needs_input_grad[2] else None
            return (gx, gw_out, gb_out, *none6)
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            g, x, weight, rm, rv, mean, invstd, True, ctx.eps, list(ctx.needs_input_grad[:3])
        )
        return (gx, gw, gb, *none6)


# --------------------------------------------------------------------------------------------
# LRPFlex
# --------------------------------------------------------------------------------------------


@dataclass
class _Records:
    """What one LRP forward recorded (reset at every forward of the root module)."""

    root_input: Tensor | None = None  # what the model ran on (a grad leaf during the z^B probe)
    user_input: Tensor | None = None  # the tensor the caller passed
    root_output: Any = None  # recorded during the z^B probe only
    relu_calls: dict[str, int] = field(default_factory=dict)
    first_conv: tuple[nn.Module, Tensor] | None = None  # (conv module, its output)
    first_bn: tuple[Tensor, Tensor, Tensor] | None = None  # (input, output, scale)
    first_relu: tuple[str, Tensor, Tensor] | None = None  # (name, input, output)
    at_output: Tensor | None = None
    at_calls: int = 0


class LRPFlex:
    """Context manager: inside it the model's backward is the LRP-epsilon backward.

    ``with LRPFlex(model, eps=0.01, input_bounds=(0.0, 1.0)) as flex:`` patches (per instance,
    nothing global) every ``nn.ReLU`` and BatchNorm module of ``model``; a forward run inside the
    block builds a graph whose backward, while the block is open, multiplies the signal at every
    ReLU by ``a/(a+eps)`` and treats train-mode BatchNorm batch statistics as constants. Use
    ``flex.relevance(scores)`` after a forward to get heatmaps. On exit (also on exceptions) the
    patches are removed and the switch goes OFF: graphs built inside then back-propagate the
    ordinary gradient. Outputs, state_dict and Parameter identities are unchanged after use (train
    mode BatchNorm running statistics are updated once per forward, exactly as a normal forward
    would do).

    Only gradients w.r.t. inputs/activations are meaningful while the switch is ON (parameter
    gradients computed inside the block are not those of any loss).

    Args:
        model: an LRP-ready ReLU network (see ``classification.models.make_lrp_ready``).
        eps: LRP epsilon (>= 0; 0 gives LRP-0 = gradient x input).
        input_bounds: ``(low, high)`` of the input pixels for the z^B rule at the first layer
            (input -> Conv2d -> [BatchNorm] -> first ReLU), or None for epsilon everywhere
            (relevance = modified gradient x input).
        at: optional qualified module name; its output is recorded, and ``relevance`` returns
            relevance at that tensor (exact LRP there) instead of at the input.

    Raises:
        LRPUnsupportedError: on entry for unsupported modules; in the first forward of a model
            structure (and train/eval mode) for a functional non-linearity in forward code; in
            every forward for a reused ReLU; in ``relevance`` (z^B, first call) when the input or
            the first conv / BatchNorm output also feeds another path to the output.
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float = 0.01,
        input_bounds: tuple[float, float] | None = (0.0, 1.0),
        *,
        at: str | None = None,
    ) -> None:
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if input_bounds is not None:
            low, high = input_bounds
            if not low < high:
                raise ValueError(
                    f"input_bounds must be (low, high) with low < high: {input_bounds}"
                )
        self.model = model
        self.eps = float(eps)
        self.input_bounds = input_bounds
        self.at = at
        self._switch = _Switch(False)
        self._records = _Records()
        self._patched: list[tuple[nn.Module, Any]] = []
        self._handles: list[Any] = []
        self._names = {m: n for n, m in model.named_modules()}
        self._fingerprint: tuple[Any, ...] = ()
        self._probe_forward = False
        self._probe_zb = False
        if at is not None and at not in dict(model.named_modules()):
            raise KeyError(f"LRPFlex(at={at!r}): the model has no module named {at!r}")

    # -- patching -------------------------------------------------------------------------

    def _relu_forward(self, name: str) -> Callable[[Tensor], Tensor]:
        def forward(x: Tensor) -> Tensor:
            rec = self._records
            rec.relu_calls[name] = rec.relu_calls.get(name, 0) + 1
            if rec.relu_calls[name] > 1:
                raise LRPUnsupportedError(
                    f"module '{name}' (nn.ReLU) is called more than once in one forward (a "
                    f"reused ReLU); LRP-Flex requires every ReLU to be its own module "
                    f"instance. {_FIX}"
                )
            y = _FlexReLU.apply(x, self._switch, self.eps)
            if rec.first_relu is None:
                rec.first_relu = (name, x, y)
            return y

        return forward

    def _bn_forward(self, bn: _BatchNorm) -> Callable[[Tensor], Tensor]:
        cls_forward = type(bn).forward

        def forward(x: Tensor) -> Tensor:
            rec = self._records
            first = rec.first_bn is None and rec.first_conv is not None and x is rec.first_conv[1]
            if bn.training or bn.running_mean is None:
                factor = 0.0
                if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
                    with torch.no_grad():
                        bn.num_batches_tracked.add_(1)
                    if bn.momentum is None:
                        factor = 1.0 / float(bn.num_batches_tracked)
                    else:
                        factor = bn.momentum
                stash: dict[str, Tensor] | None = {} if first else None
                y = _FlexBatchNorm.apply(
                    x,
                    bn.weight,
                    bn.bias,
                    bn.running_mean,
                    bn.running_var,
                    factor,
                    bn.eps,
                    self._switch,
                    stash,
                )
                if stash is not None:
                    # batch 1/std as a function of x (in the graph) for the fused z^B weights
                    scale = _InvStd.apply(x, stash["mean"], stash["invstd"])
                    rec.first_bn = (x, y, scale * bn.weight if bn.affine else scale)
                return y
            y = cls_forward(bn, x)  # eval mode: a fixed affine map, ordinary autograd is exact
            if first:
                scale = torch.rsqrt(bn.running_var + bn.eps)
                rec.first_bn = (x, y, scale * bn.weight if bn.affine else scale)
            return y

        return forward

    def _root_pre_hook(self, _module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        x = args[0] if args else None
        self._records = _Records(root_input=x, user_input=x)
        if (
            (
                self._probe_zb
                # epsilon rule to the input: the input itself must require grad (`relevance`)
                or (self._probe_forward and (self.input_bounds is not None or self.at is not None))
            )
            and isinstance(x, Tensor)
            and not x.requires_grad
            and torch.is_grad_enabled()
        ):
            # probes run on a grad leaf copy so that every differentiable use of the input
            # appears in the graph (z^B: `_check_single_path`; functional non-linearities:
            # `_ProbeMode` checks calls on tensors that carry gradient); the z^B rule itself
            # uses `user_input`
            leaf = x.detach().requires_grad_(True)
            self._records.root_input = leaf
            return (leaf, *args[1:])
        return None

    def _root_hook(self, _module: nn.Module, _args: tuple[Any, ...], out: Any) -> None:
        self._records.root_output = out

    def _probing_forward(self, inner: Callable[..., Any]) -> Callable[..., Any]:
        """Root forward run under `_ProbeMode` (first LRP forward of a model structure)."""
        stack: list[tuple[str, nn.Module]] = []
        self._handles.extend(_stack_hooks(self.model, stack))
        training = self.model.training

        def forward(*args: Any, **kwargs: Any) -> Any:
            stack.clear()
            with _ProbeMode(stack):
                out = inner(*args, **kwargs)
            _mark_verified(self.model, self._fingerprint, ("forward", training))
            return out

        return forward

    def _conv_hook(self, module: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
        rec = self._records
        if rec.first_conv is None and args and args[0] is rec.root_input:
            rec.first_conv = (module, out)

    def _at_hook(self, _module: nn.Module, _args: tuple[Any, ...], out: Tensor) -> None:
        rec = self._records
        rec.at_calls += 1
        rec.at_output = out

    def __enter__(self) -> LRPFlex:
        _static_check(self.model)
        # probes (functional activations; z^B single path) once per model structure and mode
        self._fingerprint = _fingerprint(self.model)
        done = _verified(self.model, self._fingerprint)
        training = self.model.training
        self._probe_forward = ("forward", training) not in done
        self._probe_zb = (
            self.input_bounds is not None and self.at is None and ("zb", training) not in done
        )
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._root_pre_hook))
            if self._probe_zb:
                self._handles.append(self.model.register_forward_hook(self._root_hook))
            for name, m in self.model.named_modules():
                if isinstance(m, nn.ReLU):
                    self._patch(m, self._relu_forward(name))
                elif isinstance(m, _BatchNorm):
                    self._patch(m, self._bn_forward(m))
                elif isinstance(m, nn.Conv2d):
                    self._handles.append(m.register_forward_hook(self._conv_hook))
                if self.at is not None and name == self.at:
                    self._handles.append(m.register_forward_hook(self._at_hook))
            if self._probe_forward:  # after the ReLU/BN patches: wraps what forward now is
                self._patch(self.model, self._probing_forward(self.model.forward))
        except BaseException:
            self._restore()
            raise
        self._switch.active = True
        return self

    def _patch(self, m: nn.Module, fwd: Callable[[Tensor], Tensor]) -> None:
        self._patched.append((m, m.__dict__.get("forward")))
        m.forward = fwd  # instance attribute shadows the class method; removed on exit

    def _restore(self) -> None:
        self._switch.active = False
        for m, previous in reversed(self._patched):
            if previous is None:
                m.__dict__.pop("forward", None)
            else:
                m.__dict__["forward"] = previous
        self._patched.clear()
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __exit__(self, *exc: object) -> None:
        self._restore()
        self._records = _Records()

    # -- relevance ------------------------------------------------------------------------

    def relevance(
        self,
        scores: Tensor,
        *,
        create_graph: bool = False,
        retain_graph: bool | None = None,
    ) -> Tensor:
        """Relevance of ``scores`` ``[B, K]`` (from the last forward inside this block).

        Returns ``[B, K, *target.shape[1:]]``: at the input (``[B, K, C, H, W]``) or, with ``at``,
        at that module's output. One backward per k gives every sample's map (samples are
        independent: BatchNorm statistics are constants for this backward).
        """
        if not self._switch.active:
            raise RuntimeError("LRPFlex.relevance must be called inside the `with` block")
        if scores.dim() != 2:
            raise ValueError(f"scores must be [B, K], got shape {tuple(scores.shape)}")
        rec = self._records
        zb = None
        if self.at is not None:
            if rec.at_calls != 1 or rec.at_output is None:
                raise LRPUnsupportedError(
                    f"module '{self.at}' was called {rec.at_calls} times in the last forward; "
                    f"relevance at a layer needs exactly one call"
                )
            target = rec.at_output
        elif self.input_bounds is not None:
            zb = self._first_layer()
            target = zb[0]
        else:
            target = rec.root_input
            if target is None or not target.requires_grad:
                raise RuntimeError("the model input must require grad (use lrp_heatmaps)")
        if scores.shape[0] != target.shape[0]:
            raise ValueError(
                f"scores have batch {scores.shape[0]} but the forward had {target.shape[0]}"
            )
        keep = create_graph if retain_graph is None else retain_graph
        K = scores.shape[1]
        maps = []
        for k in range(K):
            if not scores.requires_grad:  # scores independent of the model: zero relevance
                maps.append(
                    torch.zeros_like(target) if zb is None else torch.zeros_like(rec.root_input)
                )
                continue
            (g,) = torch.autograd.grad(
                scores[:, k].sum(),
                target,
                retain_graph=keep or k < K - 1,
                create_graph=create_graph,
                allow_unused=True,
            )
            if g is None:  # this score does not depend on the target: zero relevance
                g = torch.zeros_like(target)
            if zb is None:
                maps.append(target * g)
            else:
                maps.append(self._zb(zb, target * g))
        return torch.stack(maps, dim=1)

    def _first_layer(self) -> tuple[Tensor, nn.Conv2d, Tensor | None]:
        """(first ReLU output, first conv, BN scale or None), checking input->conv->[BN]->ReLU."""
        rec = self._records
        why = None
        if rec.first_relu is None:
            why = "the model ran no ReLU"
        elif rec.first_conv is None:
            why = "no nn.Conv2d received the model input directly"
        else:
            name, relu_in, relu_out = rec.first_relu
            conv, conv_out = rec.first_conv
            if relu_in is conv_out:
                if self._probe_zb:
                    self._check_single_path(conv, name, bn_out=None)
                return relu_out, conv, None  # type: ignore[return-value]
            if rec.first_bn is not None and relu_in is rec.first_bn[1]:
                if self._probe_zb:
                    self._check_single_path(conv, name, bn_out=rec.first_bn[1])
                return relu_out, conv, rec.first_bn[2]  # type: ignore[return-value]
            why = f"the first ReLU '{name}' is not fed by input -> Conv2d -> [BatchNorm]"
        raise LRPUnsupportedError(
            f"z^B first-layer rule not applicable: {why}. Pass input_bounds=None to use the "
            f"epsilon rule down to the input."
        )

    def _check_single_path(self, conv: nn.Module, relu_name: str, bn_out: Tensor | None) -> None:
        """Refuse a model whose input, first conv output or first BatchNorm output also reaches
        the output through another path than ``input -> conv -> [BN] -> first ReLU``: the z^B
        rule sends relevance to the pixels only along that path (the rest would be dropped)."""
        rec = self._records
        assert rec.root_input is not None and rec.first_conv is not None
        conv_name = self._names.get(conv, "?")
        path = f"input -> '{conv_name}' -> {'BatchNorm -> ' if bn_out is not None else ''}"
        path += f"'{relu_name}'"
        targets = {
            "the model input": rec.root_input,
            f"the output of '{conv_name}'": rec.first_conv[1],
        }
        if bn_out is not None:
            targets["the output of the BatchNorm after it"] = bn_out
        out = rec.root_output
        roots = [out] if isinstance(out, Tensor) else [t for t in _flat_tensors(out)]
        counts = _count_uses(roots, targets)
        for what, n in counts.items():
            if n > 1:
                raise LRPUnsupportedError(
                    f"z^B first-layer rule not applicable: {what} reaches the output through "
                    f"{n} paths, but the z^B rule sends relevance to the pixels only along "
                    f"{path}, so relevance through the other path(s) (e.g. a shortcut conv from "
                    f"the input, or the pre-ReLU tensor reused) would be silently dropped. Pass "
                    f"input_bounds=None to use the epsilon rule down to the input (exact through "
                    f"every path), or take such branches from the first ReLU's output."
                )
        _mark_verified(self.model, self._fingerprint, ("zb", self.model.training))

    def _zb(self, zb: tuple[Tensor, nn.Conv2d, Tensor | None], r1: Tensor) -> Tensor:
        """z^B rule from relevance ``r1`` at the first ReLU output down to the pixels."""
        _, conv, scale = zb
        x = self._records.user_input
        assert x is not None and self.input_bounds is not None
        low, high = self.input_bounds
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise LRPUnsupportedError(
                f"z^B rule: first conv '{self._names.get(conv, '?')}' must use zero padding given "
                f"as numbers; pass input_bounds=None to use the epsilon rule instead"
            )
        w = conv.weight
        if scale is not None:
            w = w * scale.view(-1, 1, 1, 1)
        wp, wn = w.clamp(min=0), w.clamp(max=0)
        kw = dict(
            stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups
        )
        z = F.conv2d(x, w, None, **kw)
        ones = torch.ones_like(x[:1])
        if low != 0.0:
            z = z - low * F.conv2d(ones, wp, None, **kw)
        if high != 0.0:
            z = z - high * F.conv2d(ones, wn, None, **kw)
        # z >= 0 for inputs within the bounds; where z == 0 the relevance is dropped (up to
        # rounding: s = r1 there, multiplied by terms that are exactly or nearly zero)
        s = r1 / (z + (z == 0).to(z.dtype))

        def back(weight: Tensor) -> Tensor:
            return _conv2d_transpose_to(s, weight, x.shape, conv)

        out = x * back(w)
        if low != 0.0:
            out = out - low * back(wp)
        if high != 0.0:
            out = out - high * back(wn)
        return out


def _flat_tensors(obj: Any) -> list[Tensor]:
    """Tensors inside a (nested) tuple/list/dict model output."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _flat_tensors(o)]
    return []


def _conv2d_transpose_to(
    s: Tensor, weight: Tensor, in_shape: torch.Size, conv: nn.Conv2d
) -> Tensor:
    """Transpose of ``conv2d(., weight)`` (same geometry as ``conv``) applied to ``s``."""
    out_pad = []
    for d in range(2):
        full = (
            (s.shape[2 + d] - 1) * conv.stride[d]
            - 2 * conv.padding[d]  # type: ignore[index]
            + conv.dilation[d] * (weight.shape[2 + d] - 1)
            + 1
        )
        out_pad.append(in_shape[2 + d] - full)
    return F.conv_transpose2d(
        s,
        weight,
        None,
        stride=conv.stride,
        padding=conv.padding,  # type: ignore[arg-type]
        output_padding=tuple(out_pad),
        groups=conv.groups,
        dilation=conv.dilation,
    )


def lrp_heatmaps(
    model: nn.Module,
    x: Tensor,
    select: Callable[[Tensor], Tensor],
    *,
    eps: float = 0.01,
    input_bounds: tuple[float, float] | None = (0.0, 1.0),
    create_graph: bool = False,
    at: str | None = None,
    retain_graph: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """LRP-epsilon heatmaps of the K scores ``select(logits)`` for every sample of a batch.

    Args:
        model: LRP-ready ReLU network (any train/eval mode; train-mode BatchNorm uses the batch
            statistics as constants for the heatmap, so a sample's map does not mix in the others').
        x: input ``[B, C, H, W]`` (pixels within ``input_bounds`` when the z^B rule is used);
            a tensor subclass such as MONAI's ``MetaTensor`` is used as a plain tensor.
        select: ``select(logits [B, N]) -> scores [B, K]``; each sample's scores must depend only
            on its own logits (e.g. ``classification.isnet_loss.select_selective``).
        eps: LRP epsilon at every ReLU.
        input_bounds: ``(low, high)`` for the z^B rule at the first layer, or None for epsilon down
            to the input (with ``eps=0`` the heatmap is then exactly gradient x input).
        create_graph: make ``R`` differentiable w.r.t. the weights (exact second order), for a
            heatmap loss. The returned logits come from the same forward; back-propagating a loss
            of them (cross-entropy) gives the ordinary gradient.
        at: qualified module name: return relevance at that module's output
            ``[B, K, C', h, w]`` (exact LRP there) instead of at the input.
        retain_graph: keep the forward graph (default: ``create_graph``). When False the returned
            logits are detached.

    Returns:
        ``(logits [B, N], R [B, K, C, H, W])``.

    Raises:
        LRPUnsupportedError: the model cannot be explained exactly (see `LRPFlex`); the message
            names the module or call and what to do.
    """
    if x.dim() < 2:
        raise ValueError(f"x must be [B, C, ...], got shape {tuple(x.shape)}")
    if type(x) is not torch.Tensor:  # e.g. MONAI MetaTensor: same data and graph, plain type
        x = x.as_subclass(torch.Tensor)
    if input_bounds is not None and at is None:
        low, high = input_bounds
        tol = 1e-6 * (high - low)
        lo, hi = float(x.detach().min()), float(x.detach().max())
        if lo < low - tol or hi > high + tol:
            raise ValueError(
                f"input values span [{lo:.4g}, {hi:.4g}] but input_bounds={input_bounds}: the z^B "
                f"first-layer rule needs the true pixel range. Pass input_bounds=(min, max) of "
                f"the preprocessed input, or None for the epsilon rule down to the input."
            )
    keep = create_graph if retain_graph is None else retain_graph
    with torch.enable_grad(), LRPFlex(model, eps=eps, input_bounds=input_bounds, at=at) as flex:
        x_in = x
        if at is None and input_bounds is None and not x.requires_grad:
            x_in = x.detach().requires_grad_(True)
        logits = model(x_in)
        scores = select(logits)
        if scores.dim() != 2 or scores.shape[0] != x.shape[0]:
            raise ValueError(
                f"select(logits) must return [B, K] with B = {x.shape[0]}, got "
                f"{tuple(scores.shape)}"
            )
        R = flex.relevance(scores, create_graph=create_graph, retain_graph=keep)
    if not keep:
        logits = logits.detach()
    return logits, R
