"""First MTP joint ultrasound for gout: one model for all views vs one model per view.

The main run is the *single model* (all three views). The *multiple model* is three runs of
the same protocol, each restricted to one view (``task.views=[dorsal]`` ...), and each image is
scored by the model of its own view. Both are evaluated on the same images: the pooled internal
test splits of the training centers and the external center. Figures overall and per view:
AUC with DeLong CI, and accuracy, sensitivity, specificity at a threshold locked on the
validation splits (Youden on per-site score histograms, as the federation locks it); paired
DeLong test (Z, P) single vs multiple. Patient level (the three views of a patient aggregated by
``evaluation.patient_aggregation``) for the overall comparison.
"""

from __future__ import annotations

from typing import Any

import numpy as np

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
    by_patient,
    concat,
    fmt,
    fmt_p,
    lock_threshold,
    md_table,
    paired_delong,
    score_sites,
)

VIEWS = ("dorsal", "medial", "plantar")


def variants(cfg: ExperimentConfig) -> list[Variant]:
    """One model per view, each trained for a third of the main run's rounds: a view holds a
    third of the images, so each image is seen as often as by the single model (equal passes,
    as a study trains each of its models for the same epochs), and the three cost one run."""
    rounds = max(1, round(cfg.federation.num_rounds / len(VIEWS)))
    return [
        Variant(f"view-{view}", (f"task.views=[{view}]", f"federation.num_rounds={rounds}"))
        for view in VIEWS
    ]


def _scored(ctx: StudyContext, run: RunHandle) -> dict[str, dict[str, Scores]]:
    """val / test per training site and all images per external site, for one run."""
    model = run.load_model()
    return {
        "val": score_sites(ctx, run, model, ctx.training_sites, ("val",)),
        "internal_test": score_sites(ctx, run, model, ctx.training_sites, ("test",)),
        "external": score_sites(ctx, run, model, ctx.heldout_sites, ALL_SPLITS),
    }


def _combine_views(per_view: list[dict[str, dict[str, Scores]]]) -> dict[str, dict[str, Scores]]:
    """The multiple model's scores: each site's images from their own view's model."""
    out: dict[str, dict[str, Scores]] = {}
    for part in ("val", "internal_test", "external"):
        aliases = {a for scored in per_view for a in scored[part]}
        out[part] = {
            a: concat([s[part][a] for s in per_view if a in s[part]], 2) for a in sorted(aliases)
        }
    return out


def _keep_scored(single: Scores, multiple: Scores) -> Scores:
    keys = set(multiple.image_keys())
    return single.subset([k in keys for k in single.image_keys()])


def analyse(ctx: StudyContext) -> StudyOutput:
    cfg = ctx.cfg
    how = cfg.evaluation.patient_aggregation
    single = _scored(ctx, ctx.main)
    view_runs = [ctx.variants[f"view-{v}"] for v in VIEWS if f"view-{v}" in ctx.variants]
    if not view_runs:
        table = "No per-view run finished: the multiple model could not be built."
        return StudyOutput({"missing": ctx.missing, "headline": {}}, table)
    multiple = _combine_views([_scored(ctx, run) for run in view_runs])
    thresholds = {
        "image": {
            "single": lock_threshold(list(single["val"].values())),
            "multiple": lock_threshold(list(multiple["val"].values())),
        },
        "patient": {
            "single": lock_threshold([by_patient(s, how) for s in single["val"].values()]),
            "multiple": lock_threshold([by_patient(s, how) for s in multiple["val"].values()]),
        },
    }
    results: dict[str, Any] = {}
    comparisons: list[dict[str, Any]] = []
    rows: list[list[str]] = []
    for part in ("internal_test", "external"):
        multi = concat(list(multiple[part].values()), 2)
        one = _keep_scored(concat(list(single[part].values()), 2), multi)
        multi = align(one, multi)
        results[part] = {}
        groups = [("overall", np.ones(len(one), dtype=bool))]
        groups += [(v, np.array([w == v for w in one.views], dtype=bool)) for v in VIEWS]
        for view, mask in groups:
            a, b = one.subset(mask), multi.subset(mask)
            entry = _pair_entry(a, b, thresholds["image"], f"{part} {view}", comparisons)
            results[part][view] = entry
            rows += _rows(part, "image", view, entry)
        pa, pb = by_patient(one, how), align(by_patient(one, how), by_patient(multi, how))
        entry = _pair_entry(pa, pb, thresholds["patient"], f"{part} patients", comparisons)
        results[part]["patient_level"] = entry
        rows += _rows(part, f"patient ({how})", "overall", entry)
    header = ["set", "level", "view", "model", "n", "AUC [95% CI]", "accuracy", "sensitivity"]
    header += ["specificity", "DeLong Z", "DeLong P"]
    table = md_table(header, rows)
    table += (
        "\n\nSingle model: one federated model for all views. Multiple model: one federated model"
        " per view, each image scored by its view's model. Thresholds locked on the validation "
        f"splits: single {fmt(thresholds['image']['single'])}, multiple "
        f"{fmt(thresholds['image']['multiple'])} (image level)."
    )
    if ctx.missing:
        table += f"\n\nPer-view runs that failed: {', '.join(sorted(ctx.missing))}."
    ext = results["external"]["overall"]
    section = {
        "views": list(VIEWS),
        "thresholds": thresholds,
        "results": results,
        "patient_aggregation": how,
        "headline": {
            "internal AUC single": fmt(results["internal_test"]["overall"]["single"]["auc"]),
            "internal AUC multiple": fmt(results["internal_test"]["overall"]["multiple"]["auc"]),
            "external AUC single": fmt(ext["single"]["auc"]),
            "external AUC multiple": fmt(ext["multiple"]["auc"]),
            "external DeLong P": fmt_p((ext.get("delong") or {}).get("p")),
        },
    }
    return StudyOutput(section, table, comparisons=comparisons)


def _pair_entry(
    a: Scores, b: Scores, thresholds: dict[str, float | None], name: str, comparisons: list
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "single": binary_figures(a.labels, a.positive, thresholds["single"]),
        "multiple": binary_figures(b.labels, b.positive, thresholds["multiple"]),
        "delong": None,
    }
    if len(a):
        label = f"{name.replace('_', ' ')} single vs multiple"  # "internal test", not the key
        test = paired_delong(label, a.labels, a.positive, b.positive)
        entry["delong"] = test
        if test is not None:
            comparisons.append(test)
    return entry


def _rows(part: str, level: str, view: str, entry: dict[str, Any]) -> list[list[str]]:
    rows = []
    test = entry.get("delong") or {}
    for model in ("single", "multiple"):
        f = entry[model]
        row = [part, level, view, model, fmt(f["n"]), fmt(f["auc"])]
        row += [fmt(f.get(k)) for k in ("accuracy", "sensitivity", "specificity")]
        row += [fmt(test.get("z")), fmt_p(test.get("p"))] if model == "single" else ["", ""]
        rows.append(row)
    return rows


STUDY = Study(
    name="gout_mtp1_us",
    title="Gout, first MTP joint ultrasound: single model vs one model per view",
    variants=variants,
    analyse=analyse,
)
