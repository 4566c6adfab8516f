"""A real deployment on 127.0.0.1: a TLS SuperLink with node authentication and three
SuperNodes, all from ``fedmsk provision`` kits, run the fedmsk app with ``flwr run``.

The same SuperLink then refuses a node whose key was never registered, and a node that does not
trust the SuperLink's CA refuses the SuperLink. Every process is started in its own session and
stopped by the module fixture (with the helpers Flower itself detaches), also when a test fails.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from deploy_helpers import (
    REPO,
    DeploymentError,
    ProcessSet,
    Started,
    deployment_env,
    free_ports,
    log_matches,
    tls_ready,
    toml_string,
    wait_until,
    write_unregistered_key,
)

from fedmsk.data.synthetic import generate_federation
from fedmsk.provision import ProvisionResult, provision, write_node_config

pytestmark = pytest.mark.slow

SITES = ["site00", "site01", "site02"]
HELDOUT = "site02"
ROUNDS = 2
SUPERLINK_START_S = 90
REGISTER_S = 90
NODE_CONNECT_S = 120
RUN_S = 540
REFUSAL_S = 90
# flower-supernode logs this once the SuperLink has accepted the node.
CONNECTED = r"SuperNode ID"


@dataclass
class Deployment:
    """The running federation and what the tests need to reach it."""

    tmp: Path
    fed_root: Path
    kits: ProvisionResult
    procs: ProcessSet
    coordinator_env: dict[str, str]
    superlink: Started
    nodes: dict[str, Started]
    spare_ports: list[int]


def with_port(argv: list[str], port: int) -> list[str]:
    """A kit's ``flower-supernode`` argv with another local ``--port`` (the kits' defaults,
    9094 upwards, may be taken on a shared machine)."""
    out = list(argv)
    out[out.index("--port") + 1] = str(port)
    return out


def with_option(argv: list[str], option: str, value: str) -> list[str]:
    out = list(argv)
    out[out.index(option) + 1] = value
    return out


def _start_superlink(procs: ProcessSet, kits: ProvisionResult, tmp: Path, port: int) -> Started:
    coordinator = kits.coordinator
    env = deployment_env(tmp / "homes" / "superlink")
    superlink = procs.start("superlink", coordinator.superlink_command, env, coordinator.dir)
    wait_until(
        lambda: superlink.exited() or tls_ready(port, kits.ca_cert, kits.server_name),
        SUPERLINK_START_S,
        "the SuperLink answering TLS on 127.0.0.1",
        procs.report,
    )
    if superlink.exited():
        raise DeploymentError(f"the SuperLink exited at start\n{procs.report()}")
    return superlink


def _register(procs: ProcessSet, kits: ProvisionResult, env: dict[str, str]) -> None:
    for site, argv in kits.coordinator.register_commands.items():
        code, output = procs.run(f"register-{site}", argv, env, kits.coordinator.dir, REGISTER_S)
        if code != 0 or "registered" not in output:
            raise DeploymentError(f"flwr supernode register for {site}: exit {code}\n{output}")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp("deploy")
    fed_root = tmp / "fed"
    generate_federation(fed_root, task="xray_fracture", centers=3, seed=5, scale=0.5)
    port, *ports = free_ports(1 + len(SITES) + 2)
    kits = provision(
        tmp / "provision", SITES, server_name="localhost", bind_host="127.0.0.1", port=port
    )
    procs = ProcessSet(tmp / "logs")
    coordinator_env = deployment_env(kits.coordinator.flwr_home)
    try:
        superlink = _start_superlink(procs, kits, tmp, port)
        _register(procs, kits, coordinator_env)
        nodes = {}
        for site, node_port in zip(SITES, ports, strict=False):
            kit = kits.sites[site]
            write_node_config(kit, (fed_root / site).resolve(), "cpu")
            env = deployment_env(tmp / "homes" / site)
            nodes[site] = procs.start(site, with_port(kit.command, node_port), env, kit.dir)
        yield Deployment(
            tmp=tmp,
            fed_root=fed_root,
            kits=kits,
            procs=procs,
            coordinator_env=coordinator_env,
            superlink=superlink,
            nodes=nodes,
            spare_ports=ports[len(SITES) :],
        )
    finally:
        procs.stop_all()
    leftovers = procs.leftovers()
    assert not leftovers, f"processes still alive after teardown: {leftovers}"


def _overrides(fed_root: Path, run_dir: Path) -> list[str]:
    return [
        f"data.root={fed_root}",
        "data.synthetic=false",
        "federation=small",
        f"federation.num_rounds={ROUNDS}",
        "model=resnet18",
        "data.image_size=32",
        "train.batch_size=16",
        f"run_dir={run_dir}",
        f"federation.sites=[{','.join(SITES)}]",
        f"federation.heldout_sites=[{HELDOUT}]",
        "federation.connect_timeout_s=120",
    ]


def _metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _refused_node(
    d: Deployment, name: str, argv: list[str], pattern: str
) -> tuple[Started, bool, str]:
    """Start a node and wait (bounded) until it exits or logs ``pattern``; then stop it."""
    env = deployment_env(d.tmp / "homes" / name)
    node = d.procs.start(name, argv, env, d.tmp)
    try:
        wait_until(
            lambda: node.exited() or log_matches(node, pattern),
            REFUSAL_S,
            f"{name} being refused",
            d.procs.report,
        )
        connected = log_matches(node, CONNECTED)
        log = node.tail(200_000)
    finally:
        d.procs.stop(node)
    return node, connected, log


def _intruder_config(d: Deployment, name: str) -> Path:
    path = d.tmp / name / "node-config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'data-dir = "{(d.fed_root / "site00").resolve()}"\nsite-alias = "{name}"\n')
    return path


def test_node_with_unregistered_key_is_refused(deployment: Deployment) -> None:
    d = deployment
    key = write_unregistered_key(d.tmp / "intruder" / "node.key")
    argv = with_port(d.kits.sites["site00"].command, d.spare_ports[0])
    argv = with_option(argv, "--auth-supernode-private-key", str(key))
    argv = with_option(argv, "--node-config", str(_intruder_config(d, "intruder")))
    node, connected, log = _refused_node(d, "unregistered-node", argv, r"\b2004\b")
    assert not connected, log[-3000:]
    assert "2004" in log, log[-3000:]


def test_node_that_does_not_trust_the_ca_refuses_the_superlink(deployment: Deployment) -> None:
    d = deployment
    other = provision(d.tmp / "other-federation", ["elsewhere"], server_name="localhost")
    argv = with_port(d.kits.sites["site00"].command, d.spare_ports[1])
    argv = with_option(argv, "--root-certificates", str(other.ca_cert))
    argv = with_option(argv, "--node-config", str(_intruder_config(d, "untrusting")))
    node, connected, log = _refused_node(d, "untrusting-node", argv, "CERTIFICATE_VERIFY_FAILED")
    assert not connected, log[-3000:]
    assert "CERTIFICATE_VERIFY_FAILED" in log, log[-3000:]


def test_two_rounds_over_tls_with_node_auth_finish(deployment: Deployment) -> None:
    d = deployment
    wait_until(
        lambda: all(log_matches(n, CONNECTED) or n.exited() for n in d.nodes.values()),
        NODE_CONNECT_S,
        "all three SuperNodes connecting",
        d.procs.report,
    )
    exited = [site for site, node in d.nodes.items() if node.exited()]
    assert not exited, f"SuperNodes {exited} exited\n{d.procs.report()}"

    run_dir = (d.tmp / "run").resolve()
    run_config = d.tmp / "run_config.toml"
    run_config.write_text(
        f"fedmsk-overrides = {toml_string(json.dumps(_overrides(d.fed_root.resolve(), run_dir)))}\n"
    )
    argv = ["flwr", "run", str(REPO), "fedmsk", "--run-config", str(run_config), "--stream"]
    code, output = d.procs.run("flwr-run", argv, d.coordinator_env, d.tmp, RUN_S)
    assert code == 0, f"flwr run exit {code}\n{d.procs.report()}"
    # `flwr run` exits 0 even when the run failed: judge by what the ServerApp wrote.
    results_path = run_dir / "results.json"
    assert results_path.is_file(), f"no results.json in {run_dir}\n{d.procs.report()}"
    results = json.loads(results_path.read_text())
    assert sorted(results["sites"]) == SITES
    assert results["sites"][HELDOUT]["role"] == "heldout"
    assert {results["sites"][s]["role"] for s in SITES if s != HELDOUT} == {"train"}
    assert results["run"]["training_sites"] == ["site00", "site01"]
    assert results["run"]["heldout_sites"] == [HELDOUT]
    assert results["failures"] == [], results["failures"]
    trained = {m["round"] for m in _metrics(run_dir) if m["phase"] == "train"}
    assert {1, 2} <= trained
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == [f"round_{r:04d}.ckpt" for r in range(1, ROUNDS + 1)]
    assert (run_dir / "final_model.npz").is_file()
