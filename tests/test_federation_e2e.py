"""A real federation in Flower's simulation engine: 3 training sites + 1 held-out center.

One reference run (2 rounds, tiny model, synthetic DICOM with fake PHI in every header) is
shared by the checks of its run directory, its report and its privacy. A second run is killed
with SIGKILL after its first checkpoint and resumed; it must end with the reference weights,
as must FedAdam with local normalisation layers killed and resumed the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedmsk.cli import main
from fedmsk.data.manifest import ManifestRow, read_manifest, write_manifest
from fedmsk.data.synthetic import generate_federation, phi_strings
from fedmsk.simulation import descendants, process_running

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 2


def _overrides(data_root: Path, run_dir: Path) -> list[str]:
    return [
        f"data.root={data_root}",
        "data.synthetic=false",
        "federation=small",
        f"federation.num_rounds={ROUNDS}",
        "model=resnet18_slim",
        "data.image_size=32",
        "train.batch_size=16",
        f"run_dir={run_dir}",
        # every round validated and the held-out center scored (the defaults do it less often)
        "evaluation.every_rounds=1",
        "evaluation.heldout_each_round=true",
    ]


BROKEN_SITE = "site09"


def _add_failures(root: Path) -> None:
    """A training site whose every image is corrupt (its client raises every round), and one
    corrupt DICOM among a good site's images (reported and skipped, not a crash)."""
    broken = root / BROKEN_SITE
    (broken / "images").mkdir(parents=True)
    rows = []
    for i in range(4):
        (broken / "images" / f"img{i}.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\x01" * 64)
        rows.append(ManifestRow(f"images/img{i}.dcm", ["normal", "fracture"][i % 2], f"B{i}"))
    write_manifest(broken, rows)
    doc = json.loads((root / "federation.json").read_text())
    doc["sites"].append({"alias": BROKEN_SITE, "dir": BROKEN_SITE, "role": "train"})
    (root / "federation.json").write_text(json.dumps(doc))
    good = root / "site00"
    (good / "images" / "corrupt.dcm").write_bytes(b"not a dicom file at all")
    rows = read_manifest(good)
    write_manifest(good, [*rows, ManifestRow("images/corrupt.dcm", "normal", rows[0].patient_id)])


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("e2e") / "fed"
    generate_federation(root, task="xray_fracture", centers=4, seed=3, scale=0.5)
    _add_failures(root)
    return root


