"""The top of the report: the result a reader came for, then what should make them cautious.

A clinician opening report.html wants the external (held-out) result with its confidence
interval first, then whether anything undermines it: an operating point that did not transfer
to the new center, a center whose split has one class, a model indistinguishable from chance,
training that did not move, centers that failed. Each warning is a plain sentence with its
numbers; the tables further down hold the detail. Built from the whitelisted records of
:mod:`fedmsk.report_data`, so nothing here can carry a path or an identifier.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fedmsk.report_data import (
    Metric,
    MetricPoint,
    PointingRow,
    RunData,
    SiteResult,
    SummaryView,
    history_unit,
    skipped_rounds,
    skipped_rounds_text,
)


def fmt_p(value: object) -> str:
    """A p-value as reports print it: "<0.001" below a thousandth (never "0.000"), "n/a" when
    it is missing or not a finite number."""
    if not isinstance(value, int | float) or not math.isfinite(value):
        return "n/a"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def threshold_source_text(source: str) -> str:
    """How a threshold was chosen, as a reader writes it: results.json keeps the machine value
    ("youden on federated validation histograms"), the report names Youden's index."""
    return source.replace("youden", "Youden", 1) if source.startswith("youden") else source


# An operating point "did not transfer" when the held-out sensitivity or specificity at the
# locked threshold differs from the training centers' validation by more than this.
TRANSFER_GAP = 0.20
# Training "did not move" when the last recorded training loss is above this share of the first.
STALLED_LOSS_RATIO = 0.95
# ... and "never left its starting plateau" when it ended above this share of ln(classes), the
# class-weighted loss of a prediction that ignores the image (stuck runs ended at 0.667-0.692).
PLATEAU_SHARE = 0.95


@dataclass
class Summary:
    headline: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _value(metric: Metric | None) -> float | None:
    return None if metric is None else metric.value


def _with_ci(metric: Metric | None) -> str:
    if metric is None or metric.value is None:
        return "n/a"
    if metric.has_ci:
        return f"{metric.value:.3f} [{metric.low:.3f}, {metric.high:.3f}]"
    return f"{metric.value:.3f}"


def _positives(summary: SummaryView) -> tuple[int, int] | None:
    """(positives, negatives) of a binary summary, when its counts are known."""
    if summary.n is None or summary.n_positive is None:
        return None
    return summary.n_positive, summary.n - summary.n_positive


def validation_operating_point(sites: list[SiteResult]) -> tuple[float, float] | None:
    """Sensitivity and specificity over all training centers' validation images at the locked
    threshold: each center's rate weighted by its positives (or negatives)."""
    sens_sum = spec_sum = positives = negatives = 0.0
    for site in sites:
        if site.role != "train" or not site.summary.binary:
            continue
        counts = _positives(site.summary)
        sens = _value(site.summary.at_threshold.get("sensitivity"))
        spec = _value(site.summary.at_threshold.get("specificity"))
        if counts is None:
            continue
        if sens is not None and counts[0]:
            sens_sum, positives = sens_sum + sens * counts[0], positives + counts[0]
        if spec is not None and counts[1]:
            spec_sum, negatives = spec_sum + spec * counts[1], negatives + counts[1]
    if not positives or not negatives:
        return None
    return sens_sum / positives, spec_sum / negatives


def _headline_for(site: SiteResult, threshold: float | None) -> str:
    summary = site.summary
    where = f"Held-out center {site.alias} (external test, never trained on, n={summary.n})"
    if not summary.binary:
        return f"{where}: top-1 accuracy {_with_ci(summary.top1)}, macro F1 " + _with_ci(
            summary.macro_f1
        )
    at = summary.at_threshold
    point = f" at the locked threshold {threshold:.3f}" if threshold is not None else ""
    return (
        f"{where}: AUC {_with_ci(summary.auc)} (DeLong 95% CI); sensitivity "
        f"{_with_ci(at.get('sensitivity'))}, specificity {_with_ci(at.get('specificity'))}"
        f"{point}."
    )


def _transfer_warnings(data: RunData) -> list[str]:
    reference = validation_operating_point(data.sites)
    if reference is None:
        return []
    warnings = []
    for site in data.sites:
        if site.role != "heldout" or not site.summary.binary:
            continue
        sens = _value(site.summary.at_threshold.get("sensitivity"))
        spec = _value(site.summary.at_threshold.get("specificity"))
        if sens is None or spec is None:
            continue
        if abs(sens - reference[0]) > TRANSFER_GAP or abs(spec - reference[1]) > TRANSFER_GAP:
            warnings.append(
                f"The operating point did not transfer to {site.alias}: at the threshold locked "
                f"on the training centers' validation, sensitivity/specificity are "
                f"{sens:.2f}/{spec:.2f} there against {reference[0]:.2f}/{reference[1]:.2f} in "
                "validation. Its AUC describes ranking only; a threshold for this center needs "
                "its own calibration data."
            )
    return warnings


