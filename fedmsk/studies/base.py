"""Records and shared steps of the study analyses.

A study analysis runs after a federated run (or a ``fedmsk compare``) in the researcher's
process. In a simulation every site's images are on this machine, so the analysis scores them
directly with the run's final model; in a deployment the same functions would run at each
hospital and only their aggregate output would leave it. Per-image scores, image keys and
patient identifiers are used here and never written: the outputs are aggregates (counts,
AUCs, operating-point metrics, ROC curves on a fixed grid, test statistics).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedmsk import metrics as m
from fedmsk.config import ExperimentConfig
from fedmsk.report_summary import fmt_p  # noqa: F401  (the studies import it from here)

ALL_SPLITS = ("train", "val", "test")


class StudyError(ValueError):
    """A study analysis that cannot run; the message names the setting or file and the cause."""


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Variant:
    """An extra run a study needs beside the main one (a per-view model, another network).

    ``overrides`` are ``key=value`` settings on top of the main run's configuration.
    ``prepare(cfg)`` runs before training and may return more overrides (e.g. the data root of
    a statically augmented copy of the federation).
    """

    name: str
    overrides: tuple[str, ...] = ()
    prepare: Callable[[ExperimentConfig], tuple[str, ...]] | None = None


@dataclass
class RunHandle:
    """A finished run: its configuration, directory and results.json."""

    name: str
    cfg: ExperimentConfig
    path: Path
    results: dict[str, Any]

    @property
    def threshold(self) -> float | None:
        value = (self.results.get("threshold") or {}).get("value")
        return float(value) if isinstance(value, int | float) else None

    @property
    def mode(self) -> str:
        return str((self.results.get("run") or {}).get("mode", "federated"))

    def load_model(self) -> Any:
        from fedmsk.models import model_from_config, set_arrays

        weights = self.path / "final_model.npz"
        if not weights.is_file():
            raise StudyError(f"{weights}: no final model; did the run finish?")
        model = model_from_config(self.cfg, initial_weights=False)
        with np.load(weights) as arrays:
            set_arrays(model, {k: arrays[k] for k in arrays.files})
        model.eval()
        return model


@dataclass
class StudyContext:
    """What an analysis gets: the main run, the variant runs, the federation on disk."""

    cfg: ExperimentConfig
    main: RunHandle
    variants: dict[str, RunHandle]
    missing: dict[str, str]
    root: Path
    training_sites: list[str]
    heldout_sites: list[str]

    def site_dir(self, alias: str) -> Path:
        from fedmsk.data.federation import load_federation

        return load_federation(self.root).site_dir(alias)

    @property
    def figures(self) -> Path:
        path = self.main.path / "figures"
        path.mkdir(parents=True, exist_ok=True)
        return path


@dataclass
class StudyOutput:
    """What an analysis adds to results.json (``study``, ``readers``, ``comparisons``) and the
    Markdown table written to ``study_table.md``."""

    section: dict[str, Any]
    table: str
    readers: dict[str, Any] | None = None
    comparisons: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Study:
    """One protocol: its variants and its analysis."""

    name: str
    title: str
    variants: Callable[[ExperimentConfig], list[Variant]]
    analyse: Callable[[StudyContext], StudyOutput]


# ----------------------------------------------------------------------------- scores


@dataclass
class Scores:
    """Per-image model output on some images (stays in this process)."""

    labels: np.ndarray
    probs: np.ndarray
    patients: list[str]
    views: list[str]
    images: list[str]
    sites: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def positive(self) -> np.ndarray:
        return self.probs[:, 1]

    def subset(self, mask: np.ndarray | Sequence[bool]) -> Scores:
        keep = np.asarray(mask, dtype=bool)
        pick = [i for i, k in enumerate(keep) if k]
        return Scores(
            self.labels[keep],
            self.probs[keep],
            [self.patients[i] for i in pick],
            [self.views[i] for i in pick],
            [self.images[i] for i in pick],
            [self.sites[i] for i in pick],
        )

    def image_keys(self) -> list[tuple[str, str]]:
        return list(zip(self.sites, self.images, strict=True))


def concat(parts: Sequence[Scores], num_classes: int) -> Scores:
    parts = [p for p in parts if len(p)]
    if not parts:
        return Scores(np.zeros(0, np.int64), np.zeros((0, num_classes)), [], [], [], [])
    return Scores(
        np.concatenate([p.labels for p in parts]),
        np.concatenate([p.probs for p in parts]),
        [x for p in parts for x in p.patients],
        [x for p in parts for x in p.views],
        [x for p in parts for x in p.images],
        [x for p in parts for x in p.sites],
    )


def site_loaders(cfg: ExperimentConfig, site_dir: Path, alias: str) -> Any:
    """The site's loaders, with the data layer's per-file warnings sent to the site's own log
    (``SITE_DIR/.fedmsk/logs/node.log``), as on a hospital node: file names stay there."""
    from fedmsk.data.dataset import build_site_loaders
    from fedmsk.site_runtime import node_logger

    node_logger(Path(site_dir), alias)
    return build_site_loaders(site_dir, cfg.task, cfg.data, cfg.train, seed=cfg.seed)


def score_site(
    run: RunHandle, model: Any, site_dir: Path, alias: str, splits: Sequence[str]
) -> Scores:
    """The model's softmax output on the images of ``splits`` at one site, unaugmented.

    Rows, splits and view filters are the run's own (``run.cfg``), so a per-view run scores
    only its view. Patient IDs are prefixed with the site alias: two hospitals may reuse an ID.
    """
    from torch.utils.data import DataLoader

    from fedmsk.training import evaluate

    cfg = run.cfg
    loaders = site_loaders(run.cfg, site_dir, alias)
    parts = [loaders.dataset(s) for s in splits]
    items = [item for part in parts if part is not None for item in part.items]
    k = cfg.task.num_classes
    if not items:
        return concat([], k)
    dataset = next(p for p in parts if p is not None).unaugmented(items)
    loader = DataLoader(dataset, batch_size=max(1, cfg.train.batch_size), shuffle=False)
    result = evaluate(model, loader)
    root = Path(site_dir)
    return Scores(
        labels=np.asarray(result.labels, dtype=np.int64),
        probs=np.asarray(result.probs, dtype=np.float64),
        patients=[f"{alias}/{item.patient_id}" for item in items],
        views=[item.view for item in items],
        images=[item.path.relative_to(root).as_posix() for item in items],
        sites=[alias] * len(items),
    )


def score_sites(
    ctx: StudyContext, run: RunHandle, model: Any, aliases: Sequence[str], splits: Sequence[str]
) -> dict[str, Scores]:
    return {a: score_site(run, model, ctx.site_dir(a), a, splits) for a in aliases}


def take(scores: Scores, order: Sequence[int]) -> Scores:
    """The rows of ``scores`` at ``order``, in that order."""
    idx = np.asarray(list(order), dtype=np.int64)
    return Scores(
        scores.labels[idx],
        scores.probs[idx],
        [scores.patients[i] for i in idx],
        [scores.views[i] for i in idx],
        [scores.images[i] for i in idx],
        [scores.sites[i] for i in idx],
    )


def align(reference: Scores, other: Scores) -> Scores:
    """``other`` reordered to ``reference``'s images; every reference image must be in it."""
    index = {key: i for i, key in enumerate(other.image_keys())}
    missing = [key for key in reference.image_keys() if key not in index]
    if missing:
        raise StudyError(f"{len(missing)} image(s) were not scored by the second model")
    return take(other, [index[key] for key in reference.image_keys()])


