"""Server-side bookkeeping of a federated run: who is who, what came back, what is kept.

The :class:`RoundRecorder` is the strategy's memory between hooks. It maps Flower node IDs to
site aliases, screens replies (errors, timeouts, wrong shapes, non-finite values), locks the
decision threshold on the federated validation sets, and writes metrics.jsonl lines and a
checkpoint after every round. It never sees an image, a path or a per-image score: only what
``client/app.py`` lets leave a node.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.constant import ErrorCode

from fedmsk.config import ExperimentConfig, config_hash, sites_per_round
from fedmsk.run_dir import Checkpoint, RunDirectory

log = logging.getLogger("fedmsk.server")

_SITE_ERROR = re.compile(r"site=([A-Za-z0-9_.-]+) error=([A-Za-z0-9_]+)")


def arrays_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def describe_error(reason: str) -> str:
    """The error class from a reply's reason; anything else in the text is dropped."""
    match = _SITE_ERROR.search(reason or "")
    if match:
        return match.group(2)
    class_name = re.search(r"<class '([A-Za-z0-9_.]+)'>", reason or "")
    return class_name.group(1).rsplit(".", 1)[-1] if class_name else "ClientAppError"


def reply_error(message: Message) -> str:
    """What went wrong with an error reply, in one word: ``Unreachable`` where the SuperLink
    answered for a node that stopped sending heartbeats (crashed, switched off, cut off),
    otherwise the error class the node reported."""
    if message.error.code == ErrorCode.NODE_UNAVAILABLE:
        return "Unreachable"
    return describe_error(message.error.reason)


def _reported_precision(detail: Any) -> str | None:
    """A node's training precision, kept only when it is one of the known names."""
    from fedmsk.precision import PRECISION_NAMES

    value = str(detail["trained-in"]) if "trained-in" in detail else None
    return value if value in PRECISION_NAMES else None


@dataclass
class SiteEvaluation:
    alias: str
    role: str
    num_examples: int
    summary: dict[str, Any]
    histogram: dict[str, Any]
    metrics: dict[str, float]
    trained_in: str | None = None  # fp32 / bf16 / fp16 as the node reported; None: not given


