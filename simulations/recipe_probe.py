"""Learning trajectories of a training recipe, in one process, without Flower.

How the project's training defaults were chosen (docs/benchmarks.md, "How the defaults were
chosen"): pooled training and an in-process federation (FedAvg / FedAvgM over the same sites,
the same ``fedmsk.training.fit`` the ClientApp runs, node-kept optimizer state, BatchNorm
statistics averaged or measured at the global weights, FedBN, GroupNorm) on a synthetic
federation, printing the validation and held-out AUC after every epoch or round. It is a
research tool: the numbers that the project reports come from ``benchmark.py`` section 5,
which runs the real Flower apps.

    .venv/bin/python simulations/recipe_probe.py data/probe/s1 --mode pooled --epochs 10
    .venv/bin/python simulations/recipe_probe.py data/probe/s1 --mode fedavgm --rounds 20 \
        --norm global train.local_steps=10

Extra arguments are Hydra overrides of the experiment config. One JSON line starting with
``RESULT`` ends the output.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import ConcatDataset, DataLoader  # noqa: E402

from fedmsk.config import ExperimentConfig, compose  # noqa: E402
from fedmsk.data.dataset import SiteLoaders, build_site_loaders  # noqa: E402
from fedmsk.data.federation import load_federation  # noqa: E402
from fedmsk.metrics import auc_delong  # noqa: E402
from fedmsk.models import get_arrays, local_parameter_names, model_from_config, set_arrays  # noqa: E402
from fedmsk.norm_stats import (  # noqa: E402
    apply_to_arrays,
    combine,
    image_batches,
    measure_moments,
    refresh_statistics,
)
from fedmsk.site_runtime import derive_seed  # noqa: E402
from fedmsk.threads import training_threads  # noqa: E402
from fedmsk.training import (  # noqa: E402
    RunSchedule,
    evaluate,
    fit,
    planned_steps,
    seed_everything,
    training_precision,  # noqa: E402
)

MODES = ("pooled", "fedavg", "fedavgm", "fedadam", "fedbn", "cyclic")
NORMS = ("average", "global")


def positive_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    return float(auc_delong(labels, probs[:, 1]).auc)


class Federation:
    """Every site's loaders, built once; evaluation sets concatenated."""

    def __init__(self, cfg: ExperimentConfig, root: Path) -> None:
        info = load_federation(root)
        self.cfg = cfg
        self.heldout = sorted(s.alias for s in info.heldout_sites)
        self.loaders: dict[str, SiteLoaders] = {}
        for site in info.sites:
            self.loaders[site.alias] = build_site_loaders(
                root / site.dir, cfg.task, cfg.data, cfg.train, seed=cfg.seed
            )
        self.training = [a for a in sorted(self.loaders) if a not in self.heldout]
        val = [self.loaders[a].dataset("val") for a in self.training]
        self.val = DataLoader(ConcatDataset([v for v in val if v is not None]), batch_size=64)
        held = []
        for alias in self.heldout:
            held += [self.loaders[alias].dataset(s) for s in ("train", "val", "test")]
        held_sets = [h for h in held if h is not None and len(h)]
        for dataset in held_sets:
            dataset.transform = None
        self.held = DataLoader(ConcatDataset(held_sets), batch_size=64)

    def counts(self, alias: str) -> list[int]:
        dataset = self.loaders[alias].dataset("train")
        return dataset.class_counts(self.cfg.task.num_classes)

    def stats_loader(self, alias: str) -> DataLoader:
        """The site's training images without augmentation, for BatchNorm statistics."""
        plain = self.loaders[alias].dataset("train").unaugmented()
        return DataLoader(plain, batch_size=64, shuffle=False)


def new_model(cfg: ExperimentConfig) -> torch.nn.Module:
    seed_everything(cfg.seed)
    return model_from_config(cfg)


def score(model: torch.nn.Module, fed: Federation, cfg: ExperimentConfig) -> tuple[float, float]:
    precision = training_precision(model, cfg.train, torch.device("cpu"))
    val = evaluate(model, fed.val, precision=precision)
    held = evaluate(model, fed.held, precision=precision)
    return positive_auc(val.labels, val.probs), positive_auc(held.labels, held.probs)