def by_patient(scores: Scores, how: str) -> Scores:
    """One row per patient (label: worst image label; probs: mean or max)."""
    if not len(scores):
        return scores
    y, p = m.aggregate_by_patient(scores.labels, scores.probs, scores.patients, how)
    ids = sorted(set(scores.patients))
    site_of = dict(zip(scores.patients, scores.sites, strict=True))
    return Scores(y, p, ids, [""] * len(ids), ids, [site_of[i] for i in ids])


def lock_threshold(val_sets: Sequence[Scores]) -> float | None:
    """Youden threshold from per-site score histograms, as the federation locks it."""
    from fedmsk.evaluation import locked_threshold, score_histogram

    histograms = [score_histogram(s.labels, s.probs) for s in val_sets if len(s)]
    value, source = locked_threshold(histograms, fallback=float("nan"))
    return None if source.startswith("fixed") else value


# ----------------------------------------------------------------------------- metrics


def clean(value: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN and infinities to None, tuples to lists."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return clean(value.tolist())
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        v = float(value)
        return v if math.isfinite(v) else None
    return value


def estimate(e: m.Estimate) -> dict[str, Any]:
    return clean({"value": e.value, "ci95": list(e.ci95)})


def auc_entry(labels: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """AUC with DeLong CI, or None with a reason when a class is missing."""
    n_pos = int(np.sum(labels == 1))
    if not 0 < n_pos < len(labels):
        return {"value": None, "ci95": None, "reason": "needs both classes"}
    res = m.auc_delong(labels, scores)
    return clean({"value": res.auc, "ci95": list(res.ci95)})


def binary_figures(labels: np.ndarray, scores: np.ndarray, threshold: float | None) -> dict:
    """AUC [CI], and at the locked threshold accuracy, sensitivity, specificity, precision,
    F1 with Wilson CIs; ROC on the 101-point FPR grid."""
    labels = np.asarray(labels, dtype=np.int64)
    out: dict[str, Any] = {
        "n": int(len(labels)),
        "n_positive": int(labels.sum()),
        "auc": auc_entry(labels, scores),
        "threshold": threshold,
    }
    if threshold is not None and len(labels):
        est = m.metrics_at_threshold(labels, scores, threshold)
        for name in ("accuracy", "sensitivity", "specificity", "precision", "f1"):
            out[name] = estimate(est[name])
    if out["auc"]["value"] is not None:
        fpr, tpr = m.roc_on_grid(labels, scores)
        out["roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    return clean(out)


def paired_delong(name: str, labels: np.ndarray, s1: np.ndarray, s2: np.ndarray) -> dict | None:
    """A ``comparisons`` entry for the report: paired DeLong Z and P with the difference CI."""
    labels = np.asarray(labels, dtype=np.int64)
    if not 0 < labels.sum() < len(labels):
        return None
    test = m.delong_paired_test(labels, s1, s2)
    se2 = test.variance1 + test.variance2 - 2 * test.covariance
    diff = test.auc1 - test.auc2
    ci = (
        [diff - m.Z95 * math.sqrt(se2), diff + m.Z95 * math.sqrt(se2)]
        if math.isfinite(se2) and se2 >= 0
        else None
    )
    return clean(
        {
            "name": name,
            "test": "paired DeLong",
            "n": int(len(labels)),
            "auc1": test.auc1,
            "auc2": test.auc2,
            "difference": diff,
            "ci95": ci,
            "z": test.z,
            "p": test.p,
        }
    )


# ----------------------------------------------------------------------------- readers


def reader_csv(root: Path, alias: str) -> Path | None:
    """``FED_ROOT/readers/<alias>.csv`` when the site has a reader study."""
    path = Path(root) / "readers" / f"{alias}.csv"
    return path if path.is_file() else None


def read_reader_calls(path: Path, classes: Sequence[str]) -> list[Any]:
    """Reader calls with the call mapped to a class index (class name or index accepted)."""
    import csv

    from fedmsk.reader_study import ReaderCall

    index = {str(c).strip().lower(): i for i, c in enumerate(classes)}
    index.update({str(i): i for i in range(len(classes))})
    calls = []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        needed = {"reader", "experience", "image", "call"}
        if not needed <= set(reader.fieldnames or []):
            raise StudyError(f"{path}: needs the columns {', '.join(sorted(needed))}")
        for line, row in enumerate(reader, start=2):
            raw = str(row["call"]).strip().lower()
            if raw not in index:
                raise StudyError(f"{path}, line {line}: call {row['call']!r} is not a class")
            conf = row.get("confidence")
            calls.append(
                ReaderCall(
                    reader=row["reader"].strip(),
                    experience=(row["experience"] or "unspecified").strip(),
                    image=row["image"].strip(),
                    call=index[raw],
                    confidence=float(conf) if conf not in (None, "") else None,
                )
            )
    return calls


# ----------------------------------------------------------------------------- Markdown


def fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, dict):
        v, ci = value.get("value"), value.get("ci95")
        if v is None:
            return "n/a"
        if isinstance(ci, list) and len(ci) == 2 and None not in ci:
            return f"{v:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
        return f"{v:.{digits}f}"
    if isinstance(value, bool) or value is None:
        return "n/a"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else "n/a"
    return str(value)


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- run directory


def read_results(path: Path) -> dict[str, Any]:
    file = Path(path) / "results.json"
    if not file.is_file():
        raise StudyError(f"{file}: not found; the study analysis needs a finished run")
    content = json.loads(file.read_text(encoding="utf-8"))
    if not isinstance(content, dict):
        raise StudyError(f"{file}: expected a JSON object")
    return content
