"""Datasets: render one case, write a multi-site DICOM dataset with masks and a manifest, the
biased / unbiased / confounding test sets, and previews.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cxr_io.manifest import write_manifest
from cxr_io.settings import Settings
from synthetic.acquisition import SyntheticCase, acquire, single_threaded_blas, write_dicom
from synthetic.ct import fetch_ct, render_ct_case
from synthetic.lung_shapes import load_lung_shapes, read_shapes, shapes_path
from synthetic.phantom import draw_anatomy, draw_finding
from synthetic.sites import (
    CLASSES,
    MANIFEST_COLUMNS,
    SPLIT_FRACTIONS,
    SiteConfig,
    Streams,
    assign_bias,
    bias_test_sites,
    default_sites,
    image_seed,
)


def render_case(
    site: SiteConfig,
    label: str,
    seed: np.random.SeedSequence | int,
    *,
    size: int = 256,
    difficulty: float = 0.5,
    with_finding: bool = True,
    bias: str | None = None,
    lung_shapes: np.ndarray | None = None,
) -> SyntheticCase:
    """Render one image of ``site`` and class ``label``.

    Args:
        seed: the image's seed (see :func:`image_seed`), or an int.
        with_finding: False draws the same image without its finding (for tests).
        bias: force the marker class ('' for none); default: :func:`assign_bias`.
        lung_shapes: real lung pairs ``[N, 2, S, S]`` to use instead of drawn lungs
            (:func:`synthetic.lung_shapes.load_lung_shapes`); None draws them.
    """
    if label not in CLASSES:
        raise ValueError(f"unknown class {label!r}; expected one of {CLASSES}")
    if size < 32:
        raise ValueError(f"size {size} is too small; use at least 32 pixels")
    if not 0.0 <= difficulty <= 1.0:
        raise ValueError(f"difficulty {difficulty} is not in [0, 1]")
    with single_threaded_blas():
        return _render(site, label, seed, size, difficulty, with_finding, bias, lung_shapes)


def _render(
    site: SiteConfig,
    label: str,
    seed: np.random.SeedSequence | int,
    size: int,
    difficulty: float,
    with_finding: bool,
    bias: str | None,
    lung_shapes: np.ndarray | None = None,
) -> SyntheticCase:
    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    st = Streams.from_seed(ss)
    marker_cls = assign_bias(site, label, st.bias) if bias is None else bias

    anat = draw_anatomy(size, st.anatomy, lung_shapes)
    finding = draw_finding(label, anat, difficulty, st.finding)
    if not with_finding:
        finding = np.zeros_like(finding)
    return acquire(
        site, anat.density, finding, anat.lung_mask, anat.body_mask, label, marker_cls, st
    )


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


def _labels_and_splits(site: SiteConfig, n: int, seed: int) -> tuple[list[str], list[str]]:
    """Balanced, shuffled labels and a per-class 70/15/15 split for ``n`` images of a site."""
    rng = np.random.default_rng(
        np.random.SeedSequence(seed, spawn_key=(zlib.crc32(site.key.encode()), 1 << 30))
    )
    labels = np.array([CLASSES[i % len(CLASSES)] for i in range(n)])
    rng.shuffle(labels)
    splits = np.empty(n, dtype=object)
    for cls in CLASSES:
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        n_train = round(SPLIT_FRACTIONS[0] * idx.size)
        n_val = round(SPLIT_FRACTIONS[1] * idx.size)
        splits[idx[:n_train]] = "train"
        splits[idx[n_train : n_train + n_val]] = "val"
        splits[idx[n_train + n_val :]] = "test"
    return labels.tolist(), splits.tolist()


@dataclass(frozen=True)
class _Task:
    out_dir: str
    site: SiteConfig
    index: int
    label: str
    split: str
    seed: int
    size: int
    difficulty: float
    ct_dir: str = ""  # '' = phantom mode
    shapes_file: str = ""  # '' = drawn lungs, else a synthetic.lung_shapes cache file


def _make_one(task: _Task) -> dict[str, str]:
    site = task.site
    ss = image_seed(task.seed, site, task.index)
    if task.ct_dir:
        case = render_ct_case(
            site, task.label, ss, Path(task.ct_dir), size=task.size, difficulty=task.difficulty
        )
    else:
        shapes = None
        if task.shapes_file:
            shapes = read_shapes(task.shapes_file)
        case = render_case(
            site, task.label, ss, size=task.size, difficulty=task.difficulty, lung_shapes=shapes
        )
    stem = f"{site.name}_{task.index:05d}"
    rel_img = f"images/{site.name}/{stem}.dcm"
    rel_mask = f"masks/{site.name}/{stem}.png"
    out = Path(task.out_dir)
    write_dicom(
        out / rel_img, case.stored, site, case.streams.header, case.streams.entropy, task.size
    )
    (out / rel_mask).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((case.mask * 255).astype(np.uint8)).save(out / rel_mask)
    pid = hashlib.sha256(f"{site.key}:{task.seed}:{task.index}".encode()).hexdigest()[:12]
    return {
        "image": rel_img,
        "label": task.label,
        "site": site.name,
        "mask": rel_mask,
        "patient_id": f"syn-{pid}",
        "split": task.split,
        "bias": case.bias,
    }


@contextlib.contextmanager
def render_pool(workers: int | None = None) -> Iterator[ProcessPoolExecutor | None]:
    """Worker processes to render several datasets with (``workers=`` of :func:`make_dataset`
    and :func:`make_bias_test_sets`; the study also segments in them, ``pool=`` of
    :func:`segmentation.masks_step.write_masks`): each spawned process starts once (seconds of
    imports) instead of once per set. None (render in-process) with ``workers`` <= 1.

    Args:
        workers: processes (default ``min(4, cpu_count)``).
    """
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    if workers <= 1:
        yield None
        return
    import multiprocessing as mp

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        yield pool


def _run_tasks(
    tasks: list[_Task], workers: int | ProcessPoolExecutor | None, progress: bool
) -> list[dict[str, str]]:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(tasks), desc="synthetic CXR", unit="img", disable=not progress)
    try:
        if isinstance(workers, ProcessPoolExecutor):
            return _map_in(workers, tasks, bar)
        if len(tasks) > 4:
            with render_pool(workers) as pool:
                if pool is not None:
                    return _map_in(pool, tasks, bar)
        rows = []
        for t in tasks:
            rows.append(_make_one(t))
            bar.update(1)
        return rows
    finally:
        bar.close()


def _map_in(pool: ProcessPoolExecutor, tasks: list[_Task], bar: Any) -> list[dict[str, str]]:
    chunk = max(1, min(16, len(tasks) // 32))  # load balance vs. round trips; same pixels
    rows = []
    for row in pool.map(_make_one, tasks, chunksize=chunk):
        rows.append(row)
        bar.update(1)
    return rows


def _write_manifest(rows: list[dict[str, str]], path: Path) -> Path:
    import pandas as pd

    return write_manifest(pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS)), path)


def _build_tasks(
    out_dir: Path,
    sites: Sequence[SiteConfig],
    n_per_site: int,
    size: int,
    seed: int,
    difficulty: float,
    split: str | None = None,
    ct_dir: str = "",
    shapes_file: str = "",
) -> list[_Task]:
    tasks = []
    for site in sites:
        labels, splits = _labels_and_splits(site, n_per_site, seed)
        for i, (lab, spl) in enumerate(zip(labels, splits, strict=True)):
            tasks.append(
                _Task(
                    str(out_dir),
                    site,
                    i,
                    lab,
                    split or spl,
                    seed,
                    size,
                    difficulty,
                    ct_dir,
                    shapes_file,
                )
            )
    return tasks


def _prepare_mode(mode: str) -> str:
    """Validate ``mode``; for ``ct`` fetch the CT (once) and return its folder, else ''."""
    if mode == "phantom":
        return ""
    if mode == "ct":
        return str(fetch_ct(Settings.from_env()))
    raise ValueError(f"unknown mode {mode!r}; use 'phantom' or 'ct'")


def _check_args(sites: Sequence[SiteConfig], n_per_site: int, size: int, difficulty: float) -> None:
    if n_per_site < 1:
        raise ValueError(f"n_per_site must be >= 1, got {n_per_site}")
    if size < 32:
        raise ValueError(f"size {size} is too small; use at least 32 pixels")
    if not 0.0 <= difficulty <= 1.0:
        raise ValueError(f"difficulty {difficulty} is not in [0, 1]")
    names = [s.name for s in sites]
    if not names:
        raise ValueError("no sites given")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"site names must be unique; repeated: {', '.join(dup)}")


def make_dataset(
    out_dir: str | os.PathLike,
    sites: Sequence[SiteConfig] | None = None,
    n_per_site: int = 300,
    size: int = 256,
    seed: int = 0,
    difficulty: float = 0.5,
    workers: int | ProcessPoolExecutor | None = None,
    progress: bool = True,
    mode: str = "phantom",
    lung_shapes: str = "drawn",
) -> Path:
    """Generate a multi-site synthetic chest X-ray set; return ``out_dir/manifest.csv``.

    Args:
        out_dir: output folder (created).
        sites: site configurations; default :func:`default_sites`.
        n_per_site: images per site (classes balanced, split 70/15/15 per site and class).
        size: image side in pixels (all images ``size x size``).
        seed: master seed; same seed, same pixel data, whatever ``workers``.
        difficulty: 0 (obvious findings) .. 1 (subtle).
        workers: worker processes (default ``min(4, cpu_count)``; <= 1 runs in-process), or
            a :func:`render_pool` to share between several sets.
        progress: show a tqdm progress bar.
        mode: ``"phantom"`` (drawn anatomy, no download) or ``"ct"`` (radiographs projected
            from a real chest CT, see :mod:`synthetic.ct`; fetches it once).
        lung_shapes: phantom mode only: ``"drawn"`` (default) or ``"real"`` (real lung-field
            shapes from :mod:`synthetic.lung_shapes`, fetched once, instead of drawn lungs).
    """
    sites = list(default_sites() if sites is None else sites)
    _check_args(sites, n_per_site, size, difficulty)
    ct_dir = _prepare_mode(mode)
    shapes_file = ""
    if lung_shapes == "real":
        if mode != "phantom":
            raise ValueError(f"lung_shapes='real' needs mode='phantom', got mode={mode!r}")

        settings = Settings.from_env()
        load_lung_shapes(settings)
        shapes_file = str(shapes_path(settings))
    elif lung_shapes != "drawn":
        raise ValueError(f"unknown lung_shapes {lung_shapes!r}; use 'drawn' or 'real'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tasks = _build_tasks(
        out.resolve(),
        sites,
        n_per_site,
        size,
        seed,
        difficulty,
        ct_dir=ct_dir,
        shapes_file=shapes_file,
    )
    rows = _run_tasks(tasks, workers, progress)
    return _write_manifest(rows, out / "manifest.csv")


def make_bias_test_sets(
    out_dir: str | os.PathLike,
    base_site: SiteConfig,
    n: int = 150,
    size: int = 256,
    seed: int = 1,
    difficulty: float = 0.5,
    workers: int | ProcessPoolExecutor | None = None,
    progress: bool = True,
    mode: str = "phantom",
) -> Path:
    """Write the biased / unbiased / confounding test sets (section 7 of the method) into one
    manifest (``split`` = ``test`` for all); return its path.

    Use a ``seed`` different from the training set's so the test images are new patients.
    """
    if base_site.marker_style == "none":
        raise ValueError(f"site {base_site.name!r} has no markers; pick a biased site")
    sites = bias_test_sites(base_site)
    _check_args(sites, n, size, difficulty)
    ct_dir = _prepare_mode(mode)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tasks = _build_tasks(
        out.resolve(), sites, n, size, seed, difficulty, split="test", ct_dir=ct_dir
    )
    rows = _run_tasks(tasks, workers, progress)
    return _write_manifest(rows, out / "manifest.csv")


# --------------------------------------------------------------------------------------------
# Previews
# --------------------------------------------------------------------------------------------


def _read_display(path: str) -> np.ndarray:
    """Stored DICOM pixels -> float ``[H, W]`` in [0, 1], bright = dense (full range, no VOI)."""
    import pydicom

    ds = pydicom.dcmread(path)
    arr = ds.pixel_array.astype(np.float32) / float((1 << int(ds.BitsStored)) - 1)
    return 1.0 - arr if ds.PhotometricInterpretation == "MONOCHROME1" else arr


def render_previews(manifest: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Write ``synthetic_classes.png`` (one image per class, lung mask outlined) and
    ``synthetic_sites.png`` (one image per site, marker visible) into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    manifest = Path(manifest)
    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    base = manifest.parent
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def load(row: pd.Series) -> tuple[np.ndarray, np.ndarray]:
        img = _read_display(str(base / row["image"]))
        mask = np.asarray(Image.open(base / row["mask"])) > 127
        return img, mask

    written = []
    first_site = df["site"].iloc[0]
    picks = []
    for cls in CLASSES:
        rows = df[(df["label"] == cls) & (df["site"] == first_site)]
        rows = rows if len(rows) else df[df["label"] == cls]
        if len(rows):
            picks.append(rows.iloc[0])
    fig, axes = plt.subplots(1, len(picks), figsize=(3.2 * len(picks), 3.5), squeeze=False)
    for ax, row in zip(axes[0], picks, strict=True):
        img, mask = load(row)
        ax.imshow(img, cmap="gray", vmin=0, vmax=1)
        ax.contour(mask, levels=[0.5], colors="tab:orange", linewidths=0.8)
        ax.set_title(f"{row['label']} ({row['site']})", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    path = out / "synthetic_classes.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    sites = list(dict.fromkeys(df["site"]))
    fig, axes = plt.subplots(1, len(sites), figsize=(3.2 * len(sites), 3.5), squeeze=False)
    for ax, site in zip(axes[0], sites, strict=True):
        rows = df[df["site"] == site]
        with_marker = rows[rows["bias"] != ""]
        row = (with_marker if len(with_marker) else rows).iloc[0]
        img, _ = load(row)
        ax.imshow(img, cmap="gray", vmin=0, vmax=1)
        bias = row["bias"] or "none"
        ax.set_title(f"{site}: {row['label']}, marker={bias}", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    path = out / "synthetic_sites.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written
