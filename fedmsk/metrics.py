"""Study statistics: AUC with DeLong variance, tests, CIs, thresholds, per-class metrics.

Also calibration and McNemar. Everything here works on plain numpy arrays of labels and scores
that stay on the node that computed them; :mod:`fedmsk.evaluation` turns the results into
aggregate-only summaries.

Conventions a caller must know:

* Binary labels are 0/1 (1 = positive); a case is called positive when ``score >= threshold``.
* AUC is the Mann-Whitney probability P(score_pos > score_neg) + 0.5 P(tie), i.e. the same number
  as :func:`sklearn.metrics.roc_auc_score`.
* DeLong variances come from the placement values (structural components) of DeLong, DeLong and
  Clarke-Pearson (1988), computed with midranks (Sun and Xu 2014), so ties are handled exactly.
  They need at least two positives and two negatives; with fewer the variance is NaN.
* 95% intervals use the normal quantile 1.959964; AUC intervals are clipped to [0, 1] as pROC does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

Z95 = float(stats.norm.ppf(0.975))
MCNEMAR_EXACT_BELOW = 25


# ----------------------------------------------------------------------------- input checking


def as_binary_labels(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    """Labels as an int array of 0/1; anything else is a caller error, not a silent cast."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr.astype(np.int64)
    values = set(np.unique(arr).tolist())
    if not values <= {0, 1}:
        raise ValueError(f"binary labels must be 0 or 1, got values {sorted(values)[:5]}")
    return arr.astype(np.int64)


