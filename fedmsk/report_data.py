"""Read a run directory into typed, whitelisted records for the study report.

The report must never show a patient identifier or a file path. Rather than scrubbing what a
results file holds, this module *picks*: each record below is built from known keys only, every
number goes through :func:`number` and every string through :func:`safe_label`, which accepts
short plain labels (site aliases, class names, error type names) and nothing that looks like a
path or a date. Unknown keys are never read, so nothing planted in them can reach the report.
Missing optional parts give ``None`` or empty lists, never an exception.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

AT_THRESHOLD_METRICS = ("accuracy", "sensitivity", "specificity", "precision", "npv", "f1")
PER_CLASS_METRICS = ("precision", "sensitivity", "specificity", "f1")
RUN_FIELDS = (
    "mode",
    "strategy",
    "model",
    "task",
    "rounds",
    "each_round",
    "recipe",
    "augmentation",
    "input",
    "precision",
    "config_hash",
    "privacy_unit",
)

_SAFE_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.+\-()%,=]*$")
# A model label names its timm settings ("resnet18 (channels=32 64 128 256, global_pool=max,
# output_stride=16, stem_conv_stride=4)", 88 characters): the run's model may be longer than a
# label.
_LABEL_MAX_LENGTH = 64
_LONG_FIELDS = {
    "model": 160,
    "precision": 100,
    "each_round": 100,
    "recipe": 100,
    "augmentation": 240,
}
_DATE_LIKE = re.compile(r"(\d{4}[-.]?\d{2}[-.]?\d{2})|(\d{2}[-.]\d{2}[-.]\d{2,4})")
_HEX_HASH = re.compile(r"^[0-9a-f]{8,64}$")
_ERROR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,79}$")


class ReportError(RuntimeError):
    """A run directory the report cannot be built from; the message names file and cause."""


def number(value: Any) -> float | None:
    """A finite float, or None for anything else (bools, strings, NaN, missing)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def safe_label(value: Any, fallback: str, max_length: int = _LABEL_MAX_LENGTH) -> str:
    """``value`` if it is a short plain label, else ``fallback``: no paths, no dates, no URLs."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return fallback
    text = str(value).strip()
    if (
        len(text) > max_length
        or not _SAFE_LABEL.match(text)
        or _DATE_LIKE.search(text)
        or ".." in text
    ):
        return fallback
    return text


def error_name(value: Any) -> str:
    """An exception type name (all that may leave a node); anything longer is withheld."""
    if isinstance(value, str) and _ERROR_NAME.match(value.strip()):
        return value.strip()
    return "error (details withheld)"


@dataclass(frozen=True)
class Metric:
    """A value with an optional 95% CI."""

    value: float | None
    low: float | None = None
    high: float | None = None

    @property
    def has_ci(self) -> bool:
        return self.low is not None and self.high is not None


def metric(raw: Any, ci: Any = None) -> Metric | None:
    """A number, or a ``{"value", "ci95"}`` record, with an optional separate CI pair."""
    if isinstance(raw, dict):
        return metric(raw.get("value"), raw.get("ci95"))
    value = number(raw)
    if value is None:
        return None
    low, high = _pair(ci)
    return Metric(value, low, high)


def _pair(raw: Any) -> tuple[float | None, float | None]:
    if isinstance(raw, list | tuple) and len(raw) == 2:
        return number(raw[0]), number(raw[1])
    return None, None


def _numbers(raw: Any) -> list[float | None]:
    return [number(v) for v in raw] if isinstance(raw, list) else []


@dataclass
class Curve:
    """ROC points on a grid, with a pointwise band if the summary carried one."""

    fpr: list[float]
    tpr: list[float]
    lower: list[float] | None = None
    upper: list[float] | None = None


def curve(raw: Any) -> Curve | None:
    if not isinstance(raw, dict):
        return None
    fpr, tpr = _numbers(raw.get("fpr")), _numbers(raw.get("tpr"))
    if len(fpr) < 2 or len(fpr) != len(tpr) or None in fpr or None in tpr:
        return None
    lower, upper = _band(raw, len(fpr))
    return Curve([float(v) for v in fpr], [float(v) for v in tpr], lower, upper)  # type: ignore[arg-type]


def _band(raw: dict, n: int) -> tuple[list[float] | None, list[float] | None]:
    """A bootstrap band, accepted as ``tpr_lower``/``tpr_upper`` or ``tpr_ci95`` ([lo, hi])."""
    lower, upper = _numbers(raw.get("tpr_lower")), _numbers(raw.get("tpr_upper"))
    ci = raw.get("tpr_ci95")
    if not lower and isinstance(ci, list) and len(ci) == 2 and isinstance(ci[0], list):
        lower, upper = _numbers(ci[0]), _numbers(ci[1])
    if len(lower) == n == len(upper) and None not in lower and None not in upper:
        return lower, upper  # type: ignore[return-value]
    return None, None


@dataclass
class CalibrationView:
    brier: float | None
    ece: float | None
    mean_predicted: list[float | None]
    fraction_positive: list[float | None]
    count: list[float | None]


@dataclass
class ClassRow:
    name: str
    n: int | None
    auc: Metric | None
    metrics: dict[str, Metric | None]


@dataclass
class SummaryView:
    """The whitelisted part of one ``fedmsk.evaluation.summarize`` dict."""

    task_type: str
    classes: list[str]
    n: int | None
    n_per_class: list[int | None]
    auc: Metric | None = None
    auc_bootstrap_ci95: tuple[float | None, float | None] | None = None
    threshold: float | None = None
    at_threshold: dict[str, Metric | None] = field(default_factory=dict)
    youden: dict[str, float | None] = field(default_factory=dict)
    roc: Curve | None = None
    calibration: CalibrationView | None = None
    confusion: list[list[int]] | None = None
    top1: Metric | None = None
    macro_f1: Metric | None = None
    weighted_f1: Metric | None = None
    per_class: list[ClassRow] = field(default_factory=list)
    roc_per_class: dict[str, Curve] = field(default_factory=dict)
    patient_level: SummaryView | None = None

    @property
    def binary(self) -> bool:
        return self.task_type == "binary"

    @property
    def n_positive(self) -> int | None:
        return self.n_per_class[1] if self.binary and len(self.n_per_class) == 2 else None

    @property
    def macro_auc(self) -> float | None:
        values = [row.auc.value for row in self.per_class if row.auc and row.auc.value is not None]
        return sum(values) / len(values) if values else None


def summary_view(raw: Any, fallback_classes: list[str]) -> SummaryView | None:
    if not isinstance(raw, dict):
        return None
    classes = _classes(raw.get("classes")) or fallback_classes
    task_type = raw.get("task_type")
    if task_type not in ("binary", "multiclass"):
        task_type = "binary" if len(classes) == 2 else "multiclass"
    view = SummaryView(
        task_type=task_type,
        classes=classes,
        n=_count(raw.get("n")),
        n_per_class=_per_class_counts(raw.get("n_per_class"), _class_keys(raw, classes)),
        confusion=_matrix(raw.get("confusion_matrix"), len(classes)),
        calibration=_calibration(raw.get("calibration")),
    )
    if view.binary:
        _fill_binary(view, raw)
    else:
        _fill_multiclass(view, raw)
    view.patient_level = summary_view(raw.get("patient_level"), classes)
    return view


def _fill_binary(view: SummaryView, raw: dict) -> None:
    view.auc = metric(raw.get("auc"), raw.get("auc_ci95"))
    bootstrap = _pair(raw.get("auc_bootstrap_ci95"))
    view.auc_bootstrap_ci95 = bootstrap if None not in bootstrap else None
    view.threshold = number(raw.get("threshold"))
    at = raw.get("at_threshold") if isinstance(raw.get("at_threshold"), dict) else {}
    view.at_threshold = {name: metric(at.get(name)) for name in AT_THRESHOLD_METRICS}
    youden = raw.get("youden") if isinstance(raw.get("youden"), dict) else {}
    view.youden = {k: number(youden.get(k)) for k in ("threshold", "sensitivity", "specificity")}
    view.roc = curve(raw.get("roc"))


def _fill_multiclass(view: SummaryView, raw: dict) -> None:
    view.top1 = metric(raw.get("top1_accuracy"))
    view.macro_f1 = metric(raw.get("macro_f1"))
    view.weighted_f1 = metric(raw.get("weighted_f1"))
    per_class = raw.get("per_class") if isinstance(raw.get("per_class"), dict) else {}
    rocs = raw.get("roc_per_class") if isinstance(raw.get("roc_per_class"), dict) else {}
    keys = _class_keys(raw, view.classes)
    for index, name in enumerate(view.classes):
        entry = per_class.get(keys[index])
        if isinstance(entry, dict):
            view.per_class.append(
                ClassRow(
                    name=name,
                    n=view.n_per_class[index] if index < len(view.n_per_class) else None,
                    auc=metric(entry.get("auc"), entry.get("auc_ci95")),
                    metrics={m: metric(entry.get(m)) for m in PER_CLASS_METRICS},
                )
            )
        roc = curve(rocs.get(keys[index]))
        if roc is not None:
            view.roc_per_class[name] = roc


def _classes(raw: Any) -> list[str]:
    if not isinstance(raw, list) or len(raw) < 2:
        return []
    return [safe_label(name, f"class {i}") for i, name in enumerate(raw)]


def _class_keys(raw: dict, shown: list[str]) -> list[str]:
    """The summary's own class names, to look up per-class entries (shown names may differ)."""
    names = raw.get("classes")
    if isinstance(names, list) and len(names) == len(shown):
        return [str(name) for name in names]
    return shown


