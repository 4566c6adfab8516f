"""Site discovery: a site is the node its registered key maps to, and nodes outside the study
are sent nothing (issue 14 part 2). The grid here answers the alias query like a ClientApp
does and records every node a message was addressed to."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Error, Message, RecordDict

from fedmsk.config import compose, config_hash
from fedmsk.node_registry import NodeRegistryError, read_node_registry
from fedmsk.simulation import simulated_node_identity
from fedmsk.studies.runner import config_overrides
from server.discovery import SiteDiscoveryError, discover_sites, discovery_failure


@pytest.fixture(autouse=True)
def _identity(flower_task_identity: None) -> None:
    return None


class AliasGrid:
    """Connected nodes answering the alias query with the alias their own config declares."""

    def __init__(self, declared: dict[int, str]) -> None:
        self.declared = declared
        self.addressed: list[int] = []

    def get_node_ids(self) -> list[int]:
        return list(self.declared)

    def send_and_receive(self, messages: list[Message], timeout: float) -> list[Message]:
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            self.addressed.append(node)
            detail = ConfigRecord({"site-alias": self.declared[node]})
            reply = Message(RecordDict({"detail": detail}), reply_to=message)
            replies.append(reply)
        return replies


def _registry(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "supernodes" / "node-ids.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _cfg(registry: Path | str, sites: str = "a,b", timeout: float = 5) -> object:
    return compose(
        [
            f"federation.sites=[{sites}]",
            f"federation.node_registry={registry}",
            f"federation.connect_timeout_s={timeout}",
        ]
    )


def test_only_nodes_registered_for_the_studys_sites_are_asked(tmp_path: Path) -> None:
    registry = _registry(tmp_path, "a 11\nb 12\nc 13\n")
    # 13 is registered for a site outside this study; 99 is not registered at all (a node of
    # another federation on the same SuperLink would look like this)
    grid = AliasGrid({11: "a", 12: "b", 13: "c", 99: "a"})
    found = discover_sites(grid, _cfg(registry))  # type: ignore[arg-type]
    assert found.node_alias == {11: "a", 12: "b"}
    assert found.ignored_nodes == [13, 99]
    assert sorted(grid.addressed) == [11, 12], grid.addressed


def test_a_node_declaring_another_sites_alias_is_refused(tmp_path: Path) -> None:
    registry = _registry(tmp_path, "a 11\nb 12\n")
    grid = AliasGrid({11: "a", 12: "a"})
    with pytest.raises(SiteDiscoveryError, match=r"registered for site b \(node ID 12\) .*site-a"):
        discover_sites(grid, _cfg(registry))  # type: ignore[arg-type]


def test_a_listed_site_without_a_registered_key_is_refused_before_any_message(
    tmp_path: Path,
) -> None:
    registry = _registry(tmp_path, "a 11\n")
    grid = AliasGrid({11: "a", 12: "b"})
    with pytest.raises(NodeRegistryError, match=r"node-ids.txt has no node ID for b"):
        discover_sites(grid, _cfg(registry))  # type: ignore[arg-type]
    assert grid.addressed == []


def test_a_run_that_says_nothing_about_node_identity_is_refused() -> None:
    grid = AliasGrid({1: "a", 2: "b"})
    with pytest.raises(ValueError, match="federation.node_registry is not set"):
        discover_sites(grid, compose(["federation.sites=[a,b]"]))  # type: ignore[arg-type]
    assert grid.addressed == []


def test_without_a_registry_two_nodes_claiming_one_site_stop_the_run() -> None:
    grid = AliasGrid({1: "a", 2: "b", 3: "a"})
    with pytest.raises(SiteDiscoveryError, match=r"nodes 1, 3 all declare site-alias a"):
        discover_sites(grid, _cfg("none"))  # type: ignore[arg-type]


def test_without_a_registry_declared_aliases_are_taken_and_strangers_left_out() -> None:
    grid = AliasGrid({1: "a", 2: "b", 3: "x"})
    found = discover_sites(grid, _cfg("none"))  # type: ignore[arg-type]
    assert found.node_alias == {1: "a", 2: "b"}
    assert found.ignored_nodes == [3]


def test_a_registered_site_that_never_connects_is_named(tmp_path: Path) -> None:
    registry = _registry(tmp_path, "a 11\nb 12\n")
    grid = AliasGrid({11: "a"})
    with pytest.raises(SiteDiscoveryError, match=r"federation.sites: b did not connect within 1 s"):
        discover_sites(grid, _cfg(registry, timeout=1))  # type: ignore[arg-type]


def test_registry_file_rules(tmp_path: Path) -> None:
    rotated = _registry(tmp_path, "# written by register-supernodes.sh\na 11\nb 12\na 31\n\n")
    assert read_node_registry(rotated) == {"a": 31, "b": 12}  # a re-registered key: last wins
    bad = tmp_path / "bad.txt"
    bad.write_text("a 11\nb twelve\n")
    with pytest.raises(NodeRegistryError, match=r"bad.txt line 2: expected '<site> <node id>'"):
        read_node_registry(bad)
    shared = tmp_path / "shared.txt"
    shared.write_text("a 11\nb 11\n")
    with pytest.raises(NodeRegistryError, match="node ID 11 is listed for both a and b"):
        read_node_registry(shared)
    with pytest.raises(NodeRegistryError, match="must be an absolute path"):
        read_node_registry(Path("node-ids.txt"))
    with pytest.raises(NodeRegistryError, match="does not exist: run .*register-supernodes.sh"):
        read_node_registry(tmp_path / "missing.txt")


def test_simulations_declare_self_declared_aliases_and_the_hash_ignores_the_binding() -> None:
    assert simulated_node_identity(["seed=1"]) == ["seed=1", "federation.node_registry=none"]
    given = ["federation.node_registry=/x/node-ids.txt"]
    assert simulated_node_identity(given) == given
    # a study's variant repeats every setting of the main run, the unset registry included
    variant = [*config_overrides(compose(["federation.sites=[a,b]"])), "seed=2"]
    assert any(o.startswith("federation.node_registry=") for o in variant)
    resolved = simulated_node_identity(variant)
    assert [o for o in resolved if "node_registry" in o] == ["federation.node_registry=none"]
    assert compose(resolved).federation.node_registry == "none"
    base = compose(["federation.sites=[a,b]"])
    bound = compose(["federation.sites=[a,b]", "federation.node_registry=/x/node-ids.txt"])
    assert config_hash(base) == config_hash(bound)  # a run resumes after the kit moved


def test_discovery_failure_tells_missing_strange_and_silent_nodes_apart() -> None:
    cfg = compose(["federation.sites=[a,b,c]", "federation.connect_timeout_s=30"])
    text = discovery_failure(cfg, seen={"a", "x"}, silent=1)
    assert text.startswith("federation.sites: b, c did not connect within 30 s")
    assert "alias not in federation.sites: x" in text
    assert "1 connected node(s) did not answer" in text
    assert ";" not in discovery_failure(cfg, seen={"a"}, silent=0)


def test_discovery_stops_early_when_every_query_fails_on_the_node() -> None:
    """A ClientApp that cannot start answers with an error: say so, do not wait 300 s."""

    class BrokenNodes:
        def get_node_ids(self) -> list[int]:
            return [1, 2]

        def send_and_receive(self, messages: list[Message], timeout: float) -> list[Message]:
            reason = "<class 'ImportError'>:<'cannot import name x'>"
            return [Message(Error(code=0, reason=reason), reply_to=m) for m in messages]

    started = time.monotonic()
    with pytest.raises(SiteDiscoveryError, match=r"2 connected node\(s\) answered .*ImportError"):
        discover_sites(BrokenNodes(), _cfg("none", timeout=300))  # type: ignore[arg-type]
    assert time.monotonic() - started < 30
