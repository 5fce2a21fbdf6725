"""Factories of the classifier's MONAI inference bundle (``configs/inference.json``).

The bundle is the clean-data path (it stops at the first unreadable file); researchers' folders
of real exports go through :func:`pipeline.batch.run_batch`, which reports bad files and resumes.
Both build the classifier's input through the same :class:`~pipeline.predictor.Predictor`.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from classification.explain import explain
from classification.inputs import network_inputs
from cxr_io.settings import Settings
from pipeline.batch import csv_text, format_value, image_identity
from pipeline.predictor import Predictor
from segmentation.infer import list_images

__all__ = ["PredictorInputsd", "ProbabilityWriter", "bundle_datalist", "load_predictor"]


def load_predictor(
    ckpt_path: str | os.PathLike,
    seg_checkpoint: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> Predictor:
    """The bundle's :class:`~pipeline.predictor.Predictor` (classifier + card + segmenter)."""
    return Predictor.load(ckpt_path, seg_checkpoint=seg_checkpoint or None, device=device)


def bundle_datalist(dataset_dir: str | os.PathLike) -> list[dict[str, str]]:
    """Data dicts ``{"image", "source"}`` for the inference bundle: a folder of images, a folder
    with ``manifest.csv``, a manifest CSV or one image (:func:`segmentation.infer.list_images`).
    Lung masks, where the method needs them, come from the Predictor's segmenter."""

    return list_images(dataset_dir)


class PredictorInputsd(MapTransform):
    """Path under ``image`` -> the classifier's input ``[C, S, S]`` built by the Predictor
    (:func:`classification.inputs.network_inputs`; the lung mask from its segmenter when the
    method needs one). ``source`` keeps the path for the writers."""

    def __init__(self, predictor: Predictor, keys: KeysCollection = "image") -> None:
        super().__init__(keys)
        self.predictor = predictor

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = self.predictor.read(d[key])
            masks = None
            if self.predictor.method.masks_at_inference:
                masks = [self.predictor.segmenter([image])[0]["seg"]]
            x, _ = network_inputs(
                [image.as_tensor()],
                masks,
                size=self.predictor.card.size,
                in_channels=self.predictor.card.in_channels,
                method=self.predictor.method,
            )
            d[key] = x[0]
        return d


def _plain(x: torch.Tensor) -> torch.Tensor:
    """A plain tensor (a MetaTensor's own torch-function handling must not meet LRP's)."""
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)


class ProbabilityWriter:
    """Evaluator handler: per-image probabilities to ``<output_dir>/<filename>``.

    Columns ``pseudo_id, rel_path, pred, prob_<class>...``: the same keyed image id as
    :func:`run_batch`, the path relative to ``dataset_dir``; no header values. With
    ``heatmaps_of`` (the network), also the LRP heatmap ``[S, S]`` of each image's predicted class
    as ``heatmaps/<pseudo_id>.npy``. Expects the
    evaluator's post-processing to put softmax probabilities ``[K]`` in ``pred`` and the data
    dicts to carry ``source`` (the image path).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        classes: Sequence[str],
        dataset_dir: str | os.PathLike | None = None,
        filename: str = "probabilities.csv",
        settings: Settings | None = None,
        heatmaps_of: torch.nn.Module | None = None,
    ) -> None:
        self.path = Path(output_dir) / filename
        self.heatmap_dir = Path(output_dir) / "heatmaps"
        self.heatmaps_of = heatmaps_of
        self.classes = list(classes)
        self.base = Path(dataset_dir).resolve() if dataset_dir is not None else None
        if self.base is not None and self.base.is_file():
            self.base = self.base.parent
        self.settings = settings
        self._secret: bytes | None = None
        self.rows = 0

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.write)

    def start(self, engine: Any = None) -> None:
        self._secret = (self.settings or Settings.from_env()).pseudonym_secret()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        header = ["pseudo_id", "rel_path", "pred", *[f"prob_{c}" for c in self.classes]]
        self.path.write_text(csv_text([header]))
        self.rows = 0

    def _rel(self, src: str) -> str:
        p = Path(src).resolve()
        base = self.base or p.parent
        return os.path.relpath(p, base).replace(os.sep, "/")

    def write(self, engine: Any) -> None:
        lines = []
        heat = None
        if self.heatmaps_of is not None:
            x = torch.stack([_plain(b["image"]) for b in engine.state.batch])
            heat = explain(self.heatmaps_of, x.to(next(self.heatmaps_of.parameters()).device))
            self.heatmap_dir.mkdir(parents=True, exist_ok=True)
        for i, (item, batch) in enumerate(
            zip(engine.state.output, engine.state.batch, strict=True)
        ):
            probs = torch.as_tensor(item["pred"]).detach().cpu().double().reshape(-1).numpy()
            src = str(batch["source"])
            pid = image_identity(src, self._secret or b"").pseudo_id
            pred = self.classes[int(np.argmax(probs))]
            lines.append([pid, self._rel(src), pred, *[format_value(float(v)) for v in probs]])
            if heat is not None:
                np.save(self.heatmap_dir / f"{pid}.npy", heat[i, 0].cpu().numpy())
        with self.path.open("a", newline="") as fh:
            fh.write(csv_text(lines))
        self.rows += len(lines)
