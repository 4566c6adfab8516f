"""The training rounds of a federated run under secure aggregation (SecAgg+).

Why a path of its own: in Flower 1.41 SecAgg+ works only through the legacy workflow
(``SecAggPlusWorkflow`` with a ``LegacyContext`` and a legacy strategy). A Message-API strategy
with ``secaggplus_mod`` on the nodes fails every reply yet "completes" with the initial model.
So ``server/app.py`` keeps its own setup (config, run directory, site discovery, resume) and its
final evaluation; only the rounds come here when ``privacy.secure_aggregation`` is true.

Each round runs the four SecAgg+ stages against the training sites only (the held-out center
never trains), takes the unmasked weighted mean (FedAvg is the only aggregation a sum of masked
vectors allows), then records it exactly like the plain path: per-site metric lines, a
checkpoint through :class:`server.rounds.RoundRecorder`, and a federated evaluation of every
site. The server never holds a single site's weights.

Quantisation, chosen per round: SecAgg+ scales each update by ``num_examples / max_weight``,
clips it SILENTLY to ``±clipping_range`` and quantises it to ``Q`` levels. The clipping range is
``max(privacy.secagg_clipping_range, SAFETY_FACTOR x the global model's largest magnitude)`` and
``Q`` is the largest power of two whose sum over all sites cannot wrap the 2**32 modulus, which
keeps the error far below that of the default 2**22. Nodes report how many values they clip;
any clipping is logged, written to metrics.jsonl and to ``secagg.json``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from flwr.app import (
    ConfigRecord,
    Context,
    MessageType,
    MetricRecord,
)
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from fedmsk.config import ExperimentConfig
from fedmsk.protocol import (
    ARRAY_NAMES_KEY,
    CLIPPED_METRIC,
    CLIPPING_RANGE_KEY,
    COUNT_BOUND_ACTION,
    COUNT_BOUND_KEY,
    MAX_WEIGHT_KEY,
    QUANTIZATION_RANGE_KEY,
    ROUND_KEY,
)
from server.messages import messages_to, to_record
from server.round_evaluation import evaluate_round
from server.rounds import RoundRecorder, arrays_to_numpy, reply_error

log = logging.getLogger("fedmsk.server")

SAFETY_FACTOR = 4.0
MODULUS_RANGE = 2**32
MAX_QUANTIZATION_RANGE = 2**30  # quantised values are rounded through int32 on the nodes
SECAGG_STRATEGIES = ("fedavg", "fedbn", "fedprox")
SUMMARY_FILE = "secagg.json"


class SecAggConfigError(ValueError):
    """A setting that secure aggregation cannot honour; the message names it."""


# -- settings ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SecAggSettings:
    """One round's SecAgg+ parameters, as sent to the nodes."""

    num_shares: int | float
    reconstruction_threshold: int
    clipping_range: float
    quantization_range: int
    max_weight: float
    modulus_range: int = MODULUS_RANGE


def check_secagg_config(cfg: ExperimentConfig, num_training_sites: int) -> None:
    """Refuse combinations SecAgg+ cannot run, naming the setting to change."""
    privacy = cfg.privacy
    if cfg.strategy.name not in SECAGG_STRATEGIES:
        raise SecAggConfigError(
            f"strategy.name={cfg.strategy.name!r} cannot run with privacy.secure_aggregation="
            f"true: the server sees only the sum of the updates, which allows a weighted mean "
            f"({', '.join(SECAGG_STRATEGIES)}) and nothing else"
        )
    if num_training_sites < 2:
        raise SecAggConfigError(
            f"privacy.secure_aggregation=true needs at least 2 training sites, the federation "
            f"has {num_training_sites} (federation.sites minus federation.heldout_sites)"
        )
    if privacy.secagg_num_shares < 3:
        raise SecAggConfigError(
            f"privacy.secagg_num_shares={privacy.secagg_num_shares} must be at least 3"
        )
    if not 2 <= privacy.secagg_reconstruction_threshold < privacy.secagg_num_shares:
        raise SecAggConfigError(
            f"privacy.secagg_reconstruction_threshold={privacy.secagg_reconstruction_threshold}"
            f" must be at least 2 and below privacy.secagg_num_shares="
            f"{privacy.secagg_num_shares}"
        )
    if privacy.secagg_max_weight <= 0:
        raise SecAggConfigError(
            f"privacy.secagg_max_weight={privacy.secagg_max_weight} must be positive"
        )


