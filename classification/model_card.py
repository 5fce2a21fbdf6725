"""The model card: a ``model.json`` sidecar that says how to rebuild and feed a classifier.

A checkpoint (``best_model.pt``) is a plain state dict; it does not say which backbone it fits,
what input size it was trained at, or what its logits mean. ``model.json`` beside it does::

    {"backbone": "small_cnn", "size": 128, "in_channels": 1,
     "classes": ["covid", "normal", "pneumonia"],
     "method": "isnet", "method_params": {"variant": "selective", "C1": 1.2, "C2": 3.4, ...},
     "training": {"sites": ["hospital-a"], "n_train": 210, "n_val": 45, "seed": 0},
     "version": "0.1.0"}

``classes`` are in logit index order (the manifest's sorted label names:
:func:`cxr_io.manifest.class_names`). ``method_params`` hold the constants the method trained
with, tuned ones included (ISNet's ``C1``/``C2``). Every training path (``isnet-cxr train``, the
bundle's ``configs/train.json`` also under torchrun, a study) writes the card through
:class:`ModelCardWriter`, so every model folder is one artifact: weights + card. ``method``
matters at inference: a ``segment_then_classify`` model must be fed the lung-masked image (see
:class:`classification.methods.SegmentThenClassify`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from classification.methods import METHOD_NAMES, RRR, ISNet, Method, build_method
from classification.predict import load_classifier

__all__ = [
    "CARD_NAME",
    "ModelCard",
    "ModelCardError",
    "ModelCardWriter",
    "method_params_of",
    "package_version",
    "training_summary",
    "card_path",
    "load_model",
    "read_model_card",
    "write_model_card",
]

CARD_NAME = "model.json"
_REQUIRED = ("backbone", "size", "in_channels", "classes", "method", "method_params")


class ModelCardError(ValueError):
    """``model.json`` is missing or does not describe a usable model (the message says which
    file and what to do)."""


@dataclass(frozen=True)
class ModelCard:
    """What a classifier checkpoint needs to be rebuilt and fed.

    Attributes:
        backbone: :func:`classification.models.build_backbone` name.
        size: network input side S (inputs are ``[B, in_channels, S, S]``).
        in_channels: input channels (1 for chest X-rays).
        classes: class names in logit index order (``K`` of them).
        method: the training method (:data:`classification.methods.METHOD_NAMES`).
        method_params: its parameters (e.g. ISNet's tuned ``C1``/``C2``), for the record.
        width: base width of the ``small_cnn`` backbone.
        training: what it was trained on (sites, image counts, seed); no paths or patient ids.
        version: the isnet-cxr version that trained it.
    """

    backbone: str
    size: int
    in_channels: int
    classes: tuple[str, ...]
    method: str
    method_params: dict[str, Any] = field(default_factory=dict)
    width: int = 16
    training: dict[str, Any] = field(default_factory=dict)
    version: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.classes, list):
            object.__setattr__(self, "classes", tuple(self.classes))
        problems = _problems(self)
        if problems:
            raise ModelCardError("invalid model card: " + "; ".join(problems))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def build_method(self) -> Method:
        """The training method object (its ``prepare_inputs`` is what inference must apply)."""
        return build_method(self.method, **self.method_params)

    def to_dict(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone,
            "size": self.size,
            "in_channels": self.in_channels,
            "classes": list(self.classes),
            "method": self.method,
            "method_params": dict(self.method_params),
            "width": self.width,
            "training": dict(self.training),
            "version": self.version,
        }


def _problems(card: ModelCard) -> list[str]:
    out = []
    if not isinstance(card.backbone, str) or not card.backbone:
        out.append(f"backbone must be a non-empty string, got {card.backbone!r}")
    for name in ("size", "in_channels", "width"):
        value = getattr(card, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            out.append(f"{name} must be a positive integer, got {value!r}")
    classes = card.classes
    if not isinstance(classes, tuple) or len(classes) < 2:
        out.append(f"classes must list at least two class names, got {classes!r}")
    elif not all(isinstance(c, str) and c for c in classes) or len(set(classes)) != len(classes):
        out.append(f"classes must be distinct non-empty strings, got {list(classes)!r}")
    if card.method not in METHOD_NAMES:
        out.append(f"method must be one of {', '.join(METHOD_NAMES)}, got {card.method!r}")
    if not isinstance(card.method_params, dict):
        out.append(f"method_params must be an object, got {card.method_params!r}")
    return out


def card_path(checkpoint: str | os.PathLike) -> Path:
    """``<checkpoint's folder>/model.json``."""
    return Path(checkpoint).parent / CARD_NAME


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_model_card(
    checkpoint: str | os.PathLike,
    *,
    backbone: str,
    size: int,
    in_channels: int = 1,
    classes: list[str] | tuple[str, ...],
    method: str,
    method_params: dict[str, Any] | None = None,
    width: int = 16,
    training: dict[str, Any] | None = None,
) -> Path:
    """Write ``model.json`` beside ``checkpoint`` (atomically: tmp file + rename).

    Returns:
        The card's path.

    Raises:
        ModelCardError: when the fields do not describe a usable model.
    """
    card = ModelCard(
        backbone=backbone,
        size=int(size),
        in_channels=int(in_channels),
        classes=tuple(classes),
        method=method.lower().replace("-", "_"),
        method_params=dict(method_params or {}),
        width=int(width),
        training=dict(training or {}),
        version=package_version(),
    )
    path = card_path(checkpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(_json_safe(card.to_dict()), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_model_card(checkpoint: str | os.PathLike) -> ModelCard:
    """Read the ``model.json`` beside ``checkpoint``.

    Raises:
        ModelCardError: the card is missing, not JSON, lacks a field or holds a bad value.
    """
    path = card_path(checkpoint)
    if not path.is_file():
        raise ModelCardError(
            f"{path}: no model card beside the checkpoint {Path(checkpoint).name}. It says which "
            "backbone, input size, classes and method the weights belong to; `isnet-cxr train` "
            "writes it. For an older checkpoint, write one with "
            "classification.model_card.write_model_card(checkpoint, backbone=..., size=..., "
            "classes=[...], method=...)."
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelCardError(f"{path}: not a readable JSON file ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelCardError(f"{path}: expected a JSON object, got {type(data).__name__}")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ModelCardError(f"{path}: missing field(s) {missing}; required: {list(_REQUIRED)}")
    try:
        return ModelCard(
            backbone=data["backbone"],
            size=data["size"],
            in_channels=data["in_channels"],
            classes=data["classes"],
            method=data["method"],
            method_params=data["method_params"],
            width=data.get("width", 16),
            training=data.get("training", {}),
            version=data.get("version", ""),
        )
    except ModelCardError as exc:
        raise ModelCardError(f"{path}: {exc}") from None


def load_model(
    checkpoint: str | os.PathLike, *, device: str = "cpu"
) -> tuple[nn.Module, ModelCard]:
    """Rebuild a classifier from ``checkpoint`` and its card, in eval mode.

    Raises:
        FileNotFoundError: no checkpoint at that path.
        ModelCardError: no usable card, or the weights do not fit the card's backbone.
    """

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(
            f"classifier checkpoint not found: {checkpoint} (train one with `isnet-cxr train`, "
            "whose best model is <out>/best_model.pt)"
        )
    card = read_model_card(checkpoint)
    try:
        model = load_classifier(
            checkpoint,
            card.backbone,
            card.num_classes,
            in_channels=card.in_channels,
            width=card.width,
            device=device,
        )
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelCardError(
            f"{checkpoint}: the weights do not fit the model described by {card_path(checkpoint)} "
            f"(backbone {card.backbone}, {card.num_classes} classes, {card.in_channels} "
            f"channel(s)): {first[:300]}. Check that the card belongs to this checkpoint."
        ) from exc
    return model, card


def package_version() -> str:
    """The installed isnet-cxr version ("unknown" when running from an uninstalled checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("isnet-cxr")
    except PackageNotFoundError:
        return "unknown"


def method_params_of(method: Method) -> dict[str, Any]:
    """The parameters that rebuild ``method`` as trained (:func:`build_method` accepts them),
    tuned constants included: ISNet's loss config, RRR's ``lam``; ``{}`` for the others."""
    from dataclasses import asdict

    if isinstance(method, ISNet):
        params = asdict(method.cfg)
        if method.warmup_epochs:
            params["warmup_epochs"] = method.warmup_epochs
        if method.lung_only_prob:
            params["lung_only_prob"] = method.lung_only_prob
        return _json_safe(params)
    if isinstance(method, RRR):
        return {"lam": float(method.lam)}
    return {}


def training_summary(
    train_records: Any, val_records: Any = (), *, seed: int | None = None
) -> dict[str, Any]:
    """What a model was trained on, for its card: sites and image counts (no paths, no ids)."""
    sites = sorted({str(r.get("site", "")) for r in train_records} - {""})
    out: dict[str, Any] = {"sites": sites, "n_train": len(train_records), "n_val": len(val_records)}
    if seed is not None:
        out["seed"] = int(seed)
    return out


class ModelCardWriter:
    """Trainer handler that writes ``model.json`` into ``out_dir`` when training starts (after
    any constant tuning, so tuned values are recorded), making the folder one artifact: the
    weights saved there (``best_model.pt``) + their card.

    Args:
        out_dir: the training output folder.
        method: the method object the trainer runs (its constants go into the card).
        classes: class names in output order.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        backbone: str,
        size: int,
        classes: list[str] | tuple[str, ...],
        method: Method,
        in_channels: int = 1,
        width: int = 16,
        training: dict[str, Any] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.fields = {
            "backbone": backbone,
            "size": int(size),
            "in_channels": int(in_channels),
            "classes": list(classes),
            "width": int(width),
            "training": dict(training or {}),
        }
        self.method = method

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Any = None) -> Path:
        return write_model_card(
            self.out_dir / "best_model.pt",
            method=self.method.name,
            method_params=method_params_of(self.method),
            **self.fields,
        )