@dataclass
class RoundRecorder:
    cfg: ExperimentConfig
    run_dir: RunDirectory
    node_alias: dict[int, str]
    reference_shapes: dict[str, tuple[int, ...]]
    round_offset: int = 0
    threshold: float = 0.5
    threshold_source: str = "fixed"
    failures: list[dict[str, Any]] = field(default_factory=list)
    expected: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    latest_evaluations: dict[str, SiteEvaluation] = field(default_factory=dict)
    privacy: dict[str, dict[str, float]] = field(default_factory=dict)
    last_arrays: dict[str, np.ndarray] | None = None
    statistics_round: int | None = None
    # (absolute round, training sites) of the latest per-round validation: the final evaluation
    # reuses it for the threshold when it scored the final model at every training site
    validated: tuple[int, frozenset[str]] | None = None
    aggregated_rounds: int = 0
    skipped_rounds: set[int] = field(default_factory=set)
    _last_checkpoint: Checkpoint | None = None

    # -- sites -----------------------------------------------------------------------------

    def alias_of(self, node_id: int) -> str:
        return self.node_alias.get(node_id, f"node-{node_id}")

    def is_heldout(self, alias: str) -> bool:
        return alias in self.cfg.federation.heldout_sites

    def training_node_ids(self) -> list[int]:
        return sorted(
            (n for n, a in self.node_alias.items() if not self.is_heldout(a)),
            key=self.alias_of,
        )

    def absolute_round(self, server_round: int) -> int:
        return server_round + self.round_offset

    def evaluates_round(self, server_round: int) -> bool:
        """Validation after every ``evaluation.every_rounds``-th round and after the last."""
        absolute = self.absolute_round(server_round)
        every = max(1, self.cfg.evaluation.every_rounds)
        return absolute % every == 0 or absolute >= self.cfg.federation.num_rounds

    def per_round_evaluation_node_ids(self) -> list[int]:
        """Training sites; the held-out center only with ``evaluation.heldout_each_round``."""
        if self.cfg.evaluation.heldout_each_round:
            return sorted(self.node_alias, key=self.alias_of)
        return self.training_node_ids()

    def restore_history(self, rows: list[dict[str, Any]]) -> None:
        """A resumed run continues the record of the rounds before its checkpoint: their
        failures and each site's latest privacy figures, read back from metrics.jsonl."""
        for row in sorted(rows, key=lambda r: int(r.get("round") or 0)):
            phase, site = str(row.get("phase", "")), row.get("site")
            if phase.endswith("-failure") and site is not None:
                self.failures.append(
                    {
                        "round": int(row.get("round") or 0),
                        "phase": phase.removesuffix("-failure"),
                        "site": str(site),
                        "error": str(row.get("error", "")),
                    }
                )
            elif site is not None and "epsilon" in row:
                self.privacy.setdefault(str(site), {}).update(
                    {
                        k: v
                        for k, v in row.items()
                        if k.startswith(("epsilon", "delta", "budget"))
                        and isinstance(v, int | float)
                    }
                )

    # -- replies ---------------------------------------------------------------------------

    def expect(self, phase: str, server_round: int, node_ids: list[int]) -> None:
        self.expected[(phase, server_round)] = list(node_ids)

    def record_failure(self, server_round: int, alias: str, phase: str, error: str) -> None:
        entry = {
            "round": self.absolute_round(server_round),
            "phase": phase,
            "site": alias,
            "error": error,
        }
        self.failures.append(entry)
        self.run_dir.append_metrics({**entry, "phase": f"{phase}-failure"})
        log.warning("round %s: %s %s failed (%s)", entry["round"], alias, phase, error)

    def answered_replies(
        self, phase: str, server_round: int, replies: list[Message]
    ) -> list[Message]:
        """Record error replies and missing replies; return the ones with content."""
        answered = {m.metadata.src_node_id for m in replies}
        for node_id in self.expected.get((phase, server_round), []):
            if node_id not in answered:
                self.record_failure(server_round, self.alias_of(node_id), phase, "Timeout")
        good = []
        for msg in replies:
            if msg.has_error():
                error = reply_error(msg)
                self.record_failure(
                    server_round, self.alias_of(msg.metadata.src_node_id), phase, error
                )
            else:
                good.append(msg)
        return sorted(good, key=lambda m: self.alias_of(m.metadata.src_node_id))

    def screen_train_replies(self, server_round: int, replies: list[Message]) -> list[Message]:
        accepted = []
        for msg in self.answered_replies("train", server_round, replies):
            alias = self.alias_of(msg.metadata.src_node_id)
            problem = self._update_problem(msg)
            if problem:
                self.record_failure(server_round, alias, "train", f"RejectedUpdate: {problem}")
                continue
            metrics = dict(msg.content["metrics"]) if "metrics" in msg.content else {}
            self.run_dir.append_metrics(
                {"round": self.absolute_round(server_round), "phase": "train", "site": alias}
                | {k: v for k, v in metrics.items() if isinstance(v, int | float)}
            )
            if "epsilon" in metrics:
                self.privacy.setdefault(alias, {})["epsilon"] = float(metrics["epsilon"])
            accepted.append(msg)
        return accepted

    def _update_problem(self, msg: Message) -> str | None:
        records = list(msg.content.array_records.values())
        if len(records) != 1:
            return f"expected one array record, got {len(records)}"
        arrays = records[0]
        if set(arrays.keys()) != set(self.reference_shapes):
            return "array names differ from the global model"
        for key, array in arrays.items():
            value = array.numpy()
            if tuple(value.shape) != self.reference_shapes[key]:
                return (
                    f"shape of {key} is {tuple(value.shape)}, expected {self.reference_shapes[key]}"
                )
            if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
                return f"non-finite values in {key}"
        return None

    def replies_needed(self) -> int:
        """Training sites a round must aggregate: ``federation.min_reply_fraction`` of the sites
        it asks (a sampled round asks only some), at least 1."""
        fraction = self.cfg.federation.min_reply_fraction
        return max(
            1, math.ceil(fraction * sites_per_round(self.cfg, len(self.training_node_ids())))
        )

    def enough_replies(self, accepted: list[Message]) -> bool:
        return len(accepted) >= self.replies_needed()

    def record_skipped_round(self, server_round: int, received: int) -> None:
        self.skipped_rounds.add(server_round)
        self.run_dir.append_metrics(
            {
                "round": self.absolute_round(server_round),
                "phase": "train-skipped",
                "site": None,
                "accepted": received,
            }
        )

    def no_aggregation_summary(self, rounds: int) -> str:
        """Why nothing was aggregated, in one line: what was needed and which sites failed."""
        training = len(self.training_node_ids())
        needed = self.replies_needed()
        causes: dict[str, int] = {}
        for entry in self.failures:
            if entry["phase"] == "train":
                key = f"{entry['site']} ({entry['error']})"
                causes[key] = causes.get(key, 0) + 1
        shown = ", ".join(f"{k} x{n}" if n > 1 else k for k, n in list(causes.items())[:6])
        more = f" and {len(causes) - 6} more" if len(causes) > 6 else ""
        return (
            f"no round aggregated: {rounds} round(s) ran and none had the {needed} of "
            f"{training} training sites' updates it needs (federation.min_reply_fraction="
            f"{self.cfg.federation.min_reply_fraction}); failed: {shown or 'none recorded'}{more}"
        )

    # -- after aggregation -----------------------------------------------------------------

    def on_train_aggregated(
        self,
        server_round: int,
        arrays: ArrayRecord | None,
        metrics: MetricRecord | None,
        strategy_state: dict[str, Any],
    ) -> None:
        absolute = self.absolute_round(server_round)
        if arrays is not None and server_round not in self.skipped_rounds:
            self.aggregated_rounds += 1
        if arrays is not None:
            self.last_arrays = arrays_to_numpy(arrays)
        numbers = {k: v for k, v in dict(metrics or {}).items() if isinstance(v, int | float)}
        self.run_dir.append_metrics({"round": absolute, "phase": "train", "site": None} | numbers)
        assert self.last_arrays is not None
        self._last_checkpoint = Checkpoint(
            round=absolute,
            arrays=self.last_arrays,
            strategy_state=strategy_state,
            config_hash=config_hash(self.cfg),
            threshold=self.threshold,
        )
        self.run_dir.save_checkpoint(self._last_checkpoint)

    def on_statistics_updated(self, server_round: int, arrays: ArrayRecord) -> None:
        """The round's model got BatchNorm statistics measured at its weights: it becomes the
        run's current model and its checkpoint is rewritten (the strategy's own copy of the
        record was updated in place), so a resumed run starts from exactly this model."""
        self.last_arrays = arrays_to_numpy(arrays)
        self.statistics_round = self.absolute_round(server_round)
        previous = self._last_checkpoint
        if previous is not None and previous.round == self.statistics_round:
            previous.arrays = self.last_arrays
            self.run_dir.save_checkpoint(previous)

    def on_evaluate_replies(self, server_round: int, replies: list[Message]) -> MetricRecord | None:
        evaluations = self.collect_evaluations("evaluate", server_round, replies)
        absolute = self.absolute_round(server_round)
        self.log_evaluations(evaluations, absolute)
        self.lock_threshold(evaluations)
        validation = [e for e in evaluations if e.role == "train"]
        self.validated = (absolute, frozenset(e.alias for e in validation))
        total = sum(e.num_examples for e in validation)
        if not total:
            return None
        mean = {
            key: sum(e.metrics.get(key, 0.0) * e.num_examples for e in validation) / total
            for key in ("auc", "top1_accuracy", "eval-loss")
            if all(key in e.metrics for e in validation)
        }
        self.run_dir.append_metrics(
            {"round": absolute, "phase": "val", "site": None, "n": total} | mean
        )
        return MetricRecord({"num-examples": total, **mean})

    def log_evaluations(
        self, evaluations: list[SiteEvaluation], round_no: int, prefix: str = ""
    ) -> None:
        """One metrics.jsonl line per site: phase ``val`` or ``heldout`` (with ``prefix``)."""
        for ev in evaluations:
            phase = "heldout" if ev.role == "heldout" else "val"
            self.run_dir.append_metrics(
                {"round": round_no, "phase": prefix + phase, "site": ev.alias, "n": ev.num_examples}
                | ev.metrics
            )

    def collect_evaluations(
        self, phase: str, server_round: int, replies: list[Message]
    ) -> list[SiteEvaluation]:
        evaluations = []
        for msg in self.answered_replies(phase, server_round, replies):
            alias = self.alias_of(msg.metadata.src_node_id)
            metrics = {
                k: float(v)
                for k, v in dict(msg.content["metrics"]).items()
                if isinstance(v, int | float) and k != "num-examples"
            }
            detail = msg.content["detail"]
            ev = SiteEvaluation(
                alias=alias,
                role="heldout" if self.is_heldout(alias) else "train",
                num_examples=int(msg.content["metrics"]["num-examples"]),
                summary=json.loads(str(detail["summary"])),
                histogram=json.loads(str(detail["histogram"])),
                metrics=metrics,
                trained_in=_reported_precision(detail),
            )
            if "epsilon" in metrics:
                self.privacy.setdefault(alias, {}).update(
                    {
                        k: v
                        for k, v in metrics.items()
                        if k.startswith(("epsilon", "delta", "budget"))
                    }
                )
            self.latest_evaluations[alias] = ev
            evaluations.append(ev)
        return evaluations

    def lock_threshold(self, evaluations: list[SiteEvaluation]) -> None:
        """Youden threshold on the summed validation histograms of the training sites."""
        if self.cfg.evaluation.threshold != "youden" or not self.cfg.task.is_binary:
            self.threshold = float(self.cfg.evaluation.fixed_threshold)
            self.threshold_source = "fixed"
            return
        histograms = [e.histogram for e in evaluations if e.role == "train" and e.histogram]
        if histograms:
            from fedmsk.evaluation import locked_threshold

            self.threshold, self.threshold_source = locked_threshold(
                histograms, self.cfg.evaluation.fixed_threshold
            )
