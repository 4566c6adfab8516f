"""Training a study's variant runs the way the main run was trained.

A variant (a per-view model, another architecture, a statically augmented training set) must be
trained exactly like the run it is compared with: federated in Flower's simulation engine after
a federated run, pooled after a pooled run, at the same site after a local-only run. A
federation with a single training site is trained in this process: FedAvg over one client is
that client's own training, so the result is the same algorithm without the Flower start-up.

Variant configurations are the main run's resolved configuration plus the variant's settings;
for Flower that configuration travels as a complete list of ``key=value`` overrides (the apps
compose it again), with ``study`` left unset so a variant never starts a study of its own.
Variant runs live in ``RUN_DIR/variants/<name>/`` and are reused when their config hash matches.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from fedmsk.config import (
    ExperimentConfig,
    compose,
    config_hash,
    dedupe_overrides,
    from_omegaconf,
    to_dict,
)
from fedmsk.studies.base import RunHandle, StudyError, Variant, read_results

VARIANTS_DIR = "variants"


def _quote(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(_quote(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


_BARE_MODEL_GROUP = "resnet18"  # configs/model/resnet18.yaml sets no timm_kwargs
_FREE_FORM_DICTS = {"model.timm_kwargs"}


def config_overrides(cfg: ExperimentConfig) -> list[str]:
    """Every setting of ``cfg`` as a Hydra override (``study`` left out: it names a group)."""
    out: list[str] = []

    def walk(prefix: str, node: Any, free_form: bool = False) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                path = f"{prefix}.{key}" if prefix else str(key)
                walk(path, value, free_form or path in _FREE_FORM_DICTS)
        else:
            # keys of a free-form dict are not in the schema: Hydra wants them added (++)
            out.append(f"{'++' if free_form else ''}{prefix}={_quote(node)}")

    content = to_dict(cfg)
    content.pop("study", None)
    # Hydra merges a dict override into the group's dict instead of replacing it, so the
    # recomposed config starts from a model group without timm_kwargs; every model field is
    # then set explicitly below, and the kwargs end up exactly those of ``cfg``.
    out.append(f"model={_BARE_MODEL_GROUP}")
    walk("", content)
    return out


def apply_overrides(cfg: ExperimentConfig, extra: list[str]) -> ExperimentConfig:
    """``cfg`` with dotted ``key=value`` settings applied, validated by the schema."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cfg), OmegaConf.from_dotlist(extra))
    except Exception as exc:  # noqa: BLE001 - omegaconf raises several types; name the input
        raise StudyError(f"variant settings {extra}: {exc}") from exc
    return from_omegaconf(merged)


def _site_of_local_run(run: RunHandle, training_sites: list[str]) -> str:
    strategy = str((run.results.get("run") or {}).get("strategy", ""))
    if strategy.startswith("local:"):
        return strategy.split(":", 1)[1]
    return training_sites[0]


def variant_dir(main: RunHandle, name: str) -> Path:
    return main.path / VARIANTS_DIR / name


def train_variant(main: RunHandle, variant: Variant, training_sites: list[str]) -> RunHandle:
    """Train (or reuse) one variant run in the main run's mode; returns its handle."""
    from fedmsk.centralized import run_centralized

    out = variant_dir(main, variant.name)
    extra = list(variant.overrides)
    if variant.prepare is not None:
        extra += list(variant.prepare(main.cfg))
    extra += [f"run_dir={out}"]
    cfg = dataclasses.replace(apply_overrides(main.cfg, extra), study=None)
    if _finished(out, cfg):
        return _handle(variant.name, cfg, out)
    mode = main.mode
    if mode == "pooled":
        run_centralized(cfg, "pooled", progress=sys.stdout)
    elif mode == "local":
        run_centralized(cfg, "local", _site_of_local_run(main, training_sites), progress=sys.stdout)
    elif len(training_sites) == 1:
        run_centralized(cfg, "local", training_sites[0], progress=sys.stdout)
    else:
        _run_federated(main.cfg, extra)
    if not (out / "results.json").is_file():
        raise StudyError(f"{out}: the variant run {variant.name!r} wrote no results.json")
    return _handle(variant.name, cfg, out)


def _run_federated(main_cfg: ExperimentConfig, extra: list[str]) -> None:
    from fedmsk.simulation import SimulationPlan, run_simulation

    overrides = dedupe_overrides([*config_overrides(main_cfg), *extra])
    cfg = compose(overrides)
    run_dir = Path(cfg.run_dir)
    print(f"study variant: federated run -> {run_dir}", flush=True)
    plan = SimulationPlan(cfg, overrides, len(cfg.federation.sites), run_dir / "flower.log")
    run_simulation(plan, progress=sys.stdout)


def _finished(out: Path, cfg: ExperimentConfig) -> bool:
    hash_file = out / "config_hash.txt"
    return (
        (out / "results.json").is_file()
        and (out / "final_model.npz").is_file()
        and hash_file.is_file()
        and hash_file.read_text().strip() == config_hash(cfg)
    )


def _handle(name: str, cfg: ExperimentConfig, out: Path) -> RunHandle:
    return RunHandle(name, cfg, out, read_results(out))
