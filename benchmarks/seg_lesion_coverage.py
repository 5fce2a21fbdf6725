"""Lesion coverage of a lung segmenter: does the predicted mask keep the disease inside?

Every film is rendered twice from the same seed, with and without its finding
(``render_case(..., with_finding=False)`` / ``render_ct_case(..., with_finding=False)``: the
random streams are independent, so anatomy, pose, exposure, noise and marker are identical). The
finding's added density is ``max(with - without, 0)`` of the displayed film (bright = dense);
coverage = the fraction of it inside the predicted mask (:func:`segmentation.metrics.
lesion_coverage`). The ground-truth mask covers 100 % by construction (findings are drawn inside
the lung fields). The film with its finding is written as a DICOM and segmented through the full
inference path (``predict_files``: resize to the network size, threshold, two largest
components, fill holes), so the numbers are what the ISNet mask step would produce.

A CT lesion can fall almost entirely behind the heart or outside the field of view; films whose
finding adds less than ``MIN_ADDED`` (1e-4) mean density per pixel (e.g. one quantisation step)
are left out of the coverage numbers and counted as "not visible" (they still count for Dice).

Sources: drawn phantoms (``--phantom-sites``, default the held-out site hospital-c; the
portable site ``hospital-d`` of the imperfect-segmentation condition can be named too) and
radiographs projected from the real CT (``--ct-sites``, default all three sites), classes
alternating ``pneumonia`` (dense consolidation) / ``covid`` (diffuse peripheral haze). The test
seed (default 1000) is never used for training; use another seed and the training sites
(``--seed 2000 --phantom-sites hospital-a hospital-b --ct-sites hospital-a hospital-b``) as a
validation set when choosing between models.

    .venv/bin/python benchmarks/seg_lesion_coverage.py --ckpt models/seg_unet_synthetic.pt \\
        --size 64 --size 256 --difficulty 0 --difficulty 0.5 --n-phantom 40 --n-ct 14 --threads 1

Rendered cases are cached under ``--out`` (per source, size and seed), so several checkpoints
are compared on identical films. Prints mean / median / min coverage, the number of films below
0.9 coverage and Dice per class; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "seg_unet_synthetic.pt"
LESION_CLASSES = ("pneumonia", "covid")
MIN_ADDED = 1e-4  # mean added density per pixel below which a finding counts as not visible
CLASS_NAMES = {"pneumonia": "pneumonia (dense)", "covid": "covid (diffuse)"}


@dataclass
class CaseSet:
    """Films of one source and size: DICOM paths, labels, ground-truth masks ``[N, H, W]`` bool
    and the findings' added density ``[N, H, W]`` float32."""

    paths: list[str]
    labels: list[str]
    masks: np.ndarray
    added: np.ndarray


def render_pair(source: str, site, label: str, ss, size: int, difficulty: float, ct_dir: str):
    """(film with its finding, film without) as :class:`SyntheticCase` objects."""
    kw = {"size": size, "difficulty": difficulty}
    if source == "ct":
        from synthetic.ct import render_ct_case

        return tuple(
            render_ct_case(site, label, ss, Path(ct_dir), with_finding=w, **kw)
            for w in (True, False)
        )
    from synthetic import render_case

    return tuple(render_case(site, label, ss, with_finding=w, **kw) for w in (True, False))