def quantization_range_for(num_sites: int) -> int:
    """The largest power of two Q with ``num_sites * Q < 2**32``: the unmasked sum of every
    site's quantised values (each below Q) must not wrap around the modulus."""
    q = MAX_QUANTIZATION_RANGE
    while q * num_sites >= MODULUS_RANGE:
        q //= 2
    return q


def clipping_range_for(arrays: dict[str, np.ndarray], configured: float) -> float:
    """Room for every scaled value: SAFETY_FACTOR x the largest magnitude of the global model
    (local training moves weights, BatchNorm statistics most), never below the configured
    range. Scaling by ``num_examples / max_weight <= 1`` only shrinks values."""
    largest = max((float(np.max(np.abs(v))) for v in arrays.values() if v.size), default=0.0)
    return float(max(configured, SAFETY_FACTOR * largest, 1e-6))


def reconstruction_threshold_for(cfg: ExperimentConfig, num_sites: int) -> int:
    """The configured threshold, clamped to the number of sites (Flower needs no more)."""
    return min(cfg.privacy.secagg_reconstruction_threshold, num_sites)


def settings_for(
    cfg: ExperimentConfig,
    arrays: dict[str, np.ndarray],
    num_sites: int,
    max_weight: float | None = None,
) -> SecAggSettings:
    """This round's parameters; ``max_weight`` defaults to the configured one."""
    privacy = cfg.privacy
    # More shares than sites only repeats neighbours; 1.0 means "every sampled site".
    num_shares: int | float = (
        privacy.secagg_num_shares if privacy.secagg_num_shares < num_sites else 1.0
    )
    return SecAggSettings(
        num_shares=num_shares,
        reconstruction_threshold=reconstruction_threshold_for(cfg, num_sites),
        clipping_range=clipping_range_for(arrays, privacy.secagg_clipping_range),
        quantization_range=quantization_range_for(num_sites),
        max_weight=float(privacy.secagg_max_weight if max_weight is None else max_weight),
    )


def chosen_max_weight(grid: Grid, recorder: RoundRecorder, nodes: list[int]) -> float:
    """``privacy.secagg_max_weight``, raised to the largest training site's size bound.

    Every site's weight factor ``num_examples / max_weight`` must stay at most 1 or the masked
    sum can wrap; asking the sites for a power-of-two bound on their size (nothing finer)
    before the first round lets large sites take part without the coordinator guessing. A site
    that does not answer keeps the configured value in force for it (and drops out of a round
    if it is larger; client/secagg.py)."""
    configured = float(recorder.cfg.privacy.secagg_max_weight)
    messages = messages_to(nodes, None, {}, f"{MessageType.QUERY}.{COUNT_BOUND_ACTION}")
    timeout = recorder.cfg.federation.round_timeout_s
    bounds = []
    for reply in grid.send_and_receive(messages, timeout=timeout):
        detail = None if reply.has_error() else reply.content.get("detail")
        if detail is not None and COUNT_BOUND_KEY in detail:
            bounds.append(int(detail[COUNT_BOUND_KEY]))
    if len(bounds) < len(nodes):
        log.warning(
            "%d of %d training sites did not give a size bound for SecAgg+: max_weight stays at "
            "least privacy.secagg_max_weight=%g for them",
            len(nodes) - len(bounds),
            len(nodes),
            configured,
        )
    chosen = max([configured, *bounds])
    if chosen > configured:
        log.info(
            "privacy.secagg_max_weight raised from %g to %g: the largest training site's size "
            "bound (a power of two)",
            configured,
            chosen,
        )
    return chosen


# -- the legacy strategy -----------------------------------------------------------------------


@dataclass
class RoundOutcome:
    """What one SecAgg+ round produced, filled in by the strategy's hooks."""

    arrays: dict[str, np.ndarray] | None = None
    sites: list[tuple[str, int, dict[str, Scalar]]] = field(default_factory=list)


