"""Factories of the classifier's MONAI inference bundle (``configs/inference.json``).

The bundle is the clean-data path (it stops at the first unreadable file); researchers' folders
of real exports go through :func:`pipeline.batch.run_batch`, which reports bad files and resumes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.batch import BatchInputError, csv_text, format_value, image_identity
from pipeline.settings import Settings

__all__ = ["ProbabilityWriter", "bundle_datalist", "bundle_preprocessing"]


def _needs_mask_input(card: Any) -> bool:
    """Whether the card's method feeds the network a masked image (segment-then-classify)."""
    try:
        card.build_method().prepare_inputs(torch.zeros(1, 1, 2, 2), None)
    except ValueError:
        return True
    return False


def bundle_datalist(dataset_dir: str | os.PathLike, card: Any) -> list[dict[str, str]]:
    """Data dicts ``{"image", "source"[, "mask"]}`` for the inference bundle.

    ``dataset_dir`` is a folder of images, a folder with ``manifest.csv``, a manifest CSV or one
    image (:func:`segmentation.infer.list_images`). A model whose method feeds the network the
    lung-masked image (``segment_then_classify``) needs a manifest with a ``mask`` column;
    :func:`run_batch` predicts the masks itself instead.
    """
    from segmentation.infer import list_images

    if not _needs_mask_input(card):
        return list_images(dataset_dir)
    import pandas as pd

    path = Path(dataset_dir)
    csv_path = path / "manifest.csv" if path.is_dir() else path
    if csv_path.suffix.lower() != ".csv" or not csv_path.is_file():
        raise BatchInputError(
            f"the model was trained with method '{card.method}', which classifies the lung-masked "
            f"image; {dataset_dir} has no manifest.csv with a 'mask' column. Give one, or use "
            "`isnet-cxr batch run`, which segments the lungs itself"
        )
    df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    if "mask" not in df.columns or not (df["mask"].str.strip() != "").all():
        raise BatchInputError(
            f"{csv_path}: method '{card.method}' needs a lung mask for every image ('mask' "
            "column); fill it with `isnet-cxr seg masks` or use `isnet-cxr batch run`"
        )
    base = csv_path.parent.resolve()
    return [
        {"image": str(base / i), "source": str(base / i), "mask": str(base / m)}
        for i, m in zip(df["image"], df["mask"], strict=True)
    ]


def bundle_preprocessing(card: Any) -> Any:
    """Inference chain of the classifier: read (:class:`pipeline.dicom.LoadCXRd`), area-resize
    to ``card.size`` (as in training), mask for segment-then-classify, repeat channels.

    Output ``image``: ``MetaTensor [in_channels, S, S]`` float32 (meta kept for the writer).
    """
    from monai.transforms import (
        Compose,
        EnsureTyped,
        MaskIntensityd,
        RepeatChanneld,
        Resized,
    )

    from pipeline.dicom import LoadCXRd, LoadMaskd

    size = (card.size, card.size)
    xs: list[Any] = [LoadCXRd(keys="image"), Resized(keys="image", spatial_size=size, mode="area")]
    if _needs_mask_input(card):
        xs += [
            LoadMaskd(keys="mask"),
            Resized(keys="mask", spatial_size=size, mode="nearest"),
            MaskIntensityd(keys="image", mask_key="mask"),
        ]
    if card.in_channels > 1:
        xs.append(RepeatChanneld(keys="image", repeats=card.in_channels))
    xs.append(EnsureTyped(keys="image", dtype=torch.float32))
    return Compose(xs)


class ProbabilityWriter:
    """Evaluator handler: per-image probabilities to ``<output_dir>/<filename>``.

    Columns ``pseudo_id, rel_path, pred, prob_<class>...``: the same keyed image id as
    :func:`run_batch`, the path relative to ``dataset_dir``; no header values. Expects the
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
    ) -> None:
        self.path = Path(output_dir) / filename
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
        for item, batch in zip(engine.state.output, engine.state.batch, strict=True):
            probs = torch.as_tensor(item["pred"]).detach().cpu().double().reshape(-1).numpy()
            src = str(batch["source"])
            pid = image_identity(src, self._secret or b"").pseudo_id
            pred = self.classes[int(np.argmax(probs))]
            lines.append([pid, self._rel(src), pred, *[format_value(float(v)) for v in probs]])
        with self.path.open("a", newline="") as fh:
            fh.write(csv_text(lines))
        self.rows += len(lines)