def make_cases(
    out: Path,
    source: str,
    site_names: list[str],
    n_per_site: int,
    size: int,
    seed: int,
    difficulty: float,
) -> CaseSet:
    """Render (or load from ``out``) ``n_per_site`` films per site, classes alternating."""
    from segmentation.metrics import added_density
    from synthetic import blind_site, default_sites, image_seed, portable_site, write_dicom

    sites_tag = "+".join(site_names)
    folder = out / f"{source}_{size}px_d{difficulty:g}_seed{seed}_{sites_tag}_n{n_per_site}"
    cache = folder / "cases.npz"
    if cache.is_file():
        with np.load(cache) as z:
            return CaseSet(
                [str(folder / p) for p in z["paths"]], list(z["labels"]), z["masks"], z["added"]
            )
    ct_dir = ""
    if source == "ct":
        from cxr_io.settings import Settings
        from synthetic.ct import fetch_ct

        ct_dir = str(fetch_ct(Settings.from_env()))
    sites = [s for s in [*default_sites(), portable_site(), blind_site()] if s.name in site_names]
    t0 = time.perf_counter()
    rel, labels, masks, added = [], [], [], []
    for site in sites:
        for i in range(n_per_site):
            label = LESION_CLASSES[i % 2]
            ss = image_seed(seed, site, i)
            with_f, without_f = render_pair(source, site, label, ss, size, difficulty, ct_dir)
            name = f"{site.name}_{i:04d}.dcm"
            st = with_f.streams
            write_dicom(folder / name, with_f.stored, site, st.header, st.entropy, size)
            rel.append(name)
            labels.append(label)
            masks.append(with_f.mask)
            added.append(added_density(with_f.display, without_f.display).astype(np.float32))
    np.savez_compressed(
        cache, paths=np.array(rel), labels=np.array(labels), masks=np.array(masks), added=added
    )
    print(f"rendered {len(rel)} {source} films at {size} px ({time.perf_counter() - t0:.1f} s)")
    return CaseSet([str(folder / p) for p in rel], labels, np.array(masks), np.array(added))


def score(
    ckpt: Path, cases: CaseSet, threshold: float | None = None
) -> tuple[dict[str, dict[str, float]], list[np.ndarray], np.ndarray]:
    """Per class (and ``all``): coverage summary + Dice mean/min of ``ckpt``'s masks
    (``threshold``: probability threshold; default that of :class:`PostprocessConfig`); also the
    predicted masks ``[H, W]`` and the coverage per film (``nan``: finding not visible)."""
    from segmentation.infer import PostprocessConfig, predict_files
    from segmentation.metrics import coverage_of, score_mask, summarise_coverage

    post = PostprocessConfig() if threshold is None else PostprocessConfig(threshold=threshold)
    res = predict_files(cases.paths, ckpt, batch_size=8, post=post)
    cov = np.array([coverage_of(r.mask, a) for r, a in zip(res, cases.added, strict=True)])
    visible = np.array([a.mean() >= MIN_ADDED for a in cases.added])
    cov[~visible] = np.nan
    dice = np.array([score_mask(r.mask, m).dice for r, m in zip(res, cases.masks, strict=True)])
    gt_cov = np.array([coverage_of(m, a) for m, a in zip(cases.masks, cases.added, strict=True)])
    labels = np.array(cases.labels)
    out = {}
    for cls in (*LESION_CLASSES, "all"):
        sel = np.ones(len(labels), bool) if cls == "all" else labels == cls
        s = summarise_coverage(cov[sel])
        s["dice_mean"], s["dice_min"] = float(dice[sel].mean()), float(dice[sel].min())
        s["not_visible"] = float((sel & ~visible).sum())
        s["gt_coverage_min"] = float(np.nanmin(gt_cov[sel & visible], initial=1.0))
        out[cls] = s
    return out, [r.mask for r in res], cov


def _outline(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask)