class SecAggFedAvg(FedAvg):
    """The legacy strategy SecAggPlusWorkflow drives: fit instructions for the training
    sites only, and the already unmasked mean taken as the round's model."""

    def __init__(
        self, recorder: RoundRecorder, names: list[str], dtypes: dict[str, np.dtype]
    ) -> None:
        super().__init__(fraction_evaluate=0.0, min_evaluate_clients=0)
        self.recorder = recorder
        self.names = names
        self.dtypes = dtypes
        self.proxies: list[ClientProxy] = []
        self.fit_config: dict[str, Scalar] = {}
        self.outcome = RoundOutcome()

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        config: dict[str, Any] = dict(self.fit_config)
        return [(proxy, FitIns(parameters, dict(config))) for proxy in self.proxies]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[Any],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        if not results:
            return None, {}
        # Every result carries the same unmasked mean (the workflow puts it there).
        values = parameters_to_ndarrays(results[0][1].parameters)
        self.outcome.arrays = {
            name: np.asarray(value, dtype=self.dtypes[name]).reshape(
                self.recorder.reference_shapes[name]
            )
            for name, value in zip(self.names, values, strict=True)
        }
        self.outcome.sites = sorted(
            (
                (self.recorder.alias_of(proxy.node_id), int(res.num_examples), dict(res.metrics))
                for proxy, res in results
            ),
            key=lambda site: site[0],
        )
        return results[0][1].parameters, {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[Any],
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        return None


class WatchedGrid:
    """A Grid that remembers which node answered each SecAgg+ stage with an error, so a
    dropped site can be named in metrics.jsonl (the workflow keeps only the errors)."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.errors: dict[int, str] = {}
        self.silent: set[int] = set()

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
        messages = list(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        answered = {m.metadata.src_node_id for m in replies}
        self.silent |= {m.metadata.dst_node_id for m in messages} - answered
        for reply in replies:
            if reply.has_error():
                self.errors.setdefault(reply.metadata.src_node_id, reply_error(reply))
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


# -- the rounds --------------------------------------------------------------------------------


def run_secagg_rounds(
    grid: Grid, context: Context, recorder: RoundRecorder, arrays: dict[str, np.ndarray]
) -> None:
    """Run the remaining rounds with SecAgg+; ``recorder.last_arrays`` holds the result."""
    cfg = recorder.cfg
    training = recorder.training_node_ids()
    check_secagg_config(cfg, len(training))
    threshold = reconstruction_threshold_for(cfg, len(training))
    if threshold >= len(training):
        log.warning(
            "secure aggregation over %d training sites needs every one of them in every round "
            "(reconstruction threshold %d): a site that drops out loses the round for all",
            len(training),
            threshold,
        )
    if cfg.strategy.fraction_train < 1.0:
        log.warning("secure aggregation samples every training site (strategy.fraction_train)")
    names = list(arrays)
    strategy = SecAggFedAvg(recorder, names, {k: np.asarray(v).dtype for k, v in arrays.items()})
    strategy.proxies = [
        GridClientProxy(node_id=n, grid=grid, run_id=grid.run.run_id) for n in training
    ]
    manager = SimpleClientManager()
    for proxy in strategy.proxies:
        manager.register(proxy)
    remaining = cfg.federation.num_rounds - recorder.round_offset
    legacy = LegacyContext(context, ServerConfig(num_rounds=remaining), strategy, manager)
    current = {k: np.asarray(v) for k, v in arrays.items()}
    summary: list[dict[str, Any]] = _previous_summary(recorder)
    max_weight = chosen_max_weight(grid, recorder, training) if remaining > 0 else None
    for server_round in range(1, remaining + 1):
        settings = settings_for(cfg, current, len(training), max_weight)
        entry = secagg_round(grid, legacy, strategy, settings, server_round, current)
        summary.append(entry)
        recorder.run_dir.write_json(SUMMARY_FILE, {"rounds": summary})
        if recorder.last_arrays is not None:
            current = recorder.last_arrays
        record = to_record(current)
        evaluate_round(grid, recorder, record, server_round)
        current = arrays_to_numpy(record)


def _previous_summary(recorder: RoundRecorder) -> list[dict[str, Any]]:
    """Rounds already summarised before a resume (later ones are run again)."""
    path = recorder.run_dir.path / SUMMARY_FILE
    if not path.is_file() or not recorder.round_offset:
        return []
    rounds = json.loads(path.read_text(encoding="utf-8")).get("rounds", [])
    return [r for r in rounds if int(r.get("round", 0)) <= recorder.round_offset]


def secagg_round(
    grid: Grid,
    legacy: LegacyContext,
    strategy: SecAggFedAvg,
    settings: SecAggSettings,
    server_round: int,
    current: dict[str, np.ndarray],
) -> dict[str, Any]:
    """One training round: the four SecAgg+ stages, then the recorder's bookkeeping."""

    recorder = strategy.recorder
    absolute = recorder.absolute_round(server_round)
    strategy.outcome = RoundOutcome()
    strategy.fit_config = {
        ARRAY_NAMES_KEY: json.dumps(strategy.names),
        ROUND_KEY: absolute,
        "server-round": server_round,
        "num-rounds": recorder.cfg.federation.num_rounds,
        CLIPPING_RANGE_KEY: settings.clipping_range,
        MAX_WEIGHT_KEY: settings.max_weight,
        QUANTIZATION_RANGE_KEY: settings.quantization_range,
    }
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {Key.CURRENT_ROUND: absolute, Key.START_TIME: time.time()}
    )
    legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([current[name] for name in strategy.names]), keep_input=True
    )
    workflow = SecAggPlusWorkflow(
        num_shares=settings.num_shares,
        reconstruction_threshold=settings.reconstruction_threshold,
        max_weight=settings.max_weight,
        clipping_range=settings.clipping_range,
        quantization_range=settings.quantization_range,
        modulus_range=settings.modulus_range,
        timeout=recorder.cfg.federation.round_timeout_s,
    )
    watched = WatchedGrid(grid)
    state = WorkflowState()
    started = time.monotonic()
    stages = (
        workflow.setup_stage,
        workflow.share_keys_stage,
        workflow.collect_masked_vectors_stage,
        workflow.unmask_stage,
    )
    completed = all(stage(watched, legacy, state) for stage in stages)  # type: ignore[arg-type]
    seconds = time.monotonic() - started
    outcome = strategy.outcome
    contributors = {alias for alias, _, _ in outcome.sites}
    _record_dropouts(recorder, server_round, watched, contributors)
    clipped = int(sum(float(m.get(CLIPPED_METRIC, 0.0)) for _, _, m in outcome.sites))
    problem = _aggregate_problem(outcome, settings, current)
    usable = completed and outcome.arrays is not None and problem is None
    if usable and recorder.enough_replies(outcome.sites):  # type: ignore[arg-type]
        _record_sites(recorder, server_round, outcome)
        recorder.on_train_aggregated(
            server_round, to_record(outcome.arrays), _mean_metrics(outcome), {}
        )
    else:
        if completed and outcome.arrays is not None and problem:
            log.warning("round %s: %s", absolute, problem)
        recorder.record_skipped_round(server_round, len(outcome.sites))
        recorder.on_train_aggregated(server_round, None, None, {})
    max_abs = (
        max(float(np.max(np.abs(v))) for v in outcome.arrays.values() if v.size)
        if outcome.arrays
        else None
    )
    entry = {
        "round": absolute,
        "completed": bool(usable),
        "sites": sorted(contributors),
        **asdict(settings),
        "clipped-values": clipped,
        "max-abs-aggregate": max_abs,
        "seconds": round(seconds, 2),
    }
    recorder.run_dir.append_metrics(
        {"round": absolute, "phase": "secagg", "site": None}
        | {k: v for k, v in entry.items() if k not in ("round", "sites")}
    )
    if clipped:
        log.warning(
            "round %s: secure aggregation clipped %d value(s) to ±%g; the aggregate is biased "
            "(raise privacy.secagg_clipping_range)",
            absolute,
            clipped,
            settings.clipping_range,
        )
    return entry


