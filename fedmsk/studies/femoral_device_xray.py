"""Proximal femoral device identification: six classes on hip radiographs, split by patient.

Figures on the pooled internal test splits and on the external center, at image and patient
level: top-1 accuracy; per class precision, sensitivity, specificity, F1 and one-vs-rest AUC
with DeLong CI; ROC per class; confusion matrix. Grad-CAM: one row per true class of the
internal test images (the CAM explains the predicted class), in ``figures/cam_*.png``.
"""

from __future__ import annotations

from typing import Any

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
    score_sites,
    site_loaders,
)
from fedmsk.studies.multiclass import class_table, confusion_table, model_figures


def variants(cfg: ExperimentConfig) -> list[Variant]:
    return []


def _cam(ctx: StudyContext, model: Any, scores_sites: list[str], name: str) -> str | None:
    """Grad-CAM grid, one row per true class, of the test images of ``scores_sites``."""
    from torch.utils.data import ConcatDataset

    from fedmsk.explain import cam_grid_by_outcome
    from fedmsk.pointing import score_sites, write_pointing

    cfg = ctx.cfg
    parts = []
    by_site = {}
    for alias in scores_sites:
        loaders = site_loaders(cfg, ctx.site_dir(alias), alias)
        test = loaders.dataset("test")
        if test is not None and len(test):
            parts.append(test.unaugmented())
            by_site[alias] = (parts[-1], ctx.site_dir(alias))
    if not parts:
        return None
    game = score_sites(model, by_site, 0.5, cfg.evaluation.cam_method)
    if game is not None:  # does the map point at the device? (the generator knows where it is)
        write_pointing(ctx.main.path, {name.replace("_", " "): game})
    path = ctx.figures / f"cam_{name}.png"
    cam_grid_by_outcome(
        model,
        ConcatDataset(parts),
        0.5,
        list(cfg.task.classes),
        per_group=max(1, cfg.evaluation.gradcam_images),
        out_path=path,
        method=cfg.evaluation.cam_method,
    )
    return path.name


def _roc_figure(ctx: StudyContext, figures: dict[str, Any] | None, name: str) -> str | None:
    from matplotlib.figure import Figure

    if not figures:
        return None
    curves = {c: e["roc"] for c, e in figures["per_class"].items() if e.get("roc")}
    if not curves:
        return None
    fig = Figure(figsize=(5.2, 5.0))
    ax = fig.subplots()
    for cls, roc in curves.items():
        auc = fmt(figures["per_class"][cls].get("auc"))
        ax.plot(roc["fpr"], roc["tpr"], label=f"{cls} (AUC {auc})")
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.6, linestyle=":")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"One-vs-rest ROC per class ({name})", fontsize=9)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    path = ctx.figures / f"study_roc_{name}.png"
    fig.savefig(path, dpi=100)
    return path.name


def analyse(ctx: StudyContext) -> StudyOutput:
    cfg = ctx.cfg
    classes = list(cfg.task.classes)
    how = cfg.evaluation.patient_aggregation
    model = ctx.main.load_model()
    internal = concat(
        list(score_sites(ctx, ctx.main, model, ctx.training_sites, ("test",)).values()),
        len(classes),
    )
    external = concat(
        list(score_sites(ctx, ctx.main, model, ctx.heldout_sites, ALL_SPLITS).values()),
        len(classes),
    )
    sets: dict[str, Scores] = {"internal_test": internal, "external": external}
    image_level = {name: model_figures(s, classes) for name, s in sets.items()}
    patient_level = {name: model_figures(by_patient(s, how), classes) for name, s in sets.items()}
    figures = [f for f in (_roc_figure(ctx, image_level[n], n) for n in sets) if f]
    cam = _cam(ctx, model, ctx.training_sites, "internal_test") if cfg.evaluation.gradcam else None
    if cam:
        figures.append(cam)
    parts = []
    for name, title in (("internal_test", "Internal test"), ("external", "External center")):
        parts.append(f"## {title}, image level\n\n{class_table(image_level[name])}")
        parts.append(
            f"Confusion matrix (rows true):\n\n{confusion_table(image_level[name], classes)}"
        )
        parts.append(f"## {title}, patient level ({how})\n\n{class_table(patient_level[name])}")
    parts.append("\n\n".join(f"![{f}](figures/{f})" for f in figures))
    section = {
        "image_level": image_level,
        "patient_level": patient_level,
        "patient_aggregation": how,
        "figures": figures,
        "headline": {
            "internal top-1": fmt(
                (image_level["internal_test"] or {}).get("overall", {}).get("top1_accuracy")
            ),
            "external top-1": fmt(
                (image_level["external"] or {}).get("overall", {}).get("top1_accuracy")
            ),
            "external macro F1": fmt(
                (image_level["external"] or {}).get("overall", {}).get("macro_f1")
            ),
        },
    }
    return StudyOutput(section, "\n\n".join(parts))


STUDY = Study(
    name="femoral_device_xray",
    title="Femoral device identification: six classes",
    variants=variants,
    analyse=analyse,
)
