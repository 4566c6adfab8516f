"""Cyclic weight transfer: every training site trains the model in turn, the held-out center
never, a failed site is skipped, and the visiting order repeats on a resumed run."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict

from fedmsk.config import compose
from fedmsk.run_dir import RunDirectory
from server.cyclic import cyclic_round, run_cyclic_rounds, visiting_order
from server.rounds import RoundRecorder

SITES = ["a", "b", "c", "d", "h"]


@pytest.fixture(autouse=True)
def _identity(flower_task_identity: None) -> None:
    return None


def _recorder(tmp_path: Path, offset: int = 0, *extra: str) -> RoundRecorder:
    cfg = compose(
        [
            "strategy=cyclic",
            f"run_dir={tmp_path}",
            f"federation.sites=[{','.join(SITES)}]",
            "federation.heldout_sites=[h]",
            "federation.num_rounds=3",
            "evaluation.every_rounds=100",  # only the last round evaluates
            *extra,
        ]
    )
    return RoundRecorder(
        cfg=cfg,
        run_dir=RunDirectory(tmp_path),
        node_alias={i + 1: a for i, a in enumerate(SITES)},
        reference_shapes={"w": (3,)},
        round_offset=offset,
    )


class TravellingGrid:
    """Each site adds its node id to the model it receives; node 2 always fails."""

    def __init__(self) -> None:
        self.visits: list[int] = []

    def get_node_ids(self) -> list[int]:
        return list(range(1, len(SITES) + 1))

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            assert msg.metadata.message_type == "train"
            self.visits.append(node)
            if node == 2:
                replies.append(Message(Error(code=1, reason="site=b error=OSError"), reply_to=msg))
                continue
            w = msg.content["arrays"]["w"].numpy() + node
            record = ArrayRecord(OrderedDict([("w", Array(w.astype(np.float32)))]))
            metrics = MetricRecord({"num-examples": 10, "train-loss": float(node)})
            replies.append(
                Message(RecordDict({"arrays": record, "metrics": metrics}), reply_to=msg)
            )
        return replies


def test_a_round_passes_the_model_from_site_to_site(tmp_path: Path) -> None:
    recorder = _recorder(tmp_path)
    grid = TravellingGrid()
    out = cyclic_round(grid, recorder, {"w": np.zeros(3, np.float32)}, 1)
    assert sorted(grid.visits) == [1, 2, 3, 4]  # every training site, never the held-out (5)
    np.testing.assert_allclose(out["w"], 1 + 3 + 4)  # the failed site changed nothing
    assert [f["site"] for f in recorder.failures] == ["b"]
    checkpoint = recorder.run_dir.latest_checkpoint()
    assert checkpoint is not None and checkpoint.round == 1
    np.testing.assert_allclose(checkpoint.arrays["w"], 8.0)


def test_the_order_is_drawn_per_round_and_repeats_after_a_resume(tmp_path: Path) -> None:
    recorder = _recorder(tmp_path)
    orders = [visiting_order(recorder, r) for r in range(1, 7)]
    assert all(sorted(o) == [1, 2, 3, 4] for o in orders)
    assert len({tuple(o) for o in orders}) > 1
    resumed = _recorder(tmp_path, offset=2)
    assert visiting_order(resumed, 1) == orders[2]  # round 3 either way


def test_secure_aggregation_is_refused(tmp_path: Path) -> None:
    recorder = _recorder(tmp_path, 0, "privacy=secagg")
    with pytest.raises(ValueError, match="cannot use privacy.secure_aggregation"):
        run_cyclic_rounds(TravellingGrid(), recorder, {"w": np.zeros(3, np.float32)})
