"""The two baselines every federated result is read against, on the same splits.

``pooled``: all training centers' images trained together (the centralized upper bound a
federation tries to reach). ``local``: one center alone (the lower bound a hospital would get
without the federation). Both train for the same number of passes over the data as the
federation (rounds x local epochs) and are evaluated exactly as the federation is: validation
split of every training center, every image of each held-out center, threshold locked on the
pooled validation scores. The run directory has the federated run's layout.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from torch.utils.data import ConcatDataset, DataLoader

from fedmsk.config import (
    ExperimentConfig,
    config_hash,
    describe_augmentation,
    describe_input,
    describe_recipe,
    sites_per_round,
)
from fedmsk.data.federation import Federation, load_federation
from fedmsk.models import model_label
from fedmsk.progress import ProgressPrinter
from fedmsk.run_dir import RunDirectory
from fedmsk.site_runtime import all_images_loader, derive_seed, node_logger


def _loaders(cfg: ExperimentConfig, federation: Federation, seed: int) -> dict[str, Any]:
    from fedmsk.data.dataset import build_site_loaders

    loaders = {}
    for site in federation.sites:
        site_dir = federation.root / site.dir
        node_logger(site_dir, site.alias)  # file names of left-out images go to the site's log
        loaders[site.alias] = build_site_loaders(site_dir, cfg.task, cfg.data, cfg.train, seed=seed)
    return loaders


def centralized_epochs(
    cfg: ExperimentConfig, site_sizes: list[int], num_sites: int, federation_sites: int = 0
) -> int:
    """Epochs of a pooled or local-only baseline.

    ``train.centralized_epochs`` when set; otherwise the federation's budget in images seen:
    ``rounds x local_epochs`` passes, or with ``train.local_steps`` the images the training
    sites process in all rounds (sites x steps x batch per round) over the pooled data set.
    A federation whose rounds sample sites (``strategy.fraction_train`` < 1) counts the share
    of its ``federation_sites`` training sites a round asks (default: ``num_sites``).
    """
    if cfg.train.centralized_epochs is not None:
        return max(1, int(cfg.train.centralized_epochs))
    rounds = cfg.federation.num_rounds
    if cfg.train.local_steps is None:
        return max(1, rounds * max(1, cfg.train.local_epochs))
    per_round = (
        sum(cfg.train.local_steps * min(cfg.train.batch_size, n) for n in site_sizes if n)
        or num_sites * cfg.train.local_steps * cfg.train.batch_size
    )
    federation = max(1, federation_sites or num_sites)
    asked = sites_per_round(cfg, federation) / federation
    return max(1, round(rounds * per_round * asked / max(1, sum(site_sizes))))


def precise_statistics(
    cfg: ExperimentConfig, model: Any, loaders: dict[str, Any], trained_on: list[str]
) -> None:
    """BatchNorm statistics measured at the final weights over the training sites' images,
    capped per site as in a federation (strategy.norm_statistics_images)."""
    from fedmsk.norm_stats import refresh_statistics
    from fedmsk.site_runtime import plain_loader

    if cfg.strategy.norm_statistics != "global":
        return
    plain = [plain_loader(loaders[a], "train", cfg) for a in trained_on]
    limit = cfg.strategy.norm_statistics_images or None
    refresh_statistics(model, [p for p in plain if p is not None], limit)


def _log_heldout(
    cfg: ExperimentConfig,
    run_dir: RunDirectory,
    model: Any,
    loaders: dict[str, Any],
    heldout: set[str],
    trained_on: list[str],
    epoch: int,
    per_epoch: int,
) -> None:
    """Held-out AUC after an epoch, for learning curves (evaluation.heldout_each_round): the
    model is copied, so measuring statistics for it does not touch the one being trained."""
    import copy

    from fedmsk.evaluation import summarize
    from fedmsk.training import evaluate

    probe = copy.deepcopy(model)
    precise_statistics(cfg, probe, loaders, trained_on)
    for alias in sorted(heldout & set(loaders)):
        loader = all_images_loader(loaders[alias], cfg)
        if loader is None:
            continue
        result = evaluate(probe, loader)
        summary = summarize(result.labels, result.probs, list(cfg.task.classes), seed=cfg.seed)
        run_dir.append_metrics(
            {
                "round": epoch,
                "phase": "heldout",
                "site": alias,
                "n": int(result.num_examples),
                "auc": summary.get("auc"),
                "steps": epoch * per_epoch,
            }
        )


def run_centralized(
    cfg: ExperimentConfig, mode: str, site: str | None = None, progress: TextIO | None = None
) -> Path:
    """Train pooled or local-only and write results.json in the run directory.

    With ``progress`` (a stream such as ``sys.stdout``) a line per epoch is printed there.
    """
    from fedmsk.evaluation import locked_threshold, score_histogram, summarize
    from fedmsk.models import model_from_config
    from fedmsk.training import (
        RunSchedule,
        evaluate,
        fit,
        planned_steps,
        seed_everything,
    )

    if mode not in ("pooled", "local"):
        raise ValueError(f"--mode {mode!r}: choose pooled or local")
    started = time.monotonic()
    federation = load_federation(Path(cfg.data.root))
    heldout = set(cfg.federation.heldout_sites) or {s.alias for s in federation.heldout_sites}
    training_sites = [s.alias for s in federation.sites if s.alias not in heldout]
    if mode == "local":
        if site not in training_sites:
            raise ValueError(f"--site {site!r}: choose one of {', '.join(training_sites)}")
        trained_on = [site]
    else:
        trained_on = training_sites
    run_dir = RunDirectory(cfg.run_dir)
    run_dir.initialise(cfg)
    run_dir.truncate_metrics_after(0)
    seed_everything(cfg.seed)
    loaders = _loaders(cfg, federation, seed=derive_seed(cfg.seed, "loader", mode))
    train_sets = [loaders[a].dataset("train") for a in trained_on if loaders[a].train is not None]
    if not train_sets:
        raise ValueError(f"{cfg.data.root}: no training images at {', '.join(trained_on)}")
    pooled = ConcatDataset(train_sets)
    counts = [0] * cfg.task.num_classes
    for dataset in train_sets:
        for i, c in enumerate(dataset.class_counts(cfg.task.num_classes)):
            counts[i] += c
    import torch

    from fedmsk.data.augment import worker_init_fn
    from fedmsk.data.dataset import training_loader_settings

    generator = torch.Generator().manual_seed(cfg.seed)
    settings = training_loader_settings(cfg.data, cfg.train)
    train_loader = DataLoader(
        pooled,
        batch_size=cfg.train.batch_size,
        shuffle=True,
        generator=generator,
        drop_last=len(pooled) > cfg.train.batch_size,
        worker_init_fn=worker_init_fn if settings.num_workers > 0 else None,
        **settings.loader_kwargs(),
    )
    model = model_from_config(cfg)
    sizes = [len(d) for d in train_sets]
    epochs = centralized_epochs(cfg, sizes, len(trained_on), len(training_sites))
    train_cfg = replace(cfg.train, local_steps=None, local_epochs=1)
    per_epoch = planned_steps(train_loader, train_cfg)
    state = None
    trained_in: str | None = None  # the precision fit() resolved on this machine
    printer = ProgressPrinter(total=epochs, unit="epoch", stream=progress) if progress else None
    for epoch in range(1, epochs + 1):
        result = fit(
            model,
            train_loader,
            train_cfg,
            cfg.task.num_classes,
            class_counts=counts,
            schedule=RunSchedule((epoch - 1) * per_epoch, epochs * per_epoch),
            optimizer_state=state,
        )
        state = result.optimizer_state
        trained_in = result.precision
        row = {
            "round": epoch,
            "phase": "train",
            "site": None,
            "train-loss": result.mean_loss,
            "steps": epoch * per_epoch,
        }
        run_dir.append_metrics(row)
        if printer:
            printer.feed([row])
        if cfg.evaluation.heldout_each_round and epoch < epochs:
            _log_heldout(cfg, run_dir, model, loaders, heldout, trained_on, epoch, per_epoch)
    precise_statistics(cfg, model, loaders, trained_on)
    evaluations = {}
    for alias in sorted(loaders):
        loader = all_images_loader(loaders[alias], cfg) if alias in heldout else loaders[alias].val
        if loader is not None:
            # fp32 whatever the training precision, as a federated node scores (SiteRuntime)
            evaluations[alias] = evaluate(model, loader, precision=None)
    histograms = [
        score_histogram(e.labels, e.probs) for a, e in evaluations.items() if a not in heldout
    ]
    threshold, source = float(cfg.evaluation.fixed_threshold), "fixed"
    if cfg.task.is_binary and cfg.evaluation.threshold == "youden":
        threshold, source = locked_threshold(histograms, cfg.evaluation.fixed_threshold)
        source = source.replace("federated", "pooled")
    sites = {}
    for alias, result in evaluations.items():
        summary = summarize(
            result.labels,
            result.probs,
            list(cfg.task.classes),
            threshold=threshold,
            bootstrap=cfg.evaluation.bootstrap,
            seed=cfg.seed,
        )
        role = "heldout" if alias in heldout else "train"
        sites[alias] = {
            "role": role,
            "split": "test" if role == "heldout" else "val",
            "n": int(result.num_examples),
            "summary": summary,
        }
        run_dir.append_metrics(
            {
                "round": epochs,
                "phase": "final-heldout" if role == "heldout" else "final-val",
                "site": alias,
                "n": int(result.num_examples),
                "auc": summary.get("auc"),
            }
        )
    from fedmsk.models import get_arrays

    np.savez(run_dir.path / "final_model.npz", **get_arrays(model))
    run_dir.write_json(
        "results.json",
        {
            "run": {
                "mode": mode,
                "strategy": mode if mode == "pooled" else f"local:{site}",
                "model": model_label(cfg.model),
                "task": cfg.task.name,
                "classes": list(cfg.task.classes),
                "rounds": epochs,
                "recipe": describe_recipe(cfg),
                "augmentation": describe_augmentation(cfg),
                "input": describe_input(cfg),
                "precision": trained_in,
                "config_hash": config_hash(cfg),
                "training_sites": trained_on,
                "heldout_sites": sorted(heldout),
                "seconds": round(time.monotonic() - started, 1),
            },
            "threshold": {"value": float(threshold), "source": source},
            "sites": sites,
            "failures": [],
        },
    )
    return run_dir.path
