"""The server's screening of replies: failures, timeouts and bad updates are recorded."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedmsk.config import compose
from fedmsk.run_dir import RunDirectory
from server.messages import to_record
from server.rounds import RoundRecorder, describe_error

SHAPES = {"w": (2, 3), "b": (3,)}


@pytest.fixture(autouse=True)
def _identity(flower_task_identity: None) -> None:
    return None


def _recorder(tmp_path: Path) -> RoundRecorder:
    cfg = compose(
        [f"run_dir={tmp_path}", "federation.sites=[a,b,c,h]", "federation.heldout_sites=[h]"]
    )
    return RoundRecorder(
        cfg=cfg,
        run_dir=RunDirectory(tmp_path),
        node_alias={1: "a", 2: "b", 3: "c", 4: "h"},
        reference_shapes=SHAPES,
    )


def _reply(
    node: int, arrays: dict[str, np.ndarray] | None = None, error: str | None = None
) -> Message:
    request = Message(
        RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type="train"
    )
    if error is not None:
        return Message(Error(code=9001, reason=error), reply_to=request)
    record = ArrayRecord(OrderedDict((k, Array(v)) for k, v in (arrays or {}).items()))
    return Message(
        RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": 10})}),
        reply_to=request,
    )


def _good() -> dict[str, np.ndarray]:
    return {"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)}


def test_heldout_site_is_never_a_training_node(tmp_path: Path) -> None:
    assert _recorder(tmp_path).training_node_ids() == [1, 2, 3]


def test_bad_updates_errors_and_timeouts_are_recorded_not_aggregated(tmp_path: Path) -> None:
    recorder = _recorder(tmp_path)
    recorder.expect("train", 1, [1, 2, 3])
    nan = _good()
    nan["w"][0, 0] = np.nan
    replies = [_reply(2, nan), _reply(1, _good())]
    wrong = {"w": np.ones((3, 2), np.float32), "b": np.zeros(3, np.float32)}
    accepted = recorder.screen_train_replies(1, [*replies, _reply(3, wrong)])
    assert [m.metadata.src_node_id for m in accepted] == [1]
    errors = {f["site"]: f["error"] for f in recorder.failures}
    assert errors["b"].startswith("RejectedUpdate: non-finite")
    assert errors["c"].startswith("RejectedUpdate: shape of w")
    recorder2 = _recorder(tmp_path)
    recorder2.expect("train", 1, [1, 2, 3])
    recorder2.screen_train_replies(
        1, [_reply(1, _good()), _reply(2, error="site=b error=ValueError")]
    )
    assert {(f["site"], f["error"]) for f in recorder2.failures} == {
        ("b", "ValueError"),
        ("c", "Timeout"),
    }
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(x["phase"] == "train-failure" and x["site"] == "c" for x in lines)


def test_enough_replies_follows_the_configured_fraction(tmp_path: Path) -> None:
    recorder = _recorder(tmp_path)
    assert recorder.enough_replies([_reply(1, _good()), _reply(2, _good())])
    assert not recorder.enough_replies([_reply(1, _good())])


def test_error_text_is_reduced_to_its_class() -> None:
    assert describe_error("site=x error=KeyError") == "KeyError"
    flower = "<class 'FileNotFoundError'>:<'/data/PATIENT123/img.dcm'>"
    assert describe_error(flower) == "FileNotFoundError"
    assert describe_error("something /secret/path") == "ClientAppError"


def test_only_rounds_that_aggregated_count_and_the_summary_names_failed_sites(
    tmp_path: Path,
) -> None:
    recorder = _recorder(tmp_path)
    recorder.record_failure(1, "b", "train", "Timeout")
    recorder.record_failure(2, "b", "train", "Timeout")
    recorder.record_failure(2, "c", "train", "SiteUnavailableError")
    recorder.record_skipped_round(1, 1)
    recorder.on_train_aggregated(1, to_record(_good()), None, {})  # cyclic keeps its model
    assert recorder.aggregated_rounds == 0
    summary = recorder.no_aggregation_summary(2)
    assert summary.startswith("no round aggregated: 2 round(s) ran")
    assert "b (Timeout) x2" in summary and "c (SiteUnavailableError)" in summary
    recorder.on_train_aggregated(2, to_record(_good()), None, {})
    assert recorder.aggregated_rounds == 1


def test_a_resumed_run_keeps_the_failures_and_privacy_of_earlier_rounds(tmp_path: Path) -> None:
    first = _recorder(tmp_path)
    first.record_failure(1, "b", "train", "Timeout")
    first.run_dir.append_metrics(
        {"round": 1, "phase": "train", "site": "a", "epsilon": 1.5, "delta": 1e-5}
    )
    first.run_dir.append_metrics({"round": 2, "phase": "train", "site": "a", "epsilon": 2.25})
    resumed = _recorder(tmp_path)
    resumed.restore_history(resumed.run_dir.read_metrics())
    assert resumed.failures == first.failures
    assert resumed.privacy == {"a": {"epsilon": 2.25, "delta": 1e-5}}


def test_a_run_without_an_external_center_is_refused_unless_asked_for() -> None:
    from server.app import check_heldout

    with pytest.raises(ValueError, match="federation.heldout_sites is empty.*require_heldout"):
        check_heldout(compose(["federation.sites=[a,b]"]))
    check_heldout(compose(["federation.sites=[a,b]", "federation.require_heldout=false"]))
    check_heldout(compose(["federation.sites=[a,b]", "federation.heldout_sites=[b]"]))


class AnsweringGrid:
    """Answers every evaluate message at once; records which nodes each batch went to."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids
        self.batches: list[list[int]] = []

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def send_and_receive(self, messages: list[Message], timeout: float | None = None) -> list:
        self.batches.append(sorted(m.metadata.dst_node_id for m in messages))
        return [_evaluation_reply(m.metadata.dst_node_id) for m in messages]