def _count(raw: Any) -> int | None:
    value = number(raw)
    return int(value) if value is not None and value >= 0 else None


def _per_class_counts(raw: Any, classes: list[str]) -> list[int | None]:
    if isinstance(raw, list):
        return [_count(v) for v in raw]
    if isinstance(raw, dict):
        return [_count(raw.get(name)) for name in classes]
    return []


def _matrix(raw: Any, k: int) -> list[list[int]] | None:
    if not isinstance(raw, list) or len(raw) != k:
        return None
    rows = []
    for row in raw:
        if not isinstance(row, list) or len(row) != k:
            return None
        cells = [_count(v) for v in row]
        if None in cells:
            return None
        rows.append([int(v) for v in cells])  # type: ignore[arg-type]
    return rows


def _calibration(raw: Any) -> CalibrationView | None:
    if not isinstance(raw, dict):
        return None
    bins = raw.get("bins") if isinstance(raw.get("bins"), dict) else {}
    return CalibrationView(
        brier=number(raw.get("brier")),
        ece=number(raw.get("ece")),
        mean_predicted=_numbers(bins.get("mean_predicted")),
        fraction_positive=_numbers(bins.get("fraction_positive")),
        count=_numbers(bins.get("count")),
    )


@dataclass
class SiteResult:
    alias: str
    role: str
    split: str
    summary: SummaryView