@pytest.fixture(scope="module")
def reference_run(federation: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("e2e-run") / "reference"
    assert main(["simulate", *_overrides(federation, run_dir)]) == 0
    return run_dir


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_directory_has_rounds_checkpoints_heldout_and_report(
    reference_run: Path, federation: Path
) -> None:
    metrics = _metrics(reference_run)
    for round_no in range(1, ROUNDS + 1):
        trained = {m["site"] for m in metrics if m["round"] == round_no and m["phase"] == "train"}
        assert {"site00", "site01", "site02"} <= trained
        assert "site03" not in trained
        heldout = [m for m in metrics if m["round"] == round_no and m["phase"] == "heldout"]
        assert [m["site"] for m in heldout] == ["site03"] and heldout[0]["n"] > 0
    checkpoints = sorted(p.name for p in (reference_run / "checkpoints").iterdir())
    assert checkpoints == [f"round_{r:04d}.ckpt" for r in range(1, ROUNDS + 1)]
    results = json.loads((reference_run / "results.json").read_text())
    assert results["sites"]["site03"]["role"] == "heldout"
    assert results["sites"]["site03"]["summary"]["n"] == results["sites"]["site03"]["n"]
    assert 0.0 <= results["sites"]["site03"]["summary"]["auc"] <= 1.0
    assert results["run"]["training_sites"] == ["site00", "site01", "site02", BROKEN_SITE]
    assert 0.0 < results["threshold"]["value"] < 1.0
    for name in ("report.html", "report.md", "metrics.json", "config.yaml"):
        assert (reference_run / name).is_file(), name
    assert "site03" in (reference_run / "report.md").read_text()
    failures = {(f["round"], f["site"], f["error"]) for f in results["failures"]}
    for round_no in range(1, ROUNDS + 1):
        assert (round_no, BROKEN_SITE, "SiteUnavailableError") in failures
    assert all("/" not in f["error"] for f in results["failures"])
    assert "corrupt.dcm" in (federation / "site00" / ".fedmsk" / "logs" / "node.log").read_text()
    assert (reference_run / "figures" / "cam_site03.png").is_file()


def test_no_phi_in_run_directory_logs_or_report(reference_run: Path, federation: Path) -> None:
    secrets = {s for s in phi_strings(federation) if len(s) >= 5}
    assert secrets, "the synthetic federation should carry fake PHI"
    secrets.add(str(federation))
    leaks = []
    for path in reference_run.rglob("*"):
        if not path.is_file() or ".flwr" in path.parts:
            continue
        text = path.read_bytes().decode("utf-8", errors="ignore")
        leaks += [(path.name, s) for s in secrets if s in text and path.name != "config.yaml"]
    assert not leaks, leaks[:5]
    log_text = (reference_run / "flower.log").read_text(errors="ignore")
    assert not [s for s in secrets if s != str(federation) and s in log_text]


def _kill_tree(process: subprocess.Popen, run_dir: Path) -> None:
    """A crash of everything the run started: Flower's SuperLink detaches its SuperExec and
    simulation processes into sessions of their own, so killing process groups is not enough."""
    pid_file = run_dir / ".flwr" / "superlink.pid"
    roots = [process.pid] + ([int(pid_file.read_text())] if pid_file.is_file() else [])
    victims = set(roots).union(*(descendants(pid) for pid in roots))
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait(timeout=30)


def _wait_for_first_checkpoint(process: subprocess.Popen, run_dir: Path) -> None:
    """Wait (bounded) until the run has written its first round's checkpoint."""
    first = run_dir / "checkpoints" / "round_0001.ckpt"
    deadline = time.monotonic() + 400
    while not first.is_file() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert first.is_file(), "the run never wrote its first checkpoint"


def _crash_after_first_checkpoint(process: subprocess.Popen, run_dir: Path) -> None:
    """Wait (bounded) for the run's first checkpoint, then kill everything it started."""
    try:
        _wait_for_first_checkpoint(process, run_dir)
    finally:
        _kill_tree(process, run_dir)
    assert not (run_dir / "checkpoints" / f"round_{ROUNDS:04d}.ckpt").exists()


def _assert_same_final_run(reference: Path, resumed: Path) -> None:
    """The resumed run ends with the reference weights and aggregated every round once."""
    with (
        np.load(reference / "final_model.npz") as ref,
        np.load(resumed / "final_model.npz") as got,
    ):
        assert sorted(ref.files) == sorted(got.files)
        for key in ref.files:
            np.testing.assert_allclose(got[key], ref[key], rtol=0, atol=1e-6, err_msg=key)
    rounds = [m["round"] for m in _metrics(resumed) if m["phase"] == "train" and m["site"] is None]
    assert rounds == list(range(1, ROUNDS + 1))


def test_killed_run_resumes_to_the_same_final_weights(
    reference_run: Path, federation: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "killed"
    command = [
        sys.executable,
        "-m",
        "fedmsk.cli",
        "simulate",
        "--no-report",
        *_overrides(federation, run_dir),
    ]
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _crash_after_first_checkpoint(process, run_dir)
    assert (
        main(["simulate", "--no-report", *_overrides(federation, run_dir), f"resume={run_dir}"])
        == 0
    )
    _assert_same_final_run(reference_run, run_dir)
    # the record of the rounds before the checkpoint survives the resume (train failures are
    # recorded before a round's checkpoint; its evaluation may not have happened before the kill)
    trained = [
        sorted(
            (f["round"], f["site"], f["error"])
            for f in json.loads((d / "results.json").read_text())["failures"]
            if f["phase"] == "train"
        )
        for d in (reference_run, run_dir)
    ]
    assert trained[1] == trained[0] and trained[0]
    # the resumed run's terminal: only the rounds it trained, then the external test with its CI
    shown = capsys.readouterr().out
    assert f"round {ROUNDS}/{ROUNDS}  " in shown and "sites trained" in shown
    assert f"round 1/{ROUNDS}  " not in shown
    assert "held-out center site03: AUC " in shown and "[" in shown


def _simulate(overrides: list[str], keep_errors: bool = True) -> subprocess.Popen:
    """``fedmsk simulate`` in the background; its stderr is kept for a run that is waited for
    (a run that is killed is never read, so its pipe could fill)."""
    command = [sys.executable, "-m", "fedmsk.cli", "simulate", "--no-report", *overrides]
    return subprocess.Popen(
        command,
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE if keep_errors else subprocess.DEVNULL,
        text=True,
    )


def test_server_optimiser_with_local_norm_layers_resumes_exactly(
    federation: Path, tmp_path: Path
) -> None:
    """FedAdam with FedBN's local normalisation layers: the state that must survive a crash
    lives in both places, the server's Adam moments and round count (bias correction) and each
    node's own BatchNorm layers and AdamW state. Killed after round 1 and resumed, the run must
    end with the weights of a run that was never interrupted (issue 14 part 4)."""
    strategy = ["strategy=fedadam", "strategy.local_norm_layers=true"]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    uninterrupted = _simulate([*_overrides(federation, reference), *strategy])
    process = _simulate([*_overrides(federation, killed), *strategy], keep_errors=False)
    _crash_after_first_checkpoint(process, killed)
    _, errors = uninterrupted.communicate(timeout=540)
    assert uninterrupted.returncode == 0, errors[-2000:]
    resumed = _simulate([*_overrides(federation, killed), *strategy, f"resume={killed}"])
    _, errors = resumed.communicate(timeout=540)
    assert resumed.returncode == 0, errors[-2000:]
    _assert_same_final_run(reference, killed)


def test_a_run_with_no_aggregated_round_fails_with_its_cause_in_one_line(
    federation: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The broken site fails every round; with every site's update required nothing aggregates."""
    run_dir = tmp_path / "none-aggregated"
    overrides = [
        *_overrides(federation, run_dir),
        "strategy=fedavg",
        "strategy.fraction_train=1.0",  # every site asked (the default samples some)
        "federation.num_rounds=1",
        "federation.min_reply_fraction=1.0",
    ]
    assert main(["simulate", "--no-report", *overrides]) == 1
    captured = capsys.readouterr()
    error = captured.err.strip().splitlines()[-1]
    assert error.startswith("fedmsk simulate: NoRoundAggregated: no round aggregated: 1 round(s)")
    assert f"{BROKEN_SITE} (SiteUnavailableError)" in error
    assert "federation.min_reply_fraction" in error
    assert f"round 1/1  {BROKEN_SITE} failed to train (SiteUnavailableError)" in captured.out
    assert "not aggregated: only 3 site(s) replied" in captured.out
    assert not (run_dir / "results.json").exists()


def test_terminated_run_stops_the_processes_it_started(federation: Path, tmp_path: Path) -> None:
    """``kill`` (or a batch scheduler's time limit) sends SIGTERM to ``fedmsk simulate`` alone:
    Flower's SuperLink and the simulation run in sessions of their own, so they must be
    stopped by the launcher, not left training on the CPU and holding a port."""
    run_dir = tmp_path / "terminated"
    process = _simulate(_overrides(federation, run_dir), keep_errors=False)
    try:
        _wait_for_first_checkpoint(process, run_dir)
        started = descendants(process.pid)
        assert len(started) >= 3  # SuperLink, flwr run, the simulation (and their helpers)
        os.kill(process.pid, signal.SIGTERM)
        time.sleep(0.5)  # schedulers repeat it: a second SIGTERM must not cut the cleanup short
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        assert process.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 30
        while [pid for pid in started if process_running(pid)] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in started if process_running(pid)]
    finally:
        _kill_tree(process, run_dir)
