"""Training pieces referenced by ``configs/train_seg.json`` (construction lives here, the config
only wires it).

- :func:`prepare_mask_batch`: the trainer/evaluator input is ``image``, the target is ``mask``.
- :class:`BestCheckpoint`: saves the network's plain state dict (+ spec sidecar) when the
  validation Dice improves.
- :class:`ResumableCheckpoint`: after every epoch writes ``last.pt`` (network, optimizer, trainer
  state, best score); at start, loads it when present, so an interrupted run continues from the
  saved epoch.
- :func:`train_seg`: the same workflow from Python (what ``isnet-cxr seg train`` calls).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader
from monai.transforms import Activationsd, AsDiscreted, Compose

from segmentation.model import SegModelSpec, save_checkpoint

logger = logging.getLogger(__name__)

TRAIN_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "train_seg.json"


def prepare_mask_batch(
    batchdata: dict[str, torch.Tensor],
    device: str | torch.device | None = None,
    non_blocking: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch dict -> (``image`` ``[B, 1, H, W]``, ``mask`` ``[B, 1, H, W]``) on ``device``.

    The manifest's ``label`` is the image's class; the segmentation target is ``mask``.
    """
    image = torch.as_tensor(batchdata["image"]).to(device=device, non_blocking=non_blocking)
    mask = torch.as_tensor(batchdata["mask"]).to(device=device, non_blocking=non_blocking)
    return image, mask


def binary_postprocessing(threshold: float = 0.5) -> Compose:
    """Logits -> {0, 1} predictions for the Dice/IoU handlers (per decollated item)."""
    return Compose(
        [
            Activationsd(keys="pred", sigmoid=True),
            AsDiscreted(keys="pred", threshold=threshold),
        ]
    )


def metric_score(metric: str = "val_mean_dice"):
    """Score function for ``EarlyStopHandler``: the evaluator's ``metric``."""

    def score(engine: Engine) -> float:
        return float(engine.state.metrics[metric])

    return score


class BestCheckpoint:
    """Evaluator handler: when ``metric`` beats the best so far, write the network's plain state
    dict to ``path`` (and the spec sidecar ``<path>.json``)."""

    def __init__(
        self,
        path: str | os.PathLike,
        network: torch.nn.Module,
        spec: SegModelSpec,
        metric: str = "val_mean_dice",
    ):
        self.path = Path(path)
        self.network, self.spec, self.metric = network, spec, metric
        self.best = -float("inf")
        self.best_epoch = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        value = float(engine.state.metrics[self.metric])
        if value > self.best:
            self.best, self.best_epoch = value, int(engine.state.epoch)
            save_checkpoint(self.network, self.path, self.spec)
            logger.info(
                "best %s=%.4f at epoch %d -> %s", self.metric, value, self.best_epoch, self.path
            )

    def state_dict(self) -> dict[str, float]:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.best = float(state["best"])
        self.best_epoch = int(state["best_epoch"])


class ResumableCheckpoint:
    """Trainer handler: save ``last.pt`` after each epoch; resume from it at start.

    Saved: network and optimizer state dicts, the trainer's state (epoch, iteration) and the
    :class:`BestCheckpoint` score. Writes are atomic (temporary file + rename), so an interruption
    while saving leaves the previous ``last.pt`` intact. Random-number states need no saving: the
    bundle's :class:`cxr_io.determinism.EpochSeeder` seeds every epoch's streams from
    ``(seed, epoch)``, so a resumed run is bit-identical to an uninterrupted one.

    Args:
        path: the ``last.pt`` file.
        network, optimizer: what to save and restore.
        best: the validation's :class:`BestCheckpoint` (its best score is restored too).
        resume: load ``path`` at start when it exists (``False``: start over, overwrite it).
        save: write ``path`` after each epoch (``False`` in the other processes of a
            multi-process run, which load the checkpoint but leave writing it to rank 0).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        best: BestCheckpoint | None = None,
        resume: bool = True,
        save: bool = True,
    ):
        self.path = Path(path)
        self.network, self.optimizer, self.best, self.resume = network, optimizer, best, resume
        self.save_enabled = bool(save)
        self.resumed_from_epoch: int | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.load)
        if self.save_enabled:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def load(self, engine: Engine) -> None:
        if not (self.resume and self.path.is_file()):
            return
        CheckpointLoader(
            load_path=str(self.path),
            load_dict={"network": self.network, "optimizer": self.optimizer, "trainer": engine},
            map_location="cpu",
        )(engine)
        extra = torch.load(self.path, map_location="cpu", weights_only=True).get("best")
        if self.best is not None and extra is not None:
            self.best.load_state_dict(extra)
        self.resumed_from_epoch = int(engine.state.epoch)
        logger.info("resumed from %s at epoch %d", self.path, engine.state.epoch)

    def save(self, engine: Engine) -> None:
        state = {
            "network": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "trainer": engine.state_dict(),
        }
        if self.best is not None:
            state["best"] = self.best.state_dict()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        torch.save(state, tmp)
        tmp.replace(self.path)


def train_seg(
    dataset_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    config_file: str | os.PathLike | Sequence[str | os.PathLike] = TRAIN_CONFIG,
    tracking: str | None = None,
    meta_file: str | os.PathLike | None = None,
    **overrides: Any,
) -> Path:
    """Run the training bundle workflow; return the best checkpoint path.

    Args:
        dataset_dir: folder holding ``manifest.csv`` (or pass ``manifest=...`` in overrides).
        output_dir: where ``models/model.pt`` (best), ``models/last.pt`` and logs go.
        config_file: the bundle config(s).
        meta_file: the bundle metadata (default ``configs/metadata.json`` of this repository).
        tracking: ``"mlflow"`` to log to MLflow (store: ``<output_dir>/mlruns.db`` unless
            ``MLFLOW_TRACKING_URI`` or a ``tracking_uri`` override says otherwise).
        overrides: any config id, e.g. ``{"train#trainer#max_epochs": 5, "spatial_size": [128,
            128]}``.
    """
    from monai.bundle import ConfigWorkflow

    files = (
        [str(f) for f in config_file]
        if isinstance(config_file, (list, tuple))
        else str(config_file)
    )
    wf = ConfigWorkflow(
        config_file=files,
        workflow_type="train",
        meta_file=str(meta_file or TRAIN_CONFIG.parent / "metadata.json"),
        dataset_dir=str(dataset_dir),
        output_dir=str(output_dir),
        bundle_root=str(TRAIN_CONFIG.parents[1]),
        tracking=tracking,
        **overrides,
    )
    wf.initialize()
    missing = wf.check_properties()
    if missing:
        raise ValueError(f"the training config lacks properties {missing}")
    try:
        wf.run()
    finally:
        wf.finalize()
    return Path(wf.parser.get_parsed_content("best_ckpt"))