def score_site_statistics(
    model: torch.nn.Module, fed: Federation, cfg: ExperimentConfig, limit: int
) -> tuple[float, float]:
    """Each site scored with BatchNorm statistics of its own images (training sites: their
    training split; the held-out center: the images it scores)."""
    import copy

    precision = training_precision(model, cfg.train, torch.device("cpu"))
    labels, probs = [], []
    for alias in fed.training:
        val = fed.loaders[alias].val
        if val is None:
            continue
        local = copy.deepcopy(model)
        refresh_statistics(local, [fed.stats_loader(alias)], limit)
        result = evaluate(local, val, precision=precision)
        labels.append(result.labels)
        probs.append(result.probs)
    local = copy.deepcopy(model)
    refresh_statistics(local, [fed.held], limit)
    held = evaluate(local, fed.held, precision=precision)
    val_auc = positive_auc(np.concatenate(labels), np.concatenate(probs))
    return val_auc, positive_auc(held.labels, held.probs)


def run_pooled(cfg: ExperimentConfig, fed: Federation, epochs: int) -> list[dict[str, Any]]:
    model = new_model(cfg)
    sets = [fed.loaders[a].dataset("train") for a in fed.training]
    counts = np.sum([fed.counts(a) for a in fed.training], axis=0).tolist()
    generator = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(
        ConcatDataset(sets),
        batch_size=cfg.train.batch_size,
        shuffle=True,
        drop_last=True,
        generator=generator,
    )
    train = replace(cfg.train, local_steps=None, local_epochs=1)
    per_epoch = planned_steps(loader, train)
    state = None
    rows = []
    started = time.monotonic()
    for epoch in range(1, epochs + 1):
        schedule = RunSchedule((epoch - 1) * per_epoch, epochs * per_epoch)
        result = fit(
            model,
            loader,
            train,
            cfg.task.num_classes,
            class_counts=counts,
            schedule=schedule,
            optimizer_state=state,
        )
        state = result.optimizer_state
        val, held = score(model, fed, cfg)
        rows.append(row(epoch, epoch * per_epoch, result.mean_loss, val, held, started))
    return rows


def row(index: int, steps: int, loss: float, val: float, held: float, started: float) -> dict:
    line = {
        "round": index,
        "steps": steps,
        "loss": round(loss, 4),
        "val_auc": round(val, 4),
        "heldout_auc": round(held, 4),
        "seconds": round(time.monotonic() - started, 1),
    }
    print(json.dumps(line), flush=True)
    return line


class ServerAdam:
    """FedAdam's server step (Reddi et al.), with bias correction by round as Flower does."""

    def __init__(self, eta: float, beta_1: float, beta_2: float, tau: float) -> None:
        self.eta, self.beta_1, self.beta_2, self.tau = eta, beta_1, beta_2, tau
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def step(self, key: str, current: np.ndarray, average: np.ndarray, rnd: int) -> np.ndarray:
        delta = average - current
        self.m[key] = self.beta_1 * self.m.get(key, 0.0) + (1 - self.beta_1) * delta
        self.v[key] = self.beta_2 * self.v.get(key, 0.0) + (1 - self.beta_2) * delta * delta
        eta = self.eta * np.sqrt(1 - self.beta_2**rnd) / (1 - self.beta_1**rnd)
        return current + eta * self.m[key] / (np.sqrt(self.v[key]) + self.tau)


