"""Every configured strategy aggregates through Flower's own code, with fedmsk's bookkeeping."""

from __future__ import annotations

import json
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedmsk.config import compose, planned_visits
from fedmsk.protocol import PLANNED_VISITS_KEY
from fedmsk.run_dir import RunDirectory
from server.rounds import RoundRecorder
from server.strategies import STRATEGIES, NodeSubsetGrid, build_strategy

SITES = ["a", "b", "c", "d", "e", "h"]


@pytest.fixture(autouse=True)
def _identity(flower_task_identity: None) -> None:
    return None


def _recorder(tmp_path: Path, strategy: str, *overrides: str) -> RoundRecorder:
    cfg = compose(
        [
            f"strategy={strategy}",
            f"run_dir={tmp_path}",
            f"federation.sites=[{','.join(SITES)}]",
            "federation.heldout_sites=[h]",
            *overrides,
        ]
    )
    return RoundRecorder(
        cfg=cfg,
        run_dir=RunDirectory(tmp_path),
        node_alias={i + 1: a for i, a in enumerate(SITES)},
        reference_shapes={"w": (4,), "b": (2,)},
    )


def _reply(node: int, value: float) -> Message:
    request = Message(
        RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type="train"
    )
    arrays = {"w": np.full(4, value, np.float32), "b": np.full(2, -value, np.float32)}
    record = ArrayRecord(OrderedDict((k, Array(v)) for k, v in arrays.items()))
    metrics = MetricRecord({"num-examples": 10 * node, "train-loss": 1.0 / node})
    return Message(RecordDict({"arrays": record, "metrics": metrics}), reply_to=request)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategy_aggregates_and_checkpoints(name: str, tmp_path: Path) -> None:
    recorder = _recorder(tmp_path, name)
    strategy = build_strategy(recorder.cfg.strategy, num_training_sites=5, num_sites=6)
    strategy.attach(recorder)
    initial = ArrayRecord(
        OrderedDict([("w", Array(np.zeros(4, np.float32))), ("b", Array(np.zeros(2, np.float32)))])
    )
    if name == "fedavgm":
        strategy.current_arrays = initial
    elif hasattr(strategy, "current_arrays"):
        strategy.current_arrays = {k: v.numpy() for k, v in initial.items()}
    replies = [_reply(n, float(n)) for n in (1, 2, 3, 4, 5)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None, name
    w = arrays["w"].numpy()
    assert w.shape == (4,) and np.isfinite(w).all()
    if name in ("fedavg", "fedprox", "fedbn"):
        weights = np.array([10, 20, 30, 40, 50], dtype=float)
        expected = float((weights * np.arange(1, 6)).sum() / weights.sum())
        np.testing.assert_allclose(w, expected, rtol=1e-6)
    if name == "fedmedian":
        np.testing.assert_allclose(w, 3.0)
    checkpoint = recorder.run_dir.latest_checkpoint()
    assert checkpoint is not None and checkpoint.round == 1
    np.testing.assert_allclose(checkpoint.arrays["w"], w)


def test_adaptive_strategy_state_survives_a_checkpoint(tmp_path: Path) -> None:
    recorder = _recorder(tmp_path, "fedadam")
    strategy = build_strategy(recorder.cfg.strategy, 5, 6)
    strategy.attach(recorder)
    strategy.current_arrays = {"w": np.zeros(4, np.float32), "b": np.zeros(2, np.float32)}
    strategy.aggregate_train(1, [_reply(n, float(n)) for n in (1, 2, 3)])
    state = recorder.run_dir.latest_checkpoint().strategy_state
    assert {"m_t", "v_t"} <= set(state)
    fresh = build_strategy(recorder.cfg.strategy, 5, 6)
    fresh.import_state(state)
    np.testing.assert_allclose(fresh.m_t["w"], strategy.m_t["w"])


def test_training_view_of_the_grid_hides_the_heldout_node(tmp_path: Path) -> None:
    class FakeGrid:
        def get_node_ids(self) -> list[int]:
            return [1, 2, 3, 4, 5, 6]

    recorder = _recorder(tmp_path, "fedavg")
    view = NodeSubsetGrid(FakeGrid(), recorder.training_node_ids())  # type: ignore[arg-type]
    assert view.get_node_ids() == [1, 2, 3, 4, 5]


def test_unknown_strategy_names_the_setting() -> None:
    cfg = compose([])
    cfg.strategy.name = "fedmagic"
    with pytest.raises(ValueError, match="strategy.name"):
        build_strategy(cfg.strategy, 2, 3)


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_server_optimisers_average_normalisation_statistics(name: str, tmp_path: Path) -> None:
    """Momentum on a running variance could push it below zero: it takes the plain mean."""
    recorder = _recorder(tmp_path, name)
    recorder.reference_shapes = {"w": (4,), "bn.running_var": (2,)}
    strategy = build_strategy(recorder.cfg.strategy, num_training_sites=5, num_sites=6)
    strategy.attach(recorder)
    start = {"w": np.zeros(4, np.float32), "bn.running_var": np.full(2, 5.0, np.float32)}
    initial = ArrayRecord(OrderedDict((k, Array(v)) for k, v in start.items()))
    if name == "fedavgm":
        strategy.current_arrays = initial
    else:
        strategy.current_arrays = {k: v.numpy() for k, v in initial.items()}

    def reply(node: int, var: float) -> Message:
        request = Message(
            RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type="train"
        )
        arrays = {"w": np.full(4, float(node), np.float32), "bn.running_var": np.full(2, var)}
        record = ArrayRecord(
            OrderedDict((k, Array(np.asarray(v, np.float32))) for k, v in arrays.items())
        )
        metrics = MetricRecord({"num-examples": 10 * node})
        return Message(RecordDict({"arrays": record, "metrics": metrics}), reply_to=request)

    for server_round in (1, 2, 3):
        replies = [reply(n, 0.5 * n) for n in (1, 2, 3, 4, 5)]
        arrays, _ = strategy.aggregate_train(server_round, replies)
        if name != "fedavgm":
            strategy.current_arrays = {k: v.numpy() for k, v in arrays.items()}
    expected = sum(10 * n * 0.5 * n for n in range(1, 6)) / sum(10 * n for n in range(1, 6))
    np.testing.assert_allclose(arrays["bn.running_var"].numpy(), expected, rtol=1e-6)
    assert not np.allclose(arrays["w"].numpy(), 3.667, atol=1e-2), "weights keep the optimiser"


def test_waiting_for_training_sites_is_bounded_and_names_the_missing(tmp_path: Path) -> None:
    from server.strategies import TooFewSites

    online = [1, 2, 6]

    class FakeGrid:
        def get_node_ids(self) -> list[int]:
            return list(online)

    now = [0.0]
    recorder = _recorder(tmp_path, "fedavg")
    view = NodeSubsetGrid(
        FakeGrid(),  # type: ignore[arg-type]
        recorder.training_node_ids(),
        needed=3,
        wait_s=30.0,
        alias_of=recorder.alias_of,
        clock=lambda: now[0],
    )
    assert view.get_node_ids() == [1, 2]  # short, but still within the wait
    now[0] = 20.0
    online.append(3)
    assert view.get_node_ids() == [1, 2, 3]  # enough again: the clock resets
    online.remove(3)
    now[0] = 40.0
    assert view.get_node_ids() == [1, 2]
    now[0] = 71.0
    with pytest.raises(TooFewSites, match=r"only 2 of 5 .* needs 3 .*missing: c, d, e"):
        view.get_node_ids()


def test_a_round_goes_ahead_without_an_offline_site_and_records_it(tmp_path: Path) -> None:
    class FakeGrid:
        def get_node_ids(self) -> list[int]:
            return [1, 2, 4, 5, 6]  # site c (node 3) is offline

    recorder = _recorder(tmp_path, "fedavg", "strategy.fraction_train=1.0")
    strategy = build_strategy(recorder.cfg.strategy, 5, 6, recorder.replies_needed())
    strategy.attach(recorder)
    arrays = ArrayRecord(
        OrderedDict((k, Array(np.zeros(s, np.float32))) for k, s in (("w", (4,)), ("b", (2,))))
    )
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid()))
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2, 4, 5]
    assert [(f["site"], f["error"]) for f in recorder.failures] == [("c", "Unreachable")]
    assert any(m.get("phase") == "train-failure" for m in recorder.run_dir.read_metrics())


