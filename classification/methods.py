"""Training objectives as small objects plugged into one training loop.

Every method has a ``name``, ``needs_masks`` (whether training needs lung masks),
``masks_at_inference`` (whether the trained network must be fed a lung mask at test time),
``prepare_inputs(images, masks) -> images`` (what the network sees, at training AND inference) and
``loss(model, images, labels, masks) -> MethodOutput``. ``loss`` applies ``prepare_inputs`` itself,
so the loop passes raw batches. Shapes: images ``[B, C, H, W]`` in [0, 1], labels ``[B]`` long,
masks ``[B, 1, H, W]`` in {0, 1} (or ``None`` for methods that do not need them).

Methods:
- :class:`Standard`: cross-entropy.
- :class:`ISNet`: ``(1 - P) * CE + P * L_H`` with the LRP heatmap loss (Bassi et al. 2024); CE uses
  the logits of the same forward that produced the heatmaps. Optional linear warm-up of ``P``;
  optional distillation from a segment-then-classify teacher (``teacher``).
- :class:`SegmentThenClassify`: the image multiplied by the lung mask, cross-entropy.
- :class:`RRR`: Right for the Right Reasons (Ross et al. 2017): CE + ``lam`` * sum over background
  pixels of the squared input gradient of the summed log-softmax.
- :class:`BackgroundSwap`: cross-entropy on images whose background (everything outside both
  images' lung masks) comes from another image of the batch: a marker then carries no label
  information (background randomisation, cf. Xiao et al. 2021, "mixed-rand"). A check of what
  constraining the background's *effect*, not its relevance, does; docs/isnet-results.md, Round
  10 (and Round 11 for the union of the masks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from classification.isnet_loss import ISNetLossConfig, isnet_losses, make_selector

__all__ = [
    "BackgroundSwap",
    "ISNet",
    "METHOD_NAMES",
    "Method",
    "MethodOutput",
    "RRR",
    "SegmentThenClassify",
    "Standard",
    "build_method",
]


@dataclass
class MethodOutput:
    """``loss``: scalar tensor to back-propagate; ``logits``: ``[B, N]`` from the training forward;
    ``parts``: named float components for logging (e.g. ``ce``, ``heatmap``)."""

    loss: Tensor
    logits: Tensor
    parts: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Method(Protocol):
    """The interface every training objective implements."""

    name: str
    needs_masks: bool
    masks_at_inference: bool

    def prepare_inputs(self, images: Tensor, masks: Tensor | None) -> Tensor: ...

    def loss(
        self, model: nn.Module, images: Tensor, labels: Tensor, masks: Tensor | None
    ) -> MethodOutput: ...


def _require_masks(method: str, masks: Tensor | None, images: Tensor) -> Tensor:
    if masks is None:
        raise ValueError(f"method '{method}' needs lung masks; the batch has none")
    if masks.shape[0] != images.shape[0] or masks.shape[-2:] != images.shape[-2:]:
        raise ValueError(
            f"method '{method}': mask shape {tuple(masks.shape)} does not match images "
            f"{tuple(images.shape)}"
        )
    return masks


class Standard:
    """Plain cross-entropy classifier."""

    name = "standard"
    needs_masks = False
    masks_at_inference = False

    def prepare_inputs(self, images: Tensor, masks: Tensor | None) -> Tensor:
        return images

    def loss(
        self, model: nn.Module, images: Tensor, labels: Tensor, masks: Tensor | None
    ) -> MethodOutput:
        logits = model(self.prepare_inputs(images, masks))
        ce = F.cross_entropy(logits, labels)
        return MethodOutput(ce, logits, {"ce": float(ce.detach())})


class SegmentThenClassify(Standard):
    """Cross-entropy on the lung-masked image (``image * mask``), at training and at inference."""

    name = "segment_then_classify"
    needs_masks = True
    masks_at_inference = True

    def prepare_inputs(self, images: Tensor, masks: Tensor | None) -> Tensor:
        masks = _require_masks(self.name, masks, images)
        return images * masks.to(images.dtype)


class RRR:
    """Right for the Right Reasons: ``CE + lam * sum_bg (d sum_k log p_k / dx)^2``.

    The penalty is summed over background pixels and channels of each sample and averaged over the
    batch; the input gradient is taken with ``create_graph=True`` so the penalty trains the weights.
    """

    name = "rrr"
    needs_masks = True
    masks_at_inference = False

    def __init__(self, lam: float = 10.0) -> None:
        if lam < 0:
            raise ValueError(f"RRR lam must be >= 0, got {lam}")
        self.lam = float(lam)

    def prepare_inputs(self, images: Tensor, masks: Tensor | None) -> Tensor:
        return images

    def penalty(self, model: nn.Module, images: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(penalty scalar, logits [B, N])``; the penalty keeps its graph to weights."""
        x = images.detach().requires_grad_(True)
        logits = model(x)
        logp_sum = F.log_softmax(logits, dim=1).sum()
        (grad,) = torch.autograd.grad(logp_sum, x, create_graph=True)
        background = 1.0 - masks.to(grad.dtype)
        pen = ((grad * background) ** 2).flatten(1).sum(dim=1).mean()
        return pen, logits

    def loss(
        self, model: nn.Module, images: Tensor, labels: Tensor, masks: Tensor | None
    ) -> MethodOutput:
        masks = _require_masks(self.name, masks, images)
        pen, logits = self.penalty(model, images, masks)
        ce = F.cross_entropy(logits, labels)
        total = ce + self.lam * pen
        return MethodOutput(total, logits, {"ce": float(ce.detach()), "rrr": float(pen.detach())})