@dataclass
class Failure:
    round: int | None
    site: str
    error: str


@dataclass
class PrivacyRow:
    site: str
    epsilon: float | None
    delta: float | None
    stopped: bool | None
    # every run on the center's data set composed, and the cap in its privacy-policy.toml
    lifetime_epsilon: float | None = None
    lifetime_cap: float | None = None
    # rounds this center trained in the run (under sampling, the rounds its sample asked it)
    rounds_trained: int | None = None


@dataclass
class PointingRow:
    """The pointing game of one center's heatmaps (fedmsk.pointing): counts only."""

    site: str
    method: str
    n: int
    hits: int
    chance: float
    p_value: float | None

    @property
    def accuracy(self) -> float | None:
        return self.hits / self.n if self.n else None

    @property
    def beats_chance(self) -> bool:
        return self.n > 0 and self.p_value is not None and self.p_value < 0.05


@dataclass
class ReaderRow:
    label: str
    experience: str
    n_images: int | None
    sensitivity: Metric | None = None
    specificity: Metric | None = None
    accuracy: Metric | None = None
    roc_point: tuple[float, float] | None = None
    model_sensitivity_at_reader_specificity: float | None = None
    sensitivity_difference: float | None = None
    model_accuracy: Metric | None = None
    accuracy_difference: float | None = None
    mcnemar_p: float | None = None


