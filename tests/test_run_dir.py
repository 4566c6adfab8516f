"""The run directory: metrics lines, atomic checkpoints, resume checks, TensorBoard mirror."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedmsk.config import compose, config_hash
from fedmsk.run_dir import Checkpoint, ResumeError, RunDirectory


def _checkpoint(cfg, round_no: int) -> Checkpoint:  # noqa: ANN001
    return Checkpoint(round_no, {"w": np.full(3, round_no, np.float32)}, {}, config_hash(cfg), 0.4)


def test_latest_checkpoint_and_truncated_metrics(tmp_path: Path) -> None:
    cfg = compose([f"run_dir={tmp_path}"])
    run = RunDirectory(tmp_path)
    run.initialise(cfg)
    for r in (1, 2, 3):
        run.append_metrics({"round": r, "phase": "train", "site": None, "loss": 1.0 / r})
    run.save_checkpoint(_checkpoint(cfg, 1))
    run.save_checkpoint(_checkpoint(cfg, 2))
    resumed = run.checkpoint_for_resume(cfg)
    assert resumed is not None and resumed.round == 2
    np.testing.assert_array_equal(resumed.arrays["w"], [2, 2, 2])
    run.truncate_metrics_after(resumed.round)
    assert [m["round"] for m in run.read_metrics()] == [1, 2]
    assert not list(tmp_path.glob("checkpoints/.*.tmp"))


def test_resume_with_other_settings_is_refused(tmp_path: Path) -> None:
    cfg = compose([f"run_dir={tmp_path}"])
    run = RunDirectory(tmp_path)
    run.save_checkpoint(_checkpoint(cfg, 1))
    with pytest.raises(ResumeError, match="same overrides"):
        run.checkpoint_for_resume(compose([f"run_dir={tmp_path}", "seed=9"]))


def test_corrupt_checkpoint_is_named(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "round_0001.ckpt").write_bytes(b"garbage")
    with pytest.raises(ResumeError, match="round_0001.ckpt"):
        RunDirectory(tmp_path).latest_checkpoint()


def test_tensorboard_mirror_writes_event_files(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path, tensorboard=True)
    run.append_metrics({"round": 1, "phase": "val", "site": "site00", "auc": 0.7, "n": 5})
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
