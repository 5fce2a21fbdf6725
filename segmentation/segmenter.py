"""The lung segmenter as one object: images at any size in, masks at that size out.

:class:`LungSegmenter` holds the U-Net, its resize/normalise pre-processing and the
post-processing of :func:`segmentation.infer.infer_postprocessing` (sigmoid, back to the original
size, largest components, holes, quality flags): the same steps as ``isnet-cxr seg predict``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from cxr_io.resources import default_segmenter
from segmentation.data import resize_normalise
from segmentation.infer import infer_postprocessing
from segmentation.model import SegModelSpec, load_seg_model

__all__ = ["LungSegmenter"]


class LungSegmenter:
    """A trained lung U-Net with its pre- and post-processing.

    Call it with radiographs ``MetaTensor [1, H, W]`` in [0, 1] (as read by
    :class:`cxr_io.readers.LoadCXR`); it returns, per image, ``{"seg": bool [H, W], "quality":
    {"ok", "flags", "area_fraction", ...}}``.
    """

    def __init__(self, net: torch.nn.Module, spec: SegModelSpec, device: str | torch.device):
        self.net = net.eval()
        self.spec = spec
        self.device = torch.device(device)
        self.pre = Compose(resize_normalise(spec.spatial_size, False))
        self.post = infer_postprocessing(self.pre)

    @classmethod
    def load(
        cls, checkpoint: str | os.PathLike | None = None, device: str | torch.device = "cpu"
    ) -> LungSegmenter:
        """Load a checkpoint and its ``.json`` spec (default: the committed synthetic U-Net)."""
        net, spec = load_seg_model(checkpoint or default_segmenter(), device=device)
        return cls(net, spec, device)

    @torch.no_grad()
    def __call__(self, images: Sequence[MetaTensor]) -> list[dict[str, Any]]:
        """Masks at each image's own size, with quality reports."""
        if not images:
            return []
        pre = [self.pre({"image": img}) for img in images]
        x = torch.stack([p["image"].as_tensor() for p in pre]).to(self.device)  # [B, 1, h, w]
        logits = self.net(x).cpu()
        out = []
        for i, p in enumerate(pre):
            d = self.post({"image": p["image"], "pred": logits[i]})
            out.append({"seg": np.asarray(d["seg"], dtype=bool), "quality": d["quality"]})
        return out
