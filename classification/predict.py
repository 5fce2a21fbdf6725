"""Rebuild a trained classifier from its weights (prediction itself goes through
:class:`pipeline.predictor.Predictor` and :func:`classification.inputs.network_inputs`)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from classification.models import build_backbone


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
