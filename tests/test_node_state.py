"""Per-round node state: a round reads what the round before it left; a fresh run reads nothing."""

from __future__ import annotations

from pathlib import Path

from fedmsk.node_state import RoundFiles


def _write(files: RoundFiles, round_no: int) -> None:
    files.write(round_no, lambda path: path.write_text(str(round_no)))


def test_a_round_reads_the_newest_earlier_round(tmp_path: Path) -> None:
    files = RoundFiles(tmp_path, "optimizer", ".pt", keep=3)
    assert files.latest_before(1) is None
    for r in (1, 2, 3, 4, 5):
        _write(files, r)
    assert files.rounds() == [3, 4, 5]  # retention
    assert files.latest_before(5).read_text() == "4"
    assert files.latest_before(4).read_text() == "3"
    assert files.latest_before(1) is None  # round 1 of a fresh run starts clean


def test_resuming_overwrites_later_rounds(tmp_path: Path) -> None:
    files = RoundFiles(tmp_path, "local_norm", ".npz")
    for r in (1, 2, 3):
        _write(files, r)
    # the coordinator resumes from round 1's checkpoint: round 2 runs again
    assert files.latest_before(2).read_text() == "1"
    _write(files, 2)
    assert files.rounds() == [1, 2]  # round 3 (beyond the resume point) is gone
    assert not list(tmp_path.glob(".tmp-*"))