def _record_dropouts(
    recorder: RoundRecorder, server_round: int, watched: WatchedGrid, contributors: set[str]
) -> None:
    for node_id in recorder.training_node_ids():
        alias = recorder.alias_of(node_id)
        if alias in contributors:
            continue
        if node_id in watched.errors:
            error = watched.errors[node_id]
        elif node_id in watched.silent:
            error = "Timeout"
        else:
            error = "SecAggAborted"
        recorder.record_failure(server_round, alias, "train", error)


def _aggregate_problem(
    outcome: RoundOutcome, settings: SecAggSettings, sent: dict[str, np.ndarray]
) -> str | None:
    """Why the unmasked aggregate must not be used, if it must not. A weight factor above 1
    (a site with more examples than max_weight) can wrap the masked sum of the factors: the
    mean then comes out finite and wrongly scaled (3x the true mean was reproduced), so such a
    round is refused rather than trusted. Any other wrap of the masked sums shows the same way,
    so the aggregate's size is also compared with the model the round sent out."""
    for alias, num_examples, _ in outcome.sites:
        if num_examples > settings.max_weight:
            return weight_overflow(alias, num_examples, settings.max_weight)
    for name, value in (outcome.arrays or {}).items():
        if not np.isfinite(value).all():
            return f"non-finite values in the secure aggregate of {name}"
    ratio = _scale_ratio(outcome.arrays or {}, sent)
    if ratio is not None and not 1 / AGGREGATE_SCALE_LIMIT <= ratio <= AGGREGATE_SCALE_LIMIT:
        return (
            f"the unmasked aggregate's weights are {ratio:.2f} times the size of the model sent "
            "out this round: an average of locally trained copies cannot be; a wrapped masked "
            "sum (quantisation or weight-factor overflow) is likely, so the round is refused"
        )
    return None