def _one_class_warnings(data: RunData) -> list[str]:
    warnings = []
    for site in data.sites:
        counts = [c for c in site.summary.n_per_class if c is not None]
        if site.summary.binary and len(counts) == 2 and min(counts) == 0 and sum(counts):
            present = site.summary.classes[0 if counts[0] else 1]
            warnings.append(
                f"{site.alias}'s {site.split} images are all of one class ({present}): its AUC, "
                "sensitivity or specificity cannot be estimated there."
            )
    return warnings


def _chance_warnings(data: RunData) -> list[str]:
    warnings = []
    for site in data.sites:
        auc = site.summary.auc
        if site.role == "heldout" and auc is not None and auc.has_ci and auc.low <= 0.5:
            warnings.append(
                f"On {site.alias} the model is not distinguishable from chance: the AUC's 95% CI "
                f"{_with_ci(auc)} includes 0.5."
            )
    return warnings


def _convergence_warnings(data: RunData) -> list[str]:
    return training_loss_warnings(data.history, len(data.run.classes), data.run.fields.get("mode"))


def training_loss_warnings(history: list[MetricPoint], num_classes: int, mode: object) -> list[str]:
    """A training loss that did not fall, and when it stayed where a prediction that ignores
    the image scores, what that means and what to do.

    Why the second: from scratch, whether a network leaves its starting plateau is partly luck
    of the training seed. On draw 15 of the built-in federation pooled training with seed 42
    never did (training loss 0.692 after 30 epochs, held-out AUC 0.43) while seeds 43 and 44
    reached 0.93 and 0.94 (docs/benchmarks.md, "Intensity augmentation"); a reader who sees
    only a low AUC would blame the data or the federation.
    """
    losses = sorted(
        (p.round, p.values["loss"])
        for p in history
        if p.site is None and p.phase == "train" and "loss" in p.values
    )
    if len(losses) < 3:
        return []
    first, last = losses[0][1], losses[-1][1]
    if not (first > 0 and last > STALLED_LOSS_RATIO * first):
        return []
    unit = history_unit(mode)
    chance = math.log(num_classes) if num_classes >= 2 else None
    if chance is not None and last >= PLATEAU_SHARE * chance:
        return [
            f"Training never left its starting plateau: the training loss ended at {last:.3f} "
            f"({unit} {losses[-1][0]}), about what a prediction that ignores the image scores "
            f"(ln {num_classes} = {chance:.3f} with class-weighted loss), so the model's scores "
            "are close to chance whatever the data hold. From scratch this depends partly on "
            "the training seed: rerun with another seed= before reading the result."
        ]
    return [
        f"Training did not converge: the training loss went from {first:.3f} ({unit} "
        f"{losses[0][0]}) to only {last:.3f} ({unit} {losses[-1][0]}). More rounds, a higher "
        "learning rate or a check of the labels may be needed."
    ]


def _skipped_round_warnings(data: RunData) -> list[str]:
    skipped = skipped_rounds(data.history)
    if not skipped:
        return []
    where = "; the section 'Failed center rounds' names the sites" if data.failures else ""
    return [
        f"{skipped_rounds_text(skipped, data.run.fields.get('rounds'))}: the final model had "
        "fewer rounds of training than planned, so its figures understate what this recipe "
        f"reaches{where}."
    ]


def _failure_lines(data: RunData) -> list[str]:
    by_site: dict[str, list[str]] = {}
    for failure in data.failures:
        by_site.setdefault(failure.site, []).append(failure.error)
    lines = []
    for site, errors in sorted(by_site.items()):
        kinds = ", ".join(sorted(set(errors)))
        lines.append(f"{site} failed {len(errors)} time(s) ({kinds}); rounds went on without it.")
    return lines


