"""BatchNorm statistics for the global model, measured by the training sites at its weights.

See :mod:`fedmsk.norm_stats` for why averaging the sites' running statistics is not enough. The
coordinator sends the aggregated weights to every training site with a ``query.norm_stats``
message, each site answers with per-channel moments of its (unaugmented) training images, and
the combined moments replace the running statistics before the model is evaluated, saved or
checkpointed. A site that does not answer is recorded like any other failure; with no answer at
all the averaged statistics stay. Held-out sites are never asked.
"""

from __future__ import annotations

import logging

from flwr.app import Array, ArrayRecord, MessageType
from flwr.serverapp import Grid

from fedmsk.norm_stats import MEAN_SUFFIX, apply_to_arrays, combine, from_arrays
from fedmsk.protocol import NORM_STATS_ACTION, NORM_STATS_RECORD, ROUND_KEY
from server.messages import messages_to
from server.rounds import RoundRecorder, arrays_to_numpy

log = logging.getLogger("fedmsk.server")

PHASE = "norm-stats"


def wants_global_statistics(recorder: RoundRecorder, arrays: ArrayRecord) -> bool:
    """Only models with BatchNorm, only when configured, never under FedBN (local layers), and
    never under secure aggregation or DP-SGD: a site's moments would reach the coordinator in
    the clear, outside the sum SecAgg+ promises and outside the DP accountant."""
    strategy, privacy = recorder.cfg.strategy, recorder.cfg.privacy
    return (
        strategy.norm_statistics == "global"
        and not strategy.local_norm_layers
        and not privacy.secure_aggregation
        and not privacy.enabled
        and any(key.endswith(MEAN_SUFFIX) for key in arrays)
    )


def update_global_statistics(
    grid: Grid, recorder: RoundRecorder, arrays: ArrayRecord, round_no: int
) -> bool:
    """Replace ``arrays``' running statistics (in place) with the sites' combined moments.

    ``round_no`` is the strategy's round (recorded with any failure). Returns True when at
    least one site answered.
    """
    connected = set(grid.get_node_ids())
    nodes = [n for n in recorder.training_node_ids() if n in connected]
    messages = messages_to(
        nodes,
        arrays,
        {ROUND_KEY: recorder.absolute_round(round_no)},
        f"{MessageType.QUERY}.{NORM_STATS_ACTION}",
    )
    recorder.expect(PHASE, round_no, nodes)
    replies = list(grid.send_and_receive(messages, timeout=recorder.cfg.federation.round_timeout_s))
    answered = [
        r
        for r in recorder.answered_replies(PHASE, round_no, replies)
        if NORM_STATS_RECORD in r.content
    ]
    if not answered:
        log.warning(
            "round %s: no site returned BatchNorm statistics; keeping averaged ones", round_no
        )
        return False
    moments = combine(
        [from_arrays(arrays_to_numpy(r.content[NORM_STATS_RECORD])) for r in answered]
    )
    current = {k: arrays[k].numpy() for k in arrays if k.endswith(("running_mean", "running_var"))}
    apply_to_arrays(current, moments)
    for key, value in current.items():
        arrays[key] = Array(value)
    return True