def _train_messages(strategy: object, server_round: int, online: list[int]) -> list[Message]:
    class FakeGrid:
        def get_node_ids(self) -> list[int]:
            return list(online)

    arrays = ArrayRecord(
        OrderedDict((k, Array(np.zeros(s, np.float32))) for k, s in (("w", (4,)), ("b", (2,))))
    )
    return list(strategy.configure_train(server_round, arrays, ConfigRecord(), FakeGrid()))  # type: ignore[attr-defined]


def _asked(strategy: object, server_round: int, online: list[int]) -> list[int]:
    return sorted(m.metadata.dst_node_id for m in _train_messages(strategy, server_round, online))


def test_a_sampled_round_asks_a_seeded_sample_and_aggregates_what_it_asked(
    tmp_path: Path,
) -> None:
    """strategy.fraction_train=0.4 of 5 training sites asks 2 a round, the same 2 in a rerun;
    2 replies are enough (min_reply_fraction 0.5 of the 2 asked, not of all 5 sites)."""
    online = [1, 2, 3, 4, 5, 6]

    def start(folder: Path) -> tuple[RoundRecorder, object]:
        folder.mkdir(exist_ok=True)
        recorder = _recorder(folder, "fedavg", "strategy.fraction_train=0.4")
        strategy = build_strategy(recorder.cfg.strategy, 5, 6, recorder.replies_needed())
        strategy.attach(recorder)
        return recorder, strategy

    recorder, strategy = start(tmp_path / "first")
    asked = [_asked(strategy, r, online) for r in range(1, 9)]
    assert all(len(a) == 2 and 6 not in a for a in asked)  # never the held-out center
    assert len({tuple(a) for a in asked}) > 1  # the sample changes from round to round
    assert recorder.failures == []  # sites not sampled are not failures
    _, again = start(tmp_path / "again")
    assert [_asked(again, r, list(reversed(online))) for r in range(1, 9)] == asked
    assert recorder.replies_needed() == 1
    arrays, _ = strategy.aggregate_train(1, [_reply(n, float(n)) for n in asked[0]])  # type: ignore[attr-defined]
    assert arrays is not None and 1 not in recorder.skipped_rounds


