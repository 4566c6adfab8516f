"""Building the messages the coordinator sends: one per node, the same content for each."""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict


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
