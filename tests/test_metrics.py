"""fedmsk.metrics against independent references: plain-loop DeLong, sklearn, hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import confusion_matrix as sk_confusion
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

from fedmsk import metrics as m

# ----------------------------------------------------------------------------- references


def ref_placements(labels, scores):
    """Mann-Whitney kernel written out with loops (no ranks): the textbook DeLong definition."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]

    def psi(x, yv):
        if x > yv:
            return 1.0
        if x == yv:
            return 0.5
        return 0.0

    v10 = [sum(psi(x, yv) for yv in neg) / len(neg) for x in pos]
    v01 = [sum(psi(x, yv) for x in pos) / len(pos) for yv in neg]
    auc = sum(v10) / len(v10)
    return auc, v10, v01


def ref_cov(a, b):
    """DeLong covariance of two AUCs from their placement lists (variance when a is b)."""
    auc_a, v10a, v01a = a
    auc_b, v10b, v01b = b
    mm, nn = len(v10a), len(v01a)
    s10 = 0.0
    for i in range(mm):
        s10 += (v10a[i] - auc_a) * (v10b[i] - auc_b)
    s01 = 0.0
    for j in range(nn):
        s01 += (v01a[j] - auc_a) * (v01b[j] - auc_b)
    return s10 / (mm - 1) / mm + s01 / (nn - 1) / nn


def synthetic(n=80, shift=1.0, seed=0, decimals=None):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    y[:2], y[2:4] = 0, 1
    s = rng.normal(size=n) + shift * y
    if decimals is not None:
        s = np.round(s, decimals)
    return y, s


# ----------------------------------------------------------------------------- AUC and DeLong


@pytest.mark.parametrize("seed,decimals", [(0, None), (1, 1), (2, 0), (3, None)])
def test_auc_matches_sklearn_and_delong_matches_loop_reference(seed, decimals):
    y, s = synthetic(seed=seed, decimals=decimals)
    res = m.auc_delong(y, s)
    assert res.auc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    ref = ref_placements(y, s)
    assert res.auc == pytest.approx(ref[0], abs=1e-12)
    assert res.variance == pytest.approx(ref_cov(ref, ref), rel=1e-10)
    half = 1.959963984540054 * math.sqrt(res.variance)
    assert res.ci95[0] == pytest.approx(max(0, res.auc - half))
    assert res.ci95[1] == pytest.approx(min(1, res.auc + half))
    assert (res.n_positive, res.n_negative) == (int(y.sum()), int(len(y) - y.sum()))


def test_placements_equal_loop_reference_with_heavy_ties():
    y = np.array([0, 0, 0, 1, 1, 1, 0, 1, 0, 1, 1, 0])
    s = np.array([1, 2, 2, 2, 3, 3, 3, 1, 1, 2, 3, 2], dtype=float)
    p = m.delong_placements(s[y == 1], s[y == 0])
    auc, v10, v01 = ref_placements(y, s)
    np.testing.assert_allclose(p.v10, v10)
    np.testing.assert_allclose(p.v01, v01)
    assert p.auc == pytest.approx(auc)
    assert m.auc_delong(y, s).auc == pytest.approx(roc_auc_score(y, s))


@pytest.mark.parametrize("flip,expected", [(False, 1.0), (True, 0.0)])
def test_perfect_and_inverted_separation(flip, expected):
    y = np.array([0, 0, 0, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.8, 0.9])
    if flip:
        s = -s
    res = m.auc_delong(y, s)
    assert res.auc == expected == roc_auc_score(y, s)
    ref = ref_placements(y, s)
    assert res.variance == pytest.approx(ref_cov(ref, ref), abs=1e-15)
    assert res.variance == 0.0
    assert res.ci95 == (expected, expected)


def test_all_scores_tied_gives_half():
    y = np.array([0, 1, 0, 1, 1])
    res = m.auc_delong(y, np.full(5, 0.3))
    assert res.auc == 0.5 == roc_auc_score(y, np.full(5, 0.3))


def test_ci_is_clipped_to_unit_interval():
    y = np.array([0, 0, 1, 1, 1, 0, 1])
    s = np.array([0.1, 0.2, 0.9, 0.8, 0.7, 0.75, 0.85])
    res = m.auc_delong(y, s)
    assert res.auc > 0.9
    assert res.auc + 1.96 * math.sqrt(res.variance) > 1.0
    assert res.ci95[1] == 1.0
    assert 0.0 <= res.ci95[0] < res.auc


