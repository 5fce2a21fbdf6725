"""Metrics and patient-level bootstrap CIs, checked against hand answers and brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from evaluation.metrics import (
    compute_metrics,
    evaluate,
    metric_names,
    paired_bootstrap,
    paired_bootstrap_seeds,
    patient_bootstrap_weights,
    roc_curve,
)

CLASSES = ["normal", "pneumonia", "covid"]


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _brute_auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Pairwise count: P(score_pos > score_neg) + 1/2 P(tie)."""
    pos, neg = scores[positives], scores[~positives]
    total = 0.0
    for a, b in itertools.product(pos, neg):
        total += 1.0 if a > b else 0.5 if a == b else 0.0
    return total / (pos.size * neg.size)


def _noisy_probs(rng: np.random.Generator, labels: np.ndarray, k: int, signal: float, decimals=1):
    logits = rng.normal(size=(labels.size, k))
    logits[np.arange(labels.size), labels] += signal
    return _softmax(np.round(logits, decimals))  # rounding creates many ties


def test_auroc_matches_brute_force_pairwise_count_with_ties(rng):
    labels = rng.integers(0, 3, 150)
    probs = _noisy_probs(rng, labels, 3, signal=0.8, decimals=0)
    m = compute_metrics(probs, labels, CLASSES)
    expected = [_brute_auroc(probs[:, c], labels == c) for c in range(3)]
    assert len(np.unique(probs[:, 0])) < 100  # ties present
    for c, name in enumerate(CLASSES):
        assert m[f"auroc_{name}"] == pytest.approx(expected[c], abs=1e-12)
    assert m["auroc_macro"] == pytest.approx(np.mean(expected), abs=1e-12)


def test_auroc_hand_example():
    # positives scores 0.9, 0.6, 0.4 ; negatives 0.7, 0.4, 0.1
    # pairs: 0.9 beats all 3; 0.6 beats 0.4,0.1 (2); 0.4 ties 0.4 (0.5) beats 0.1 (1) -> 6.5 / 9
    s = np.array([0.9, 0.6, 0.4, 0.7, 0.4, 0.1])
    y = np.array([1, 1, 1, 0, 0, 0])
    probs = np.stack([1 - s, s], axis=1)
    m = compute_metrics(probs, y, ["neg", "pos"])
    assert m["auroc_pos"] == pytest.approx(6.5 / 9)
    assert m["auroc_neg"] == pytest.approx(6.5 / 9)  # OvR on 1-s with roles swapped
    fpr, tpr = roc_curve(s, y == 1)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.trapezoid(tpr, fpr) == pytest.approx(6.5 / 9)  # the curve integrates to the AUROC


def test_perfect_separation_gives_auroc_one_with_degenerate_ci(rng):
    labels = np.repeat(np.arange(3), 20)
    probs = np.full((60, 3), 0.1)
    probs[np.arange(60), labels] = 0.8
    groups = np.arange(60) // 2  # 2 images per patient, same class
    r = evaluate(probs, labels, groups, CLASSES, n_boot=300, seed=1)
    for name in ["auroc_macro", "accuracy", "balanced_accuracy", "f1_macro"]:
        assert r[name].value == 1.0
        assert (r[name].ci_low, r[name].ci_high) == (1.0, 1.0)
    assert r.n_patients == 30 and r.n_images == 60


def test_f1_balanced_accuracy_sensitivity_specificity_hand_example():
    # true:  0 0 0 0 1 1 2 2 2 2
    # pred:  0 0 1 2 1 0 2 2 2 1
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    pred = np.array([0, 0, 1, 2, 1, 0, 2, 2, 2, 1])
    probs = np.full((10, 3), 0.2)
    probs[np.arange(10), pred] = 0.6
    m = compute_metrics(probs, labels, CLASSES)
    # class 0: TP2 FP1 FN2 -> F1 4/7, sens 2/4, spec 5/6
    # class 1: TP1 FP2 FN1 -> F1 2/5, sens 1/2, spec 6/8
    # class 2: TP3 FP1 FN1 -> F1 6/8, sens 3/4, spec 5/6
    assert m["f1_macro"] == pytest.approx((4 / 7 + 2 / 5 + 6 / 8) / 3)
    assert m["balanced_accuracy"] == pytest.approx((2 / 4 + 1 / 2 + 3 / 4) / 3)
    assert m["accuracy"] == pytest.approx(6 / 10)
    assert m["sensitivity_normal"] == pytest.approx(0.5)
    assert m["specificity_normal"] == pytest.approx(5 / 6)
    assert m["specificity_pneumonia"] == pytest.approx(6 / 8)
    assert m["sensitivity_covid"] == pytest.approx(3 / 4)


