"""Batch prediction with a trained classifier: probabilities, and LRP relevance metrics.

The same preprocessing as validation (:func:`classification.data.build_dataset` without
augmentation); the method's ``prepare_inputs`` is applied, so segment-then-classify sees masked
lungs at inference as it did in training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from classification.data import build_dataset, build_loader
from classification.explain import explain
from classification.methods import Method
from classification.metrics import relevance_metrics
from classification.models import build_backbone


@dataclass
class Predictions:
    """Outputs for N images, in record order.

    Attributes:
        probs: ``[N, K]`` softmax probabilities.
        labels: ``[N]`` true class indices.
        relevance: per-image relevance metrics (``[N]`` arrays; empty without masks).
        examples: up to ``keep_examples`` ``(image [S, S], mask [S, S], heatmap [S, S])`` triples
            of the first images, as the network saw them (before ``prepare_inputs``).
    """

    probs: np.ndarray
    labels: np.ndarray
    relevance: dict[str, np.ndarray] = field(default_factory=dict)
    examples: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)


def load_classifier(
    checkpoint: str | Path,
    backbone: str,
    num_classes: int,
    *,
    in_channels: int = 1,
    width: int = 16,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """A backbone with the state dict of ``checkpoint`` (loaded with ``weights_only=True``)."""
    model = build_backbone(backbone, num_classes, in_channels=in_channels, width=width)
    state = torch.load(checkpoint, map_location=device, weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval()


@torch.no_grad()
def _probs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(model(x), dim=1)


def predict(
    model: nn.Module,
    method: Method,
    records: Sequence[dict[str, Any]],
    size: int,
    *,
    batch_size: int = 32,
    with_relevance: bool = True,
    keep_examples: int = 0,
    eps: float = 0.01,
    device: str | torch.device = "cpu",
) -> Predictions:
    """Predict every record; with masks and ``with_relevance``, also explain the predicted class
    with LRP-epsilon and measure where the relevance lies (:func:`relevance_metrics`).

    Args:
        model: a trained, LRP-ready classifier.
        method: the training method (its ``prepare_inputs`` is applied).
        records: manifest records (``image``, ``label``, optional ``mask``).
        size: the network input side.
    """
    has_masks = all(r.get("mask") for r in records)
    ds = build_dataset(records, size, need_masks=method.needs_masks, augment=None)
    loader = build_loader(ds, batch_size, shuffle=False)
    model = model.to(device).eval()
    probs, labels, examples = [], [], []
    rel: dict[str, list[np.ndarray]] = {}
    for batch in loader:
        images = batch["image"].to(device)
        masks = batch["mask"].to(device) if has_masks else None
        x = method.prepare_inputs(images, masks)
        probs.append(_probs(model, x).cpu().numpy())
        labels.append(batch["label"].cpu().numpy())
        if with_relevance and masks is not None:
            heat = explain(model, x, eps=eps)
            for name, values in relevance_metrics(heat, masks).items():
                rel.setdefault(name, []).append(values.cpu().numpy())
            for i in range(min(len(images), keep_examples - len(examples))):
                examples.append(
                    (images[i, 0].cpu().numpy(), masks[i, 0].cpu().numpy(), heat[i, 0].numpy())
                )
    return Predictions(
        probs=np.concatenate(probs).astype(np.float64),
        labels=np.concatenate(labels).astype(int),
        relevance={k: np.concatenate(v) for k, v in rel.items()},
        examples=examples,
    )
