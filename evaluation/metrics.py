"""Classification metrics with patient-level bootstrap confidence intervals (numpy only).

Inputs everywhere: ``probs`` float ``[N, K]`` (softmax rows), ``labels`` int ``[N]`` in
``[0, K)``, ``groups`` ``[N]`` (patient ids; images of one patient are resampled together) and
``class_names`` (``K`` strings). Predictions are ``argmax(probs, axis=1)``.

Metric names are identical for every dataset (the dataset goes into MLflow tags, never into a
metric name): ``auroc_macro``, ``auroc_<class>``, ``f1_macro``, ``balanced_accuracy``,
``accuracy``, ``sensitivity_<class>``, ``specificity_<class>``, ``ece``; :meth:`EvalResult.as_dict`
adds ``<name>_ci_low`` and ``<name>_ci_high``.

Definitions:

- AUROC (one-vs-rest, class ``k``): the Mann-Whitney probability that a random image of class
  ``k`` scores higher on ``probs[:, k]`` than a random image of another class, ties counting
  one half. ``auroc_macro`` is the mean over the classes that have positives and negatives in
  the evaluated set; a bootstrap resample in which one of those classes has no positives or no
  negatives gives NaN (it is dropped from the percentile and counted in ``n_dropped``).
- ``f1_macro``: mean per-class F1 ``2TP / (2TP + FP + FN)`` over classes that occur in the
  labels or in the predictions (as scikit-learn's default ``average="macro"``).
- ``balanced_accuracy``: mean per-class sensitivity over the classes present in the labels.
- ``ece``: 15 equal-width bins of the max probability (bin ``b`` holds confidences in
  ``(b/15, (b+1)/15]``), ``sum_b n_b / N * |accuracy_b - confidence_b|``.
- Confidence intervals: percentile bootstrap over patients (``n_boot`` resamples of the
  patients with replacement; an image carries its patient's multiplicity as a weight).

Everything is computed from per-image weights ``W [B, N]`` (the point estimate is ``B = 1``
with all weights one), so the point estimate and the resamples share one implementation.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

ECE_BINS = 15
_MAX_CHUNK_ELEMENTS = 2_000_000  # bootstrap rows x images held at once (memory bound)
_NAME_OK = re.compile(r"[^A-Za-z0-9_.\-]")


@dataclass(frozen=True)
class MetricEstimate:
    """One metric: point estimate, bootstrap CI and the number of resamples that gave NaN."""

    value: float
    ci_low: float
    ci_high: float
    n_dropped: int = 0


@dataclass(frozen=True)
class EvalResult:
    """All metrics of one model on one dataset.

    Attributes:
        class_names: metric-safe class names (``K``), in label-index order.
        n_images, n_patients: size of the evaluated set.
        n_boot: bootstrap resamples drawn; ``confidence``: CI level (0.95).
        estimates: metric name -> :class:`MetricEstimate` (names from :func:`metric_names`).
    """

    class_names: tuple[str, ...]
    n_images: int
    n_patients: int
    n_boot: int
    confidence: float
    estimates: dict[str, MetricEstimate] = field(default_factory=dict)

    def __getitem__(self, name: str) -> MetricEstimate:
        return self.estimates[name]

    def as_dict(self, *, include_dropped: bool = False) -> dict[str, float]:
        """Flat ``{name: value, name_ci_low: ..., name_ci_high: ...}`` (stable key order).

        With ``include_dropped``, also ``name_boot_dropped`` (resamples that gave NaN).
        """
        out: dict[str, float] = {}
        for name, est in self.estimates.items():
            out[name] = est.value
            out[f"{name}_ci_low"] = est.ci_low
            out[f"{name}_ci_high"] = est.ci_high
            if include_dropped:
                out[f"{name}_boot_dropped"] = float(est.n_dropped)
        return out

    def dropped(self) -> dict[str, int]:
        """Metric name -> resamples that gave NaN (a class absent from the resample)."""
        return {name: est.n_dropped for name, est in self.estimates.items()}


@dataclass(frozen=True)
class PairedResult:
    """Model A minus model B on the same images, with the same patient resamples for both.

    ``p_value`` is two-sided: twice the smaller bootstrap tail of the difference beyond zero,
    with the ``(count + 1) / (B + 1)`` correction (never exactly 0), capped at 1.
    """

    metric: str
    value_a: float
    value_b: float
    difference: float
    ci_low: float
    ci_high: float
    p_value: float
    n_boot: int
    n_dropped: int


def metric_safe_names(class_names: Sequence[str]) -> tuple[str, ...]:
    """Class names usable inside MLflow metric keys: characters outside ``[A-Za-z0-9_.-]`` -> _.

    Raises:
        ValueError: when two classes map to the same name, or a name is empty.
    """
    safe = tuple(_NAME_OK.sub("_", str(c).strip()) for c in class_names)
    if any(not s for s in safe):
        raise ValueError(f"class names must be non-empty strings, got {list(class_names)!r}")
    if len(set(safe)) != len(safe):
        raise ValueError(
            f"class names {list(class_names)!r} collide after making them metric-safe "
            f"({list(safe)!r}); rename the classes so they differ in letters or digits."
        )
    return safe


def metric_names(class_names: Sequence[str]) -> list[str]:
    """The metric names :func:`evaluate` returns, in order (without CI suffixes)."""
    safe = metric_safe_names(class_names)
    names = ["auroc_macro", *(f"auroc_{c}" for c in safe)]
    names += ["f1_macro", "balanced_accuracy", "accuracy"]
    names += [f"sensitivity_{c}" for c in safe] + [f"specificity_{c}" for c in safe]
    names.append("ece")
    return names


# ----------------------------------------------------------------------------- validation


def _check_inputs(
    probs: np.ndarray, labels: np.ndarray, groups: Sequence | np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated ``probs [N, K]`` float64, ``labels [N]`` int64, group codes ``[N]`` int64."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"probs must have shape [N, K] with K >= 2 classes, got {p.shape}")
    n, k = p.shape
    if n == 0:
        raise ValueError("probs is empty: there are no images to evaluate")
    if not np.all(np.isfinite(p)):
        bad = int(np.flatnonzero(~np.isfinite(p).all(axis=1))[0])
        raise ValueError(f"probs has NaN/inf values (first at row {bad})")
    sums = p.sum(axis=1)
    off = np.flatnonzero(np.abs(sums - 1.0) > 1e-3)
    if off.size or p.min() < 0:
        row = int(off[0]) if off.size else int(np.argmin(p.min(axis=1)))
        raise ValueError(
            f"probs rows must be softmax probabilities (non-negative, summing to 1); row {row} "
            f"sums to {sums[row]:.4f}. Apply softmax to the logits first."
        )
    y = np.asarray(labels)
    if y.shape != (n,):
        raise ValueError(f"labels must have shape [{n}] to match probs, got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise ValueError("labels must be integer class indices (0 .. K-1)")
    if y.min() < 0 or y.max() >= k:
        raise ValueError(
            f"labels must lie in [0, {k - 1}] for K={k} classes, got {y.min()}..{y.max()}"
        )
    codes = _group_codes(groups, n)
    return p, y.astype(np.int64), codes


def _group_codes(groups: Sequence | np.ndarray | None, n: int) -> np.ndarray:
    """Integer patient codes ``[N]`` in 0..G-1; ``None`` makes every image its own patient."""
    if groups is None:
        return np.arange(n, dtype=np.int64)
    g = np.asarray(groups, dtype=object)
    if g.shape != (n,):
        raise ValueError(f"groups must have shape [{n}] (one patient id per image), got {g.shape}")
    missing = [i for i, v in enumerate(g) if v is None or (isinstance(v, float) and math.isnan(v))]
    missing += [i for i, v in enumerate(g) if isinstance(v, str) and not v.strip()]
    if missing:
        raise ValueError(
            f"groups has {len(missing)} missing patient id(s) (first at row {min(missing)}); give "
            "every image a patient id, or pass groups=None to treat each image as its own patient."
        )
    _, codes = np.unique(g.astype(str), return_inverse=True)
    return codes.astype(np.int64)


# ----------------------------------------------------------------------------- weights


def patient_bootstrap_weights(
    groups: Sequence | np.ndarray | None,
    n_boot: int,
    rng: np.random.Generator,
    *,
    n_images: int | None = None,
) -> Iterator[np.ndarray]:
    """Yield per-image weight chunks ``[b, N]`` (b <= n_boot in total) of patient resamples.

    Each resample draws the ``G`` patients ``G`` times with replacement; an image's weight is
    the number of times its patient was drawn. Chunks keep ``b * N`` bounded; the chunking
    depends only on ``N`` and ``G``, so a given seed always gives the same resamples.
    """
    if groups is None and n_images is None:
        raise ValueError("give groups, or n_images when groups is None")
    codes = _group_codes(groups, n_images if groups is None else len(groups))
    n = codes.size
    n_groups = int(codes.max()) + 1
    chunk = max(1, _MAX_CHUNK_ELEMENTS // max(n, n_groups))
    pvals = np.full(n_groups, 1.0 / n_groups)
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        counts = rng.multinomial(n_groups, pvals, size=b).astype(np.float64)  # [b, G]
        yield counts[:, codes]  # [b, N]
        done += b


# ----------------------------------------------------------------------------- metrics


def roc_curve(scores: np.ndarray, positives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC points ``(fpr [M], tpr [M])`` from (0, 0) to (1, 1), one point per distinct score.

    Args:
        scores: ``[N]`` higher = more likely positive; positives: ``[N]`` bool.
    """
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positives, dtype=bool)
    order = np.argsort(-s, kind="stable")
    s, pos = s[order], pos[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]
    tp = np.cumsum(pos)[last_of_tie]
    fp = np.cumsum(~pos)[last_of_tie]
    n_pos, n_neg = max(int(pos.sum()), 1), max(int((~pos).sum()), 1)
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]


