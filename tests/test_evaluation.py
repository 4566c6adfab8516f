"""fedmsk.evaluation: aggregate-only summaries with the key names of docs/interfaces.md."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fedmsk import metrics as m
from fedmsk.evaluation import score_histogram, summarize, threshold_from_histograms

BINARY_KEYS = {
    "n",
    "n_per_class",
    "task_type",
    "classes",
    "auc",
    "auc_ci95",
    "auc_variance",
    "threshold",
    "at_threshold",
    "youden",
    "roc",
    "calibration",
    "confusion_matrix",
}
MULTICLASS_KEYS = {
    "n",
    "n_per_class",
    "task_type",
    "classes",
    "top1_accuracy",
    "macro_f1",
    "weighted_f1",
    "confusion_matrix",
    "per_class",
    "roc_per_class",
}


def binary_data(n=120, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    y[:3], y[3:6] = 0, 1
    logit = rng.normal(size=n) + 1.5 * (2 * y - 1)
    pos = 1 / (1 + np.exp(-logit))
    return y, np.column_stack([1 - pos, pos])


def multiclass_data(n=150, k=3, seed=1):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += 1.5
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, p


def roundtrip(obj):
    return json.loads(json.dumps(obj, allow_nan=False))


def test_binary_summary_keys_values_and_json_safety():
    y, p = binary_data()
    out = summarize(y, p, ["normal", "fracture"])
    assert set(out) >= BINARY_KEYS
    assert roundtrip(out) == out
    assert out["task_type"] == "binary" and out["classes"] == ["normal", "fracture"]
    assert out["n"] == len(y)
    assert out["n_per_class"] == {"normal": int((y == 0).sum()), "fracture": int(y.sum())}
    assert out["auc"] == pytest.approx(roc_auc_score(y, p[:, 1]))
    ref = m.auc_delong(y, p[:, 1])
    assert out["auc_variance"] == pytest.approx(ref.variance)
    assert out["auc_ci95"] == pytest.approx(list(ref.ci95))
    # threshold None -> Youden on these data
    assert out["threshold"] == out["youden"]["threshold"]
    assert out["threshold_source"] == "youden"
    assert set(out["at_threshold"]) == {
        "accuracy",
        "sensitivity",
        "specificity",
        "precision",
        "npv",
        "f1",
    }
    sens = out["at_threshold"]["sensitivity"]
    assert sens["value"] == pytest.approx(out["youden"]["sensitivity"])
    assert sens["ci95"][0] <= sens["value"] <= sens["ci95"][1]
    cm = np.array(out["confusion_matrix"])
    pred = (p[:, 1] >= out["threshold"]).astype(int)
    assert cm[1, 1] == np.sum((y == 1) & (pred == 1)) and cm[0, 1] == np.sum((y == 0) & (pred == 1))
    assert cm.sum() == len(y)
    cal = out["calibration"]
    assert cal["brier"] == pytest.approx(np.mean((p[:, 1] - y) ** 2))
    assert sum(cal["bins"]["count"]) == len(y)
    assert set(cal["bins"]) == {"mean_predicted", "fraction_positive", "count"}


def test_roc_is_on_fixed_grid_and_leaks_no_scores():
    y, p = binary_data(n=60, seed=3)
    out = summarize(y, p, ["neg", "pos"])
    fpr, tpr = out["roc"]["fpr"], out["roc"]["tpr"]
    assert fpr == pytest.approx(np.linspace(0, 1, 101).tolist())
    assert len(tpr) == 101 and tpr[-1] == 1.0
    text = json.dumps(out)
    for score in p[:, 1]:
        assert repr(float(score)) not in text or float(score) == out["threshold"]


def test_given_threshold_is_used():
    y, p = binary_data(seed=4)
    out = summarize(y, p, ["neg", "pos"], threshold=0.7)
    assert out["threshold"] == 0.7 and out["threshold_source"] == "given"
    spec = out["at_threshold"]["specificity"]["value"]
    assert spec == pytest.approx(np.mean(p[y == 0, 1] < 0.7))


def test_bootstrap_is_seeded():
    y, p = binary_data(seed=5)
    a = summarize(y, p, ["neg", "pos"], bootstrap=200, seed=3)
    b = summarize(y, p, ["neg", "pos"], bootstrap=200, seed=3)
    assert a["auc_bootstrap_ci95"] == b["auc_bootstrap_ci95"]
    low, high = a["auc_bootstrap_ci95"]
    assert low < a["auc"] < high
    assert "auc_bootstrap_ci95" not in summarize(y, p, ["neg", "pos"])


def test_single_class_site_gives_none_with_reason():
    y = np.zeros(10, dtype=int)
    pos = np.linspace(0.05, 0.6, 10)
    p = np.column_stack([1 - pos, pos])
    out = roundtrip(summarize(y, p, ["neg", "pos"]))
    assert out["auc"] is None and out["auc_ci95"] is None and "one class" in out["auc_reason"]
    assert out["roc"] is None and out["youden"] is None
    assert out["threshold"] is None and out["at_threshold"] is None
    with_t = roundtrip(summarize(y, p, ["neg", "pos"], threshold=0.5))
    assert with_t["at_threshold"]["specificity"]["value"] == pytest.approx(np.mean(pos < 0.5))
    assert with_t["at_threshold"]["sensitivity"]["value"] is None
    assert with_t["at_threshold"]["sensitivity"]["ci95"] == [None, None]


def test_multiclass_summary():
    y, p = multiclass_data()
    classes = ["none", "partial", "full"]
    out = summarize(y, p, classes)
    assert set(out) >= MULTICLASS_KEYS
    assert roundtrip(out) == out
    assert out["task_type"] == "multiclass"
    res = m.multiclass_metrics(y, p)
    assert out["top1_accuracy"] == pytest.approx(np.mean(p.argmax(1) == y))
    assert out["macro_f1"] == pytest.approx(res.macro_f1)
    assert out["confusion_matrix"] == res.confusion.tolist()
    assert set(out["per_class"]) == set(classes)
    for c, name in enumerate(classes):
        pc = out["per_class"][name]
        assert set(pc) >= {"auc", "auc_ci95", "precision", "sensitivity", "specificity", "f1"}
        assert pc["auc"] == pytest.approx(roc_auc_score(y == c, p[:, c]))
        assert len(out["roc_per_class"][name]["tpr"]) == 101


def test_multiclass_absent_class():
    y, p = multiclass_data(n=40)
    y[y == 2] = 0
    out = roundtrip(summarize(y, p, ["a", "b", "c"]))
    assert out["per_class"]["c"]["auc"] is None and out["roc_per_class"]["c"] is None
    assert out["n_per_class"]["c"] == 0


def test_patient_level_summary():
    y, p = binary_data(n=80, seed=6)
    ids = [f"p{i // 2}" for i in range(80)]
    y = np.array([y[i - i % 2] for i in range(80)])  # both images of a patient share the label
    out = summarize(y, p, ["neg", "pos"], patient_ids=ids, patient_aggregation="max")
    pl = out["patient_level"]
    assert set(pl) >= BINARY_KEYS and pl["n"] == 40 and pl["aggregation"] == "max"
    py, pp = m.aggregate_by_patient(y, p, ids, "max")
    assert pl["auc"] == pytest.approx(roc_auc_score(py, pp[:, 1]))
    assert "p0" not in json.dumps(out)


def test_input_errors():
    y, p = binary_data(n=20)
    with pytest.raises(ValueError, match="shape"):
        summarize(y, p[:, :1], ["a", "b"])
    with pytest.raises(ValueError, match="class indices"):
        summarize(y + 5, p, ["a", "b"])
    with pytest.raises(ValueError, match="empty"):
        summarize([], np.zeros((0, 2)), ["a", "b"])


def test_histogram_threshold_matches_pooled_youden_on_bin_edges():
    sites = [binary_data(n=n, seed=s) for n, s in ((70, 10), (90, 11), (50, 12))]
    hists = [score_histogram(y, p, bins=50) for y, p in sites]
    assert roundtrip(hists[0]) == hists[0]
    assert sum(hists[0]["negative"]) + sum(hists[0]["positive"]) == 70
    t = threshold_from_histograms(hists)
    y = np.concatenate([s[0] for s in sites])
    s = np.concatenate([s[1][:, 1] for s in sites])

    def j(th):
        return np.mean(s[y == 1] >= th) + np.mean(s[y == 0] < th) - 1

    edges = np.linspace(0, 1, 51)
    assert j(t) == pytest.approx(max(j(e) for e in edges[:-1]))
    assert t in edges
    # within one bin of the exact Youden on pooled scores
    assert j(t) >= j(m.youden_threshold(y, s).threshold) - 0.1


def test_histogram_threshold_splits_a_gap():
    y = np.array([0, 0, 0, 1, 1, 1])
    s = np.array([0.1, 0.15, 0.2, 0.8, 0.85, 0.9])
    t = threshold_from_histograms([score_histogram(y, s, bins=10)])
    assert 0.2 < t <= 0.8 and t == pytest.approx(0.5)


def test_histogram_errors_and_multiclass():
    y, p = binary_data(n=10)
    h = score_histogram(y, p, bins=10)
    with pytest.raises(ValueError, match="bin counts"):
        threshold_from_histograms([h, score_histogram(y, p, bins=20)])
    with pytest.raises(ValueError, match="both classes"):
        threshold_from_histograms([score_histogram(np.zeros(10, int), p, bins=10)])
    with pytest.raises(ValueError, match="at least one"):
        threshold_from_histograms([])
    assert score_histogram([0, 1, 2], np.full((3, 3), 1 / 3)) is None
