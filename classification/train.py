"""Training classifiers with any :mod:`classification.methods` objective inside MONAI engines.

The loop is a MONAI :class:`~monai.engines.SupervisedTrainer` whose ``iteration_update`` is a
:class:`MethodIteration` (method loss, gradient-norm clipping, optimizer step), so every
MONAI/ignite handler applies, including the MLflow handler that
``monai.bundle run --tracking mlflow`` adds.
Validation runs each epoch in a :class:`~monai.engines.SupervisedEvaluator` (accuracy + AUROC,
plus the method's own loss ``val_loss``, see :class:`ValidationLoss`); the model chosen by
``TrainConfig.select`` (ISNet: lowest validation ISNet loss, others: best accuracy; see
:func:`resolve_select`) is saved as a plain state dict (``best_model.pt``, load with
``weights_only=True``);
model, optimizer and trainer state are saved each epoch so an interrupted run resumes. The
random streams (shuffling, augmentation, dropout, the ISNet selector) are re-seeded from
``(seed, epoch)`` at the start of every epoch (:class:`EpochSeeder`), so a resumed run is
bit-identical to an uninterrupted one (``tests/test_train.py``).

The same factory functions build the objects for :func:`train` (Python / CLI) and for the bundle
config ``configs/train.json``.

Files written to ``out_dir``: ``best_model.pt``, ``best_metric.json``, ``last_model.pt``,
``checkpoints/resume_checkpoint_epoch=N.pt``, ``isnet_constants.json`` (ISNet with tuned C1/C2),
``train_config.json``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from ignite.metrics import Accuracy
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents, PrepareBatch
from monai.handlers import ROCAUC, CheckpointLoader, LrScheduleHandler, ValidationHandler
from monai.inferers import SimpleInferer
from monai.transforms import Activationsd
from monai.utils import CommonKeys as Keys
from monai.utils import set_determinism
from torch import Tensor, nn

from classification.data import (
    AUGMENT_POLICIES,
    GAMMA_SUFFIX,
    AugmentConfig,
    build_dataset,
    build_loader,
    plain_tensors,
)
from classification.isnet_loss import ISNetLossConfig, make_selector, tune_c1_c2
from classification.lrp import lrp_heatmaps
from classification.methods import ISNet, Method, build_method
from classification.model_card import ModelCardWriter, training_summary
from classification.models import build_backbone
from cxr_io.determinism import EpochSeeder, torch_threads
from cxr_io.manifest import class_names, load_manifest, to_records

__all__ = [
    "BestStateDictSaver",
    "EpochReporter",
    "MethodIteration",
    "MethodPrepareBatch",
    "ResumeCheckpointer",
    "ISNET_AUGMENT",
    "ISNET_SELECT",
    "LR_SCHEDULES",
    "SELECT_CRITERIA",
    "TrainConfig",
    "TrainResult",
    "ValidationLoss",
    "accuracy_output",
    "auroc_output",
    "backbone_factory",
    "latest_checkpoint",
    "load_splits",
    "make_evaluator",
    "make_lr_scheduler",
    "make_method",
    "make_optimizer",
    "make_trainer",
    "method_needs_masks",
    "resolve_augment",
    "resolve_select",
    "share_method_constants",
    "train",
    "tune_isnet_constants",
]

logger = logging.getLogger(__name__)

BEST_MODEL = "best_model.pt"
BEST_METRIC = "best_metric.json"
LAST_MODEL = "last_model.pt"
CONSTANTS = "isnet_constants.json"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PREFIX = "resume"

#: augmentation policy of ``augment="auto"`` for the ISNet (other methods: ``full``); round 6 of
#: docs/isnet-results.md: geometric augmentation slows the ISNet's learning of the finding.
ISNET_AUGMENT = "intensity"
#: model selection of ``select="auto"`` for the ISNet (other methods: ``val_acc``): the
#: validation ISNet loss, as the authors' Faster-ISNet code does; accuracy on a biased validation
#: split rewards the shortcut (round 6 of docs/isnet-results.md).
ISNET_SELECT = "val_loss"
#: what ``TrainConfig.select`` may name (``auto`` resolves to one of them).
SELECT_CRITERIA = ("val_acc", "val_auroc", "val_loss", "last")
#: what ``TrainConfig.lr_schedule`` may name (see :func:`make_lr_scheduler`).
LR_SCHEDULES = ("constant", "cosine")


# --------------------------------------------------------------------------- configuration


@dataclass
class TrainConfig:
    """Everything a training run depends on (one place; the CLI and the bundle fill it).

    ``method_params`` go to :func:`classification.methods.build_method`. For ``isnet`` with
    ``tune_constants`` (default), C1/C2 come from :func:`tune_isnet_constants` run for
    ``tune_epochs`` on a plain network trained on the UN-augmented training images, unless
    ``method_params`` sets them.

    ``augment``: a policy of :data:`classification.data.AUGMENT_POLICIES` (``none``,
    ``intensity``, ``geometric``, ``full``; each may end in ``+gamma`` for a random contrast
    gamma as well), ``True`` (= ``full``), ``False`` (= ``none``) or
    ``auto`` (ISNet: :data:`ISNET_AUGMENT`, others ``full``); see :func:`resolve_augment`.
    ``select``: which epoch's weights become ``best_model.pt``: one of :data:`SELECT_CRITERIA`
    or ``auto`` (ISNet: :data:`ISNET_SELECT`, others ``val_acc``); see :func:`resolve_select`.
    ``threads``: PyTorch intra-op threads while this run trains (0: leave PyTorch's setting);
    float sums depend on it, so a fixed value makes a run repeatable on any machine size.
    ``lr_schedule``: ``constant`` (``lr`` throughout) or ``cosine`` (annealed from ``lr`` towards 0
    over ``epochs``, stepped once per epoch; see :func:`make_lr_scheduler`).
    ``init_from``: a state dict of the same backbone (another run's ``best_model.pt``) the network
    starts from instead of a random initialisation (fine-tuning); empty: random. The ISNet's
    C1/C2 are still tuned on a freshly initialised plain network.
    """

    method: str = "standard"
    method_params: dict[str, Any] = field(default_factory=dict)
    backbone: str = "small_cnn"
    width: int = 16
    size: int = 128
    in_channels: int = 1
    dropout: float = 0.5
    epochs: int = 10
    batch_size: int = 16
    optimizer: str = "adam"
    lr: float = 1e-3
    lr_schedule: str = "constant"
    momentum: float = 0.99
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    augment: bool | str = "auto"
    select: str = "auto"
    cache: bool = False
    num_workers: int = 0
    threads: int = 0
    init_from: str = ""
    tune_constants: bool = True
    tune_epochs: int = 5
    device: str = "cpu"


@dataclass
class TrainResult:
    """Where a finished run left its outputs and how it did."""

    out_dir: Path
    best_model: Path
    last_model: Path
    best_metric: float | None
    epochs_done: int
    constants: tuple[float, float] | None
    history: list[dict[str, float]]
    select: str = "val_acc"
    best_epoch: int | None = None


# --------------------------------------------------------------------------- engine pieces


def _plain(t: Any) -> Any:
    """MetaTensor -> plain tensor (MetaTensor ops are slower and carry file metadata)."""
    return t.as_tensor() if hasattr(t, "as_tensor") else t


def unpack_batch(
    batch: dict[str, Any], device: torch.device | str, non_blocking: bool = False
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(images [B, C, H, W] float, labels [B] long, masks [B, 1, H, W] | None)`` on device."""
    images = _plain(batch[Keys.IMAGE]).to(device, non_blocking=non_blocking).float()
    labels = _plain(batch[Keys.LABEL]).to(device, non_blocking=non_blocking).long().view(-1)
    mask = batch.get("mask")
    masks = None if mask is None else _plain(mask).to(device, non_blocking=non_blocking).float()
    return images, labels, masks


class MethodPrepareBatch(PrepareBatch):
    """Evaluator batches: ``(method.prepare_inputs(images, masks), labels)``."""

    def __init__(self, method: Method) -> None:
        self.method = method

    def __call__(
        self,
        batchdata: dict[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        images, labels, masks = unpack_batch(batchdata, device or "cpu", non_blocking)
        return self.method.prepare_inputs(images, masks), labels


class MethodIteration:
    """``iteration_update`` for :class:`SupervisedTrainer`: one optimisation step of ``method``.

    Clips the global gradient norm to ``grad_clip`` (``<= 0``: no clipping). Stores the method's
    loss parts in ``engine.state.method_parts``. A non-finite loss stops training with an error.
    """

    def __init__(self, method: Method, grad_clip: float = 1.0) -> None:
        self.method = method
        self.grad_clip = float(grad_clip)

    def __call__(self, engine: SupervisedTrainer, batchdata: dict[str, Any]) -> dict[str, Tensor]:
        images, labels, masks = unpack_batch(batchdata, engine.state.device, engine.non_blocking)
        engine.state.output = {Keys.IMAGE: images, Keys.LABEL: labels}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        out = self.method.loss(engine.network, images, labels, masks)
        engine.state.output[Keys.PRED] = out.logits
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.state.output[Keys.LOSS] = out.loss
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        if not torch.isfinite(out.loss):
            raise FloatingPointError(
                f"method '{self.method.name}' gave a non-finite loss ({out.parts}) at epoch "
                f"{engine.state.epoch}, iteration {engine.state.iteration}; lower the learning "
                "rate or check the inputs"
            )
        out.loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_(engine.network.parameters(), self.grad_clip)
        engine.optimizer.step()
        engine.state.method_parts = dict(out.parts)
        # same events and output as SupervisedTrainer's own iteration (decollation, handlers)
        engine.state.output[Keys.PRED] = out.logits.detach()
        engine.state.output[Keys.LOSS] = out.loss.detach()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


def _loss_in_method(*_: Any) -> Tensor:
    raise RuntimeError("the training method computes the loss (MethodIteration); this is unused")


def accuracy_output(output: Sequence[dict[str, Tensor]]) -> tuple[Tensor, Tensor]:
    """Decollated evaluator output -> ``(probabilities [B, N], labels [B])`` for ignite Accuracy."""
    preds = torch.stack([o[Keys.PRED] for o in output])
    labels = torch.stack([torch.as_tensor(o[Keys.LABEL]).view(()) for o in output]).long()
    return preds, labels


def auroc_output(output: Sequence[dict[str, Tensor]]) -> tuple[list[Tensor], list[Tensor]]:
    """Decollated evaluator output -> ``(probabilities [N] each, one-hot labels [N] each)``."""
    n = output[0][Keys.PRED].shape[0]
    preds = [o[Keys.PRED] for o in output]
    labels = [F.one_hot(torch.as_tensor(o[Keys.LABEL]).view(()).long(), n).float() for o in output]
    return preds, labels


class BestStateDictSaver:
    """Evaluator handler: saves ``model.state_dict()`` to ``out_dir/best_model.pt`` when the
    metric improves (strictly: higher with ``mode="max"``, lower with ``"min"``, e.g. a loss);
    records value and epoch in ``best_metric.json``. With ``resume``, the best value recorded by
    an earlier run is the one to beat."""

    def __init__(
        self,
        model: nn.Module,
        out_dir: str | Path,
        metric: str = "val_acc",
        resume: bool = False,
        mode: str = "max",
    ) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.model = model
        self.out_dir = Path(out_dir)
        self.metric = metric
        self.mode = mode
        self.best: float | None = None
        self.best_epoch: int | None = None
        info = self.out_dir / BEST_METRIC
        if resume and info.is_file() and (self.out_dir / BEST_MODEL).is_file():
            data = json.loads(info.read_text())
            self.best, self.best_epoch = data.get("value"), data.get("epoch")

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        value = engine.state.metrics.get(self.metric)
        if value is None or not math.isfinite(float(value)):
            return
        value = float(value)
        better = self.best is None or (
            value < self.best if self.mode == "min" else value > self.best
        )
        if better:
            self.best, self.best_epoch = value, int(engine.state.epoch)
            self.out_dir.mkdir(parents=True, exist_ok=True)
            torch.save(self.model.state_dict(), self.out_dir / BEST_MODEL)
            (self.out_dir / BEST_METRIC).write_text(
                json.dumps(
                    {
                        "metric": self.metric,
                        "value": value,
                        "epoch": self.best_epoch,
                        "mode": self.mode,
                    }
                )
            )


class ValidationLoss:
    """Evaluator handler: after each validation pass, the method's own objective on the
    validation set (eval mode, so no dropout) into ``engine.state.metrics`` as ``val_loss``
    (mean over images) and ``val_<part>`` for its parts (ISNet: ``ce``, ``heatmap``, ``bg``,
    ``fg``). For the ISNet this is ``(1 - P) CE + P L_H`` with the full ``P`` and a re-seeded
    selector (:meth:`classification.methods.ISNet.for_validation`), the Faster-ISNet selection
    criterion: a checkpoint that uses the background pays for it here, whereas validation
    accuracy on a biased split rewards it. Attach it before a :class:`BestStateDictSaver` that
    reads ``val_loss``. Under DDP (each rank validating its shard) the sums are all-reduced, so
    every rank gets the loss of the whole validation set.
    """

    def __init__(
        self, method: Method, loader: Iterable[dict[str, Any]], device: torch.device | str
    ) -> None:
        self.method = method
        self.loader = loader
        self.device = device

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        engine.state.metrics.update(self.compute(engine.network))

    def compute(self, model: nn.Module) -> dict[str, float]:
        """``{"val_loss": mean loss, "val_<part>": mean part}`` over the loader's images."""
        for_validation = getattr(self.method, "for_validation", None)
        method = for_validation() if callable(for_validation) else self.method
        was_training = model.training
        model.eval()
        sums: dict[str, float] = {}
        n = 0
        try:
            with torch.enable_grad():  # LRP / input gradients need autograd
                for batch in self.loader:
                    images, labels, masks = unpack_batch(batch, self.device)
                    out = method.loss(model, images, labels, masks)
                    b = int(labels.shape[0])
                    sums["val_loss"] = sums.get("val_loss", 0.0) + float(out.loss.detach()) * b
                    for k, v in out.parts.items():
                        if k != "P":
                            sums[f"val_{k}"] = sums.get(f"val_{k}", 0.0) + float(v) * b
                    n += b
        finally:
            model.train(was_training)
        keys = sorted(sums)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # each rank saw its validation shard: sum over ranks so all select alike
            totals = torch.tensor([sums[k] for k in keys] + [float(n)], dtype=torch.float64)
            torch.distributed.all_reduce(totals)
            sums, n = dict(zip(keys, totals[:-1].tolist(), strict=True)), int(totals[-1])
        return {k: v / max(n, 1) for k, v in sums.items()}


def latest_checkpoint(save_dir: str | Path) -> Path | None:
    """The resume checkpoint with the highest epoch in ``save_dir`` (or None)."""
    best: tuple[int, Path] | None = None
    for p in Path(save_dir).glob(f"{CHECKPOINT_PREFIX}_checkpoint_epoch=*.pt"):
        m = re.search(r"epoch=(\d+)\.pt$", p.name)
        if m and (best is None or int(m.group(1)) > best[0]):
            best = (int(m.group(1)), p)
    return None if best is None else best[1]


class ResumeCheckpointer:
    """Trainer handler: saves model + optimizer + trainer state after every epoch (keeping the
    latest), and with ``resume`` loads the latest one with MONAI's ``CheckpointLoader`` when the
    trainer starts, so the epoch counter continues.

    With a learning-rate ``scheduler``, its state travels in the checkpoint too.

    Each checkpoint is written to a temporary file and renamed into place (MONAI's
    ``CheckpointSaver`` writes in place: a run killed while saving left a truncated checkpoint
    that the next resume could not load); only then is the previous one removed. Under
    ``torch.distributed`` only rank 0 writes.
    """

    def __init__(
        self,
        save_dir: str | Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        resume: bool,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    ) -> None:
        self.save_dir = Path(save_dir)
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.resume = bool(resume)
        self.loaded_from: Path | None = None

    def _objects(self, engine: Engine) -> dict[str, Any]:
        objects = {"model": self.model, "optimizer": self.optimizer, "trainer": engine}
        if self.scheduler is not None:
            objects["lr_scheduler"] = self.scheduler
        return objects

    def attach(self, engine: Engine) -> None:
        if self.resume:
            path = latest_checkpoint(self.save_dir)
            if path is None:
                logger.warning(
                    "resume requested but no checkpoint in %s: starting fresh", self.save_dir
                )
            else:
                self.loaded_from = path
                load_dict = self._objects(engine)
                CheckpointLoader(load_path=str(path), load_dict=load_dict).attach(engine)
        self.save_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.save_dir.glob(f".{CHECKPOINT_PREFIX}_checkpoint_epoch=*.pt.tmp"):
            stale.unlink(missing_ok=True)  # a write cut short by a kill
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def save(self, engine: Engine) -> None:
        """Write ``resume_checkpoint_epoch=N.pt`` atomically, then drop the older ones."""
        if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            return
        name = f"{CHECKPOINT_PREFIX}_checkpoint_epoch={engine.state.epoch}.pt"
        path = self.save_dir / name
        tmp = path.with_name(f".{name}.tmp")
        torch.save({k: v.state_dict() for k, v in self._objects(engine).items()}, tmp)
        os.replace(tmp, path)
        for old in self.save_dir.glob(f"{CHECKPOINT_PREFIX}_checkpoint_epoch=*.pt"):
            if old != path:
                old.unlink(missing_ok=True)


class EpochReporter:
    """Trainer handler: tells the method the epoch (``set_epoch``, for warm-ups), averages the loss
    parts over the epoch into ``engine.state.metrics`` as ``train_<part>`` (so tracking handlers log
    them), appends a row to ``history`` and passes a one-line summary to ``progress``.

    Attach it after the ``ValidationHandler`` so the summary includes validation metrics.
    """

    def __init__(
        self,
        method: Method,
        evaluator: Engine | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.method = method
        self.evaluator = evaluator
        self.progress = progress
        self.history: list[dict[str, float]] = []
        self._sums: dict[str, float] = {}
        self._n = 0
        self._t0 = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def epoch_started(self, engine: Engine) -> None:
        set_epoch = getattr(self.method, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(engine.state.epoch)
        self._sums, self._n, self._t0 = {}, 0, time.perf_counter()

    def iteration_completed(self, engine: Engine) -> None:
        for k, v in getattr(engine.state, "method_parts", {}).items():
            self._sums[k] = self._sums.get(k, 0.0) + float(v)
        self._n += 1

    def epoch_completed(self, engine: Engine) -> None:
        row: dict[str, float] = {"epoch": float(engine.state.epoch)}
        for k, v in self._sums.items():
            row[f"train_{k}"] = v / max(self._n, 1)
            engine.state.metrics[f"train_{k}"] = row[f"train_{k}"]
        if self.evaluator is not None:
            for k, v in self.evaluator.state.metrics.items():
                row[k] = float(v)
        row["seconds"] = time.perf_counter() - self._t0
        self.history.append(row)
        if self.progress is not None:
            text = "  ".join(
                f"{k}={v:.4g}" for k, v in row.items() if k not in ("epoch", "seconds")
            )
            self.progress(
                f"epoch {int(row['epoch'])}/{engine.state.max_epochs}  {text}  "
                f"({row['seconds']:.1f}s)"
            )


def make_optimizer(
    params: Iterable[nn.Parameter],
    name: str = "adam",
    lr: float = 1e-3,
    momentum: float = 0.99,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """Adam (default) or SGD with momentum (the ISNet paper's choice: momentum 0.99)."""
    key = name.lower()
    if key == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if key == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer '{name}'; choose 'adam' or 'sgd'")


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer, name: str, epochs: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The per-epoch learning-rate schedule of :data:`LR_SCHEDULES`: ``constant`` -> ``None``;
    ``cosine`` -> :class:`torch.optim.lr_scheduler.CosineAnnealingLR` over ``epochs`` (epoch e,
    1-based, trains at ``lr * (1 + cos(pi * (e - 1) / epochs)) / 2``), for MONAI's
    :class:`~monai.handlers.LrScheduleHandler` stepping once per epoch."""
    key = str(name).lower()
    if key == "constant":
        return None
    if key == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(int(epochs), 1))
    raise ValueError(f"unknown lr_schedule {name!r}; choose one of {LR_SCHEDULES}")


def tune_isnet_constants(
    model_factory: Callable[[], nn.Module],
    loader: Iterable[dict[str, Any]],
    epochs: int = 5,
    *,
    variant: str = ISNetLossConfig.variant,
    eps: float = 0.01,
    lr: float = 1e-3,
    device: str | torch.device = "cpu",
    grad_clip: float = 1.0,
    seed: int | None = None,
    input_bounds: tuple[float, float] | None = (0.0, 1.0),
    heatmap_layer: str | None = None,
) -> tuple[float, float]:
    """Auto C1/C2 (Faster-ISNet recipe): train a plain classifier (cross-entropy, Adam) for
    ``epochs``; in the last epoch record each training sample's total ``sum |R|`` (heatmaps of the
    ``variant``'s selected outputs, every explained output counted) before its step; return
    :func:`classification.isnet_loss.tune_c1_c2` of those totals.

    The heatmap is the one the ISNet loss will use: same first-layer rule (``input_bounds``) and,
    with ``heatmap_layer``, the relevance at that layer summed over its channels."""
    if epochs < 1:
        raise ValueError(f"tuning needs at least one epoch, got {epochs}")
    model = model_factory().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    selector = make_selector(variant, generator=gen)
    totals: list[Tensor] = []
    for epoch in range(1, epochs + 1):
        for batch in loader:
            images, labels, _ = unpack_batch(batch, device)
            model.train()
            if epoch == epochs:
                _, R = lrp_heatmaps(
                    model,
                    images,
                    selector,
                    eps=eps,
                    input_bounds=input_bounds,
                    at=heatmap_layer,
                    create_graph=False,
                )
                if heatmap_layer is not None:  # as the loss sees it: channels summed first
                    R = R.sum(dim=2, keepdim=True)
                totals.append(R.detach().abs().flatten(2).sum(dim=2).flatten().cpu())
            opt.zero_grad()
            loss = F.cross_entropy(model(images), labels)
            loss.backward()
            if grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
    C1, C2 = tune_c1_c2(torch.cat(totals))
    return float(C1), float(C2)


def make_method(
    name: str,
    params: dict[str, Any] | None = None,
    *,
    tune_constants: bool = True,
    tune_epochs: int = 5,
    model_factory: Callable[[], nn.Module] | None = None,
    loader: Iterable[dict[str, Any]] | Callable[[], Iterable[dict[str, Any]]] | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    lr: float = 1e-3,
    device: str | torch.device = "cpu",
    seed: int | None = None,
) -> Method:
    """Build the training method; for ``isnet`` with ``tune_constants`` and no explicit C1/C2,
    tune them first (or, with ``resume``, reuse ``out_dir/isnet_constants.json``) and write them
    to ``out_dir/isnet_constants.json``. ``loader`` (the tuning batches) may be a function
    making it, called only when the constants are tuned."""
    params = dict(params or {})
    method = build_method(name, **params)
    if not isinstance(method, ISNet) or not tune_constants or {"C1", "C2"} & set(params):
        return method
    store = Path(out_dir) / CONSTANTS if out_dir is not None else None
    if resume and store is not None and store.is_file():
        data = json.loads(store.read_text())
        return method.with_constants(data["C1"], data["C2"])
    if model_factory is None or loader is None:
        raise ValueError("tuning ISNet constants needs model_factory and loader")
    if callable(loader):
        loader = loader()
    C1, C2 = tune_isnet_constants(
        model_factory,
        loader,
        tune_epochs,
        variant=method.cfg.variant,
        eps=method.cfg.eps,
        lr=lr,
        device=device,
        seed=seed,
        input_bounds=method.cfg.input_bounds,
        heatmap_layer=method.cfg.heatmap_layer,
    )
    logger.info("ISNet constants tuned on a plain network: C1=%.4g C2=%.4g", C1, C2)
    if store is not None:
        store.parent.mkdir(parents=True, exist_ok=True)
        store.write_text(json.dumps({"C1": C1, "C2": C2, "tune_epochs": tune_epochs}))
    return method.with_constants(C1, C2)


def share_method_constants(method: Method, src: int = 0) -> Method:
    """Multi-process training (``torch.distributed`` initialised): every process takes process
    ``src``'s ISNet constants C1/C2, so all ranks optimise the same loss even when their own
    tuning differed (other seeds, non-deterministic kernels). Other methods are returned as is.
    Every process must call it (a collective ``broadcast``)."""
    if not isinstance(method, ISNet):
        return method
    import torch.distributed as dist

    # a CPU tensor works with gloo; NCCL needs it on this process's current CUDA device
    device = (
        torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    )
    constants = torch.tensor([method.cfg.C1, method.cfg.C2], dtype=torch.float64, device=device)
    dist.broadcast(constants, src=src)
    return method.with_constants(float(constants[0]), float(constants[1]))


def make_evaluator(
    device: str | torch.device,
    val_data_loader: Iterable[dict[str, Any]],
    network: nn.Module,
    method: Method,
    val_handlers: Sequence[Any] | None = None,
) -> SupervisedEvaluator:
    """Evaluator: softmax probabilities, key metric ``val_acc`` (ignite Accuracy), additional
    ``val_auroc`` (MONAI ROCAUC, macro one-vs-rest); inputs prepared by the method."""
    return SupervisedEvaluator(
        device=torch.device(device),
        val_data_loader=val_data_loader,
        network=network,
        prepare_batch=MethodPrepareBatch(method),
        inferer=SimpleInferer(),
        postprocessing=Activationsd(keys=Keys.PRED, softmax=True),
        key_val_metric={"val_acc": Accuracy(output_transform=accuracy_output)},
        additional_metrics={"val_auroc": ROCAUC(output_transform=auroc_output)},
        val_handlers=list(val_handlers or []),
    )


def make_trainer(
    device: str | torch.device,
    max_epochs: int,
    train_data_loader: Iterable[dict[str, Any]],
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    method: Method,
    train_handlers: Sequence[Any] | None = None,
    grad_clip: float = 1.0,
    inferer: Any = None,
) -> SupervisedTrainer:
    """A :class:`SupervisedTrainer` whose iteration is :class:`MethodIteration`."""
    return SupervisedTrainer(
        device=torch.device(device),
        max_epochs=int(max_epochs),
        train_data_loader=train_data_loader,
        network=network,
        optimizer=optimizer,
        loss_function=_loss_in_method,
        iteration_update=MethodIteration(method, grad_clip),
        inferer=inferer or SimpleInferer(),
        train_handlers=list(train_handlers or []),
    )


def resolve_augment(cfg: TrainConfig) -> str:
    """The augmentation policy a run uses: ``cfg.augment`` as a policy name; ``True`` -> ``full``,
    ``False`` -> ``none``; ``auto`` -> :data:`ISNET_AUGMENT` for the ISNet, ``full`` otherwise."""
    aug = cfg.augment
    if isinstance(aug, bool):
        return "full" if aug else "none"
    key = str(aug).lower()
    if key == "auto":
        return ISNET_AUGMENT if _is_isnet(cfg.method) else "full"
    if key.removesuffix(GAMMA_SUFFIX) not in AUGMENT_POLICIES:
        raise ValueError(
            f"unknown augment {aug!r}; choose 'auto', True, False or one of {AUGMENT_POLICIES} "
            f"(each optionally with {GAMMA_SUFFIX!r}, e.g. 'full{GAMMA_SUFFIX}')"
        )
    return key


def resolve_select(cfg: TrainConfig) -> str:
    """The model-selection criterion a run uses: ``cfg.select``, with ``auto`` ->
    :data:`ISNET_SELECT` for the ISNet and ``val_acc`` otherwise."""
    key = str(cfg.select).lower()
    if key == "auto":
        return ISNET_SELECT if _is_isnet(cfg.method) else "val_acc"
    if key not in SELECT_CRITERIA:
        raise ValueError(
            f"unknown select {cfg.select!r}; choose 'auto' or one of {SELECT_CRITERIA}"
        )
    return key


def _is_isnet(method: str) -> bool:
    return method.lower().replace("-", "_") == "isnet"


def method_needs_masks(name: str, params: dict[str, Any] | None = None) -> bool:
    """Whether method ``name`` trains with lung masks (the dataset then requires them)."""
    return build_method(name, **dict(params or {})).needs_masks


def backbone_factory(
    name: str, num_classes: int, in_channels: int = 1, dropout: float = 0.5, width: int = 16
) -> Callable[[], nn.Module]:
    """A zero-argument callable building a fresh backbone (for constant tuning)."""
    return partial(build_backbone, name, num_classes, in_channels, dropout, width)


def load_splits(
    manifest: str | Path, *, val_fraction: float = 0.15, seed: int = 0
) -> dict[str, Any]:
    """Read a manifest: ``{"classes", "train", "val"}`` record lists (``split`` column ``train`` /
    ``val``; rows with an empty split count as train). With no ``val`` rows, a seeded
    ``val_fraction`` of the training patients (or images, if no patient ids) becomes validation."""
    import numpy as np

    df = load_manifest(manifest)
    classes = class_names(df)
    split = df["split"].fillna("").astype(str) if "split" in df.columns else None
    if split is None:
        train_df, val_df = df, df.iloc[0:0]
    else:
        train_df, val_df = df[split.isin(["train", ""])], df[split == "val"]
    if len(train_df) == 0:
        raise ValueError(f"manifest {manifest} has no training rows (split 'train' or empty)")
    if len(val_df) == 0 and val_fraction > 0:
        groups = train_df["patient_id"].astype(str) if "patient_id" in train_df else None
        if groups is None or (groups == "").any():
            groups = train_df["image"].astype(str)
        uniq = np.array(sorted(set(groups)))
        rng = np.random.default_rng(seed)
        n_val = max(1, round(len(uniq) * val_fraction))
        val_groups = set(rng.choice(uniq, size=n_val, replace=False).tolist())
        is_val = groups.isin(val_groups)
        train_df, val_df = train_df[~is_val], train_df[is_val]
    return {
        "classes": classes,
        "train": to_records(train_df, classes),
        "val": to_records(val_df, classes) if len(val_df) else [],
    }


# --------------------------------------------------------------------------- one call


def train(
    train_records: Sequence[dict[str, Any]],
    val_records: Sequence[dict[str, Any]],
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    num_classes: int,
    classes: Sequence[str] | None = None,
    resume: bool = False,
    extra_handlers: Sequence[Any] = (),
    progress: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train ``cfg.method`` on ``train_records``, validating on ``val_records`` each epoch.

    Args:
        train_records, val_records: manifest records (``image``, ``label``, ``mask``).
        cfg: the run's configuration.
        out_dir: output folder (see the module docstring for its files).
        num_classes: number of classes N (logits ``[B, N]``).
        classes: their names in output order; given, ``model.json`` is written beside the
            weights (:class:`~classification.model_card.ModelCardWriter`).
        resume: continue from the latest checkpoint in ``out_dir/checkpoints``.
        extra_handlers: more trainer handlers (e.g. to stop early).
        progress: called with a one-line summary after each epoch.
    """
    if cfg.init_from and not Path(cfg.init_from).is_file():  # before minutes of C1/C2 tuning
        raise FileNotFoundError(
            f"init_from: {cfg.init_from} is not a file; give the best_model.pt (a state dict) "
            f"of an earlier {cfg.backbone} run, or leave init_from empty for a random start"
        )
    with torch_threads(cfg.threads), plain_tensors():
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        set_determinism(seed=cfg.seed)
        device = torch.device(cfg.device)
        probe = build_method(cfg.method, **cfg.method_params)
        policy = resolve_augment(cfg)
        select = resolve_select(cfg)
        augment = AugmentConfig.from_policy(policy)
        train_ds = build_dataset(
            train_records, cfg.size, need_masks=probe.needs_masks, augment=augment, cache=cfg.cache
        )
        train_loader = build_loader(
            train_ds, cfg.batch_size, shuffle=True, num_workers=cfg.num_workers
        )

        def tune_loader() -> Iterable[dict[str, Any]]:
            # C1/C2 are tuned on the deterministic transform: augmented images give other
            # relevance totals (round 6: C1 2.69 augmented vs 9.79 plain) and a mis-scaled
            # foreground term; built only when an ISNet tunes them (filling a cache costs time)
            plain = train_ds
            if augment is not None:
                plain = build_dataset(
                    train_records, cfg.size, need_masks=probe.needs_masks, cache=cfg.cache
                )
            return build_loader(plain, cfg.batch_size, shuffle=True, num_workers=cfg.num_workers)

        model_factory = backbone_factory(
            cfg.backbone, num_classes, cfg.in_channels, cfg.dropout, cfg.width
        )

        method = make_method(
            cfg.method,
            cfg.method_params,
            tune_constants=cfg.tune_constants,
            tune_epochs=cfg.tune_epochs,
            model_factory=model_factory,
            loader=tune_loader,
            out_dir=out,
            resume=resume,
            lr=cfg.lr,
            device=device,
            seed=cfg.seed,
        )
        if isinstance(method, ISNet) and method.teacher:
            method.attach_teacher(model_factory, device)
        network = model_factory().to(device)
        if cfg.init_from:
            network.load_state_dict(
                torch.load(cfg.init_from, map_location=device, weights_only=True)
            )
        optimizer = make_optimizer(
            network.parameters(), cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay
        )
        evaluator = None
        best_saver = None
        # first: every random stream of the epoch is seeded before anything draws from it
        handlers: list[Any] = [EpochSeeder(cfg.seed, getattr(train_ds, "transform", None), method)]
        if val_records:
            val_ds = build_dataset(
                val_records, cfg.size, need_masks=method.needs_masks, augment=None, cache=cfg.cache
            )
            val_loader = build_loader(
                val_ds, cfg.batch_size, shuffle=False, num_workers=cfg.num_workers
            )
            val_handlers: list[Any] = [ValidationLoss(method, val_loader, device)]
            if select != "last":
                mode = "min" if select == "val_loss" else "max"
                best_saver = BestStateDictSaver(network, out, select, resume=resume, mode=mode)
                val_handlers.append(best_saver)
            evaluator = make_evaluator(device, val_loader, network, method, val_handlers)
            handlers.append(ValidationHandler(validator=evaluator, interval=1, epoch_level=True))
        if classes is not None:
            handlers.append(
                ModelCardWriter(
                    out,
                    backbone=cfg.backbone,
                    size=cfg.size,
                    classes=classes,
                    method=method,
                    in_channels=cfg.in_channels,
                    width=cfg.width,
                    training=training_summary(train_records, val_records, seed=cfg.seed),
                )
            )
        reporter = EpochReporter(method, evaluator, progress)
        handlers.append(reporter)
        scheduler = make_lr_scheduler(optimizer, cfg.lr_schedule, cfg.epochs)
        if scheduler is not None:  # stepped before the checkpoint saves its state
            handlers.append(LrScheduleHandler(scheduler, print_lr=False, epoch_level=True))
        handlers.append(
            ResumeCheckpointer(out / CHECKPOINT_DIR, network, optimizer, resume, scheduler)
        )
        handlers.extend(extra_handlers)
        (out / "train_config.json").write_text(
            json.dumps(
                {
                    **asdict(cfg),
                    "num_classes": num_classes,
                    "augment_policy": policy,
                    "select_by": select,
                },
                indent=2,
                default=str,
            )
        )
        trainer = make_trainer(
            device, cfg.epochs, train_loader, network, optimizer, method, handlers, cfg.grad_clip
        )
        trainer.run()
        torch.save(network.state_dict(), out / LAST_MODEL)
        if best_saver is None:
            torch.save(network.state_dict(), out / BEST_MODEL)
        constants = (method.cfg.C1, method.cfg.C2) if isinstance(method, ISNet) else None
        return TrainResult(
            out_dir=out,
            best_model=out / BEST_MODEL,
            last_model=out / LAST_MODEL,
            best_metric=None if best_saver is None else best_saver.best,
            epochs_done=int(trainer.state.epoch),
            constants=constants,
            history=reporter.history,
            select=select,
            best_epoch=int(trainer.state.epoch) if best_saver is None else best_saver.best_epoch,
        )