@dataclass
class ReaderGroup:
    experience: str
    n_readers: int | None
    sensitivity: float | None
    specificity: float | None
    accuracy: float | None
    model_sensitivity_at_mean_specificity: float | None


@dataclass
class ReaderStudy:
    task_type: str
    n_images: int | None
    model_auc: Metric | None
    model_threshold: float | None
    model_threshold_source: str
    model_sensitivity: Metric | None
    model_specificity: Metric | None
    model_top1: Metric | None
    model_roc: Curve | None
    n_positive: int | None
    readers: list[ReaderRow]
    groups: list[ReaderGroup]
    mcnemar_rule: str


@dataclass
class Comparison:
    label: str
    auc1: float | None
    auc2: float | None
    difference: float | None
    ci_low: float | None
    ci_high: float | None
    statistic: float | None
    p: float | None


@dataclass
class RunInfo:
    fields: dict[str, str]
    classes: list[str]
    threshold: float | None
    threshold_source: str | None


@dataclass
class MetricPoint:
    round: int
    phase: str
    site: str | None
    values: dict[str, float]


@dataclass
class RunData:
    run: RunInfo
    sites: list[SiteResult]
    pooled: SummaryView | None
    failures: list[Failure]
    privacy: list[PrivacyRow]
    readers: ReaderStudy | None
    comparisons: list[Comparison]
    history: list[MetricPoint]
    cam_figures: list[Path]
    pointing: list[PointingRow] = field(default_factory=list)
    cam_methods: list[str] = field(default_factory=list)

    @property
    def task_type(self) -> str:
        for site in self.sites:
            return site.summary.task_type
        if self.pooled is not None:
            return self.pooled.task_type
        return "binary" if len(self.run.classes) == 2 else "multiclass"


def load_run(run_dir: Path) -> RunData:
    """Everything the report shows, whitelisted. Raises :class:`ReportError` if nothing is there."""
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: not a directory; pass the run directory (RUN_DIR)")
    results_path, metrics_path = run_dir / "results.json", run_dir / "metrics.jsonl"
    if not results_path.is_file() and not metrics_path.is_file():
        raise ReportError(
            f"{run_dir}: neither results.json nor metrics.jsonl is here; is this a run directory?"
        )
    results = _read_results(results_path) if results_path.is_file() else {}
    run = _run_info(results.get("run"), results.get("threshold"))
    sites = _sites(results.get("sites"), run.classes)
    if not run.classes and sites:
        run.classes = sites[0].summary.classes
    pooled_raw = results.get("pooled")
    pooled = (
        summary_view(pooled_raw.get("val"), run.classes) if isinstance(pooled_raw, dict) else None
    )
    cam_figures = _cam_figures(run_dir / "figures")
    return RunData(
        run=run,
        sites=sites,
        pooled=pooled,
        failures=_failures(results.get("failures")),
        privacy=_privacy(results.get("privacy")),
        readers=_reader_study(results.get("readers")),
        comparisons=_comparisons(results.get("comparisons")),
        history=run_history(run_dir),
        cam_figures=cam_figures,
        cam_methods=cam_figure_methods(cam_figures),
        pointing=_pointing(run_dir / "pointing_game.json"),
    )


def _read_results(path: Path) -> dict:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: not readable as JSON ({type(exc).__name__})") from exc
    if not isinstance(content, dict):
        raise ReportError(f"{path}: expected a JSON object at the top level")
    return content


