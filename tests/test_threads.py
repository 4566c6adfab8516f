"""``train.num_threads``: a node trains on its own cores (``auto``), a simulated site on the CPU
share the engine gives it, and an explicit count wins everywhere."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import fedmsk.threads
from fedmsk.commands.simulate import _sequential_resources, _simulated_threads
from fedmsk.config import TrainConfig, compose
from fedmsk.threads import environment_limit, parse_num_threads, training_threads
from fedmsk.training import fit
from tests.test_training import CFG, loader_of, separable_data, tiny


def test_auto_takes_omp_num_threads_where_set_else_every_usable_core(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fedmsk.threads, "usable_cores", lambda: 12)
    assert training_threads("auto", environ={}) == 12
    assert training_threads("auto", environ={"OMP_NUM_THREADS": "3"}) == 3
    assert training_threads("auto", environ={"OMP_NUM_THREADS": "4,2"}) == 4  # nested levels
    for unusable in ("", "0", "many", "-2"):
        assert training_threads("auto", environ={"OMP_NUM_THREADS": unusable}) == 12
    # an explicit count is the count, whatever the environment says
    assert training_threads(2, environ={"OMP_NUM_THREADS": "8"}) == 2
    assert training_threads("5", environ={}) == 5


def test_nonsense_is_refused_with_the_setting_named() -> None:
    assert parse_num_threads(" AUTO ") is None and parse_num_threads(None) is None
    assert environment_limit({}) is None
    for bad in ("0", "-1", "2.5", "all"):
        with pytest.raises(ValueError, match=r"train\.num_threads"):
            parse_num_threads(bad)


def test_the_default_is_auto() -> None:
    assert TrainConfig().num_threads == "auto"
    assert compose([]).train.num_threads == "auto"
    assert compose(["train.num_threads=3"]).train.num_threads == "3"


def test_fit_trains_on_the_resolved_count_and_restores_the_previous_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[int] = []
    original = torch.set_num_threads

    def record(count: int) -> None:
        seen.append(count)
        original(count)

    monkeypatch.setattr(torch, "set_num_threads", record)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    original(1)
    fit_cfg = replace(CFG, num_threads="auto", max_steps=1)
    fit(tiny(), loader_of(separable_data()), fit_cfg, num_classes=2)
    assert seen == [2, 1]  # trained on the environment's 2, then back to the caller's 1
    assert torch.get_num_threads() == 1


def test_a_simulated_site_gets_its_cpu_share_and_a_set_count_stays() -> None:
    averaging = compose(["strategy=fedavg"])
    assert _simulated_threads(averaging, [], []) == ["train.num_threads=1"]
    shared = compose(["strategy=fedavg", "federation.client_num_cpus=3"])
    assert _simulated_threads(shared, [], []) == ["train.num_threads=3"]
    assert _simulated_threads(averaging, ["train.num_threads=4"], []) == []
    assert _simulated_threads(compose(["train.num_threads=4"]), [], []) == []


def test_cyclic_gives_its_one_training_site_every_usable_core(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import fedmsk.data.loader_settings

    monkeypatch.setattr(fedmsk.data.loader_settings, "usable_cores", lambda: 3)  # e.g. taskset
    cyclic = compose(["strategy=cyclic"])
    resources = _sequential_resources(cyclic, [])
    assert resources == ["train.num_threads=3", "federation.client_num_cpus=3"]
    assert _simulated_threads(cyclic, [], resources) == []
    assert _sequential_resources(cyclic, ["train.num_threads=1"]) == [
        "federation.client_num_cpus=3"
    ]


def _fake_process(proc: Path, pid: int, argv: list[str], parent: int) -> None:
    (proc / str(pid)).mkdir(parents=True)
    (proc / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (proc / str(pid) / "stat").write_text(f"{pid} (some name) S {parent} 1 1 0")


def test_other_trainings_count_each_fedmsk_run_once_and_never_this_one(tmp_path: Path) -> None:
    """Another run counts once (its `time` wrapper does not); this process's own ancestors, a
    fedmsk command that does not train and other Python programs do not count."""
    proc = tmp_path / "proc"
    me = os.getpid()
    bin_fedmsk = "/opt/venv/bin/fedmsk"
    _fake_process(proc, me, ["/opt/venv/bin/python", "-m", "pytest"], parent=100)
    _fake_process(proc, 100, ["/opt/venv/bin/python", bin_fedmsk, "simulate"], parent=1)
    _fake_process(proc, 200, ["/opt/venv/bin/python3.11", bin_fedmsk, "train", "--mode"], 1)
    _fake_process(proc, 300, ["/usr/bin/time", "-f", "%e", bin_fedmsk, "train"], parent=1)
    _fake_process(proc, 400, ["/opt/venv/bin/python", bin_fedmsk, "report", "runs/x"], 1)
    _fake_process(proc, 500, ["/opt/venv/bin/python", "/srv/other/train.py"], parent=1)
    (proc / "self").mkdir()
    assert fedmsk.threads.other_fedmsk_trainings(proc) == [200]
    assert fedmsk.threads.other_fedmsk_trainings(tmp_path / "no-proc") == []


def test_a_run_beside_another_fedmsk_training_is_warned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real process named like the console script is found in /proc, and a run that takes
    two threads beside it prints a warning naming it; one thread is left alone."""
    from fedmsk.commands.simulate import print_busy_machine_warning

    if not Path("/proc/self/cmdline").exists():
        pytest.skip("needs Linux /proc")
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)  # `make test` sets it to PASSIVE
    script = tmp_path / "fedmsk"
    script.write_text("import time\ntime.sleep(60)\n")
    other = subprocess.Popen([sys.executable, str(script), "train", "--mode", "pooled"])
    try:
        for _ in range(50):  # until the new process shows its arguments
            if other.pid in fedmsk.threads.other_fedmsk_trainings():
                break
            time.sleep(0.1)
        print_busy_machine_warning(compose(["train.num_threads=2"]))
        printed = capsys.readouterr().out
        assert "warning: another fedmsk run is training on this machine" in printed
        assert str(other.pid) in printed and "train.num_threads=1" in printed
        print_busy_machine_warning(compose(["train.num_threads=1"]))
        assert capsys.readouterr().out == ""
        found = fedmsk.threads.other_fedmsk_trainings()
        passive = {"OMP_WAIT_POLICY": "passive"}
        assert fedmsk.threads.busy_machine_warning(2, found, passive) is None
        assert fedmsk.threads.busy_machine_warning(2, found, {}) is not None
    finally:
        other.kill()
        other.wait()
