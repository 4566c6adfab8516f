"""Building what the coordinator sends: array records, and one message per node."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedmsk.wire import is_packed, pack_arrays, unpack_arrays


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Named arrays as Flower's record, in their order."""
    return ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in arrays.items()))


def packed_record(record: ArrayRecord) -> ArrayRecord:
    """``record`` as a few flat buffers (:mod:`fedmsk.wire`: one object on the wire per dtype
    instead of one per tensor); a record that is packed already is returned as it is."""
    if is_packed(record.keys()):
        return record
    return to_record(pack_arrays({k: v.numpy() for k, v in record.items()}))


def unpacked_record(record: ArrayRecord) -> ArrayRecord:
    if not is_packed(record.keys()):
        return record
    return to_record(unpack_arrays({k: v.numpy() for k, v in record.items()}))


def _pack_outgoing(messages: list[Message]) -> None:
    done: dict[int, ArrayRecord] = {}  # one record sent to many nodes is packed once
    for message in messages:
        content = message.content
        if "arrays" in content:
            record = content["arrays"]
            if id(record) not in done:
                done[id(record)] = packed_record(record)
            content["arrays"] = done[id(record)]


def _unpack_reply(reply: Message) -> Message:
    if not reply.has_error() and "arrays" in reply.content:
        reply.content["arrays"] = unpacked_record(reply.content["arrays"])
    return reply


def messages_to(
    node_ids: list[int], arrays: ArrayRecord | None, config: dict[str, Any], message_type: str
) -> list[Message]:
    """``message_type`` messages carrying ``arrays`` (if any) and ``config`` to each node."""
    content: dict[str, Any] = {"config": ConfigRecord(dict(config))}
    if arrays is not None:
        content["arrays"] = arrays
    return [
        Message(RecordDict(content), dst_node_id=node, message_type=message_type)
        for node in node_ids
    ]


# Flower's gRPC grid polls for replies every 3 s (flwr 1.41, superlink/grid/http_grid.py), so a
# message that a site answers in 0.3 s costs 3 s of wall time, and a cyclic round of twelve
# visits 36 s. fedmsk polls from FIRST_POLL_S, growing by half up to MAX_POLL_S while it waits
# (a pull is one small call to the SuperLink).
FIRST_POLL_S = 0.01
MAX_POLL_S = 0.1


def _on_behalf_of(reply: Message, sent: dict[str, int]) -> Message:
    """The reply, carrying the ID of the node its message went to.

    For a node that stopped sending heartbeats (crashed, switched off, cut off) the SuperLink
    answers itself, with an error reply whose sender is the SuperLink (flwr 1.41,
    ``create_message_error_unavailable_res_message``): left as it is, the dropout would be
    recorded against a "node 1" and the site as a timeout. Flower offers no setter for the
    sender, so it is written where Flower itself writes message IDs.
    """
    node = sent.get(reply.metadata.reply_to_message_id)
    if node is not None and reply.has_error() and reply.metadata.src_node_id != node:
        reply.metadata.__dict__["_src_node_id"] = node
    return reply


def exchange(
    grid: Any, messages: Iterable[Message], timeout: float | None, pack: bool = False
) -> list[Message]:
    """Send ``messages`` and collect their replies until all came or ``timeout`` passed.

    ``pack``: send their model arrays packed (:mod:`fedmsk.wire`). Packed replies are unpacked
    whatever ``pack`` says, so callers only ever see named tensors.
    """
    outgoing = list(messages)
    if pack:
        _pack_outgoing(outgoing)
    ids = list(grid.push_messages(outgoing))  # Flower keeps the order, None where refused
    sent = {mid: m.metadata.dst_node_id for m, mid in zip(outgoing, ids, strict=False) if mid}
    pending = set(sent)
    replies: list[Message] = []
    deadline = None if timeout is None else time.monotonic() + timeout
    pause = FIRST_POLL_S
    while pending:
        arrived = [_unpack_reply(_on_behalf_of(m, sent)) for m in grid.pull_messages(pending)]
        replies.extend(arrived)
        pending.difference_update(m.metadata.reply_to_message_id for m in arrived)
        if not pending or (deadline is not None and time.monotonic() >= deadline):
            break
        time.sleep(pause if deadline is None else max(0.0, min(pause, deadline - time.monotonic())))
        pause = min(MAX_POLL_S, pause * 1.5)
    return replies


class PromptGrid:
    """A Grid whose ``send_and_receive`` polls promptly and, with ``pack``, sends model arrays
    packed (:func:`exchange`); all else is the wrapped grid's. Handed to Flower's strategy loop
    so its rounds neither wait in 3-s steps nor move a model as a hundred objects."""

    def __init__(self, grid: Any, pack: bool = False) -> None:
        self._grid = grid
        self._pack = pack

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        return exchange(self._grid, messages, timeout, pack=self._pack)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)
