"""Per-round node state: a round reads what the round before it left; a fresh run reads nothing."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest
import torch

from fedmsk.node_state import RoundFiles, prune_other_runs, save_tensors


def _write(files: RoundFiles, round_no: int) -> None:
    files.write(round_no, lambda handle: handle.write(str(round_no).encode()))


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


def test_a_write_reuses_the_file_it_would_remove(tmp_path: Path) -> None:
    files = RoundFiles(tmp_path, "optimizer", ".pt", keep=3)
    for r in (1, 2, 3):
        files.write(r, lambda handle: handle.write(b"x" * 5000))
    oldest = files.path(1).stat().st_ino
    files.write(4, lambda handle: handle.write(b"4"))  # shorter than the reused file
    assert files.rounds() == [2, 3, 4]
    assert files.path(4).stat().st_ino == oldest, "round 1's file was overwritten in place"
    assert files.path(4).read_bytes() == b"4"
    files.write(5, lambda handle: handle.write(b"five" * 1000))  # longer than the old file
    assert files.path(5).read_bytes() == b"five" * 1000
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_failed_write_leaves_the_newest_complete_round(tmp_path: Path) -> None:
    files = RoundFiles(tmp_path, "optimizer", ".pt", keep=2)
    for r in (1, 2):
        _write(files, r)

    def fail(handle) -> None:
        handle.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):  # the error reaches the caller
        files.write(3, fail)
    assert files.latest_before(3).read_text() == "2"
    assert 3 not in files.rounds()
    assert not list(tmp_path.glob(".tmp-*"))


def _adamw_state() -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        model(torch.randn(5, 8)).square().sum().backward()
        optimizer.step()
    return optimizer.state_dict()


def test_node_state_saved_without_checksums_loads_back_exactly(tmp_path: Path) -> None:
    from torch.utils.serialization import config

    state = _adamw_state()
    path = tmp_path / "optimizer.pt"
    save_tensors(state, path)
    assert config.save.compute_crc32, "the process-wide setting is restored"
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    assert loaded["param_groups"] == state["param_groups"]
    for index, moments in state["state"].items():
        for key, value in moments.items():
            assert torch.equal(loaded["state"][index][key], value), (index, key)
    records = [i for i in zipfile.ZipFile(path).infolist() if "/data/" in i.filename]
    assert records and all(i.CRC == 0 for i in records), "no checksum computed"


def test_torch_load_never_checks_the_checksum_that_save_tensors_skips(tmp_path: Path) -> None:
    """Why skipping it loses nothing: a default ``torch.save`` file with a flipped byte in a
    tensor loads without an error. If torch starts checking, this fails and the choice in
    :func:`save_tensors` should be revisited."""
    path = tmp_path / "checked.pt"
    original = torch.arange(4096, dtype=torch.float32)
    torch.save({"moments": original}, path)
    data = bytearray(path.read_bytes())
    info = next(i for i in zipfile.ZipFile(path).infolist() if "/data/" in i.filename)
    assert info.CRC != 0
    header = info.header_offset  # the local header's own name and extra-field lengths
    name_length = int.from_bytes(data[header + 26 : header + 28], "little")
    extra_length = int.from_bytes(data[header + 28 : header + 30], "little")
    start = header + 30 + name_length + extra_length
    data[start + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    loaded = torch.load(path, map_location="cpu", weights_only=True)["moments"]
    assert not torch.equal(loaded, original)


def test_pruning_keeps_the_latest_runs_moments_and_every_other_file(tmp_path: Path) -> None:
    """Of five earlier runs, the two written last keep their moments beside the current run
    (keep_runs=3), whichever order the folders are listed in; privacy spends and FedBN layers
    of every run stay; the bytes freed are the removed files' sizes."""
    runs = tmp_path / "runs"
    names = ["e", "a", "d", "b", "c"]  # written oldest to newest: e, a, d, b, c
    for age, name in enumerate(names):
        folder = runs / name
        files = RoundFiles(folder, "optimizer", ".pt")
        for r in (1, 2):
            files.write(r, lambda handle, r=r: handle.write(b"x" * (100 * r)))
            os.utime(files.path(r), (1_000 + age * 10 + r, 1_000 + age * 10 + r))
        (folder / "privacy.json").write_text("{}")
        RoundFiles(folder, "local_norm", ".npz").write(2, lambda handle: handle.write(b"n"))
    current = runs / "now"
    RoundFiles(current, "optimizer", ".pt").write(1, lambda handle: handle.write(b"y"))
    os.utime(RoundFiles(current, "optimizer", ".pt").path(1), (1, 1))  # oldest, still kept

    freed = prune_other_runs(runs, current, RoundFiles(current, "optimizer", ".pt"), keep_runs=3)

    kept = {run.name for run in runs.iterdir() if list(run.glob("optimizer-r*.pt"))}
    assert kept == {"now", "b", "c"}
    assert freed == 3 * (100 + 200)
    assert all((runs / name / "privacy.json").exists() for name in names)
    assert all((runs / name / "local_norm-r0002.npz").exists() for name in names)
    assert prune_other_runs(runs, current, RoundFiles(current, "optimizer", ".pt"), 3) == 0
