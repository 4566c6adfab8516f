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
import shutil
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

    def crash(self, started: Started) -> None:
        """SIGKILL a started process and everything under it at once, as a power cut would: no
        shutdown handler runs, so a SuperLink learns of a crashed node only from its missing
        heartbeats."""
        pids = process_tree(started.process.pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.signalled += pids
        started.process.wait(timeout=30)

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


def tls_ready_in(network: Network, port: int, ca_cert: Path, server_name: str) -> bool:
    """:func:`tls_ready`, asked from inside the coordinator's namespace when it has one."""
    if not network.isolated:
        return tls_ready(port, ca_cert, server_name)
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        "from deploy_helpers import tls_ready; "
        f"sys.exit(0 if tls_ready({port}, __import__('pathlib').Path({str(ca_cert)!r}), "
        f"{server_name!r}) else 1)"
    )
    argv = network.argv(COORDINATOR, [sys.executable, "-c", code])
    return subprocess.run(argv, capture_output=True, timeout=30).returncode == 0


def log_matches(started: Started, pattern: str) -> bool:
    return re.search(pattern, started.tail(200_000)) is not None


# --------------------------------------------------------------------------- networks

COORDINATOR = "coordinator"
SUBNET = "10.77.0"
COORDINATOR_IP = f"{SUBNET}.1"


@dataclass
class Network:
    """Where each party of a test deployment runs.

    Isolated: the coordinator in a Linux network namespace of its own that holds a bridge
    (``COORDINATOR_IP``), each hospital in its own namespace joined to that bridge by a veth
    link on an *isolated* bridge port, so a hospital reaches the coordinator and no other
    hospital, and nothing outside reaches any of them. Otherwise everyone shares this machine's
    loopback and ``reason`` says why namespaces could not be made.
    """

    namespaces: dict[str, str] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=dict)
    reason: str = ""

    @property
    def isolated(self) -> bool:
        return bool(self.namespaces)

    def argv(self, party: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside ``party``'s namespace (unchanged without namespaces)."""
        namespace = self.namespaces.get(party)
        if namespace is None:
            return list(argv)
        return [_ip_command(), "netns", "exec", namespace, *venv_argv(argv)]

    def remove(self) -> None:
        for namespace in self.namespaces.values():
            subprocess.run([_ip_command(), "netns", "del", namespace], capture_output=True)


def _ip_command() -> str:
    return shutil.which("ip") or "/usr/sbin/ip"


def make_network(sites: Sequence[str], tag: str) -> Network:
    """Namespaces for the coordinator and each site (see :class:`Network`); a loopback
    :class:`Network` with the failing command's error when they cannot be made (no root, no
    ``ip``, a kernel without namespaces, bridges or veth)."""
    if not sys.platform.startswith("linux") or shutil.which("ip") is None:
        return Network(reason="the `ip` command (iproute2) is not installed")
    network = Network()
    coordinator = f"{tag}c"
    # (the party whose namespace a step creates, the `ip` arguments)
    plan: list[tuple[str | None, str]] = [
        (COORDINATOR, f"netns add {coordinator}"),
        (None, f"-n {coordinator} link set lo up"),
        (None, f"-n {coordinator} link add br0 type bridge"),
        (None, f"-n {coordinator} addr add {COORDINATOR_IP}/24 dev br0"),
        (None, f"-n {coordinator} link set br0 up"),
    ]
    for i, site in enumerate(sites):
        hospital, veth = f"{tag}h{i}", f"v{i}"
        plan += [
            (site, f"netns add {hospital}"),
            (None, f"-n {hospital} link set lo up"),
            (None, f"-n {coordinator} link add {veth} type veth peer name eth0 netns {hospital}"),
            (None, f"-n {coordinator} link set {veth} master br0"),
            (None, f"-n {coordinator} link set dev {veth} type bridge_slave isolated on"),
            (None, f"-n {coordinator} link set {veth} up"),
            (None, f"-n {hospital} addr add {SUBNET}.{10 + i}/24 dev eth0"),
            (None, f"-n {hospital} link set eth0 up"),
        ]
    for party, step in plan:
        done = subprocess.run([_ip_command(), *step.split()], capture_output=True, text=True)
        if done.returncode != 0:
            network.remove()
            error = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            return Network(reason=f"`ip {step}` failed: {error[0]}")
        if party is not None:
            network.namespaces[party] = step.split()[-1]
    network.addresses = {COORDINATOR: COORDINATOR_IP}
    network.addresses |= {site: f"{SUBNET}.{10 + i}" for i, site in enumerate(sites)}
    return network


def tcp_sockets(pid: int) -> list[tuple[str, str, str]]:
    """(state, local address, remote address) of the TCP sockets in ``pid``'s network
    namespace, from ``/proc/PID/net/tcp`` and ``tcp6``; addresses as ``ip:port`` text."""
    rows = []
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            rows.append((fields[3], _address(fields[1]), _address(fields[2])))
    return rows


def _address(text: str) -> str:
    host, port = text.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        ip = socket.inet_ntop(socket.AF_INET, raw[::-1])
    else:  # the kernel prints IPv6 as four host-order 32-bit words
        words = [raw[i : i + 4][::-1] for i in range(0, 16, 4)]
        ip = socket.inet_ntop(socket.AF_INET6, b"".join(words))
    return f"{ip}:{int(port, 16)}"


TCP_LISTEN = "0A"
TCP_ESTABLISHED = "01"
