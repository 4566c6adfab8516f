"""The study report of a run: ``report.html``, ``report.md``, ``metrics.json`` and ``figures/``.

A reader of the report should see what a multi-center study's tables show: per center (training
centers and held-out centers apart) n, AUC with its 95% CI and the threshold-dependent metrics at
the locked threshold; per class for multi-class tasks; ROC, confusion, calibration and training
curves; the reader comparison, privacy budget and failed rounds when the run has them.

What is shown is chosen, never dumped: :mod:`fedmsk.report_data` reads only known keys and plain
labels, and this module renders those records. The report prints no path (not even the run
directory's), nothing from manifests and nothing from ``config.yaml``, which holds data paths.
The document is built once as a list of blocks and rendered twice (HTML with embedded images,
Markdown with relative links), so the two can never disagree.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedmsk import report_figures as figs
from fedmsk.report_data import (
    AT_THRESHOLD_METRICS,
    PER_CLASS_METRICS,
    Metric,
    PrivacyRow,
    ReportError,
    RunData,
    SiteResult,
    SummaryView,
    history_unit,
    load_run,
)
from fedmsk.report_summary import (
    build_summary,
    cam_method_name,
    fmt_p,
    pointing_sentence,
    threshold_source_text,
)

__all__ = ["ReportError", "ReportPaths", "build_report"]

FIGURE_NAMES = (
    "roc.png",
    "roc_by_center.png",
    "roc_per_class.png",
    "roc_readers.png",
    "confusion.png",
    "calibration.png",
    "training.png",
)


@dataclass(frozen=True)
class ReportPaths:
    html: Path
    markdown: Path
    metrics: Path
    figures: list[Path]


# ----------------------------------------------------------------------------- document model


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    text: str
    warning: bool = False


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Image:
    path: Path
    caption: str


@dataclass
class Document:
    title: str
    blocks: list[Heading | Paragraph | Table | Image] = field(default_factory=list)

    def add(self, *blocks: Heading | Paragraph | Table | Image) -> None:
        self.blocks.extend(blocks)


# ----------------------------------------------------------------------------- formatting


def fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def fmt_metric(value: Metric | None, digits: int = 3) -> str:
    if value is None or value.value is None:
        return "n/a"
    if value.has_ci:
        return f"{value.value:.{digits}f} [{value.low:.{digits}f}, {value.high:.{digits}f}]"
    return f"{value.value:.{digits}f}"


def fmt_count(value: int | None) -> str:
    return "n/a" if value is None else str(value)


# ----------------------------------------------------------------------------- tables

BINARY_HEADERS = [
    "Center",
    "Split",
    "n",
    "Positives",
    "AUC [95% CI]",
    "Accuracy",
    "Sensitivity",
    "Specificity",
    "F1",
    "Precision",
]
MULTICLASS_HEADERS = [
    "Center",
    "Split",
    "n",
    "Top-1 accuracy",
    "Macro F1",
    "Weighted F1",
    "Mean one-vs-rest AUC",
]


def _binary_row(name: str, split: str, summary: SummaryView, with_threshold: bool) -> list[str]:
    at = summary.at_threshold
    row = [
        name,
        split,
        fmt_count(summary.n),
        fmt_count(summary.n_positive),
        fmt_metric(summary.auc),
        fmt_metric(at.get("accuracy")),
        fmt_metric(at.get("sensitivity")),
        fmt_metric(at.get("specificity")),
        fmt_metric(at.get("f1")),
        fmt_metric(at.get("precision")),
    ]
    return row + [fmt(summary.threshold)] if with_threshold else row


def _multiclass_row(name: str, split: str, summary: SummaryView) -> list[str]:
    return [
        name,
        split,
        fmt_count(summary.n),
        fmt_metric(summary.top1),
        fmt_metric(summary.macro_f1),
        fmt_metric(summary.weighted_f1),
        fmt(summary.macro_auc),
    ]


def _center_table(
    rows: Sequence[tuple[str, str, SummaryView]], caption: str, run_threshold: float | None
) -> Table:
    binary = all(summary.binary for _, _, summary in rows)
    if not binary:
        return Table(
            MULTICLASS_HEADERS,
            [_multiclass_row(name, split, summary) for name, split, summary in rows],
            caption,
        )
    with_threshold = any(
        summary.threshold is not None
        and (run_threshold is None or abs(summary.threshold - run_threshold) > 1e-9)
        for _, _, summary in rows
    )
    headers = BINARY_HEADERS + (["Threshold"] if with_threshold else [])
    return Table(
        headers,
        [_binary_row(name, split, summary, with_threshold) for name, split, summary in rows],
        caption,
    )


def _site_rows(sites: Sequence[SiteResult], role: str, patient: bool = False) -> list:
    rows = []
    for site in sites:
        if site.role != role:
            continue
        summary = site.summary.patient_level if patient else site.summary
        if summary is not None:
            rows.append((site.alias, site.split, summary))
    return rows


def _results_section(doc: Document, data: RunData) -> None:
    threshold = data.run.threshold
    doc.add(Heading("Results by center"))
    if data.task_type == "binary":
        doc.add(
            Paragraph(
                "Threshold-dependent metrics are at the locked threshold"
                + (f" {fmt(threshold)}" if threshold is not None else "")
                + ". Brackets give 95% confidence intervals where the run computed them "
                "(AUC: DeLong)."
            )
        )
    for role, caption in (
        ("train", "Training centers (internal validation)"),
        ("heldout", "Held-out centers (external validation, never trained on)"),
    ):
        rows = _site_rows(data.sites, role)
        if rows:
            doc.add(Heading(caption, 3), _center_table(rows, caption, threshold))
    if data.pooled is not None:
        caption = "Pooled validation (all training centers' validation images)"
        doc.add(
            Heading(caption, 3),
            _center_table([("pooled", "val", data.pooled)], caption, threshold),
        )
    patient_rows = _site_rows(data.sites, "train", True) + _site_rows(data.sites, "heldout", True)
    if patient_rows:
        caption = "Patient level (scores aggregated per patient)"
        doc.add(Heading(caption, 3), _center_table(patient_rows, caption, threshold))


def _per_class_section(doc: Document, data: RunData) -> None:
    sites = [s for s in data.sites if s.summary.per_class]
    if not sites:
        return
    doc.add(Heading("Per-class results (one-vs-rest)"))
    headers = ["Class", "n", "Precision", "Sensitivity", "Specificity", "F1", "AUC [95% CI]"]
    for site in sites:
        role = "held-out" if site.role == "heldout" else "training"
        rows = [
            [row.name, fmt_count(row.n)]
            + [fmt_metric(row.metrics.get(name)) for name in PER_CLASS_METRICS]
            + [fmt_metric(row.auc)]
            for row in site.summary.per_class
        ]
        caption = f"{site.alias} ({role} center, {site.split})"
        doc.add(Heading(caption, 3), Table(headers, rows, caption))


def _readers_section(doc: Document, data: RunData, figure: Path | None) -> None:
    study = data.readers
    if study is None:
        return
    doc.add(Heading("Model versus readers"))
    intro = f"{fmt_count(study.n_images)} images were read; each reader is compared with the model "
    intro += "on the images that reader read."
    if study.task_type == "binary":
        intro += (
            f" Model AUC {fmt_metric(study.model_auc)}; at the "
            f"{threshold_source_text(study.model_threshold_source)} threshold "
            f"{fmt(study.model_threshold)} sensitivity "
            f"{fmt_metric(study.model_sensitivity)}, specificity "
            f"{fmt_metric(study.model_specificity)}."
        )
    else:
        intro += f" Model top-1 accuracy {fmt_metric(study.model_top1)}."
    doc.add(Paragraph(intro))
    if study.task_type == "binary":
        headers = [
            "Reader",
            "Experience",
            "n",
            "Sensitivity",
            "Specificity",
            "Model sensitivity at reader specificity",
            "Difference (model - reader)",
            "McNemar p (accuracy)",
        ]
        rows = [
            [
                r.label,
                r.experience,
                fmt_count(r.n_images),
                fmt_metric(r.sensitivity),
                fmt_metric(r.specificity),
                fmt(r.model_sensitivity_at_reader_specificity),
                fmt(r.sensitivity_difference),
                fmt_p(r.mcnemar_p),
            ]
            for r in study.readers
        ]
    else:
        headers = [
            "Reader",
            "Experience",
            "n",
            "Accuracy",
            "Model accuracy",
            "Difference",
            "McNemar p",
        ]
        rows = [
            [
                r.label,
                r.experience,
                fmt_count(r.n_images),
                fmt_metric(r.accuracy),
                fmt_metric(r.model_accuracy),
                fmt(r.accuracy_difference),
                fmt_p(r.mcnemar_p),
            ]
            for r in study.readers
        ]
    doc.add(Table(headers, rows, "Readers"))
    if study.groups:
        group_rows = [
            [
                g.experience,
                fmt_count(g.n_readers),
                fmt(g.sensitivity),
                fmt(g.specificity),
                fmt(g.accuracy),
                fmt(g.model_sensitivity_at_mean_specificity),
            ]
            for g in study.groups
        ]
        doc.add(
            Table(
                [
                    "Experience",
                    "Readers",
                    "Mean sensitivity",
                    "Mean specificity",
                    "Mean accuracy",
                    "Model sensitivity at mean specificity",
                ],
                group_rows,
                "Reader groups",
            )
        )
    if study.mcnemar_rule:
        doc.add(Paragraph(study.mcnemar_rule))
    if figure is not None:
        doc.add(Image(figure, "Model ROC on the reader-study images with reader operating points"))


def _comparisons_section(doc: Document, data: RunData) -> None:
    if not data.comparisons:
        return
    rows = [
        [
            c.label,
            fmt(c.auc1),
            fmt(c.auc2),
            fmt(c.difference),
            f"[{fmt(c.ci_low)}, {fmt(c.ci_high)}]" if c.ci_low is not None else "n/a",
            fmt(c.statistic, 2),
            fmt_p(c.p),
        ]
        for c in data.comparisons
    ]
    doc.add(
        Heading("AUC comparisons (DeLong)"),
        Table(["Comparison", "AUC 1", "AUC 2", "Difference", "95% CI", "Statistic", "p"], rows),
    )


def _privacy_section(doc: Document, data: RunData) -> None:
    if not data.privacy:
        return
    rows = [
        [
            p.site,
            fmt_count(p.rounds_trained),
            fmt(p.epsilon, 2),
            "n/a" if p.delta is None else f"{p.delta:.1e}",
            _lifetime(p),
            "n/a" if p.stopped is None else ("yes" if p.stopped else "no"),
        ]
        for p in data.privacy
    ]
    doc.add(
        Heading("Differential privacy (DP-SGD)"),
        Paragraph(
            "Privacy spent per center in this run, and over its lifetime: every run that "
            "trained on the center's data set composed, against the cap the center set in its "
            "own policy file (no run setting can raise it). A center stops training when either "
            f"budget is reached. {_privacy_unit_sentence(data)}"
        ),
        Table(
            [
                "Center",
                "Rounds trained",
                "epsilon (run)",
                "delta",
                "Lifetime epsilon / cap",
                "Budget reached",
            ],
            rows,
        ),
    )


def _privacy_unit_sentence(data: RunData) -> str:
    if data.run.fields.get("privacy_unit") == "patient":
        return (
            "The unit protected is one patient: under DP each patient kept one training image "
            "(privacy.unit=patient)."
        )
    return (
        "The unit protected is one image: a patient with k images in a training set is "
        "protected at about k times the epsilon (group privacy; privacy.unit=patient protects "
        "patients instead)."
    )


def _lifetime(row: PrivacyRow) -> str:
    if row.lifetime_epsilon is None:
        return "n/a"
    cap = "" if row.lifetime_cap is None else f" / {row.lifetime_cap:g}"
    return f"{row.lifetime_epsilon:.2f}{cap}"


def _failures_section(doc: Document, data: RunData) -> None:
    if not data.failures:
        return
    rows = [[fmt_count(f.round), f.site, f.error] for f in data.failures]
    doc.add(
        Heading("Failed center rounds"),
        Paragraph(
            "Rounds in which a center did not reply or replied with an error; the round "
            "aggregated the other centers. Only the error type is recorded."
        ),
        Table(["Round", "Center", "Error"], rows),
    )


def _summary_section(doc: Document, data: RunData) -> None:
    """The result first, then the reasons for caution (fedmsk.report_summary)."""
    summary = build_summary(data)
    if not summary.headline and not summary.warnings:
        return
    doc.add(Heading("Summary"), *[Paragraph(line) for line in summary.headline])
    doc.add(*[Paragraph(line, warning=True) for line in summary.warnings])


def _run_section(doc: Document, data: RunData) -> None:
    labels = {
        "mode": "Mode",
        "strategy": "Strategy",
        "model": "Model",
        "task": "Task",
        # a pooled or local-only run counts epochs where a federated run counts rounds
        "rounds": history_unit(data.run.fields.get("mode")).capitalize() + "s",
        "each_round": "Each round trains",
        "recipe": "Optimizer, schedule, head",
        "augmentation": "Training augmentation",
        "input": "Input normalisation",
        "precision": "Trained in (scored in fp32)",
        "config_hash": "Config hash",
        "privacy_unit": "DP protects one",
    }
    rows = [[labels[k], v] for k, v in data.run.fields.items()]
    if data.run.classes:
        rows.append(["Classes", ", ".join(data.run.classes)])
    if data.run.threshold is not None:
        source = (
            f" ({threshold_source_text(data.run.threshold_source)})"
            if data.run.threshold_source
            else ""
        )
        rows.append(["Locked threshold", fmt(data.run.threshold) + source])
    train = sum(1 for s in data.sites if s.role == "train")
    heldout = sum(1 for s in data.sites if s.role == "heldout")
    if data.sites:
        rows.append(["Centers evaluated", f"{train} training, {heldout} held-out"])
    if rows:
        doc.add(Heading("Run"), Table(["Setting", "Value"], rows))


# ----------------------------------------------------------------------------- figures


def _make_figures(data: RunData, folder: Path) -> dict[str, Path]:
    for name in FIGURE_NAMES:  # only our own names: a figure that no longer applies goes away
        (folder / name).unlink(missing_ok=True)
    makers: dict[str, Callable[[], Path | None]] = {
        "roc": lambda: figs.roc_overlay(data.sites, data.pooled, folder / "roc.png"),
        "roc_by_center": lambda: figs.roc_by_site(data.sites, folder / "roc_by_center.png"),
        "roc_per_class": lambda: figs.roc_per_class(data.sites, folder / "roc_per_class.png"),
        "roc_readers": lambda: (
            figs.roc_readers(data.readers, folder / "roc_readers.png")
            if data.readers is not None
            else None
        ),
        "confusion": lambda: figs.confusion_matrices(data.sites, folder / "confusion.png"),
        "calibration": lambda: figs.calibration_curves(data.sites, folder / "calibration.png"),
        "training": lambda: figs.training_curves(data.history, folder / "training.png"),
    }
    made = {}
    for key, make in makers.items():
        path = make()
        if path is not None:
            made[key] = path
    return made


def _figures_section(doc: Document, made: dict[str, Path], data: RunData) -> None:
    captions = [
        ("roc", "ROC curves of all centers (AUC in the legend)."),
        (
            "roc_by_center",
            "ROC per center with its 95% band; the dot is the operating point "
            "at the locked threshold.",
        ),
        ("roc_per_class", "One-vs-rest ROC curves per class and center."),
        ("confusion", "Confusion matrices (rows: true class, columns: predicted)."),
        (
            "calibration",
            "Calibration: observed fraction positive per bin of predicted probability.",
        ),
        ("training", "Training curves from metrics.jsonl."),
    ]
    images = [Image(made[key], caption) for key, caption in captions if key in made]
    missing = _missing_figures(made, data)
    if images or missing:
        doc.add(Heading("Figures"), *images)
        if missing:
            doc.add(Paragraph("Not drawn: " + " ".join(missing)))
    if data.cam_figures:
        doc.add(
            Heading(f"Heat maps ({_cam_name(data)})"),
            Paragraph(
                "Heatmaps computed where the images are (on the node or in a local "
                "simulation); red marks the regions that raised the explained class score. "
                "These figures show patient images: share this report only where the images "
                "themselves may go."
            ),
            *[Paragraph(pointing_sentence(row)) for row in data.pointing],
            *[Image(path, f"{_cam_name(data)} overlays") for path in data.cam_figures],
        )


def _cam_name(data: RunData) -> str:
    """The method the heat maps were made with, as the grids and the pointing game recorded it;
    "Grad-CAM" (the family's name) when nothing recorded one or several methods were used."""
    methods = {cam_method_name(m) for m in data.cam_methods}
    methods |= {cam_method_name(row.method) for row in data.pointing}
    return methods.pop() if len(methods) == 1 else "Grad-CAM"


def _missing_figures(made: dict[str, Path], data: RunData) -> list[str]:
    """A sentence for each figure this kind of run should have and does not, saying why."""
    if not data.sites and not data.history:
        return []
    binary = data.task_type == "binary"
    expected = {
        "roc": (binary, "ROC curves: no center's results carry a ROC curve."),
        "roc_per_class": (not binary, "ROC per class: no center carries per-class curves."),
        "confusion": (bool(data.sites), "Confusion matrices: no center's results carry one."),
        "calibration": (binary, "Calibration: no center's results carry calibration bins."),
        "training": (True, "Training curves: metrics.jsonl has no per-round loss or score."),
    }
    sentences = [why for key, (applies, why) in expected.items() if applies and key not in made]
    if not data.cam_figures:
        sentences.append(
            "Grad-CAM: not computed for this run (evaluation.gradcam=false, a run without a "
            "held-out center, or a deployment, where heatmaps stay at each hospital)."
        )
    return sentences


def _methods_notes(doc: Document, data: RunData, made: dict[str, Path]) -> None:
    notes = [
        "AUC confidence intervals: DeLong. Proportion metrics: the intervals the evaluation "
        "computed (Wilson or bootstrap), shown only where present.",
        "Held-out centers are evaluated only; they never contribute to training or to the "
        "choice of threshold.",
    ]
    if "roc_by_center" in made or "roc_readers" in made:
        notes.append(
            "ROC bands: bootstrap band when the run computed one, otherwise a pointwise 95% "
            "Wilson interval on sensitivity from the number of positives."
        )
    doc.add(Heading("Methods notes"), *[Paragraph(n) for n in notes])


def build_document(data: RunData, made: dict[str, Path]) -> Document:
    title_bits = [data.run.fields.get(k) for k in ("task", "model", "mode", "strategy")]
    subtitle = " / ".join(b for b in title_bits if b)
    doc = Document(title="fedmsk study report" + (f": {subtitle}" if subtitle else ""))
    _summary_section(doc, data)
    _run_section(doc, data)
    _results_section(doc, data)
    _per_class_section(doc, data)
    _figures_section(doc, made, data)
    _readers_section(doc, data, made.get("roc_readers"))
    _comparisons_section(doc, data)
    _privacy_section(doc, data)
    _failures_section(doc, data)
    _methods_notes(doc, data, made)
    return doc


# ----------------------------------------------------------------------------- rendering

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; border-bottom: 2px solid #345; padding-bottom: .2em; }
h2 { font-size: 1.3em; margin-top: 1.8em; color: #345; }
h3 { font-size: 1.05em; margin-top: 1.2em; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: .88em; }
th, td { border: 1px solid #ccd; padding: .3em .6em; text-align: right; }
th { background: #eef2f7; }
td:first-child, th:first-child { text-align: left; }
tr:nth-child(even) td { background: #fafbfd; }
figure { margin: 1em 0 1.6em; }
figure img { max-width: 100%; border: 1px solid #dde; }
figcaption { font-size: .85em; color: #555; }
p.warning { background: #fff4e5; border-left: 4px solid #d98200; padding: .4em .8em; }
ul.headline { font-size: 1.02em; }
"""


def render_html(doc: Document, run_dir: Path) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(doc.title)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>{html.escape(doc.title)}</h1>",
    ]
    for block in doc.blocks:
        parts.append(_html_block(block, run_dir))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _html_block(block: Heading | Paragraph | Table | Image, run_dir: Path) -> str:
    if isinstance(block, Heading):
        return f"<h{block.level}>{html.escape(block.text)}</h{block.level}>"
    if isinstance(block, Paragraph):
        if block.warning:
            return f'<p class="warning"><strong>Warning:</strong> {html.escape(block.text)}</p>'
        return f"<p>{html.escape(block.text)}</p>"
    if isinstance(block, Table):
        head = "".join(f"<th>{html.escape(h)}</th>" for h in block.headers)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
            for row in block.rows
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    encoded = base64.b64encode(block.path.read_bytes()).decode("ascii")
    caption = html.escape(block.caption)
    return (
        f'<figure><img alt="{caption}" src="data:image/png;base64,{encoded}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(doc: Document, run_dir: Path) -> str:
    lines = [f"# {doc.title}", ""]
    for block in doc.blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Paragraph):
            lines += [("**Warning:** " if block.warning else "") + block.text, ""]
        elif isinstance(block, Table):
            lines.append("| " + " | ".join(_md_cell(h) for h in block.headers) + " |")
            lines.append("|" + "|".join("---" for _ in block.headers) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            lines.append("")
        else:
            relative = block.path.relative_to(run_dir).as_posix()
            lines += [f"![{block.caption}]({relative})", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- metrics.json


def _flatten_metric(out: dict, key: str, value: Metric | None) -> None:
    if value is None or value.value is None:
        return
    out[key] = value.value
    if value.has_ci:
        out[f"{key}_ci95_low"] = value.low
        out[f"{key}_ci95_high"] = value.high


def _flatten_summary(out: dict, prefix: str, summary: SummaryView) -> None:
    if summary.n is not None:
        out[f"{prefix}.n"] = summary.n
    if summary.binary:
        _flatten_metric(out, f"{prefix}.auc", summary.auc)
        if summary.auc_bootstrap_ci95 is not None:
            out[f"{prefix}.auc_bootstrap_ci95_low"] = summary.auc_bootstrap_ci95[0]
            out[f"{prefix}.auc_bootstrap_ci95_high"] = summary.auc_bootstrap_ci95[1]
        if summary.threshold is not None:
            out[f"{prefix}.threshold"] = summary.threshold
        for name in AT_THRESHOLD_METRICS:
            _flatten_metric(out, f"{prefix}.{name}", summary.at_threshold.get(name))
        if summary.calibration is not None:
            for name in ("brier", "ece"):
                value = getattr(summary.calibration, name)
                if value is not None:
                    out[f"{prefix}.{name}"] = value
    else:
        _flatten_metric(out, f"{prefix}.top1_accuracy", summary.top1)
        _flatten_metric(out, f"{prefix}.macro_f1", summary.macro_f1)
        _flatten_metric(out, f"{prefix}.weighted_f1", summary.weighted_f1)
        for row in summary.per_class:
            _flatten_metric(out, f"{prefix}.per_class.{row.name}.auc", row.auc)
            for name in PER_CLASS_METRICS:
                _flatten_metric(out, f"{prefix}.per_class.{row.name}.{name}", row.metrics[name])
    if summary.patient_level is not None:
        _flatten_summary(out, f"{prefix}.patient_level", summary.patient_level)


def flatten_metrics(data: RunData) -> dict[str, float | int | str | bool]:
    """The key numbers as one flat {dotted.key: value} object, for tables and dashboards."""
    out: dict = {f"run.{k}": v for k, v in data.run.fields.items()}
    if data.run.threshold is not None:
        out["threshold.value"] = data.run.threshold
    if data.run.threshold_source:
        out["threshold.source"] = data.run.threshold_source
    for site in data.sites:
        out[f"sites.{site.alias}.role"] = site.role
        _flatten_summary(out, f"sites.{site.alias}", site.summary)
    if data.pooled is not None:
        _flatten_summary(out, "pooled.val", data.pooled)
    for row in data.privacy:
        if row.epsilon is not None:
            out[f"privacy.{row.site}.epsilon"] = row.epsilon
        if row.stopped is not None:
            out[f"privacy.{row.site}.stopped"] = row.stopped
        if row.lifetime_epsilon is not None:
            out[f"privacy.{row.site}.lifetime_epsilon"] = row.lifetime_epsilon
        if row.lifetime_cap is not None:
            out[f"privacy.{row.site}.lifetime_cap"] = row.lifetime_cap
        if row.rounds_trained is not None:
            out[f"privacy.{row.site}.rounds_trained"] = row.rounds_trained
    out["failures.count"] = len(data.failures)
    if data.readers is not None:
        _flatten_metric(out, "readers.model.auc", data.readers.model_auc)
        for reader in data.readers.readers:
            _flatten_metric(out, f"readers.{reader.label}.sensitivity", reader.sensitivity)
            _flatten_metric(out, f"readers.{reader.label}.specificity", reader.specificity)
            _flatten_metric(out, f"readers.{reader.label}.accuracy", reader.accuracy)
    return out


# ----------------------------------------------------------------------------- entry point


STUDY_TABLE = "study_table.md"


def study_blocks(run_dir: Path) -> list[Heading | Paragraph | Table | Image]:
    """The study protocol's own table (written by fedmsk.studies from aggregate numbers)
    and its ``figures/study_*.png``, so the report shows what the source study reports."""
    path = run_dir / STUDY_TABLE
    if not path.is_file():
        return []
    blocks: list[Heading | Paragraph | Table | Image] = [Heading("Study protocol")]
    table: list[list[str]] = []

    def flush() -> None:
        if len(table) >= 2:
            blocks.append(Table(table[0], [r for r in table[2:]]))
        table.clear()

    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if text.startswith("|"):
            table.append([cell.strip() for cell in text.strip("|").split("|")])
            continue
        flush()
        if text.startswith("#"):
            blocks.append(Heading(text.lstrip("#").strip(), level=3))
        elif text:
            blocks.append(Paragraph(text))
    flush()
    figures = sorted((run_dir / "figures").glob("study_*.png"))
    blocks += [
        Image(f, "Study figure") for f in figures if re.fullmatch(r"study_[\w-]+\.png", f.name)
    ]
    return blocks


def _insert_before_methods(doc: Document, blocks: list) -> None:
    for index, block in enumerate(doc.blocks):
        if isinstance(block, Heading) and block.text == "Methods notes":
            doc.blocks[index:index] = blocks
            return
    doc.blocks.extend(blocks)


def build_report(run_dir: Path | str) -> ReportPaths:
    """Write report.html, report.md, metrics.json and figures/ into ``run_dir``.

    Raises :class:`ReportError` (message names the file and cause) when ``run_dir`` holds
    neither results.json nor metrics.jsonl, or results.json is not a JSON object.
    """
    run_dir = Path(run_dir)
    data = load_run(run_dir)
    folder = run_dir / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    made = _make_figures(data, folder)
    doc = build_document(data, made)
    _insert_before_methods(doc, study_blocks(run_dir))
    html_path, md_path, metrics_path = (
        run_dir / "report.html",
        run_dir / "report.md",
        run_dir / "metrics.json",
    )
    html_path.write_text(render_html(doc, run_dir), encoding="utf-8")
    md_path.write_text(render_markdown(doc, run_dir), encoding="utf-8")
    metrics_path.write_text(
        json.dumps(flatten_metrics(data), indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    return ReportPaths(html_path, md_path, metrics_path, list(made.values()))
