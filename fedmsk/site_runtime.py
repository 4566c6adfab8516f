"""What one hospital node does in a round, with no Flower in sight.

``client/`` turns Flower messages into calls of :class:`SiteRuntime` and its results back into
messages. Everything here runs on the node that owns the images: per-image scores, patient IDs
and file paths are used here and never returned. :class:`TrainOutcome` and
:class:`EvaluationOutcome` carry only what may leave the node.

Node-local state (the privacy accountant, the optimizer's moments, FedBN's local normalisation
layers, a log that names unreadable files for the site's own IT) lives under ``SITE_DIR/.fedmsk/``
and survives restarts; per-round state is kept one file per round (:mod:`fedmsk.node_state`) so a
resumed run continues exactly.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedmsk.config import ExperimentConfig, config_hash
from fedmsk.data.dataset import DatasetPool
from fedmsk.node_state import RoundFiles, prune_other_runs, save_tensors

STATE_DIR_NAME = ".fedmsk"
# Under DP-SGD a training reply carries only numbers the accountant covers or that follow from
# public settings: epsilon (from the noise, sample rate and step count) and the step count (a
# Poisson loader takes a fixed number of steps). The training loss, timings and images/s depend
# on the training images or on which of them were sampled, so they stay in the site's own log.
# docs/hospital-it.md, section 7, lists what leaves a node in each privacy mode.
DP_RELEASED_TRAIN_METRICS = ("epsilon", "train-steps")
# Runs whose optimizer moments a node keeps (the one training now and the latest others it
# trained); older runs' moments are removed (fedmsk.node_state.prune_other_runs).
KEPT_OPTIMIZER_RUNS = 4


def patient_level_privacy(cfg: ExperimentConfig) -> bool:
    """Whether DP-SGD protects patients (one training image each) rather than images."""
    if not cfg.privacy.enabled:
        return False
    unit = str(cfg.privacy.unit).strip().lower()
    if unit not in ("image", "patient"):
        raise ValueError(f"privacy.unit={cfg.privacy.unit!r} is not one of image, patient")
    return unit == "patient"


def run_key(cfg: ExperimentConfig) -> str:
    """Names a run's node-local state: the same experiment written to the same run dir."""
    blob = f"{config_hash(cfg)}|{Path(cfg.run_dir).name}".encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def derive_seed(base: int, *parts: object) -> int:
    """A reproducible seed per (run, round, site) so a resumed run repeats the same draws."""
    text = "|".join([str(base), *map(str, parts)]).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:4], "little")


@dataclass
class TrainOutcome:
    arrays: dict[str, np.ndarray]
    num_examples: int
    metrics: dict[str, float]


@dataclass
class EvaluationOutcome:
    num_examples: int
    summary: dict[str, Any]
    histogram: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    trained_in: str | None = None  # the precision this node trains in (None: held-out)


class SiteUnavailableError(RuntimeError):
    """The site cannot take part (no usable images, budget spent); message is PHI-free."""


