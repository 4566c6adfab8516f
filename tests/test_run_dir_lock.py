"""The run directory's writer lock: a resume never writes beside a run that is still alive."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedmsk.run_dir import WRITER_LOCK, RunDirectory, RunDirectoryBusy, ensure_not_in_use

HOLD = """
import sys, time
from fedmsk.run_dir import RunDirectory
lock = RunDirectory(sys.argv[1]).lock_for_writing()
print("held", flush=True)
time.sleep(60)
"""


def test_a_live_writer_blocks_a_second_one_and_its_death_frees_the_directory(
    tmp_path: Path,
) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirectoryBusy, match=rf"pid {holder.pid}\b") as caught:
            ensure_not_in_use(tmp_path)
        assert str(tmp_path) in str(caught.value)
        with pytest.raises(RunDirectoryBusy):
            RunDirectory(tmp_path).lock_for_writing()
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs, the kernel drops the lock
        holder.wait(timeout=30)
    deadline = time.monotonic() + 10
    while True:
        try:
            ensure_not_in_use(tmp_path)
            break
        except RunDirectoryBusy:
            assert time.monotonic() < deadline, "the lock outlived its holder"
            time.sleep(0.1)
    lock = RunDirectory(tmp_path).lock_for_writing()
    assert (tmp_path / WRITER_LOCK).read_text().strip() == str(os.getpid())
    lock.release()
    RunDirectory(tmp_path).lock_for_writing().release()  # released: free again


def test_a_directory_never_run_is_not_in_use(tmp_path: Path) -> None:
    ensure_not_in_use(tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
