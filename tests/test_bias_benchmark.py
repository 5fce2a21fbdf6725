"""The bias benchmark's metrics and its paired comparison against the bias-free reference."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bias_experiment import macro_auroc, paired_comparison  # noqa: E402

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
