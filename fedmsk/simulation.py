"""Run the fedmsk Flower app in Flower's simulation engine, on this machine.

The core never imports Flower, so this launcher drives Flower's own command-line tools:
a private SuperLink in simulation mode on a free loopback port (offline: runtime dependency
installation disabled), then ``flwr run`` of the app in this repository with the Hydra
overrides as its only run config. The SuperLink is always stopped afterwards, also when the run
fails or the caller is interrupted (Ctrl-C) or terminated (SIGTERM: ``kill``, a batch
scheduler's time limit). ``flwr run`` exits 0 even when a run failed, so success is
judged by the run directory: ``results.json`` must have been written by the ServerApp.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from fedmsk.config import ExperimentConfig, config_dir, sites_per_round
from fedmsk.data.loader_settings import usable_cores
from fedmsk.node_registry import SELF_DECLARED
from fedmsk.run_dir import failure_cause, results_written_since

APP_DIR = Path(__file__).resolve().parent.parent
CONNECTION = "fedmsk-sim"
PROGRESS_POLL_S = 1.0


class SimulationError(RuntimeError):
    """The federated run did not finish; the message points at its log."""


@dataclass(frozen=True)
class SimulationPlan:
    cfg: ExperimentConfig
    overrides: list[str]
    num_supernodes: int
    log_path: Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def venv_program(name: str) -> str:
    """A console script of this Python's environment (Flower's ``flwr``), else from PATH."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _toml_string(value: str) -> str:
    return json.dumps(value)