def _run_info(raw: Any, threshold: Any) -> RunInfo:
    raw = raw if isinstance(raw, dict) else {}
    fields = {}
    for key in RUN_FIELDS:
        value = raw.get(key)
        if value is None:
            continue
        if key == "config_hash" and isinstance(value, str) and _HEX_HASH.match(value):
            fields[key] = value  # hex digits only: eight decimal digits in a row are no date
        else:
            fields[key] = safe_label(value, "(withheld)", _LONG_FIELDS.get(key, _LABEL_MAX_LENGTH))
    classes = _classes(raw.get("classes"))
    threshold = threshold if isinstance(threshold, dict) else {}
    source = threshold.get("source")
    return RunInfo(
        fields=fields,
        classes=classes,
        threshold=number(threshold.get("value")),
        threshold_source=safe_label(source, "(withheld)") if source is not None else None,
    )


def _sites(raw: Any, classes: list[str]) -> list[SiteResult]:
    if not isinstance(raw, dict):
        return []
    sites = []
    for index, (alias, entry) in enumerate(sorted(raw.items(), key=lambda kv: str(kv[0]))):
        if not isinstance(entry, dict):
            continue
        summary = summary_view(entry.get("summary"), classes)
        if summary is None:
            continue
        role = entry.get("role") if entry.get("role") in ("train", "heldout") else "train"
        split = safe_label(entry.get("split"), "-") if entry.get("split") is not None else "-"
        sites.append(SiteResult(safe_label(alias, f"center {index + 1}"), role, split, summary))
    return sites


def _site_name(raw: Any, index: int) -> str:
    name = safe_label(raw, "")
    return name if name else f"center {index + 1}"


def _failures(raw: Any) -> list[Failure]:
    if not isinstance(raw, list):
        return []
    failures = []
    for index, entry in enumerate(raw):
        if isinstance(entry, dict):
            round_ = number(entry.get("round"))
            failures.append(
                Failure(
                    round=int(round_) if round_ is not None else None,
                    site=_site_name(entry.get("site"), index),
                    error=error_name(entry.get("error")),
                )
            )
    return failures


def _privacy(raw: Any) -> list[PrivacyRow]:
    if not isinstance(raw, dict):
        return []
    rows = []
    for index, (alias, entry) in enumerate(sorted(raw.items(), key=lambda kv: str(kv[0]))):
        if isinstance(entry, dict):
            stopped = entry.get("stopped")
            if stopped is None and isinstance(entry.get("budget-exhausted"), int | float):
                stopped = bool(entry["budget-exhausted"])
            rows.append(
                PrivacyRow(
                    site=_site_name(alias, index),
                    epsilon=number(entry.get("epsilon")),
                    delta=number(entry.get("delta")),
                    stopped=stopped if isinstance(stopped, bool) else None,
                    lifetime_epsilon=number(entry.get("budget-lifetime-epsilon")),
                    lifetime_cap=number(entry.get("budget-lifetime-cap")),
                    rounds_trained=_count(entry.get("budget-rounds-trained")),
                )
            )
    return rows


def _pointing(path: Path) -> list[PointingRow]:
    if not path.is_file():
        return []
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return []
    if not isinstance(raw, dict):
        return []
    rows = []
    for index, (alias, entry) in enumerate(sorted(raw.items(), key=lambda kv: str(kv[0]))):
        if not isinstance(entry, dict):
            continue
        n, hits, chance = (number(entry.get(k)) for k in ("n", "hits", "chance"))
        if n is None or hits is None or chance is None:
            continue
        rows.append(
            PointingRow(
                site=_site_name(alias, index),
                method=safe_label(entry.get("method"), "cam"),
                n=int(n),
                hits=int(hits),
                chance=chance,
                p_value=number(entry.get("p_value")),
            )
        )
    return rows


