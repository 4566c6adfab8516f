"""Fresh vs old vertebral compression fracture: the study's networks, two surgeons.

The main run trains the configured model. When that is one of the study's networks
(EfficientNet-B0 at ``scale=paper``), the variants train the other two on the same splits (train
/ val at the training centers, the external center as the separate control set); the CPU
default, the slim ResNet-18, runs alone, because the study's networks do not learn from random
weights at a CPU budget and would triple the run time (docs/studies.md). Per model, on the
validation splits and on the control set: AUC with DeLong CI, accuracy, sensitivity,
specificity, F1 and precision at the threshold locked on validation, ROC. Pairwise paired
DeLong tests between the architectures, and each model against the two surgeons on the control
set (McNemar, at the model's locked threshold, :func:`fedmsk.reader_study.compare_binary`).
"""

from __future__ import annotations

from itertools import combinations
from typing import Any

from fedmsk.config import ExperimentConfig
from fedmsk.studies.base import (
    ALL_SPLITS,
    RunHandle,
    Scores,
    Study,
    StudyContext,
    StudyOutput,
    Variant,
    align,
    binary_figures,
    concat,
    fmt,
    fmt_p,
    lock_threshold,
    md_table,
    paired_delong,
    read_reader_calls,
    reader_csv,
    score_sites,
)

ARCHITECTURES = ("efficientnet_b0", "mobilenetv3_large_100", "mnasnet_100")


def variants(cfg: ExperimentConfig) -> list[Variant]:
    """The study's other networks, when the main run trains one of them; else none."""
    if cfg.model.name not in ARCHITECTURES:
        return []
    return [
        Variant(name, (f"model.name={name}",)) for name in ARCHITECTURES if name != cfg.model.name
    ]


def _evaluate(ctx: StudyContext, run: RunHandle) -> dict[str, Any]:
    model = run.load_model()
    val = score_sites(ctx, run, model, ctx.training_sites, ("val",))
    control = score_sites(ctx, run, model, ctx.heldout_sites, ALL_SPLITS)
    return {
        "val_sites": val,
        "val": concat(list(val.values()), 2),
        "control_sites": control,
        "control": concat(list(control.values()), 2),
        "threshold": lock_threshold(list(val.values())),
    }


def _surgeons(ctx: StudyContext, control: dict[str, Scores], threshold: float | None):
    from fedmsk.reader_study import ReaderCall, compare_binary

    calls, labels, scores = [], {}, {}
    for alias, s in control.items():
        path = reader_csv(ctx.root, alias)
        if path is None:
            continue
        for image, y, p in zip(s.images, s.labels, s.positive, strict=True):
            labels[f"{alias}/{image}"] = int(y)
            scores[f"{alias}/{image}"] = float(p)
        for c in read_reader_calls(path, ctx.cfg.task.classes):
            key = f"{alias}/{c.image}"
            if key in scores:
                calls.append(ReaderCall(c.reader, c.experience, key, c.call, c.confidence))
    if not calls or not 0 < sum(labels.values()) < len(labels):
        return None
    return compare_binary(calls, labels, scores, threshold=threshold)