def _privacy_line(data: RunData) -> str:
    spent = [(p.site, p.epsilon) for p in data.privacy if p.epsilon is not None]
    if not spent:
        return "Differential privacy: not used in this run."
    site, epsilon = max(spent, key=lambda item: item[1])
    deltas = {p.delta for p in data.privacy if p.delta is not None}
    delta = f", delta {min(deltas):.1e}" if deltas else ""
    line = f"Differential privacy: largest epsilon spent {epsilon:.2f} (at {site}){delta}."
    lifetime = [p for p in data.privacy if p.lifetime_epsilon is not None]
    if lifetime:
        most = max(lifetime, key=lambda p: p.lifetime_epsilon or 0.0)
        cap = "" if most.lifetime_cap is None else f" of its cap {most.lifetime_cap:g}"
        line += (
            f" Over all runs on its data, {most.site} has spent {most.lifetime_epsilon:.2f}{cap}."
        )
    return line


# How the report names a heat-map method (``evaluation.cam_method``): as papers write it.
CAM_METHOD_NAMES = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "layercam": "LayerCAM"}


def cam_method_name(method: str) -> str:
    """``layercam`` -> ``LayerCAM``; a method the table does not know keeps its own spelling."""
    return CAM_METHOD_NAMES.get(method, method)


def pointing_sentence(row: PointingRow) -> str:
    """The pointing game in words, with chance beside it."""
    if not row.n:
        return f"Pointing game on {row.site}: no correctly found image with a known box to score."
    p = fmt_p(row.p_value)
    method = cam_method_name(row.method)
    return (
        f"Pointing game on {row.site} ({method}): the map's peak falls on the finding in "
        f"{row.hits} of {row.n} correctly found images ({row.hits / row.n:.2f}; a random peak "
        f"would score {row.chance:.2f}; one-sided binomial p {p})."
    )


def _pointing_warnings(data: RunData) -> list[str]:
    return [
        f"The heatmaps on {row.site} do not point at the findings more often than chance "
        f"({row.hits} of {row.n} against {row.chance:.2f}): do not read them as showing where "
        "the finding is."
        for row in data.pointing
        if row.n and not row.beats_chance
    ]


def _combined_validation_auc(data: RunData) -> float | None:
    """The last validated round's AUC over every training center's validation images at once:
    a small center's own AUC swings widely (a center with two positives scores 0 to 1), so the
    range alone reads worse than the model is."""
    points = [p for p in data.history if p.phase == "val" and p.site is None and "auc" in p.values]
    if not points:
        return None
    return max(points, key=lambda p: p.round).values["auc"]


def build_summary(data: RunData) -> Summary:
    summary = Summary()
    heldout = [s for s in data.sites if s.role == "heldout"]
    for site in heldout:
        summary.headline.append(_headline_for(site, data.run.threshold))
    if not heldout and data.sites:
        summary.headline.append("No held-out center was evaluated: there is no external test.")
    training = [s for s in data.sites if s.role == "train"]
    reference = validation_operating_point(training)
    if training:
        aucs = [
            s.summary.auc.value
            for s in training
            if s.summary.auc is not None and s.summary.auc.value is not None
        ]
        if aucs:
            sizes = [s.summary.n for s in training if s.summary.n]
            per_center = f"AUC from {min(aucs):.3f} to {max(aucs):.3f} over {len(aucs)} centers"
            if sizes:
                per_center += f" of {min(sizes)} to {max(sizes)} images"
            combined = _combined_validation_auc(data)
            if combined is None:
                text = f"Training centers' validation: {per_center}"
            else:
                text = (
                    f"Training centers' validation: AUC {combined:.3f} with all their "
                    f"validation images together (last round); per center {per_center}"
                )
            if reference is not None:
                text += f"; sensitivity/specificity {reference[0]:.2f}/{reference[1]:.2f}"
            summary.headline.append(text + ".")
    for comparison in data.comparisons:
        if comparison.difference is not None:
            summary.headline.append(
                f"{comparison.label}: AUC difference {comparison.difference:+.3f} "
                f"(DeLong p {fmt_p(comparison.p)})."
            )
    summary.headline.extend(pointing_sentence(row) for row in data.pointing if row.n)
    summary.headline.append(_privacy_line(data))
    summary.headline.extend(_failure_lines(data))
    # Causes before symptoms: a model that trained on fewer rounds, or never left its starting
    # plateau, explains an operating point that did not transfer and an AUC near chance.
    summary.warnings.extend(_skipped_round_warnings(data))
    summary.warnings.extend(_convergence_warnings(data))
    summary.warnings.extend(_transfer_warnings(data))
    summary.warnings.extend(_one_class_warnings(data))
    summary.warnings.extend(_chance_warnings(data))
    summary.warnings.extend(_pointing_warnings(data))
    return summary
