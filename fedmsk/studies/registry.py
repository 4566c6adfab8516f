"""Study name -> protocol, and the one entry point the commands call."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fedmsk.config import ExperimentConfig
from fedmsk.studies.base import (
    RunHandle,
    Study,
    StudyContext,
    StudyError,
    StudyOutput,
    clean,
    md_table,
    read_results,
)


def _studies() -> dict[str, Study]:
    from fedmsk.studies import (
        atfl_us,
        dislocation_xray,
        femoral_device_xray,
        gout_mtp1_us,
        vcf_xray,
    )

    modules = (atfl_us, gout_mtp1_us, vcf_xray, dislocation_xray, femoral_device_xray)
    return {module.STUDY.name: module.STUDY for module in modules}


def study_names() -> list[str]:
    return list(_studies())


def get_study(name: str) -> Study:
    studies = _studies()
    if name not in studies:
        raise StudyError(f"study={name!r} is not a known study; choose one of {', '.join(studies)}")
    return studies[name]


def _federation_roles(cfg: ExperimentConfig, results: dict[str, Any]) -> tuple[list, list]:
    run = results.get("run") or {}
    training = [str(a) for a in run.get("training_sites") or []]
    heldout = [str(a) for a in run.get("heldout_sites") or []]
    if not training:
        sites = results.get("sites") or {}
        training = sorted(a for a, s in sites.items() if s.get("role") == "train")
        heldout = sorted(a for a, s in sites.items() if s.get("role") == "heldout")
    return sorted(training), sorted(heldout or cfg.federation.heldout_sites)


def run_study_analysis(cfg: ExperimentConfig, run_dir: Path | str) -> dict[str, Any]:
    """Train the study's variant runs (if not already there), analyse, write the outputs.

    Adds ``study`` (and ``readers`` / ``comparisons`` where the study has them) to
    ``RUN_DIR/results.json`` and writes ``RUN_DIR/study_table.md``; returns the ``study``
    section. ``cfg`` is the run's configuration with ``cfg.study`` naming the protocol.
    """
    from fedmsk.studies.runner import train_variant

    if not cfg.study:
        raise StudyError("study is not set; run with study=NAME (configs/study/NAME.yaml)")
    study = get_study(cfg.study)
    started = time.monotonic()
    run_dir = Path(run_dir).resolve()
    results = read_results(run_dir)
    main = RunHandle("main", cfg, run_dir, results)
    training, heldout = _federation_roles(cfg, results)
    variants: dict[str, RunHandle] = {}
    missing: dict[str, str] = {}
    for variant in study.variants(cfg):
        print(f"study {study.name}: variant {variant.name} ...", flush=True)
        try:
            variants[variant.name] = train_variant(main, variant, training)
        except Exception as exc:  # noqa: BLE001 - one failed variant must not lose the others
            missing[variant.name] = type(exc).__name__
            print(f"study {study.name}: variant {variant.name} failed: {exc}", flush=True)
    ctx = StudyContext(
        cfg=cfg,
        main=main,
        variants=variants,
        missing=missing,
        root=Path(cfg.data.root),
        training_sites=training,
        heldout_sites=heldout,
    )
    output = study.analyse(ctx)
    section = dict(output.section)
    section.update(
        {
            "name": study.name,
            "title": study.title,
            "mode": main.mode,
            "variants": sorted(variants),
            "variants_failed": missing,
            "seconds": round(time.monotonic() - started, 1),
        }
    )
    _write_outputs(run_dir, results, output, section, study.title)
    return clean(section)


def _write_outputs(
    run_dir: Path, results: dict, output: StudyOutput, section: dict, title: str
) -> None:
    from fedmsk.run_dir import RunDirectory

    results = dict(results)
    results["study"] = clean(section)
    if output.readers is not None:
        results["readers"] = clean(output.readers)
    if output.comparisons:
        results["comparisons"] = clean(output.comparisons)
    RunDirectory(run_dir).write_json("results.json", results)
    (run_dir / "study_table.md").write_text(f"# {title}\n\n{output.table}\n", encoding="utf-8")


def write_study_comparison(out: Path | str, runs: dict[str, Path]) -> Path:
    """``fedmsk compare study=NAME``: the headline rows of each method's study, one table.

    ``runs`` maps a method name (pooled, fedavg, ...) to its run directory; runs without a
    ``study`` section are left out. Writes ``OUT/study_table.md`` and returns its path.
    """
    out = Path(out)
    rows: list[list[str]] = []
    header: list[str] = []
    title = "Study"
    for method, path in runs.items():
        try:
            section = read_results(Path(path)).get("study")
        except (StudyError, json.JSONDecodeError):
            continue
        if not isinstance(section, dict):
            continue
        title = str(section.get("title", title))
        headline = section.get("headline") or {}
        if not header:
            header = ["method", *headline.keys()]
        rows.append([method, *[str(headline.get(k, "n/a")) for k in header[1:]]])
    out.mkdir(parents=True, exist_ok=True)
    path = out / "study_table.md"
    body = md_table(header, rows) if rows else "No run of this comparison has a study section."
    path.write_text(f"# {title}: methods compared\n\n{body}\n", encoding="utf-8")
    return path
