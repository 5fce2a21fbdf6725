"""One image in, class + lung mask + heatmap out: the path every door takes.

:class:`Predictor` is built from a model artifact (a folder with the weights and ``model.json``, a
checkpoint file with its card beside it, or an MLflow artifact URI of such a folder) and a lung
segmenter. Batch runs (:mod:`pipeline.batch`), the inference bundle (:mod:`pipeline.
inference_bundle`), the study's evaluation (:mod:`pipeline.study`) and the Python API all call it,
so the same image and model give the same answer whichever door it came in by::

    from pipeline import Predictor
    p = Predictor.load("runs/isnet")            # or "runs:/<run_id>/model"
    result = p("some.dcm")                      # .probs, .label, .mask, .heatmap, .flags
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from torch import nn

from classification.explain import explain
from classification.inputs import network_inputs
from classification.methods import Method
from classification.metrics import relevance_metrics
from classification.model_card import CARD_NAME, ModelCard, load_model
from cxr_io.readers import LoadCXR, load_mask
from cxr_io.settings import Settings
from segmentation.segmenter import LungSegmenter

__all__ = ["WEIGHT_NAMES", "Prediction", "Predictor", "resolve_checkpoint"]

#: Weight files looked for, in this order, in a model folder.
WEIGHT_NAMES = ("best_model.pt", "model.pt")
ImageLike = str | os.PathLike | np.ndarray | torch.Tensor


@dataclass
class Prediction:
    """One image's answer.

    Attributes:
        probs: ``[K]`` softmax probabilities, in ``classes`` order.
        classes: class names in the model's output order.
        mask: bool ``[H, W]`` lung mask at the image's size (predicted, or the one given).
        heatmap: ``[S, S]`` LRP-epsilon relevance of the predicted class at the network input
            (None when heatmaps were not asked for).
        quality: the segmenter's quality report (``ok``, ``flags``, ``area_fraction``); empty
            when the mask was given.
        relevance: where the relevance lies (``background_share``, ``mass_accuracy``,
            ``rank_accuracy``, ``chance``); empty without a heatmap.
    """

    probs: np.ndarray
    classes: tuple[str, ...]
    mask: np.ndarray
    heatmap: np.ndarray | None = None
    quality: dict = field(default_factory=dict)
    relevance: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The predicted class name."""
        return self.classes[int(np.argmax(self.probs))]

    @property
    def flags(self) -> tuple[str, ...]:
        """The segmenter's quality flags (empty when the mask looks right or was given)."""
        return tuple(self.quality.get("flags", ()))


def resolve_checkpoint(model: str | os.PathLike, tracking_uri: str | None = None) -> Path:
    """The weights file of a model artifact: a folder holding ``model.json`` and one of
    :data:`WEIGHT_NAMES`, a checkpoint path, or an MLflow artifact URI (``runs:/<id>/model``,
    ``models:/...``, ``mlflow-artifacts:/...``) of such a folder, downloaded to a temp folder
    from ``tracking_uri`` (default: ``$MLFLOW_TRACKING_URI``).

    Raises:
        FileNotFoundError: nothing usable there (the message says what was looked for).
    """
    text = str(model)
    if "://" in text or text.startswith(("runs:/", "models:/")):
        import mlflow.artifacts

        dest = tempfile.mkdtemp(prefix="isnet-cxr-model-")
        model = mlflow.artifacts.download_artifacts(
            artifact_uri=text, dst_path=dest, tracking_uri=tracking_uri
        )
    path = Path(model)
    if path.is_dir():
        for name in WEIGHT_NAMES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(
            f"{path}: no model weights ({' or '.join(WEIGHT_NAMES)}) in this folder; give the "
            f"output folder of a training run (it holds the weights and {CARD_NAME})"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"classifier not found: {path} (give a training run's output folder, its "
            "best_model.pt, or an MLflow artifact URI)"
        )
    return path