def node_logger(site_dir: Path, alias: str) -> logging.Logger:
    """A logger that writes to the site's own log file, which never leaves the node."""
    logger = logging.getLogger(f"fedmsk.node.{alias}")
    log_dir = Path(site_dir) / STATE_DIR_NAME / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    target = str((log_dir / "node.log").resolve())
    if not any(getattr(h, "baseFilename", None) == target for h in logger.handlers):
        handler = logging.FileHandler(target, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    _route_data_logs(logger)
    return logger


def _route_data_logs(node_log: logging.Logger) -> None:
    """The data layer names files in its warnings: keep those in the site's own log only."""
    data_logger = logging.getLogger("fedmsk.data")
    data_logger.handlers = list(node_log.handlers)
    data_logger.propagate = False


class ModelPool:
    """Keeps one model per architecture in a node process, reused from message to message.

    A node answers many messages in one process (a SuperNode's ClientApp, a simulation actor),
    and building a timm model costs a noticeable share of a small site's round. Reuse is exact
    because :meth:`SiteRuntime.load_global` overwrites every exchanged array before the model is
    used, and optimizers are built per ``fit`` (their moments come from the node's files, or
    from the copy this pool holds of what the same site wrote in its previous round).
    Under DP too: Opacus wraps the model for a round and the session unhooks it afterwards
    (``DPSession.after_fit``), so a model that still carries an Opacus hook or per-sample
    attribute (an unhooking that failed) is never handed out again; a new one is built.
    """

    def __init__(self) -> None:
        self._models: dict[tuple[Any, ...], Any] = {}
        self._optimizer: tuple[Path, int, dict] | None = None

    def keep_optimizer_state(self, state_dir: Path, server_round: int, state: dict) -> None:
        """Hold the state a site just wrote for ``server_round`` so that the next round of the
        same site in this process skips reading it back; one site's state at a time bounds
        the memory. The file stays the record a new process or a resumed run reads."""
        self._optimizer = (Path(state_dir), server_round, state)

    def take_optimizer_state(self, state_dir: Path, server_round: int) -> dict | None:
        """The held state when it is the one written for ``server_round`` by this site, else
        None. It is handed out once: the optimizer it restores updates its tensors in place,
        so a round that fails half-way must not leave them to the next."""
        held, self._optimizer = self._optimizer, None
        if held is None or held[0] != Path(state_dir) or held[1] != server_round:
            return None
        return held[2]

    def get(self, cfg: ExperimentConfig) -> Any:
        from fedmsk.models import create_model, model_arguments

        arguments = model_arguments(cfg)
        key = tuple(arguments.items())
        model = self._models.get(key)
        if model is None or (cfg.privacy.enabled and not free_of_opacus(model)):
            model = create_model(**arguments)
            self._models = {key: model}  # one architecture bounds the memory
        for param in model.parameters():
            param.grad = None  # nothing of the last message's step reaches this one
        return model


def free_of_opacus(model: Any) -> bool:
    """True when no hook and no per-sample gradient attribute is left on ``model``: what
    Opacus adds while it wraps a module and removes when the wrapper is cleaned up."""
    from opacus.grad_sample.gsm_base import OPACUS_PARAM_MONKEYPATCH_ATTRS

    for module in model.modules():
        hooks = (
            module._forward_hooks,
            module._forward_pre_hooks,
            module._backward_hooks,
            getattr(module, "_backward_pre_hooks", {}),
        )
        if any(hooks):
            return False
    return not any(
        hasattr(param, attr)
        for param in model.parameters()
        for attr in OPACUS_PARAM_MONKEYPATCH_ATTRS
    )


class SiteRuntime:
    """One site's data and model for one message (the model may come from a :class:`ModelPool`
    and the validated datasets from a :class:`fedmsk.data.dataset.DatasetPool`)."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        site_dir: Path,
        alias: str,
        heldout: bool,
        seed: int,
        model_pool: ModelPool | None = None,
        dataset_pool: DatasetPool | None = None,
    ) -> None:
        from fedmsk.data.dataset import build_site_loaders

        self.cfg = cfg
        self.site_dir = Path(site_dir)
        self.alias = alias
        self.heldout = heldout
        self.state_dir = self.site_dir / STATE_DIR_NAME / "runs" / run_key(cfg)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log = node_logger(self.site_dir, alias)
        self.loaders = build_site_loaders(
            self.site_dir,
            cfg.task,
            cfg.data,
            cfg.train,
            seed=seed,
            pool=dataset_pool,
            one_image_per_patient=patient_level_privacy(cfg),
        )
        if self.loaders.skipped:
            self.log.warning("%d unreadable image(s) left out", len(self.loaders.skipped))
        self.model_pool = model_pool or ModelPool()
        self.model = self.model_pool.get(cfg)

    # -- weights ---------------------------------------------------------------------------

    def _local_norm_files(self) -> RoundFiles:
        return RoundFiles(self.state_dir, "local_norm", ".npz")

    def _optimizer_files(self) -> RoundFiles:
        return RoundFiles(self.state_dir, "optimizer", ".pt")

    def load_global(self, arrays: dict[str, np.ndarray], server_round: int | None = None) -> None:
        """Load the global model; under FedBN the site's own normalisation layers win.

        ``server_round``: the round about to run, so FedBN reads the layers the site had after
        the round before it (None: the newest the site has, for evaluation).
        """
        from fedmsk.models import set_arrays

        merged = dict(arrays)
        if self.cfg.strategy.local_norm_layers:
            files = self._local_norm_files()
            newest = files.rounds()
            local_path = (
                files.latest_before(server_round)
                if server_round is not None
                else (files.path(newest[-1]) if newest else None)
            )
            if local_path is not None:
                with np.load(local_path) as local:
                    merged.update({k: local[k] for k in local.files})
        # strict=False: a key the message lacks keeps the model's value (no full copy of the
        # model to fill it in); unknown keys and wrong shapes are still errors
        set_arrays(self.model, merged, strict=False)

    def _save_local_norm(self, server_round: int) -> None:
        from fedmsk.models import get_arrays, local_parameter_names

        names = local_parameter_names(self.model)
        arrays = {k: v for k, v in get_arrays(self.model).items() if k in names}
        self._local_norm_files().write(server_round, lambda handle: np.savez(handle, **arrays))

    def _optimizer_state(self, server_round: int) -> dict | None:
        """The moments this site's optimizer had after its previous round (never sent)."""
        if not self.cfg.train.keep_optimizer_state:
            return None
        import torch

        files = self._optimizer_files()
        previous = files.latest_round_before(server_round)
        if previous is None:
            return None
        held = self.model_pool.take_optimizer_state(self.state_dir, previous)
        if held is not None:
            return held
        try:
            return torch.load(files.path(previous), map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - an unreadable state file means a fresh optimizer
            self.log.warning("optimizer state unreadable, starting a fresh optimizer")
            return None

    def _save_optimizer_state(self, server_round: int, state: dict | None) -> None:
        if state is None or not self.cfg.train.keep_optimizer_state:
            return
        files = self._optimizer_files()
        first_of_run = not files.rounds()
        files.write(server_round, lambda handle: save_tensors(state, handle))
        self.model_pool.keep_optimizer_state(self.state_dir, server_round, state)
        if not first_of_run:  # the set of runs only grows when one writes its first moments
            return
        freed = prune_other_runs(self.state_dir.parent, self.state_dir, files, KEPT_OPTIMIZER_RUNS)
        if freed:
            self.log.info(
                "removed the optimizer moments of runs older than the latest %d (%.0f MB): "
                "such a run, if resumed, starts this site's optimizer afresh",
                KEPT_OPTIMIZER_RUNS,
                freed / 1e6,
            )

    # -- train -----------------------------------------------------------------------------

    def run_schedule(self, server_round: int) -> Any:
        """This round's place in the run's learning-rate schedule (rounds x local steps)."""
        from fedmsk.training import RunSchedule, planned_steps

        steps = planned_steps(self.loaders.train, self.cfg.train)
        return RunSchedule((server_round - 1) * steps, self.cfg.federation.num_rounds * steps)

    def train(
        self,
        global_arrays: dict[str, np.ndarray],
        server_round: int,
        planned_rounds: int | None = None,
    ) -> TrainOutcome:
        """One round of local training. ``planned_rounds``: how many rounds of the run the
        coordinator's sample will ask this site (None: all); DP-SGD sizes its noise for them
        when this site first trains (fixed from then on, in the accountant's state)."""
        from fedmsk.models import get_arrays
        from fedmsk.training import fit, seed_everything

        if self.heldout:
            raise SiteUnavailableError("held-out site never trains")
        if self.loaders.train is None:
            raise SiteUnavailableError("no usable training images")
        self.load_global(global_arrays, server_round)
        seed_everything(derive_seed(self.cfg.seed, "train", server_round, self.alias))
        if self.cfg.privacy.enabled:
            self._refuse_static_copies()
        privacy = self._privacy_session(planned_rounds)
        if privacy is not None and not privacy.can_train():
            raise SiteUnavailableError("privacy budget spent")
        result = fit(
            self.model,
            self.loaders.train,
            self.cfg.train,
            self.cfg.task.num_classes,
            global_arrays=global_arrays if self.cfg.train.proximal_mu > 0 else None,
            privacy=privacy,
            class_counts=self._train_class_counts(),
            schedule=self.run_schedule(server_round),
            optimizer_state=self._optimizer_state(server_round),
        )
        self._save_optimizer_state(server_round, result.optimizer_state)
        if self.cfg.strategy.local_norm_layers:
            self._save_local_norm(server_round)
        metrics = {
            "train-loss": float(result.mean_loss),
            "train-steps": float(result.steps),
            "train-seconds": float(result.seconds),
            "images-per-second": float(result.images_per_second),
        }
        if result.epsilon is not None:
            metrics["epsilon"] = float(result.epsilon)
        if self.cfg.privacy.enabled:
            self.log.info("round %d (not released under DP): %s", server_round, metrics)
            metrics = {k: v for k, v in metrics.items() if k in DP_RELEASED_TRAIN_METRICS}
        return TrainOutcome(get_arrays(self.model), int(result.num_examples), metrics)

    def norm_statistics(self, global_arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per-channel moments of every BatchNorm layer at the global weights, over up to
        ``strategy.norm_statistics_images`` of this site's training images (unaugmented).
        Only these aggregates leave the node (:mod:`fedmsk.norm_stats`)."""
        from fedmsk.norm_stats import image_batches, measure_moments, to_arrays
        from fedmsk.training import resolve_device

        if self.heldout:
            raise SiteUnavailableError("held-out site never contributes statistics")
        if self.cfg.privacy.enabled:  # moments of the training images, outside the accountant
            raise SiteUnavailableError("BatchNorm statistics are not released under DP-SGD")
        loader = plain_loader(self.loaders, "train", self.cfg)
        if loader is None:
            raise SiteUnavailableError("no usable training images")
        self.load_global(global_arrays)
        self.model.to(resolve_device(self.cfg.train.device))
        limit = self.cfg.strategy.norm_statistics_images
        moments = measure_moments(self.model, image_batches(loader, limit or None))
        return to_arrays(moments)

    def train_count(self) -> int:
        """How many usable training images this site has (0 at a held-out site)."""
        return 0 if self.heldout else sum(self._train_class_counts())

    def _train_class_counts(self) -> list[int]:
        counts = self.loaders.counts.get("train", {})
        return [int(counts.get(name, 0)) for name in self.cfg.task.classes]

    def _privacy_state_path(self) -> Path:
        return self.state_dir / "privacy.json"

    def _privacy_session(self, planned_rounds: int | None = None, save: bool = True) -> Any:
        if not self.cfg.privacy.enabled:
            return None
        from fedmsk.privacy import DPSession
        from fedmsk.privacy.ledger import SiteLedger
        from fedmsk.training import planned_steps

        return DPSession.for_site(
            self.cfg.privacy,
            state_path=self._privacy_state_path(),
            num_examples=self.train_count(),
            batch_size=self.cfg.train.batch_size,
            steps_per_round=planned_steps(self.loaders.train, self.cfg.train),
            planned_rounds=planned_rounds or self.cfg.federation.num_rounds,
            ledger=SiteLedger(self.site_dir),  # the data set's lifetime budget, all runs
            save=save,
        )

    def _refuse_static_copies(self) -> None:
        from fedmsk.data.augment import STATIC_DIR, static_copies_under_dp

        dataset = self.loaders.dataset("train")
        items = [] if dataset is None else dataset.items
        copies = sum(1 for item in items if _under(item.path, self.site_dir / STATIC_DIR))
        if copies:
            raise SiteUnavailableError(static_copies_under_dp(f"{copies} in this training set"))

    def privacy_status(self) -> dict[str, float]:
        """The accountant's figures. Before this site first trains they come from a state
        kept in memory only: the first round's plan (how many rounds the coordinator will ask
        this site) fixes the noise, and an evaluation must not fix it first."""
        if self.heldout:
            return {}
        session = self._privacy_session(save=self._privacy_state_path().is_file())
        return {} if session is None else session.status()

    # -- evaluate --------------------------------------------------------------------------

    def evaluate(
        self, global_arrays: dict[str, np.ndarray], threshold: float | None
    ) -> EvaluationOutcome:
        """Validation split at training sites, all images at a held-out site.

        Scored in fp32 whatever the node trains in: a reported AUC must not depend on which
        CPU or GPU the hospital has. bf16 autocast rounds the logits to three significant
        digits, which ties scores and moved held-out AUCs by up to 0.007 against the same weights
        scored in fp32 (docs/benchmarks.md); fp32 is also what `fedmsk compare` and the study
        analyses re-score with.
        """
        from fedmsk.evaluation import score_histogram, summarize
        from fedmsk.training import evaluate, resolve_device, training_precision

        loader = all_images_loader(self.loaders, self.cfg) if self.heldout else self.loaders.val
        if loader is None:
            raise SiteUnavailableError("no usable evaluation images")
        self.load_global(global_arrays)
        device = resolve_device(self.cfg.train.device)
        result = evaluate(self.model, loader, device=device, precision=None)
        patient_ids = _patient_ids(loader)
        summary = summarize(
            result.labels,
            result.probs,
            list(self.cfg.task.classes),
            threshold=threshold,
            bootstrap=self.cfg.evaluation.bootstrap,
            seed=self.cfg.seed,
            patient_ids=patient_ids,
            patient_aggregation=self.cfg.evaluation.patient_aggregation,
        )
        histogram = score_histogram(result.labels, result.probs)
        metrics = {"eval-loss": float(result.loss)}
        for key in ("auc", "top1_accuracy", "macro_f1"):
            value = summary.get(key)
            if isinstance(value, int | float):
                metrics[key] = float(value)
        trained_in = None
        if not self.heldout:
            private = self.cfg.privacy.enabled
            trained_in = training_precision(self.model, self.cfg.train, device, private).name
        return EvaluationOutcome(int(result.num_examples), summary, histogram, metrics, trained_in)


def plain_loader(loaders: Any, split: str, cfg: ExperimentConfig) -> Any:
    """One split of a site in manifest order, unaugmented (None when empty)."""
    from torch.utils.data import DataLoader

    part = loaders.dataset(split)
    if part is None or not len(part):
        return None
    return DataLoader(
        part.unaugmented(),
        batch_size=max(cfg.train.batch_size, 64),
        shuffle=False,
    )


def all_images_loader(loaders: Any, cfg: ExperimentConfig) -> Any:
    """Every usable image of a site, unaugmented: a held-out center is all external test."""
    from torch.utils.data import DataLoader

    parts = [loaders.dataset(s) for s in ("train", "val", "test")]
    parts = [p for p in parts if p is not None and len(p)]
    if not parts:
        return None
    items = [item for part in parts for item in part.items]
    combined = parts[0].unaugmented(items)
    return DataLoader(combined, batch_size=cfg.train.batch_size, shuffle=False)


def _patient_ids(loader: Any) -> list[str] | None:
    dataset = getattr(loader, "dataset", None)
    getter = getattr(dataset, "patient_ids", None)
    return list(getter()) if callable(getter) else None


def _under(path: Path, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder.resolve())
