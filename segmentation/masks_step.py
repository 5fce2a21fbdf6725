"""The ``masks`` step: a lung mask for every manifest row, and a manifest that points to them.

The classifier's ISNet loss needs a mask per image. :func:`write_masks` segments the rows that have
no mask yet (or all rows with ``overwrite=True``), writes ``<out_dir>/masks/<key>.png`` (0/255,
the image's size), and writes ``<out_dir>/manifest.csv``: the input manifest with ``mask`` filled
and three extra columns, ``mask_source`` (``given`` or ``predicted``), ``seg_ok`` and
``seg_flags`` (the quality flags; empty for given masks).

Mask file names are a hash of the image path, not the image's name, so nothing from a file name
(which may hold an identifier) is copied into the output folder.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pandas as pd

from cxr_io.manifest import load_manifest, write_manifest
from segmentation.export import write_mask_png
from segmentation.infer import PostprocessConfig, QualityThresholds, SegResult, predict_files


def mask_key(image_path: str) -> str:
    """A stable, non-identifying file stem for an image's mask (16 hex digits)."""
    return hashlib.sha256(str(Path(image_path).resolve()).encode()).hexdigest()[:16]


def write_masks(
    manifest_path: str | os.PathLike,
    model_ckpt: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    batch_size: int = 4,
    num_workers: int = 0,
    device: str = "cpu",
    post: PostprocessConfig | None = None,
    thresholds: QualityThresholds | None = None,
) -> Path:
    """Segment the manifest's images and write a manifest with ``mask`` filled.

    Args:
        manifest_path: the input manifest (validated by :func:`cxr_io.manifest.load_manifest`).
        model_ckpt: a segmentation checkpoint (plain state dict + ``.json`` spec beside it).
        out_dir: receives ``masks/`` and ``manifest.csv``.
        overwrite: also re-segment rows that already have a mask.
        batch_size, num_workers, device: inference settings.
        post, thresholds: post-processing and quality settings.

    Returns:
        The path of the new manifest, ``<out_dir>/manifest.csv``.
    """
    out_dir = Path(out_dir)
    df = load_manifest(manifest_path, check_mask_sizes=False)
    df = df.copy()
    todo = [i for i in df.index if overwrite or not df.at[i, "mask"]]
    df["mask_source"] = ["given" if df.at[i, "mask"] else "" for i in df.index]
    df["seg_ok"] = ""
    df["seg_flags"] = ""

    images = [df.at[i, "image"] for i in todo]
    row_of = dict(zip(images, todo, strict=True))
    mask_dir = out_dir / "masks"

    def sink(res: SegResult) -> None:
        i = row_of[res.image]
        path = write_mask_png(res.mask, mask_dir / f"{mask_key(res.image)}.png")
        df.at[i, "mask"] = str(path.resolve())
        df.at[i, "mask_source"] = "predicted"
        df.at[i, "seg_ok"] = str(res.quality.ok)
        df.at[i, "seg_flags"] = ";".join(res.quality.flags)

    if images:
        predict_files(
            images,
            model_ckpt,
            device=device,
            batch_size=batch_size,
            num_workers=num_workers,
            post=post,
            thresholds=thresholds,
            sink=sink,
        )
    missing = [df.at[i, "image"] for i in todo if df.at[i, "mask_source"] != "predicted"]
    if missing:  # pragma: no cover - the evaluator raises before this on unreadable images
        raise RuntimeError(f"{len(missing)} image(s) got no mask, first: {missing[0]}")
    return write_manifest(pd.DataFrame(df), out_dir / "manifest.csv")
