"""Figures and the self-contained study report (HTML with embedded PNGs + a Markdown table).

The results frame given to :func:`write_report` has one row per (method, dataset):

- ``method``, ``dataset``, ``kind`` (``internal``, ``external``, ``biased``, ``unbiased`` or
  ``confounding``);
- metric columns named as :mod:`evaluation.metrics` names them, each with
  ``<name>_ci_low`` / ``<name>_ci_high`` (e.g. ``auroc_macro``, ``auroc_macro_ci_low``, ...);
- optionally ``background_relevance`` (share of |relevance| outside the lungs, 0..1),
  with or without CI columns;
- optionally ``seed``: then one row per (method, dataset, seed); tables show the mean and spread
  over seeds, and each seed's 95% CIs separately (a CI averaged over seeds is not a CI).

All plotting uses matplotlib's Agg canvas directly (no pyplot global figure state).
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from evaluation.metrics import compute_metrics, metric_safe_names, roc_curve

KIND_ORDER = ("internal", "biased", "unbiased", "confounding", "external")
METRIC_LABELS = {
    "auroc_macro": "macro AUROC",
    "balanced_accuracy": "balanced accuracy",
    "f1_macro": "macro F1",
    "accuracy": "accuracy",
    "ece": "ECE (lower is better)",
    "background_relevance": "share of |relevance| outside the lungs (lower is better)",
    "background_share": "share of |relevance| outside the lungs (lower is better)",
}
_KIND_COLORS = {
    "internal": "#1f77b4",
    "external": "#d62728",
    "biased": "#9467bd",
    "unbiased": "#2ca02c",
    "confounding": "#ff7f0e",
}


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")  # the constrained layout fits everything in the figure
    return path


def format_ci(value: float, low: float, high: float, digits: int = 2) -> str:
    """``"0.91 [0.87, 0.94]"``; ``"n/a"`` for a missing value; no brackets without a CI."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    text = f"{value:.{digits}f}"
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return text
    return f"{text} [{low:.{digits}f}, {high:.{digits}f}]"


# ----------------------------------------------------------------------------- plots


