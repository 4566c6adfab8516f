"""Aggregate-only evaluation summaries: what a site may report about a model's performance.

``summarize`` turns per-image labels and probabilities (which never leave the node) into a
JSON-safe dict of aggregates: counts, AUC with CIs, operating-point metrics, a ROC curve on a
fixed 101-point FPR grid, calibration bins and confusion matrices. No per-image score, image key
or patient identifier appears in the output. The key names are pinned in docs/interfaces.md.

``score_histogram`` and ``threshold_from_histograms`` let the server lock a Youden threshold on
the union of the sites' validation sets from binned score counts alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedmsk import metrics as m

HISTOGRAM_RANGE = (0.0, 1.0)


def _num(x: float | None) -> float | None:
    """JSON-safe float: NaN and infinities become None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _pair(p: tuple[float, float] | None) -> list[float | None] | None:
    return None if p is None else [_num(p[0]), _num(p[1])]


def _estimate(e: m.Estimate) -> dict:
    return {"value": _num(e.value), "ci95": _pair(e.ci95)}


def summarize(
    labels: Sequence[int] | np.ndarray,
    probs: Sequence[Sequence[float]] | np.ndarray,
    classes: Sequence[str],
    *,
    threshold: float | None = None,
    bootstrap: int = 0,
    seed: int = 0,
    patient_ids: Sequence[str] | None = None,
    patient_aggregation: str = "mean",
) -> dict:
    """Summary of one evaluation (one site, one split), aggregate only.

    ``labels`` are class indices, ``probs`` is (N, C) with C == len(classes). Two classes make a
    binary task whose positive class is index 1 and score ``probs[:, 1]``; ``threshold`` None
    picks the Youden threshold on these data (``threshold_source`` says which). ``bootstrap`` > 0
    adds ``auc_bootstrap_ci95`` (stratified percentile, seeded). With ``patient_ids`` the same
    summary is computed on per-patient aggregated scores under ``patient_level``. Undefined
    quantities are None, with a ``*_reason`` field saying why (e.g. a single-class site).
    """
    classes = [str(c) for c in classes]
    k = len(classes)
    if k < 2:
        raise ValueError(f"classes must name at least two classes, got {classes}")
    y = m.as_class_labels(labels, k)
    if len(y) == 0:
        raise ValueError("cannot summarise an empty evaluation (no cases)")
    p = m.as_probs(probs, len(y), k)
    out = _summary(y, p, classes, threshold, bootstrap, seed)
    if patient_ids is not None:
        py, pp = m.aggregate_by_patient(y, p, patient_ids, patient_aggregation)
        out["patient_level"] = _summary(py, pp, classes, threshold, bootstrap, seed)
        out["patient_level"]["aggregation"] = patient_aggregation
    return out


def _summary(y, p, classes, threshold, bootstrap, seed) -> dict:
    k = len(classes)
    counts = np.bincount(y, minlength=k)
    base = {
        "n": int(len(y)),
        "n_per_class": {c: int(n) for c, n in zip(classes, counts, strict=True)},
        "task_type": "binary" if k == 2 else "multiclass",
        "classes": list(classes),
    }
    if k == 2:
        base.update(_binary(y, p[:, 1], threshold, bootstrap, seed))
    else:
        base.update(_multiclass(y, p, classes))
    return base