class BackgroundSwap(Standard):
    """Cross-entropy on ``image * u + other * (1 - u)``, where ``other`` is the previous image
    of the batch (a cyclic shift, so every background is used once; a batch of one keeps its
    own) and ``u`` the union of both lung masks: the lungs and the label are the image's own,
    the background (markers, text, borders) another patient's, and none of the other patient's
    lungs shows around the mask (with ``u = mask`` it did; Round 11 of docs/isnet-results.md:
    balanced accuracy +0.09 with the union). Needs masks for training only; at inference the
    network sees the plain image."""

    name = "background_swap"
    needs_masks = True
    masks_at_inference = False

    @staticmethod
    def swap(images: Tensor, masks: Tensor) -> Tensor:
        """``[B, C, H, W]``: each image's lungs on the previous image's background (outside
        the union of the two images' lung masks ``[B, 1, H, W]``)."""
        m = masks.to(images.dtype)
        m = torch.maximum(m, torch.roll(m, shifts=1, dims=0))
        return images * m + torch.roll(images, shifts=1, dims=0) * (1 - m)

    def loss(
        self, model: nn.Module, images: Tensor, labels: Tensor, masks: Tensor | None
    ) -> MethodOutput:
        masks = _require_masks(self.name, masks, images)
        logits = model(self.swap(images, masks))
        ce = F.cross_entropy(logits, labels)
        return MethodOutput(ce, logits, {"ce": float(ce.detach())})


