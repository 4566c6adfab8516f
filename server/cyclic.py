"""Cyclic weight transfer: the model visits the training sites one after another each round.

Why it is offered (docs/benchmarks.md, "How the defaults were chosen"): ResNets trained from
scratch on the synthetic federation sit on a loss plateau for several hundred sequential
optimizer steps before they find the finding. FedAvg-style strategies add only ``local_steps``
sequential steps per round however many sites train (the sites' steps run side by side and are
averaged), so they need many times the images pooled training needs to leave the plateau.
Passing the model from site to site (Chang et al., JAMIA 2018) makes every site's steps
sequential, so a round moves the model as far as a pooled epoch of the same images would.

Each round visits every training site once, in an order drawn from the run's seed and the round
(so a resumed run repeats it); each site trains ``train.local_steps`` steps (its optimizer's
moments kept on the node, as with the other strategies) and returns the model, which goes on to
the next site. A site that fails or times out is recorded and skipped; the model goes on from
the last good one. After the round the model gets BatchNorm statistics measured at its weights
and is validated, as under the other strategies.

What this exposes, said plainly: the coordinator sees each site's model after that site's
steps (as FedAvg without secure aggregation does), and a site receives a model that the site
before it trained last. It cannot be combined with SecAgg+, which needs a sum over sites.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import MessageType, MetricRecord
from flwr.serverapp import Grid

from fedmsk.protocol import ROUND_KEY
from server.messages import messages_to, to_record
from server.round_evaluation import evaluate_round
from server.rounds import RoundRecorder, arrays_to_numpy

log = logging.getLogger("fedmsk.server")

NAME = "cyclic"


def visiting_order(recorder: RoundRecorder, server_round: int) -> list[int]:
    """The training nodes in this round's order, drawn from (seed, absolute round)."""
    nodes = recorder.training_node_ids()
    rng = np.random.default_rng([recorder.cfg.seed, recorder.absolute_round(server_round)])
    return [nodes[i] for i in rng.permutation(len(nodes))]


def run_cyclic_rounds(grid: Grid, recorder: RoundRecorder, arrays: dict[str, np.ndarray]) -> None:
    """Run the remaining rounds; ``recorder.last_arrays`` holds the result after each."""
    cfg = recorder.cfg
    if cfg.privacy.secure_aggregation:
        raise ValueError(
            "strategy=cyclic cannot use privacy.secure_aggregation: SecAgg+ hides each site's "
            "model in a sum, and cyclic transfer passes one site's model to the next"
        )
    current = {k: np.asarray(v) for k, v in arrays.items()}
    remaining = cfg.federation.num_rounds - recorder.round_offset
    for server_round in range(1, remaining + 1):
        current = cyclic_round(grid, recorder, current, server_round)
        record = to_record(current)
        evaluate_round(grid, recorder, record, server_round)
        current = arrays_to_numpy(record)


def cyclic_round(
    grid: Grid, recorder: RoundRecorder, current: dict[str, np.ndarray], server_round: int
) -> dict[str, np.ndarray]:
    """One visit to every training site; returns the model after the last good visit."""
    cfg = recorder.cfg
    absolute = recorder.absolute_round(server_round)
    connected = set(grid.get_node_ids())
    trained: list[tuple[float, dict[str, float]]] = []
    for node in visiting_order(recorder, server_round):
        if node not in connected:
            recorder.record_failure(server_round, recorder.alias_of(node), "train", "NotConnected")
            continue
        config = {ROUND_KEY: absolute, "server-round": server_round}
        message = messages_to([node], to_record(current), config, MessageType.TRAIN)
        recorder.expect("train", server_round, [node])
        replies = list(grid.send_and_receive(message, timeout=cfg.federation.round_timeout_s))
        for reply in recorder.screen_train_replies(server_round, replies):
            current = arrays_to_numpy(reply.content["arrays"])
            metrics = dict(reply.content["metrics"])
            trained.append((float(metrics.get("num-examples", 0)), metrics))
    if not trained:
        recorder.record_skipped_round(server_round, 0)
        log.warning("round %s: no site trained; the model is unchanged", absolute)
    recorder.on_train_aggregated(
        server_round, to_record(current), _weighted_metrics(trained), strategy_state={}
    )
    return current


def _weighted_metrics(trained: list[tuple[float, dict[str, float]]]) -> MetricRecord:
    """Example-weighted means of the sites' numeric metrics, as FedAvg reports them."""
    total = sum(weight for weight, _ in trained)
    if not total:
        return MetricRecord({})
    keys = set.intersection(*(set(m) for _, m in trained)) - {"num-examples"}
    means = {
        key: sum(w * float(m[key]) for w, m in trained) / total
        for key in sorted(keys)
        if all(isinstance(m[key], int | float) for _, m in trained)
    }
    return MetricRecord({"num-examples": int(total), **means})
