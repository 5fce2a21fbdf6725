"""The study report: self-contained HTML, Markdown table, plotting helpers."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from evaluation.metrics import evaluate
from evaluation.report import (
    format_ci,
    metric_table,
    plot_confusion,
    plot_internal_vs_external,
    plot_roc,
    summarise_runs,
    write_report,
)

CLASSES = ["normal", "pneumonia", "covid"]
METHODS = {"standard": 0.6, "segment-then-classify": 1.2, "isnet": 1.8}
DATASETS = {"siteA": "internal", "siteB": "internal", "siteC": "external", "siteD": "external"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _predictions(signal: float, n: int, seed: int):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), labels] += signal
    return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True), labels


def _results() -> tuple[pd.DataFrame, dict]:
    rows, preds = [], {}
    for m, (method, signal) in enumerate(METHODS.items()):
        for d, (dataset, kind) in enumerate(DATASETS.items()):
            s = signal if kind == "internal" else signal * 0.6  # the generalisation gap
            probs, labels = _predictions(s, 60, seed=d)  # same labels per dataset
            preds.setdefault(dataset, ({}, labels))[0][method] = probs
            r = evaluate(probs, labels, np.arange(60) // 2, CLASSES, n_boot=50, seed=m)
            rows.append(
                {
                    "method": method,
                    "dataset": dataset,
                    "kind": kind,
                    **r.as_dict(),
                    "background_relevance": 0.5 / (1 + m) + 0.02 * d,
                }
            )
    return pd.DataFrame(rows), preds


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def test_report_is_self_contained_and_complete(tmp_path):
    results, preds = _results()
    figures = {}
    for dataset, kind in DATASETS.items():
        if kind == "external":
            by_method, labels = preds[dataset]
            path = plot_roc(by_method, labels, CLASSES, tmp_path / f"roc_{dataset}.png")
            figures[f"ROC curves on {dataset} (external)"] = path
    heatmaps = plot_confusion(np.array([0, 1, 2]), np.array([0, 2, 2]), CLASSES, tmp_path / "h.png")
    figures["Heatmap grid"] = heatmaps
    command = "isnet-cxr study run --config study.json --seed 0"

    html_path, md = write_report(
        results, tmp_path / "report", figures=figures, title="Site shift", command=command
    )

    doc = html_path.read_text(encoding="utf-8")
    parser = _Collect()
    parser.feed(doc)
    parser.close()
    text = " ".join(parser.text)
    for name in [*METHODS, *DATASETS, "Site shift", command]:
        assert name in text, name
    imgs = [attrs for tag, attrs in parser.tags if tag == "img"]
    # internal-vs-external + background share + 2 ROC + heatmap grid
    assert len(imgs) == 5
    for attrs in imgs:
        assert attrs["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(attrs["src"].split(",", 1)[1])[:8] == PNG_MAGIC
    external = [
        (tag, a)
        for tag, a in parser.tags
        if tag in ("script", "link", "iframe") or ("src" in a and not a["src"].startswith("data:"))
    ]
    assert external == []
    # main table: one row per method, a "v [lo, hi]" cell per dataset
    cells = re.findall(r"<td>([^<]*)</td>", doc)
    ci = re.compile(r"^\d\.\d\d \[\d\.\d\d, \d\.\d\d\]$")
    assert sum(bool(ci.match(c)) for c in cells) >= len(METHODS) * len(DATASETS)
    lines = md.strip().splitlines()
    assert len(lines) == 2 + len(METHODS)
    assert lines[0].startswith("| method | siteA (internal) | siteB (internal) | siteC (external)")
    for line, method in zip(lines[2:], METHODS, strict=True):
        assert line.startswith(f"| {method} |")
        assert len(re.findall(r"\d\.\d\d \[\d\.\d\d, \d\.\d\d\]", line)) == len(DATASETS)
    row = results[(results.method == "isnet") & (results.dataset == "siteC")].iloc[0]
    expected = format_ci(row.auroc_macro, row.auroc_macro_ci_low, row.auroc_macro_ci_high)
    assert expected in lines[-1]
    assert (tmp_path / "report" / "report.md").read_text().count("\n| ") == 1 + len(METHODS)


def test_table_orders_datasets_by_kind_and_handles_missing_cells(tmp_path):
    results, _ = _results()
    results = results.sample(frac=1.0, random_state=0)  # order must not depend on row order
    results = results[~((results.method == "isnet") & (results.dataset == "siteD"))]
    table = metric_table(results, "auroc_macro")
    assert list(table.columns) == [f"{d} ({k})" for d, k in DATASETS.items()]
    assert table.loc["isnet", "siteD (external)"] == "n/a"
    # an undefined metric (e.g. a class absent from a dataset) reads "n/a" and does not break
    results.loc[results.index[0], ["auroc_macro", "auroc_macro_ci_low"]] = np.nan
    html_path, md = write_report(results, tmp_path / "r")
    assert "n/a" in md and html_path.stat().st_size > 10_000
    assert format_ci(0.912, 0.871, 0.944) == "0.91 [0.87, 0.94]"
    assert format_ci(float("nan"), 0.1, 0.2) == "n/a"
    assert format_ci(0.5, float("nan"), float("nan")) == "0.50"


def test_plots_write_pngs_and_bad_frames_are_refused(tmp_path):
    results, preds = _results()
    path = plot_internal_vs_external(results, tmp_path / "vs.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    by_method, labels = preds["siteC"]
    roc = plot_roc(by_method, labels, CLASSES, tmp_path / "roc.png", title="siteC")
    assert roc.stat().st_size > 10_000
    with pytest.raises(ValueError, match="aggregate folds"):
        write_report(pd.concat([results, results.iloc[:1]]), tmp_path / "r")
    # several seeds -> one row per (method, dataset, kind), averaged, with the run count
    seeds = pd.concat([results.assign(seed=0), results.assign(seed=1, auroc_macro=0.5)])
    summary = summarise_runs(seeds)
    assert len(summary) == len(results) and (summary["n_runs"] == 2).all()
    np.testing.assert_allclose(summary["auroc_macro"], (results["auroc_macro"] + 0.5) / 2)
    assert "seed" not in summary.columns
    # the same site as internal (one fold) and external (another) gives two columns
    loso = pd.concat([results, results[results.dataset == "siteC"].assign(kind="internal")])
    assert "siteC (internal)" in metric_table(loso).columns
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['kind'\]"):
        write_report(results.drop(columns="kind"), tmp_path / "r")
    with pytest.raises(FileNotFoundError, match="heatmaps"):
        write_report(results, tmp_path / "r", figures={"heatmaps": tmp_path / "missing.png"})


# ----------------------------------------------------------------------------- issue 10


def _bias_results(seeds=(0,)) -> pd.DataFrame:
    """Two methods on the five kinds of set: ``standard`` takes the shortcut (good on biased,
    bad on confounding), ``isnet`` is the same everywhere; per seed, with bootstrap CIs."""
    rows = []
    values = {
        "standard": {
            "internal": 0.97,
            "biased": 0.99,
            "unbiased": 0.89,
            "confounding": 0.65,
            "external": 0.85,
        },
        "isnet": {
            "internal": 0.82,
            "biased": 0.82,
            "unbiased": 0.82,
            "confounding": 0.82,
            "external": 0.83,
        },
    }
    for seed in seeds:
        for method, by_kind in values.items():
            for kind, v in by_kind.items():
                v = v + 0.01 * seed
                rows.append(
                    {
                        "method": method,
                        "seed": seed,
                        "kind": kind,
                        "dataset": "internal-test" if kind == "internal" else f"site-{kind}",
                        "auroc_macro": v,
                        "auroc_macro_ci_low": v - 0.03,
                        "auroc_macro_ci_high": min(v + 0.03, 1.0),
                        "background_share": 0.7 if method == "standard" else 0.06,
                        "background_share_chance": 0.8,
                    }
                )
    return pd.DataFrame(rows)


def test_report_says_in_plain_words_what_the_study_found(tmp_path):
    from evaluation.report import paired_table, study_conclusion

    results = _bias_results()
    paired = pd.DataFrame(
        [
            {
                "fold": "main",
                "dataset": "site-confounding",
                "kind": "confounding",
                "seed": 0,
                "isnet": "isnet",
                "comparator": "standard",
                "auroc_isnet": 0.82,
                "auroc_comparator": 0.65,
                "difference": 0.17,
                "ci_low": 0.13,
                "ci_high": 0.20,
                "p_value": 0.002,
            }
        ]
    )
    text = study_conclusion(results, paired)
    assert "On site-external (external) the best is standard, 0.85 [0.82, 0.88]" in text
    assert "On site-confounding (confounding) the best is isnet, 0.82 [0.79, 0.85]" in text
    assert "took the shortcut" in text and "standard 0.99 on biased vs 0.65 on confounding" in text
    assert "Least relevance outside the lungs: isnet (0.06" in text
    assert "isnet better than standard on site-confounding (+0.17 [+0.13, +0.20])" in text
    table = paired_table(paired)
    # readable: no fold/seed columns when they do not vary, the CI in one cell
    assert list(table.columns) == ["dataset", "comparison", "AUROC", "difference [95% CI]", "p"]
    assert table.iloc[0]["difference [95% CI]"] == "+0.17 [+0.13, +0.20]"
    html_path, _ = write_report(
        results,
        tmp_path,
        background="background_share",
        extra_tables={"Paired": table},
        conclusion=text,
    )
    doc = html_path.read_text()
    assert "What this study found" in doc and "took the shortcut" in doc
    assert doc.index("What this study found") < doc.index("<table>")
    assert "positive relevance" not in doc
    assert "What this study found" in (tmp_path / "report.md").read_text()


def test_several_seeds_show_spread_over_seeds_not_averaged_cis(tmp_path):
    from evaluation.report import headline_metrics, summary_table, table_caption

    results = _bias_results(seeds=(0, 1))
    caption = table_caption(results)
    assert "mean ± SD over 2 training seeds (0, 1)" in caption
    assert "95% CI from a bootstrap" not in caption.split(".")[0]
    cell = summary_table(results).loc["standard", "site-biased (biased)"]
    assert cell == "0.99 ± 0.01 (0.99-1.00)"  # mean ± SD (min-max) over seeds, not a CI
    html_path, md = write_report(results, tmp_path, background="background_share")
    doc = html_path.read_text()
    assert "seed 0 (95% CI from a bootstrap over patients)" in doc
    assert "seed 1 (95% CI from a bootstrap over patients)" in doc
    assert "±" in md
    one = headline_metrics(_bias_results())
    assert one["auroc_macro.isnet.site-external"] == pytest.approx(0.83)
    assert one["auroc_macro.isnet.site-external_lo"] == pytest.approx(0.80)
    two = headline_metrics(results)
    assert two["auroc_macro.isnet.site-external"] == pytest.approx(0.835)
    assert "auroc_macro.isnet.site-external_sd" in two
    assert two["auroc_macro.isnet.site-external.seed1_hi"] == pytest.approx(0.87)
    assert "auroc_macro.isnet.site-external_lo" not in two


def test_heatmap_grid_has_a_colour_scale(tmp_path):
    from evaluation.report import plot_heatmap_grid

    rng = np.random.default_rng(0)
    mask = np.zeros((16, 16), bool)
    mask[4:12, 3:13] = True
    ex = [(rng.random((16, 16)), mask, rng.normal(size=(16, 16))) for _ in range(2)]
    plain = plot_heatmap_grid([("a", ex)], tmp_path / "g.png")
    from PIL import Image

    w, h = Image.open(plain).size
    assert h > w * 0.6  # two image rows plus the horizontal colour bar and its label