# One round of local training moves a model's weights by a few percent of their norm; an
# average of such models far from the sent model's size can only come from a corrupted sum.
AGGREGATE_SCALE_LIMIT = 2.0
_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def _scale_ratio(aggregate: dict[str, np.ndarray], sent: dict[str, np.ndarray]) -> float | None:
    """||aggregate|| / ||sent|| over the trained weights (BatchNorm statistics left out)."""
    names = [k for k in aggregate if k in sent and not k.endswith(_STATISTICS)]
    before = math.sqrt(sum(float(np.sum(np.square(sent[k], dtype=np.float64))) for k in names))
    after = math.sqrt(sum(float(np.sum(np.square(aggregate[k], dtype=np.float64))) for k in names))
    return after / before if before > 0 else None


def weight_overflow(alias: str, num_examples: int, max_weight: float) -> str:
    return (
        f"{alias} trained on {num_examples} examples, above privacy.secagg_max_weight="
        f"{max_weight:g}: its SecAgg+ weight factor exceeds 1 and can overflow the masked sum; "
        f"set privacy.secagg_max_weight to at least the largest site's training set"
    )


def _record_sites(recorder: RoundRecorder, server_round: int, outcome: RoundOutcome) -> None:
    """The per-site lines of the plain path: example count and aggregate metrics only."""
    for alias, num_examples, metrics in outcome.sites:
        numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        recorder.run_dir.append_metrics(
            {"round": recorder.absolute_round(server_round), "phase": "train", "site": alias}
            | numbers
            | {"num-examples": num_examples}
        )
        if "epsilon" in numbers:
            recorder.privacy.setdefault(alias, {})["epsilon"] = float(numbers["epsilon"])


def _mean_metrics(outcome: RoundOutcome) -> MetricRecord:
    """Example-weighted mean of the sites' numeric train metrics, as FedAvg reports them."""
    total = sum(n for _, n, _ in outcome.sites)
    if not outcome.sites or not total:
        return MetricRecord({})
    keys = set.intersection(
        *(
            {k for k, v in m.items() if isinstance(v, int | float) and k != CLIPPED_METRIC}
            for _, _, m in outcome.sites
        )
    )
    return MetricRecord(
        {k: sum(float(m[k]) * n for _, n, m in outcome.sites) / total for k in sorted(keys)}
    )


__all__ = [
    "SecAggConfigError",
    "SecAggSettings",
    "check_secagg_config",
    "clipping_range_for",
    "quantization_range_for",
    "run_secagg_rounds",
    "settings_for",
]
