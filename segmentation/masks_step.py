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
from collections.abc import Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from cxr_io.determinism import torch_threads
from cxr_io.manifest import load_manifest, write_manifest
from cxr_io.readers import surfaced_read_errors
from segmentation.export import write_mask_png
from segmentation.infer import PostprocessConfig, QualityThresholds, SegResult, predict_files


class _MaskRow(NamedTuple):
    """One segmented image: its path, the mask file written, the quality verdict and flags."""

    image: str
    mask: str
    ok: bool
    flags: str


def _segment(
    images: Sequence[str], ckpt: str, mask_dir: Path, settings: dict[str, Any]
) -> list[_MaskRow]:
    """Segment ``images``, write each mask PNG into ``mask_dir``; rows in input order."""
    rows: list[_MaskRow] = []

    def sink(res: SegResult) -> None:
        path = write_mask_png(res.mask, mask_dir / f"{mask_key(res.image)}.png")
        rows.append(
            _MaskRow(res.image, str(path.resolve()), res.quality.ok, ";".join(res.quality.flags))
        )

    if images:
        predict_files(images, ckpt, sink=sink, **settings)
    return rows


def _segment_in_worker(job: tuple[Sequence[str], str, Path, dict[str, Any]]) -> list[_MaskRow]:
    """:func:`_segment` in a worker process, with one PyTorch thread (one process per core)."""
    with torch_threads(1), surfaced_read_errors():  # the read error itself crosses back
        return _segment(*job)


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
    pool: Executor | None = None,
) -> Path:
    """Segment the manifest's images and write a manifest with ``mask`` filled.

    Args:
        manifest_path: the input manifest (validated by :func:`cxr_io.manifest.load_manifest`).
        model_ckpt: a segmentation checkpoint (plain state dict + ``.json`` spec beside it).
        out_dir: receives ``masks/`` and ``manifest.csv``.
        overwrite: also re-segment rows that already have a mask.
        batch_size, num_workers, device: inference settings.
        post, thresholds: post-processing and quality settings.
        pool: worker processes (e.g. :func:`synthetic.render_pool`) that segment the images in
            chunks, one PyTorch thread each (the resizing, post-processing and quality checks
            are single-threaded: one process per core is faster); None: this process.

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

    def record(row: _MaskRow) -> None:
        i = row_of[row.image]
        df.at[i, "mask"] = row.mask
        df.at[i, "mask_source"] = "predicted"
        df.at[i, "seg_ok"] = str(row.ok)
        df.at[i, "seg_flags"] = row.flags

    settings = {"device": device, "batch_size": batch_size, "num_workers": num_workers}
    settings |= {"post": post, "thresholds": thresholds}
    if pool is None:
        for row in _segment(images, str(model_ckpt), mask_dir, settings):
            record(row)
    else:
        step = max(1, min(64, -(-len(images) // 8)))  # chunks: balance vs. model loads
        chunks = [images[k : k + step] for k in range(0, len(images), step)]
        jobs = [(c, str(model_ckpt), mask_dir, settings) for c in chunks]
        for rows in pool.map(_segment_in_worker, jobs):
            for row in rows:
                record(row)
    missing = [df.at[i, "image"] for i in todo if df.at[i, "mask_source"] != "predicted"]
    if missing:  # pragma: no cover - the evaluator raises before this on unreadable images
        raise RuntimeError(f"{len(missing)} image(s) got no mask, first: {missing[0]}")
    return write_manifest(pd.DataFrame(df), out_dir / "manifest.csv")