def _evaluation_reply(node: int, trained_in: str | None = None) -> Message:
    request = Message(
        RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type="evaluate"
    )
    fields = {"summary": json.dumps({"auc": 0.8}), "histogram": json.dumps({})}
    if trained_in is not None:
        fields["trained-in"] = trained_in
    detail = ConfigRecord(fields)
    metrics = MetricRecord({"num-examples": 10, "auc": 0.8})
    return Message(RecordDict({"metrics": metrics, "detail": detail}), reply_to=request)


@pytest.mark.parametrize(
    ("validated_round", "answering", "batches"),
    [
        # the last round's validation answered everywhere: only the final scoring is sent
        (3, [1, 2, 3], [[1, 2, 3, 4]]),
        # an earlier round's, or one a site missed, does not stand for the final model
        (2, [1, 2, 3], [[1, 2, 3], [1, 2, 3, 4]]),
        (3, [1, 2], [[1, 2, 3], [1, 2, 3, 4]]),
        (None, [], [[1, 2, 3], [1, 2, 3, 4]]),
    ],
)
def test_final_evaluation_reuses_the_last_rounds_validation(
    tmp_path: Path, validated_round: int | None, answering: list[int], batches: list[list[int]]
) -> None:
    from server.app import final_evaluation

    recorder = _recorder(tmp_path)
    recorder.cfg.federation.num_rounds = 3
    if validated_round is not None:
        recorder.expect("evaluate", validated_round, answering)
        recorder.on_evaluate_replies(validated_round, [_evaluation_reply(n) for n in answering])
    grid = AnsweringGrid([1, 2, 3, 4])
    sites = final_evaluation(grid, recorder, _good())  # type: ignore[arg-type]
    assert grid.batches == batches
    assert sorted(sites) == ["a", "b", "c", "h"] and sites["h"]["split"] == "test"


def test_final_statistics_measured_after_the_last_round_void_its_validation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last round's validation stands for the final model only if nothing changed it."""
    import server.app as app

    recorder = _recorder(tmp_path)
    recorder.cfg.federation.num_rounds = 3
    recorder.expect("evaluate", 3, [1, 2, 3])
    recorder.on_evaluate_replies(3, [_evaluation_reply(n) for n in (1, 2, 3)])
    assert recorder.validated == (3, frozenset({"a", "b", "c"}))
    monkeypatch.setattr(app, "wants_global_statistics", lambda *_: True)
    monkeypatch.setattr(app, "update_global_statistics", lambda *_: True)
    app.with_final_statistics(AnsweringGrid([1, 2, 3, 4]), recorder, _good())  # type: ignore[arg-type]
    grid = AnsweringGrid([1, 2, 3, 4])
    app.final_evaluation(grid, recorder, _good())  # type: ignore[arg-type]
    assert grid.batches == [[1, 2, 3], [1, 2, 3, 4]]


