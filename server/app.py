"""fedmsk ServerApp: the coordinator's side of a federated run.

Runs the same way in the simulation engine and in a SuperLink deployment. Its steps: rebuild
the typed config from the run config, find out which node is which site (a query message),
start (or resume) Flower's strategy loop, then a final two-pass evaluation: the threshold is
locked on the training sites' validation sets, then every site, the held-out center included,
is evaluated at that threshold. Results land in the run directory given by the config, which
must be an absolute path (the ServerApp's working directory is the SuperLink's).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, MessageType
from flwr.serverapp import Grid, ServerApp

from fedmsk.config import (
    ExperimentConfig,
    compose,
    config_hash,
    describe_augmentation,
    describe_input,
    describe_recipe,
    describe_round,
    overrides_from_run_config,
    sampled_privacy_note,
    sites_per_round,
)
from fedmsk.progress import LogLines, ProgressPrinter
from fedmsk.run_dir import RunDirectory, one_line_cause, record_failure_cause
from server.cyclic import NAME as CYCLIC
from server.cyclic import run_cyclic_rounds
from server.discovery import discover_sites
from server.global_statistics import update_global_statistics, wants_global_statistics
from server.messages import PromptGrid, messages_to, to_record
from server.rounds import RoundRecorder, SiteEvaluation, arrays_to_numpy
from server.secagg import run_secagg_rounds
from server.strategies import build_strategy

app = ServerApp()
log = logging.getLogger("fedmsk.server")


class NoRoundAggregated(RuntimeError):
    """Every round of this run ended without an aggregate; the checkpoint stays as it was."""


def initial_arrays(cfg: ExperimentConfig) -> dict[str, np.ndarray]:
    from fedmsk.models import get_arrays, model_from_config
    from fedmsk.training import seed_everything

    seed_everything(cfg.seed)
    model = model_from_config(cfg)
    return get_arrays(model)


def check_heldout(cfg: ExperimentConfig) -> None:
    """A study without an external center reports only internal validation: refuse it unless
    the coordinator says so on purpose."""
    if cfg.federation.heldout_sites or not cfg.federation.require_heldout:
        return
    raise ValueError(
        "federation.heldout_sites is empty: name the held-out (external test) center, or set "
        "federation.require_heldout=false to run without an external test on purpose"
    )


def with_final_statistics(
    grid: Grid, recorder: RoundRecorder, arrays: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The final model with BatchNorm statistics measured at its weights, unless the last
    round's evaluation already gave it them."""
    record = to_record(arrays)
    last_round = recorder.cfg.federation.num_rounds
    if recorder.statistics_round == last_round or not wants_global_statistics(recorder, record):
        return arrays
    if update_global_statistics(grid, recorder, record, last_round - recorder.round_offset + 1):
        recorder.validated = None  # that validation scored the model before these statistics
        return arrays_to_numpy(record)
    return arrays


def evaluate_sites(
    grid: Grid,
    recorder: RoundRecorder,
    arrays: dict[str, np.ndarray],
    node_ids: list[int],
    threshold: float | None,
    tag: int,
) -> list[SiteEvaluation]:
    config: dict[str, Any] = {"server-round": tag}
    if threshold is not None:
        config["threshold"] = float(threshold)
    messages = messages_to(node_ids, to_record(arrays), config, MessageType.EVALUATE)
    recorder.expect("final-evaluate", tag, node_ids)
    replies = list(grid.send_and_receive(messages, timeout=recorder.cfg.federation.round_timeout_s))
    return recorder.collect_evaluations("final-evaluate", tag, replies)


def last_round_validated_everywhere(recorder: RoundRecorder, training_nodes: list[int]) -> bool:
    """Whether this run's validation after the last round answered at every training site
    (a resumed run that restarts after its last checkpoint has not validated)."""
    if recorder.validated is None:
        return False
    round_no, sites = recorder.validated
    wanted = {recorder.alias_of(n) for n in training_nodes}
    return round_no == recorder.cfg.federation.num_rounds and bool(wanted) and wanted <= sites


def final_evaluation(
    grid: Grid, recorder: RoundRecorder, arrays: dict[str, np.ndarray]
) -> dict[str, Any]:
    """Lock the threshold on federated validation, then evaluate every site at it.

    When the last round's validation already scored this model at every training site, its
    threshold stands: asking the sites again would return the same histograms and, in a
    deployment, start one more ClientApp process on every node.
    """
    tag = recorder.cfg.federation.num_rounds - recorder.round_offset + 1
    training_nodes = recorder.training_node_ids()
    if not last_round_validated_everywhere(recorder, training_nodes):
        validation = evaluate_sites(grid, recorder, arrays, training_nodes, None, tag)
        recorder.lock_threshold(validation)
    all_nodes = sorted(recorder.node_alias, key=recorder.alias_of)
    evaluations = evaluate_sites(grid, recorder, arrays, all_nodes, recorder.threshold, tag + 1)
    sites = {
        ev.alias: {
            "role": ev.role,
            "split": "test" if ev.role == "heldout" else "val",
            "n": ev.num_examples,
            "summary": ev.summary,
            **({"trained_in": ev.trained_in} if ev.trained_in else {}),
        }
        for ev in evaluations
    }
    recorder.log_evaluations(evaluations, recorder.cfg.federation.num_rounds, prefix="final-")
    return sites


