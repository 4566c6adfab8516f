"""The study report from synthetic run directories (binary and multi-class, with and without
readers, failures and privacy), the PHI/path whitelist, figures and the command."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin
from sklearn.metrics import roc_auc_score, roc_curve

from fedmsk.commands.report import register, run_report
from fedmsk.report import ReportError, build_report, fmt_metric
from fedmsk.report_data import CAM_METHOD_PNG_KEY, Metric, load_run, safe_label

GRID = np.linspace(0, 1, 101)
SECRET = "PHI_SECRET_7731"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- fixtures


def _wilson(k: int, n: int) -> list[float]:
    if n == 0:
        return [0.0, 1.0]
    p, z = k / n, 1.959964
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [float(max(0, centre - half)), float(min(1, centre + half))]


def _estimate(k: int, n: int) -> dict:
    return {"value": k / n if n else None, "ci95": _wilson(k, n)}


def _scores(rng: np.random.Generator, n: int, separation: float) -> tuple[np.ndarray, np.ndarray]:
    labels = np.array([0, 1] * (n // 2))
    rng.shuffle(labels)
    scores = 1 / (1 + np.exp(-(rng.normal(size=n) + separation * (labels - 0.5))))
    return labels, scores


def _roc_grid(labels: np.ndarray, scores: np.ndarray) -> list[float]:
    fpr, tpr, _ = roc_curve(labels, scores)
    return [float(v) for v in np.interp(GRID, fpr, tpr)]


def binary_summary(seed: int, n: int, separation: float, threshold: float) -> dict:
    """A summary with the keys of fedmsk.evaluation.summarize, from real synthetic scores."""
    rng = np.random.default_rng(seed)
    y, s = _scores(rng, n, separation)
    auc = float(roc_auc_score(y, s))
    called = s >= threshold
    tp, fp = int((called & (y == 1)).sum()), int((called & (y == 0)).sum())
    fn, tn = int((~called & (y == 1)).sum()), int((~called & (y == 0)).sum())
    edges = np.linspace(0, 1, 11)
    which = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, 9)
    bins = [
        (s[which == b].mean(), y[which == b].mean(), int((which == b).sum()))
        if (which == b).any()
        else (None, None, 0)
        for b in range(10)
    ]
    f1_den = 2 * tp + fp + fn
    return {
        "n": n,
        "n_per_class": [int((y == 0).sum()), int((y == 1).sum())],
        "task_type": "binary",
        "classes": ["normal", "fracture"],
        "auc": auc,
        "auc_ci95": [max(0.0, auc - 0.07), min(1.0, auc + 0.06)],
        "auc_variance": 0.0013,
        "threshold": threshold,
        "at_threshold": {
            "accuracy": _estimate(tp + tn, n),
            "sensitivity": _estimate(tp, tp + fn),
            "specificity": _estimate(tn, tn + fp),
            "precision": _estimate(tp, tp + fp),
            "npv": _estimate(tn, tn + fn),
            "f1": {"value": 2 * tp / f1_den if f1_den else None, "ci95": None},
        },
        "youden": {"threshold": threshold, "sensitivity": tp / (tp + fn), "specificity": 0.7},
        "roc": {"fpr": GRID.tolist(), "tpr": _roc_grid(y, s)},
        "calibration": {
            "brier": float(np.mean((s - y) ** 2)),
            "ece": 0.05,
            "bins": {
                "mean_predicted": [None if b[0] is None else float(b[0]) for b in bins],
                "fraction_positive": [None if b[1] is None else float(b[1]) for b in bins],
                "count": [b[2] for b in bins],
            },
        },
        "confusion_matrix": [[tn, fp], [fn, tp]],
    }


def multiclass_summary(seed: int, n: int) -> dict:
    rng = np.random.default_rng(seed)
    classes = ["none", "mild", "severe"]
    y = np.arange(n) % 3
    logits = rng.normal(size=(n, 3)) + 1.5 * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    pred = probs.argmax(axis=1)
    cm = np.zeros((3, 3), dtype=int)
    np.add.at(cm, (y, pred), 1)
    per_class, rocs, f1s = {}, {}, []
    for c, name in enumerate(classes):
        tp = int(cm[c, c])
        fp, fn = int(cm[:, c].sum() - tp), int(cm[c, :].sum() - tp)
        tn = n - tp - fp - fn
        auc = float(roc_auc_score(y == c, probs[:, c]))
        f1 = 2 * tp / (2 * tp + fp + fn)
        f1s.append(f1)
        per_class[name] = {
            "auc": auc,
            "auc_ci95": [auc - 0.08, min(1.0, auc + 0.07)],
            "precision": _estimate(tp, tp + fp),
            "sensitivity": _estimate(tp, tp + fn),
            "specificity": _estimate(tn, tn + fp),
            "f1": {"value": f1, "ci95": [f1 - 0.1, min(1.0, f1 + 0.1)]},
        }
        rocs[name] = {"fpr": GRID.tolist(), "tpr": _roc_grid((y == c).astype(int), probs[:, c])}
    return {
        "n": n,
        "n_per_class": [int((y == c).sum()) for c in range(3)],
        "task_type": "multiclass",
        "classes": classes,
        "top1_accuracy": _estimate(int((pred == y).sum()), n),
        "macro_f1": float(np.mean(f1s)),
        "weighted_f1": float(np.mean(f1s)),
        "confusion_matrix": cm.tolist(),
        "per_class": per_class,
        "roc_per_class": rocs,
    }


def reader_comparison() -> dict:
    """Shaped like fedmsk.reader_study.compare_binary's output."""

    def reader(name: str, exp: str, sens: tuple, spec: tuple) -> dict:
        return {
            "reader": name,
            "experience": exp,
            "n_images": 80,
            "sensitivity": _estimate(*sens),
            "specificity": _estimate(*spec),
            "accuracy": _estimate(sens[0] + spec[0], sens[1] + spec[1]),
            "roc_point": {"fpr": 1 - spec[0] / spec[1], "tpr": sens[0] / sens[1]},
            "reader_auc": None,
            "model_at_reader_specificity": {
                "threshold": 0.4,
                "sensitivity": _estimate(33, 40),
                "specificity": spec[0] / spec[1],
                "sensitivity_difference": 33 / 40 - sens[0] / sens[1],
            },
            "model_at_reader_sensitivity": None,
            "locked_threshold": {"mcnemar": {"accuracy": {"p": 0.0321, "n": 80}}},
        }

    return {
        "task_type": "binary",
        "n_images": 80,
        "n_positive": 40,
        "n_negative": 40,
        "mcnemar_rule": "exact binomial when model-only + reader-only correct < 25, otherwise",
        "model": {
            "auc": 0.91,
            "auc_ci95": [0.85, 0.97],
            "threshold": 0.42,
            "threshold_source": "locked",
            "sensitivity": _estimate(34, 40),
            "specificity": _estimate(33, 40),
            "roc": {"fpr": GRID.tolist(), "tpr": np.sqrt(GRID).tolist()},
        },
        "readers": [
            reader("R1", "resident", (29, 40), (31, 40)),
            reader("R2", "attending", (35, 40), (36, 40)),
        ],
        "groups": {
            "attending": {
                "n_readers": 1,
                "mean_sensitivity": 0.875,
                "mean_specificity": 0.9,
                "model_sensitivity_at_mean_specificity": 0.8,
            },
        },
    }


