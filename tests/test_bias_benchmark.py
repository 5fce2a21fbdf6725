"""The bias benchmark's metrics and its paired comparison against the bias-free reference."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bias_experiment import macro_auroc, paired_comparison  # noqa: E402
from marker_relevance_audit import audit  # noqa: E402

KINDS = ("biased", "unbiased", "confounding")


def _probs(rng: np.random.Generator, labels: np.ndarray, signal: float) -> np.ndarray:
    logits = rng.normal(size=(len(labels), 3)) + signal * np.eye(3)[labels]
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def _run(seed: int, labels: np.ndarray, signal: float) -> dict:
    rng = np.random.default_rng(seed + int(signal * 100))
    return {
        "seed": seed,
        **{
            k: {"probs": _probs(rng, labels, signal).tolist(), "labels": labels.tolist()}
            for k in KINDS
        },
    }


def test_macro_auroc_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 60)
    probs = _probs(rng, labels, 1.0).round(2)  # rounding makes ties
    expected = np.mean([roc_auc_score(labels == c, probs[:, c]) for c in range(3)])
    assert macro_auroc(probs, labels) == pytest.approx(expected, abs=1e-12)


def test_paired_comparison_signs_and_identity() -> None:
    labels = np.arange(90) % 3
    good = [_run(s, labels, 3.0) for s in (0, 1)]
    weak = [_run(s, labels, 0.5) for s in (0, 1, 2)]
    cmp = paired_comparison(good, weak, KINDS, n_boot=200)
    assert cmp["seeds"] == [0, 1]  # only the common seeds are paired
    for k in KINDS:
        lo, hi = cmp[f"{k}_auroc"]["ci95"]
        assert cmp[f"{k}_auroc"]["diff"] > 0.2 and 0 < lo <= hi
    same = paired_comparison(weak, weak, KINDS, n_boot=50)
    assert same["unbiased_bacc"] == {"diff": 0.0, "seed_std": 0.0, "ci95": [0.0, 0.0]}
    with pytest.raises(ValueError, match="no common seeds"):
        paired_comparison(good, [_run(5, labels, 1.0)], KINDS)


def _conv1x1(w: float, b: float) -> nn.Conv2d:
    conv = nn.Conv2d(1, 1, 1)
    conv.weight.data.fill_(w)
    conv.bias.data.fill_(b)
    return conv


def _head(*w: float) -> nn.Sequential:
    linear = nn.Linear(1, 3, bias=False)
    linear.weight.data = torch.tensor(w).view(3, 1)
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), linear)


def test_marker_audit_tells_an_added_marker_from_one_hidden_in_a_bias() -> None:
    """A marker that adds to the logit like any pixel is fully on the marker (captured 1); one
    that switches off a unit carrying its evidence in its bias reaches no pixel (captured 0)."""
    g = torch.Generator().manual_seed(0)
    lungs = torch.zeros(6, 1, 8, 8)
    lungs[..., 2:6, 1:4] = 1
    marker = torch.zeros(6, 1, 8, 8)
    marker[..., 0:2, 6:8] = 1
    x_u = torch.rand(6, 1, 8, 8, generator=g) * 0.5 * lungs
    sets = {
        "x_u": x_u,
        "x_c": x_u + 0.9 * marker,
        "lungs": lungs,
        "marker": marker,
        "marker_class": torch.full((6,), 2),
    }
    added = nn.Sequential(_conv1x1(1.0, 0.0), nn.ReLU(), _head(1.0, 2.0, 3.0))
    a = audit(added, sets)
    assert a["effect"] == pytest.approx(3 * 0.9 * 4 / 64, rel=1e-5)
    assert a["captured"] == pytest.approx(1.0, abs=1e-4)
    assert abs(a["no_pixel"]) < 1e-5 and a["dR_lungs"] == pytest.approx(0.0, abs=1e-6)
    # empty background switches the second unit on through its bias alone (-3 to class 2); the
    # marker switches it off: the logit rises, but no pixel carried the evidence either way
    hidden = nn.Sequential(
        _conv1x1(1.0, 0.0), nn.ReLU(), _conv1x1(-10.0, 1.0), nn.ReLU(), _head(0.0, 0.0, -3.0)
    )
    h = audit(hidden, sets)
    assert h["effect"] == pytest.approx(3 * 4 / 64, rel=1e-5)
    assert abs(h["captured"]) < 1e-3
    assert h["no_pixel"] == pytest.approx(h["effect"], rel=1e-3)


def test_site_shift_variants_keep_the_patients_and_change_one_setting() -> None:
    """benchmarks/site_shift_factors.py: every variant of the external site renders the same
    patient (same lungs, same label stream) as the site itself; ``as is`` gives its very pixels,
    the gamma variant differs from it in the gamma alone and so in the pixels."""
    from dataclasses import asdict

    from site_shift_factors import FACTORS, variants

    from synthetic import portable_site, render_case
    from synthetic.sites import default_sites, image_seed

    site, like = portable_site(), default_sites()[2]
    sets = variants(site, like)
    assert list(sets) == ["as is", *(f"{f} of {like.name}" for f in FACTORS), f"all of {like.name}"]
    fields = set(asdict(site)) - {"name", "seed_key"}
    for label, variant in sets.items():
        changed = {k for k in fields if getattr(variant, k) != getattr(site, k)}
        factor = label.split(" of ")[0]
        if factor in FACTORS:
            assert changed == set(FACTORS[factor])
        assert variant.key == site.key
    cases = {
        label: render_case(v, "pneumonia", image_seed(0, v, 3), size=64, difficulty=0.0)
        for label, v in sets.items()
    }
    own = render_case(site, "pneumonia", image_seed(0, site, 3), size=64, difficulty=0.0)
    assert np.array_equal(cases["as is"].stored, own.stored)
    gamma = cases[f"gamma of {like.name}"]
    assert np.array_equal(gamma.mask, own.mask) and not np.array_equal(gamma.stored, own.stored)


def test_seed_summary_tables_order_isnets_and_datasets_and_count_ci_sides():
    """study_seed_summary's per-seed and pooled tables: one row per (ISNet, dataset) in the
    study's order, one column per comparator; the per-seed cell counts CIs below/above 0."""
    import pandas as pd
    from study_seed_summary import paired_table, pooled_table

    rows = [
        {"isnet": "isnet", "dataset": d, "comparator": "standard", "seed": s,
         "difference": 0.1, "ci_low": 0.05 if s else -0.01, "ci_high": 0.2}
        for d in ("hospital-e", "hospital-c") for s in (0, 1, 2)
    ]  # fmt: skip
    per_seed = paired_table(pd.DataFrame(rows))
    assert list(per_seed.index) == ["isnet, hospital-c", "isnet, hospital-e"]
    assert per_seed.loc["isnet, hospital-e", "standard"] == (
        "+0.100 +- 0.000 (0 below 0, 2 above, of 3)"
    )
    pooled = pd.DataFrame(
        [{"isnet": "isnet", "dataset": "hospital-d", "comparator": "standard", "n_seeds": 3,
          "difference": 0.0861, "ci_low": 0.0571, "ci_high": 0.1131}]
    )  # fmt: skip
    assert pooled_table(pooled).loc["isnet, hospital-d", "standard"] == "+0.086 [+0.057, +0.113]"
