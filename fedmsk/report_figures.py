"""Figures of the study report: ROC with CI bands and reader points, confusion matrices,
reliability curves and training curves. Matplotlib without pyplot (an Agg canvas per figure,
no global state). Every function takes whitelisted records from :mod:`fedmsk.report_data`
and returns the PNG path, or None when there is nothing to draw.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedmsk.report_data import Curve, MetricPoint, ReaderStudy, SiteResult, SummaryView

Z95 = 1.959964
DPI = 110


def _grid(n: int, size: float = 3.1, max_cols: int = 4) -> tuple[Figure, list[Axes]]:
    cols = max(1, min(max_cols, n))
    rows = max(1, math.ceil(n / cols))
    fig = Figure(figsize=(size * cols, size * rows + 0.3))
    axes = list(np.asarray(fig.subplots(rows, cols, squeeze=False)).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def center_colours(names: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """A distinct colour per center, the same in every figure that lists the same centers:
    tab10 up to ten, tab20 beyond (matplotlib's default cycle repeats after ten, so a
    13-center federation would draw two centers alike)."""
    from matplotlib import colormaps

    palette = colormaps["tab20"] if len(names) > 10 else colormaps["tab10"]
    return {name: palette(i % palette.N) for i, name in enumerate(sorted(names))}


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    return path


def wilson_band(tpr: Sequence[float], n_positive: int) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise 95% Wilson interval of sensitivity at each FPR, from the number of positives.

    Used when the summary carries no bootstrap band: it shows the sampling uncertainty of each
    point of the curve (not a simultaneous band), from aggregate numbers only.
    """
    p = np.clip(np.asarray(tpr, dtype=float), 0.0, 1.0)
    n = float(n_positive)
    z2 = Z95 * Z95
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = Z95 * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)


def roc_band(roc: Curve, n_positive: int | None) -> tuple[np.ndarray, np.ndarray, str] | None:
    if roc.lower is not None and roc.upper is not None:
        return np.asarray(roc.lower), np.asarray(roc.upper), "bootstrap 95% band"
    if n_positive:
        low, high = wilson_band(roc.tpr, n_positive)
        return low, high, "pointwise 95% Wilson band"
    return None