def plot_roc(
    probs_by_method: Mapping[str, np.ndarray],
    labels: np.ndarray,
    classes: Sequence[str],
    path: str | Path,
    *,
    title: str | None = None,
) -> Path:
    """One-vs-rest ROC curves, one panel per class, one curve per method.

    Args:
        probs_by_method: method -> ``[N, K]`` softmax outputs on the same ``N`` images.
        labels: ``[N]`` true class indices; classes: ``K`` names; path: PNG to write.
    """
    labels = np.asarray(labels)
    k = len(classes)
    fig = _figure(3.2 * k, 3.4)
    axes = fig.subplots(1, k, squeeze=False)[0]
    safe = metric_safe_names(classes)
    for c, ax in enumerate(axes):
        positives = labels == c
        ax.plot([0, 1], [0, 1], ls=":", color="0.6", lw=1)
        for method, probs in probs_by_method.items():
            probs = np.asarray(probs)
            if positives.all() or not positives.any():
                continue
            fpr, tpr = roc_curve(probs[:, c], positives)
            auc = compute_metrics(probs, labels, classes)[f"auroc_{safe[c]}"]
            ax.plot(fpr, tpr, lw=1.6, label=f"{method} ({auc:.2f})")
        ax.set_title(f"{classes[c]} vs rest" + ("" if positives.any() else " (no positives)"))
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_aspect("equal")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right", title="AUROC", title_fontsize=7)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_confusion(
    labels: np.ndarray,
    preds: np.ndarray,
    classes: Sequence[str],
    path: str | Path,
    *,
    title: str | None = None,
) -> Path:
    """Confusion matrix (colour: row-normalised recall; text: count and share of the row)."""
    labels, preds = np.asarray(labels, dtype=int), np.asarray(preds, dtype=int)
    k = len(classes)
    cm = np.zeros((k, k), dtype=int)
    np.add.at(cm, (labels, preds), 1)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros_like(cm, dtype=float), where=rows > 0)
    fig = _figure(1.2 * k + 2.2, 1.1 * k + 1.6)
    ax = fig.add_subplot()
    im = ax.imshow(share, vmin=0, vmax=1, cmap="Blues")
    for i in range(k):
        for j in range(k):
            color = "white" if share[i, j] > 0.6 else "black"
            ax.text(j, i, f"{cm[i, j]}\n{share[i, j]:.0%}", ha="center", va="center", color=color)
    ax.set_xticks(range(k), classes, rotation=30, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of true class")
    ax.set_title(title or "confusion matrix")
    return _save(fig, path)


def _ordered_columns(results: pd.DataFrame) -> list[tuple[str, str]]:
    """Distinct ``(dataset, kind)`` pairs, internal first, external last, then by name."""
    rank = {k: i for i, k in enumerate(KIND_ORDER)}
    pairs = {(str(d), str(k)) for d, k in zip(results["dataset"], results["kind"], strict=True)}
    return sorted(pairs, key=lambda dk: (rank.get(dk[1], len(rank)), dk[0]))


def _ci_columns(results: pd.DataFrame, metric: str) -> tuple[pd.Series, pd.Series]:
    nan = pd.Series(np.nan, index=results.index)
    lo = results.get(f"{metric}_ci_low", nan)
    hi = results.get(f"{metric}_ci_high", nan)
    return lo.astype(float), hi.astype(float)


def plot_internal_vs_external(
    results: pd.DataFrame, path: str | Path, *, metric: str = "auroc_macro"
) -> Path:
    """Per method: every dataset's ``metric`` with its CI, coloured by kind; a dashed line
    joins the method's mean internal and mean external value (the generalisation gap)."""
    _check_results(results, [metric])
    methods = list(dict.fromkeys(results["method"]))
    columns = _ordered_columns(results)
    lo, hi = _ci_columns(results, metric)
    fig = _figure(max(4.5, 1.6 * len(methods) + 2.5), 3.8)
    ax = fig.add_subplot()
    offsets = np.linspace(-0.25, 0.25, len(columns)) if len(columns) > 1 else np.zeros(1)
    seen: set[str] = set()
    for m, method in enumerate(methods):
        rows = results[results["method"] == method]
        means = {}
        for kind in ("internal", "external"):
            vals = rows.loc[rows["kind"] == kind, metric].astype(float)
            means[kind] = float(vals.mean()) if len(vals) else math.nan
        if not math.isnan(means["internal"]) and not math.isnan(means["external"]):
            ax.plot(
                [m - 0.3, m + 0.3],
                [means["internal"], means["external"]],
                ls="--",
                c="0.5",
                lw=1,
                label="mean internal to mean external" if m == 0 else None,
            )
        for d, (dataset, kind) in enumerate(columns):
            sel = (rows["dataset"].astype(str) == dataset) & (rows["kind"].astype(str) == kind)
            if not sel.any():
                continue
            i = rows.index[sel][0]
            v = float(results.at[i, metric])
            err = None
            if not (math.isnan(lo[i]) or math.isnan(hi[i])):
                err = [[max(v - lo[i], 0)], [max(hi[i] - v, 0)]]
            ax.errorbar(
                m + offsets[d],
                v,
                yerr=err,
                fmt="o" if kind == "internal" else "s",
                color=_KIND_COLORS.get(kind, "0.3"),
                capsize=2,
                ms=5,
                label=kind if kind not in seen else None,
            )
            seen.add(kind)
    ax.set_xticks(range(len(methods)), methods)
    ax.set_xlim(-0.6, len(methods) - 0.4)
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.set_title(f"{METRIC_LABELS.get(metric, metric)}: internal vs external (95% CI)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def plot_background_share(
    results: pd.DataFrame,
    path: str | Path,
    *,
    column: str = "background_relevance",
    chance_column: str = "background_share_chance",
) -> Path:
    """Bars: each method's mean share of |relevance| outside the lungs (over datasets), with
    the per-dataset values as dots, and (when ``chance_column`` is there) a dashed line at the
    share a heatmap blind to the lung mask would have (1 - lung-area fraction)."""
    methods = list(dict.fromkeys(results["method"]))
    fig = _figure(max(4.0, 1.2 * len(methods) + 2), 3.4)
    ax = fig.add_subplot()
    for m, method in enumerate(methods):
        vals = results.loc[results["method"] == method, column].astype(float).dropna()
        ax.bar(m, vals.mean() if len(vals) else 0.0, color="#8c8c8c", width=0.6)
        ax.plot(np.full(len(vals), m), vals, "o", color="black", ms=3)
    if chance_column in results.columns:
        level = float(results[chance_column].astype(float).mean())
        if not math.isnan(level):
            ax.axhline(level, ls="--", color="#d62728", lw=1)
            ax.text(
                len(methods) - 0.5,
                level,
                f"blind to the mask ({level:.2f})",
                ha="right",
                va="bottom",
                fontsize=7,
                color="#d62728",
            )
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of |relevance|\noutside the lung mask")
    ax.set_title("Where do the models look? (lower is better)")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


# ----------------------------------------------------------------------------- tables


def _check_columns(results: pd.DataFrame, metrics: Sequence[str]) -> None:
    missing = [c for c in ("method", "dataset", "kind", *metrics) if c not in results.columns]
    if missing:
        raise ValueError(
            f"results frame lacks column(s) {missing}; it needs one row per (method, dataset) "
            f"with columns method, dataset, kind and the metric columns. Has: {list(results)}"
        )


def _check_results(results: pd.DataFrame, metrics: Sequence[str]) -> None:
    _check_columns(results, metrics)
    dup = results.duplicated(["method", "dataset", "kind"])
    if dup.any():
        first = results.loc[dup, ["method", "dataset", "kind"]].iloc[0].tolist()
        raise ValueError(
            f"results frame has several rows for method/dataset/kind {first}; aggregate seeds "
            "and folds first (e.g. with summarise_runs) so there is one row each."
        )


def metric_table(results: pd.DataFrame, metric: str = "auroc_macro") -> pd.DataFrame:
    """Method x dataset table of ``"value [low, high]"`` strings (datasets ordered by kind)."""
    _check_results(results, [metric])
    lo, hi = _ci_columns(results, metric)
    cells = results.assign(
        _cell=[
            format_ci(float(v), float(a), float(b))
            for v, a, b in zip(results[metric], lo, hi, strict=True)
        ]
    )
    cells["_col"] = [f"{d} ({k})" for d, k in zip(cells["dataset"], cells["kind"], strict=True)]
    table = cells.pivot(index="method", columns="_col", values="_cell")
    ordered = [f"{d} ({k})" for d, k in _ordered_columns(results)]
    table = table.reindex(index=list(dict.fromkeys(results["method"])), columns=ordered)
    table.columns.name = None
    return table.fillna("n/a")


def plot_heatmap_grid(
    per_method: Sequence[tuple[str, Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]]],
    path: str | Path,
    *,
    title: str | None = None,
) -> Path:
    """Rows = images; columns = image, lung mask, then each method's |LRP| heatmap of the same
    image. ``per_method``: ``[(method, [(image [H, W], mask [H, W], heatmap [H, W]), ...])]``
    with the same images in the same order for every method."""
    if not per_method or not per_method[0][1]:
        raise ValueError("plot_heatmap_grid needs at least one method with one example")
    n_img = min(len(ex) for _, ex in per_method)
    n_col = 2 + len(per_method)
    fig = _figure(1.9 * n_col, 1.9 * n_img + 0.9 + (0.4 if title else 0))
    axes = fig.subplots(n_img, n_col, squeeze=False)
    heat_image = None
    for r in range(n_img):
        image, mask, _ = per_method[0][1][r]
        panels = [("image", image, "gray", None), ("lung mask", mask, "gray", None)]
        for name, examples in per_method:
            heat = np.abs(examples[r][2])
            top = float(np.percentile(heat, 99.5)) or 1.0
            panels.append((name, np.clip(heat / top, 0, 1), "hot", examples[r][1]))
        for c, (name, arr, cmap, outline) in enumerate(panels):
            ax = axes[r, c]
            shown = ax.imshow(arr, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            if outline is not None and np.ptp(np.asarray(outline, dtype=float)) > 0:
                ax.contour(
                    np.asarray(outline, dtype=float), levels=[0.5], colors="#00bcd4", linewidths=0.7
                )
                heat_image = shown
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=8)
            if c == 0:
                ax.set_ylabel(f"image {r + 1}", fontsize=8)
    if heat_image is not None:
        bar = fig.colorbar(
            heat_image, ax=axes[:, 2:], orientation="horizontal", fraction=0.05, aspect=30, pad=0.02
        )
        bar.ax.tick_params(labelsize=7)
        # under the whole figure (a label under a one-column bar would be cut off)
        fig.supxlabel(
            "|LRP relevance| of the predicted class, scaled to each panel's\n"
            "99.5th percentile (cyan: lung mask outline)",
            fontsize=7,
        )
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def summarise_runs(
    results: pd.DataFrame, by: Sequence[str] = ("method", "dataset", "kind")
) -> pd.DataFrame:
    """One row per ``by`` group (e.g. over seeds and folds): the mean of every numeric column,
    plus ``n_runs``.

    The averaged ``*_ci_low`` / ``*_ci_high`` columns describe a typical single run's
    uncertainty, not the uncertainty of the mean over runs; say so where they are shown.
    """
    missing = [c for c in by if c not in results.columns]
    if missing:
        raise ValueError(f"results frame lacks column(s) {missing} to group by")
    numeric = [
        c
        for c in results.columns
        if c not in by and pd.api.types.is_numeric_dtype(results[c]) and c not in ("seed",)
    ]
    grouped = results.groupby(list(by), sort=False)
    out = grouped[numeric].mean()
    out["n_runs"] = grouped.size()
    return out.reset_index()


