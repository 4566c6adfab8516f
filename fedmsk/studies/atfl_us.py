"""ATFL ultrasound: three grades, 13 centers, 8:1:1 by patient, the model against 12 readers.

Figures: accuracy, sensitivity, specificity and F1 per grade (one vs rest) and overall, on the
pooled internal test splits of the training centers and on the external center, at image and
patient level. Reader study: each of the 12 readers (junior / intermediate / senior) against
the final model on the external center's images (``FED_ROOT/readers/<alias>.csv``): each
reader's own figures, McNemar on paired correct/incorrect calls, and reader points on the
model's one-vs-rest ROC per grade (:func:`fedmsk.reader_study.compare_multiclass`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedmsk.config import ExperimentConfig
from fedmsk.studies.base import (
    ALL_SPLITS,
    Scores,
    Study,
    StudyContext,
    StudyOutput,
    Variant,
    by_patient,
    concat,
    fmt,
    fmt_p,
    md_table,
    read_reader_calls,
    reader_csv,
    score_sites,
)
from fedmsk.studies.multiclass import class_figures, class_table, model_figures


def variants(cfg: ExperimentConfig) -> list[Variant]:
    return []


def _reader_study(ctx: StudyContext, external: dict[str, Scores], classes: Sequence[str]):
    """compare_multiclass on every external center with a readers file, keys made unique."""
    from fedmsk.reader_study import ReaderCall, compare_multiclass

    calls, labels, probs = [], {}, {}
    for alias, scores in external.items():
        path = reader_csv(ctx.root, alias)
        if path is None:
            continue
        for image, y, p in zip(scores.images, scores.labels, scores.probs, strict=True):
            labels[f"{alias}/{image}"] = int(y)
            probs[f"{alias}/{image}"] = [float(v) for v in p]
        for call in read_reader_calls(path, classes):
            calls.append(
                ReaderCall(
                    call.reader,
                    call.experience,
                    f"{alias}/{call.image}",
                    call.call,
                    call.confidence,
                )
            )
    if not calls:
        return None, []
    known = set(probs)
    unscored = sum(1 for c in calls if c.image not in known)
    calls = [c for c in calls if c.image in known]
    result = compare_multiclass(calls, labels, probs, classes)
    result["calls_without_model_score"] = unscored
    per_reader = _per_reader_figures(calls, labels, probs, classes)
    return result, per_reader


def _per_reader_figures(calls, labels, probs, classes) -> list[dict[str, Any]]:
    """Each reader's per-grade figures beside the model's on the same images."""
    out = []
    for reader in sorted({c.reader for c in calls}):
        rows = [c for c in calls if c.reader == reader]
        y = np.array([labels[c.image] for c in rows], dtype=np.int64)
        called = np.array([c.call for c in rows], dtype=np.int64)
        p = np.array([probs[c.image] for c in rows], dtype=float)
        out.append(
            {
                "reader": reader,
                "experience": rows[0].experience,
                "reader_figures": class_figures(y, called, classes, None),
                "model_figures": class_figures(y, np.argmax(p, axis=1), classes, None),
            }
        )
    return out


def _roc_figure(path: Path, readers: dict[str, Any]) -> Path | None:
    """Model one-vs-rest ROC per grade with each reader's operating point."""
    from matplotlib.figure import Figure

    per_class = readers["model"]["per_class"]
    names = list(per_class)
    fig = Figure(figsize=(4.2 * len(names), 4.2))
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    markers = {"junior": "o", "intermediate": "^", "senior": "s"}
    for ax, name in zip(axes, names, strict=True):
        roc = per_class[name].get("roc")
        if roc:
            auc = per_class[name].get("auc")
            ax.plot(roc["fpr"], roc["tpr"], color="tab:blue", label=f"model (AUC {fmt(auc)})")
        for reader in readers["readers"]:
            point = reader["per_class"][name]["roc_point"]
            if point["fpr"] is None or point["tpr"] is None:
                continue
            ax.plot(
                [point["fpr"]],
                [point["tpr"]],
                markers.get(reader["experience"], "D"),
                linestyle="none",
                markersize=5,
                label=f"{reader['reader']} ({reader['experience']})",
            )
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.6, linestyle=":")
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        ax.set_title(f"{name} vs rest", fontsize=9)
        ax.legend(fontsize=5.5, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _reader_table(readers: dict[str, Any], per_reader: list[dict[str, Any]]) -> str:
    figures = {r["reader"]: r for r in per_reader}
    rows = []
    for r in readers["readers"]:
        own = figures[r["reader"]]["reader_figures"]["overall"]
        rows.append(
            [
                r["reader"],
                r["experience"],
                fmt(r["n_images"]),
                fmt(r["accuracy"]),
                fmt(own["macro_sensitivity"]),
                fmt(own["macro_specificity"]),
                fmt(own["macro_f1"]),
                fmt(r["model_accuracy"]),
                fmt_p(r["mcnemar"]["p"]),
            ]
        )
    header = [
        "reader",
        "experience",
        "n",
        "reader accuracy",
        "macro sensitivity",
        "macro specificity",
        "macro F1",
        "model accuracy (same images)",
        "McNemar p",
    ]
    groups = [
        [exp, fmt(g["n_readers"]), fmt(g["mean_accuracy"]), fmt(g["mean_model_accuracy"])]
        for exp, g in readers["groups"].items()
    ]
    return (
        md_table(header, rows)
        + "\n\n"
        + md_table(["experience", "readers", "mean accuracy", "model accuracy"], groups)
    )


def analyse(ctx: StudyContext) -> StudyOutput:
    cfg = ctx.cfg
    classes = list(cfg.task.classes)
    how = cfg.evaluation.patient_aggregation
    model = ctx.main.load_model()
    internal = concat(
        list(score_sites(ctx, ctx.main, model, ctx.training_sites, ("test",)).values()),
        len(classes),
    )
    external_sites = score_sites(ctx, ctx.main, model, ctx.heldout_sites, ALL_SPLITS)
    external = concat(list(external_sites.values()), len(classes))
    sets = {"internal_test": internal, "external": external}
    image_level = {name: model_figures(s, classes) for name, s in sets.items()}
    patient_level = {name: model_figures(by_patient(s, how), classes) for name, s in sets.items()}
    readers, per_reader = _reader_study(ctx, external_sites, classes)
    section: dict[str, Any] = {
        "image_level": image_level,
        "patient_level": patient_level,
        "patient_aggregation": how,
        "readers": per_reader,
    }
    parts = []
    for name, title in (("internal_test", "Internal test"), ("external", "External center")):
        parts.append(f"## {title}, image level\n\n{class_table(image_level[name])}")
        parts.append(f"## {title}, patient level ({how})\n\n{class_table(patient_level[name])}")
    if readers is not None:
        figure = _roc_figure(ctx.figures / "study_readers_roc.png", readers)
        section["figures"] = [figure.name] if figure else []
        parts.append(
            "## Model vs readers (external center)\n\n"
            + _reader_table(readers, per_reader)
            + "\n\nMcNemar on paired correct/incorrect calls (model vs reader, same images)."
            + (f"\n\n![ROC with reader points](figures/{figure.name})" if figure else "")
        )
    else:
        parts.append("## Model vs readers\n\nNo readers file (FED_ROOT/readers/<alias>.csv).")
    ext = image_level["external"] or {}
    section["headline"] = {
        "internal top-1": fmt(
            (image_level["internal_test"] or {}).get("overall", {}).get("top1_accuracy")
        ),
        "external top-1": fmt(ext.get("overall", {}).get("top1_accuracy")),
        "external macro F1": fmt(ext.get("overall", {}).get("macro_f1")),
        "readers mean accuracy": fmt(
            float(np.mean([r["accuracy"]["value"] for r in readers["readers"]]))
            if readers
            else None
        ),
    }
    return StudyOutput(section, "\n\n".join(parts), readers=readers)


STUDY = Study(
    name="atfl_us",
    title="ATFL ultrasound: three grades, model vs 12 readers",
    variants=variants,
    analyse=analyse,
)
