"""Secure aggregation (SecAgg+): the server gets the weighted mean and nothing per site.

Fast tests run the real SecAgg+ protocol (Flower's workflow stages and ``secaggplus_mod``, the
fedmsk server rounds and the node-side mod) over an in-process grid whose sites "train" by a
known rule, so the expected mean is exact; they cover a dropped site and silent clipping. The
slow test runs a real Flower simulation with ``privacy=secagg`` on a synthetic federation and
compares its final weights with a plain FedAvg run of the same seed.
"""

from __future__ import annotations

import copy
import json
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

import client.app as client_app
import client.secagg as client_secagg
from fedmsk.config import ExperimentConfig, compose
from fedmsk.protocol import COUNT_BOUND_ACTION, COUNT_BOUND_KEY, count_bound
from fedmsk.run_dir import RunDirectory
from fedmsk.site_runtime import TrainOutcome
from server.rounds import RoundRecorder
from server.secagg import (
    SecAggConfigError,
    check_secagg_config,
    clipping_range_for,
    quantization_range_for,
    run_secagg_rounds,
    settings_for,
)

ROOT = Path(__file__).resolve().parent.parent
SITES = ["site00", "site01", "site02", "site03"]
HELDOUT = "site03"
EXAMPLES = {"site00": 23, "site01": 13, "site02": 30}


# -- settings ------------------------------------------------------------------------------------


def _cfg(tmp_path: Path, *extra: str) -> ExperimentConfig:
    return compose(
        [
            "privacy=secagg",
            f"federation.sites=[{','.join(SITES)}]",
            f"federation.heldout_sites=[{HELDOUT}]",
            "federation.num_rounds=2",
            "evaluation.every_rounds=1",
            "evaluation.heldout_each_round=true",
            f"run_dir={tmp_path / 'run'}",
            *extra,
        ]
    )


def test_quantization_range_leaves_room_for_the_sum_of_all_sites() -> None:
    for sites in (2, 3, 4, 5, 12, 100):
        q = quantization_range_for(sites)
        assert q & (q - 1) == 0 and q <= 2**30
        assert sites * q < 2**32 <= sites * q * 2 or q == 2**30
    assert quantization_range_for(3) == 2**30
    assert quantization_range_for(12) == 2**28


def test_clipping_range_follows_the_largest_weight_but_not_below_the_config() -> None:
    arrays = {"a": np.array([0.5, -3.0], np.float32), "b": np.zeros(0, np.float32)}
    assert clipping_range_for(arrays, configured=1.0) == pytest.approx(12.0)
    assert clipping_range_for(arrays, configured=20.0) == pytest.approx(20.0)


def test_settings_refuse_what_secagg_cannot_do(tmp_path: Path) -> None:
    check_secagg_config(_cfg(tmp_path), 3)
    with pytest.raises(SecAggConfigError, match=r"strategy\.name='fedmedian'"):
        check_secagg_config(_cfg(tmp_path, "strategy=fedmedian"), 3)
    with pytest.raises(SecAggConfigError, match="at least 2 training sites"):
        check_secagg_config(_cfg(tmp_path), 1)
    with pytest.raises(SecAggConfigError, match="secagg_reconstruction_threshold"):
        check_secagg_config(_cfg(tmp_path, "privacy.secagg_reconstruction_threshold=3"), 3)
    settings = settings_for(_cfg(tmp_path), {"w": np.ones(3, np.float32)}, 3)
    assert settings.num_shares == 1.0  # three shares among three sites: every site
    assert settings_for(_cfg(tmp_path), {"w": np.ones(3, np.float32)}, 5).num_shares == 3


# -- the protocol over an in-process grid ---------------------------------------------------------


