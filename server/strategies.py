"""Flower strategies chosen by config, with fedmsk's round bookkeeping mixed in.

The round loop is Flower's own ``Strategy.start``. :class:`FedMskMixin` overrides four hooks:
training goes only to training sites (never the held-out center), replies are screened
(shapes, finite values) and sorted by site before aggregation so the sum is reproducible, and
after every round the :class:`server.rounds.RoundRecorder` writes metrics and a checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)

from fedmsk.config import (
    ExperimentConfig,
    StrategyConfig,
    planned_visits,
    sampled_positions,
    sites_per_round,
)
from fedmsk.protocol import PLANNED_VISITS_KEY, ROUND_KEY
from server.round_evaluation import round_evaluation_messages
from server.rounds import RoundRecorder

log = logging.getLogger("fedmsk.server")

STRATEGY_STATE_ATTRIBUTES = ("current_arrays", "m_t", "v_t", "momentum_vector")

# BatchNorm's running statistics travel with the weights but are not trained by gradients.
NORM_STATISTICS_SUFFIXES = ("running_mean", "running_var")


def plain_average_of_statistics(arrays: ArrayRecord, replies: list[Message]) -> None:
    """Overwrite normalisation statistics in ``arrays`` with their example-weighted mean.

    Server optimisers (FedAvgM, FedAdam, FedYogi, FedAdagrad) treat every array as a weight and
    step it with momentum or adaptive scaling. For running statistics that step can overshoot:
    a variance pushed below zero turns every later evaluation into NaN. The clients' plain
    weighted mean is what those statistics estimate, so they take it instead.
    """
    keys = [k for k in arrays if k.endswith(NORM_STATISTICS_SUFFIXES)]
    if not keys or not replies:
        return
    weights = np.array(
        [float(r.content["metrics"]["num-examples"]) for r in replies], dtype=np.float64
    )
    weights = weights / weights.sum()
    for key in keys:
        stacked = [r.content["arrays"][key].numpy().astype(np.float64) for r in replies]
        mean = sum(w * a for w, a in zip(weights, stacked, strict=True))
        arrays[key] = Array(np.asarray(mean, dtype=arrays[key].numpy().dtype))


class TooFewSites(RuntimeError):
    """Fewer training sites stayed connected than a round needs, for longer than allowed."""


class NodeSubsetGrid:
    """A view of a Grid that offers only some node IDs to a strategy's sampler.

    Flower's sampler waits, without a bound, until ``min_available_nodes`` are connected. With
    ``needed`` and ``wait_s`` the wait is bounded: after ``wait_s`` seconds with fewer than
    ``needed`` of the listed nodes connected, :class:`TooFewSites` names the missing sites and
    the run stops (its last checkpoint stays resumable).
    """

    def __init__(
        self,
        grid: Grid,
        node_ids: list[int],
        needed: int | None = None,
        wait_s: float = 0.0,
        alias_of: Callable[[int], str] = str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._grid = grid
        self._node_ids = list(node_ids)
        self.needed = needed
        self._wait_s = wait_s
        self.alias_of = alias_of
        self._clock = clock
        self._short_since: float | None = None

    def get_node_ids(self) -> list[int]:
        online = set(self._grid.get_node_ids())
        connected = [n for n in self._node_ids if n in online]
        if self.needed is None or len(connected) >= self.needed:
            self._short_since = None
            return connected
        now = self._clock()
        if self._short_since is None:
            self._short_since = now
            log.warning(
                "waiting up to %.0f s for training sites: %d of %d connected, %d needed "
                "(missing: %s)",
                self._wait_s,
                len(connected),
                len(self._node_ids),
                self.needed,
                ", ".join(self.missing(connected)),
            )
        if now - self._short_since > self._wait_s:
            raise TooFewSites(
                f"only {len(connected)} of {len(self._node_ids)} training sites stayed "
                f"connected for {self._wait_s:.0f} s (federation.connect_timeout_s) and a round "
                f"needs {self.needed} (federation.min_reply_fraction); missing: "
                f"{', '.join(self.missing(connected))}. Resume with resume=RUN_DIR once they are "
                "back."
            )
        return connected

    def missing(self, connected: list[int]) -> list[str]:
        return sorted(self.alias_of(n) for n in self._node_ids if n not in connected)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class SampledGrid:
    """A view offering a strategy only the training sites one round samples.

    With ``strategy.fraction_train`` < 1 an averaging round asks a sample of the connected
    training sites. Flower's sampler draws it from Python's unseeded global ``random``; here it
    is drawn from the run's seed and the absolute round, so a rerun or a resumed run asks the
    same sites. While fewer sites than a round needs are connected, all connected ones are
    offered, and the wrapped view's bounded wait decides (:class:`NodeSubsetGrid`).
    """

    def __init__(self, view: NodeSubsetGrid, cfg: ExperimentConfig, absolute_round: int) -> None:
        self._view = view
        self._cfg = cfg
        self._round = absolute_round

    def get_node_ids(self) -> list[int]:
        connected = self._view.get_node_ids()
        needed = self._view.needed or 1
        if len(connected) < needed:
            return connected
        size = max(sites_per_round(self._cfg, len(connected)), needed)
        if size >= len(connected):
            return connected
        ordered = sorted(connected, key=self._view.alias_of)  # node IDs differ between runs
        picked = sampled_positions(len(ordered), size, self._cfg.seed, self._round)
        return [ordered[i] for i in picked]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._view, name)


class FedMskMixin:
    """Round bookkeeping shared by every strategy; the aggregation itself stays Flower's."""

    recorder: RoundRecorder

    def attach(self, recorder: RoundRecorder) -> None:
        self.recorder = recorder

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config[ROUND_KEY] = self.recorder.absolute_round(server_round)
        training = self.recorder.training_node_ids()
        if self.recorder.cfg.privacy.enabled:
            aliases = [self.recorder.alias_of(n) for n in training]
            if sites_per_round(self.recorder.cfg, len(aliases)) < len(aliases):
                # each site sizes its DP noise for the rounds it will be asked, not for all
                plan = planned_visits(self.recorder.cfg, aliases)
                config[PLANNED_VISITS_KEY] = json.dumps(plan, sort_keys=True)
        view = NodeSubsetGrid(
            grid,
            training,
            needed=self.recorder.replies_needed(),
            wait_s=self.recorder.cfg.federation.connect_timeout_s,
            alias_of=self.recorder.alias_of,
        )
        sampled = SampledGrid(view, self.recorder.cfg, config[ROUND_KEY])  # type: ignore[arg-type]
        messages = list(super().configure_train(server_round, arrays, config, sampled))  # type: ignore[misc]
        sent = [m.metadata.dst_node_id for m in messages]
        for node in training:
            if node not in sent and node not in view.get_node_ids():
                # a site that is offline this round: recorded, the round goes on without it
                self.recorder.record_failure(
                    server_round, self.recorder.alias_of(node), "train", "Unreachable"
                )
        self.recorder.expect("train", server_round, sent)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted = self.recorder.screen_train_replies(server_round, list(replies))
        if not self.recorder.enough_replies(accepted):
            self.recorder.record_skipped_round(server_round, len(accepted))
            arrays, metrics = None, None
        else:
            # the absolute round: FedAdam/FedYogi/FedAdagrad correct their bias by it, and a
            # resumed run's Flower loop counts from 1 again
            absolute = self.recorder.absolute_round(server_round)
            arrays, metrics = super().aggregate_train(absolute, accepted)  # type: ignore[misc]
            if arrays is not None and isinstance(self, SERVER_OPTIMISERS):
                # in place: FedAvgM keeps this same record as the next round's start
                plain_average_of_statistics(arrays, accepted)
        self.recorder.on_train_aggregated(server_round, arrays, metrics, self.export_state())
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """See :mod:`server.round_evaluation`. The statistics are written into ``arrays`` in
        place: the same record is the round's result, the next round's start (FedAvgM keeps
        it) and the checkpoint."""
        return round_evaluation_messages(grid, self.recorder, arrays, server_round)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.recorder.on_evaluate_replies(server_round, list(replies))

    def export_state(self) -> dict[str, Any]:
        return {
            name: getattr(self, name)
            for name in STRATEGY_STATE_ATTRIBUTES
            if getattr(self, name, None) is not None
        }

    def import_state(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            if name in STRATEGY_STATE_ATTRIBUTES:
                setattr(self, name, value)


SERVER_OPTIMISERS = (FedAvgM, FedAdam, FedYogi, FedAdagrad)


def _with_mixin(base: type[Strategy]) -> type[Strategy]:
    return type(f"FedMsk{base.__name__}", (FedMskMixin, base), {})


STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedbn": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedavgm": FedAvgM,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
}


