"""Diagnostic: which part of an external site's acquisition costs a study's models their AUROC?

Re-renders the external site's patients (same seeds, so the same anatomy, findings and
labels) with one acquisition setting at a time taken from a reference site, and predicts every
variant with the trained models of a finished study (every seed). A variant that recovers a
method's AUROC names the setting that method is sensitive to. Masks: the generator's exact
lung masks (segment-then-classify sees the true lungs here, so its row measures the
classifier's sensitivity, not the U-Net's); the relevance share outside the lungs is printed
for the methods that give one.

The first variant, ``as is``, is the external site itself: its AUROC equals the study's for
every method that needs no mask at test time (a check that the re-rendering is the study's).

Usage:
    .venv/bin/python benchmarks/site_shift_factors.py <study out dir> \\
        --methods isnet-stochastic reference-no-markers --site hospital-d --like hospital-c
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from classification.model_card import load_model  # noqa: E402
from cxr_io.manifest import class_names, load_manifest, to_records  # noqa: E402
from evaluation.metrics import compute_metrics  # noqa: E402
from pipeline.predictor import Predictor  # noqa: E402
from pipeline.study import EvalInputs, predict_records, trained_models  # noqa: E402
from synthetic import default_sites, make_dataset, portable_site  # noqa: E402
from synthetic.sites import SiteConfig  # noqa: E402

#: acquisition settings swapped one group at a time (a window is its centre and width together)
FACTORS: dict[str, tuple[str, ...]] = {
    "gamma": ("gamma",),
    "window": ("window_center", "window_width"),
    "blur": ("blur",),
    "noise": ("noise",),
}
#: settings that describe the acquisition (the rest: name, markers, seeds)
ACQUISITION = (
    "modality",
    "photometric",
    "bits_stored",
    "window_center",
    "window_width",
    "rescale_slope",
    "rescale_intercept",
    "noise",
    "gamma",
    "pixel_spacing_mm",
    "blur",
    "collimation",
    "collimation_bright",
    "view_position",
    "manufacturer",
)


def variants(site: SiteConfig, like: SiteConfig) -> dict[str, SiteConfig]:
    """``as is``, each factor of :data:`FACTORS` from ``like``, and every acquisition setting
    from ``like``; all keep ``site``'s seed key (same patients) under names of their own."""
    key = site.key
    out = {"as is": replace(site, name=f"{site.name}-asis", seed_key=key)}
    for factor, names in FACTORS.items():
        values = {n: getattr(like, n) for n in names}
        out[f"{factor} of {like.name}"] = replace(
            site, name=f"{site.name}-{factor}", seed_key=key, **values
        )
    values = {n: getattr(like, n) for n in ACQUISITION}
    out[f"all of {like.name}"] = replace(site, name=f"{site.name}-all", seed_key=key, **values)
    return out


def _site(name: str) -> SiteConfig:
    sites = {s.name: s for s in [*default_sites(), portable_site()]}
    if name not in sites:
        raise SystemExit(f"unknown site {name!r}; choose one of {sorted(sites)}")
    return sites[name]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path, help="a finished study's output folder")
    ap.add_argument("--methods", nargs="+", default=["isnet-stochastic", "reference-no-markers"])
    ap.add_argument("--site", default="hospital-d", help="the external site to take apart")
    ap.add_argument("--like", default="hospital-c", help="the site whose settings are swapped in")
    ap.add_argument("--n", type=int, default=300, help="images (the study's n_per_site)")
    ap.add_argument("--size", type=int, default=256, help="the study's synthetic size")
    ap.add_argument("--seed", type=int, default=0, help="the study's synthetic seed")
    ap.add_argument("--difficulty", type=float, default=0.0, help="the study's difficulty")
    ap.add_argument("--data", type=Path, default=Path("outputs/site_shift_factors"))
    args = ap.parse_args()

    sets = variants(_site(args.site), _site(args.like))
    t0 = time.perf_counter()
    manifest = make_dataset(
        args.data,
        list(sets.values()),
        n_per_site=args.n,
        size=args.size,
        seed=args.seed,
        difficulty=args.difficulty,
        progress=False,
    )
    df = load_manifest(manifest)
    classes = class_names(df)
    print(
        f"rendered {len(df)} images in {time.perf_counter() - t0:.0f} s under {args.data}",
        flush=True,
    )
    records = {v: to_records(df[df["site"] == s.name], classes) for v, s in sets.items()}

    print(f"{'method':<27} {'variant':<22} macro AUROC per seed -> mean   bg-share")
    for method in args.methods:
        try:
            folders = trained_models(args.out, method)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        predictors = [Predictor(*load_model(f / "best_model.pt")) for f in folders]
        for variant, recs in records.items():
            inputs = EvalInputs.read(predictors[0], recs)
            aurocs, shares = [], []
            for predictor in predictors:
                pred = predict_records(predictor, recs, inputs=inputs)
                aurocs.append(compute_metrics(pred.probs, pred.labels, classes)["auroc_macro"])
                if "background_share" in pred.relevance:
                    shares.append(float(pred.relevance["background_share"].mean()))
            per_seed = " ".join(f"{a:.3f}" for a in aurocs)
            share = f"{np.mean(shares):.2f}" if shares else "-"
            print(
                f"{method:<27} {variant:<22} {per_seed} -> {np.mean(aurocs):.3f}   {share}",
                flush=True,
            )


if __name__ == "__main__":
    main()