def contact_sheet(
    cases: CaseSet, masks: list[list[np.ndarray]], covs: list[np.ndarray], path: Path, k: int = 6
) -> Path:
    """The ``k`` films with the lowest coverage under the first checkpoint: film (grey), finding
    (magenta), first checkpoint's outline (orange), last checkpoint's outline (green); caption
    = coverages. Written as a PNG at ``path``."""
    from PIL import Image, ImageDraw

    from cxr_io.readers import load_cxr

    order = [int(i) for i in np.argsort(np.nan_to_num(covs[0], nan=2.0))[:k]]
    tiles = []
    for i in order:
        film = np.asarray(load_cxr(cases.paths[i]).pixels, dtype=np.float32)
        a = cases.added[i] / max(float(cases.added[i].max()), 1e-6)
        rgb = np.repeat(film[..., None], 3, axis=2) * 0.8
        rgb[..., 0] += 0.6 * a
        rgb[..., 2] += 0.6 * a
        rgb[_outline(masks[0][i])] = (1.0, 0.55, 0.0)
        rgb[_outline(masks[-1][i])] = (0.1, 1.0, 0.1)
        img = Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8)).resize((256, 256))
        canvas = Image.new("RGB", (256, 276))
        canvas.paste(img, (0, 20))
        caption = " -> ".join(f"{c[i]:.2f}" for c in covs) + f"  {cases.labels[i]}"
        ImageDraw.Draw(canvas).text((4, 4), caption, fill=(255, 255, 255))
        tiles.append(np.asarray(canvas))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(tiles, axis=1)).save(path)
    return path


def fmt(s: dict[str, float]) -> str:
    return (
        f"n {int(s['n']):3d}  coverage mean {s['mean']:.4f} median {s['median']:.4f} "
        f"min {s['min']:.4f} (< 0.9: {int(s['below'])})  Dice mean {s['dice_mean']:.4f} "
        f"min {s['dice_min']:.4f}  (finding not visible: {int(s['not_visible'])})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, action="append", help="checkpoint(s); default: committed")
    ap.add_argument("--size", type=int, action="append", help="film side(s) in px; default 64 256")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "seg_lesion_coverage")
    ap.add_argument(
        "--difficulty",
        type=float,
        action="append",
        help="finding difficulty(ies), 0 = large and dense (the study's setting), 1 = subtle; "
        "default 0 0.5",
    )
    ap.add_argument("--seed", type=int, default=1000, help="image seed (1000: test; never trained)")
    ap.add_argument("--phantom-sites", nargs="*", default=["hospital-c"])
    ap.add_argument("--ct-sites", nargs="*", default=["hospital-a", "hospital-b", "hospital-c"])
    ap.add_argument("--n-phantom", type=int, default=40, help="phantom films per phantom site")
    ap.add_argument("--n-ct", type=int, default=14, help="CT-projected films per CT site")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--threshold", type=float, default=None, help="mask threshold (default 0.5)")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    ap.add_argument(
        "--figures", type=Path, default=None, help="write contact sheets of the worst films here"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ckpts = args.ckpt or [DEFAULT_MODEL]
    sizes = args.size or [64, 256]
    difficulties = args.difficulty or [0.0, 0.5]
    sources = {"phantom": (args.phantom_sites, args.n_phantom), "ct": (args.ct_sites, args.n_ct)}
    results: dict[str, dict] = {}
    for diff in difficulties:
        for size in sizes:
            for source, (site_names, n) in sources.items():
                if not site_names or n < 1:
                    continue
                cases = make_cases(args.out, source, site_names, n, size, args.seed, diff)
                all_masks, all_covs = [], []
                for ckpt in ckpts:
                    t0 = time.perf_counter()
                    r, masks, covs = score(ckpt, cases, args.threshold)
                    all_masks.append(masks)
                    all_covs.append(covs)
                    key = (
                        f"{ckpt} | difficulty {diff:g} | {size} px | {source} "
                        f"{'+'.join(site_names)} seed {args.seed}"
                    )
                    results[key] = r
                    print(f"\n== {key} ({time.perf_counter() - t0:.1f} s)")
                    for cls, s in r.items():
                        print(f"  {CLASS_NAMES.get(cls, cls):18s} {fmt(s)}")
                if args.figures:
                    name = f"coverage_{source}_{size}px_d{diff:g}.png"
                    print("figure:", contact_sheet(cases, all_masks, all_covs, args.figures / name))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
