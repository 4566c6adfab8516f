"""Per-class tables shared by the multi-class studies (ATFL grades, femoral devices)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedmsk import metrics as m
from fedmsk.studies.base import Scores, auc_entry, clean, estimate, fmt, md_table


def class_figures(
    labels: np.ndarray, predicted: np.ndarray, classes: Sequence[str], probs: np.ndarray | None
) -> dict[str, Any]:
    """Per class (one vs rest): accuracy, sensitivity, specificity, precision, F1 (Wilson CIs)
    and, with ``probs``, AUC with DeLong CI; overall: top-1 accuracy and macro averages.

    ``predicted`` are class indices (the model's argmax or a reader's calls).
    """
    k = len(classes)
    y = np.asarray(labels, dtype=np.int64)
    cm = m.confusion_matrix(y, np.asarray(predicted, dtype=np.int64), k)
    total = int(cm.sum())
    per_class: dict[str, Any] = {}
    macro: dict[str, list[float]] = {"sensitivity": [], "specificity": [], "f1": []}
    for c, name in enumerate(classes):
        tp = int(cm[c, c])
        fn = int(cm[c].sum()) - tp
        fp = int(cm[:, c].sum()) - tp
        tn = total - tp - fn - fp
        est = m.metrics_from_counts(m.ConfusionCounts(tp, fp, tn, fn))
        entry = {
            "n": tp + fn,
            "accuracy": estimate(est["accuracy"]),
            "sensitivity": estimate(est["sensitivity"]),
            "specificity": estimate(est["specificity"]),
            "precision": estimate(est["precision"]),
            "f1": estimate(est["f1"]),
        }
        if probs is not None:
            entry["auc"] = auc_entry((y == c).astype(np.int64), probs[:, c])
            if entry["auc"]["value"] is not None:
                fpr, tpr = m.roc_on_grid((y == c).astype(np.int64), probs[:, c])
                entry["roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
        for key in macro:
            value = entry[key]["value"]
            if value is not None:
                macro[key].append(value)
        per_class[str(name)] = entry
    overall = {
        "n": total,
        "top1_accuracy": estimate(m.proportion(int(np.trace(cm)), total)),
        **{f"macro_{k}": (float(np.mean(v)) if v else None) for k, v in macro.items()},
    }
    return clean({"overall": overall, "per_class": per_class, "confusion_matrix": cm.tolist()})


def model_figures(scores: Scores, classes: Sequence[str]) -> dict[str, Any] | None:
    if not len(scores):
        return None
    return class_figures(scores.labels, np.argmax(scores.probs, axis=1), classes, scores.probs)


def class_table(figures: dict[str, Any] | None, with_auc: bool = True) -> str:
    if not figures:
        return "No images."
    header = ["class", "n", "accuracy", "sensitivity", "specificity", "precision", "F1"]
    if with_auc:
        header.append("AUC [95% CI]")
    rows = []
    for name, entry in figures["per_class"].items():
        row = [name, fmt(entry["n"])]
        row += [fmt(entry[k]) for k in ("accuracy", "sensitivity", "specificity", "precision")]
        row.append(fmt(entry["f1"]))
        if with_auc:
            row.append(fmt(entry.get("auc")))
        rows.append(row)
    overall = figures["overall"]
    last = ["overall (top-1 / macro)", fmt(overall["n"]), fmt(overall["top1_accuracy"])]
    last += [fmt(overall["macro_sensitivity"]), fmt(overall["macro_specificity"]), ""]
    last.append(fmt(overall["macro_f1"]))
    if with_auc:
        last.append("")
    rows.append(last)
    return md_table(header, rows)


def confusion_table(figures: dict[str, Any] | None, classes: Sequence[str]) -> str:
    if not figures:
        return ""
    matrix = figures["confusion_matrix"]
    rows = [[f"true {c}", *map(str, row)] for c, row in zip(classes, matrix, strict=True)]
    return md_table(["", *[f"pred {c}" for c in classes]], rows)