# ----------------------------------------------------------------------------- seeds, conclusion


def n_seeds(results: pd.DataFrame) -> int:
    """Distinct training seeds in ``results`` (1 without a ``seed`` column)."""
    return int(results["seed"].nunique()) if "seed" in results.columns else 1


def seed_summary(results: pd.DataFrame, metric: str = "auroc_macro") -> pd.DataFrame:
    """One row per (method, dataset, kind): ``mean``, ``sd`` (sample SD over seeds; NaN for one
    seed), ``min``, ``max``, ``n_seeds``, and ``ci_low``/``ci_high``: the patient-bootstrap 95%
    CI when there is one seed (NaN otherwise: a CI averaged over seeds is not a CI)."""
    lo, hi = _ci_columns(results, metric)
    frame = results.assign(_v=results[metric].astype(float), _lo=lo, _hi=hi)
    keys = ["method", "dataset", "kind"]
    g = frame.groupby(keys, sort=False)
    out = pd.DataFrame(
        {
            "mean": g["_v"].mean(),
            "sd": g["_v"].std(ddof=1),
            "min": g["_v"].min(),
            "max": g["_v"].max(),
            "n_seeds": g["_v"].count(),
            "ci_low": g["_lo"].first(),
            "ci_high": g["_hi"].first(),
        }
    ).reset_index()
    several = out["n_seeds"] > 1
    out.loc[several, ["ci_low", "ci_high"]] = np.nan
    return out


