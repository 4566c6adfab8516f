"""fedmsk.reader_study: reader operating points, model at the reader's specificity, McNemar."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from fedmsk import metrics as m
from fedmsk.reader_study import ReaderCall, compare_binary, compare_multiclass


def binary_study(n=60, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    y[:3], y[3:6] = 0, 1
    s = 1 / (1 + np.exp(-(rng.normal(size=n) + 1.5 * (2 * y - 1))))
    images = [f"case{i:03d}" for i in range(n)]
    labels = dict(zip(images, y.tolist(), strict=True))
    scores = dict(zip(images, s.tolist(), strict=True))
    calls = []
    for reader, exp, acc in (
        ("anna", "resident", 0.7),
        ("ben", "resident", 0.75),
        ("cho", "msk", 0.9),
    ):
        for i, img in enumerate(images):
            call = int(y[i]) if rng.random() < acc else 1 - int(y[i])
            calls.append(ReaderCall(reader, exp, img, call, float(rng.integers(1, 6))))
    return y, s, images, labels, scores, calls


def test_reader_sensitivity_specificity_by_hand():
    y, s, images, labels, scores, calls = binary_study()
    out = compare_binary(calls, labels, scores, threshold=0.5)
    assert json.loads(json.dumps(out, allow_nan=False)) == out
    anna = next(r for r in out["readers"] if r["reader"] == "anna")
    c = np.array([rc.call for rc in calls if rc.reader == "anna"])
    tp, fn = int(np.sum((c == 1) & (y == 1))), int(np.sum((c == 0) & (y == 1)))
    tn, fp = int(np.sum((c == 0) & (y == 0))), int(np.sum((c == 1) & (y == 0)))
    assert anna["sensitivity"]["value"] == pytest.approx(tp / (tp + fn))
    assert anna["specificity"]["value"] == pytest.approx(tn / (tn + fp))
    assert anna["sensitivity"]["ci95"] == pytest.approx(list(m.wilson_ci(tp, tp + fn)))
    assert anna["roc_point"] == pytest.approx({"fpr": fp / (tn + fp), "tpr": tp / (tp + fn)})
    assert anna["experience"] == "resident" and anna["n_images"] == len(images)


def test_model_at_reader_specificity():
    y, s, images, labels, scores, calls = binary_study(seed=1)
    out = compare_binary(calls, labels, scores)
    for r in out["readers"]:
        spec = r["specificity"]["value"]
        at = r["model_at_reader_specificity"]
        model_spec = np.mean(s[y == 0] < at["threshold"])
        assert model_spec >= spec - 1e-12
        assert at["sensitivity"]["value"] == pytest.approx(np.mean(s[y == 1] >= at["threshold"]))
        # no threshold meeting the reader's specificity is more sensitive
        better = [
            t
            for t in np.unique(s)
            if np.mean(s[y == 0] < t) >= spec - 1e-12
            and np.mean(s[y == 1] >= t) > at["sensitivity"]["value"] + 1e-12
        ]
        assert not better
        assert at["sensitivity_difference"] == pytest.approx(
            at["sensitivity"]["value"] - r["sensitivity"]["value"]
        )


def test_locked_threshold_mcnemar_counts():
    y, s, images, labels, scores, calls = binary_study(seed=2)
    out = compare_binary(calls, labels, scores, threshold=0.6, exact_below=25)
    assert out["model"]["threshold"] == 0.6 and out["model"]["threshold_source"] == "locked"
    cho = next(r for r in out["readers"] if r["reader"] == "cho")
    c = np.array([rc.call for rc in calls if rc.reader == "cho"])
    model_ok = (s >= 0.6).astype(int) == y
    reader_ok = c == y
    b, cc = int(np.sum(model_ok & ~reader_ok)), int(np.sum(~model_ok & reader_ok))
    mc = cho["locked_threshold"]["mcnemar"]["accuracy"]
    assert (mc["model_only_correct"], mc["reader_only_correct"]) == (b, cc)
    if b + cc < 25:
        assert mc["method"] == "exact binomial"
        assert mc["p"] == pytest.approx(min(1.0, 2 * stats.binom.cdf(min(b, cc), b + cc, 0.5)))
    pos = y == 1
    sens_test = cho["locked_threshold"]["mcnemar"]["sensitivity"]
    assert sens_test["n"] == int(pos.sum())
    assert sens_test["model_only_correct"] == int(np.sum(model_ok[pos] & ~reader_ok[pos]))
    # forcing the chi-square branch
    forced = compare_binary(calls, labels, scores, threshold=0.6, exact_below=0)
    mc2 = next(r for r in forced["readers"] if r["reader"] == "cho")["locked_threshold"]
    mc2 = mc2["mcnemar"]["accuracy"]
    assert mc2["method"] == "chi-square with continuity correction"
    if b + cc:
        stat = (abs(b - cc) - 1) ** 2 / (b + cc)
        assert mc2["statistic"] == pytest.approx(stat)
    assert "25" in out["mcnemar_rule"]


def test_youden_when_not_locked_and_model_roc():
    y, s, images, labels, scores, calls = binary_study(seed=3)
    out = compare_binary(calls, labels, scores)
    assert out["model"]["threshold_source"].startswith("youden")
    assert out["model"]["threshold"] == m.youden_threshold(y, s).threshold
    assert len(out["model"]["roc"]["fpr"]) == 101
    assert out["model"]["auc"] == pytest.approx(m.auc_delong(y, s).auc)


def test_groups_per_experience():
    y, s, images, labels, scores, calls = binary_study(seed=4)
    out = compare_binary(calls, labels, scores)
    res = out["groups"]["resident"]
    assert res["n_readers"] == 2 and out["groups"]["msk"]["n_readers"] == 1
    sens = [r["sensitivity"]["value"] for r in out["readers"] if r["experience"] == "resident"]
    assert res["mean_sensitivity"] == pytest.approx(np.mean(sens))
    op = m.threshold_for_specificity(y, s, res["mean_specificity"])
    assert res["model_sensitivity_at_mean_specificity"] == pytest.approx(op.sensitivity)


def test_reader_on_a_subset_and_reader_auc():
    y, s, images, labels, scores, calls = binary_study(seed=5)
    subset = [c for c in calls if c.reader != "anna" or int(c.image[4:]) < 30]
    out = compare_binary(subset, labels, scores)
    anna = next(r for r in out["readers"] if r["reader"] == "anna")
    assert anna["n_images"] == 30
    sub_calls = [c for c in subset if c.reader == "anna"]
    signed = [c.confidence if c.call else -c.confidence for c in sub_calls]
    assert anna["reader_auc"]["auc"] == pytest.approx(m.auc_delong(y[:30], signed).auc)
    no_conf = [ReaderCall(c.reader, c.experience, c.image, c.call) for c in calls]
    assert compare_binary(no_conf, labels, scores)["readers"][0]["reader_auc"] is None


def test_errors():
    y, s, images, labels, scores, calls = binary_study(seed=6)
    with pytest.raises(ValueError, match="more than one call"):
        compare_binary([*calls, calls[0]], labels, scores)
    with pytest.raises(ValueError, match="no model score"):
        compare_binary([*calls, ReaderCall("anna", "resident", "zzz", 1)], labels, scores)
    with pytest.raises(ValueError, match="experience"):
        compare_binary(
            [*calls, ReaderCall("anna", "msk", "extra", 1)],
            {**labels, "extra": 1},
            {**scores, "extra": 0.5},
        )


def test_multiclass_readers():
    rng = np.random.default_rng(7)
    n, k = 60, 3
    y = rng.integers(0, k, n)
    p = rng.dirichlet([1, 1, 1], n)
    p[np.arange(n), y] += 0.5
    p /= p.sum(1, keepdims=True)
    images = [f"u{i}" for i in range(n)]
    labels = dict(zip(images, y.tolist(), strict=True))
    probs = {img: p[i].tolist() for i, img in enumerate(images)}
    calls = [
        ReaderCall(
            "dee", "senior", img, int(y[i]) if rng.random() < 0.7 else int(rng.integers(0, k))
        )
        for i, img in enumerate(images)
    ]
    out = compare_multiclass(calls, labels, probs, ["grade0", "grade1", "grade2"])
    assert json.loads(json.dumps(out, allow_nan=False)) == out
    dee = out["readers"][0]
    c = np.array([rc.call for rc in calls])
    reader_ok, model_ok = c == y, p.argmax(1) == y
    assert dee["accuracy"]["value"] == pytest.approx(reader_ok.mean())
    assert dee["model_accuracy"]["value"] == pytest.approx(model_ok.mean())
    assert dee["mcnemar"]["model_only_correct"] == int(np.sum(model_ok & ~reader_ok))
    assert dee["mcnemar"]["reader_only_correct"] == int(np.sum(~model_ok & reader_ok))
    g1 = dee["per_class"]["grade1"]
    spec = np.mean(c[y != 1] != 1)
    assert g1["specificity"]["value"] == pytest.approx(spec)
    assert g1["roc_point"]["fpr"] == pytest.approx(1 - spec)
    assert g1["roc_point"]["tpr"] == pytest.approx(np.mean(c[y == 1] == 1))
    op = m.threshold_for_specificity((y == 1).astype(int), p[:, 1], spec)
    assert g1["model_sensitivity_at_reader_specificity"] == pytest.approx(op.sensitivity)
    assert out["groups"]["senior"]["pooled_accuracy"]["value"] == pytest.approx(reader_ok.mean())
    assert out["model"]["per_class"]["grade0"]["auc"] is not None