def _roc_axes(ax: Axes, title: str) -> None:
    ax.plot([0, 1], [0, 1], color="0.7", linestyle=":", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("1 - specificity", fontsize=8)
    ax.set_ylabel("sensitivity", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=9)


def _auc_label(summary: SummaryView) -> str:
    auc = summary.auc
    if auc is None or auc.value is None:
        return "AUC n/a"
    if auc.has_ci:
        return f"AUC {auc.value:.3f} [{auc.low:.3f}, {auc.high:.3f}]"
    return f"AUC {auc.value:.3f}"


def roc_by_site(sites: Sequence[SiteResult], path: Path) -> Path | None:
    """Binary: one panel per center with its CI band and the operating point at the threshold."""
    drawable = [s for s in sites if s.summary.binary and s.summary.roc is not None]
    if not drawable:
        return None
    fig, axes = _grid(len(drawable))
    for ax, site in zip(axes, drawable, strict=True):
        summary, roc = site.summary, site.summary.roc
        assert roc is not None
        colour = "tab:blue" if site.role == "train" else "tab:red"
        band = roc_band(roc, summary.n_positive)
        if band is not None:
            ax.fill_between(roc.fpr, band[0], band[1], color=colour, alpha=0.18, label=band[2])
        ax.plot(roc.fpr, roc.tpr, color=colour, linewidth=1.6, label=_auc_label(summary))
        sens = summary.at_threshold.get("sensitivity")
        spec = summary.at_threshold.get("specificity")
        if sens and spec and sens.value is not None and spec.value is not None:
            ax.plot(
                [1 - spec.value],
                [sens.value],
                "o",
                color="black",
                markersize=4,
                label="at locked threshold",
            )
        role = "held-out" if site.role == "heldout" else "train"
        _roc_axes(ax, f"{site.alias} ({role}, {site.split})")
        ax.legend(loc="lower right", fontsize=6.5)
    return _save(fig, path)


def roc_overlay(sites: Sequence[SiteResult], pooled: SummaryView | None, path: Path) -> Path | None:
    """All centers on one axes: training centers solid, held-out centers dashed."""
    curves = [(s.alias, s.role, s.summary) for s in sites if s.summary.roc is not None]
    if pooled is not None and pooled.roc is not None:
        curves.append(("pooled val", "pooled", pooled))
    if not curves:
        return None
    fig = Figure(figsize=(5.2, 5.0))
    ax = fig.subplots()
    styles = {"train": "-", "heldout": "--", "pooled": "-."}
    colours = center_colours([name for name, role, _ in curves if role != "pooled"])
    for name, role, summary in curves:
        assert summary.roc is not None
        auc = summary.auc.value if summary.auc and summary.auc.value is not None else None
        label = f"{name} ({auc:.3f})" if auc is not None else name
        colour = colours.get(name, "black")
        width = 2.2 if role == "heldout" else 1.3  # the external result stands out
        ax.plot(
            summary.roc.fpr,
            summary.roc.tpr,
            styles[role],
            color=colour,
            linewidth=width,
            label=label,
        )
    _roc_axes(ax, "ROC by center (AUC); dashed, thick = held-out")
    ax.legend(loc="lower right", fontsize=7, ncol=2 if len(curves) > 8 else 1)
    return _save(fig, path)


def roc_per_class(sites: Sequence[SiteResult], path: Path) -> Path | None:
    """Multi-class: one panel per center, one-vs-rest curve per class."""
    drawable = [s for s in sites if s.summary.roc_per_class]
    if not drawable:
        return None
    fig, axes = _grid(len(drawable))
    for ax, site in zip(axes, drawable, strict=True):
        aucs = {row.name: row.auc for row in site.summary.per_class}
        for name, roc in site.summary.roc_per_class.items():
            auc = aucs.get(name)
            label = f"{name} ({auc.value:.3f})" if auc and auc.value is not None else name
            ax.plot(roc.fpr, roc.tpr, linewidth=1.4, label=label)
        role = "held-out" if site.role == "heldout" else "train"
        _roc_axes(ax, f"{site.alias} ({role}): one-vs-rest")
        ax.legend(loc="lower right", fontsize=6.5)
    return _save(fig, path)


def roc_readers(study: ReaderStudy, path: Path) -> Path | None:
    """The model's ROC on the reader-study images, with each reader and group mean as points."""
    if study.model_roc is None and not any(r.roc_point for r in study.readers):
        return None
    fig = Figure(figsize=(5.4, 5.2))
    ax = fig.subplots()
    if study.model_roc is not None:
        roc = study.model_roc
        band = roc_band(roc, study.n_positive)
        if band is not None:
            ax.fill_between(roc.fpr, band[0], band[1], color="tab:blue", alpha=0.18, label=band[2])
        auc = study.model_auc
        label = "model"
        if auc is not None and auc.value is not None:
            label += f" (AUC {auc.value:.3f}"
            label += f" [{auc.low:.3f}, {auc.high:.3f}])" if auc.has_ci else ")"
        ax.plot(roc.fpr, roc.tpr, color="tab:blue", linewidth=1.6, label=label)
    markers = "o^sDvP*X"
    experiences = sorted({r.experience for r in study.readers})
    for reader in study.readers:
        if reader.roc_point is None:
            continue
        marker = markers[experiences.index(reader.experience) % len(markers)]
        ax.plot(
            [reader.roc_point[0]],
            [reader.roc_point[1]],
            marker,
            markersize=6,
            linestyle="none",
            label=f"{reader.label} ({reader.experience})",
        )
    for group in study.groups:
        if group.sensitivity is not None and group.specificity is not None:
            ax.plot(
                [1 - group.specificity],
                [group.sensitivity],
                "k*",
                markersize=11,
                linestyle="none",
                label=f"mean {group.experience}",
            )
    _roc_axes(ax, "Model vs readers")
    ax.legend(loc="lower right", fontsize=6.5)
    return _save(fig, path)


def confusion_matrices(sites: Sequence[SiteResult], path: Path) -> Path | None:
    """One annotated count matrix per center (rows = true class, columns = predicted)."""
    drawable = [s for s in sites if s.summary.confusion is not None]
    if not drawable:
        return None
    fig, axes = _grid(len(drawable), size=2.9)
    for ax, site in zip(axes, drawable, strict=True):
        matrix = np.asarray(site.summary.confusion, dtype=float)
        classes = site.summary.classes
        totals = matrix.sum(axis=1, keepdims=True)
        share = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for (i, j), count in np.ndenumerate(matrix):
            colour = "white" if share[i, j] > 0.6 else "black"
            ax.text(j, i, f"{int(count)}", ha="center", va="center", fontsize=8, color=colour)
        ticks = list(range(len(classes)))
        ax.set_xticks(ticks, classes, fontsize=7, rotation=30 if len(classes) > 2 else 0)
        ax.set_yticks(ticks, classes, fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        role = "held-out" if site.role == "heldout" else "train"
        ax.set_title(f"{site.alias} ({role})", fontsize=9)
    return _save(fig, path)


def calibration_curves(sites: Sequence[SiteResult], path: Path) -> Path | None:
    """Reliability curves (fraction positive against mean predicted probability per bin)."""
    drawable = []
    for site in sites:
        cal = site.summary.calibration
        if cal is None:
            continue
        points = [
            (x, y)
            for x, y in zip(cal.mean_predicted, cal.fraction_positive, strict=False)
            if x is not None and y is not None
        ]
        if points:
            drawable.append((site, cal, points))
    if not drawable:
        return None
    title = "Calibration (reliability curve); dashed = held-out"
    training = [item for item in drawable if item[0].role != "heldout"]
    pooled = _pooled_bins([cal for _, cal, _ in training]) if len(training) > 6 else None
    if pooled:
        drawable = [item for item in drawable if item[0].role == "heldout"]
        title = "Calibration: training centers pooled (solid), held-out (dashed)"
    fig = Figure(figsize=(5.2, 5.0))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=1, label="perfect calibration")
    if pooled:
        xs, ys = zip(*pooled, strict=True)
        label = f"{len(training)} training centers, validation images pooled"
        ax.plot(xs, ys, "-", color="black", marker="o", markersize=3, linewidth=1.4, label=label)
    for site, cal, points in drawable:
        xs, ys = zip(*points, strict=True)
        extra = []
        if cal.brier is not None:
            extra.append(f"Brier {cal.brier:.3f}")
        if cal.ece is not None:
            extra.append(f"ECE {cal.ece:.3f}")
        style = "--" if site.role == "heldout" else "-"
        label = f"{site.alias}" + (f" ({', '.join(extra)})" if extra else "")
        ax.plot(xs, ys, style, marker="o", markersize=3, linewidth=1.2, label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("mean predicted probability", fontsize=8)
    ax.set_ylabel("observed fraction positive", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left", fontsize=6.5)
    return _save(fig, path)


def _pooled_bins(calibrations: Sequence) -> list[tuple[float, float]]:
    """Count-weighted bins of several centers' reliability curves (same bin edges), so a
    figure with many small centers shows one readable curve instead of a dozen noisy ones."""
    totals: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    for cal in calibrations:
        rows = zip(cal.mean_predicted, cal.fraction_positive, cal.count, strict=False)
        for index, (x, y, n) in enumerate(rows):
            if x is None or y is None or not n:
                continue
            totals[index][0] += x * n
            totals[index][1] += y * n
            totals[index][2] += n
    return [(sx / n, sy / n) for _, (sx, sy, n) in sorted(totals.items()) if n]


def _series(
    points: Sequence[MetricPoint], phase: str, key: str
) -> dict[str | None, tuple[list[int], list[float]]]:
    by_site: dict[str | None, dict[int, float]] = defaultdict(dict)
    for point in points:
        if point.phase == phase and key in point.values:
            by_site[point.site][point.round] = point.values[key]
    return {
        site: (sorted(values), [values[r] for r in sorted(values)])
        for site, values in by_site.items()
    }


PHASE_NAMES = {
    "train": "train",
    "val": "validation",
    "heldout": "held-out (not for choosing a round)",
}


SCORE_TITLES = {"auc": "AUC per round", "top1_accuracy": "Top-1 accuracy per round"}


def _plot_series(
    ax: Axes, series: dict, phase: str, style: str, colours: dict[str, tuple]
) -> tuple[int, bool]:
    """All centers' curves of one phase (thin, coloured per center) and the all-centers curve
    (thick, black). Returns how many were drawn and whether any was a center's."""
    drawn, per_center = 0, False
    for site, (rounds, values) in sorted(series.items(), key=lambda kv: str(kv[0])):
        if site is None:
            ax.plot(
                rounds,
                values,
                style,
                color="black",
                linewidth=2,
                marker="o",
                markersize=3,
                label=f"{PHASE_NAMES.get(phase, phase)} (all centers)",
            )
        else:
            ax.plot(
                rounds,
                values,
                style,
                color=colours.get(site, "grey"),
                linewidth=1,
                alpha=0.7,
                marker=".",
            )
            per_center = True
        drawn += 1
    return drawn, per_center


def _style_key(ax: Axes, phases: list[tuple[str, str]]) -> None:
    """Legend of the axes: the thick all-centers curves, and what a thin line's style means."""
    from matplotlib.lines import Line2D

    handles, labels = ax.get_legend_handles_labels()
    for phase, style in phases:
        handles.append(Line2D([], [], color="grey", linestyle=style, linewidth=1))
        labels.append(f"{PHASE_NAMES.get(phase, phase)}, one center")
    if handles:
        ax.legend(handles, labels, fontsize=6.5)


def training_curves(history: Sequence[MetricPoint], path: Path) -> Path | None:
    """Loss per round (training) and AUC (or top-1 accuracy) per round on val / held-out.

    Each center keeps one colour in both panels, named in the legend under the figure."""
    from matplotlib.lines import Line2D

    if not history:
        return None
    score_key = "auc" if any("auc" in p.values for p in history) else "top1_accuracy"
    sites = sorted({p.site for p in history if p.site is not None})
    colours = center_colours(sites)
    fig = Figure(figsize=(10, 4.6 if sites else 4.0))
    loss_ax, score_ax = fig.subplots(1, 2)
    panels = (
        (loss_ax, "loss", (("train", "-"), ("val", "--")), "Loss per round"),
        (score_ax, score_key, (("val", "-"), ("heldout", "--")), SCORE_TITLES[score_key]),
    )
    drawn = 0
    for ax, key, phases, title in panels:
        thin = []
        for phase, style in phases:
            count, per_center = _plot_series(
                ax, _series(history, phase, key), phase, style, colours
            )
            drawn += count
            if per_center:
                thin.append((phase, style))
        ax.set_xlabel("round", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        _style_key(ax, thin)
    if drawn == 0:
        return None
    if sites:
        fig.legend(
            [Line2D([], [], color=colours[s], linewidth=2) for s in sites],
            sites,
            loc="lower center",
            ncol=min(len(sites), 12),
            fontsize=6.5,
            title="center colours",
            title_fontsize=7,
            frameon=False,
        )
        fig.tight_layout(rect=(0, 0.12, 1, 1))
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=DPI, metadata={"Software": None})
        return path
    return _save(fig, path)