def write_results(
    recorder: RoundRecorder, sites: dict[str, Any], seconds: float, ignored_nodes: list[int]
) -> None:
    from fedmsk.models import model_label
    from fedmsk.precision import describe_precisions

    cfg = recorder.cfg
    recorder.run_dir.write_json(
        "results.json",
        {
            "run": {
                "mode": "federated",
                "strategy": cfg.strategy.name,
                "model": model_label(cfg.model),
                "task": cfg.task.name,
                "classes": list(cfg.task.classes),
                "rounds": cfg.federation.num_rounds,
                "each_round": describe_round(cfg, len(recorder.training_node_ids())),
                "recipe": describe_recipe(cfg),
                "augmentation": describe_augmentation(cfg),
                "input": describe_input(cfg),
                "precision": describe_precisions(
                    {a: s.get("trained_in") for a, s in sites.items() if s.get("role") == "train"}
                ),
                "config_hash": config_hash(cfg),
                "privacy": "dp" if cfg.privacy.enabled else "none",
                **({"privacy_unit": str(cfg.privacy.unit)} if cfg.privacy.enabled else {}),
                "secure_aggregation": cfg.privacy.secure_aggregation,
                "training_sites": sorted(
                    a for a in recorder.node_alias.values() if not recorder.is_heldout(a)
                ),
                "heldout_sites": sorted(
                    a for a in recorder.node_alias.values() if recorder.is_heldout(a)
                ),
                "seconds": round(seconds, 1),
                # connected nodes not registered for a site of this study: sent nothing
                "ignored_nodes": ignored_nodes,
            },
            "threshold": {"value": recorder.threshold, "source": recorder.threshold_source},
            "sites": sites,
            "failures": recorder.failures,
            "privacy": recorder.privacy,
        },
    )


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = compose(overrides_from_run_config(dict(context.run_config)))
    try:
        run_federation(grid, context, cfg)
    except Exception as exc:
        # the launcher prints this one line, a deployment's `flwr run --stream` shows it;
        # Flower's log keeps the traceback
        record_failure_cause(cfg.run_dir, exc)
        log.error("fedmsk run failed: %s", one_line_cause(exc))
        raise


def run_federation(grid: Grid, context: Context, cfg: ExperimentConfig) -> None:
    started = time.monotonic()
    # replies without Flower's 3-s polling; model arrays packed (fedmsk/wire.py) except under
    # SecAgg+, whose masking works on the arrays as Flower's workflow sends them
    grid = PromptGrid(grid, pack=not cfg.privacy.secure_aggregation)  # type: ignore[assignment]
    if not Path(cfg.run_dir).is_absolute():
        raise ValueError(f"run_dir={cfg.run_dir!r} must be an absolute path for a federated run")
    check_heldout(cfg)
    run_dir = RunDirectory(cfg.run_dir, tensorboard=cfg.evaluation.tensorboard)
    writer = run_dir.lock_for_writing()  # refuses while a killed run's process still writes
    checkpoint = run_dir.checkpoint_for_resume(cfg) if cfg.resume else None
    run_dir.initialise(cfg)
    discovery = discover_sites(grid, cfg)
    node_alias = discovery.node_alias
    arrays = checkpoint.arrays if checkpoint else initial_arrays(cfg)
    recorder = RoundRecorder(
        cfg=cfg,
        run_dir=run_dir,
        node_alias=node_alias,
        reference_shapes={k: tuple(v.shape) for k, v in arrays.items()},
        round_offset=checkpoint.round if checkpoint else 0,
        threshold=checkpoint.threshold if checkpoint else cfg.evaluation.fixed_threshold,
        last_arrays=arrays,
    )
    run_dir.truncate_metrics_after(checkpoint.round if checkpoint else 0)
    if checkpoint:
        recorder.restore_history(run_dir.read_metrics())
    training = recorder.training_node_ids()
    remaining = cfg.federation.num_rounds - recorder.round_offset
    progress = ProgressPrinter(
        total=cfg.federation.num_rounds,
        expected_sites=sites_per_round(cfg, len(training)),
        stream=LogLines(log),
    )
    run_dir.observers.append(progress.feed_one)  # round lines in `flwr run --stream`
    note = sampled_privacy_note(cfg, len(training))
    if note:
        log.info(note)
    if cfg.privacy.secure_aggregation:
        run_secagg_rounds(grid, context, recorder, arrays)
    elif cfg.strategy.name == CYCLIC and remaining > 0:
        run_cyclic_rounds(grid, recorder, arrays)
    elif remaining > 0:
        strategy = build_strategy(
            cfg.strategy, len(training), len(node_alias), recorder.replies_needed()
        )
        strategy.attach(recorder)
        if checkpoint:
            strategy.import_state(checkpoint.strategy_state)
        strategy.start(
            grid=grid,
            initial_arrays=to_record(arrays),
            num_rounds=remaining,
            timeout=cfg.federation.round_timeout_s,
            train_config=ConfigRecord({"num-rounds": cfg.federation.num_rounds}),
        )
    if remaining > 0 and not recorder.aggregated_rounds:
        raise NoRoundAggregated(recorder.no_aggregation_summary(remaining))
    final = recorder.last_arrays if recorder.last_arrays is not None else arrays
    final = with_final_statistics(grid, recorder, final)
    np.savez(run_dir.path / "final_model.npz", **final)
    sites = final_evaluation(grid, recorder, final)
    write_results(recorder, sites, time.monotonic() - started, discovery.ignored_nodes)
    writer.release()
    log.info("fedmsk run finished: %s", run_dir.path.name)