class ISNet:
    """ISNet: LRP heatmap loss on the background + cross-entropy, ``(1 - P) * CE + P * L_H``.

    ``cfg.variant`` picks which outputs are explained: ``original`` (K = N classes), ``selective``
    (K = 1, the lowest-logit class's softmax log-odds) or ``stochastic`` (K = 1, a random logit
    drawn with ``generator``). ``cfg.input_bounds`` picks the first-layer rule (z^B with those
    bounds, or None for epsilon down to the input); ``cfg.heatmap_layer`` (a module name) puts the
    loss on the channel-summed relevance at that module's output, with the mask max-pooled to its
    size. ``warmup_epochs`` > 0 ramps ``P`` linearly from 0 (epoch 1) to
    ``cfg.P`` (epoch ``warmup_epochs + 1``); the training loop reports the epoch through
    :meth:`set_epoch`. ``lung_only_prob`` > 0 replaces each training image, with that
    probability, by its lung-masked version ``image * mask`` (drawn from PyTorch's global
    generator, which the training loop seeds per epoch): those images carry the finding but no
    background, so their cross-entropy pulls towards lung features; validation never masks.

    ``teacher`` (a state-dict path) adds knowledge distillation from a network of the same
    backbone trained on lung-masked images (a ``segment_then_classify`` run's
    ``best_model.pt``): the classification term becomes ``(1 - distill) * CE + distill * KD``,
    ``KD = T^2 KL(softmax(t / T) || softmax(s / T))`` with ``t`` the teacher's logits on
    ``image * mask`` and ``s`` the ISNet's on the image (Hinton et al. 2015). The teacher never
    sees a marker, so its soft labels carry the lung finding and nothing of the background; it
    is needed in training only (the training loop loads it through :meth:`attach_teacher`), and
    the validation loss stays CE + heatmap loss.

    ``swap_background`` trains on :meth:`BackgroundSwap.swap` images (each image's lungs on the
    previous image's background, outside the union of both masks): a marker then travels with
    another patient's label, so the background carries no label information for the loss to
    fight; the heatmap loss still uses the image's own mask, and validation sees plain images.
    """

    name = "isnet"
    needs_masks = True
    masks_at_inference = False

    def __init__(
        self,
        cfg: ISNetLossConfig | None = None,
        generator: torch.Generator | None = None,
        *,
        warmup_epochs: int = 0,
        lung_only_prob: float = 0.0,
        teacher: str = "",
        distill: float = 0.5,
        distill_T: float = 2.0,
        swap_background: bool = False,
    ) -> None:
        if not 0.0 <= lung_only_prob <= 1.0:
            raise ValueError(f"ISNet lung_only_prob must be in [0, 1], got {lung_only_prob}")
        if not 0.0 <= distill <= 1.0 or not distill_T > 0:
            raise ValueError(
                f"ISNet needs distill in [0, 1] and distill_T > 0, got {distill}, {distill_T}"
            )
        if not isinstance(swap_background, bool):
            raise ValueError(
                f"ISNet swap_background must be true or false, got {swap_background!r}"
            )
        if teacher and not Path(teacher).is_file():
            raise FileNotFoundError(
                f"ISNet teacher: {teacher} is not a file; give the best_model.pt (a state dict) "
                f"of a segment_then_classify run with the same backbone, or no teacher"
            )
        self.teacher = str(teacher)
        self.distill = float(distill)
        self.distill_T = float(distill_T)
        self.teacher_net: nn.Module | None = None
        self.cfg = cfg if cfg is not None else ISNetLossConfig()
        self.generator = generator
        self.selector = make_selector(self.cfg.variant, generator=generator)
        self.warmup_epochs = int(warmup_epochs)
        self.lung_only_prob = float(lung_only_prob)
        self.swap_background = swap_background
        self.epoch = 1
        self.create_graph = True  # second-order graph for training; False for validation

    def set_epoch(self, epoch: int) -> None:
        """Tell the method which (1-based) epoch is being trained (for the ``P`` warm-up)."""
        self.epoch = int(epoch)

    def reseed(self, seed: int) -> None:
        """Re-seed the stochastic selector's generator (other variants draw nothing)."""
        generator = getattr(self.selector, "generator", None)
        if isinstance(generator, torch.Generator):
            generator.manual_seed(int(seed))

    def with_constants(self, C1: float, C2: float) -> ISNet:
        """A copy of this method with new foreground constants (e.g. from auto-tuning)."""
        new = ISNet(
            replace(self.cfg, C1=float(C1), C2=float(C2)),
            self.generator,
            warmup_epochs=self.warmup_epochs,
            lung_only_prob=self.lung_only_prob,
            teacher=self.teacher,
            distill=self.distill,
            distill_T=self.distill_T,
            swap_background=self.swap_background,
        )
        new.teacher_net = self.teacher_net
        new.epoch = self.epoch
        return new

    def attach_teacher(
        self, model_factory: Callable[[], nn.Module], device: str | torch.device = "cpu"
    ) -> None:
        """Load ``teacher`` into ``model_factory()`` (frozen, eval mode) for distillation."""
        net = model_factory()
        net.load_state_dict(torch.load(self.teacher, map_location=device, weights_only=True))
        self.teacher_net = net.to(device).eval().requires_grad_(False)

    def distillation(self, student_logits: Tensor, images: Tensor, masks: Tensor) -> Tensor:
        """``T^2 KL(teacher || student)`` at temperature T, mean over the batch (a scalar); the
        teacher sees ``images * masks`` ``[B, C, H, W]``."""
        if self.teacher_net is None:
            raise RuntimeError(
                f"ISNet teacher {self.teacher} is not loaded: call attach_teacher(model_factory) "
                f"first (classification.train.train does)"
            )
        T = self.distill_T
        with torch.no_grad():
            target = F.softmax(self.teacher_net(images * masks.to(images.dtype)) / T, dim=1)
        log_student = F.log_softmax(student_logits / T, dim=1)
        return F.kl_div(log_student, target, reduction="batchmean") * T * T

    @property
    def current_P(self) -> float:
        """``P`` for the current epoch (after warm-up: ``cfg.P``)."""
        if self.warmup_epochs <= 0:
            return self.cfg.P
        return self.cfg.P * min(1.0, (self.epoch - 1) / self.warmup_epochs)

    def prepare_inputs(self, images: Tensor, masks: Tensor | None) -> Tensor:
        return images

    def loss(
        self, model: nn.Module, images: Tensor, labels: Tensor, masks: Tensor | None
    ) -> MethodOutput:
        masks = _require_masks(self.name, masks, images)
        if self.swap_background:
            images = BackgroundSwap.swap(images, masks)
        if self.lung_only_prob > 0:
            images = self.lung_only(images, masks)
        P = self.current_P
        out = isnet_losses(
            model,
            images,
            labels,
            masks,
            self.cfg,
            self.selector,
            P=P,
            create_graph=self.create_graph,
        )
        parts = {
            "ce": float(out.ce.detach()),
            "heatmap": float(out.lh.detach()),
            "bg": float(out.bg.detach()),
            "fg": float(out.fg.detach()),
            "P": P,
        }
        total = out.total
        if self.teacher:
            kd = self.distillation(out.logits, images, masks)
            total = total + (1.0 - P) * self.distill * (kd - out.ce)
            parts["kd"] = float(kd.detach())
        return MethodOutput(total, out.logits, parts)

    def lung_only(self, images: Tensor, masks: Tensor) -> Tensor:
        """``images`` ``[B, C, H, W]`` with each sample replaced by ``image * mask`` with
        probability ``lung_only_prob`` (masks ``[B, 1, H, W]``)."""
        pick = torch.rand(images.shape[0], device=images.device) < self.lung_only_prob
        pick = pick.view(-1, *([1] * (images.dim() - 1)))
        return torch.where(pick, images * masks.to(images.dtype), images)

    def for_validation(self, seed: int = 0) -> ISNet:
        """A copy for validation: the full ``cfg.P`` (no warm-up) and, for the stochastic
        variant, a selector re-seeded with ``seed``, so every epoch's validation loss explains
        the same random draws and epochs compare fairly."""
        val = ISNet(self.cfg, torch.Generator().manual_seed(int(seed)))
        val.create_graph = False  # values only: nothing back-propagates through validation
        return val


