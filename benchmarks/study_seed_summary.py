"""Summarise a multi-seed study folder: the tables docs/study.md quotes.

Reads ``OUT/results.csv`` and ``OUT/paired_tests.csv`` of ``isnet-cxr study run ... --set
'study_def#seeds=[0,1,2]'`` and prints (1) macro AUROC mean +- SD over seeds with the mean
balanced accuracy, per method and dataset; (2) ISNet minus each comparator, macro AUROC, paired
by seed: mean +- SD of the per-seed differences and in how many seeds the per-seed 95% patient
bootstrap CI excludes 0 (and on which side); (3) when the study wrote
``OUT/paired_tests_pooled.csv``, the same differences pooled over the seeds (mean of the per-seed
differences with one 95% patient-bootstrap CI shared by every seed; it leaves out the
seed-to-seed spread that (2) shows).

    python benchmarks/study_seed_summary.py outputs/study
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from evaluation.report import markdown_table

DATASETS = (
    "hospital-a-biased",
    "hospital-a-unbiased",
    "hospital-a-confounding",
    "hospital-c",
    "hospital-d",
    "hospital-e",
)


def auroc_table(results: pd.DataFrame) -> pd.DataFrame:
    """``method x dataset`` cells ``mean +- SD (balanced accuracy)`` over seeds."""
    g = results.groupby(["method", "dataset"])
    cells = (
        g["auroc_macro"].mean().map("{:.3f}".format)
        + " +- "
        + g["auroc_macro"].std().map("{:.3f}".format)
        + " ("
        + g["balanced_accuracy"].mean().map("{:.2f}".format)
        + ")"
    )
    table = cells.unstack("dataset")
    return table[[d for d in DATASETS if d in table.columns]]


def paired_table(paired: pd.DataFrame) -> pd.DataFrame:
    """``(isnet, dataset) x comparator`` cells ``mean +- SD (k of n; below/above)`` of per-seed
    differences (ISNet minus comparator; a study with several ISNets has one row block each)."""

    def cell(rows: pd.DataFrame) -> str:
        below = int((rows["ci_high"] < 0).sum())
        above = int((rows["ci_low"] > 0).sum())
        d = rows["difference"]
        sd = d.std() if len(d) > 1 else float("nan")
        return f"{d.mean():+.3f} +- {sd:.3f} ({below} below 0, {above} above, of {len(d)})"

    cells = paired.groupby(["isnet", "dataset", "comparator"]).apply(cell, include_groups=False)
    return _isnet_rows(cells, paired["isnet"])


def pooled_table(pooled: pd.DataFrame) -> pd.DataFrame:
    """``(isnet, dataset) x comparator`` cells ``difference [ci_low, ci_high]`` of the
    seed-pooled paired tests."""
    cells = pooled.set_index(["isnet", "dataset", "comparator"]).apply(
        lambda r: f"{r['difference']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]", axis=1
    )
    return _isnet_rows(cells, pooled["isnet"])


def _isnet_rows(cells: pd.Series, isnets: pd.Series) -> pd.DataFrame:
    """Cells indexed ``(isnet, dataset, comparator)`` as a table: one row per ISNet and
    dataset (ISNets in order of appearance, datasets in :data:`DATASETS` order), one column per
    comparator."""
    table = cells.unstack("comparator")
    order = [(i, d) for i in dict.fromkeys(isnets) for d in DATASETS]
    table = table.reindex([k for k in order if k in table.index])
    table.index = [f"{i}, {d}" for i, d in table.index]
    return table


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(args[0])
    results = pd.read_csv(out / "results.csv")
    paired = pd.read_csv(out / "paired_tests.csv")
    seeds = sorted(int(s) for s in results["seed"].unique())
    print(f"seeds {seeds}; macro AUROC mean +- SD (mean balanced accuracy)")
    print(markdown_table(auroc_table(results)))
    print("\nISNet minus comparator, macro AUROC, per-seed differences")
    print(markdown_table(paired_table(paired), index_name="isnet, dataset"))
    if (out / "paired_tests_pooled.csv").exists():
        pooled = pd.read_csv(out / "paired_tests_pooled.csv")
        print("\nISNet minus comparator, macro AUROC, pooled over the seeds [95% CI]")
        print(markdown_table(pooled_table(pooled), index_name="isnet, dataset"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
