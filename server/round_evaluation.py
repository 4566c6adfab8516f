"""Validation after a round, shared by every round loop (Flower strategies, SecAgg+, cyclic).

Before the model is scored it gets BatchNorm statistics measured at its weights
(:mod:`server.global_statistics`); then the training sites score their validation split (the
held-out center only with ``evaluation.heldout_each_round``). Rounds that
``evaluation.every_rounds`` skips send nothing.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Message, MessageType
from flwr.serverapp import Grid

from fedmsk.protocol import ROUND_KEY, THRESHOLD_KEY
from server.global_statistics import update_global_statistics, wants_global_statistics
from server.messages import messages_to
from server.rounds import RoundRecorder


def round_evaluation_messages(
    grid: Grid, recorder: RoundRecorder, arrays: ArrayRecord, server_round: int
) -> list[Message]:
    """The round's evaluate messages; ``arrays`` gets its statistics in place first."""
    if not recorder.evaluates_round(server_round):
        return []
    if wants_global_statistics(recorder, arrays) and update_global_statistics(
        grid, recorder, arrays, server_round
    ):
        recorder.on_statistics_updated(server_round, arrays)
    connected = set(grid.get_node_ids())
    nodes = [n for n in recorder.per_round_evaluation_node_ids() if n in connected]
    settings = {
        THRESHOLD_KEY: float(recorder.threshold),
        ROUND_KEY: recorder.absolute_round(server_round),
        "server-round": server_round,
    }
    recorder.expect("evaluate", server_round, nodes)
    return messages_to(nodes, arrays, settings, MessageType.EVALUATE)


def evaluate_round(
    grid: Grid, recorder: RoundRecorder, arrays: ArrayRecord, server_round: int
) -> None:
    """Send the round's evaluation (if any) and record the replies."""
    messages = round_evaluation_messages(grid, recorder, arrays, server_round)
    if not messages:
        return
    timeout = recorder.cfg.federation.round_timeout_s
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    recorder.on_evaluate_replies(server_round, replies)