def build_strategy(
    cfg: StrategyConfig, num_training_sites: int, num_sites: int, needed: int | None = None
) -> Any:
    """The configured Flower strategy. It trains every site it is offered: which sites a
    round asks (all, or a seeded sample with ``fraction_train`` < 1) is :class:`SampledGrid`'s.

    ``needed``: how many training sites a round needs (federation.min_reply_fraction); the
    sampler starts a round once that many are connected rather than waiting for all."""
    needed = num_training_sites if needed is None else max(1, min(needed, num_training_sites))
    if cfg.name not in STRATEGIES:
        known = ", ".join(sorted(STRATEGIES))
        raise ValueError(f"strategy.name={cfg.name!r} is not known; choose one of {known}")
    base = STRATEGIES[cfg.name]
    common: dict[str, Any] = {
        # the sites a round asks are sampled by :class:`SampledGrid`; Flower takes all it offers
        "fraction_train": 1.0,
        "fraction_evaluate": 1.0,
        "min_train_nodes": 1,
        "min_evaluate_nodes": num_sites,
        "min_available_nodes": needed,
    }
    extra: dict[str, Any] = {}
    if base is FedProx:
        extra = {"proximal_mu": cfg.proximal_mu}
    elif base in (FedAdam, FedYogi):
        extra = {
            "eta": cfg.eta,
            "eta_l": cfg.eta_l,
            "beta_1": cfg.beta_1,
            "beta_2": cfg.beta_2,
            "tau": cfg.tau,
        }
    elif base is FedAdagrad:
        extra = {"eta": cfg.eta, "eta_l": cfg.eta_l, "tau": cfg.tau}
    elif base is FedAvgM:
        extra = {
            "server_learning_rate": cfg.server_learning_rate,
            "server_momentum": cfg.server_momentum,
        }
    elif base is FedTrimmedAvg:
        extra = {"beta": cfg.trim_beta}
    elif base is Krum:
        extra = {"num_malicious_nodes": cfg.num_malicious_nodes}
    return _with_mixin(base)(**common, **extra)
