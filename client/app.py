"""fedmsk ClientApp: a hospital node's adapter between Flower messages and the core.

This module is the one place that decides what leaves a node (DESIGN.md): model arrays, the
example count, aggregate metrics, and the aggregate evaluation summary. It is tested by
``tests/test_client_payload.py``. Any failure on the node is logged to the site's own log and
answered with an error reply that carries only the site alias and the error class.
"""

from __future__ import annotations

import copy
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
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from client.secagg import secagg_train_mod
from fedmsk.config import ExperimentConfig, compose, overrides_from_run_config
from fedmsk.protocol import NORM_STATS_ACTION, NORM_STATS_RECORD, ROUND_KEY, THRESHOLD_KEY
from fedmsk.site_runtime import ModelPool, SiteRuntime, derive_seed, node_logger

app = ClientApp()

SITE_FAILURE_CODE = 9001
NODE_CONFIG_DATA_DIR = "data-dir"
NODE_CONFIG_ALIAS = "site-alias"


# -- where this node's data is ---------------------------------------------------------------


def resolve_site(cfg: ExperimentConfig, node_config: dict[str, Any]) -> tuple[Path, str]:
    """The site directory and alias: from the node config (deployment) or partition id.

    In deployment the hospital's own node config names its data directory; the server never
    tells a node where data is. In simulation, ``partition-id`` picks the n-th site of the
    federation under ``data.root`` (sites in alias order).
    """
    if NODE_CONFIG_DATA_DIR in node_config:
        site_dir = Path(str(node_config[NODE_CONFIG_DATA_DIR])).expanduser()
        alias = str(node_config.get(NODE_CONFIG_ALIAS, site_dir.name))
        return site_dir, alias
    from fedmsk.data.federation import load_federation

    federation = load_federation(Path(cfg.data.root))
    sites = sorted(federation.sites, key=lambda s: s.alias)
    index = int(node_config["partition-id"])
    if index >= len(sites):
        raise IndexError(f"partition {index} has no site ({len(sites)} sites)")
    site = sites[index]
    return Path(cfg.data.root) / site.dir, site.alias


# A node process answers many messages of the same run: composing the Hydra config (~0.2 s)
# and building the model (~0.2 s for resnet18) once per process instead of once per message is
# a measurable share of a small site's round (docs/benchmarks.md, section 4).
_COMPOSED: dict[str, ExperimentConfig] = {}
MODEL_POOL = ModelPool()


def _config(context: Context) -> ExperimentConfig:
    """The run's configuration; a private copy, so nothing a handler does leaks to the next."""
    run_config = dict(context.run_config)
    key = json.dumps(run_config, sort_keys=True, default=str)
    if key not in _COMPOSED:
        _COMPOSED.clear()  # one run at a time per process
        _COMPOSED[key] = compose(overrides_from_run_config(run_config))
    return copy.deepcopy(_COMPOSED[key])


# -- what leaves the node --------------------------------------------------------------------


def _finite_numbers(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}


def train_reply_content(
    arrays: dict[str, np.ndarray], num_examples: int, metrics: dict[str, float]
) -> RecordDict:
    record = MetricRecord({"num-examples": int(num_examples), **_finite_numbers(metrics)})
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
) -> RecordDict:
    """Aggregate evaluation only: numbers, class names and fixed-grid curves."""
    record = MetricRecord({"num-examples": int(num_examples), **_finite_numbers(metrics)})
    detail = ConfigRecord(
        {
            "site-alias": alias,
            "summary": json.dumps(summary, sort_keys=True, default=_json_number),
            "histogram": json.dumps(histogram, sort_keys=True, default=_json_number),
        }
    )
    return RecordDict({"metrics": record, "detail": detail})


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


def failure_reply(msg: Message, alias: str, error: BaseException) -> Message:
    """An error reply naming only the site alias and the error class."""
    reason = f"site={alias} error={type(error).__name__}"
    return Message(Error(code=SITE_FAILURE_CODE, reason=reason), reply_to=msg)


# -- handlers --------------------------------------------------------------------------------


def _handle(msg: Message, context: Context, action: str) -> Message:
    started = time.perf_counter()
    alias = "unknown"
    site_dir: Path | None = None
    try:
        cfg = _config(context)
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
            cfg, site_dir, alias, heldout=heldout, seed=seed, model_pool=MODEL_POOL
        )
        setup_seconds = time.perf_counter() - started
        arrays = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        if action == "norm-stats":
            stats = runtime.norm_statistics(arrays)
            content = norm_stats_reply_content(stats)
        elif action == "train":
            outcome = runtime.train(arrays, server_round)
            outcome.metrics["setup-seconds"] = setup_seconds
            outcome.metrics["client-seconds"] = time.perf_counter() - started
            content = train_reply_content(outcome.arrays, outcome.num_examples, outcome.metrics)
        else:
            threshold = config.get(THRESHOLD_KEY)
            result = runtime.evaluate(arrays, None if threshold is None else float(threshold))
            result.metrics.update(runtime.privacy_status())
            content = evaluate_reply_content(
                alias, result.num_examples, result.metrics, result.summary, result.histogram
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