def _configs(strategy: object, server_round: int, online: list[int]) -> list[ConfigRecord]:
    return [m.content["config"] for m in _train_messages(strategy, server_round, online)]


def test_under_dp_sites_are_told_the_rounds_the_seeded_sample_will_ask_them(
    tmp_path: Path,
) -> None:
    """The plan sent with a DP round equals how often each site is then asked; without DP or
    without sampling nothing is sent."""
    online = [1, 2, 3, 4, 5, 6]
    sampled = ("strategy.fraction_train=0.4", "federation.num_rounds=10")
    recorder = _recorder(tmp_path / "dp", "fedavg", *sampled, "privacy=dp")
    strategy = build_strategy(recorder.cfg.strategy, 5, 6, recorder.replies_needed())
    strategy.attach(recorder)
    asked = Counter(recorder.alias_of(n) for r in range(1, 11) for n in _asked(strategy, r, online))
    configs = _configs(strategy, 1, online)
    plans = {str(c[PLANNED_VISITS_KEY]) for c in configs}
    assert len(plans) == 1
    plan = json.loads(plans.pop())
    assert plan == planned_visits(recorder.cfg, ["a", "b", "c", "d", "e"])
    assert plan == {a: asked.get(a, 0) for a in "abcde"} and sum(plan.values()) == 20
    assert len(set(plan.values())) > 1  # the plan differs between sites: it is per site
    without = {
        "no-dp": sampled,
        "no-sampling": (*sampled, "privacy=dp", "strategy.fraction_train=1.0"),
    }
    for name, overrides in without.items():
        other = _recorder(tmp_path / name, "fedavg", *overrides)
        plain = build_strategy(other.cfg.strategy, 5, 6, other.replies_needed())
        plain.attach(other)
        assert all(PLANNED_VISITS_KEY not in c for c in _configs(plain, 1, online)), name


def test_every_training_site_is_asked_without_sampling(tmp_path: Path) -> None:
    recorder = _recorder(tmp_path, "fedavgm", "strategy.fraction_train=1.0")
    strategy = build_strategy(recorder.cfg.strategy, 5, 6, recorder.replies_needed())
    strategy.attach(recorder)
    assert _asked(strategy, 1, [1, 2, 3, 4, 5, 6]) == [1, 2, 3, 4, 5]
    assert recorder.replies_needed() == 3


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad", "fedavgm"])
def test_resumed_server_optimiser_ends_where_an_uninterrupted_run_ends(
    name: str, tmp_path: Path
) -> None:
    """4 rounds in one go equal 2 rounds, a checkpoint, a new strategy and 2 more rounds."""

    def start(folder: Path, offset: int = 0) -> tuple[RoundRecorder, object]:
        folder.mkdir(exist_ok=True)
        recorder = _recorder(folder, name)
        recorder.round_offset = offset
        strategy = build_strategy(recorder.cfg.strategy, 5, 6)
        strategy.attach(recorder)
        zeros = {"w": np.zeros(4, np.float32), "b": np.zeros(2, np.float32)}
        strategy.current_arrays = (
            ArrayRecord(OrderedDict((k, Array(v)) for k, v in zeros.items()))
            if name == "fedavgm"
            else zeros
        )
        return recorder, strategy

    def replies(absolute_round: int) -> list[Message]:
        return [_reply(n, float(n) + 0.5 * absolute_round) for n in (1, 2, 3)]

    _, continuous = start(tmp_path / "continuous")
    for r in range(1, 5):
        final, _ = continuous.aggregate_train(r, replies(r))
    recorder, first = start(tmp_path / "killed")
    for r in (1, 2):
        first.aggregate_train(r, replies(r))
    state = recorder.run_dir.latest_checkpoint().strategy_state
    _, resumed = start(tmp_path / "killed", offset=2)
    resumed.import_state(state)
    for r in (1, 2):  # Flower's loop counts the remaining rounds from 1
        again, _ = resumed.aggregate_train(r, replies(r + 2))
    np.testing.assert_allclose(again["w"].numpy(), final["w"].numpy(), rtol=1e-6)