def test_ece_hand_example():
    # conf 0.95 (bin 15), 0.95, 0.55 (bin 9), 0.55 ; correct: yes, no, yes, yes
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.45, 0.55]])
    labels = np.array([0, 1, 0, 1])
    m = compute_metrics(probs, labels, ["a", "b"])
    # bin 0.95: acc 0.5 conf 0.95 -> 2/4*0.45 ; bin 0.55: acc 1 conf .55 -> 2/4*0.45
    assert m["ece"] == pytest.approx(0.5 * 0.45 + 0.5 * 0.45)
    # perfectly calibrated within a bin: half right at confidence 0.5+ -> small
    probs2 = np.array([[0.7, 0.3]] * 10)
    labels2 = np.array([0] * 7 + [1] * 3)
    assert compute_metrics(probs2, labels2, ["a", "b"])["ece"] == pytest.approx(0.0, abs=1e-12)


def test_bootstrap_ci_of_a_mean_covers_truth_with_the_expected_width():
    rng = np.random.default_rng(3)
    n, sigma, mu = 400, 2.0, 5.0
    x = rng.normal(mu, sigma, n)
    weights = np.concatenate(
        list(patient_bootstrap_weights(None, 2000, np.random.default_rng(4), n_images=n))
    )
    means = weights @ x / weights.sum(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    assert lo < mu < hi
    assert hi - lo == pytest.approx(2 * 1.96 * sigma / np.sqrt(n), rel=0.12)
    # the same for a metric: accuracy of a classifier that is right with probability 0.8
    labels = rng.integers(0, 2, n)
    right = rng.random(n) < 0.8
    pred = np.where(right, labels, 1 - labels)
    probs = np.where(pred[:, None] == np.arange(2), 0.9, 0.1)
    r = evaluate(probs, labels, np.arange(n), ["a", "b"], n_boot=2000, seed=5)
    acc = r["accuracy"]
    assert acc.ci_low < 0.8 < acc.ci_high
    p = acc.value
    assert acc.ci_high - acc.ci_low == pytest.approx(2 * 1.96 * np.sqrt(p * (1 - p) / n), rel=0.12)


def test_bootstrap_resamples_patients_not_images(rng):
    n_pat = 150
    labels = rng.integers(0, 3, n_pat)
    probs = _noisy_probs(rng, labels, 3, signal=1.0, decimals=3)
    one = evaluate(probs, labels, np.arange(n_pat), CLASSES, n_boot=400, seed=7)
    rep = 10
    probs10, labels10 = np.repeat(probs, rep, axis=0), np.repeat(labels, rep)
    patients10 = np.repeat(np.arange(n_pat), rep)
    grouped = evaluate(probs10, labels10, patients10, CLASSES, n_boot=400, seed=7)
    naive = evaluate(probs10, labels10, None, CLASSES, n_boot=400, seed=7)
    for name in ["auroc_macro", "accuracy", "balanced_accuracy"]:
        w1 = one[name].ci_high - one[name].ci_low
        wg = grouped[name].ci_high - grouped[name].ci_low
        wn = naive[name].ci_high - naive[name].ci_low
        assert grouped[name].value == pytest.approx(one[name].value)
        assert wg == pytest.approx(w1, rel=0.15), name  # duplicates add no information
        assert wn < 0.5 * w1, name  # images as independent: ~1/sqrt(10) too narrow


def test_absent_class_in_resample_gives_nan_and_is_counted():
    # 1 covid patient out of 40: about (39/40)^40 = 36 % of resamples lack covid
    labels = np.array([0] * 20 + [1] * 19 + [2])
    rng = np.random.default_rng(0)
    probs = _noisy_probs(rng, labels, 3, signal=1.5, decimals=3)
    r = evaluate(probs, labels, np.arange(40), CLASSES, n_boot=500, seed=2)
    dropped = r.dropped()
    assert 0.25 * 500 < dropped["auroc_covid"] < 0.5 * 500
    assert dropped["auroc_macro"] == dropped["auroc_covid"]
    assert dropped["auroc_normal"] == 0
    assert np.isfinite(r["auroc_macro"].ci_low) and np.isfinite(r["auroc_covid"].ci_high)
    # a class absent from the whole set: NaN AUROC for it, macro over the others
    labels2 = np.array([0] * 20 + [1] * 20)
    probs2 = _noisy_probs(rng, labels2, 3, signal=1.5, decimals=3)
    m = compute_metrics(probs2, labels2, CLASSES)
    assert np.isnan(m["auroc_covid"]) and np.isnan(m["sensitivity_covid"])
    assert m["auroc_macro"] == pytest.approx((m["auroc_normal"] + m["auroc_pneumonia"]) / 2)


def test_result_names_are_stable_and_seeded(rng):
    labels = rng.integers(0, 3, 60)
    probs = _noisy_probs(rng, labels, 3, signal=1.0)
    a = evaluate(probs, labels, np.arange(60) // 3, CLASSES, n_boot=50, seed=11)
    b = evaluate(probs, labels, np.arange(60) // 3, CLASSES, n_boot=50, seed=11)
    assert list(a.estimates) == metric_names(CLASSES)
    assert a.as_dict() == b.as_dict()
    keys = list(a.as_dict())
    assert "auroc_macro_ci_low" in keys and "specificity_covid_ci_high" in keys
    assert len(keys) == 3 * len(metric_names(CLASSES))
    with_dropped = a.as_dict(include_dropped=True)
    assert with_dropped["auroc_covid_boot_dropped"] == a["auroc_covid"].n_dropped
    # a different subset of the data gives the same metric names
    sub = evaluate(probs[:30], labels[:30], None, CLASSES, n_boot=10)
    assert list(sub.as_dict()) == keys


def test_paired_bootstrap_detects_a_real_difference_and_not_a_null_one(rng):
    n = 200
    labels = rng.integers(0, 3, n)
    good = _noisy_probs(rng, labels, 3, signal=2.0, decimals=3)
    bad = _noisy_probs(rng, labels, 3, signal=0.3, decimals=3)
    groups = np.arange(n) // 2
    res = paired_bootstrap(good, bad, labels, groups, "auroc_macro", n_boot=500, seed=0)
    single_a = evaluate(good, labels, groups, CLASSES, n_boot=0)["auroc_macro"].value
    assert res.value_a == pytest.approx(single_a)
    assert res.difference == pytest.approx(res.value_a - res.value_b)
    assert res.difference > 0.2 and res.ci_low > 0 and res.p_value < 0.01
    same = paired_bootstrap(good, good, labels, groups, "accuracy", n_boot=200, seed=0)
    assert same.difference == 0 and same.ci_low == 0 == same.ci_high and same.p_value == 1.0
    # two equally good, independent models: no evidence of a difference
    other = _noisy_probs(rng, labels, 3, signal=2.0, decimals=3)
    null = paired_bootstrap(good, other, labels, groups, n_boot=500, seed=0)
    assert null.ci_low < 0 < null.ci_high and null.p_value > 0.05


def test_seed_pooled_paired_bootstrap_averages_the_seeds_on_shared_resamples(rng):
    """Three seeds of two models: the pooled difference is the mean of the per-seed
    differences; one seed reproduces :func:`paired_bootstrap` exactly; a small per-seed edge
    that no single seed shows (every per-seed CI includes 0) is narrower when pooled."""
    n = 300
    labels = rng.integers(0, 3, n)
    groups = np.arange(n) // 2
    a = [_noisy_probs(rng, labels, 3, signal=1.0, decimals=4) for _ in range(3)]
    b = [_noisy_probs(rng, labels, 3, signal=0.8, decimals=4) for _ in range(3)]
    per_seed = [
        paired_bootstrap(x, y, labels, groups, n_boot=300, seed=0)
        for x, y in zip(a, b, strict=True)
    ]
    pooled = paired_bootstrap_seeds(a, b, labels, groups, n_boot=300, seed=0)
    assert pooled.difference == pytest.approx(np.mean([r.difference for r in per_seed]))
    assert pooled.value_a == pytest.approx(np.mean([r.value_a for r in per_seed]))
    width = pooled.ci_high - pooled.ci_low
    assert width < min(r.ci_high - r.ci_low for r in per_seed)
    one = paired_bootstrap_seeds(a[:1], b[:1], labels, groups, n_boot=300, seed=0)
    assert (one.difference, one.ci_low, one.ci_high) == (
        per_seed[0].difference,
        per_seed[0].ci_low,
        per_seed[0].ci_high,
    )
    with pytest.raises(ValueError, match="one array per seed"):
        paired_bootstrap_seeds(a, b[:2], labels, groups)
    four = np.hstack([b[0], np.zeros((n, 1))])  # a 4-class model beside 3-class ones
    with pytest.raises(ValueError, match="must both have shape"):
        paired_bootstrap_seeds(a[:1], [four], labels, None)


def test_bad_inputs_give_clear_errors():
    probs = np.array([[0.5, 0.5], [0.2, 0.8]])
    with pytest.raises(ValueError, match="softmax"):
        compute_metrics(np.array([[2.0, 1.0], [0.2, 0.8]]), np.array([0, 1]), ["a", "b"])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\]"):
        compute_metrics(probs, np.array([0, 2]), ["a", "b"])
    with pytest.raises(ValueError, match="class names"):
        compute_metrics(probs, np.array([0, 1]), ["a"])
    with pytest.raises(ValueError, match="missing patient id"):
        evaluate(probs, np.array([0, 1]), ["p1", None], ["a", "b"], n_boot=5)
    with pytest.raises(ValueError, match="collide"):
        compute_metrics(probs, np.array([0, 1]), ["covid 19", "covid-19".replace("-", "_")])
    with pytest.raises(ValueError, match="unknown metric"):
        paired_bootstrap(probs, probs, np.array([0, 1]), None, "auc")