def _reader_study(raw: Any) -> ReaderStudy | None:
    """The dict of :func:`fedmsk.reader_study.compare_binary` / ``compare_multiclass``."""
    if not isinstance(raw, dict) or not isinstance(raw.get("readers"), list):
        return None
    model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    task_type = "multiclass" if raw.get("task_type") == "multiclass" else "binary"
    source = model.get("threshold_source")
    groups_raw = raw.get("groups") if isinstance(raw.get("groups"), dict) else {}
    return ReaderStudy(
        task_type=task_type,
        n_images=_count(raw.get("n_images")),
        model_auc=metric(model.get("auc"), model.get("auc_ci95")),
        model_threshold=number(model.get("threshold")),
        model_threshold_source=safe_label(source, "-") if source is not None else "-",
        model_sensitivity=metric(model.get("sensitivity")),
        model_specificity=metric(model.get("specificity")),
        model_top1=metric(model.get("top1_accuracy")),
        model_roc=curve(model.get("roc")),
        n_positive=_count(raw.get("n_positive")),
        readers=[
            _reader_row(entry, index)
            for index, entry in enumerate(raw["readers"])
            if isinstance(entry, dict)
        ],
        groups=[
            _reader_group(name, entry, index)
            for index, (name, entry) in enumerate(sorted(groups_raw.items()))
            if isinstance(entry, dict)
        ],
        mcnemar_rule=_mcnemar_rule(raw.get("mcnemar_rule")),
    )


def _mcnemar_rule(raw: Any) -> str:
    """Rebuilt from its one number rather than echoed: the report prints no free text."""
    found = re.search(r"<\s*(\d{1,4})", raw) if isinstance(raw, str) else None
    if not found:
        return ""
    return (
        f"McNemar: exact binomial when the discordant pairs number fewer than {found.group(1)}, "
        "otherwise chi-square with continuity correction."
    )


def _get(raw: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(raw, dict):
            return None
        raw = raw.get(key)
    return raw


def _reader_row(raw: dict, index: int) -> ReaderRow:
    point = raw.get("roc_point") if isinstance(raw.get("roc_point"), dict) else {}
    fpr, tpr = number(point.get("fpr")), number(point.get("tpr"))
    at_spec = raw.get("model_at_reader_specificity")
    mcnemar_p = number(_get(raw, "locked_threshold", "mcnemar", "accuracy", "p"))
    if mcnemar_p is None:
        mcnemar_p = number(_get(raw, "mcnemar", "p"))
    return ReaderRow(
        label=safe_label(raw.get("reader"), f"Reader {index + 1}"),
        experience=safe_label(raw.get("experience"), "-"),
        n_images=_count(raw.get("n_images")),
        sensitivity=metric(raw.get("sensitivity")),
        specificity=metric(raw.get("specificity")),
        accuracy=metric(raw.get("accuracy")),
        roc_point=(fpr, tpr) if fpr is not None and tpr is not None else None,
        model_sensitivity_at_reader_specificity=_value(_get(at_spec, "sensitivity")),
        sensitivity_difference=number(_get(at_spec, "sensitivity_difference")),
        model_accuracy=metric(raw.get("model_accuracy")),
        accuracy_difference=number(raw.get("accuracy_difference")),
        mcnemar_p=mcnemar_p,
    )


def _value(raw: Any) -> float | None:
    found = metric(raw)
    return found.value if found else None


def _reader_group(name: Any, raw: dict, index: int) -> ReaderGroup:
    return ReaderGroup(
        experience=safe_label(name, f"group {index + 1}"),
        n_readers=_count(raw.get("n_readers")),
        sensitivity=number(raw.get("mean_sensitivity")),
        specificity=number(raw.get("mean_specificity")),
        accuracy=number(raw.get("mean_accuracy")),
        model_sensitivity_at_mean_specificity=number(
            raw.get("model_sensitivity_at_mean_specificity")
        ),
    )


def _comparisons(raw: Any) -> list[Comparison]:
    """Paired/unpaired DeLong results; the label comes from a few known naming keys only."""
    if not isinstance(raw, list):
        return []
    rows = []
    for index, entry in enumerate(raw):
        if not isinstance(entry, dict):
            continue
        label = safe_label(entry.get("name") or entry.get("label"), "")
        if not label:
            first = safe_label(entry.get("first") or entry.get("a"), "")
            second = safe_label(entry.get("second") or entry.get("b"), "")
            label = f"{first} vs {second}" if first and second else f"comparison {index + 1}"
        auc1 = number(entry.get("auc1", entry.get("auc_a")))
        auc2 = number(entry.get("auc2", entry.get("auc_b")))
        difference = number(entry.get("difference", entry.get("diff")))
        if difference is None and auc1 is not None and auc2 is not None:
            difference = auc1 - auc2
        low, high = _pair(entry.get("ci95"))
        statistic = number(entry.get("z", entry.get("statistic")))
        p = number(entry.get("p", entry.get("p_value")))
        rows.append(Comparison(label, auc1, auc2, difference, low, high, statistic, p))
    return rows


HISTORY_FIELDS = ("loss", "auc", "accuracy", "top1_accuracy", "epsilon")
# "train-skipped": a round the coordinator did not aggregate (too few sites replied)
HISTORY_PHASES = ("train", "val", "heldout", "train-skipped")
LOSS_ALIASES = ("train-loss", "eval-loss")


def _history(path: Path) -> list[MetricPoint]:
    """metrics.jsonl points; unreadable lines are skipped (a run may have been killed mid-line)."""
    points = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict):
            continue
        round_ = number(record.get("round"))
        phase = record.get("phase")
        if round_ is None or phase not in HISTORY_PHASES:
            continue
        site = record.get("site")
        site_name = None if site is None else (safe_label(site, "") or "(withheld)")
        values = {k: v for k in HISTORY_FIELDS if (v := number(record.get(k))) is not None}
        # sites report their loss as train-loss (training) or eval-loss (evaluation)
        for key in LOSS_ALIASES:
            if "loss" not in values and (loss := number(record.get(key))) is not None:
                values["loss"] = loss
        points.append(MetricPoint(int(round_), phase, site_name, values))
    return points