class FakeRuntime:
    """Stands in for SiteRuntime: a site's 'training' is a known affine map of the weights."""

    calls: list[tuple[str, int]] = []
    failing: set[str] = set()
    blow_up: set[str] = set()
    no_bounds = False  # nodes that do not answer the SecAgg+ size-bound query

    def __init__(
        self,
        cfg: Any,
        site_dir: Path,
        alias: str,
        heldout: bool,
        seed: int,
        model_pool: Any = None,
        dataset_pool: Any = None,
    ) -> None:
        self.alias, self.heldout = alias, heldout
        self.log = logging.getLogger("test.secagg")

    def train(self, arrays: dict[str, np.ndarray], server_round: int) -> TrainOutcome:
        FakeRuntime.calls.append((self.alias, server_round))
        if self.heldout or self.alias in FakeRuntime.failing:
            raise RuntimeError("disk failed at /secret/hospital/path")
        factor = 1000.0 if self.alias in FakeRuntime.blow_up else 1.0
        return TrainOutcome(
            {k: (fake_train(self.alias, v) * factor).astype(v.dtype) for k, v in arrays.items()},
            EXAMPLES[self.alias],
            {"train-loss": 0.25},
        )


def fake_train(alias: str, value: np.ndarray) -> np.ndarray:
    index = int(alias[-1])
    return value * (1.0 - 0.1 * index) + 0.01 * (index + 1)


class FakeGrid:
    """Delivers each message to a node handler, copying both ways as a network would."""

    def __init__(self, handlers: dict[int, Callable[[Message], Message]]) -> None:
        self.handlers = handlers
        self.run = SimpleNamespace(run_id=7)
        self.train_replies: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.handlers)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        replies = []
        for message in messages:
            reply = copy.deepcopy(
                self.handlers[message.metadata.dst_node_id](copy.deepcopy(message))
            )
            if message.metadata.message_type == MessageType.TRAIN:
                self.train_replies.append(reply)
            replies.append(reply)
        return replies


def _node(node_id: int, alias: str, cfg: ExperimentConfig) -> Callable[[Message], Message]:
    context = Context(7, node_id, {"alias": alias}, RecordDict(), {})

    def plain_train(msg: Message, ctx: Context) -> Message:
        raise AssertionError("a SecAgg+ message reached the plain train handler")

    def handle(msg: Message) -> Message:
        if msg.metadata.message_type == MessageType.TRAIN:
            return client_secagg.secagg_train_mod(msg, context, plain_train)
        if msg.metadata.message_type.endswith(COUNT_BOUND_ACTION) and not FakeRuntime.no_bounds:
            bound = count_bound(EXAMPLES.get(alias, 0))
            detail = ConfigRecord({"site-alias": alias, COUNT_BOUND_KEY: bound})
            return Message(RecordDict({"detail": detail}), reply_to=msg)
        content = client_app.evaluate_reply_content(alias, 10, {"eval-loss": 0.5}, {}, {})
        return Message(content, reply_to=msg)

    return handle


@pytest.fixture
def protocol(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flower_task_identity: None
) -> Callable[..., Any]:
    """Run the SecAgg+ rounds on fake sites; returns (recorder, grid, initial arrays)."""

    def run(*overrides: str) -> tuple[RoundRecorder, FakeGrid, dict[str, np.ndarray]]:
        cfg = _cfg(tmp_path, *overrides)
        monkeypatch.setattr(client_secagg, "config_for", lambda context: cfg)
        monkeypatch.setattr(client_secagg, "SiteRuntime", FakeRuntime)
        monkeypatch.setattr(
            client_secagg,
            "resolve_site",
            lambda cfg, node_config: (
                tmp_path / "sites" / node_config["alias"],
                node_config["alias"],
            ),
        )
        aliases = {101 + i: alias for i, alias in enumerate(SITES)}
        grid = FakeGrid({n: _node(n, a, cfg) for n, a in aliases.items()})
        rng = np.random.default_rng(0)
        arrays = {
            "conv.weight": rng.normal(0, 0.5, (4, 3, 3)).astype(np.float32),
            "bn.running_var": rng.uniform(0.5, 2.0, 4).astype(np.float32),
        }
        run_dir = RunDirectory(cfg.run_dir)
        run_dir.initialise(cfg)
        recorder = RoundRecorder(
            cfg=cfg,
            run_dir=run_dir,
            node_alias=aliases,
            reference_shapes={k: v.shape for k, v in arrays.items()},
            last_arrays=arrays,
        )
        run_secagg_rounds(grid, Context(7, 0, {}, RecordDict(), {}), recorder, arrays)
        return recorder, grid, arrays

    FakeRuntime.calls, FakeRuntime.failing, FakeRuntime.blow_up = [], set(), set()
    FakeRuntime.no_bounds = False
    return run