def test_global_statistics_are_never_asked_under_secure_aggregation_or_dp(
    tmp_path: Path,
) -> None:
    """A site's BatchNorm moments would reach the coordinator in the clear."""
    from flwr.app import Array, ArrayRecord

    from server.global_statistics import wants_global_statistics

    arrays = ArrayRecord({"bn1.running_mean": Array(np.zeros(4, dtype=np.float32))})
    recorder = _recorder(tmp_path)
    assert wants_global_statistics(recorder, arrays)
    recorder.cfg.privacy.secure_aggregation = True
    assert not wants_global_statistics(recorder, arrays)
    recorder.cfg.privacy.secure_aggregation = False
    recorder.cfg.privacy.enabled = True
    assert not wants_global_statistics(recorder, arrays)


def test_a_crashed_nodes_dropout_is_recorded_against_its_site(tmp_path: Path) -> None:
    """For a node that stopped sending heartbeats the SuperLink itself answers, as sender
    "node 1" (flwr's own function builds that reply here): the recorder must still name the
    site, as Unreachable, not a Timeout of the site plus a failure of a "node-1"."""
    from flwr.server.superlink.linkstate.utils import (
        create_message_error_unavailable_res_message,
    )

    from server.messages import exchange, messages_to

    class CrashedNodeGrid:
        def __init__(self) -> None:
            self.pushed: dict[str, Message] = {}

        def push_messages(self, messages: list[Message]) -> list[str]:
            ids = []
            for i, message in enumerate(messages):
                message.metadata.__dict__["_message_id"] = f"m{i}"
                self.pushed[f"m{i}"] = message
                ids.append(f"m{i}")
            return ids

        def pull_messages(self, ids: set[str]) -> list[Message]:
            replies = []
            for mid in sorted(ids):
                request = self.pushed[mid]
                if request.metadata.dst_node_id == 2:  # site b's node crashed
                    replies.append(
                        create_message_error_unavailable_res_message(
                            request.metadata, "node_unavail"
                        )
                    )
                else:
                    arrays = to_record(_good())
                    replies.append(
                        Message(
                            RecordDict(
                                {"arrays": arrays, "metrics": MetricRecord({"num-examples": 10})}
                            ),
                            reply_to=request,
                        )
                    )
            return replies

    recorder = _recorder(tmp_path)
    recorder.expect("train", 1, [1, 2, 3])
    replies = exchange(CrashedNodeGrid(), messages_to([1, 2, 3], None, {}, "train"), timeout=5)
    assert sorted(m.metadata.src_node_id for m in replies) == [1, 2, 3]
    accepted = recorder.screen_train_replies(1, replies)
    assert [m.metadata.src_node_id for m in accepted] == [1, 3]
    assert [(f["site"], f["error"]) for f in recorder.failures] == [("b", "Unreachable")]


def test_the_run_records_what_each_node_trained_in_and_drops_unknown_names(
    tmp_path: Path,
) -> None:
    """Runs in bf16 and fp32 take different paths: results.json says which centers used which."""
    from server.app import final_evaluation, write_results

    class Replying(AnsweringGrid):
        def send_and_receive(self, messages: list[Message], timeout: float | None = None) -> list:
            said = {1: "bf16", 2: "fp32", 3: "<b>fp64</b>", 4: None}
            return [
                _evaluation_reply(m.metadata.dst_node_id, said[m.metadata.dst_node_id])
                for m in messages
            ]

    recorder = _recorder(tmp_path)
    recorder.cfg.federation.num_rounds = 1
    sites = final_evaluation(Replying([1, 2, 3, 4]), recorder, _good())  # type: ignore[arg-type]
    assert sites["a"]["trained_in"] == "bf16" and sites["b"]["trained_in"] == "fp32"
    assert "trained_in" not in sites["c"] and "trained_in" not in sites["h"]
    write_results(recorder, sites, 1.0, [])
    run = json.loads((tmp_path / "results.json").read_text())["run"]
    assert run["precision"] == "fp32 at 1 center, bf16 at 1 center, not reported by 1"


def test_a_federation_in_one_precision_is_recorded_as_that_precision() -> None:
    from fedmsk.precision import describe_precisions

    assert describe_precisions({"a": "bf16", "b": "bf16"}) == "bf16"
    assert describe_precisions({"a": "fp32", "b": "bf16", "c": "bf16"}) == (
        "fp32 at 1 center, bf16 at 2 centers"
    )
    assert describe_precisions({"a": None}) is None