def analyse(ctx: StudyContext) -> StudyOutput:
    runs = {ctx.cfg.model.name: ctx.main}
    runs.update({name: run for name, run in ctx.variants.items()})
    evaluated = {name: _evaluate(ctx, run) for name, run in runs.items()}
    per_model: dict[str, Any] = {}
    rows = []
    for name, ev in evaluated.items():
        per_model[name] = {
            "threshold": ev["threshold"],
            "val": binary_figures(ev["val"].labels, ev["val"].positive, ev["threshold"]),
            "control": binary_figures(
                ev["control"].labels, ev["control"].positive, ev["threshold"]
            ),
        }
        for part in ("val", "control"):
            f = per_model[name][part]
            row = [name, part, fmt(f["n"]), fmt(f["auc"])]
            row += [fmt(f.get(k)) for k in ("accuracy", "sensitivity", "specificity", "f1")]
            row.append(fmt(f.get("precision")))
            rows.append(row)
    comparisons = []
    for part in ("val", "control"):
        for first, second in combinations(evaluated, 2):
            a = evaluated[first][part]
            b = align(a, evaluated[second][part])
            test = paired_delong(f"{part} {first} vs {second}", a.labels, a.positive, b.positive)
            if test is not None:
                comparisons.append(test)
    surgeons = {
        name: _surgeons(ctx, ev["control_sites"], ev["threshold"]) for name, ev in evaluated.items()
    }
    header = ["model", "set", "n", "AUC [95% CI]", "accuracy", "sensitivity", "specificity"]
    header += ["F1", "precision"]
    parts = ["## Models\n\n" + md_table(header, rows)]
    if len(evaluated) < 2:
        pairwise = (
            f"One network was trained ({ctx.cfg.model.name}), so there is no pair to compare. "
            "The study's networks and their pairwise tests: `model=efficientnet_b0` (CPU size, "
            "where they do not learn from random weights) or `scale=paper` (GPU size)."
        )
    else:
        pairwise = md_table(
            ["comparison", "AUC 1", "AUC 2", "Z", "P"],
            [
                [c["name"], fmt(c["auc1"]), fmt(c["auc2"]), fmt(c["z"]), fmt_p(c["p"])]
                for c in comparisons
            ],
        )
    parts.append("## Pairwise DeLong (paired)\n\n" + pairwise)
    parts.append(_surgeon_table(surgeons))
    figure = _roc_figure(ctx, per_model, surgeons.get(ctx.cfg.model.name))
    if figure:
        parts.append(f"![ROC per model on the control set](figures/{figure})")
    if ctx.missing:
        parts.append(f"Architectures whose run failed: {', '.join(sorted(ctx.missing))}.")
    section = {
        "architectures": list(runs),
        "models": per_model,
        "surgeons": {name: _surgeon_summary(s) for name, s in surgeons.items()},
        "figures": [figure] if figure else [],
        "headline": {
            f"control AUC {name}": fmt(per_model[name]["control"]["auc"]) for name in per_model
        },
    }
    readers = surgeons.get(ctx.cfg.model.name)
    return StudyOutput(section, "\n\n".join(parts), readers=readers, comparisons=comparisons)


def _surgeon_summary(result: dict[str, Any] | None) -> list[dict[str, Any]] | None:
    if result is None:
        return None
    out = []
    for r in result["readers"]:
        locked = r["locked_threshold"]
        out.append(
            {
                "reader": r["reader"],
                "sensitivity": r["sensitivity"],
                "specificity": r["specificity"],
                "accuracy": r["accuracy"],
                "model_sensitivity": locked["model_sensitivity"],
                "model_specificity": locked["model_specificity"],
                "model_accuracy": locked["model_accuracy"],
                "mcnemar_accuracy_p": locked["mcnemar"]["accuracy"]["p"],
            }
        )
    return out


def _surgeon_table(surgeons: dict[str, dict[str, Any] | None]) -> str:
    rows = []
    for name, result in surgeons.items():
        for r in _surgeon_summary(result) or []:
            rows.append(
                [
                    name,
                    r["reader"],
                    fmt(r["accuracy"]),
                    fmt(r["model_accuracy"]),
                    fmt(r["sensitivity"]),
                    fmt(r["model_sensitivity"]),
                    fmt(r["specificity"]),
                    fmt(r["model_specificity"]),
                    fmt_p(r["mcnemar_accuracy_p"]),
                ]
            )
    if not rows:
        return "## Models vs surgeons\n\nNo readers file for the control set."
    header = ["model", "surgeon", "surgeon acc.", "model acc.", "surgeon sens.", "model sens."]
    header += ["surgeon spec.", "model spec.", "McNemar p (accuracy)"]
    return "## Models vs surgeons (control set)\n\n" + md_table(header, rows)


def _roc_figure(ctx: StudyContext, per_model: dict[str, Any], surgeons: Any) -> str | None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 5.0))
    ax = fig.subplots()
    drawn = 0
    for name, entry in per_model.items():
        roc = entry["control"].get("roc")
        if roc:
            drawn += 1
            auc = fmt(entry["control"]["auc"])
            ax.plot(roc["fpr"], roc["tpr"], label=f"{name} (AUC {auc})")
    for r in (surgeons or {}).get("readers", []):
        point = r["roc_point"]
        if point["fpr"] is not None and point["tpr"] is not None:
            ax.plot([point["fpr"]], [point["tpr"]], "k^", linestyle="none", label=r["reader"])
    if not drawn:
        return None
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.6, linestyle=":")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    curves = "ROC per architecture" if drawn > 1 else "ROC of the network"
    ax.set_title(f"Control set: {curves}, surgeons as points", fontsize=9)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    path = ctx.figures / "study_roc_models.png"
    fig.savefig(path, dpi=100)
    return path.name


STUDY = Study(
    name="vcf_xray",
    title="Vertebral compression fracture (fresh vs old): the networks vs two surgeons",
    variants=variants,
    analyse=analyse,
)