def run_federated(
    cfg: ExperimentConfig,
    fed: Federation,
    rounds: int,
    mode: str,
    norm: str,
    server_lr: float,
    server_momentum: float,
    stats_images: int,
    keep_state: bool,
    cycle_average: bool = False,
    averaged_tail: int = 0,
    site_statistics: bool = False,
) -> list[dict[str, Any]]:
    model = new_model(cfg)
    global_arrays = get_arrays(model)
    local_names = local_parameter_names(model) if mode == "fedbn" else set()
    site_local: dict[str, dict[str, np.ndarray]] = {}
    opt_state: dict[str, Any] = {}
    momentum: dict[str, np.ndarray] = {}
    steps_of = {a: planned_steps(fed.loaders[a].train, cfg.train) for a in fed.training}
    adam = ServerAdam(cfg.strategy.eta, cfg.strategy.beta_1, cfg.strategy.beta_2, cfg.strategy.tau)
    rows = []
    started = time.monotonic()
    for rnd in range(1, rounds + 1):
        updates, weights, losses = [], [], []
        order = list(fed.training)
        sequential = mode == "cyclic" and rnd <= rounds - averaged_tail
        if sequential:
            np.random.default_rng((cfg.seed, rnd)).shuffle(order)
        for alias in order:
            if sequential and updates:
                global_arrays = updates[-1]  # the model travels on to the next site
            arrays = dict(global_arrays) | site_local.get(alias, {})
            set_arrays(model, arrays)
            seed_everything(derive_seed(cfg.seed, "train", rnd, alias))
            result = fit(
                model,
                fed.loaders[alias].train,
                cfg.train,
                cfg.task.num_classes,
                class_counts=fed.counts(alias),
                schedule=RunSchedule((rnd - 1) * steps_of[alias], rounds * steps_of[alias]),
                optimizer_state=opt_state.get(alias) if keep_state else None,
            )
            opt_state[alias] = result.optimizer_state
            trained = get_arrays(model)
            if local_names:
                site_local[alias] = {k: trained[k] for k in local_names}
            updates.append(trained)
            weights.append(result.num_examples)
            losses.append(result.mean_loss)
        w = np.asarray(weights, dtype=np.float64) / sum(weights)
        if sequential and cycle_average:
            average = {k: sum(u[k] for u in updates) / len(updates) for k in updates[0]}
        elif sequential:
            average = dict(updates[-1])
        else:
            average = {
                k: sum(wi * u[k] for wi, u in zip(w, updates, strict=True)) for k in updates[0]
            }
        new_global = {}
        for key, value in average.items():
            statistic = key.endswith(("running_mean", "running_var"))
            if mode == "fedavgm" and not statistic:
                delta = global_arrays[key] - value
                momentum[key] = server_momentum * momentum.get(key, 0.0) + delta
                value = global_arrays[key] - server_lr * momentum[key]
            elif mode == "fedadam" and not statistic:
                value = adam.step(key, global_arrays[key], value, rnd)
            new_global[key] = value.astype(global_arrays[key].dtype)
        if norm == "global":
            set_arrays(model, new_global)
            per_site = [
                measure_moments(model, image_batches(fed.stats_loader(a), stats_images))
                for a in fed.training
            ]
            apply_to_arrays(new_global, combine(per_site))
        global_arrays = new_global
        set_arrays(model, global_arrays)
        val, held = score(model, fed, cfg)
        if site_statistics:
            site_val, site_held = score_site_statistics(model, fed, cfg, stats_images)
            print(f"# site statistics: val {site_val:.4f} held-out {site_held:.4f}", flush=True)
        if sequential and cycle_average:
            global_arrays = updates[-1]  # the trajectory goes on; the average is evaluated
        loss = float(np.average(losses, weights=w))
        rows.append(row(rnd, rnd * max(steps_of.values()), loss, val, held, started))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="a synthetic federation (fedmsk data synth)")
    parser.add_argument("--mode", choices=MODES, default="pooled")
    parser.add_argument("--epochs", type=int, default=10, help="pooled epochs")
    parser.add_argument("--rounds", type=int, default=20, help="federated rounds")
    parser.add_argument("--norm", choices=NORMS, default="global")
    parser.add_argument("--server-lr", type=float, default=1.0)
    parser.add_argument("--server-momentum", type=float, default=0.9)
    parser.add_argument("--stats-images", type=int, default=256)
    parser.add_argument("--fresh-optimizer", action="store_true")
    parser.add_argument(
        "--cycle-average",
        action="store_true",
        help="cyclic: evaluate the mean of the models after each visit of the round",
    )
    parser.add_argument(
        "--averaged-tail", type=int, default=0, help="cyclic: the last N rounds as FedAvg"
    )
    parser.add_argument(
        "--site-statistics",
        action="store_true",
        help="also score each site with BatchNorm statistics of its own images",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides")
    args = parser.parse_intermixed_args(argv)
    cfg = compose([f"data.root={args.root}", *args.overrides])
    torch.set_num_threads(training_threads(cfg.train.num_threads))
    fed = Federation(cfg, Path(args.root))
    if args.mode == "pooled":
        rows = run_pooled(cfg, fed, args.epochs)
    else:
        rows = run_federated(
            cfg,
            fed,
            args.rounds,
            args.mode,
            args.norm,
            args.server_lr,
            args.server_momentum if args.mode == "fedavgm" else 0.0,
            args.stats_images,
            not args.fresh_optimizer,
            args.cycle_average,
            args.averaged_tail,
            args.site_statistics,
        )
    summary = {"args": vars(args), "rows": rows}
    print("RESULT " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