def format_seed_cell(row: pd.Series, digits: int = 2) -> str:
    """``"0.91 [0.87, 0.94]"`` for one seed; ``"0.91 ± 0.02 (0.89-0.93)"`` (mean ± SD
    (min-max) over seeds) for several."""
    if row["n_seeds"] <= 1:
        return format_ci(float(row["mean"]), float(row["ci_low"]), float(row["ci_high"]), digits)
    if math.isnan(float(row["mean"])):
        return "n/a"
    return (
        f"{row['mean']:.{digits}f} ± {row['sd']:.{digits}f} "
        f"({row['min']:.{digits}f}-{row['max']:.{digits}f})"
    )


def table_caption(results: pd.DataFrame, metric: str = "auroc_macro") -> str:
    """What the main table's cells are (one seed: a CI over patients; several: a spread over
    seeds)."""
    name = METRIC_LABELS.get(metric, metric)
    k = n_seeds(results)
    if k <= 1:
        seed = f" (seed {results['seed'].iloc[0]})" if "seed" in results.columns else ""
        return (
            f"{name}, 95% CI from a bootstrap over patients of one training run{seed}; "
            "training-to-training variation is not included."
        )
    seeds = ", ".join(str(s) for s in sorted(results["seed"].unique()))
    return (
        f"{name}: mean ± SD over {k} training seeds ({seeds}), (min-max) over seeds. "
        "Each seed's own 95% CIs (bootstrap over patients) are in the per-seed tables."
    )