class Predictor:
    """A trained classifier, its card and method, and a lung segmenter.

    Args:
        classifier: the LRP-ready network, in eval mode.
        card: its :class:`~classification.model_card.ModelCard` (classes in output order, size).
        segmenter: predicts the lung masks when none are given (None: masks must be given).
        device: where both networks run.
        eps: LRP epsilon of the heatmaps.
    """

    def __init__(
        self,
        classifier: nn.Module,
        card: ModelCard,
        segmenter: LungSegmenter | None = None,
        *,
        device: str | torch.device = "cpu",
        eps: float = 0.01,
        settings: Settings | None = None,
    ) -> None:
        self.classifier = classifier.eval()
        self.card = card
        self.method: Method = card.build_method()
        self.segmenter = segmenter
        self.device = torch.device(device)
        self.eps = eps
        self.loader = LoadCXR(settings=settings)

    @classmethod
    def load(
        cls,
        model: str | os.PathLike,
        *,
        seg_checkpoint: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        settings: Settings | None = None,
        tracking_uri: str | None = None,
    ) -> Predictor:
        """Load a model artifact (see :func:`resolve_checkpoint`) and the segmenter (default:
        the committed synthetic U-Net).

        Raises:
            FileNotFoundError: no model or segmenter there.
            classification.model_card.ModelCardError: no usable ``model.json``.
        """
        checkpoint = resolve_checkpoint(model, tracking_uri)
        classifier, card = load_model(checkpoint, device=str(device))
        segmenter = LungSegmenter.load(seg_checkpoint, device=device)
        return cls(classifier, card, segmenter, device=device, settings=settings)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.card.classes

    # ---------------------------------------------------------------------------- inputs

    def read(self, image: ImageLike) -> MetaTensor:
        """A file path (DICOM, PNG, JPEG, NIfTI, MHA) or an array ``[H, W]`` / ``[1, H, W]`` in
        [0, 1] -> ``MetaTensor [1, H, W]`` float32."""
        if isinstance(image, (str, os.PathLike)):
            return self.loader(image)
        x = torch.as_tensor(np.asarray(image, dtype=np.float32))
        if x.ndim == 2:
            x = x[None]
        if x.ndim != 3 or x.shape[0] != 1:
            raise ValueError(f"an image array must be [H, W] or [1, H, W], got {tuple(x.shape)}")
        return MetaTensor(x)

    # ---------------------------------------------------------------------------- predicting

    def predict(
        self,
        images: Sequence[MetaTensor | torch.Tensor],
        masks: Sequence[np.ndarray] | None = None,
        *,
        heatmaps: bool = True,
    ) -> list[Prediction]:
        """Predict a batch of radiographs ``[1, H_i, W_i]`` in [0, 1].

        Args:
            masks: bool ``[H_i, W_i]`` lung masks; None: the segmenter predicts them.
            heatmaps: explain the predicted class with LRP (and measure where relevance lies).
        """
        if not images:
            return []
        if masks is None:
            if self.segmenter is None:
                raise ValueError("no lung masks given and this Predictor has no segmenter")
            segs = self.segmenter(images)
            masks = [s["seg"] for s in segs]
            quality = [s["quality"] for s in segs]
        else:
            masks = [np.asarray(m, dtype=bool) for m in masks]
            quality = [{} for _ in images]
        x, m = network_inputs(
            [torch.as_tensor(im) for im in images],
            masks,
            size=self.card.size,
            in_channels=self.card.in_channels,
            method=self.method,
        )
        x, m = x.to(self.device), m.to(self.device)
        with torch.no_grad():
            probs = torch.softmax(self.classifier(x), dim=1).cpu().double().numpy()
        heat = rel = None
        if heatmaps:
            heat = explain(self.classifier, x, eps=self.eps).cpu()  # [B, 1, S, S]
            rel = {k: v.numpy() for k, v in relevance_metrics(heat, m.cpu()).items()}
        return [
            Prediction(
                probs=probs[i],
                classes=self.classes,
                mask=masks[i],
                heatmap=None if heat is None else heat[i, 0].numpy(),
                quality=quality[i],
                relevance={} if rel is None else {k: float(v[i]) for k, v in rel.items()},
            )
            for i in range(len(images))
        ]

    def predict_files(
        self,
        images: Sequence[str | os.PathLike],
        masks: Sequence[str | os.PathLike] | None = None,
        *,
        batch_size: int = 16,
        heatmaps: bool = True,
    ) -> list[Prediction]:
        """Read and predict files in batches; ``masks``: mask files (PNG/NIfTI/MHA) to use
        instead of the segmenter (e.g. a manifest's ``mask`` column)."""
        out: list[Prediction] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            mks = None
            if masks is not None:
                mks = [load_mask(p) for p in masks[start : start + batch_size]]
            out.extend(self.predict([self.read(p) for p in chunk], mks, heatmaps=heatmaps))
        return out

    def __call__(
        self, image: ImageLike | Sequence[ImageLike], *, heatmaps: bool = True
    ) -> Prediction | list[Prediction]:
        """One image (path or array) -> :class:`Prediction`; a list of them -> a list."""
        if isinstance(image, (list, tuple)):
            return self.predict([self.read(i) for i in image], heatmaps=heatmaps)
        return self.predict([self.read(image)], heatmaps=heatmaps)[0]