def write_flwr_home(home: Path, port: int, plan: SimulationPlan) -> None:
    cfg = plan.cfg
    home.mkdir(parents=True, exist_ok=True)
    lines = [
        "[superlink]",
        f'default = "{CONNECTION}"',
        "",
        f"[superlink.{CONNECTION}]",
        f'address = "127.0.0.1:{port}"',
        "insecure = true",
        f"options.num-supernodes = {plan.num_supernodes}",
        f"options.backend.client-resources.num-cpus = {int(cfg.federation.client_num_cpus)}",
        f"options.backend.client-resources.num-gpus = {float(cfg.federation.client_num_gpus)}",
        f"options.backend.init-args.num-cpus = {usable_cores()}",
    ]
    (home / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _wait_for_health(port: int, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SimulationError(f"flower-superlink exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise SimulationError(f"flower-superlink did not answer on 127.0.0.1:{port} in {timeout:.0f} s")


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid``, read from Linux's /proc (an empty set where there is
    none). Parent links are followed, not sessions: Flower's SuperLink starts its SuperExec in a
    session of its own, which starts the simulation and Ray's processes in yet another."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = proc_stat_fields(stat)
        if stat.parent.name.isdigit() and fields and len(fields) > 1 and fields[1].isdigit():
            parents[int(stat.parent.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _signal_groups(pids: set[int], signum: int) -> None:
    """Send ``signum`` to the process group of each of ``pids``, never to this process's own."""
    own = os.getpgrp()
    groups = set()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            groups.add(os.getpgid(pid))
    for group in groups - {own}:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signum)


def _stop(process: subprocess.Popen, grace_s: float = 15.0) -> None:
    """Stop ``process`` and everything it started, in whatever session (SIGTERM, then SIGKILL
    after ``grace_s``). Stopping the SuperLink's own group alone left the simulation and its
    Ray cluster running after an interrupted run."""
    if process.poll() is not None:
        return
    tree = descendants(process.pid) | {process.pid}
    _signal_groups(tree, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace_s)
    while any(process_running(pid) for pid in tree) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = {pid for pid in tree if process_running(pid)}
    if process.poll() is None:  # also where /proc cannot say (not Linux)
        left.add(process.pid)
    if left:
        _signal_groups(left, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace_s)


def process_running(pid: int) -> bool:
    """Alive and not a zombie (a zombie's parent has yet to collect its exit status)."""
    fields = proc_stat_fields(Path(f"/proc/{pid}/stat"))
    return fields is not None and len(fields) > 0 and fields[0] != "Z"


def proc_stat_fields(stat: Path) -> list[str] | None:
    """The fields of a /proc/PID/stat after the command name (state, parent, ...); None when
    the process is gone. The name is cut at its last ")", as it may hold spaces or ")"."""
    try:
        return stat.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


@contextlib.contextmanager
def _terminate_through_cleanup() -> Iterator[None]:
    """SIGTERM ends this process through ``SystemExit`` while the run is on, so the ``finally``
    blocks that stop Flower's processes run. They live in sessions of their own (so a Ctrl-C
    reaches only this process, which then stops them in order); Python's default SIGTERM
    handling would leave a SuperLink on its port and a simulation training on the CPU after a
    ``kill`` or a scheduler's time limit. Outside the main thread signals cannot be handled,
    and nothing is changed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    terminated = False

    def exit_on_terminate(signum: int, _frame: object) -> None:
        nonlocal terminated
        terminated = True
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut cleanup
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_on_terminate)
    try:
        yield
    finally:
        if not terminated:  # once terminating, a repeated SIGTERM must not kill the exit (-15)
            signal.signal(signal.SIGTERM, previous)


def _environment(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["FLWR_HOME"] = str(home)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FEDMSK_CONFIG_DIR"] = str(config_dir())
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(APP_DIR), env.get("PYTHONPATH")]))
    env.setdefault("RAY_DEDUP_LOGS", "0")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def simulated_node_identity(overrides: list[str]) -> list[str]:
    """Simulated nodes have no keys to bind a site to: their aliases are taken as declared
    (``federation.node_registry=none``) unless the overrides name a registry themselves.
    An empty value names none: a study's variant runs repeat every setting of the main run's
    config, where the registry is still unset."""
    key = "federation.node_registry="
    named = [o for o in overrides if o.lstrip("+").startswith(key)]
    if named and named[-1].lstrip("+")[len(key) :].strip().strip("'\"").strip():
        return list(overrides)
    kept = [o for o in overrides if o not in named]
    return [*kept, f"{key}{SELF_DECLARED}"]


def run_simulation(plan: SimulationPlan, progress: TextIO | None = None) -> Path:
    """Run the federation; return the run directory (it holds results.json).

    With ``progress`` (a stream such as ``sys.stdout``) a line per round is printed there.
    """
    run_dir = Path(plan.cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    home = run_dir / ".flwr"
    port = free_port()
    write_flwr_home(home, port, plan)
    run_config = home / "run_config.toml"
    overrides = simulated_node_identity(plan.overrides)
    run_config.write_text(
        f"fedmsk-overrides = {_toml_string(json.dumps(overrides))}\n", encoding="utf-8"
    )
    env = _environment(home)
    started = time.time()
    plan.log_path.parent.mkdir(parents=True, exist_ok=True)
    with _terminate_through_cleanup(), plan.log_path.open("a", encoding="utf-8") as log:
        superlink = subprocess.Popen(
            [
                venv_program("flower-superlink"),
                "--insecure",
                "--simulation",
                "--isolation",
                "subprocess",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--disable-runtime-dependency-installation",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=run_dir,
        )
        (home / "superlink.pid").write_text(f"{superlink.pid}\n", encoding="utf-8")
        try:
            _wait_for_health(port, superlink)
            runner = subprocess.Popen(
                [
                    venv_program("flwr"),
                    "run",
                    str(APP_DIR),
                    CONNECTION,
                    "--run-config",
                    str(run_config),
                    "--stream",
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # stopped with its children if this process is stopped
                cwd=run_dir,
            )
            try:
                returncode = _follow(runner, run_dir, plan, progress)
            finally:
                _stop(runner)
        finally:
            _stop(superlink)
    finished = results_written_since(run_dir, started)
    if returncode != 0 or not finished:
        cause = failure_cause(run_dir, started)
        if cause:
            raise SimulationError(f"{cause} (details: {plan.log_path})")
        raise SimulationError(
            f"{plan.log_path}: the federated run did not finish (flwr run exit "
            f"{returncode}); see this log for the cause"
        )
    return run_dir


def _resumed_round(cfg: ExperimentConfig) -> int:
    """The round a resumed run starts after: its newest checkpoint's (``round_NNNN.ckpt``)."""
    if not cfg.resume:
        return 0
    rounds = [
        int(path.stem.split("_", 1)[1])
        for path in (Path(cfg.resume) / "checkpoints").glob("round_*.ckpt")
        if path.stem.split("_", 1)[1].isdigit()
    ]
    return max(rounds, default=0)


def _follow(
    runner: subprocess.Popen, run_dir: Path, plan: SimulationPlan, progress: TextIO | None
) -> int:
    """Wait for ``flwr run``, printing a line per round from the run's metrics as it goes."""
    from fedmsk.progress import MetricsFollower, ProgressPrinter

    if progress is None:
        return runner.wait()
    cfg = plan.cfg
    training = [s for s in cfg.federation.sites if s not in cfg.federation.heldout_sites]
    follower = MetricsFollower(run_dir / "metrics.jsonl", resumed_after=_resumed_round(cfg))
    printer = ProgressPrinter(
        total=cfg.federation.num_rounds,
        expected_sites=sites_per_round(cfg, len(training)),
        stream=progress,
    )
    while True:
        returncode = runner.poll()
        printer.feed(follower.read_new())
        if returncode is not None:
            return returncode
        time.sleep(PROGRESS_POLL_S)
