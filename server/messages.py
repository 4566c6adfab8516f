"""Building what the coordinator sends: array records, and one message per node."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Named arrays as Flower's record, in their order."""
    return ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in arrays.items()))


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