def _fedavg(arrays: dict[str, np.ndarray], sites: list[str]) -> dict[str, np.ndarray]:
    total = sum(EXAMPLES[s] for s in sites)
    return {
        k: sum(fake_train(s, v.astype(np.float64)) * EXAMPLES[s] for s in sites) / total
        for k, v in arrays.items()
    }


def _quantisation_bound(secagg_lines: list[dict[str, Any]], sites: list[str]) -> float:
    """Worst case of SecAgg+'s stochastic rounding: under one step 2c/Q per site and round,
    divided by the total weight sum(n)/max_weight; plus float32 rounding of the result."""
    weight = sum(EXAMPLES[s] for s in sites)
    return 1e-7 + sum(
        len(sites) * 2 * m["clipping_range"] / m["quantization_range"] / (weight / m["max_weight"])
        for m in secagg_lines
    )


def _lines(recorder: RoundRecorder) -> list[dict[str, Any]]:
    return recorder.run_dir.read_metrics()


def test_secure_rounds_give_the_weighted_mean_and_no_site_weights(protocol: Any) -> None:
    recorder, grid, initial = protocol()
    training = ["site00", "site01", "site02"]
    expected = _fedavg(_fedavg(initial, training), training)
    lines = _lines(recorder)
    secagg = [m for m in lines if m["phase"] == "secagg"]
    assert recorder.last_arrays is not None
    for key, value in expected.items():
        assert recorder.last_arrays[key].dtype == np.float32
        np.testing.assert_allclose(
            recorder.last_arrays[key], value, rtol=0, atol=_quantisation_bound(secagg, training)
        )
    assert not np.allclose(recorder.last_arrays["conv.weight"], initial["conv.weight"], atol=1e-2)
    assert sorted(FakeRuntime.calls) == sorted((s, r) for s in training for r in (1, 2))
    # Each site answered 4 stages per round; no train reply carried a single array value.
    assert len(grid.train_replies) == 2 * 4 * 3
    for reply in grid.train_replies:
        assert not reply.has_error()
        assert all(len(record) == 0 for record in reply.content.array_records.values())
    trained = {(m["round"], m["site"]) for m in lines if m["phase"] == "train" and m["site"]}
    assert trained == {(r, s) for s in training for r in (1, 2)}
    assert [m["round"] for m in lines if m["phase"] == "heldout"] == [1, 2]
    assert [m["completed"] for m in secagg] == [True, True]
    assert [m["clipped-values"] for m in secagg] == [0, 0]
    checkpoints = sorted(p.name for p in (recorder.run_dir.path / "checkpoints").iterdir())
    assert checkpoints == ["round_0001.ckpt", "round_0002.ckpt"]
    summary = json.loads((recorder.run_dir.path / "secagg.json").read_text())
    assert [r["sites"] for r in summary["rounds"]] == [training, training]


def test_a_site_that_fails_mid_protocol_is_dropped_and_named(protocol: Any) -> None:
    FakeRuntime.failing = {"site01"}
    recorder, grid, initial = protocol("federation.num_rounds=1")
    expected = _fedavg(initial, ["site00", "site02"])
    secagg = [m for m in _lines(recorder) if m["phase"] == "secagg"]
    bound = _quantisation_bound(secagg, ["site00", "site02"])
    for key, value in expected.items():
        np.testing.assert_allclose(recorder.last_arrays[key], value, rtol=0, atol=bound)
    assert recorder.failures == [
        {"round": 1, "phase": "train", "site": "site01", "error": "RuntimeError"}
    ]
    errors = [r for r in grid.train_replies if r.has_error()]
    assert len(errors) == 1 and "/secret" not in errors[0].error.reason