def summary_table(results: pd.DataFrame, metric: str = "auroc_macro") -> pd.DataFrame:
    """Method x dataset table: CI cells for one seed, mean ± SD (min-max) for several."""
    _check_columns(results, [metric])
    summary = seed_summary(results, metric)
    summary["_cell"] = [format_seed_cell(r) for _, r in summary.iterrows()]
    summary["_col"] = [
        f"{d} ({k})" for d, k in zip(summary["dataset"], summary["kind"], strict=True)
    ]
    table = summary.pivot(index="method", columns="_col", values="_cell")
    ordered = [f"{d} ({k})" for d, k in _ordered_columns(results)]
    table = table.reindex(index=list(dict.fromkeys(results["method"])), columns=ordered)
    table.columns.name = None
    return table.fillna("n/a")


def _describe(summary: pd.DataFrame, method: str, dataset: str) -> str:
    row = summary[(summary["method"] == method) & (summary["dataset"] == dataset)].iloc[0]
    return format_seed_cell(row)


def _interval(row: pd.Series) -> tuple[float, float]:
    if row["n_seeds"] <= 1:
        return float(row["ci_low"]), float(row["ci_high"])
    return float(row["min"]), float(row["max"])


def study_conclusion(
    results: pd.DataFrame,
    paired: pd.DataFrame | None = None,
    *,
    metric: str = "auroc_macro",
    background: str = "background_share",
    shortcut_drop: float = 0.10,
) -> str:
    """A short plain-language paragraph of what the study found, from its numbers only: the
    best method on each dataset (and whether its lead is clear: intervals not overlapping), which
    methods took the shortcut (``metric`` falling by more than ``shortcut_drop`` from the biased
    to the confounding set, or from internal to external without bias sets), where the
    relevance lies, and the paired ISNet tests whose CI excludes 0.

    Args:
        results: one row per (method, dataset[, seed]) as :func:`write_report` takes.
        paired: :func:`paired_table`'s input (columns dataset, isnet, comparator, difference,
            ci_low, ci_high[, seed]).
    """
    summary = seed_summary(results, metric)
    name = METRIC_LABELS.get(metric, metric)
    k = n_seeds(results)
    spread = (
        "values with 95% CIs from a bootstrap over patients, one training run"
        if k <= 1
        else f"mean ± SD (min-max) over {k} training seeds"
    )
    sentences = [f"{name[0].upper() + name[1:]} ({spread})."]
    for dataset, kind in _ordered_columns(results):
        rows = summary[(summary["dataset"] == dataset) & (summary["kind"] == kind)]
        rows = rows.dropna(subset=["mean"]).sort_values("mean", ascending=False)
        if rows.empty:
            continue
        best = rows.iloc[0]
        text = f"On {dataset} ({kind}) the best is {best['method']}, {format_seed_cell(best)}"
        if len(rows) > 1:
            second = rows.iloc[1]
            clear = _interval(best)[0] > _interval(second)[1]
            text += f"; next {second['method']}, {format_seed_cell(second)}" + (
                " (clearly ahead)" if clear else " (the intervals overlap: no clear winner)"
            )
        sentences.append(text + ".")
    kinds = set(summary["kind"])
    pairs = [("biased", "confounding")] if {"biased", "confounding"} <= kinds else []
    if not pairs and {"internal", "external"} <= kinds:
        pairs = [("internal", "external")]
    for a, b in pairs:
        took, kept = [], []
        for method in dict.fromkeys(summary["method"]):
            rows = summary[summary["method"] == method]
            va = rows.loc[rows["kind"] == a, "mean"].mean()
            vb = rows.loc[rows["kind"] == b, "mean"].mean()
            if math.isnan(va) or math.isnan(vb):
                continue
            (took if va - vb > shortcut_drop else kept).append((method, va, vb))
        if took:
            listed = "; ".join(f"{m} {va:.2f} on {a} vs {vb:.2f} on {b}" for m, va, vb in took)
            verb = "took the shortcut" if a == "biased" else "did not generalise"
            sentences.append(
                f"{'These methods' if len(took) > 1 else 'This method'} {verb} "
                f"({name} falls by more than {shortcut_drop:.2f} from {a} to {b}): {listed}."
            )
        if kept:
            sentences.append(
                f"Within {shortcut_drop:.2f} from {a} to {b} (no shortcut seen): "
                + ", ".join(m for m, _, _ in kept)
                + "."
            )
    if background in results.columns:
        share = results.groupby("method", sort=False)[background].mean().dropna()
        if len(share):
            text = (
                f"Least relevance outside the lungs: {share.idxmin()} ({share.min():.2f} of |R|; "
                f"most: {share.idxmax()}, {share.max():.2f})"
            )
            if "background_share_chance" in results.columns:
                blind = float(results["background_share_chance"].mean())
                text += f"; a heatmap blind to the mask puts {blind:.2f} there"
            sentences.append(text + ".")
    if paired is not None and len(paired):
        sentences.append(_paired_sentence(paired))
    return " ".join(sentences)


