"""Progress lines read from metrics.jsonl: what a user sees while a run trains."""

from __future__ import annotations

import io
import json
from pathlib import Path

from fedmsk.progress import (
    MetricsFollower,
    ProgressPrinter,
    format_auc,
    format_duration,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _rows_for_round(number: int, sites: list[str], loss: float) -> list[dict]:
    rows = [{"round": number, "phase": "train", "site": s, "train-loss": loss} for s in sites]
    return [*rows, {"round": number, "phase": "train", "site": None, "train-loss": loss}]


def test_round_lines_count_sites_and_estimate_time_left() -> None:
    clock, out = FakeClock(), io.StringIO()
    printer = ProgressPrinter(total=4, expected_sites=3, stream=out, clock=clock)
    clock.now += 30  # start-up: not counted in the pace
    printer.feed(_rows_for_round(1, ["a", "b", "c"], 0.7))
    clock.now += 10
    printer.feed(
        [
            {"round": 2, "phase": "train", "site": "a"},
            {"round": 2, "phase": "train", "site": "b"},
            {"round": 2, "phase": "train-failure", "site": "c", "error": "Timeout"},
            {"round": 2, "phase": "train", "site": None, "train-loss": 0.61234},
            {"round": 2, "phase": "val", "site": None, "auc": 0.6543, "n": 40},
        ]
    )
    lines = out.getvalue().splitlines()
    assert lines[0] == "round 1/4  3/3 sites trained, train loss 0.700, 30s elapsed"
    assert lines[1] == "round 2/4  c failed to train (Timeout)"
    # pace after the first round: 10 s per round, two rounds left
    assert lines[2] == "round 2/4  2/3 sites trained, train loss 0.612, 40s elapsed, ~20s left"
    assert lines[3] == "round 2/4  validation AUC 0.654 (40 images)"


def test_last_round_has_no_time_left_and_long_runs_are_thinned() -> None:
    out = io.StringIO()
    printer = ProgressPrinter(total=100, unit="epoch", stream=out, clock=FakeClock())
    for epoch in range(1, 101):
        printer.feed([{"round": epoch, "phase": "train", "site": None, "train-loss": 0.5}])
    lines = out.getvalue().splitlines()
    shown = [int(line.split()[1].split("/")[0]) for line in lines]
    assert shown[0] == 1 and shown[-1] == 100
    assert 20 <= len(lines) <= 30
    assert "left" not in lines[-1]
    assert lines[0].startswith("epoch   1/100  train loss 0.500")


def test_follower_returns_each_complete_line_once_and_skips_history(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"round": 1, "phase": "train", "site": None}) + "\n")
    follower = MetricsFollower(path)
    assert follower.read_new() == []  # rows written before following are history
    with path.open("a") as handle:
        handle.write(json.dumps({"round": 2, "phase": "train", "site": None}) + "\n")
        handle.write('{"round": 3, "pha')  # a line still being written
    assert [r["round"] for r in follower.read_new()] == [2]
    with path.open("a") as handle:
        handle.write('se": "train", "site": null}\n')
    assert [r["round"] for r in follower.read_new()] == [3]
    assert follower.read_new() == []


def test_follower_reads_a_rewritten_file_from_its_start_without_resumed_history(
    tmp_path: Path,
) -> None:
    """A resumed run rewrites metrics.jsonl, keeping the rounds up to its checkpoint."""
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"round": r, "phase": "train", "site": None}) for r in (1, 2, 3)]
    path.write_text("\n".join(rows) + "\n")
    follower = MetricsFollower(path, resumed_after=1)
    replacement = tmp_path / "new.jsonl"
    replacement.write_text(rows[0] + "\n" + rows[1] + "\n")  # kept round 1, then round 2 again
    replacement.replace(path)  # as RunDirectory rewrites it: a new file
    assert [r["round"] for r in follower.read_new()] == [2]
    with path.open("a") as handle:
        handle.write(json.dumps({"round": 3, "phase": "train", "site": None}) + "\n")
    assert [r["round"] for r in follower.read_new()] == [3]


def test_formats_a_reader_wants() -> None:
    assert format_duration(42) == "42s"
    assert format_duration(185) == "3m05s"
    assert format_duration(3720) == "1h02m"
    assert format_auc({"auc": 0.75238, "auc_ci95": [0.6796, 0.8252]}) == (
        "AUC 0.752 [0.680, 0.825]"
    )
    assert format_auc({"auc": 0.5}) == "AUC 0.500"
    assert format_auc({}) == "AUC n/a"


def test_the_server_logs_a_line_per_round_through_the_run_directory(tmp_path: Path, caplog) -> None:
    """In a deployment the coordinator sees the ServerApp's log (`flwr run --stream`)."""
    import logging

    from fedmsk.progress import LogLines
    from fedmsk.run_dir import RunDirectory

    logger = logging.getLogger("fedmsk.test-progress")
    run_dir = RunDirectory(tmp_path)
    printer = ProgressPrinter(total=2, expected_sites=1, stream=LogLines(logger))
    run_dir.observers.append(printer.feed_one)
    with caplog.at_level(logging.INFO, logger="fedmsk.test-progress"):
        run_dir.append_metrics({"round": 1, "phase": "train", "site": "a", "train-loss": 0.5})
        run_dir.append_metrics({"round": 1, "phase": "train", "site": None, "train-loss": 0.5})
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1
    assert messages[0].startswith("round 1/2  1/1 sites trained, train loss 0.500")
    assert len(run_dir.read_metrics()) == 2


def test_calibration_of_many_centers_is_pooled_by_count() -> None:
    from fedmsk.report_data import CalibrationView
    from fedmsk.report_figures import _pooled_bins

    a = CalibrationView(None, None, [0.1, 0.5], [0.0, 1.0], [10, 0])
    b = CalibrationView(None, None, [0.3, 0.6], [0.5, 0.5], [30, 4])
    assert _pooled_bins([a, b]) == [(0.25, 0.375), (0.6, 0.5)]


def test_roc_overlay_gives_each_of_thirteen_centers_its_own_colour(tmp_path, monkeypatch) -> None:
    """Matplotlib's default cycle has ten colours: a 13-center federation drew site00 and
    site10 alike. Each center's curve now has a colour of its own."""
    from matplotlib.colors import to_hex

    import fedmsk.report_figures as figures
    from fedmsk.report_data import Curve, SiteResult, SummaryView

    drawn = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: drawn.append(fig) or path)
    roc = Curve(fpr=[0.0, 0.5, 1.0], tpr=[0.0, 0.8, 1.0])
    sites = [
        SiteResult(
            f"site{i:02d}",
            "heldout" if i == 12 else "train",
            "test" if i == 12 else "val",
            SummaryView("binary", ["no", "yes"], 10, [5, 5], roc=roc),
        )
        for i in range(13)
    ]
    assert figures.roc_overlay(sites, None, tmp_path / "roc.png") is not None
    lines = [ln for ln in drawn[0].axes[0].get_lines() if ln.get_label().startswith("site")]
    assert len(lines) == 13
    assert len({to_hex(ln.get_color()) for ln in lines}) == 13
    by_name = figures.center_colours([s.alias for s in reversed(sites)])
    assert by_name == figures.center_colours([s.alias for s in sites])
