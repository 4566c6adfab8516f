"""Model arrays on the wire (fedmsk.wire) and the coordinator's side of it (server.messages)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedmsk.models import create_model, get_arrays
from fedmsk.wire import LAYOUT_KEY, PACKED_PREFIX, is_packed, pack_arrays, unpack_arrays
from server.messages import exchange, messages_to, to_record


@pytest.fixture(autouse=True)
def _identity(flower_task_identity: None) -> None:
    return None  # Flower's Message needs a run to belong to


def _model_arrays() -> dict[str, np.ndarray]:
    model = create_model("resnet18", num_classes=2, in_chans=1)
    return get_arrays(model)


def test_packing_keeps_every_tensor_its_name_order_dtype_shape_and_bits() -> None:
    arrays = _model_arrays()
    assert len(arrays) > 100
    arrays["counter"] = np.array(7, dtype=np.int64)  # a 0-d tensor of another dtype
    arrays["empty"] = np.zeros((0, 3), dtype=np.float32)
    packed = pack_arrays(arrays)
    # one buffer per dtype and the layout, whatever the number of tensors
    assert set(packed) == {LAYOUT_KEY, PACKED_PREFIX + "<f4", PACKED_PREFIX + "<i8"}
    back = unpack_arrays(packed)
    assert list(back) == list(arrays)
    for key, value in arrays.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    assert is_packed(packed) and not is_packed(arrays)
    assert unpack_arrays(pack_arrays({})) == {}


def test_a_damaged_packing_is_refused() -> None:
    packed = pack_arrays({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2)})
    missing = {k: v for k, v in packed.items() if k != PACKED_PREFIX + "<f8"}
    with pytest.raises(ValueError, match="no <f8 buffer for b"):
        unpack_arrays(missing)
    longer = dict(packed, **{PACKED_PREFIX + "<f4": np.zeros(7, np.float32)})
    with pytest.raises(ValueError, match="holds values no tensor claims"):
        unpack_arrays(longer)
    shorter = dict(packed, **{PACKED_PREFIX + "<f4": np.zeros(5, np.float32)})
    with pytest.raises(ValueError, match="does not hold a"):
        unpack_arrays(shorter)
    with pytest.raises(ValueError, match="unreadable layout"):
        unpack_arrays(dict(packed, **{LAYOUT_KEY: np.frombuffer(b"{", np.uint8)}))


class EchoGrid:
    """Pushes are kept; each node answers with the arrays it was sent, plus one."""

    def __init__(self) -> None:
        self.pushed: list[Message] = []

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for message in messages:
            mid = f"m{len(self.pushed)}"
            message.metadata.__dict__["_message_id"] = mid  # as Flower does when it pushes
            self.pushed.append(message)
            ids.append(mid)
        return ids

    def pull_messages(self, ids: set[str]) -> list[Message]:
        replies = []
        for message in self.pushed:
            if message.metadata.message_id in ids:
                got = {k: v.numpy() for k, v in message.content["arrays"].items()}
                if is_packed(got):  # a node answers the way it was asked
                    answer = pack_arrays({k: v + 1 for k, v in unpack_arrays(got).items()})
                else:
                    answer = {k: v + 1 for k, v in got.items()}
                content = RecordDict(
                    {"arrays": to_record(answer), "metrics": MetricRecord({"num-examples": 3})}
                )
                replies.append(Message(content, reply_to=message))
        return replies


@pytest.mark.parametrize("pack", [True, False])
def test_exchange_sends_packed_and_hands_back_named_tensors(pack: bool) -> None:
    arrays = _model_arrays()
    grid = EchoGrid()
    messages = messages_to([11, 12], to_record(arrays), {"fedmsk-round": 1}, "train")
    replies = exchange(grid, messages, timeout=10, pack=pack)
    sent = [list(m.content["arrays"].keys()) for m in grid.pushed]
    if pack:
        assert all(keys == [LAYOUT_KEY, PACKED_PREFIX + "<f4"] for keys in sent)
        # one record for both nodes is packed once
        assert grid.pushed[0].content["arrays"] is grid.pushed[1].content["arrays"]
    else:
        assert all(keys == list(arrays) for keys in sent)
    assert len(replies) == 2
    for reply in replies:
        record = reply.content["arrays"]
        assert isinstance(record, ArrayRecord) and list(record.keys()) == list(arrays)
        for key, value in arrays.items():
            np.testing.assert_array_equal(record[key].numpy(), value + 1, err_msg=key)


def test_messages_without_arrays_pass_unchanged() -> None:
    grid = EchoGrid()
    message = Message(RecordDict({"config": ConfigRecord({"a": 1})}), dst_node_id=3,
                      message_type="query")  # fmt: skip
    grid.pull_messages = lambda ids: []  # type: ignore[method-assign]
    exchange(grid, [message], timeout=0.05, pack=True)
    assert list(grid.pushed[0].content.keys()) == ["config"]