def history_unit(mode: object) -> str:
    """What a run's "round" counts: a pooled or local-only run records one point per epoch
    under it, a federated run (or one that does not say) one per round."""
    return "epoch" if mode in ("pooled", "local") else "round"


def skipped_rounds(history: list[MetricPoint]) -> list[int]:
    """Rounds that were not aggregated, in order: the final model trained on fewer rounds than
    the run planned, which a reader of its figures must be told."""
    return sorted({p.round for p in history if p.phase == "train-skipped"})


def skipped_rounds_text(skipped: list[int], planned: object) -> str:
    """The one wording of skipped rounds, shared by the terminal and the report's summary:
    "3 of 5 rounds were not aggregated (too few sites replied; rounds 2-3, 5)"."""
    of = f" of {planned}" if planned else ""
    return (
        f"{len(skipped)}{of} rounds were not aggregated (too few sites replied; rounds "
        f"{format_rounds(skipped)})"
    )


def format_rounds(rounds: list[int]) -> str:
    """1, 2, 3, 5, 7, 8 -> "1-3, 5, 7-8"."""
    spans: list[list[int]] = []
    for r in rounds:
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def run_history(run_dir: Path) -> list[MetricPoint]:
    """The run's metrics.jsonl points (empty when it has none yet)."""
    path = run_dir / "metrics.jsonl"
    return _history(path) if path.is_file() else []


_CAM_NAME = re.compile(r"^cam_[A-Za-z0-9_\-]{1,60}\.png$")


# The PNG text key under which a heat-map grid records how its maps were made
# (``fedmsk.explain``), so the report names the method even where no pointing game was played.
CAM_METHOD_PNG_KEY = "fedmsk-cam-method"
_CAM_METHOD = re.compile(r"^[a-z+]{1,20}$")


def cam_figure_methods(paths: list[Path]) -> list[str]:
    """The methods the grids at ``paths`` record, each once, in order; a grid that records none
    (drawn before the key existed, or elsewhere) or an unexpected value adds nothing."""
    from PIL import Image

    methods: list[str] = []
    for path in paths:
        try:
            with Image.open(path) as image:
                value = str(getattr(image, "text", {}).get(CAM_METHOD_PNG_KEY, ""))
        except (OSError, ValueError):
            continue
        if _CAM_METHOD.match(value) and value not in methods:
            methods.append(value)
    return methods


def _cam_figures(folder: Path) -> list[Path]:
    """Grad-CAM grids made elsewhere (on a node or in a local simulation) and left here."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and _CAM_NAME.match(p.name))