def _binary(y: np.ndarray, s: np.ndarray, threshold, bootstrap: int, seed: int) -> dict:
    n_pos = int(y.sum())
    both = 0 < n_pos < len(y)
    out: dict = {}
    if both:
        auc = m.auc_delong(y, s)
        out.update(auc=auc.auc, auc_ci95=_pair(auc.ci95), auc_variance=_num(auc.variance))
        if not math.isfinite(auc.variance):
            out["auc_variance_reason"] = "DeLong variance needs at least two cases of each class"
        if bootstrap > 0:
            out["auc_bootstrap_ci95"] = _pair(m.bootstrap_auc_ci(y, s, bootstrap, seed))
        yd = m.youden_threshold(y, s)
        out["youden"] = {
            "threshold": yd.threshold,
            "sensitivity": yd.sensitivity,
            "specificity": yd.specificity,
        }
        fpr, tpr = m.roc_on_grid(y, s)
        out["roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    else:
        reason = f"only one class present ({'positive' if n_pos else 'negative'} cases only)"
        out.update(auc=None, auc_ci95=None, auc_variance=None, auc_reason=reason)
        out.update(youden=None, youden_reason=reason, roc=None, roc_reason=reason)
    if threshold is None and both:
        threshold, source = out["youden"]["threshold"], "youden"
    else:
        source = "given" if threshold is not None else None
    out["threshold"] = _num(threshold)
    out["threshold_source"] = source
    if threshold is not None:
        counts = m.confusion_counts(y, s, float(threshold))
        estimates = m.metrics_from_counts(counts)
        out["at_threshold"] = {name: _estimate(estimates[name]) for name in m.BINARY_METRICS}
        cm = [[counts.tn, counts.fp], [counts.fn, counts.tp]]
    else:
        out["at_threshold"] = None
        out["threshold_reason"] = "no threshold given and Youden is undefined with one class"
        cm = None
    out["confusion_matrix"] = cm
    out["calibration"] = _calibration(y, s)
    return out


def _calibration(y: np.ndarray, s: np.ndarray) -> dict:
    if np.any((s < 0) | (s > 1)):
        return {"brier": None, "ece": None, "bins": None, "reason": "scores outside [0, 1]"}
    cal = m.calibration(y, s)
    return {
        "brier": cal.brier,
        "ece": cal.ece,
        "bins": {
            "mean_predicted": cal.mean_predicted,
            "fraction_positive": cal.fraction_positive,
            "count": cal.count,
        },
    }


def _multiclass(y: np.ndarray, p: np.ndarray, classes: list[str]) -> dict:
    res = m.multiclass_metrics(y, p)
    per_class, roc_per_class = {}, {}
    for c, name in enumerate(classes):
        pc = res.per_class[c]
        entry = {
            "auc": None if pc.auc is None else pc.auc.auc,
            "auc_ci95": None if pc.auc is None else _pair(pc.auc.ci95),
            "precision": _num(pc.precision.value),
            "sensitivity": _num(pc.sensitivity.value),
            "specificity": _num(pc.specificity.value),
            "f1": _num(pc.f1.value),
        }
        if pc.auc is None:
            entry["auc_reason"] = pc.auc_reason
            roc_per_class[name] = None
        else:
            fpr, tpr = m.roc_on_grid((y == c).astype(np.int64), p[:, c])
            roc_per_class[name] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
        per_class[name] = entry
    return {
        "top1_accuracy": _num(res.top1_accuracy.value),
        "macro_f1": _num(res.macro_f1),
        "weighted_f1": _num(res.weighted_f1),
        "confusion_matrix": res.confusion.tolist(),
        "per_class": per_class,
        "roc_per_class": roc_per_class,
    }


# ----------------------------------------------------------------------------- federated threshold


def _positive_scores(probs) -> np.ndarray:
    arr = np.asarray(probs, dtype=np.float64)
    if arr.ndim == 2:
        if arr.shape[1] != 2:
            raise ValueError(
                f"score histograms are for binary tasks; probs has {arr.shape[1]} columns"
            )
        arr = arr[:, 1]
    if arr.ndim != 1 or not np.all(np.isfinite(arr)):
        raise ValueError("scores must be a finite 1-D array or an (N, 2) probability array")
    return arr


def score_histogram(labels, probs, bins: int = 200) -> dict | None:
    """Counts of the positive-class score per class in ``bins`` equal bins on [0, 1].

    Bin b holds scores in [b/bins, (b+1)/bins) (the last bin includes 1), so "score >= edge b"
    is exactly "bin >= b": thresholds on bin edges are evaluated without error.
    Keys: bins, range, negative (counts), positive (counts). A multi-class ``probs`` (more than
    two columns) has no positive-class score: the result is None, so callers may call this for
    every task and skip the threshold step when it is None.
    """
    if np.ndim(probs) == 2 and np.shape(probs)[1] > 2:
        return None
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    y = m.as_binary_labels(labels)
    s = _positive_scores(probs)
    if len(s) != len(y):
        raise ValueError(f"{len(y)} labels but {len(s)} scores")
    if np.any((s < 0) | (s > 1)):
        raise ValueError("score histograms need probabilities in [0, 1]")
    edges = np.linspace(*HISTOGRAM_RANGE, bins + 1)
    which = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, bins - 1)
    return {
        "bins": int(bins),
        "range": list(HISTOGRAM_RANGE),
        "negative": np.bincount(which[y == 0], minlength=bins).astype(int).tolist(),
        "positive": np.bincount(which[y == 1], minlength=bins).astype(int).tolist(),
    }


def threshold_from_histograms(histograms: Sequence[dict]) -> float:
    """Youden threshold (a bin edge) from the sum of the sites' score histograms.

    The rule is "positive when score >= threshold". Among edges with the same maximal
    sensitivity + specificity, the middle of the first run of such edges is chosen, so a gap
    between the classes is split rather than hugged.
    """
    if not histograms:
        raise ValueError("threshold_from_histograms needs at least one histogram")
    bins = {int(h["bins"]) for h in histograms}
    if len(bins) != 1:
        raise ValueError(f"histograms have different bin counts: {sorted(bins)}")
    nb = bins.pop()
    neg = np.zeros(nb, dtype=np.int64)
    pos = np.zeros(nb, dtype=np.int64)
    for h in histograms:
        n_arr, p_arr = np.asarray(h["negative"]), np.asarray(h["positive"])
        if n_arr.shape != (nb,) or p_arr.shape != (nb,) or (n_arr < 0).any() or (p_arr < 0).any():
            raise ValueError(f"a histogram does not have {nb} non-negative counts per class")
        neg += n_arr.astype(np.int64)
        pos += p_arr.astype(np.int64)
    if pos.sum() == 0 or neg.sum() == 0:
        raise ValueError(
            f"Youden threshold needs both classes: {pos.sum()} positive, {neg.sum()} negative"
        )
    # edge e (0..nb-1): positive when bin >= e
    sens = pos[::-1].cumsum()[::-1] / pos.sum()
    spec = np.concatenate([[0], neg.cumsum()[:-1]]) / neg.sum()
    j = sens + spec - 1.0
    best = j.max()
    is_best = np.isclose(j, best, rtol=0, atol=1e-12)
    first = int(np.argmax(is_best))
    last = first
    while last + 1 < nb and is_best[last + 1]:
        last += 1
    edges = np.linspace(*HISTOGRAM_RANGE, nb + 1)
    return float(edges[(first + last) // 2])


def locked_threshold(histograms: Sequence[dict | None], fallback: float) -> tuple[float, str]:
    """The threshold to lock on validation, and where it came from.

    Youden on the summed histograms when the validation sets hold both classes; otherwise the
    configured fixed threshold, said so in the source, so one small site never stops a run.
    """
    usable = [h for h in histograms if h]
    try:
        return threshold_from_histograms(usable), "youden on federated validation histograms"
    except ValueError as exc:
        return float(fallback), f"fixed ({exc})"