METHOD_NAMES = ("standard", "isnet", "segment_then_classify", "rrr", "background_swap")

_ISNET_CFG_FIELDS = set(ISNetLossConfig.__dataclass_fields__)
_ISNET_METHOD_PARAMS = {  # ISNet's own, not the loss's
    "seed",
    "warmup_epochs",
    "lung_only_prob",
    "teacher",
    "distill",
    "distill_T",
    "swap_background",
}


def build_method(name: str, **params: Any) -> Method:
    """Build a method by name.

    - ``standard``, ``segment_then_classify``, ``background_swap``: no parameters.
    - ``rrr``: ``lam`` (default 10).
    - ``isnet``: any :class:`ISNetLossConfig` field (``variant``, ``P``, ``C1``, ``C2``, ``eps``,
      ...), plus ``seed`` (for the stochastic selector's generator), ``warmup_epochs``,
      ``lung_only_prob``, ``teacher`` / ``distill`` / ``distill_T`` and ``swap_background``
      (see :class:`ISNet`).
    """
    key = name.lower().replace("-", "_")
    if key == "standard":
        _no_params(key, params)
        return Standard()
    if key == "segment_then_classify":
        _no_params(key, params)
        return SegmentThenClassify()
    if key == "background_swap":
        _no_params(key, params)
        return BackgroundSwap()
    if key == "rrr":
        unknown = set(params) - {"lam"}
        if unknown:
            raise ValueError(f"unknown parameter(s) for method 'rrr': {sorted(unknown)}")
        return RRR(**params)
    if key == "isnet":
        params = dict(params)
        seed = params.pop("seed", None)
        warmup = int(params.pop("warmup_epochs", 0))
        lung_only = float(params.pop("lung_only_prob", 0.0))
        passed = _ISNET_METHOD_PARAMS - {"seed", "warmup_epochs", "lung_only_prob"}
        own = {k: params.pop(k) for k in passed if k in params}
        unknown = set(params) - _ISNET_CFG_FIELDS
        if unknown:
            raise ValueError(
                f"unknown parameter(s) for method 'isnet': {sorted(unknown)}; "
                f"known: {sorted(_ISNET_CFG_FIELDS | _ISNET_METHOD_PARAMS)}"
            )
        gen = None
        if seed is not None:
            gen = torch.Generator().manual_seed(int(seed))
        return ISNet(
            ISNetLossConfig(**params), gen, warmup_epochs=warmup, lung_only_prob=lung_only, **own
        )
    raise ValueError(f"unknown method '{name}'; choose one of {', '.join(METHOD_NAMES)}")


def _no_params(name: str, params: dict[str, Any]) -> None:
    if params:
        raise ValueError(f"method '{name}' takes no parameters, got {sorted(params)}")