def test_clipping_is_detected_and_recorded(protocol: Any, caplog: pytest.LogCaptureFixture) -> None:
    FakeRuntime.blow_up = {"site02"}
    with caplog.at_level(logging.WARNING, logger="fedmsk.server"):
        recorder, _, _ = protocol("federation.num_rounds=1", "privacy.secagg_max_weight=40")
    (secagg,) = [m for m in _lines(recorder) if m["phase"] == "secagg"]
    assert secagg["clipped-values"] > 0
    assert "clipped" in caplog.text and "secagg_clipping_range" in caplog.text


def test_count_clipped_matches_flowers_quantiser() -> None:
    from flwr.common.secure_aggregation.quantization import quantize

    rng = np.random.default_rng(1)
    arrays = [rng.normal(0, 3, 200), rng.normal(0, 1, (5, 5))]
    ratio = round(30 / 40 * 2**20) / 2**20
    quantised = quantize([a * ratio for a in arrays], 2.0, 2**20)
    at_edge = sum(int(np.count_nonzero((q == 0) | (q == 2**20))) for q in quantised)
    counted = client_secagg.count_clipped(
        arrays, 30, clipping_range=2.0, max_weight=40, quantization_range=2**20
    )
    assert counted > 0 and counted == at_edge


# -- a real Flower simulation ------------------------------------------------------------------


def _overrides(data_root: Path, run_dir: Path) -> list[str]:
    return [
        f"data.root={data_root}",
        "data.synthetic=false",
        "federation=small",
        "federation.num_rounds=1",
        "strategy=fedavg",
        # every site, 10 steps: what privacy=secagg sets (plain FedAvg samples sites by default)
        "strategy.fraction_train=1.0",
        "train.local_steps=10",
        # SecAgg+ keeps the averaged BatchNorm statistics (global ones would leave each site's
        # moments in the clear), so the plain run is compared with that setting too
        "strategy.norm_statistics=average",
        # fp32: bf16 autocast (train.precision=auto on a CPU with native bf16) rounds differently
        # with the thread count, and the two runs here share the cores unevenly
        "train.precision=fp32",
        "model=resnet18_slim",
        "data.image_size=32",
        "train.batch_size=16",
        "evaluation.gradcam=false",
        f"run_dir={run_dir}",
    ]


@pytest.mark.slow
def test_simulated_secagg_run_matches_plain_fedavg(tmp_path: Path) -> None:
    import torch

    from fedmsk.data.synthetic import generate_federation
    from server.app import initial_arrays

    torch.set_num_threads(1)
    root = tmp_path / "fed"
    generate_federation(root, task="xray_fracture", centers=4, seed=3, scale=0.5)
    plain, secure = tmp_path / "plain", tmp_path / "secagg"
    # Both runs at once: most of a tiny run is process start-up and waiting, not computing.
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "fedmsk.cli", "simulate", "--no-report", *extra],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for extra in (_overrides(root, plain), ["privacy=secagg", *_overrides(root, secure)])
    ]
    for run in runs:
        _, errors = run.communicate(timeout=540)
        assert run.returncode == 0, errors[-2000:]

    results = json.loads((secure / "results.json").read_text())
    assert results["run"]["secure_aggregation"] is True
    assert results["sites"]["site03"]["role"] == "heldout"
    lines = [json.loads(x) for x in (secure / "metrics.jsonl").read_text().splitlines()]
    trained = {m["site"] for m in lines if m["phase"] == "train" and m["site"]}
    assert trained == {"site00", "site01", "site02"}
    (secagg,) = [m for m in lines if m["phase"] == "secagg"]
    assert secagg["completed"] is True and secagg["clipped-values"] == 0
    assert (secure / "checkpoints" / "round_0001.ckpt").is_file()

    cfg = compose(_overrides(root, secure))
    start = initial_arrays(cfg)
    with np.load(plain / "final_model.npz") as a, np.load(secure / "final_model.npz") as b:
        assert sorted(a.files) == sorted(b.files) == sorted(start)
        worst = max(float(np.max(np.abs(a[k] - b[k]), initial=0.0)) for k in a.files)
        moved = max(float(np.max(np.abs(a[k] - start[k]), initial=0.0)) for k in a.files)
        moved_secure = max(float(np.max(np.abs(b[k] - start[k]), initial=0.0)) for k in b.files)
        assert all(b[k].dtype == a[k].dtype for k in a.files)
    print(f"max |secagg - fedavg| = {worst:.2e}; max |fedavg - initial| = {moved:.2e}")
    assert worst < 1e-3
    assert moved > 20 * worst and moved_secure > 1e-2


