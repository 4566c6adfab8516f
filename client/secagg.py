"""Secure aggregation (SecAgg+) on a hospital node.

Flower 1.41 masks model updates only on its legacy fit path: ``SecAggPlusWorkflow`` sends four
train messages per round (setup, share keys, collect masked vectors, unmask), each carrying a
``secaggplus_configs`` record, and Flower's ``secaggplus_mod`` answers them. In the third stage
the mod calls a legacy fit handler, scales the weights by ``num_examples / max_weight``,
quantises them (values beyond ``±clipping_range`` are clipped without a word), masks them and
empties the reply's arrays: the server receives only masked integers it can sum, never this
site's weights.

:func:`secagg_train_mod` is registered on the ordinary ``@app.train`` handler of
``client/app.py``. A train message without SecAgg+ records passes straight to the Message-API
handler, so one ClientApp serves both kinds of run. The training itself is
:class:`fedmsk.site_runtime.SiteRuntime`, called with the same seeds as the plain handler so a
secure run reproduces a plain FedAvg run up to quantisation.

What leaves the node in the clear: the example count (FedAvg's weight, Flower's design), the
aggregate training metrics the plain path sends too, and how many values the quantiser had to
clip (so the server can tell a faithful sum from a clipped one). Failures are answered with the
same PHI-free error reply as the plain path.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from flwr.app import Context, Message, MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from client.node import DATASET_POOL, MODEL_POOL, config_for, failure_reply, resolve_site
from fedmsk.protocol import (
    ARRAY_NAMES_KEY,
    CLIPPED_METRIC,
    CLIPPING_RANGE_KEY,
    MAX_WEIGHT_KEY,
    QUANTIZATION_RANGE_KEY,
    ROUND_KEY,
)
from fedmsk.site_runtime import SiteRuntime, derive_seed, node_logger


def carries_secagg(msg: Message) -> bool:
    """A SecAgg+ stage message: a train message with Flower's SecAgg+ config record."""
    return (
        msg.metadata.message_type == MessageType.TRAIN
        and msg.has_content()
        and RECORD_KEY_CONFIGS in msg.content.config_records
    )


def secagg_train_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Route SecAgg+ stages to Flower's mod and the legacy fit; other messages pass through."""
    if not carries_secagg(msg):
        return call_next(msg, context)
    try:
        return secaggplus_mod(msg, context, legacy_fit)
    except Exception as error:  # noqa: BLE001 - every failure becomes a PHI-free reply
        return _failure(msg, context, error)


def _failure(msg: Message, context: Context, error: BaseException) -> Message:
    """Log the traceback to the site's own log; reply with the alias and error class only."""

    alias = "unknown"
    try:
        site_dir, alias = resolve_site(config_for(context), dict(context.node_config))
        node_logger(site_dir, alias).error(
            "secure aggregation stage failed", exc_info=(type(error), error, error.__traceback__)
        )
    except Exception:  # noqa: BLE001 - the reply must still go out
        pass
    return failure_reply(msg, alias, error)


def legacy_fit(msg: Message, context: Context) -> Message:
    """Train on this site's data and answer in the legacy ``fitres`` form the mod expects.

    Raises on any problem (held-out site, unusable data, non-finite weights): the mod then
    fails this stage and SecAgg+ treats the node as dropped out.
    """
    cfg = config_for(context)
    site_dir, alias = resolve_site(cfg, dict(context.node_config))
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = dict(fitins.config)
    names = [str(n) for n in json.loads(str(config[ARRAY_NAMES_KEY]))]
    values = parameters_to_ndarrays(fitins.parameters)
    if len(names) != len(values):
        raise ValueError(f"{len(values)} arrays arrived with {len(names)} names")
    server_round = int(config[ROUND_KEY])  # type: ignore[arg-type]
    runtime = SiteRuntime(
        cfg,
        site_dir,
        alias,
        heldout=alias in cfg.federation.heldout_sites,
        seed=derive_seed(cfg.seed, "loader", server_round, alias),
        model_pool=MODEL_POOL,
        dataset_pool=DATASET_POOL,
    )
    outcome = runtime.train(dict(zip(names, values, strict=True)), server_round)
    # float64: the mod adds the clipping range before quantising; in float32 that sum keeps only
    # ~7 digits, an error of ~1e-4 once divided by the small num_examples/max_weight ratio.
    # These arrays never leave the node (the mod sends masked integers and clears them).
    ordered = [np.asarray(outcome.arrays[name], dtype=np.float64) for name in names]
    for name, value in zip(names, ordered, strict=True):
        if not np.isfinite(value).all():
            raise FloatingPointError(f"non-finite values in {name} after local training")
    metrics: dict[str, Any] = {
        k: float(v) for k, v in outcome.metrics.items() if math.isfinite(float(v))
    }
    max_weight = float(config[MAX_WEIGHT_KEY])  # type: ignore[arg-type]
    if outcome.num_examples > max_weight:
        # a weight factor above 1 can wrap the masked sum: drop out rather than corrupt it
        raise SecAggWeightOverflow(
            f"{outcome.num_examples} training examples exceed privacy.secagg_max_weight="
            f"{max_weight:g}; the coordinator must raise it"
        )
    metrics[CLIPPED_METRIC] = count_clipped(
        ordered,
        outcome.num_examples,
        clipping_range=float(config[CLIPPING_RANGE_KEY]),  # type: ignore[arg-type]
        max_weight=float(config[MAX_WEIGHT_KEY]),  # type: ignore[arg-type]
        quantization_range=int(config[QUANTIZATION_RANGE_KEY]),  # type: ignore[arg-type]
    )
    if metrics[CLIPPED_METRIC]:
        runtime.log.warning(
            "secure aggregation will clip %d value(s) of this update", metrics[CLIPPED_METRIC]
        )
    fitres = FitRes(
        status=Status(code=Code.OK, message="OK"),
        parameters=ndarrays_to_parameters(ordered),
        num_examples=int(outcome.num_examples),
        metrics=metrics,
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


class SecAggWeightOverflow(ValueError):
    """This site has more training examples than the SecAgg+ weight factor can represent."""


def count_clipped(
    arrays: list[np.ndarray],
    num_examples: int,
    clipping_range: float,
    max_weight: float,
    quantization_range: int,
) -> int:
    """How many values ``secaggplus_mod`` will clip: it scales by the quantised weight ratio
    ``round(num_examples / max_weight * Q) / Q`` and clips to ``±clipping_range``."""
    ratio = round(num_examples / max_weight * quantization_range) / quantization_range
    return int(sum(int(np.count_nonzero(np.abs(a * ratio) > clipping_range)) for a in arrays))
