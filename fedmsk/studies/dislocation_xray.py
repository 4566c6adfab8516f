"""Joint dislocation on radiographs: one binary model per joint, trained on a web collection.

Training uses only the web-collection center (``site00``); the three hospitals never train and
are the external test (their ``role`` is ``heldout``). For each joint (shoulder, elbow, hip,
THA) two models are trained on that joint's images: with on-the-fly augmentation, and with
static augmentation (:func:`fedmsk.data.augment.static_augment` writes ``STATIC_COPIES``
augmented copies of every training image into a copy of the federation, then training runs
without on-the-fly augmentation). Figures per joint: internal AUC (the web collection's test
split) and external AUC (the three hospitals pooled, and each hospital), on-the-fly vs static
(paired DeLong on the same external images), and Grad-CAM grids of the external test images.
The main run (all joints in one model) is reported beside them for reference.

With one training center, FedAvg is that center's own training, so the per-joint runs are
trained in this process (see :mod:`fedmsk.studies.runner`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
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
    site_loaders,
)

JOINTS = ("shoulder", "elbow", "hip", "tha")
AUGMENTATIONS = ("onthefly", "static")
STATIC_COPIES = 3


def static_root(cfg: ExperimentConfig) -> Path:
    root = Path(cfg.data.root)
    return root.parent / f"{root.name}-static{STATIC_COPIES}-seed{cfg.seed}"


def prepare_static(cfg: ExperimentConfig) -> tuple[str, ...]:
    """A copy of the federation whose training centers carry static augmented copies.

    Held-out centers are linked, not copied (they are only read); the copy is built under a
    temporary name and renamed when complete, so an interrupted build is never used.
    """
    from fedmsk.data.augment import static_augment, static_copies_under_dp
    from fedmsk.data.federation import FEDERATION_FILE, load_federation

    if cfg.privacy.enabled:
        raise ValueError(static_copies_under_dp(f"{STATIC_COPIES} per training image"))

    source = Path(cfg.data.root)
    target = static_root(cfg)
    if (target / FEDERATION_FILE).is_file():
        return (f"data.root={target}",)
    federation = load_federation(source)
    heldout = set(cfg.federation.heldout_sites) or {s.alias for s in federation.heldout_sites}
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for site in federation.sites:
        src, dst = source / site.dir, partial / site.dir
        if site.alias in heldout:
            _link_or_copy(src, dst)
            continue
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".fedmsk"))
        static_augment(
            dst,
            STATIC_COPIES,
            cfg.seed,
            ratios=list(cfg.data.split_ratios),
            split_seed=cfg.data.split_seed,
            frame=str(cfg.data.frame),
        )
    if (source / "readers").is_dir():
        shutil.copytree(source / "readers", partial / "readers")
    document = json.loads((source / FEDERATION_FILE).read_text(encoding="utf-8"))
    document["static_augmentation"] = {"copies": STATIC_COPIES, "seed": cfg.seed}
    (partial / FEDERATION_FILE).write_text(json.dumps(document, indent=2) + "\n")
    partial.rename(target)
    return (f"data.root={target}",)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        dst.symlink_to(src.resolve(), target_is_directory=True)
    except OSError:
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".fedmsk"))


def variants(cfg: ExperimentConfig) -> list[Variant]:
    out = []
    for joint in JOINTS:
        view = f"task.views=[{joint}]"
        out.append(Variant(f"{joint}-onthefly", (view, "data.augment=true")))
        out.append(Variant(f"{joint}-static", (view, "data.augment=false"), prepare_static))
    return out


def _evaluate(ctx: StudyContext, run: RunHandle, joint: str | None) -> dict[str, Any]:
    """Internal test, validation threshold and external scores; ``joint`` filters the images
    of an all-joints model."""
    model = run.load_model()

    def pick(s: Scores) -> Scores:
        return s if joint is None else s.subset([v == joint for v in s.views])

    val = [pick(s) for s in score_sites(ctx, run, model, ctx.training_sites, ("val",)).values()]
    internal = concat(
        [pick(s) for s in score_sites(ctx, run, model, ctx.training_sites, ("test",)).values()],
        2,
    )
    external = {
        a: pick(s) for a, s in score_sites(ctx, run, model, ctx.heldout_sites, ALL_SPLITS).items()
    }
    return {
        "model": model,
        "threshold": lock_threshold(val),
        "internal": internal,
        "external_sites": external,
        "external": concat(list(external.values()), 2),
    }


def _figures(ev: dict[str, Any], how: str) -> dict[str, Any]:
    t = ev["threshold"]
    ext = ev["external"]
    return {
        "threshold": t,
        "internal": binary_figures(ev["internal"].labels, ev["internal"].positive, t),
        "external": binary_figures(ext.labels, ext.positive, t),
        "external_patient_level": (
            binary_figures(*_pos(by_patient(ext, how)), None) if len(ext) else None
        ),
        "external_per_site": {
            a: binary_figures(s.labels, s.positive, t) for a, s in ev["external_sites"].items()
        },
    }


def _pos(s: Scores) -> tuple[np.ndarray, np.ndarray]:
    return s.labels, s.positive


def _cam(ctx: StudyContext, run: RunHandle, model: Any, joint: str, threshold: float | None):
    from torch.utils.data import ConcatDataset

    from fedmsk.explain import cam_grid_by_outcome
    from fedmsk.pointing import score_sites, write_pointing

    cfg = run.cfg
    parts = []
    by_site = {}
    for alias in ctx.heldout_sites:
        loaders = site_loaders(cfg, ctx.site_dir(alias), alias)
        items = [item for split in ALL_SPLITS if (d := loaders.dataset(split)) for item in d.items]
        if items:
            parts.append(loaders.dataset(ALL_SPLITS[0]).unaugmented(items))
            by_site[alias] = (parts[-1], ctx.site_dir(alias))
    if not parts:
        return None
    cut = 0.5 if threshold is None else threshold
    game = score_sites(model, by_site, cut, cfg.evaluation.cam_method)
    if game is not None:  # does the map point at the joint? (the generator knows where it is)
        write_pointing(ctx.main.path, {f"external {joint}": game})
    path = ctx.figures / f"cam_dislocation_{joint}.png"
    cam_grid_by_outcome(
        model,
        ConcatDataset(parts),
        0.5 if threshold is None else threshold,
        list(cfg.task.classes),
        per_group=max(1, ctx.cfg.evaluation.gradcam_images),
        out_path=path,
        method=cfg.evaluation.cam_method,
    )
    return path.name


def analyse(ctx: StudyContext) -> StudyOutput:
    how = ctx.cfg.evaluation.patient_aggregation
    joints: dict[str, Any] = {}
    comparisons: list[dict[str, Any]] = []
    figures: list[str] = []
    rows: list[list[str]] = []
    for joint in JOINTS:
        entry: dict[str, Any] = {}
        evaluated = {}
        for aug in AUGMENTATIONS:
            run = ctx.variants.get(f"{joint}-{aug}")
            if run is None:
                continue
            evaluated[aug] = _evaluate(ctx, run, None)
            entry[aug] = _figures(evaluated[aug], how)
            if aug == "onthefly" and ctx.cfg.evaluation.gradcam:
                cam = _cam(ctx, run, evaluated[aug]["model"], joint, evaluated[aug]["threshold"])
                if cam:
                    figures.append(cam)
        reference = _evaluate(ctx, ctx.main, joint)
        entry["all_joints_model"] = _figures(reference, how)
        if len(evaluated) == 2:
            for part in ("internal", "external"):
                a = evaluated["onthefly"][part]
                b = align(a, evaluated["static"][part])
                test = paired_delong(
                    f"{joint} {part} onthefly vs static", a.labels, a.positive, b.positive
                )
                entry[f"delong_{part}"] = test
                if test is not None:
                    comparisons.append(test)
        joints[joint] = entry
        rows += _rows(joint, entry)
    hospitals = list(ctx.heldout_sites)
    header = ["joint", "model", "internal AUC", "external AUC (pooled)"]
    header += [f"{h} AUC" for h in hospitals]
    header += ["external sens.", "external spec.", "DeLong P (external)"]
    table = md_table(header, rows)
    table += (
        f"\n\nTrained at {', '.join(ctx.training_sites)} (web collection); external: "
        f"{', '.join(hospitals)}. Static augmentation: {STATIC_COPIES} copies per training image."
        " Thresholds locked on the training center's validation split."
    )
    if figures:
        table += "\n\n" + "\n\n".join(f"![{f}](figures/{f})" for f in figures)
    if ctx.missing:
        table += f"\n\nRuns that failed: {', '.join(sorted(ctx.missing))}."
    section = {
        "joints": joints,
        "training_sites": ctx.training_sites,
        "external_sites": hospitals,
        "static_copies": STATIC_COPIES,
        "figures": figures,
        "headline": {
            f"{j} external AUC ({aug})": fmt(joints[j].get(aug, {}).get("external", {}).get("auc"))
            for j in JOINTS
            for aug in AUGMENTATIONS
        },
    }
    return StudyOutput(section, table, comparisons=comparisons)


def _rows(joint: str, entry: dict[str, Any]) -> list[list[str]]:
    rows = []
    labels = {"onthefly": "on-the-fly aug.", "static": "static aug.", "all_joints_model": "all"}
    for key, label in labels.items():
        f = entry.get(key)
        if f is None:
            continue
        row = [joint, label, fmt(f["internal"]["auc"]), fmt(f["external"]["auc"])]
        row += [fmt(s["auc"]) for s in f["external_per_site"].values()]
        row += [fmt(f["external"].get("sensitivity")), fmt(f["external"].get("specificity"))]
        test = entry.get("delong_external") if key == "onthefly" else None
        row.append(fmt_p(test["p"]) if test else "")
        rows.append(row)
    return rows


STUDY = Study(
    name="dislocation_xray",
    title="Joint dislocation: one model per joint, web-collection training, external hospitals",
    variants=variants,
    analyse=analyse,
)
