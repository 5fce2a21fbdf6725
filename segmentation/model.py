"""The lung-field U-Net: construction, saving and loading.

One output channel with a sigmoid: the network predicts the probability that a pixel belongs to
the lung field (both lungs are one class; left and right are told apart afterwards, from the
connected components). A single sigmoid channel keeps the checkpoint small and the
post-processing simple; the loss is ``DiceCELoss(sigmoid=True)``.

Checkpoints are plain ``state_dict`` files (``torch.load(weights_only=True)``). Next to each
checkpoint ``<name>.pt`` a sidecar ``<name>.json`` records the :class:`SegModelSpec` it was built
with, so inference rebuilds the same network and input size without guessing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from monai.networks.nets import UNet


@dataclass(frozen=True)
class SegModelSpec:
    """Everything needed to rebuild a segmentation network and feed it.

    Attributes:
        channels: feature channels per U-Net level (len(channels) - 1 down-sampling steps).
        strides: stride of each down-sampling step (len(channels) - 1 entries).
        num_res_units: residual units per level (0: plain convolutions).
        dropout: dropout probability inside the U-Net.
        spatial_size: (H, W) every image is resized to before the network sees it.
    """

    channels: tuple[int, ...] = (8, 16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2, 2)
    num_res_units: int = 1
    dropout: float = 0.0
    spatial_size: tuple[int, int] = (256, 256)
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> SegModelSpec:
        known = {k: d[k] for k in ("num_res_units", "dropout", "extra") if k in d}
        return cls(
            channels=tuple(int(c) for c in d.get("channels", cls.channels)),
            strides=tuple(int(s) for s in d.get("strides", cls.strides)),
            spatial_size=tuple(int(s) for s in d.get("spatial_size", cls.spatial_size)),
            **known,
        )


def build_seg_model(
    channels: Sequence[int] = SegModelSpec.channels,
    strides: Sequence[int] = SegModelSpec.strides,
    num_res_units: int = SegModelSpec.num_res_units,
    dropout: float = SegModelSpec.dropout,
) -> UNet:
    """A 2-D MONAI U-Net: input ``[B, 1, H, W]`` -> logits ``[B, 1, H, W]`` (lung field).

    ``H`` and ``W`` must be divisible by ``prod(strides)`` (16 with the defaults).
    """
    if len(strides) != len(channels) - 1:
        raise ValueError(
            f"strides needs len(channels) - 1 = {len(channels) - 1} entries, got {len(strides)}"
        )
    return UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=tuple(int(c) for c in channels),
        strides=tuple(int(s) for s in strides),
        num_res_units=int(num_res_units),
        dropout=float(dropout),
        norm="batch",
    )


def build_from_spec(spec: SegModelSpec) -> UNet:
    """:func:`build_seg_model` with the network fields of ``spec``."""
    return build_seg_model(spec.channels, spec.strides, spec.num_res_units, spec.dropout)


def sidecar_path(ckpt: str | os.PathLike) -> Path:
    """``model.pt`` -> ``model.json`` (the spec written beside a checkpoint)."""
    return Path(ckpt).with_suffix(".json")


def save_checkpoint(net: torch.nn.Module, path: str | os.PathLike, spec: SegModelSpec) -> Path:
    """Write ``net.state_dict()`` (atomically) and the spec sidecar; return the checkpoint path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(net.state_dict(), tmp)
    tmp.replace(path)
    sidecar_path(path).write_text(spec.to_json())
    return path


def write_spec(path: str | os.PathLike, spec: SegModelSpec) -> Path:
    """Write only the spec sidecar for checkpoint ``path``."""
    out = sidecar_path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(spec.to_json())
    return out


def load_spec(ckpt: str | os.PathLike, default: SegModelSpec | None = None) -> SegModelSpec:
    """The spec stored beside ``ckpt``, or ``default`` when there is none.

    Raises:
        FileNotFoundError: no sidecar and no ``default``. A U-Net is fully convolutional, so its
            weights load into a network of any input size: guessing the size would give wrong
            masks without an error (a 128-px model run at 256 px: Dice 0.76 instead of 0.98).
    """
    side = sidecar_path(ckpt)
    if side.is_file():
        return SegModelSpec.from_dict(json.loads(side.read_text()))
    if default is not None:
        return default
    raise FileNotFoundError(
        f"{ckpt}: its spec {side} is missing. Training writes the U-Net's input size and layout "
        f"there; copy it together with the checkpoint (or pass the spec explicitly)."
    )


def load_seg_model(
    ckpt: str | os.PathLike,
    spec: SegModelSpec | None = None,
    device: str | torch.device = "cpu",
) -> tuple[UNet, SegModelSpec]:
    """Rebuild the network of checkpoint ``ckpt`` and load its weights (``eval()`` mode).

    Args:
        ckpt: a plain state-dict file written by training.
        spec: the network spec; ``None`` reads the sidecar JSON (:func:`load_spec`).
        device: where to put the network.

    Raises:
        FileNotFoundError: when ``ckpt`` does not exist, or its sidecar spec when ``spec`` is
            not given.
        ValueError: when the weights do not fit the network described by the spec.
    """
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise FileNotFoundError(
            f"segmentation checkpoint not found: {ckpt} (train one with `isnet-cxr seg train` "
            "or pass the path of an existing .pt file)"
        )
    spec = spec or load_spec(ckpt)
    net = build_from_spec(spec)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "network" in state and isinstance(state["network"], dict):
        state = state["network"]  # a resumable 'last' checkpoint also works
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(
            f"{ckpt}: the weights do not fit the U-Net described by {sidecar_path(ckpt)} "
            f"(channels={spec.channels}, strides={spec.strides}, "
            f"num_res_units={spec.num_res_units}); pass the spec it was trained with"
        ) from exc
    return net.to(device).eval(), spec