def _paired_sentence(paired: pd.DataFrame) -> str:
    """The paired tests whose 95% CI excludes 0 in every seed (one clause per dataset and
    comparison), and those that do so only in some seeds."""
    clear, mixed = [], []
    for (dataset, a, b), g in paired.groupby(["dataset", "isnet", "comparator"], sort=False):
        above, below = (g["ci_low"] > 0), (g["ci_high"] < 0)
        if above.all() or below.all():
            word = "better" if above.all() else "worse"
            if len(g) == 1:
                r = g.iloc[0]
                diff = f"{r['difference']:+.2f} [{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]"
            else:
                diff = (
                    f"in all {len(g)} seeds, differences {g['difference'].min():+.2f} to "
                    f"{g['difference'].max():+.2f}"
                )
            clear.append(f"{a} {word} than {b} on {dataset} ({diff})")
        elif (above | below).any():
            mixed.append(f"{a} vs {b} on {dataset}")
    text = (
        "Paired tests whose 95% CI excludes 0"
        + (" in every seed: " if paired.get("seed", pd.Series([0])).nunique() > 1 else ": ")
        + ("; ".join(clear) if clear else "none")
        + "."
    )
    if mixed:
        text += " Excluding 0 in some seeds only (not a finding): " + "; ".join(mixed) + "."
    return text


def headline_metrics(results: pd.DataFrame, metric: str = "auroc_macro") -> dict[str, float]:
    """The study's headline as flat MLflow metrics for the parent run:
    ``<metric>.<method>.<dataset>`` with ``_lo``/``_hi`` (the bootstrap CI) for one seed; for
    several, the mean over seeds with ``_sd``, ``_min``, ``_max``, and each seed's value and CI as
    ``<metric>.<method>.<dataset>.seed<k>`` (``_lo``/``_hi``)."""
    import re

    def name(*parts: object) -> str:  # MLflow metric names: letters, digits, _ - . space : /
        return ".".join(re.sub(r"[^\w\-. :/]", "_", str(p)) for p in parts)

    summary = seed_summary(results, metric)
    out: dict[str, float] = {}
    for _, r in summary.iterrows():
        base = name(metric, r["method"], r["dataset"])
        out[base] = float(r["mean"])
        if r["n_seeds"] <= 1:
            out[f"{base}_lo"], out[f"{base}_hi"] = float(r["ci_low"]), float(r["ci_high"])
        else:
            out[f"{base}_sd"] = float(r["sd"])
            out[f"{base}_min"], out[f"{base}_max"] = float(r["min"]), float(r["max"])
    if n_seeds(results) > 1:
        lo, hi = _ci_columns(results, metric)
        for i, r in results.iterrows():
            base = name(metric, r["method"], r["dataset"], f"seed{r['seed']}")
            out[base] = float(r[metric])
            out[f"{base}_lo"], out[f"{base}_hi"] = float(lo[i]), float(hi[i])
    return {k: v for k, v in out.items() if not math.isnan(v)}


