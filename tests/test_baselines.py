"""Pooled and local-only baselines on the federation's splits, the comparison table, sweeps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedmsk.centralized import run_centralized
from fedmsk.commands.simulate import expand_sweep, prepare
from fedmsk.comparison import heldout_scores, write_comparison
from fedmsk.config import dedupe_overrides
from fedmsk.data.synthetic import generate_federation
from fedmsk.evaluation import summarize


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("baselines") / "fed"
    generate_federation(root, task="xray_fracture", centers=3, seed=5, scale=0.4)
    return root


def _cfg(fed: Path, run_dir: Path):  # noqa: ANN202
    return prepare(
        [
            f"data.root={fed}",
            "data.synthetic=false",
            "federation.num_rounds=1",
            "model=resnet18",
            "data.image_size=32",
            f"run_dir={run_dir}",
        ]
    ).cfg


def test_prepare_names_sites_and_heldout_from_federation_json(fed: Path, tmp_path: Path) -> None:
    cfg = _cfg(fed, tmp_path / "r")
    assert cfg.federation.sites == ["site00", "site01", "site02"]
    assert cfg.federation.heldout_sites == ["site02"]
    assert Path(cfg.run_dir).is_absolute() and Path(cfg.data.root).is_absolute()


def test_pooled_and_local_runs_feed_one_comparison_table(fed: Path, tmp_path: Path) -> None:
    pooled = run_centralized(_cfg(fed, tmp_path / "pooled"), "pooled")
    local = run_centralized(_cfg(fed, tmp_path / "local"), "local", "site01")
    for run, mode, trained in (
        (pooled, "pooled", ["site00", "site01"]),
        (local, "local", ["site01"]),
    ):
        results = json.loads((run / "results.json").read_text())
        assert results["run"]["mode"] == mode
        assert results["run"]["training_sites"] == trained
        assert results["sites"]["site02"]["role"] == "heldout"
        assert results["sites"]["site02"]["n"] > 0
    paths = write_comparison(tmp_path / "cmp", {"pooled": pooled, "local:site01": local})
    table = paths["markdown"].read_text()
    assert "| pooled |" in table and "| local:site01 |" in table and "site02" in table
    rows = json.loads(paths["json"].read_text())["rows"]
    assert [r["method"] for r in rows] == ["pooled", "local:site01"]


def test_a_bf16_run_records_it_and_reports_fp32_scores(fed: Path, tmp_path: Path) -> None:
    """The run's own held-out figures equal an fp32 re-score of its final model (the scores
    `fedmsk compare` and the studies compute), whatever precision it trained in."""
    cfg = _cfg(fed, tmp_path / "bf16")
    cfg.train.precision = "bf16"
    cfg.train.lr = 1e-6  # scores near the initial model's: not all saturated at 0 or 1
    run = run_centralized(cfg, "pooled")
    results = json.loads((run / "results.json").read_text())
    assert results["run"]["precision"] == "bf16"
    labels, scores = heldout_scores(run)
    own = results["sites"]["site02"]["summary"]
    rescored = summarize(labels, np.stack([1 - scores, scores], axis=1), list(cfg.task.classes))
    assert len(labels) == results["sites"]["site02"]["n"]
    assert own["auc"] == pytest.approx(rescored["auc"], abs=1e-12)
    # the mean score per calibration bin: bf16 logits move these by percents, fp32 layouts by 1e-6
    own_bins, fp32_bins = own["calibration"]["bins"], rescored["calibration"]["bins"]
    assert own_bins["count"] == fp32_bins["count"]
    pairs = zip(own_bins["mean_predicted"], fp32_bins["mean_predicted"], strict=True)
    filled = [(own_mean, fp32_mean) for own_mean, fp32_mean in pairs if fp32_mean is not None]
    assert filled
    for own_mean, fp32_mean in filled:
        assert own_mean == pytest.approx(fp32_mean, rel=1e-4)


def test_fedmsk_train_prints_the_heldout_result_in_the_terminal(
    fed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A researcher running the pooled baseline without a report sees its external test at
    the end of the terminal, as `fedmsk simulate` shows it."""
    from fedmsk.cli import main

    run_dir = tmp_path / "cli-pooled"
    overrides = [
        f"data.root={fed}",
        "data.synthetic=false",
        "model=resnet18",
        "data.image_size=32",
        "train.centralized_epochs=1",
        f"run_dir={run_dir}",
    ]
    assert main(["train", "--mode", "pooled", "--no-report", *overrides]) == 0
    shown = capsys.readouterr().out
    auc = json.loads((run_dir / "results.json").read_text())["sites"]["site02"]["summary"]["auc"]
    assert f"held-out center site02: AUC {auc:.3f} [" in shown
    assert f"run directory: {run_dir}" in shown


def test_local_mode_refuses_a_heldout_or_unknown_site(fed: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--site"):
        run_centralized(_cfg(fed, tmp_path / "x"), "local", "site02")


def test_multirun_sweeps_the_cartesian_product() -> None:
    jobs = expand_sweep(["strategy=fedavg,fedprox", "seed=1,2", "model=resnet18"])
    assert len(jobs) == 4
    assert ["strategy=fedavg", "seed=1", "model=resnet18"] in jobs
    assert ["strategy=fedprox", "seed=2", "model=resnet18"] in jobs


def test_later_overrides_win() -> None:
    assert dedupe_overrides(["a=1", "b=2", "a=3"]) == ["b=2", "a=3"]


def test_baseline_budget_counts_the_share_of_sites_a_sampled_round_asks() -> None:
    """12 sites of 100 images, 24 rounds of 10 steps of 16: all sites asked, 38 pooled epochs;
    a quarter asked per round (3 of 12), a quarter of the images seen: 10 epochs, and a
    local-only run at one of the sites gets the 6 rounds' worth it trains in the federation."""
    from fedmsk.centralized import centralized_epochs
    from fedmsk.config import compose

    common = ["strategy=fedavg", "train.local_steps=10", "federation.num_rounds=24"]
    every = compose([*common, "strategy.fraction_train=1.0"])
    sampled = compose([*common, "strategy.fraction_train=0.25"])
    assert centralized_epochs(every, [100] * 12, 12) == 38
    assert centralized_epochs(sampled, [100] * 12, 12) == 10
    assert centralized_epochs(every, [100], 1, federation_sites=12) == 38
    assert centralized_epochs(sampled, [100], 1, federation_sites=12) == 10
