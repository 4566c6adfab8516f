"""Process plumbing for the real-deployment test: start Flower's own command-line tools, wait
for them with bounded deadlines, and stop every process they started, also on failure.

Flower detaches some of its helpers: the SuperLink starts its ``flower-superexec`` in a new
session, so killing the SuperLink's process group alone would leave that one running (it does
watch its parent, but a test must not rely on that). :meth:`ProcessSet.stop_all` therefore
collects each started process's descendants from ``/proc`` *before* signalling anything (once
the parent is gone they are re-parented and can no longer be traced), then terminates every
process group it found, and kills what is left after a grace period.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
TAIL_CHARS = 4000


class DeploymentError(AssertionError):
    """A step of the deployment did not happen in time; the message carries the logs' tails."""


# --------------------------------------------------------------------------- ports and files


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports, all held open together while picking so that none repeats.

    Another worker may still grab one between this call and its use; the test keeps that window
    short by starting the processes right after.
    """
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def write_unregistered_key(path: Path) -> Path:
    """A fresh EC P-384 private key in the OpenSSH format Flower reads, never registered."""
    key = ec.generate_private_key(ec.SECP384R1())
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def toml_string(value: str) -> str:
    """A TOML literal string (single quotes: JSON's double quotes need no escaping)."""
    if "'" in value or "\n" in value:
        raise ValueError(f"cannot write {value!r} as a TOML literal string")
    return f"'{value}'"


def deployment_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower's tools, as a hospital or coordinator would have it.

    This venv comes first on PATH: the SuperLink and SuperNodes spawn ``flower-superexec`` and
    the app processes by name. ``FLWR_HOME`` is private to each process, because FABs are
    installed there and co-hosted nodes must not share it. Neither ``FEDMSK_CONFIG_DIR`` nor
    ``PYTHONPATH`` is set (unlike ``fedmsk.simulation``): the FAB carries ``configs/`` and the
    code, and Flower puts the installed FAB first on ``sys.path``, so the apps run from the
    FAB exactly as they would at a site; a FAB that lacked its configs would fail this test.
    """
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(VENV_BIN), env.get("PATH", "")])
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    flwr_home.mkdir(parents=True, exist_ok=True)
    return env


def venv_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` with its program taken from this venv when it is there."""
    program = VENV_BIN / argv[0]
    return [str(program) if program.exists() else argv[0], *argv[1:]]


# --------------------------------------------------------------------------- process tree


def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, session id) of every process, read from /proc (Linux only)."""
    table: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # After the command name (in parentheses, may hold spaces): state ppid pgrp session ...
        fields = stat[stat.rfind(")") + 2 :].split()
        table[int(entry)] = (int(fields[1]), int(fields[3]))
    return table


def process_tree(root: int) -> list[int]:
    """Living processes under ``root``: its descendants, and the members of the session it
    leads (started with ``start_new_session``), also those whose parent has exited already,
    plus their descendants (which may sit in sessions of their own)."""
    table = _process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    stack = [root] + [pid for pid, (_, sid) in table.items() if sid == root]
    while stack:
        pid = stack.pop()
        if pid in found or pid not in table:
            continue
        found.add(pid)
        stack += children.get(pid, [])
    return sorted(found)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] != "Z"


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


# --------------------------------------------------------------------------- started processes


@dataclass
class Started:
    """One process this test started, in its own session, with its output in ``log``."""

    name: str
    process: subprocess.Popen
    log: Path

    def tail(self, chars: int = TAIL_CHARS) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return text[-chars:]

    def exited(self) -> bool:
        return self.process.poll() is not None


@dataclass
class ProcessSet:
    """Every process a test starts; :meth:`stop_all` ends them and their descendants."""

    log_dir: Path
    started: list[Started] = field(default_factory=list)
    signalled: list[int] = field(default_factory=list)
    """Every pid :meth:`stop_all` found and signalled (started processes and descendants)."""

    def start(self, name: str, argv: Sequence[str], env: dict[str, str], cwd: Path) -> Started:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                venv_argv(argv),
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        started = Started(name, process, log_path)
        self.started.append(started)
        return started

    def run(
        self, name: str, argv: Sequence[str], env: dict[str, str], cwd: Path, timeout: float
    ) -> tuple[int | None, str]:
        """Run a command to its end within ``timeout`` s; ``None`` as the code if it ran over
        (it is then stopped). Returns (exit code, its output)."""
        started = self.start(name, argv, env, cwd)
        try:
            code: int | None = started.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        if code is None:
            self.stop(started)
        return code, started.log.read_text(errors="replace")

    def stop(self, started: Started, grace: float = 10.0) -> None:
        self.signalled += _terminate_tree(_roots([started]), grace)
        with contextlib.suppress(subprocess.TimeoutExpired):
            started.process.wait(timeout=grace)

    def stop_all(self, grace: float = 10.0) -> None:
        """End every started process, its group, and every descendant found beforehand."""
        self.signalled += _terminate_tree(_roots(self.started), grace)
        for started in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                started.process.wait(timeout=grace)

    def leftovers(self) -> list[int]:
        """Started processes, and descendants found by :meth:`stop_all`, that are still alive."""
        running = [s.process.pid for s in self.started if s.process.poll() is None]
        return sorted(set(running) | set(alive_pids(self.signalled)))

    def report(self) -> str:
        """The tail of every log, for an assertion message."""
        parts = []
        for started in self.started:
            code = started.process.poll()
            parts.append(f"----- {started.name} (exit {code}) {started.log}\n{started.tail()}")
        return "\n".join(parts)


def _roots(started: list[Started]) -> list[int]:
    """Pids whose trees are ours to end. A process that has exited and been reaped still
    counts when its pid is free (its session's orphans keep that pid from being reused); a
    reaped pid that is alive again belongs to someone else and is left alone."""
    roots = []
    for item in started:
        if item.process.poll() is None or not Path(f"/proc/{item.process.pid}").exists():
            roots.append(item.process.pid)
    return roots


def _terminate_tree(roots: list[int], grace: float) -> list[int]:
    """SIGTERM the process groups of every process under the roots, then SIGKILL the rest.

    Groups are only signalled when they are not this test's own group, so a descendant that
    shares pytest's group (none should) is signalled by pid instead.
    """
    own_group = os.getpgid(0)
    pids = sorted({pid for root in roots for pid in process_tree(root)})
    groups = {g for g in (_pgid(p) for p in pids) if g is not None and g != own_group}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for group in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, sig)
        for pid in pids:
            if _pgid(pid) == own_group:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
        if not any(_alive(p) for p in pids):
            break
    return pids


def alive_pids(pids: Sequence[int]) -> list[int]:
    return [p for p in pids if _alive(p)]


# --------------------------------------------------------------------------- bounded waits


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, report: Callable[[], str]
) -> None:
    """Poll ``condition`` until it holds, or fail after ``timeout`` s naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    if condition():
        return
    raise DeploymentError(f"{what} did not happen within {timeout:.0f} s\n{report()}")


def tls_ready(port: int, ca_cert: Path, server_name: str) -> bool:
    """Whether a TLS server trusted by ``ca_cert`` answers a handshake on 127.0.0.1:port."""
    context = ssl.create_default_context(cafile=str(ca_cert))
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=2) as raw,
            context.wrap_socket(raw, server_hostname=server_name),
        ):
            return True
    except (OSError, ssl.SSLError):
        return False


def log_matches(started: Started, pattern: str) -> bool:
    return re.search(pattern, started.tail(200_000)) is not None