def paired_table(paired: pd.DataFrame) -> pd.DataFrame:
    """The paired tests as a narrow, readable table: dataset (kind), comparison, both AUROCs,
    the difference with its 95% CI, p; the fold and seed columns only when they vary."""
    rows = []
    folds = "fold" in paired.columns and paired["fold"].nunique() > 1
    seeds = "seed" in paired.columns and paired["seed"].nunique() > 1
    for _, r in paired.iterrows():
        row = {}
        if folds:
            row["fold"] = r["fold"]
        row["dataset"] = f"{r['dataset']} ({r['kind']})" if "kind" in r else r["dataset"]
        if seeds:
            row["seed"] = r["seed"]
        row["comparison"] = f"{r['isnet']} − {r['comparator']}"
        row["AUROC"] = f"{r['auroc_isnet']:.2f} vs {r['auroc_comparator']:.2f}"
        row["difference [95% CI]"] = (
            f"{r['difference']:+.2f} [{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]"
        )
        row["p"] = f"{r['p_value']:.3f}"
        rows.append(row)
    return pd.DataFrame(rows)


def markdown_table(table: pd.DataFrame, index_name: str = "method") -> str:
    """A GitHub-style Markdown table (one row per index entry)."""

    def esc(x: object) -> str:
        return str(x).replace("|", "\\|")

    header = [index_name, *table.columns]
    lines = [
        "| " + " | ".join(esc(h) for h in header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for idx, row in table.iterrows():
        lines.append("| " + " | ".join(esc(x) for x in [idx, *row.tolist()]) + " |")
    return "\n".join(lines)


def _html_table(table: pd.DataFrame, index_name: str = "method") -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in [index_name, *table.columns])
    body = []
    for idx, row in table.iterrows():
        cells = "".join(f"<td>{html.escape(str(v))}</td>" for v in row.tolist())
        body.append(f"<tr><th scope='row'>{html.escape(str(idx))}</th>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _img(path: Path, caption: str) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"report figure {caption!r}: {path} does not exist")
    suffix = path.suffix.lower().lstrip(".")
    mime = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "svg": "image/svg+xml"}
    if suffix not in mime:
        raise ValueError(f"report figure {path}: use PNG, JPEG or SVG, not .{suffix}")
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    cap = html.escape(caption)
    return (
        f"<figure><img alt='{cap}' src='data:{mime[suffix]};base64,{data}'>"
        f"<figcaption>{cap}</figcaption></figure>"
    )


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2rem auto;max-width:1100px;
color:#222;padding:0 1rem;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem;
border-bottom:1px solid #ddd;padding-bottom:.2rem}
.meta{color:#666;font-size:.9rem}pre{background:#f6f6f6;padding:.6rem;overflow-x:auto;
font-size:.85rem;white-space:pre-wrap}
table{border-collapse:collapse;margin:.6rem 0;font-size:.92rem;max-width:100%}
th,td{border:1px solid #ccc;padding:.3rem .6rem;text-align:left;overflow-wrap:anywhere}
thead th{background:#f0f0f0}.conclusion{background:#f4f8fb;border-left:4px solid #1f77b4;
padding:.6rem .8rem}
tbody th{background:#fafafa}figure{margin:1rem 0}img{max-width:100%;height:auto;
border:1px solid #eee}figcaption{color:#555;font-size:.88rem}
"""


def write_report(
    results: pd.DataFrame,
    out_dir: str | Path,
    *,
    figures: Mapping[str, str | Path] | None = None,
    title: str = "Cross-dataset study",
    command: str | None = None,
    metric: str = "auroc_macro",
    extra_metrics: Sequence[str] = ("balanced_accuracy", "f1_macro", "ece"),
    background: str = "background_relevance",
    extra_tables: Mapping[str, pd.DataFrame] | None = None,
    conclusion: str | None = None,
) -> tuple[Path, str]:
    """Write ``<out_dir>/report.html`` (self-contained) and return it with the Markdown table.

    Args:
        results: one row per (method, dataset), or per (method, dataset, seed) with a ``seed``
            column; see the module docstring.
        figures: caption -> image file to embed (e.g. ROC curves per external dataset made with
            :func:`plot_roc`, the heatmap grid).
        title: report title; command: the command that produced the results (shown verbatim).
        metric: the main table's metric; extra_metrics: further tables (those present).
        background: column with the share of relevance outside the lungs (table + bar plot
            when present).
        extra_tables: heading -> a plain table shown as is (e.g. :func:`paired_table`).
        conclusion: the "what this study found" paragraph (default: :func:`study_conclusion`
            of ``results``).

    Returns:
        ``(html_path, markdown)`` where ``markdown`` is the main table, one row per method
        (what its cells are: :func:`table_caption`).
    """
    keys = ["method", "dataset", "kind"] + (["seed"] if "seed" in results.columns else [])
    _check_columns(results, [metric])
    dup = results.duplicated(keys)
    if dup.any():
        first = results.loc[dup, keys].iloc[0].tolist()
        raise ValueError(
            f"results frame has several rows for {keys} {first}; aggregate folds (and seeds, "
            "or give a seed column) first, e.g. with summarise_runs, so there is one row each."
        )
    out = Path(out_dir)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    k = n_seeds(results)
    averaged = summarise_runs(results) if "seed" in results.columns else results
    main = summary_table(results, metric)
    md = markdown_table(main)
    caption = table_caption(results, metric)
    if conclusion is None:
        conclusion = study_conclusion(results, metric=metric, background=background)

    parts = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='meta'>Generated {datetime.now().strftime('%Y-%m-%d %H:%M')}. "
        f"{results['method'].nunique()} method(s), {results['dataset'].nunique()} dataset(s), "
        f"{k} training seed(s).</p>",
        "<h2>What this study found</h2>",
        f"<p class='conclusion'>{html.escape(conclusion)}</p>",
    ]
    if command:
        parts.append(f"<pre>{html.escape(command)}</pre>")
    parts += [
        f"<h2>{html.escape(METRIC_LABELS.get(metric, metric))}</h2>",
        f"<p class='meta'>{html.escape(caption)}</p>",
        _html_table(main),
    ]
    vs = plot_internal_vs_external(averaged, fig_dir / "internal_vs_external.png", metric=metric)
    cap = "Internal vs external performance per method"
    if k > 1:
        cap += f" (mean over {k} seeds; error bars: the mean of the seeds' CIs, a typical run's)"
    parts.append(_img(vs, cap))
    if k > 1:
        for seed in sorted(results["seed"].unique()):
            one = results[results["seed"] == seed]
            parts += [
                f"<h3>{html.escape(METRIC_LABELS.get(metric, metric))}, seed {seed} "
                "(95% CI from a bootstrap over patients)</h3>",
                _html_table(metric_table(one, metric)),
            ]

    for extra in extra_metrics:
        if extra in results.columns and extra != metric:
            parts += [
                f"<h2>{html.escape(METRIC_LABELS.get(extra, extra))}</h2>",
                _html_table(summary_table(results, extra)),
            ]
    if background in results.columns:
        bg = results.dropna(subset=[background])
        if len(bg):
            parts += [
                f"<h2>{html.escape(METRIC_LABELS['background_relevance'])}</h2>",
                _html_table(summary_table(bg, background)),
                _img(
                    plot_background_share(
                        averaged.dropna(subset=[background]),
                        fig_dir / "background_share.png",
                        column=background,
                    ),
                    "Share of |relevance| outside the lungs per method",
                ),
            ]
    for heading, frame in (extra_tables or {}).items():
        shown = frame.round(3).reset_index(drop=True)
        shown.index = shown.index + 1
        parts += [f"<h2>{html.escape(heading)}</h2>", _html_table(shown, index_name="#")]
    if figures:
        parts.append("<h2>Figures</h2>")
        parts += [_img(Path(p), str(caption)) for caption, p in figures.items()]

    doc = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        + "\n".join(parts)
        + "</body></html>\n"
    )
    html_path = out / "report.html"
    html_path.write_text(doc, encoding="utf-8")
    (out / "report.md").write_text(
        f"# {title}\n\n## What this study found\n\n{conclusion}\n\n{caption}\n\n{md}\n",
        encoding="utf-8",
    )
    return html_path, md