def test_single_case_of_a_class_gives_nan_variance_and_one_class_raises():
    res = m.auc_delong([0, 0, 1], [0.1, 0.5, 0.7])
    assert res.auc == 1.0 and math.isnan(res.variance)
    with pytest.raises(ValueError, match="both classes"):
        m.auc_delong([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="0 or 1"):
        m.auc_delong([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        m.auc_delong([0, 1, 1], [0.1, float("nan"), 0.3])


def test_paired_test_matches_loop_reference():
    y, s1 = synthetic(n=60, shift=1.2, seed=5, decimals=1)
    rng = np.random.default_rng(9)
    s2 = np.round(s1 * 0.5 + rng.normal(size=len(y)), 1)
    t = m.delong_paired_test(y, s1, s2)
    r1, r2 = ref_placements(y, s1), ref_placements(y, s2)
    v1, v2, c12 = ref_cov(r1, r1), ref_cov(r2, r2), ref_cov(r1, r2)
    z = (r1[0] - r2[0]) / math.sqrt(v1 + v2 - 2 * c12)
    assert t.auc1 == pytest.approx(r1[0]) and t.auc2 == pytest.approx(r2[0])
    assert t.covariance == pytest.approx(c12, rel=1e-10)
    assert t.variance1 == pytest.approx(v1, rel=1e-10)
    assert t.z == pytest.approx(z, rel=1e-10)
    assert t.p == pytest.approx(2 * stats.norm.sf(abs(z)), rel=1e-10)
    assert 0 < t.p < 1


def test_paired_test_of_identical_scores_is_zero_with_p_one():
    y, s = synthetic(seed=2)
    t = m.delong_paired_test(y, s, s)
    assert t.z == 0.0 and t.p == 1.0
    assert t.covariance == pytest.approx(t.variance1)


def test_unpaired_test_matches_hand_computation():
    y1, s1 = synthetic(n=50, shift=1.5, seed=11, decimals=1)
    y2, s2 = synthetic(n=70, shift=0.5, seed=12, decimals=1)
    t = m.delong_unpaired_test(y1, s1, y2, s2)
    r1, r2 = ref_placements(y1, s1), ref_placements(y2, s2)
    v1, v2 = ref_cov(r1, r1), ref_cov(r2, r2)
    d = (r1[0] - r2[0]) / math.sqrt(v1 + v2)
    df = (v1 + v2) ** 2 / (v1**2 / (50 - 1) + v2**2 / (70 - 1))
    assert t.statistic == pytest.approx(d, rel=1e-10)
    assert t.df == pytest.approx(df, rel=1e-10)
    assert t.p == pytest.approx(2 * stats.t.sf(abs(d), df), rel=1e-10)
    assert min(50, 70) - 1 <= t.df <= 50 + 70 - 2  # Welch-Satterthwaite bounds


def test_bootstrap_ci_is_seeded_and_brackets_auc():
    y, s = synthetic(n=60, seed=4)
    a = m.bootstrap_auc_ci(y, s, 300, seed=1)
    b = m.bootstrap_auc_ci(y, s, 300, seed=1)
    c = m.bootstrap_auc_ci(y, s, 300, seed=2)
    assert a == b and a != c
    auc = m.auc_delong(y, s)
    assert a[0] < auc.auc < a[1]
    # percentile bootstrap and DeLong agree roughly on the width
    assert 0.5 < (a[1] - a[0]) / (auc.ci95[1] - auc.ci95[0]) < 2.0


# ----------------------------------------------------------------------------- proportions


def test_wilson_matches_closed_form_and_edges():
    low, high = m.wilson_ci(8, 10)
    z = stats.norm.ppf(0.975)
    n, p = 10, 0.8
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert (low, high) == pytest.approx((centre - half, centre + half))
    assert m.wilson_ci(0, 10)[0] == 0.0 and m.wilson_ci(10, 10)[1] == pytest.approx(1.0)
    assert m.wilson_ci(0, 10)[1] > 0 and m.wilson_ci(10, 10)[0] < 1
    assert all(math.isnan(v) for v in m.wilson_ci(0, 0))


def test_metrics_at_threshold_match_sklearn():
    y, s = synthetic(n=90, seed=7)
    t = 0.4
    res = m.metrics_at_threshold(y, s, t)
    pred = (s >= t).astype(int)
    assert res["sensitivity"].value == pytest.approx(recall_score(y, pred))
    assert res["specificity"].value == pytest.approx(recall_score(1 - y, 1 - pred))
    assert res["precision"].value == pytest.approx(precision_score(y, pred))
    assert res["npv"].value == pytest.approx(precision_score(1 - y, 1 - pred))
    assert res["f1"].value == pytest.approx(f1_score(y, pred))
    assert res["accuracy"].value == pytest.approx(np.mean(pred == y))
    for name, est in res.items():
        assert est.ci95[0] <= est.value <= est.ci95[1], name


def test_youden_is_the_best_observed_threshold():
    y, s = synthetic(n=70, seed=8, decimals=1)
    point = m.youden_threshold(y, s)
    best = max(np.mean(s[y == 1] >= t) + np.mean(s[y == 0] < t) - 1 for t in np.unique(s))
    assert point.sensitivity + point.specificity - 1 == pytest.approx(best)
    assert point.sensitivity == pytest.approx(np.mean(s[y == 1] >= point.threshold))
    assert point.threshold in set(s.tolist())


def test_locked_threshold_comes_from_validation_only():
    yv, sv = synthetic(n=60, seed=20)
    yt, st = synthetic(n=60, seed=21)
    locked = m.evaluate_locked(yv, sv, yt, st)
    assert locked.source == "locked"
    assert locked.threshold == m.youden_threshold(yv, sv).threshold
    assert locked.metrics["sensitivity"].value == pytest.approx(
        np.mean(st[yt == 1] >= locked.threshold)
    )
    fixed = m.evaluate_at_fixed(yt, st, 0.25)
    assert fixed.metrics["specificity"].value == pytest.approx(np.mean(st[yt == 0] < 0.25))
    assert m.evaluate_at_youden(yt, st).source == "youden"


@pytest.mark.parametrize("target", [0.0, 0.5, 0.73, 0.9, 1.0])
def test_threshold_for_specificity_is_most_sensitive_rule_meeting_target(target):
    y, s = synthetic(n=50, seed=30, decimals=1)
    op = m.threshold_for_specificity(y, s, target)
    assert op.specificity >= target - 1e-12
    best = max(
        (
            np.mean(s[y == 1] >= t)
            for t in np.append(np.unique(s), np.inf)
            if np.mean(s[y == 0] < t) >= target - 1e-12
        ),
    )
    assert op.sensitivity == pytest.approx(best)


def test_threshold_for_sensitivity():
    y, s = synthetic(n=50, seed=31)
    op = m.threshold_for_sensitivity(y, s, 0.8)
    assert op.sensitivity >= 0.8
    best = max(np.mean(s[y == 0] < t) for t in np.unique(s) if np.mean(s[y == 1] >= t) >= 0.8)
    assert op.specificity == pytest.approx(best)


def test_roc_on_grid_integrates_to_auc():
    y, s = synthetic(n=400, seed=3, decimals=2)
    fpr, tpr = m.roc_on_grid(y, s)
    assert len(fpr) == 101 and fpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.all(np.diff(tpr) >= -1e-12)
    area = float(np.sum((fpr[1:] - fpr[:-1]) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(roc_auc_score(y, s), abs=0.01)


# ----------------------------------------------------------------------------- calibration


def test_calibration_brier_and_ece_by_hand():
    y = np.array([0, 1, 1, 0, 1])
    s = np.array([0.05, 0.15, 0.95, 0.85, 0.91])
    cal = m.calibration(y, s, bins=10)
    assert cal.brier == pytest.approx(np.mean((s - y) ** 2))
    # bin 0: {0.05 | 0}, bin 1: {0.15 | 1}, bin 8: {0.85 | 0}, bin 9: {0.95, 0.91 | 1, 1}
    ece = (0.05 + 0.85 + 0.85 + 2 * abs(0.93 - 1.0)) / 5
    assert cal.ece == pytest.approx(ece)
    assert cal.count == [1, 1, 0, 0, 0, 0, 0, 0, 1, 2]
    assert cal.mean_predicted[2] is None and cal.fraction_positive[9] == 1.0


def test_perfectly_calibrated_scores_have_small_ece():
    rng = np.random.default_rng(0)
    s = rng.random(20000)
    y = (rng.random(20000) < s).astype(int)
    assert m.calibration(y, s).ece < 0.02


# ----------------------------------------------------------------------------- multi-class


def test_multiclass_metrics_match_sklearn():
    rng = np.random.default_rng(3)
    n, k = 120, 3
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += 1.0
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    res = m.multiclass_metrics(y, p)
    pred = p.argmax(axis=1)
    np.testing.assert_array_equal(res.confusion, sk_confusion(y, pred, labels=[0, 1, 2]))
    assert res.top1_accuracy.value == pytest.approx(np.mean(pred == y))
    assert res.macro_f1 == pytest.approx(f1_score(y, pred, average="macro"))
    assert res.weighted_f1 == pytest.approx(f1_score(y, pred, average="weighted"))
    per_f1 = f1_score(y, pred, average=None)
    per_prec = precision_score(y, pred, average=None)
    per_rec = recall_score(y, pred, average=None)
    for c in range(k):
        pc = res.per_class[c]
        assert pc.f1.value == pytest.approx(per_f1[c])
        assert pc.precision.value == pytest.approx(per_prec[c])
        assert pc.sensitivity.value == pytest.approx(per_rec[c])
        spec = np.mean(pred[y != c] != c)
        assert pc.specificity.value == pytest.approx(spec)
        binary = (y == c).astype(int)
        assert pc.auc.auc == pytest.approx(roc_auc_score(binary, p[:, c]))
        ref = ref_placements(binary, p[:, c])
        assert pc.auc.variance == pytest.approx(ref_cov(ref, ref), rel=1e-10)


def test_multiclass_absent_class_has_no_auc():
    y = np.array([0, 1, 0, 1])
    p = np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1], [0.1, 0.3, 0.6]])
    res = m.multiclass_metrics(y, p)
    assert res.per_class[2].auc is None and "absent" in res.per_class[2].auc_reason
    assert res.confusion[1, 2] == 1


# ----------------------------------------------------------------------------- patient level


def test_patient_aggregation_mean_and_max():
    y = np.array([0, 0, 1, 0, 1])
    pos = np.array([0.2, 0.4, 0.9, 0.3, 0.5])
    p = np.column_stack([1 - pos, pos])
    ids = ["b", "b", "a", "a", "c"]
    ym, pm = m.aggregate_by_patient(y, p, ids, "mean")
    np.testing.assert_array_equal(ym, [1, 0, 1])  # sorted ids a, b, c
    np.testing.assert_allclose(pm[:, 1], [0.6, 0.3, 0.5])
    yx, px = m.aggregate_by_patient(y, p, ids, "max")
    np.testing.assert_allclose(px[:, 1], [0.9, 0.4, 0.5])
    np.testing.assert_allclose(px.sum(axis=1), 1.0)
    with pytest.raises(ValueError, match="patient_aggregation"):
        m.aggregate_by_patient(y, p, ids, "median")


# ----------------------------------------------------------------------------- McNemar


def test_mcnemar_exact_and_chi_square():
    model = np.array([1] * 7 + [0] * 2 + [1] * 10, dtype=bool)
    reader = np.array([0] * 7 + [1] * 2 + [1] * 10, dtype=bool)
    t = m.mcnemar_test(model, reader)
    assert (t.first_only, t.second_only, t.method) == (7, 2, "exact binomial")
    assert t.p == pytest.approx(2 * stats.binom.cdf(2, 9, 0.5))
    model = np.array([1] * 30 + [0] * 12, dtype=bool)
    reader = np.array([0] * 30 + [1] * 12, dtype=bool)
    t = m.mcnemar_test(model, reader)
    assert t.method.startswith("chi-square")
    assert t.statistic == pytest.approx((abs(30 - 12) - 1) ** 2 / 42)
    assert t.p == pytest.approx(stats.chi2.sf((17**2) / 42, 1))
    assert m.mcnemar_test([True, False], [True, False]).p == 1.0