def as_scores(scores: Sequence[float] | np.ndarray, n: int) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.shape != (n,):
        raise ValueError(f"scores must have shape ({n},) like the labels, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("scores contain NaN or infinite values")
    return arr


def _split(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = as_binary_labels(labels)
    s = as_scores(scores, len(y))
    pos, neg = s[y == 1], s[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(
            f"AUC needs both classes: {len(pos)} positive and {len(neg)} negative cases"
        )
    return pos, neg


# ----------------------------------------------------------------------------- DeLong


@dataclass(frozen=True)
class Placements:
    """DeLong structural components: v10[i] for each positive, v01[j] for each negative."""

    auc: float
    v10: np.ndarray
    v01: np.ndarray


def delong_placements(pos: np.ndarray, neg: np.ndarray) -> Placements:
    """Placement values from midranks: O((m+n) log(m+n)) instead of the O(m n) double loop.

    v10[i] is the fraction of negatives below positive i (ties count one half), v01[j] the
    fraction of positives above negative j; the AUC is the mean of either.
    """
    m, n = len(pos), len(neg)
    ranks_all = stats.rankdata(np.concatenate([pos, neg]))
    ranks_pos = stats.rankdata(pos)
    ranks_neg = stats.rankdata(neg)
    v10 = (ranks_all[:m] - ranks_pos) / n
    v01 = 1.0 - (ranks_all[m:] - ranks_neg) / m
    auc = float((ranks_all[:m].sum() - m * (m + 1) / 2.0) / (m * n))
    return Placements(auc=auc, v10=v10, v01=v01)


def _placement_cov(a: Placements, b: Placements) -> float:
    """DeLong covariance of two AUCs measured on the same cases (a is b gives the variance)."""
    m, n = len(a.v10), len(a.v01)
    if m < 2 or n < 2:
        return float("nan")
    s10 = float(np.sum((a.v10 - a.auc) * (b.v10 - b.auc)) / (m - 1))
    s01 = float(np.sum((a.v01 - a.auc) * (b.v01 - b.auc)) / (n - 1))
    return s10 / m + s01 / n


def normal_ci(estimate: float, variance: float, lo: float = 0.0, hi: float = 1.0) -> tuple:
    """Normal-approximation 95% interval, clipped to [lo, hi]; (nan, nan) without a variance."""
    if not math.isfinite(variance):
        return (float("nan"), float("nan"))
    half = Z95 * math.sqrt(max(variance, 0.0))
    return (max(lo, estimate - half), min(hi, estimate + half))


@dataclass(frozen=True)
class AucResult:
    auc: float
    variance: float
    ci95: tuple[float, float]
    n_positive: int
    n_negative: int


def auc_delong(
    labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray
) -> AucResult:
    """AUC with DeLong variance and clipped normal 95% CI."""
    pos, neg = _split(np.asarray(labels), np.asarray(scores))
    p = delong_placements(pos, neg)
    var = _placement_cov(p, p)
    return AucResult(p.auc, var, normal_ci(p.auc, var), len(pos), len(neg))


@dataclass(frozen=True)
class PairedTest:
    """DeLong test of two correlated AUCs (same cases): normal Z, two-sided p."""

    auc1: float
    auc2: float
    variance1: float
    variance2: float
    covariance: float
    z: float
    p: float


def delong_paired_test(labels, scores1, scores2) -> PairedTest:
    """Compare two models scored on the same cases (pROC roc.test(paired=TRUE, method="delong"))."""
    y = as_binary_labels(labels)
    s1, s2 = as_scores(scores1, len(y)), as_scores(scores2, len(y))
    p1 = delong_placements(*_split(y, s1))
    p2 = delong_placements(*_split(y, s2))
    var1, var2, cov = _placement_cov(p1, p1), _placement_cov(p2, p2), _placement_cov(p1, p2)
    diff = p1.auc - p2.auc
    se2 = var1 + var2 - 2.0 * cov
    z, pval = _z_test(diff, se2)
    return PairedTest(p1.auc, p2.auc, var1, var2, cov, z, pval)


def _z_test(diff: float, se2: float) -> tuple[float, float]:
    if not math.isfinite(se2):
        return float("nan"), float("nan")
    se = math.sqrt(max(se2, 0.0))
    if se == 0.0:
        return (0.0, 1.0) if diff == 0.0 else (math.copysign(math.inf, diff), 0.0)
    z = diff / se
    return z, float(2.0 * stats.norm.sf(abs(z)))


@dataclass(frozen=True)
class UnpairedTest:
    """DeLong test of two independent ROC curves: t statistic with Welch-Satterthwaite df."""

    auc1: float
    auc2: float
    variance1: float
    variance2: float
    statistic: float
    df: float
    p: float


def delong_unpaired_test(labels1, scores1, labels2, scores2) -> UnpairedTest:
    """Compare AUCs from different case sets (pROC roc.test(paired=FALSE, method="delong")).

    df = (V1 + V2)^2 / (V1^2 / (N1 - 1) + V2^2 / (N2 - 1)) with N the total number of cases of
    each curve, and p = 2 P(T_df > |D|).
    """
    y1, y2 = as_binary_labels(labels1), as_binary_labels(labels2)
    p1 = delong_placements(*_split(y1, as_scores(scores1, len(y1))))
    p2 = delong_placements(*_split(y2, as_scores(scores2, len(y2))))
    var1, var2 = _placement_cov(p1, p1), _placement_cov(p2, p2)
    total = var1 + var2
    diff = p1.auc - p2.auc
    if not math.isfinite(total):
        return UnpairedTest(p1.auc, p2.auc, var1, var2, math.nan, math.nan, math.nan)
    if total == 0.0:
        stat = 0.0 if diff == 0.0 else math.copysign(math.inf, diff)
        return UnpairedTest(p1.auc, p2.auc, var1, var2, stat, math.nan, 1.0 if diff == 0 else 0.0)
    stat = diff / math.sqrt(total)
    df = total**2 / (var1**2 / (len(y1) - 1) + var2**2 / (len(y2) - 1))
    pval = float(2.0 * stats.t.sf(abs(stat), df))
    return UnpairedTest(p1.auc, p2.auc, var1, var2, stat, df, pval)


def _auc_from_split(pos: np.ndarray, neg: np.ndarray) -> float:
    ranks = stats.rankdata(np.concatenate([pos, neg]))
    m, n = len(pos), len(neg)
    return float((ranks[:m].sum() - m * (m + 1) / 2.0) / (m * n))


def bootstrap_auc_ci(
    labels, scores, n_resamples: int = 2000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float]:
    """Stratified percentile bootstrap CI: positives and negatives are resampled separately,
    so every resample keeps the study's case mix and has a defined AUC."""
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    pos, neg = _split(np.asarray(labels), np.asarray(scores))
    rng = np.random.default_rng(seed)
    aucs = np.empty(n_resamples)
    for i in range(n_resamples):
        aucs[i] = _auc_from_split(
            pos[rng.integers(0, len(pos), len(pos))], neg[rng.integers(0, len(neg), len(neg))]
        )
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(aucs, [alpha, 1.0 - alpha])
    return float(low), float(high)


# ----------------------------------------------------------------------------- proportions


def wilson_ci(successes: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval; well-behaved at 0 and 1 where the Wald interval collapses."""
    if total <= 0:
        return (float("nan"), float("nan"))
    z = float(stats.norm.ppf(0.5 + confidence / 2.0))
    p = successes / total
    denom = 1.0 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class Estimate:
    """A proportion-like metric with its 95% CI (NaN when the denominator is empty)."""

    value: float
    ci95: tuple[float, float]
    numerator: int
    denominator: int


def proportion(successes: int, total: int) -> Estimate:
    value = successes / total if total > 0 else float("nan")
    return Estimate(value, wilson_ci(successes, total), int(successes), int(total))


def f1_estimate(tp: int, fp: int, fn: int) -> Estimate:
    """F1 with a CI from the Wilson interval of TP / (TP + FP + FN), mapped by F1 = 2J / (1 + J).

    F1 is not a proportion of independent trials, but it is a monotone function of the
    positive-class Jaccard index J, which is one (TP among the cases that are positive in
    truth or in prediction); mapping J's Wilson bounds keeps the interval inside [0, 1].
    """
    total = tp + fp + fn
    if total == 0:
        return Estimate(float("nan"), (float("nan"), float("nan")), 0, 0)
    low, high = wilson_ci(tp, total)
    j = tp / total
    return Estimate(
        2 * j / (1 + j), (2 * low / (1 + low), 2 * high / (1 + high)), 2 * tp, tp + total
    )


# ----------------------------------------------------------------------------- thresholds


@dataclass(frozen=True)
class ConfusionCounts:
    tp: int
    fp: int
    tn: int
    fn: int


def confusion_counts(labels, scores, threshold: float) -> ConfusionCounts:
    y = as_binary_labels(labels)
    called = as_scores(scores, len(y)) >= threshold
    return counts_from_calls(y, called)


def counts_from_calls(y: np.ndarray, called: np.ndarray) -> ConfusionCounts:
    called = np.asarray(called, dtype=bool)
    return ConfusionCounts(
        tp=int(np.sum(called & (y == 1))),
        fp=int(np.sum(called & (y == 0))),
        tn=int(np.sum(~called & (y == 0))),
        fn=int(np.sum(~called & (y == 1))),
    )


BINARY_METRICS = ("accuracy", "sensitivity", "specificity", "precision", "npv", "f1")


def metrics_from_counts(c: ConfusionCounts) -> dict[str, Estimate]:
    """The six operating-point metrics, each with a 95% CI (Wilson; F1 see f1_estimate)."""
    return {
        "accuracy": proportion(c.tp + c.tn, c.tp + c.fp + c.tn + c.fn),
        "sensitivity": proportion(c.tp, c.tp + c.fn),
        "specificity": proportion(c.tn, c.tn + c.fp),
        "precision": proportion(c.tp, c.tp + c.fp),
        "npv": proportion(c.tn, c.tn + c.fn),
        "f1": f1_estimate(c.tp, c.fp, c.fn),
    }


def metrics_at_threshold(labels, scores, threshold: float) -> dict[str, Estimate]:
    return metrics_from_counts(confusion_counts(labels, scores, threshold))


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float
    sensitivity: float
    specificity: float


def youden_threshold(labels, scores) -> OperatingPoint:
    """The observed score maximising sensitivity + specificity - 1 (rule: score >= threshold).

    Among equal maxima the highest threshold wins (fewest positive calls); the trivial
    'call nothing positive' point is not a candidate.
    """
    y = as_binary_labels(labels)
    s = as_scores(scores, len(y))
    _split(y, s)
    candidates = np.unique(s)[::-1]
    pos_sorted, neg_sorted = np.sort(s[y == 1]), np.sort(s[y == 0])
    sens = 1.0 - np.searchsorted(pos_sorted, candidates, side="left") / len(pos_sorted)
    spec = np.searchsorted(neg_sorted, candidates, side="left") / len(neg_sorted)
    best = int(np.argmax(sens + spec - 1.0))
    return OperatingPoint(float(candidates[best]), float(sens[best]), float(spec[best]))


def threshold_for_specificity(labels, scores, target: float) -> OperatingPoint:
    """Lowest threshold whose specificity is at least ``target`` (the most sensitive such rule).

    This is how a model is compared with a reader 'at the reader's specificity': the model's
    operating point that is at least as specific as the reader, reported with its own actual
    specificity (which can exceed the target when scores tie).
    """
    y = as_binary_labels(labels)
    s = as_scores(scores, len(y))
    pos, neg = _split(y, s)
    neg_sorted = np.sort(neg)
    needed = math.ceil(target * len(neg) - 1e-9)
    if needed <= 0:
        threshold = float(s.min())
    else:
        boundary = neg_sorted[needed - 1]
        above = s[s > boundary]
        threshold = float(above.min()) if len(above) else float(np.nextafter(boundary, np.inf))
    sens = float(np.mean(pos >= threshold))
    spec = float(np.mean(neg < threshold))
    return OperatingPoint(threshold, sens, spec)


def threshold_for_sensitivity(labels, scores, target: float) -> OperatingPoint:
    """Highest threshold whose sensitivity is at least ``target`` (the most specific such rule)."""
    y = as_binary_labels(labels)
    s = as_scores(scores, len(y))
    pos, neg = _split(y, s)
    pos_desc = np.sort(pos)[::-1]
    needed = max(1, math.ceil(target * len(pos) - 1e-9))
    threshold = float(pos_desc[min(needed, len(pos)) - 1])
    return OperatingPoint(
        threshold, float(np.mean(pos >= threshold)), float(np.mean(neg < threshold))
    )


@dataclass(frozen=True)
class ThresholdedMetrics:
    """Operating-point metrics and where the threshold came from (youden | fixed | locked)."""

    threshold: float
    source: str
    metrics: dict[str, Estimate]


def evaluate_at_youden(labels, scores) -> ThresholdedMetrics:
    point = youden_threshold(labels, scores)
    return ThresholdedMetrics(
        point.threshold, "youden", metrics_at_threshold(labels, scores, point.threshold)
    )


def evaluate_at_fixed(labels, scores, threshold: float) -> ThresholdedMetrics:
    return ThresholdedMetrics(threshold, "fixed", metrics_at_threshold(labels, scores, threshold))


def evaluate_locked(val_labels, val_scores, test_labels, test_scores) -> ThresholdedMetrics:
    """Youden threshold chosen on validation, then applied unchanged to test (no test peeking)."""
    threshold = youden_threshold(val_labels, val_scores).threshold
    return ThresholdedMetrics(
        threshold, "locked", metrics_at_threshold(test_labels, test_scores, threshold)
    )


# ----------------------------------------------------------------------------- ROC curve


def roc_points(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """Empirical ROC vertices (fpr, tpr) from (0, 0) to (1, 1), one per distinct threshold."""
    pos, neg = _split(np.asarray(labels), np.asarray(scores))
    candidates = np.unique(np.concatenate([pos, neg]))[::-1]
    pos_sorted, neg_sorted = np.sort(pos), np.sort(neg)
    tpr = 1.0 - np.searchsorted(pos_sorted, candidates, side="left") / len(pos)
    fpr = 1.0 - np.searchsorted(neg_sorted, candidates, side="left") / len(neg)
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr])


FPR_GRID = np.linspace(0.0, 1.0, 101)


def roc_on_grid(labels, scores, grid: np.ndarray = FPR_GRID) -> tuple[np.ndarray, np.ndarray]:
    """TPR at fixed FPR values, linear between ROC vertices and taking the top of vertical
    segments; a fixed grid makes curves from different sites comparable and leaks no score."""
    fpr, tpr = roc_points(labels, scores)
    idx = np.searchsorted(fpr, grid, side="right") - 1
    out = np.empty(len(grid))
    for k, (g, i) in enumerate(zip(grid, idx, strict=True)):
        if fpr[i] == g or i == len(fpr) - 1:
            out[k] = tpr[i]
        else:
            w = (g - fpr[i]) / (fpr[i + 1] - fpr[i])
            out[k] = tpr[i] + w * (tpr[i + 1] - tpr[i])
    return np.asarray(grid, dtype=float), out


# ----------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class Calibration:
    brier: float
    ece: float
    mean_predicted: list[float | None]
    fraction_positive: list[float | None]
    count: list[int]


def calibration(labels, scores, bins: int = 10) -> Calibration:
    """Brier score, expected calibration error and reliability curve on equal-width bins.

    ECE = sum_b (n_b / N) |mean predicted_b - fraction positive_b|; empty bins give None.
    """
    y = as_binary_labels(labels)
    s = as_scores(scores, len(y))
    if len(y) == 0:
        raise ValueError("calibration needs at least one case")
    if np.any((s < 0) | (s > 1)):
        raise ValueError("calibration needs probabilities in [0, 1]")
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, bins - 1)
    mean_pred: list[float | None] = []
    frac_pos: list[float | None] = []
    counts: list[int] = []
    ece = 0.0
    for b in range(bins):
        mask = which == b
        n_b = int(mask.sum())
        counts.append(n_b)
        if n_b == 0:
            mean_pred.append(None)
            frac_pos.append(None)
            continue
        mp, fp = float(s[mask].mean()), float(y[mask].mean())
        mean_pred.append(mp)
        frac_pos.append(fp)
        ece += n_b / len(y) * abs(mp - fp)
    brier = float(np.mean((s - y) ** 2))
    return Calibration(brier, float(ece), mean_pred, frac_pos, counts)


# ----------------------------------------------------------------------------- multi-class


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts with rows = true class, columns = predicted class."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(labels, dtype=int), np.asarray(predicted, dtype=int)), 1)
    return cm


@dataclass(frozen=True)
class ClassMetrics:
    auc: AucResult | None
    auc_reason: str | None
    precision: Estimate
    sensitivity: Estimate
    specificity: Estimate
    f1: Estimate


@dataclass(frozen=True)
class MulticlassResult:
    top1_accuracy: Estimate
    macro_f1: float
    weighted_f1: float
    confusion: np.ndarray
    per_class: list[ClassMetrics]


def as_class_labels(labels, n_classes: int) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {arr.shape}")
    if arr.size and (
        not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() >= n_classes
    ):
        raise ValueError(f"labels must be class indices in 0..{n_classes - 1}")
    return arr.astype(np.int64)


def as_probs(probs, n: int, n_classes: int | None = None) -> np.ndarray:
    arr = np.asarray(probs, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != n or (n_classes is not None and arr.shape[1] != n_classes):
        want = f"({n}, {n_classes if n_classes is not None else 'C'})"
        raise ValueError(f"probs must have shape {want}, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("probs contain NaN or infinite values")
    return arr


def multiclass_metrics(labels, probs) -> MulticlassResult:
    """Top-1 accuracy, confusion matrix, one-vs-rest per-class metrics, macro/weighted F1.

    The prediction is the argmax of the scores (first class on ties); per-class AUC is
    one-vs-rest with DeLong CI, None with a reason when the class is absent or alone.
    """
    p = as_probs(probs, len(np.asarray(labels)))
    k = p.shape[1]
    y = as_class_labels(labels, k)
    pred = np.argmax(p, axis=1)
    cm = confusion_matrix(y, pred, k)
    per_class = [_one_vs_rest(y, p[:, c], cm, c) for c in range(k)]
    support = cm.sum(axis=1)
    f1s = np.array([0.0 if math.isnan(pc.f1.value) else pc.f1.value for pc in per_class])
    macro = float(f1s.mean())
    weighted = float((f1s * support).sum() / support.sum()) if support.sum() else float("nan")
    correct = int(np.trace(cm))
    return MulticlassResult(proportion(correct, len(y)), macro, weighted, cm, per_class)


def _one_vs_rest(y: np.ndarray, score: np.ndarray, cm: np.ndarray, c: int) -> ClassMetrics:
    tp = int(cm[c, c])
    fn = int(cm[c, :].sum()) - tp
    fp = int(cm[:, c].sum()) - tp
    tn = int(cm.sum()) - tp - fn - fp
    binary = (y == c).astype(np.int64)
    auc, reason = None, None
    if 0 < binary.sum() < len(binary):
        auc = auc_delong(binary, score)
    else:
        reason = "class absent from the labels" if binary.sum() == 0 else "only this class present"
    m = metrics_from_counts(ConfusionCounts(tp, fp, tn, fn))
    return ClassMetrics(auc, reason, m["precision"], m["sensitivity"], m["specificity"], m["f1"])


# ----------------------------------------------------------------------------- patient level


def aggregate_by_patient(
    labels, probs, patient_ids, how: str = "mean"
) -> tuple[np.ndarray, np.ndarray]:
    """One row per patient: label = the highest label of the patient's images (any positive
    image makes a positive patient; for ordered grades the worst grade), probs = per-column mean
    or max. For more than two columns a max is renormalised to sum to one; for two columns the
    positive-class score is aggregated and the negative column is its complement.
    """
    if how not in ("mean", "max"):
        raise ValueError(f"patient_aggregation must be 'mean' or 'max', got {how!r}")
    y = np.asarray(labels)
    p = as_probs(probs, len(y))
    ids = np.asarray(patient_ids)
    if ids.shape != (len(y),):
        raise ValueError(f"patient_ids must have one entry per image ({len(y)}), got {ids.shape}")
    _, inverse = np.unique(ids, return_inverse=True)
    n_pat = int(inverse.max()) + 1 if len(inverse) else 0
    out_y = np.full(n_pat, -1, dtype=np.int64)
    np.maximum.at(out_y, inverse, y.astype(np.int64))
    if how == "mean":
        sums = np.zeros((n_pat, p.shape[1]))
        np.add.at(sums, inverse, p)
        out_p = sums / np.bincount(inverse, minlength=n_pat)[:, None]
    else:
        out_p = np.full((n_pat, p.shape[1]), -np.inf)
        np.maximum.at(out_p, inverse, p)
        if p.shape[1] == 2:
            out_p[:, 0] = 1.0 - out_p[:, 1]
        else:
            out_p = out_p / np.where(
                out_p.sum(axis=1, keepdims=True) > 0, out_p.sum(axis=1, keepdims=True), 1.0
            )
    return out_y, out_p


# ----------------------------------------------------------------------------- McNemar


@dataclass(frozen=True)
class McNemar:
    """Paired comparison of two raters on the same cases via their discordant pairs.

    ``first_only``: cases where only the first rater (the model) is right; ``second_only``:
    only the second (the reader). ``method`` says which test produced ``p``.
    """

    n: int
    first_only: int
    second_only: int
    statistic: float | None
    p: float
    method: str


def mcnemar_test(first_correct, second_correct, exact_below: int = MCNEMAR_EXACT_BELOW) -> McNemar:
    """Exact binomial test when the discordant count is below ``exact_below``, else the
    chi-square test with continuity correction (1 df)."""
    a = np.asarray(first_correct, dtype=bool)
    b = np.asarray(second_correct, dtype=bool)
    if a.shape != b.shape:
        raise ValueError("McNemar needs both raters on the same cases")
    first_only, second_only = int(np.sum(a & ~b)), int(np.sum(~a & b))
    discordant = first_only + second_only
    if discordant < exact_below:
        p = 1.0 if discordant == 0 else float(stats.binomtest(first_only, discordant, 0.5).pvalue)
        return McNemar(len(a), first_only, second_only, None, min(1.0, p), "exact binomial")
    stat = (abs(first_only - second_only) - 1.0) ** 2 / discordant
    return McNemar(
        len(a),
        first_only,
        second_only,
        stat,
        float(stats.chi2.sf(stat, 1)),
        "chi-square with continuity correction",
    )
