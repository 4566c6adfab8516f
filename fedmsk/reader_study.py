"""Model-vs-reader comparison for reader studies.

Inputs are plain in-memory records (the CSV parsing lives in ``fedmsk.commands.stats``):
each reader's calls on a set of images, and for the same image keys the model's scores and the
reference label. Each reader is compared with the model **on the images that reader read**.

Binary studies (calls 0/1): per reader, sensitivity and specificity with Wilson CIs, the model's
sensitivity at the reader's specificity (and specificity at the reader's sensitivity), and at a
locked threshold the paired McNemar tests of accuracy (all cases), sensitivity (positive cases)
and specificity (negative cases). Reader points for an ROC plot are (fpr = 1 - spec, tpr = sens).

Multi-class studies (calls are class indices, e.g. three grades): per reader, overall accuracy
against the model's top-1 with McNemar on correct/incorrect, and per class one-vs-rest reader
points with the model's one-vs-rest sensitivity at the reader's specificity.

The output is a JSON-safe dict of aggregates (no image keys); see ``compare_binary`` and
``compare_multiclass`` for the keys.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedmsk import metrics as m


@dataclass(frozen=True)
class ReaderCall:
    reader: str
    experience: str
    image: str
    call: int
    confidence: float | None = None


def _clean(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _est(e: m.Estimate) -> dict:
    return {"value": _clean(e.value), "ci95": [_clean(e.ci95[0]), _clean(e.ci95[1])]}


def _mcnemar(t: m.McNemar) -> dict:
    return {
        "n": t.n,
        "model_only_correct": t.first_only,
        "reader_only_correct": t.second_only,
        "statistic": _clean(t.statistic),
        "p": _clean(t.p),
        "method": t.method,
    }


def _group_calls(calls: Sequence[ReaderCall]) -> dict[str, list[ReaderCall]]:
    by_reader: dict[str, list[ReaderCall]] = {}
    for c in calls:
        by_reader.setdefault(c.reader, []).append(c)
    for reader, rows in by_reader.items():
        images = [r.image for r in rows]
        if len(set(images)) != len(images):
            raise ValueError(f"reader {reader!r} has more than one call for the same image")
        if len({r.experience for r in rows}) != 1:
            raise ValueError(f"reader {reader!r} is listed with more than one experience level")
    return by_reader


def _check_images(calls: Sequence[ReaderCall], known: Mapping[str, int]) -> None:
    missing = sorted({c.image for c in calls if c.image not in known})
    if missing:
        raise ValueError(
            f"{len(missing)} image(s) read by readers have no model score, e.g. {missing[0]!r}"
        )


def mcnemar_rule(exact_below: int) -> str:
    return (
        f"exact binomial when model-only + reader-only correct < {exact_below}, "
        "otherwise chi-square with continuity correction"
    )


# ----------------------------------------------------------------------------- binary


def compare_binary(
    calls: Sequence[ReaderCall],
    labels: Mapping[str, int],
    scores: Mapping[str, float],
    *,
    threshold: float | None = None,
    exact_below: int = m.MCNEMAR_EXACT_BELOW,
) -> dict:
    """Binary reader study. ``threshold`` is the locked model threshold (None: Youden on all
    scored cases, reported as threshold_source "youden (not locked)").

    Keys: task_type, n_images, n_positive, n_negative, mcnemar_rule, model {auc, auc_ci95,
    threshold, threshold_source, sensitivity, specificity, roc {fpr, tpr}}, readers [ {reader,
    experience, n_images, sensitivity, specificity, accuracy, roc_point {fpr, tpr}, reader_auc,
    model_at_reader_specificity {threshold, sensitivity, specificity, sensitivity_difference},
    model_at_reader_sensitivity {threshold, sensitivity, specificity, specificity_difference},
    locked_threshold {threshold, model_sensitivity, model_specificity, model_accuracy, mcnemar
    {accuracy, sensitivity, specificity}}} ], groups {experience: {n_readers, mean_sensitivity,
    mean_specificity, pooled_sensitivity, pooled_specificity, roc_point,
    model_sensitivity_at_mean_specificity, model_specificity_at_mean_sensitivity}}.
    Metrics with CIs are {value, ci95}; differences are model minus reader.
    """
    _check_images(calls, scores)
    keys = sorted(scores)
    y_all = m.as_binary_labels([labels[k] for k in keys])
    s_all = np.array([scores[k] for k in keys], dtype=float)
    auc = m.auc_delong(y_all, s_all)
    source = "locked" if threshold is not None else "youden (not locked)"
    if threshold is None:
        threshold = m.youden_threshold(y_all, s_all).threshold
    model_m = m.metrics_at_threshold(y_all, s_all, threshold)
    fpr, tpr = m.roc_on_grid(y_all, s_all)
    readers = [
        _binary_reader(name, rows, labels, scores, threshold, exact_below)
        for name, rows in sorted(_group_calls(calls).items())
    ]
    return {
        "task_type": "binary",
        "n_images": len(keys),
        "n_positive": int(y_all.sum()),
        "n_negative": int(len(y_all) - y_all.sum()),
        "mcnemar_rule": mcnemar_rule(exact_below),
        "model": {
            "auc": auc.auc,
            "auc_ci95": [_clean(auc.ci95[0]), _clean(auc.ci95[1])],
            "threshold": float(threshold),
            "threshold_source": source,
            "sensitivity": _est(model_m["sensitivity"]),
            "specificity": _est(model_m["specificity"]),
            "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
        },
        "readers": readers,
        "groups": _binary_groups(readers, calls, labels, y_all, s_all),
    }


def _binary_reader(name, rows, labels, scores, threshold, exact_below) -> dict:
    y = np.array([labels[r.image] for r in rows], dtype=np.int64)
    s = np.array([scores[r.image] for r in rows], dtype=float)
    called = np.array([r.call for r in rows], dtype=np.int64) == 1
    c = m.counts_from_calls(y, called)
    rm = m.metrics_from_counts(c)
    sens, spec = rm["sensitivity"].value, rm["specificity"].value
    out = {
        "reader": name,
        "experience": rows[0].experience,
        "n_images": len(rows),
        "sensitivity": _est(rm["sensitivity"]),
        "specificity": _est(rm["specificity"]),
        "accuracy": _est(rm["accuracy"]),
        "roc_point": {"fpr": _clean(1.0 - spec), "tpr": _clean(sens)},
        "reader_auc": _reader_auc(rows, y),
        "model_at_reader_specificity": None,
        "model_at_reader_sensitivity": None,
    }
    both = 0 < y.sum() < len(y)
    if both:
        at_spec = m.threshold_for_specificity(y, s, spec)
        at_sens = m.threshold_for_sensitivity(y, s, sens)
        n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
        out["model_at_reader_specificity"] = {
            "threshold": at_spec.threshold,
            "sensitivity": _est(m.proportion(round(at_spec.sensitivity * n_pos), n_pos)),
            "specificity": at_spec.specificity,
            "sensitivity_difference": at_spec.sensitivity - sens,
        }
        out["model_at_reader_sensitivity"] = {
            "threshold": at_sens.threshold,
            "sensitivity": at_sens.sensitivity,
            "specificity": _est(m.proportion(round(at_sens.specificity * n_neg), n_neg)),
            "specificity_difference": at_sens.specificity - spec,
        }
    model_called = s >= threshold
    model_ok, reader_ok = model_called == (y == 1), called == (y == 1)
    mc = m.counts_from_calls(y, model_called)
    mm = m.metrics_from_counts(mc)
    pos, neg = y == 1, y == 0
    out["locked_threshold"] = {
        "threshold": float(threshold),
        "model_sensitivity": _est(mm["sensitivity"]),
        "model_specificity": _est(mm["specificity"]),
        "model_accuracy": _est(mm["accuracy"]),
        "mcnemar": {
            "accuracy": _mcnemar(m.mcnemar_test(model_ok, reader_ok, exact_below)),
            "sensitivity": _mcnemar(m.mcnemar_test(model_ok[pos], reader_ok[pos], exact_below))
            if pos.any()
            else None,
            "specificity": _mcnemar(m.mcnemar_test(model_ok[neg], reader_ok[neg], exact_below))
            if neg.any()
            else None,
        },
    }
    return out


def _reader_auc(rows: Sequence[ReaderCall], y: np.ndarray) -> dict | None:
    """Reader AUC from confidence, when given: a positive call scores +confidence, a negative
    call -confidence, so a confident negative ranks lowest."""
    if any(r.confidence is None for r in rows) or not 0 < y.sum() < len(y):
        return None
    signed = np.array([r.confidence if r.call == 1 else -r.confidence for r in rows], dtype=float)
    res = m.auc_delong(y, signed)
    return {"auc": res.auc, "auc_ci95": [_clean(res.ci95[0]), _clean(res.ci95[1])]}


def _binary_groups(readers, calls, labels, y_all, s_all) -> dict:
    groups: dict[str, dict] = {}
    for exp in sorted({r["experience"] for r in readers}):
        members = [r for r in readers if r["experience"] == exp]
        rows = [c for c in calls if c.experience == exp]
        y = np.array([labels[c.image] for c in rows], dtype=np.int64)
        called = np.array([c.call for c in rows]) == 1
        cm = m.metrics_from_counts(m.counts_from_calls(y, called))
        sens = _mean([r["sensitivity"]["value"] for r in members])
        spec = _mean([r["specificity"]["value"] for r in members])
        group = {
            "n_readers": len(members),
            "mean_sensitivity": sens,
            "mean_specificity": spec,
            "pooled_sensitivity": _est(cm["sensitivity"]),
            "pooled_specificity": _est(cm["specificity"]),
            "roc_point": {"fpr": _clean(None if spec is None else 1 - spec), "tpr": sens},
            "model_sensitivity_at_mean_specificity": None,
            "model_specificity_at_mean_sensitivity": None,
        }
        if spec is not None:
            group["model_sensitivity_at_mean_specificity"] = m.threshold_for_specificity(
                y_all, s_all, spec
            ).sensitivity
        if sens is not None:
            group["model_specificity_at_mean_sensitivity"] = m.threshold_for_sensitivity(
                y_all, s_all, sens
            ).specificity
        groups[exp] = group
    return groups


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


# ----------------------------------------------------------------------------- multi-class


def compare_multiclass(
    calls: Sequence[ReaderCall],
    labels: Mapping[str, int],
    probs: Mapping[str, Sequence[float]],
    classes: Sequence[str],
    *,
    exact_below: int = m.MCNEMAR_EXACT_BELOW,
) -> dict:
    """Multi-class reader study (e.g. three grades); calls and labels are class indices.

    Keys: task_type, classes, n_images, mcnemar_rule, model {top1_accuracy, per_class {class:
    {auc, auc_ci95, roc {fpr, tpr}}}}, readers [ {reader, experience, n_images, accuracy,
    model_accuracy, accuracy_difference, mcnemar, per_class {class: {sensitivity, specificity,
    roc_point, model_sensitivity_at_reader_specificity}}} ], groups {experience: {n_readers,
    mean_accuracy, pooled_accuracy, mean_model_accuracy}}.
    """
    _check_images(calls, probs)
    keys = sorted(probs)
    k = len(classes)
    y_all = m.as_class_labels([labels[i] for i in keys], k)
    p_all = m.as_probs([probs[i] for i in keys], len(keys), k)
    result = m.multiclass_metrics(y_all, p_all)
    model_pc = {}
    for c, name in enumerate(classes):
        entry = {"auc": None, "auc_ci95": None, "roc": None}
        pcm = result.per_class[c]
        if pcm.auc is not None:
            binary = (y_all == c).astype(np.int64)
            fpr, tpr = m.roc_on_grid(binary, p_all[:, c])
            entry = {
                "auc": pcm.auc.auc,
                "auc_ci95": [_clean(pcm.auc.ci95[0]), _clean(pcm.auc.ci95[1])],
                "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
            }
        model_pc[str(name)] = entry
    readers = [
        _multiclass_reader(name, rows, labels, probs, classes, exact_below)
        for name, rows in sorted(_group_calls(calls).items())
    ]
    groups = {}
    for exp in sorted({r["experience"] for r in readers}):
        members = [r for r in readers if r["experience"] == exp]
        rows = [c for c in calls if c.experience == exp]
        correct = sum(int(c.call == labels[c.image]) for c in rows)
        groups[exp] = {
            "n_readers": len(members),
            "mean_accuracy": _mean([r["accuracy"]["value"] for r in members]),
            "pooled_accuracy": _est(m.proportion(correct, len(rows))),
            "mean_model_accuracy": _mean([r["model_accuracy"]["value"] for r in members]),
        }
    return {
        "task_type": "multiclass",
        "classes": [str(c) for c in classes],
        "n_images": len(keys),
        "mcnemar_rule": mcnemar_rule(exact_below),
        "model": {"top1_accuracy": _est(result.top1_accuracy), "per_class": model_pc},
        "readers": readers,
        "groups": groups,
    }


def _multiclass_reader(name, rows, labels, probs, classes, exact_below) -> dict:
    k = len(classes)
    y = np.array([labels[r.image] for r in rows], dtype=np.int64)
    p = np.array([probs[r.image] for r in rows], dtype=float)
    calls = np.array([r.call for r in rows], dtype=np.int64)
    if calls.min() < 0 or calls.max() >= k:
        raise ValueError(f"reader {name!r} has calls outside the {k} classes")
    reader_ok = calls == y
    model_ok = np.argmax(p, axis=1) == y
    per_class = {}
    for c, cname in enumerate(classes):
        binary = (y == c).astype(np.int64)
        cc = m.counts_from_calls(binary, calls == c)
        cm = m.metrics_from_counts(cc)
        sens, spec = cm["sensitivity"].value, cm["specificity"].value
        model_sens = None
        if 0 < binary.sum() < len(binary):
            model_sens = m.threshold_for_specificity(binary, p[:, c], spec).sensitivity
        per_class[str(cname)] = {
            "sensitivity": _est(cm["sensitivity"]),
            "specificity": _est(cm["specificity"]),
            "roc_point": {
                "fpr": _clean(None if math.isnan(spec) else 1.0 - spec),
                "tpr": _clean(None if math.isnan(sens) else sens),
            },
            "model_sensitivity_at_reader_specificity": model_sens,
        }
    acc = m.proportion(int(reader_ok.sum()), len(rows))
    macc = m.proportion(int(model_ok.sum()), len(rows))
    return {
        "reader": name,
        "experience": rows[0].experience,
        "n_images": len(rows),
        "accuracy": _est(acc),
        "model_accuracy": _est(macc),
        "accuracy_difference": macc.value - acc.value,
        "mcnemar": _mcnemar(m.mcnemar_test(model_ok, reader_ok, exact_below)),
        "per_class": per_class,
    }