def write_run(
    run_dir: Path,
    *,
    multiclass: bool = False,
    readers: bool = False,
    failures: bool = False,
    privacy: bool = False,
    with_metrics: bool = True,
) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    classes = ["none", "mild", "severe"] if multiclass else ["normal", "fracture"]

    def summary(seed: int, n: int, separation: float) -> dict:
        return (
            multiclass_summary(seed, n) if multiclass else binary_summary(seed, n, separation, 0.5)
        )

    results: dict = {
        "run": {
            "mode": "federated",
            "strategy": "fedprox",
            "model": "resnet18",
            "task": "knee_oa" if multiclass else "wrist_fracture",
            "classes": classes,
            "rounds": 5,
            "each_round": "3 of 12 training sites (seeded sample), 40 steps each",
            "recipe": "adamw lr 0.001, batch 16, 5% warm-up then wsd (decay over the last 30%), "
            "zero classifier head",
            "augmentation": "crop 85 to 100%, rotation up to 10 deg, flip, gamma 0.7 to 1.5 "
            "(those three ramped in over the first 50% of steps), collimator bands on 30% of "
            "images",
            "config_hash": "ab12cd34ef56ab78",
        },
        "threshold": {"value": 0.5, "source": "youden-val-histograms"},
        "sites": {
            "site00": {"role": "train", "split": "val", "summary": summary(1, 120, 2.5)},
            "site01": {"role": "train", "split": "val", "summary": summary(2, 90, 2.0)},
            "site09": {"role": "heldout", "split": "test", "summary": summary(3, 150, 1.5)},
        },
        "pooled": {"val": summary(4, 210, 2.2)},
        "failures": [],
    }
    if readers:
        results["readers"] = reader_comparison()
    if failures:
        results["failures"] = [{"round": 3, "site": "site01", "error": "CorruptPixelDataError"}]
    if privacy:
        results["privacy"] = {
            "site00": {"epsilon": 7.83, "delta": 1e-4, "stopped": False},
            "site01": {
                "epsilon": 8.0,
                "delta": 1e-4,
                "stopped": True,
                "budget-lifetime-epsilon": 9.5,
                "budget-lifetime-cap": 10.0,
                "budget-rounds-trained": 6.0,
            },
        }
    (run_dir / "results.json").write_text(json.dumps(results))
    (run_dir / "config.yaml").write_text("data:\n  root: /srv/fed\nmodel:\n  name: resnet18\n")
    if with_metrics:
        lines = []
        for r in range(1, 6):
            for site in ("site00", "site01"):
                lines.append(
                    {
                        "round": r,
                        "phase": "train",
                        "site": site,
                        "loss": 0.7 / r,
                        "num_examples": 100,
                    }
                )
                lines.append(
                    {
                        "round": r,
                        "phase": "val",
                        "site": site,
                        "loss": 0.8 / r,
                        "auc": 0.6 + 0.05 * r,
                    }
                )
            lines.append(
                {"round": r, "phase": "val", "site": None, "loss": 0.8 / r, "auc": 0.62 + 0.05 * r}
            )
            lines.append({"round": r, "phase": "heldout", "site": "site09", "auc": 0.58 + 0.04 * r})
        (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return results


def minimal_run(run_dir: Path, readers: dict | None = None) -> None:
    """A cheap run directory: one center, no ROC or metrics.jsonl (few figures to draw)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "run": {"mode": "local"},
        "sites": {
            "site00": {
                "role": "train",
                "summary": {"n": 10, "task_type": "binary", "classes": ["a", "b"], "auc": 0.7},
            }
        },
    }
    if readers is not None:
        results["readers"] = readers
    (run_dir / "results.json").write_text(json.dumps(results))


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.size[0] > 200 and img.size[1] > 200


def _section(text: str, start: str, end: str) -> str:
    return text[text.index(start) : text.index(end, text.index(start))]


# ----------------------------------------------------------------------------- tests


def test_binary_report_tables_files_and_figures(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    results = write_run(run_dir)
    figures = run_dir / "figures"
    figures.mkdir()  # Grad-CAM grids are made elsewhere (on a node) and left here
    Image.fromarray(np.full((40, 60, 3), 128, dtype=np.uint8)).save(figures / "cam_outcomes.png")
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(figures / "notcam.png")
    paths = build_report(run_dir)

    for path in (paths.html, paths.markdown, paths.metrics):
        assert path.is_file() and path.parent == run_dir
    names = {p.name for p in paths.figures}
    assert {
        "roc.png",
        "roc_by_center.png",
        "confusion.png",
        "calibration.png",
        "training.png",
    } <= names
    assert "roc_readers.png" not in names and "roc_per_class.png" not in names
    for figure in paths.figures:
        _assert_png(figure)

    html = paths.html.read_text()
    md = paths.markdown.read_text()
    held_out = _section(html, "<h3>Held-out centers", "</table>")
    training = _section(html, "<h3>Training centers", "</table>")
    for alias, section in (("site00", training), ("site01", training), ("site09", held_out)):
        summary = results["sites"][alias]["summary"]
        auc = Metric(summary["auc"], *summary["auc_ci95"])
        assert f"<td>{alias}</td>" in section
        assert fmt_metric(auc) in section and fmt_metric(auc) in md
        for name in ("sensitivity", "specificity", "accuracy", "precision"):
            raw = summary["at_threshold"][name]
            assert fmt_metric(Metric(raw["value"], *raw["ci95"])) in section
        assert f"<td>{summary['n']}</td>" in section
    assert "site09" not in training and "site00" not in held_out
    assert "<td>Each round trains</td><td>3 of 12 training sites (seeded sample), 40 steps" in html
    assert "<td>Optimizer, schedule, head</td><td>adamw lr 0.001, batch 16, 5% warm-up" in html
    assert (
        "<td>Training augmentation</td><td>crop 85 to 100%, rotation up to 10 deg, flip, gamma "
        "0.7 to 1.5 (those three ramped in over the first 50% of steps), collimator bands on 30% "
        "of images</td>"
    ) in html
    assert "pooled" in html
    assert "data:image/png;base64," in html
    assert "](figures/roc.png)" in md
    for absent in ("Model versus readers", "<h2>Differential privacy", "Failed center rounds"):
        assert absent not in html
    cam_b64 = base64.b64encode((figures / "cam_outcomes.png").read_bytes()).decode()
    notcam_b64 = base64.b64encode((figures / "notcam.png").read_bytes()).decode()
    assert "Grad-CAM" in html and cam_b64 in html and notcam_b64 not in html
    assert "](figures/cam_outcomes.png)" in md

    flat = json.loads(paths.metrics.read_text())
    assert flat["sites.site09.auc"] == pytest.approx(results["sites"]["site09"]["summary"]["auc"])
    assert flat["sites.site09.role"] == "heldout"
    assert flat["threshold.value"] == 0.5
    assert flat["failures.count"] == 0
    assert all(isinstance(v, int | float | str | bool) for v in flat.values())


def test_report_with_readers_failures_privacy(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    write_run(run_dir, readers=True, failures=True, privacy=True)
    paths = build_report(run_dir)
    html = paths.html.read_text()
    assert "roc_readers.png" in {p.name for p in paths.figures}
    _assert_png(run_dir / "figures" / "roc_readers.png")

    readers = _section(html, "Model versus readers", "</table>")
    assert "<td>R1</td>" in readers and "<td>attending</td>" in readers
    assert fmt_metric(Metric(29 / 40, *_wilson(29, 40))) in readers
    assert "<td>0.032</td>" in readers  # McNemar p at the locked threshold
    failures = _section(html, "Failed center rounds", "</table>")
    assert "<td>3</td><td>site01</td><td>CorruptPixelDataError</td>" in failures
    privacy = _section(html, "<h2>Differential privacy", "</table>")
    assert "<th>Rounds trained</th>" in privacy
    assert (
        "<td>site01</td><td>6</td><td>8.00</td><td>1.0e-04</td><td>9.50 / 10</td><td>yes</td>"
        in privacy
    )
    assert (
        "<td>site00</td><td>n/a</td><td>7.83</td><td>1.0e-04</td><td>n/a</td><td>no</td>" in privacy
    )
    assert "one image" in privacy  # the unit the guarantee protects
    # a patient-level run says so, in the run table too
    results = json.loads((run_dir / "results.json").read_text())
    results["run"]["privacy_unit"] = "patient"
    (run_dir / "results.json").write_text(json.dumps(results))
    html = build_report(run_dir).html.read_text()
    privacy = _section(html, "<h2>Differential privacy", "</table>")
    assert "one patient" in privacy and "one image:" not in privacy
    assert "<td>DP protects one</td><td>patient</td>" in html
    flat = json.loads(paths.metrics.read_text())
    assert flat["failures.count"] == 1
    assert flat["privacy.site00.epsilon"] == pytest.approx(7.83)
    assert flat["privacy.site01.lifetime_epsilon"] == 9.5
    assert flat["privacy.site01.lifetime_cap"] == 10.0
    assert (
        flat["privacy.site01.rounds_trained"] == 6 and "privacy.site00.rounds_trained" not in flat
    )
    assert flat["readers.R2.sensitivity"] == pytest.approx(35 / 40)


def test_multiclass_report(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    results = write_run(run_dir, multiclass=True)
    paths = build_report(run_dir)
    names = {p.name for p in paths.figures}
    assert "roc_per_class.png" in names and "confusion.png" in names
    assert "roc_by_center.png" not in names
    for figure in paths.figures:
        _assert_png(figure)
    html = paths.html.read_text()
    assert "Top-1 accuracy" in html
    summary = results["sites"]["site09"]["summary"]
    top1 = summary["top1_accuracy"]
    held_out = _section(html, "<h3>Held-out centers", "</table>")
    assert fmt_metric(Metric(top1["value"], *top1["ci95"])) in held_out
    per_class = _section(html, "site09 (held-out center", "</table>")
    for name in ("none", "mild", "severe"):
        row = summary["per_class"][name]
        assert f"<td>{name}</td>" in per_class
        assert fmt_metric(Metric(row["auc"], *row["auc_ci95"])) in per_class
        sens = row["sensitivity"]
        assert fmt_metric(Metric(sens["value"], *sens["ci95"])) in per_class
    flat = json.loads(paths.metrics.read_text())
    assert flat["sites.site00.per_class.severe.auc"] == pytest.approx(
        results["sites"]["site00"]["summary"]["per_class"]["severe"]["auc"]
    )


def _plant_secrets(run_dir: Path, results: dict) -> None:
    """Distinctive strings in every place that must never be rendered."""
    results["manifest"] = [{"patient_id": SECRET, "image": f"/data/{SECRET}.dcm"}]
    results["run"]["data_root"] = f"/srv/{SECRET}"
    results["run"]["strategy"] = f"/opt/{SECRET}/fedavg"
    results["threshold"]["source"] = f"C:\\{SECRET}"
    site = results["sites"]["site00"]
    site["patient_ids"] = [SECRET]
    site["split"] = f"/tmp/{SECRET}"
    site["summary"]["worst_images"] = [f"/data/{SECRET}.png"]
    site["summary"]["at_threshold"]["sensitivity"]["note"] = SECRET
    results["sites"][f"/mnt/{SECRET}"] = results["sites"].pop("site01")
    results["sites"]["site09"]["summary"]["classes"] = ["normal", "2019-03-05"]
    results["failures"] = [{"round": 2, "site": "site00", "error": f"/x/{SECRET}.dcm: corrupt"}]
    results["privacy"] = {
        "site00": {"epsilon": 3.0, "delta": 1e-5, "stopped": False, "log": SECRET}
    }
    results["readers"]["readers"][0]["reader"] = f"/home/{SECRET}"
    results["readers"]["readers"][1]["images"] = [SECRET]
    results["readers"]["mcnemar_rule"] = f"< 25 {SECRET}"
    results["comparisons"] = [
        {
            "first": "site00",
            "second": "site09",
            "auc1": 0.9,
            "auc2": 0.8,
            "z": 2.1,
            "p": 0.04,
            "detail": SECRET,
        }
    ]
    (run_dir / "results.json").write_text(json.dumps(results))
    with (run_dir / "metrics.jsonl").open("a") as handle:
        handle.write(
            json.dumps(
                {
                    "round": 6,
                    "phase": "val",
                    "site": f"/srv/{SECRET}",
                    "auc": 0.9,
                    "image": f"/data/{SECRET}.png",
                }
            )
            + "\n"
        )
        handle.write(f"not json {SECRET}\n")
    (run_dir / "config.yaml").write_text(f"data:\n  root: /srv/{SECRET}\n")
    figures = run_dir / "figures"
    figures.mkdir(exist_ok=True)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(figures / f"cam_{SECRET} x.png")


def test_report_renders_no_phi_or_paths(tmp_path: Path) -> None:
    run_dir = tmp_path / "RUNDIR_MARKER_93"
    results = write_run(run_dir, readers=True)
    _plant_secrets(run_dir, results)
    paths = build_report(run_dir)

    outputs = [paths.html.read_text(), paths.markdown.read_text(), paths.metrics.read_text()]
    for text in outputs:
        assert SECRET not in text
        assert "RUNDIR_MARKER_93" not in text
        assert str(tmp_path) not in text
        assert "2019-03-05" not in text
        assert not re.search(r"(?<![\w<])/(srv|data|home|mnt|opt|tmp|x)/", text)
    for figure in paths.figures:
        blob = figure.read_bytes()
        assert SECRET.encode() not in blob and str(tmp_path).encode() not in blob
    html = outputs[0]
    # whitelisted fields are still rendered, with a safe replacement for unsafe values
    assert "error (details withheld)" in html
    assert "<td>Reader 1</td>" in html and "<td>R2</td>" in html
    assert "center " in html  # the path-like site alias was replaced
    assert "site00 vs site09" in html
    assert "<td>resnet18</td>" in html


def test_report_tolerates_missing_optional_parts(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(
        json.dumps(
            {
                "run": {"mode": "local"},
                "sites": {
                    "site00": {
                        "role": "train",
                        "summary": {
                            "n": 10,
                            "task_type": "binary",
                            "classes": ["a", "b"],
                            "auc": 0.7,
                        },
                    }
                },
            }
        )
    )
    paths = build_report(run_dir)
    html = paths.html.read_text()
    assert "<td>0.700</td>" in html and "n/a" in html
    assert paths.figures == []

    only_metrics = tmp_path / "metrics_only"
    write_run(only_metrics)
    (only_metrics / "results.json").unlink()
    assert [p.name for p in build_report(only_metrics).figures] == ["training.png"]


def test_report_errors_name_the_cause(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="not a directory"):
        build_report(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReportError, match="results.json"):
        build_report(empty)
    (empty / "results.json").write_text("{broken")
    with pytest.raises(ReportError, match="results.json: not readable as JSON"):
        build_report(empty)


def test_stale_own_figures_removed(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    minimal_run(run_dir, readers=reader_comparison())
    build_report(run_dir)
    assert (run_dir / "figures" / "roc_readers.png").is_file()
    minimal_run(run_dir)
    build_report(run_dir)
    assert not (run_dir / "figures" / "roc_readers.png").exists()


def test_locked_threshold_names_youden_as_a_reader_writes_it(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    results = write_run(run_dir)
    results["threshold"]["source"] = "youden on federated validation histograms"
    (run_dir / "results.json").write_text(json.dumps(results))
    html = build_report(run_dir).html.read_text()
    assert "(Youden on federated validation histograms)" in html
    assert "(youden on" not in html


def test_safe_label_rejects_paths_and_dates() -> None:
    assert safe_label("site07", "x") == "site07"
    assert safe_label("fracture", "x") == "fracture"
    for bad in ("/srv/a", "..\\b", "C:\\x", "20190305", "2019-03-05", "a" * 80, "", None, 1.5):
        assert safe_label(bad, "fallback") == "fallback"


def test_load_run_reads_only_known_keys(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    write_run(run_dir, privacy=True)
    data = load_run(run_dir)
    assert [s.alias for s in data.sites] == ["site00", "site01", "site09"]
    assert [s.role for s in data.sites] == ["train", "train", "heldout"]
    assert data.sites[2].summary.n_positive == 75
    assert len(data.sites[0].summary.roc.tpr) == 101
    assert {p.site for p in data.privacy} == {"site00", "site01"}
    assert {p.phase for p in data.history} == {"train", "val", "heldout"}


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("11d84841548b6d32", "11d84841548b6d32"),  # eight decimal digits in a row: still a hash
        ("ab12cd34ef56ab78", "ab12cd34ef56ab78"),
        ("2026-12-05 patient", "(withheld)"),
        ("/srv/fed/site00", "(withheld)"),
    ],
)
def test_the_config_hash_is_shown_when_it_is_hex(tmp_path: Path, value: str, shown: str) -> None:
    run_dir = tmp_path / "run"
    results = write_run(run_dir)
    results["run"]["config_hash"] = value
    (run_dir / "results.json").write_text(json.dumps(results))
    assert load_run(run_dir).run.fields["config_hash"] == shown


def test_command_prints_relative_paths(tmp_path: Path, monkeypatch, capsys) -> None:
    import argparse

    run_dir = tmp_path / "run"
    minimal_run(run_dir)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    monkeypatch.chdir(tmp_path)
    args = parser.parse_args(["report", "run"])
    assert args.func is run_report
    assert run_report(args) == 0
    out = capsys.readouterr().out
    assert "report: " + str(Path("run") / "report.html") in out
    assert str(tmp_path) not in out
    assert run_report(parser.parse_args(["report", "nowhere"])) == 1
    assert "nowhere" in capsys.readouterr().err


def test_real_reader_study_output_is_rendered(tmp_path: Path) -> None:
    reader_study = pytest.importorskip("fedmsk.reader_study")
    rng = np.random.default_rng(0)
    keys = [f"img{i}" for i in range(60)]
    labels = {k: int(i % 2) for i, k in enumerate(keys)}
    scores = {k: float(np.clip(0.3 + 0.4 * labels[k] + rng.normal(0, 0.2), 0, 1)) for k in keys}
    calls = [
        reader_study.ReaderCall(reader, exp, k, int(rng.random() < (0.8 if labels[k] else 0.2)))
        for reader, exp in (("A", "resident"), ("B", "radiologist"))
        for k in keys
    ]
    comparison = reader_study.compare_binary(calls, labels, scores, threshold=0.5)
    run_dir = tmp_path / "run"
    minimal_run(run_dir, readers=comparison)
    html = build_report(run_dir).html.read_text()
    readers = _section(html, "Model versus readers", "</table>")
    reader_a = comparison["readers"][0]
    assert "<td>A</td><td>resident</td><td>60</td>" in readers
    sens = reader_a["sensitivity"]
    assert fmt_metric(Metric(sens["value"], *sens["ci95"])) in readers
    assert "img0" not in html


def test_real_evaluation_summaries_are_rendered(tmp_path: Path) -> None:
    evaluation = pytest.importorskip("fedmsk.evaluation")
    rng = np.random.default_rng(5)
    y, s = _scores(rng, 80, 2.0)
    probs = np.stack([1 - s, s], axis=1)
    patients = [f"P{i // 2}" for i in range(80)]
    binary = evaluation.summarize(
        y, probs, ["normal", "fracture"], threshold=0.5, bootstrap=50, patient_ids=patients
    )
    ym = np.arange(60) % 3
    logits = rng.normal(size=(60, 3)) + 1.2 * np.eye(3)[ym]
    multi = evaluation.summarize(
        ym, np.exp(logits) / np.exp(logits).sum(1, keepdims=True), ["KL0", "KL2", "KL4"]
    )
    for name, summary in (("bin", binary), ("mc", multi)):
        run_dir = tmp_path / name
        run_dir.mkdir()
        results = {
            "run": {"mode": "pooled", "classes": summary["classes"]},
            "threshold": {"value": 0.5, "source": "fixed"},
            "sites": {"site03": {"role": "heldout", "split": "test", "summary": summary}},
        }
        (run_dir / "results.json").write_text(json.dumps(results))
        paths = build_report(run_dir)
        html = paths.html.read_text()
        held_out = _section(html, "<h3>Held-out centers", "</table>")
        assert f"<td>{summary['n']}</td>" in held_out
        if name == "bin":
            auc = Metric(summary["auc"], *summary["auc_ci95"])
            assert fmt_metric(auc) in held_out
            sens = summary["at_threshold"]["sensitivity"]
            assert fmt_metric(Metric(sens["value"], *sens["ci95"])) in held_out
            assert f"<td>{summary['n_per_class']['fracture']}</td>" in held_out
            assert "Patient level" in html
            assert {"roc_by_center.png", "calibration.png"} <= {p.name for p in paths.figures}
            flat = json.loads(paths.metrics.read_text())
            assert "sites.site03.auc_bootstrap_ci95_low" in flat
            assert flat["sites.site03.patient_level.n"] == 40
        else:
            per_class = _section(html, "site03 (held-out center", "</table>")
            for cls in ("KL0", "KL2", "KL4"):
                row = summary["per_class"][cls]
                assert f"<td>{cls}</td><td>{summary['n_per_class'][cls]}</td>" in per_class
                assert fmt_metric(Metric(row["auc"], *row["auc_ci95"])) in per_class
            assert "roc_per_class.png" in {p.name for p in paths.figures}


def test_study_table_and_figures_are_rendered(tmp_path: Path) -> None:
    from fedmsk.report import build_report

    (tmp_path / "results.json").write_text(
        json.dumps({"run": {"mode": "federated", "task": "gout_mtp1_us"}, "sites": {}})
    )
    (tmp_path / "study_table.md").write_text(
        "# Single vs multiple model\n\nPaired DeLong on the test set.\n\n"
        "| model | AUC | Z | P |\n|---|---|---|---|\n| single | 0.917 | -0.50 | 0.62 |\n"
    )
    (tmp_path / "figures").mkdir()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.plot([0, 1], [0, 1])
    plt.savefig(tmp_path / "figures" / "study_roc.png")
    plt.close("all")
    paths = build_report(tmp_path)
    markdown = paths.markdown.read_text()
    assert "Study protocol" in markdown and "| single | 0.917 | -0.50 | 0.62 |" in markdown
    assert "study_roc.png" in markdown
    assert "0.917" in paths.html.read_text()


def test_history_reads_the_loss_sites_report(tmp_path: Path) -> None:
    """Sites write train-loss / eval-loss; the loss panel of training.png plots them."""
    from fedmsk.report_data import _history

    lines = [
        {"round": 1, "phase": "train", "site": None, "train-loss": 0.7},
        {"round": 1, "phase": "val", "site": "site00", "eval-loss": 0.65, "auc": 0.6},
        {"round": 2, "phase": "train", "site": None, "loss": 0.5, "train-loss": 0.9},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    points = _history(path)
    assert [p.values.get("loss") for p in points] == [0.7, 0.65, 0.5]
    assert points[1].values["auc"] == 0.6


# ----------------------------------------------------------------------------- summary on top


def _set_point(summary: dict, sensitivity: float, specificity: float) -> None:
    summary["at_threshold"]["sensitivity"] = {"value": sensitivity, "ci95": [0.0, 1.0]}
    summary["at_threshold"]["specificity"] = {"value": specificity, "ci95": [0.0, 1.0]}


def test_summary_gives_the_centers_range_alone_when_no_combined_validation_was_logged(
    tmp_path: Path,
) -> None:
    from fedmsk.report_summary import build_summary

    write_run(tmp_path, with_metrics=False)
    validation = next(
        line for line in build_summary(load_run(tmp_path)).headline if "validation" in line
    )
    assert validation.startswith("Training centers' validation: AUC from ")
    assert "together" not in validation


def test_summary_leads_with_the_heldout_result_and_warns_in_plain_words(tmp_path: Path) -> None:
    from fedmsk.report_summary import build_summary

    results = write_run(tmp_path, failures=True, privacy=True)
    for alias in ("site00", "site01"):
        _set_point(results["sites"][alias]["summary"], 0.80, 0.85)
    heldout = results["sites"]["site09"]["summary"]
    _set_point(heldout, 0.99, 0.03)  # the locked threshold calls nearly everyone positive
    heldout["auc_ci95"] = [0.45, 0.66]
    results["sites"]["site01"]["summary"]["n_per_class"] = [90, 0]
    (tmp_path / "results.json").write_text(json.dumps(results))
    summary = build_summary(load_run(tmp_path))
    first = summary.headline[0]
    assert first.startswith("Held-out center site09 (external test, never trained on, n=150): AUC")
    assert "[0.450, 0.660] (DeLong 95% CI)" in first and "specificity 0.030" in first
    assert any("largest epsilon spent 8.00 (at site01)" in line for line in summary.headline)
    assert any(
        line.startswith("site01 failed 1 time(s) (CorruptPixelDataError)")
        for line in (summary.headline)
    )
    text = "\n".join(summary.warnings)
    assert "operating point did not transfer to site09" in text and "0.99/0.03" in text
    assert "site01's val images are all of one class (normal)" in text
    assert "not distinguishable from chance" in text
    assert "did not converge" not in text  # the loss fell from 0.7 to 0.14
    validation = next(line for line in summary.headline if "validation" in line)
    # round 5's AUC over both centers' validation images (0.62 + 0.05 * 5), then each center's
    assert validation.startswith(
        "Training centers' validation: AUC 0.870 with all their validation images together"
    )
    assert "per center AUC from" in validation and "of 90 to 120 images" in validation

    html_text = (build_report(tmp_path).html).read_text()
    assert html_text.index("<h2>Summary</h2>") < html_text.index("<h2>Run</h2>")
    assert '<p class="warning"><strong>Warning:</strong> The operating point' in html_text


def quiet_run(run_dir: Path) -> dict:
    """A run that deserves no warning: operating points that transfer, a CI above chance."""
    results = write_run(run_dir)
    for alias in ("site00", "site01", "site09"):
        _set_point(results["sites"][alias]["summary"], 0.80, 0.85)
    results["sites"]["site09"]["summary"]["auc_ci95"] = [0.70, 0.86]
    (run_dir / "results.json").write_text(json.dumps(results))
    return results


def test_summary_is_quiet_when_nothing_is_wrong_and_flags_a_flat_loss(tmp_path: Path) -> None:
    from fedmsk.report_summary import build_summary

    quiet_run(tmp_path)
    assert build_summary(load_run(tmp_path)).warnings == []
    flat = [
        {"round": r, "phase": "train", "site": None, "train-loss": 0.60 - 0.001 * r}
        for r in range(1, 6)
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in flat) + "\n")
    warnings = build_summary(load_run(tmp_path)).warnings
    assert len(warnings) == 1 and warnings[0].startswith("Training did not converge")
    assert "(round 1) to only 0.595 (round 5)" in warnings[0]


def test_a_run_that_never_left_its_starting_plateau_says_so_and_what_to_do(
    tmp_path: Path, capsys
) -> None:
    """A loss that stays at ln 2 (what a class-weighted binary model that ignores the image
    scores) is named as the plateau in the report and in the terminal, with another seed as the
    remedy; a pooled run counts epochs. A loss that fell, even slowly, is not called a plateau."""
    from fedmsk.commands.simulate import print_final_results
    from fedmsk.report_summary import build_summary

    results = quiet_run(tmp_path)
    stuck = [
        {"round": r, "phase": "train", "site": None, "train-loss": 0.70 - 0.0005 * r}
        for r in range(1, 25)
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in stuck) + "\n")
    warnings = build_summary(load_run(tmp_path)).warnings
    assert len(warnings) == 1
    assert warnings[0].startswith("Training never left its starting plateau: the training loss")
    assert "ended at 0.688 (round 24)" in warnings[0] and "ln 2 = 0.693" in warnings[0]
    assert "another seed=" in warnings[0]
    html_text = build_report(tmp_path).html.read_text()
    assert "never left its starting plateau" in html_text
    # the cause comes before the symptoms it explains (here an AUC near chance)
    auc = results["sites"]["site09"]["summary"]
    kept = auc["auc"], auc["auc_ci95"]
    auc["auc"], auc["auc_ci95"] = 0.48, [0.38, 0.58]
    (tmp_path / "results.json").write_text(json.dumps(results))
    warnings = build_summary(load_run(tmp_path)).warnings
    assert [w.split(":")[0] for w in warnings] == [
        "Training never left its starting plateau",
        "On site09 the model is not distinguishable from chance",
    ]
    auc["auc"], auc["auc_ci95"] = kept

    assert "<td>Rounds</td><td>5</td>" in html_text
    results["run"]["mode"] = "pooled"
    (tmp_path / "results.json").write_text(json.dumps(results))
    print_final_results(tmp_path)
    out = capsys.readouterr().out
    assert "warning: Training never left its starting plateau" in out and "(epoch 24)" in out
    pooled_html = build_report(tmp_path).html.read_text()
    assert "<td>Epochs</td><td>5</td>" in pooled_html and "<td>Rounds</td>" not in pooled_html

    learned = [{**point, "train-loss": 0.70 - 0.012 * point["round"]} for point in stuck]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in learned) + "\n")
    assert build_summary(load_run(tmp_path)).warnings == []
    print_final_results(tmp_path)
    assert "warning" not in capsys.readouterr().out


def test_rounds_that_were_not_aggregated_are_warned_about(tmp_path: Path, capsys) -> None:
    """A run whose sites failed in most rounds still ends with a held-out AUC; the summary and
    the terminal must say the model trained on fewer rounds than planned."""
    from fedmsk.commands.simulate import print_final_results
    from fedmsk.report_summary import build_summary

    results = quiet_run(tmp_path)
    assert build_summary(load_run(tmp_path)).warnings == []
    print_final_results(tmp_path)
    assert "warning" not in capsys.readouterr().out

    with (tmp_path / "metrics.jsonl").open("a") as handle:
        for r in (2, 3, 5):
            handle.write(json.dumps({"round": r, "phase": "train-skipped", "site": None}) + "\n")
    warnings = build_summary(load_run(tmp_path)).warnings
    assert len(warnings) == 1
    assert warnings[0].startswith("3 of 5 rounds were not aggregated")
    assert "rounds 2-3, 5)" in warnings[0] and "Failed center rounds" not in warnings[0]
    results["failures"] = [{"round": 2, "site": "site01", "error": "RuntimeError"}]
    (tmp_path / "results.json").write_text(json.dumps(results))
    warnings = build_summary(load_run(tmp_path)).warnings
    assert warnings[0].endswith("the section 'Failed center rounds' names the sites.")
    print_final_results(tmp_path)
    out = capsys.readouterr().out
    assert "held-out center site09: AUC" in out
    assert "warning: 3 of 5 rounds were not aggregated" in out and "rounds 2-3, 5)" in out
    html_text = build_report(tmp_path).html.read_text()
    assert "3 of 5 rounds were not aggregated" in html_text


def test_a_figure_that_cannot_be_drawn_is_named_with_the_reason(tmp_path: Path) -> None:
    minimal_run(tmp_path)  # one center, no ROC curve, no metrics.jsonl, no Grad-CAM
    markdown = build_report(tmp_path).markdown.read_text()
    line = next(x for x in markdown.splitlines() if x.startswith("Not drawn: "))
    assert "ROC curves: no center's results carry a ROC curve." in line
    assert "Training curves: metrics.jsonl has no per-round loss or score." in line
    assert "Grad-CAM: not computed for this run" in line
    write_run(tmp_path / "full")
    (tmp_path / "full" / "figures").mkdir(exist_ok=True)
    assert "ROC curves:" not in build_report(tmp_path / "full").markdown.read_text()


def test_heat_map_heading_names_the_method_the_pointing_game_used(tmp_path: Path) -> None:
    """The maps are LayerCAM by default: the heading and the figure's text say so, not
    Grad-CAM; without a game the family's name stays."""
    from fedmsk.pointing import PointingResult, write_pointing

    run_dir = tmp_path / "run"
    write_run(run_dir)
    figures = run_dir / "figures"
    figures.mkdir()
    Image.fromarray(np.full((40, 60, 3), 128, dtype=np.uint8)).save(figures / "cam_site09.png")
    plain = build_report(run_dir).html.read_text()
    assert "<h2>Heat maps (Grad-CAM)</h2>" in plain
    write_pointing(run_dir, {"site09": PointingResult(10, 7, 0.05, 1e-6, "layercam")})
    html = build_report(run_dir).html.read_text()
    assert "<h2>Heat maps (LayerCAM)</h2>" in html and 'alt="LayerCAM overlays"' in html
    assert "7 of 10" in html
    assert "Pointing game on site09 (LayerCAM)" in html and "(layercam)" not in html
    # without a pointing game (no lesion boxes, e.g. ultrasound) the grid itself names it
    (run_dir / "pointing_game.json").unlink()
    pnginfo = PngImagePlugin.PngInfo()
    pnginfo.add_text(CAM_METHOD_PNG_KEY, "layercam")
    Image.fromarray(np.full((40, 60, 3), 128, dtype=np.uint8)).save(
        figures / "cam_site09.png", pnginfo=pnginfo
    )
    html = build_report(run_dir).html.read_text()
    assert "<h2>Heat maps (LayerCAM)</h2>" in html and 'alt="LayerCAM overlays"' in html


def test_a_tiny_p_value_reads_below_a_thousandth_not_zero(tmp_path: Path) -> None:
    """A DeLong p of 1e-9 in the summary's comparison lines (as in the gout study's single vs
    multiple models) is "<0.001", as in the comparison table: never "p 0.000"."""
    run_dir = tmp_path / "run"
    write_run(run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    results["comparisons"] = [
        {"name": "external overall single vs multiple", "auc1": 0.79, "auc2": 0.61, "p": 1e-9},
        {"name": "external dorsal single vs multiple", "auc1": 0.83, "auc2": 0.82, "p": 0.41},
    ]
    (run_dir / "results.json").write_text(json.dumps(results))
    markdown = build_report(run_dir).markdown.read_text()
    line = "external overall single vs multiple: AUC difference +0.180 (DeLong p <0.001)"
    assert line in markdown
    assert "(DeLong p 0.410)" in markdown
    assert "p 0.000" not in markdown