def _weighted_auroc(scores: np.ndarray, positives: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Rank-based AUROC with ties = 1/2 for each weight row.

    Args:
        scores: ``[N]``; positives: ``[N]`` bool; w: ``[B, N]`` non-negative image weights.

    Returns:
        ``[B]`` AUROC, NaN where a row has no positive or no negative weight.
    """
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    starts = np.r_[0, np.flatnonzero(np.diff(s) != 0) + 1]  # first index of each tie group
    pos = positives[order]
    ws = w[:, order]
    wp = np.add.reduceat(ws * pos, starts, axis=1)  # [B, T] positive weight per tie group
    wn = np.add.reduceat(ws * ~pos, starts, axis=1)  # [B, T] negative weight per tie group
    below = np.cumsum(wn, axis=1) - wn  # negative weight strictly below each group
    num = np.sum(wp * (below + 0.5 * wn), axis=1)
    den = wp.sum(axis=1) * wn.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _metric_arrays(
    probs: np.ndarray, labels: np.ndarray, w: np.ndarray, safe: Sequence[str], macro_classes
) -> dict[str, np.ndarray]:
    """Every metric for every weight row: name -> ``[B]``.

    Args:
        probs: ``[N, K]``; labels: ``[N]``; w: ``[B, N]``; safe: metric-safe class names;
        macro_classes: class indices averaged in ``auroc_macro``.
    """
    n, k = probs.shape
    pred = probs.argmax(axis=1)
    out: dict[str, np.ndarray] = {}
    total = w.sum(axis=1)  # [B]
    nan = np.full(w.shape[0], np.nan)

    aurocs = [_weighted_auroc(probs[:, c], labels == c, w) for c in range(k)]
    if macro_classes:
        out["auroc_macro"] = np.mean(np.stack([aurocs[c] for c in macro_classes]), axis=0)
    else:
        out["auroc_macro"] = nan
    for c in range(k):
        out[f"auroc_{safe[c]}"] = aurocs[c]

    pair = np.zeros((n, k * k))
    pair[np.arange(n), labels * k + pred] = 1.0
    cm = (w @ pair).reshape(-1, k, k)  # [B, true, pred]
    tp = np.diagonal(cm, axis1=1, axis2=2)  # [B, K]
    true_tot = cm.sum(axis=2)  # [B, K] images of each true class
    pred_tot = cm.sum(axis=1)  # [B, K] images predicted as each class
    fn, fp = true_tot - tp, pred_tot - tp
    tn = total[:, None] - tp - fn - fp
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = np.where(true_tot > 0, tp / true_tot, np.nan)
        neg = tn + fp
        spec = np.where(neg > 0, tn / neg, np.nan)
        f1_den = 2 * tp + fp + fn
        f1 = np.where(f1_den > 0, 2 * tp / f1_den, np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows stay NaN
            out["f1_macro"] = np.nanmean(f1, axis=1)
            out["balanced_accuracy"] = np.nanmean(sens, axis=1)
        out["accuracy"] = tp.sum(axis=1) / total
    for c in range(k):
        out[f"sensitivity_{safe[c]}"] = sens[:, c]
    for c in range(k):
        out[f"specificity_{safe[c]}"] = spec[:, c]

    conf = probs.max(axis=1)
    correct = (pred == labels).astype(np.float64)
    bins = np.clip(np.ceil(conf * ECE_BINS).astype(np.int64) - 1, 0, ECE_BINS - 1)
    gap = np.zeros((n, ECE_BINS))
    gap[np.arange(n), bins] = correct - conf
    out["ece"] = np.abs(w @ gap).sum(axis=1) / total
    return out


def _macro_classes(labels: np.ndarray, k: int) -> list[int]:
    present = np.bincount(labels, minlength=k)
    return [c for c in range(k) if 0 < present[c] < labels.size]


def _percentile_ci(samples: np.ndarray, confidence: float) -> tuple[float, float, int]:
    finite = samples[~np.isnan(samples)]
    dropped = int(samples.size - finite.size)
    if finite.size == 0:
        return math.nan, math.nan, dropped
    tail = (1.0 - confidence) / 2.0 * 100.0
    lo, hi = np.percentile(finite, [tail, 100.0 - tail])
    return float(lo), float(hi), dropped


def compute_metrics(
    probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str]
) -> dict[str, float]:
    """Point estimates only (no bootstrap): metric name -> value."""
    p, y, _ = _check_inputs(probs, labels, None)
    safe = _checked_names(class_names, p.shape[1])
    arrays = _metric_arrays(p, y, np.ones((1, y.size)), safe, _macro_classes(y, p.shape[1]))
    return {name: float(v[0]) for name, v in arrays.items()}


def _checked_names(class_names: Sequence[str], k: int) -> tuple[str, ...]:
    if len(class_names) != k:
        raise ValueError(f"got {len(class_names)} class names for probs with K={k} columns")
    return metric_safe_names(class_names)


def evaluate(
    probs: np.ndarray,
    labels: np.ndarray,
    groups: Sequence | np.ndarray | None,
    class_names: Sequence[str],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> EvalResult:
    """All metrics with patient-level percentile-bootstrap CIs.

    Args:
        probs: ``[N, K]`` softmax probabilities; labels: ``[N]`` class indices;
        groups: ``[N]`` patient ids (``None``: every image is its own patient);
        class_names: ``K`` names; n_boot: resamples (0: CIs are NaN); seed: for
        ``np.random.default_rng``; confidence: CI level.
    """
    p, y, codes = _check_inputs(probs, labels, groups)
    k = p.shape[1]
    safe = _checked_names(class_names, k)
    macro = _macro_classes(y, k)
    point = _metric_arrays(p, y, np.ones((1, y.size)), safe, macro)
    boots: dict[str, list[np.ndarray]] = {name: [] for name in point}
    rng = np.random.default_rng(seed)
    for w in patient_bootstrap_weights(codes, n_boot, rng):
        for name, values in _metric_arrays(p, y, w, safe, macro).items():
            boots[name].append(values)
    estimates = {}
    for name, value in point.items():
        if n_boot > 0:
            lo, hi, dropped = _percentile_ci(np.concatenate(boots[name]), confidence)
        else:
            lo, hi, dropped = math.nan, math.nan, 0
        estimates[name] = MetricEstimate(float(value[0]), lo, hi, dropped)
    return EvalResult(
        class_names=safe,
        n_images=int(y.size),
        n_patients=int(codes.max()) + 1,
        n_boot=n_boot,
        confidence=confidence,
        estimates=estimates,
    )


def paired_bootstrap(
    probs_a: np.ndarray,
    probs_b: np.ndarray,
    labels: np.ndarray,
    groups: Sequence | np.ndarray | None,
    metric: str = "auroc_macro",
    *,
    class_names: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> PairedResult:
    """Difference ``metric(A) - metric(B)`` on the same images, with a paired bootstrap.

    Both models are scored on the same patient resamples, so patient-level difficulty cancels.

    Args:
        probs_a, probs_b: ``[N, K]`` softmax outputs of the two models on the same images.
        labels: ``[N]``; groups: ``[N]`` patient ids; metric: a name from :func:`metric_names`;
        class_names: needed for per-class metrics (default ``"0" .. "K-1"``).
    """
    return paired_bootstrap_seeds(
        [probs_a],
        [probs_b],
        labels,
        groups,
        metric,
        class_names=class_names,
        n_boot=n_boot,
        seed=seed,
        confidence=confidence,
    )


def paired_bootstrap_seeds(
    probs_a: Sequence[np.ndarray],
    probs_b: Sequence[np.ndarray],
    labels: np.ndarray,
    groups: Sequence | np.ndarray | None,
    metric: str = "auroc_macro",
    *,
    class_names: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> PairedResult:
    """Mean over training seeds of ``metric(A_s) - metric(B_s)`` on the same images, with a
    paired patient bootstrap: each resample of patients is shared by every model of every seed.

    The CI is the patient-sampling uncertainty of the seed-mean difference *for these seeds*;
    it does not include the seed-to-seed spread (report the per-seed differences beside it).
    With one seed this is :func:`paired_bootstrap`.

    Args:
        probs_a, probs_b: ``S`` arrays ``[N, K]`` each, model A's and model B's softmax outputs
            for seed ``s`` (paired by position), all on the same ``N`` images.
        labels: ``[N]``; groups: ``[N]`` patient ids; metric: a name from :func:`metric_names`;
        class_names: needed for per-class metrics (default ``"0" .. "K-1"``).
    """
    if len(probs_a) != len(probs_b) or not probs_a:
        raise ValueError(
            f"one array per seed for each model expected; got {len(probs_a)} and {len(probs_b)}"
        )
    first, y, codes = _check_inputs(probs_a[0], labels, groups)
    shape = first.shape
    pairs = [
        (_check_inputs(a, labels, None)[0], _check_inputs(b, labels, None)[0])
        for a, b in zip(probs_a, probs_b, strict=True)
    ]
    for a, b in pairs:
        if a.shape != shape or b.shape != shape:
            raise ValueError(f"probs {a.shape} and {b.shape} must both have shape {shape}")
    k = shape[1]
    safe = _checked_names(class_names or [str(c) for c in range(k)], k)
    if metric not in metric_names(safe):
        raise ValueError(f"unknown metric {metric!r}; choose one of {metric_names(safe)}")
    macro = _macro_classes(y, k)

    def mean_over_seeds(w: np.ndarray, which: int) -> np.ndarray:
        return np.mean([_metric_arrays(p[which], y, w, safe, macro)[metric] for p in pairs], 0)

    ones = np.ones((1, y.size))
    value_a = float(mean_over_seeds(ones, 0)[0])
    value_b = float(mean_over_seeds(ones, 1)[0])
    diffs = []
    rng = np.random.default_rng(seed)
    for w in patient_bootstrap_weights(codes, n_boot, rng):
        diffs.append(mean_over_seeds(w, 0) - mean_over_seeds(w, 1))
    d = np.concatenate(diffs) if diffs else np.empty(0)
    lo, hi, dropped = _percentile_ci(d, confidence)
    finite = d[~np.isnan(d)]
    if finite.size:
        below = (np.sum(finite <= 0) + 1) / (finite.size + 1)
        above = (np.sum(finite >= 0) + 1) / (finite.size + 1)
        p_value = float(min(1.0, 2.0 * min(below, above)))
    else:
        p_value = math.nan
    return PairedResult(
        metric=metric,
        value_a=value_a,
        value_b=value_b,
        difference=value_a - value_b,
        ci_low=lo,
        ci_high=hi,
        p_value=p_value,
        n_boot=n_boot,
        n_dropped=dropped,
    )
