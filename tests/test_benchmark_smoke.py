"""simulations/benchmark.py: the table logic, and one whole ``--quick`` run of every section.

The quick run is the benchmark's only place in the test suite: it proves that each section
still runs against the current code and writes its rows, not that any target is met.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "simulations" / "benchmark.py"


def _load():
    spec = importlib.util.spec_from_file_location("fedmsk_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fedmsk_benchmark"] = module
    spec.loader.exec_module(module)
    return module


bench = _load()


def _meta() -> dict:
    return {
        "date": "2026-01-01T00:00:00+00:00",
        "machine": {"cpu_count": 2, "gpu": None, "torch": "x", "load_average_start": [0.0]},
        "command": "simulations/benchmark.py --quick",
        "quick": True,
        "section_seconds": {},
        "section_dates": {},
    }


def test_status_for_targets() -> None:
    assert bench.status_for(0.96, at_least=0.95) == "OK"
    assert bench.status_for(0.94, at_least=0.95) == "MISSED"
    assert bench.status_for(None, at_least=0.95) == "MISSED"
    assert bench.status_for(float("nan"), at_least=0.0) == "MISSED"
    assert bench.status_for(0.04, below=0.05) == "OK"
    assert bench.status_for(0.05, below=0.05) == "MISSED"


def test_markdown_shows_missed_with_the_measured_figure() -> None:
    rows = [
        bench.Row(1, "ratio", 0.5, "ratio", ">= 0.95", "MISSED", "a|b"),
        bench.Row(2, "speed", 123.4, "images/s"),
    ]
    text = bench.markdown(rows, _meta() | {"section_seconds": {"1": 3.0}})
    assert "| 1 | ratio | 0.500 | ratio | >= 0.95 | **MISSED** (0.500) | a/b |" in text
    assert "| 2 | speed | 123 | images/s |  |  |  |" in text
    assert "section 1 (" in text


def test_outputs_keep_rows_of_sections_not_run(tmp_path: Path) -> None:
    first = _meta() | {"section_seconds": {"1": 1.0}, "section_dates": {"1": "d1"}}
    bench.write_outputs(tmp_path, [bench.Row(1, "one", 1.0, "s")], first, [1])
    second = _meta() | {"section_seconds": {"2": 2.0}, "section_dates": {"2": "d2"}}
    bench.write_outputs(tmp_path, [bench.Row(2, "two", 2.0, "s")], second, [2])
    data = json.loads((tmp_path / "benchmark.json").read_text())
    assert [(r["section"], r["name"]) for r in data["rows"]] == [(1, "one"), (2, "two")]
    assert data["section_dates"] == {"1": "d1", "2": "d2"}
    third = _meta() | {"section_seconds": {"1": 5.0}}
    bench.write_outputs(tmp_path, [bench.Row(1, "again", 3.0, "s")], third, [1])
    data = json.loads((tmp_path / "benchmark.json").read_text())
    assert [r["name"] for r in data["rows"]] == ["again", "two"]


def test_a_run_is_reused_only_when_its_results_came_after_its_configuration(
    tmp_path: Path,
) -> None:
    import os

    from fedmsk.config import compose, config_hash

    cfg = compose([f"run_dir={tmp_path}"])
    stamp, results = tmp_path / "config_hash.txt", tmp_path / "results.json"
    stamp.write_text(config_hash(cfg) + "\n")
    assert not bench.finished_run(tmp_path, cfg)  # started, never finished
    results.write_text("{}")
    os.utime(stamp, (1_000_000, 1_000_000))
    assert bench.finished_run(tmp_path, cfg)
    assert not bench.finished_run(tmp_path, compose([f"run_dir={tmp_path}", "seed=7"]))
    os.utime(results, (999_000, 999_000))  # a rerun began after these results: not reusable
    assert not bench.finished_run(tmp_path, cfg)


def _quality_settings(tmp_path: Path, training_seeds: list[int]):
    return bench.Settings(
        out=tmp_path,
        quick=False,
        threads=1,
        repeats=1,
        devices=["cpu"],
        quality_seeds=[0, 5],
        quality_strategies=[],
        quality_variants=[],
        quality_budgets=["recommended"],
        quality_local=False,
        quality_training_seeds=training_seeds,
    )


def test_training_seeds_repeat_pooled_and_the_recommended_strategy_on_every_draw(
    tmp_path: Path,
) -> None:
    s = _quality_settings(tmp_path, [43, 44])
    plan = bench.quality_plan(s, [])
    repeats = [r for r in plan if r.training_seed is not None]
    assert len(plan) == 4 + 8  # 2 draws x (pooled, cyclic), then 2 training seeds of each
    assert {(r.method, r.seed, r.training_seed) for r in repeats} == {
        (m, seed, t) for m in ("pooled", "cyclic") for seed in (0, 5) for t in (43, 44)
    }
    assert len({r.directory for r in plan}) == len(plan)  # no run overwrites another
    repeat = next(r for r in repeats if r.training_seed == 44)
    assert "seed=44" in bench.quality_overrides(s, repeat, tmp_path / "run")
    first = plan[0]
    assert not any(o.startswith("seed=") for o in bench.quality_overrides(s, first, tmp_path))
    assert bench.quality_plan(_quality_settings(tmp_path, []), []) == plan[:4]


def test_section_5_trains_at_the_configured_image_size_and_section_4_at_64_px(
    tmp_path: Path,
) -> None:
    """Section 5 measures the project's defaults: forcing 64 px on the default model, whose
    stride-4 stem is made for 128 px, would have measured another recipe."""
    from fedmsk.commands.simulate import prepare

    s = _quality_settings(tmp_path, [])
    run = bench.quality_plan(s, [])[1]
    overrides = bench.quality_overrides(s, run, tmp_path / "run")
    assert not any(o.startswith("data.image_size=") for o in overrides)
    assert prepare(overrides).cfg.data.image_size == prepare([]).cfg.data.image_size
    section4 = bench.federation_overrides(s, tmp_path, tmp_path / "run4", 2)
    assert "data.image_size=64" in section4
    s.fed_image_size = 96  # --fed-image-size sets both
    assert "data.image_size=96" in bench.quality_overrides(s, run, tmp_path / "run")
    assert "data.image_size=96" in bench.federation_overrides(s, tmp_path, tmp_path / "r4", 2)


def test_training_seed_rows_give_mean_spread_and_gap_per_draw(tmp_path: Path) -> None:
    s = _quality_settings(tmp_path, [43, 44])
    aucs = {
        ("pooled", 0, None): 0.80, ("pooled", 0, 43): 0.84, ("pooled", 0, 44): 0.82,
        ("cyclic", 0, None): 0.85, ("cyclic", 0, 43): 0.83, ("cyclic", 0, 44): 0.87,
        ("pooled", 5, None): 0.90, ("pooled", 5, 43): None, ("pooled", 5, 44): None,
    }  # fmt: skip
    by_run = {
        bench.QualityRun(m, seed, "recommended", training_seed=t): auc
        for (m, seed, t), auc in aucs.items()
    }
    rows = {r.name: r for r in bench.training_seed_rows(s, by_run)}
    pooled = rows["pooled: held-out AUC over 3 training seeds (seed 0)"]
    assert math.isclose(pooled.value, 0.82)
    assert "sd 0.020" in pooled.notes and "configured: 0.800" in pooled.notes
    assert math.isclose(rows["cyclic: held-out AUC over 3 training seeds (seed 0)"].value, 0.85)
    gap = rows["cyclic minus pooled, means over training seeds (seed 0)"]
    assert math.isclose(gap.value, 0.03)
    # draw 5: one finished pooled run and no cyclic run is not a spread
    assert not any("(seed 5)" in name for name in rows)
    # ... so the target over the training seeds cannot be read: MISSED, and it says why
    target = rows["cyclic minus pooled, held-out AUC (mean over seeds of the means over "
                  "training seeds)"]  # fmt: skip
    assert target.value is None and target.status == bench.MISSED
    assert "no mean over training seeds on seed 5" in target.notes
    lowest = rows["pooled held-out AUC on every seed and training seed (lowest)"]
    assert math.isclose(lowest.value, 0.80) and lowest.status == bench.MISSED
    assert "seed 0, training seed configured" in lowest.notes
    assert bench.training_seed_rows(_quality_settings(tmp_path, []), by_run) == []


def test_targets_are_read_over_training_seeds_when_every_draw_has_them(tmp_path: Path) -> None:
    s = _quality_settings(tmp_path, [43, 44])
    aucs = {
        ("pooled", 0, None): 0.90, ("pooled", 0, 43): 0.88, ("pooled", 0, 44): 0.86,
        ("cyclic", 0, None): 0.85, ("cyclic", 0, 43): 0.89, ("cyclic", 0, 44): 0.87,
        ("pooled", 5, None): 0.95, ("pooled", 5, 43): 0.93, ("pooled", 5, 44): 0.94,
        ("cyclic", 5, None): 0.90, ("cyclic", 5, 43): 0.94, ("cyclic", 5, 44): 0.92,
    }  # fmt: skip
    by_run = {
        bench.QualityRun(m, seed, "recommended", training_seed=t): auc
        for (m, seed, t), auc in aucs.items()
    }
    rows = {r.name: r for r in bench.training_seed_rows(s, by_run)}
    target = rows["cyclic minus pooled, held-out AUC (mean over seeds of the means over "
                  "training seeds)"]  # fmt: skip
    # draw 0: 0.870 - 0.880; draw 5: 0.920 - 0.940; configured seeds alone would give -0.05
    assert math.isclose(target.value, -0.015) and target.status == bench.OK
    assert "0: -0.010, 5: -0.020" in target.notes
    lowest = rows["pooled held-out AUC on every seed and training seed (lowest)"]
    assert math.isclose(lowest.value, 0.86) and lowest.status == bench.OK
    assert "seed 0, training seed 44" in lowest.notes


def test_round_timings_from_time_stamped_metrics() -> None:
    lines = [
        (10.0, {"round": 1, "phase": "train", "site": "a", "train-seconds": 2.0}),
        (10.0, {"round": 1, "phase": "train", "site": "b", "train-seconds": 4.0}),
        (11.0, {"round": 1, "phase": "train", "site": None}),
        (15.0, {"round": 1, "phase": "val", "site": None}),
        (25.0, {"round": 2, "phase": "train", "site": "a", "train-seconds": 3.0}),
        (26.0, {"round": 2, "phase": "train", "site": None}),
    ]
    first, second = bench.round_timings(lines, started=1.0)
    assert (first.round, first.wall, first.train_seconds, first.includes_startup) == (
        1, 10.0, [2.0, 4.0], True,
    )  # fmt: skip
    assert (second.round, second.wall, second.train_seconds, second.includes_startup) == (
        2, 11.0, [3.0], False,
    )  # fmt: skip
    # a round that did not evaluate ends at its aggregation line (every_rounds > 1)
    lines += [
        (30.0, {"round": 3, "phase": "train", "site": "a", "train-seconds": 1.0}),
        (32.0, {"round": 3, "phase": "train", "site": None}),
    ]
    third = bench.round_timings(lines, started=1.0)[2]
    assert (third.round, third.wall, third.includes_startup) == (3, 6.0, False)


def test_timed_loader_counts_time_in_the_iterator() -> None:
    import time

    class Slow:
        dataset = [0, 1, 2]

        def __len__(self) -> int:
            return 3

        def __iter__(self):
            for item in self.dataset:
                time.sleep(0.02)
                yield item

    timed = bench.TimedLoader(Slow())
    assert list(timed) == [0, 1, 2] and len(timed) == 3
    assert timed.waited >= 0.05


def test_dp_target_prefers_resnet18_and_judges_the_best_mode() -> None:
    results = [
        {"model": "mobilenetv3_small_100", "mode": "functorch", "ratio": 0.9, "steps": 2},
        {"model": "resnet18", "mode": "none", "ratio": None, "steps": 2},
        {"model": "resnet18", "mode": "hooks", "ratio": 0.25, "steps": 2},
        {"model": "resnet18", "mode": "ew", "ratio": 0.4, "steps": 2},
    ]
    row = bench.dp_target_row(results, {})
    assert "resnet18" in row.name and "(ew)" in row.name
    assert row.value == pytest.approx(2.5) and row.status == "MISSED"
    results[3]["ratio"] = 0.6
    assert bench.dp_target_row(results, {}).status == "OK"


@pytest.mark.slow
def test_quick_benchmark_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    data = json.loads((out / "benchmark.json").read_text())
    rows = data["rows"]
    assert {r["section"] for r in rows} == {1, 2, 3, 4, 5}
    assert not [r for r in rows if r["status"] == "FAILED"]
    by_name = {r["name"]: r for r in rows}

    def one(prefix: str) -> dict:
        found = [r for n, r in by_name.items() if n.startswith(prefix)]
        assert found, f"no row starting {prefix!r} in {sorted(by_name)}"
        return found[0]

    for prefix in ("bare PyTorch loop", "federated round", "DICOM cold", "peak memory"):
        value = one(prefix)["value"]
        assert value is not None and math.isfinite(value) and value > 0, prefix
    targets = [r for r in rows if r["target"]]
    assert {r["section"] for r in targets} == {1, 2, 3, 4, 5}
    ratio = one("round / bare throughput")
    assert ratio["status"] == ("OK" if ratio["value"] >= 0.95 else "MISSED")
    overhead = one("federation overhead")
    assert 0 <= overhead["value"] <= 100
    assert overhead["status"] == ("OK" if overhead["value"] < 10 else "MISSED")
    # the default slim ResNet-18: 2.8 M float32 values, about 11 MB
    assert 5 < one("bytes sent per client")["value"] < 20
    methods = {r["name"].split(" ")[0].split(":")[0] for r in rows if r["section"] == 5}
    assert {"pooled", "local", "cyclic"} <= methods
    for r in (r for r in rows if r["section"] == 5 and r["name"].endswith("held-out AUC")):
        assert r["value"] is None or 0.0 <= r["value"] <= 1.0
    assert one("paired DeLong test cyclic vs pooled (seed 0)")["notes"].startswith("AUC")
    assert one("pooled held-out AUC on every seed")["target"] == ">= 0.85"
    text = (out / "benchmark.md").read_text()
    assert "| # | measurement | value | unit | target | status | notes |" in text
    for r in rows:
        assert f"| {r['section']} | {r['name']} |" in text
        if r["status"] == "MISSED":
            assert f"**MISSED** ({bench.format_value(r['value'])})" in text
    assert (out / "quality" / "recommended" / "comparison.md").is_file()
    # section 5 reuses the federated run section 4 timed instead of training it again
    assert f"reused: {out / 'work' / 'overhead-run'}" in done.stdout, done.stdout[-2000:]


def test_configured_seed_rows_hand_the_targets_over_when_training_seeds_repeat_them(
    tmp_path: Path,
) -> None:
    from types import SimpleNamespace

    dirs, seconds = {}, {}
    for (method, seed), auc in {("pooled", 0): 0.90, ("cyclic", 0): 0.87,
                                ("pooled", 5): 0.95, ("cyclic", 5): 0.94}.items():  # fmt: skip
        run = bench.QualityRun(method, seed, "recommended")
        dirs[run] = tmp_path / run.directory
        dirs[run].mkdir()
        site = {"role": "heldout", "summary": {"auc": auc, "auc_ci95": [auc - 0.05, auc + 0.03]}}
        (dirs[run] / "results.json").write_text(json.dumps({"sites": {"site12": site}}))
        seconds[run] = 100.0

    def paired(a: Path, b: Path) -> SimpleNamespace:
        return SimpleNamespace(auc1=0.0, auc2=0.0, z=0.0, p=1.0)

    def target_rows(training_seeds: list[int]) -> dict[str, tuple[str, str]]:
        s = _quality_settings(tmp_path, training_seeds)
        rows = bench.quality_summary_rows(s, dirs, seconds, paired)
        return {r.name: (r.target, r.status) for r in rows if "minus pooled" in r.name
                or "every seed" in r.name}  # fmt: skip

    alone = target_rows([])
    assert alone["cyclic minus pooled, held-out AUC (mean over seeds)"] == (">= -0.02", "MISSED")
    assert alone["pooled held-out AUC on every seed (lowest)"] == (">= 0.85", "OK")
    repeated = target_rows([43, 44])
    assert set(repeated.values()) == {("", "")}
    assert set(repeated) == set(alone)