def test_a_site_above_max_weight_drops_out_instead_of_corrupting_the_sum(protocol: Any) -> None:
    """A weight factor above 1 can wrap the masked sum (a finite mean at the wrong scale):
    the site refuses to contribute and names the setting; the others aggregate as usual."""
    biggest = max(EXAMPLES.values())
    largest = max(EXAMPLES, key=EXAMPLES.get)
    FakeRuntime.no_bounds = True  # (with bounds the coordinator would raise max_weight)
    recorder, _, initial = protocol(
        "federation.num_rounds=1", f"privacy.secagg_max_weight={biggest - 1}"
    )
    others = [s for s in ("site00", "site01", "site02") if s != largest]
    expected = _fedavg(initial, others)
    secagg = [m for m in _lines(recorder) if m["phase"] == "secagg"]
    bound = _quantisation_bound(secagg, others)
    for key, value in expected.items():
        np.testing.assert_allclose(recorder.last_arrays[key], value, rtol=0, atol=bound)
    assert {(f["site"], f["error"]) for f in recorder.failures} == {
        (largest, "SecAggWeightOverflow")
    }


def test_the_server_refuses_an_aggregate_whose_weights_overflow() -> None:
    from server.secagg import RoundOutcome, SecAggSettings, _aggregate_problem

    settings = SecAggSettings(
        num_shares=3,
        reconstruction_threshold=2,
        clipping_range=1.0,
        quantization_range=2**20,
        max_weight=100.0,
    )
    sent = {"w": np.full(3, 0.9, np.float32), "bn.running_var": np.ones(3, np.float32)}
    outcome = RoundOutcome()
    outcome.arrays = {"w": np.ones(3, np.float32), "bn.running_var": np.ones(3, np.float32)}
    outcome.sites = [("site00", 50, {}), ("site01", 20_000, {})]
    problem = _aggregate_problem(outcome, settings, sent)
    assert problem is not None and problem.startswith("site01 trained on 20000 examples")
    outcome.sites = [("site00", 50, {}), ("site01", 100, {})]
    assert _aggregate_problem(outcome, settings, sent) is None
    # a sum that wrapped some other way: finite, but three times the size of the sent model
    outcome.arrays = {"w": np.full(3, 2.7, np.float32), "bn.running_var": np.ones(3, np.float32)}
    problem = _aggregate_problem(outcome, settings, sent)
    assert problem is not None and "3.00 times the size" in problem
    # BatchNorm statistics may move a lot in a round and are not compared
    outcome.arrays = {"w": np.ones(3, np.float32), "bn.running_var": np.full(3, 9.0, np.float32)}
    assert _aggregate_problem(outcome, settings, sent) is None


def test_two_training_sites_are_told_that_no_dropout_is_tolerated(
    protocol: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="fedmsk.server"):
        protocol("federation.num_rounds=1", "federation.heldout_sites=[site02,site03]")
    assert "needs every one of them in every round" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedmsk.server"):
        protocol("federation.num_rounds=1")
    assert "needs every one of them" not in caplog.text


def test_max_weight_is_raised_to_the_largest_sites_size_bound(protocol: Any) -> None:
    """A configured max_weight below a site's size no longer costs that site its rounds."""
    biggest = max(EXAMPLES.values())
    recorder, _, initial = protocol(
        "federation.num_rounds=1", f"privacy.secagg_max_weight={biggest - 10}"
    )
    (secagg,) = [m for m in _lines(recorder) if m["phase"] == "secagg"]
    assert secagg["max_weight"] == count_bound(biggest) == 32
    assert not recorder.failures
    sites = ["site00", "site01", "site02"]
    bound = _quantisation_bound([secagg], sites)
    for key, value in _fedavg(initial, sites).items():
        np.testing.assert_allclose(recorder.last_arrays[key], value, rtol=0, atol=bound)
