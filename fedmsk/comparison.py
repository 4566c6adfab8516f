"""One table of pooled vs local-only vs federated runs made on the same splits.

Rows are methods, columns are per-center validation AUCs and the held-out AUC, each with its
DeLong 95% CI, as the benchmark tables of federated medical imaging papers show them.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np


def _auc_cell(summary: dict[str, Any]) -> tuple[float | None, list[float] | None]:
    auc = summary.get("auc")
    if auc is None and "per_class" in summary:
        values = [c.get("auc") for c in summary["per_class"].values() if c.get("auc") is not None]
        auc = sum(values) / len(values) if values else None
        return auc, None
    ci = summary.get("auc_ci95")
    return auc, ci if isinstance(ci, list) else None


def _format(auc: float | None, ci: list[float] | None) -> str:
    if auc is None:
        return "n/a"
    if ci and None not in ci:
        return f"{auc:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
    return f"{auc:.3f}"


def comparison_rows(runs: dict[str, Path]) -> tuple[list[str], list[dict[str, Any]]]:
    results = {name: json.loads((Path(p) / "results.json").read_text()) for name, p in runs.items()}
    centers = sorted(
        {a for r in results.values() for a, s in r["sites"].items() if s["role"] == "train"}
    )
    heldout = sorted(
        {a for r in results.values() for a, s in r["sites"].items() if s["role"] == "heldout"}
    )
    rows = []
    for name, result in results.items():
        sites = result["sites"]
        row: dict[str, Any] = {"method": name}
        val_aucs = []
        for alias in centers + heldout:
            auc, ci = _auc_cell(sites.get(alias, {}).get("summary", {}))
            row[alias] = {"auc": auc, "ci95": ci, "text": _format(auc, ci)}
            if alias in centers and auc is not None:
                val_aucs.append(auc)
        row["mean_val_auc"] = sum(val_aucs) / len(val_aucs) if val_aucs else None
        rows.append(row)
    return centers + heldout, rows


def write_comparison(out: Path, runs: dict[str, Path]) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    columns, rows = comparison_rows(runs)
    header = ["method", "mean val AUC", *[f"{c}" for c in columns]]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in rows:
        mean = row["mean_val_auc"]
        cells = [row["method"], "n/a" if mean is None else f"{mean:.3f}"]
        cells += [row[c]["text"] for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    markdown = out / "comparison.md"
    markdown.write_text(
        "# Pooled vs local-only vs federated\n\nAUC [95% DeLong CI]; training centers on their "
        "validation split, held-out centers on all their images.\n\n" + "\n".join(lines) + "\n"
    )
    table = out / "comparison.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for row in rows:
            mean = row["mean_val_auc"]
            writer.writerow([row["method"], mean, *[row[c]["auc"] for c in columns]])
    blob = out / "comparison.json"
    blob.write_text(json.dumps({"columns": columns, "rows": rows}, indent=2))
    return {"markdown": markdown, "csv": table, "json": blob}


def load_run_config(run_dir: Path) -> Any:
    """The typed configuration a run was made with (its ``config.yaml``)."""
    from omegaconf import OmegaConf

    from fedmsk.config import from_omegaconf

    return from_omegaconf(OmegaConf.load(Path(run_dir) / "config.yaml"))


def heldout_scores(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """A finished binary run's final model scored on every image of its held-out centers.

    For researchers comparing runs on one machine (benchmarks, simulations): the images are
    read where they lie, as the held-out node itself would read them.
    """
    from fedmsk.data.federation import load_federation
    from fedmsk.studies.base import RunHandle, read_results, score_site

    path = Path(run_dir)
    cfg = load_run_config(path)
    handle = RunHandle(path.name, cfg, path, read_results(path))
    model = handle.load_model()

    federation = load_federation(Path(cfg.data.root))
    labels, scores = [], []
    for alias in sorted(cfg.federation.heldout_sites):
        s = score_site(handle, model, federation.site_dir(alias), alias, ("train", "val", "test"))
        labels.append(s.labels)
        scores.append(s.probs[:, 1])
    return np.concatenate(labels), np.concatenate(scores)


def paired_heldout_test(run_a: Path, run_b: Path) -> Any:
    """Paired DeLong test of two runs' final models on the same held-out images."""
    from fedmsk.metrics import delong_paired_test

    labels_a, scores_a = heldout_scores(run_a)
    labels_b, scores_b = heldout_scores(run_b)
    if not np.array_equal(labels_a, labels_b):
        raise ValueError(f"{run_a} and {run_b} were not evaluated on the same held-out images")
    return delong_paired_test(labels_a, scores_a, scores_b)
