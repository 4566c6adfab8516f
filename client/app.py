"""fedmsk ClientApp: a hospital node's adapter between Flower messages and the core.

This module is the one place that decides what leaves a node (DESIGN.md): model arrays, the
example count, aggregate metrics, and the aggregate evaluation summary. It is tested by
``tests/test_client_payload.py``. Any failure on the node is logged to the site's own log and
answered with an error reply that carries only the site alias and the error class.
"""

from __future__ import annotations

import json
import math
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from client.node import DATASET_POOL, MODEL_POOL, config_for, failure_reply, resolve_site
from client.secagg import secagg_train_mod
from fedmsk.protocol import (
    COUNT_BOUND_ACTION,
    COUNT_BOUND_KEY,
    NORM_STATS_ACTION,
    NORM_STATS_RECORD,
    PLANNED_VISITS_KEY,
    ROUND_KEY,
    THRESHOLD_KEY,
    count_bound,
)
from fedmsk.site_runtime import SiteRuntime, derive_seed, node_logger
from fedmsk.wire import is_packed, pack_arrays, unpack_arrays

app = ClientApp()

# -- what leaves the node --------------------------------------------------------------------


def _finite_numbers(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}


def train_reply_content(
    arrays: dict[str, np.ndarray],
    num_examples: int,
    metrics: dict[str, float],
    packed: bool = False,
) -> RecordDict:
    """``packed``: the arrays as :mod:`fedmsk.wire` buffers, as the coordinator sent them."""
    record = MetricRecord({"num-examples": int(num_examples), **_finite_numbers(metrics)})
    if packed:
        arrays = pack_arrays(arrays)
    array_record = ArrayRecord(
        OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in arrays.items())
    )
    return RecordDict({"arrays": array_record, "metrics": record})


def evaluate_reply_content(
    alias: str,
    num_examples: int,
    metrics: dict[str, float],
    summary: dict[str, Any],
    histogram: dict[str, Any],
    trained_in: str | None = None,
) -> RecordDict:
    """Aggregate evaluation only: numbers, class names and fixed-grid curves, plus the number
    format this node trains in (``trained_in``: fp32, bf16 or fp16), for the run's record."""
    record = MetricRecord({"num-examples": int(num_examples), **_finite_numbers(metrics)})
    fields = {
        "site-alias": alias,
        "summary": json.dumps(summary, sort_keys=True, default=_json_number),
        "histogram": json.dumps(histogram, sort_keys=True, default=_json_number),
    }
    if trained_in is not None:
        fields["trained-in"] = trained_in
    return RecordDict({"metrics": record, "detail": ConfigRecord(fields)})


def norm_stats_reply_content(stats: dict[str, np.ndarray]) -> RecordDict:
    """Per-channel BatchNorm moments (count, mean, variance per layer) and nothing else."""
    record = ArrayRecord(
        OrderedDict((k, Array(np.ascontiguousarray(v, dtype=np.float64))) for k, v in stats.items())
    )
    return RecordDict({NORM_STATS_RECORD: record})


def _json_number(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} may not leave a node")


def planned_rounds(config: ConfigRecord, alias: str) -> int | None:
    """How many rounds the coordinator's seeded sample will ask this site (None: every round).

    Only the site's DP noise depends on it; a number that is wrong in either direction costs
    learning, never privacy: the accountant stops a site at its epsilon whatever was planned."""
    text = config.get(PLANNED_VISITS_KEY)
    if text is None:
        return None
    try:
        value = json.loads(str(text)).get(alias)
    except (ValueError, AttributeError):
        return None
    return int(value) if isinstance(value, int) and value > 0 else None


# -- handlers --------------------------------------------------------------------------------


def _handle(msg: Message, context: Context, action: str) -> Message:
    started = time.perf_counter()
    alias = "unknown"
    site_dir: Path | None = None
    try:
        cfg = config_for(context)
        site_dir, alias = resolve_site(cfg, dict(context.node_config))
        if action == "query":
            return Message(
                RecordDict({"detail": ConfigRecord({"site-alias": alias})}), reply_to=msg
            )
        config = msg.content["config"] if "config" in msg.content else ConfigRecord()
        heldout = alias in cfg.federation.heldout_sites
        server_round = int(config.get(ROUND_KEY, config.get("server-round", 0)))
        seed = derive_seed(cfg.seed, "loader", server_round, alias)
        runtime = SiteRuntime(
            cfg,
            site_dir,
            alias,
            heldout=heldout,
            seed=seed,
            model_pool=MODEL_POOL,
            dataset_pool=DATASET_POOL,
        )
        setup_seconds = time.perf_counter() - started
        if action == "count-bound":  # SecAgg+ set-up: the size to within a factor of two
            bound = count_bound(runtime.train_count())
            detail = ConfigRecord({"site-alias": alias, COUNT_BOUND_KEY: bound})
            return Message(RecordDict({"detail": detail}), reply_to=msg)
        arrays = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        packed = is_packed(arrays)  # answered the way it was asked (fedmsk/wire.py)
        if packed:
            arrays = unpack_arrays(arrays)
        if action == "norm-stats":
            stats = runtime.norm_statistics(arrays)
            content = norm_stats_reply_content(stats)
        elif action == "train":
            outcome = runtime.train(arrays, server_round, planned_rounds(config, alias))
            if not cfg.privacy.enabled:  # timings depend on the sampled images (site_runtime)
                outcome.metrics["setup-seconds"] = setup_seconds
                outcome.metrics["client-seconds"] = time.perf_counter() - started
            content = train_reply_content(
                outcome.arrays, outcome.num_examples, outcome.metrics, packed
            )
        else:
            threshold = config.get(THRESHOLD_KEY)
            result = runtime.evaluate(arrays, None if threshold is None else float(threshold))
            result.metrics.update(runtime.privacy_status())
            content = evaluate_reply_content(
                alias,
                result.num_examples,
                result.metrics,
                result.summary,
                result.histogram,
                result.trained_in,
            )
        return Message(content, reply_to=msg)
    except Exception as error:  # noqa: BLE001 - every failure becomes a PHI-free reply
        if site_dir is not None:
            node_logger(site_dir, alias).exception("%s failed", action)
        return failure_reply(msg, alias, error)


@app.train(mods=[secagg_train_mod])
def train(msg: Message, context: Context) -> Message:
    return _handle(msg, context, "train")


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _handle(msg, context, "evaluate")


@app.query()
def query(msg: Message, context: Context) -> Message:
    return _handle(msg, context, "query")


@app.query(NORM_STATS_ACTION)
def norm_stats(msg: Message, context: Context) -> Message:
    return _handle(msg, context, "norm-stats")


@app.query(COUNT_BOUND_ACTION)
def train_count_bound(msg: Message, context: Context) -> Message:
    return _handle(msg, context, "count-bound")
