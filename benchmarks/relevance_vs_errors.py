"""Diagnostic: do a study model's errors on one evaluation set go with relevance outside the
lungs?

For each trained model of the named methods in a finished study folder (every seed), predicts
the named evaluation site with the manifest's lung masks (as the study evaluates it) and
prints, per seed: accuracy, the mean share of |LRP relevance| outside the lung mask on correctly
and on wrongly classified images, and the AUROC of that share as a score for "this image is
misclassified" (0.5: unrelated; > 0.5: errors carry more relevance outside the lungs). A
correlation, not a cause: it says whether looking outside the masks and failing go together.

Usage:
    .venv/bin/python benchmarks/relevance_vs_errors.py <study out dir> --site hospital-d \\
        --methods isnet-stochastic reference-no-markers
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from classification.model_card import load_model  # noqa: E402
from cxr_io.manifest import class_names, load_manifest, to_records  # noqa: E402
from pipeline.predictor import Predictor  # noqa: E402
from pipeline.study import predict_records, trained_models  # noqa: E402


def _site_rows(out: Path, site: str) -> tuple[pd.DataFrame, list[str]]:
    manifests = sorted((out / "masks").glob("*/manifest.csv"))
    if not manifests:
        raise SystemExit(f"{out}: no masks/*/manifest.csv; give a finished study's output folder")
    df = pd.concat([load_manifest(m) for m in manifests], ignore_index=True)
    rows = df[df["site"] == site]
    if rows.empty:
        raise SystemExit(f"no images of site {site!r}; sites: {sorted(df['site'].unique())}")
    return rows, class_names(df)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path, help="a finished study's output folder")
    ap.add_argument("--site", default="hospital-d")
    ap.add_argument("--methods", nargs="+", default=["isnet-stochastic", "reference-no-markers"])
    args = ap.parse_args()
    rows, classes = _site_rows(args.out, args.site)
    records = to_records(rows, classes)
    print(f"{args.out}: {args.site}, {len(records)} images, classes {classes}")
    print(f"{'method':<27} seed  acc    bg-share correct / wrong   AUROC(bg-share -> error)")
    for method in args.methods:
        try:
            folders = trained_models(args.out, method)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        for folder in folders:
            seed = folder.name[len(method) :].split("-")[1]
            pred = predict_records(Predictor(*load_model(folder / "best_model.pt")), records)
            wrong = pred.probs.argmax(1) != pred.labels
            share = pred.relevance["background_share"]
            auc = roc_auc_score(wrong, share) if 0 < wrong.sum() < len(wrong) else float("nan")
            print(
                f"{method:<27} {seed:<5} {1 - wrong.mean():.3f}  "
                f"{share[~wrong].mean():.3f} / {share[wrong].mean():.3f}"
                f"{'':14}{auc:.3f}"
            )


if __name__ == "__main__":
    main()
