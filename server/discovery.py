"""Which connected node is which site, decided before any model is sent.

In a deployment a site is the node its registered key maps to (``federation.node_registry``,
see ``fedmsk.node_registry``): only those nodes are asked for their alias, and a node whose
declared alias is not the site its key was registered for stops the run with both names, as
does a listed site without a registered key. Every other connected node (another study's, a
spare) is sent nothing at all and is listed in results.json. In a simulation
(``node_registry=none``) the declared aliases are believed, but two nodes claiming one site
stop the run: there is no key to tell which one is the hospital.

Waiting is bounded by ``federation.connect_timeout_s``; the error then says which sites did
not connect, which nodes declared an alias outside the study and how many did not answer.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import MessageType
from flwr.serverapp import Grid

from fedmsk.config import ExperimentConfig
from fedmsk.node_registry import SELF_DECLARED, study_nodes
from server.messages import messages_to
from server.rounds import reply_error

log = logging.getLogger("fedmsk.server")

DISCOVERY_ERRORS = 3
"""Error replies to the alias query after which a node's ClientApp is taken as broken."""

QUERY_TIMEOUT_S = 60.0


class SiteDiscoveryError(RuntimeError):
    """The expected sites did not all connect in time, or a node is not who it says."""


@dataclass
class Discovery:
    """The study's nodes (ID -> site) and the connected nodes that were left out."""

    node_alias: dict[int, str]
    ignored_nodes: list[int] = field(default_factory=list)


def registered_sites(cfg: ExperimentConfig) -> dict[int, str] | None:
    """Node ID -> site from the coordinator's registry; None where aliases are self-declared.

    A run that says neither is refused: a deployment that believed declared aliases would
    send the model to whichever node claimed a hospital's name.
    """
    setting = cfg.federation.node_registry.strip()
    if setting == SELF_DECLARED:
        return None
    if not setting:
        raise ValueError(
            "federation.node_registry is not set: give the absolute path of the coordinator's "
            "supernodes/node-ids.txt (written by register-supernodes.sh) so that each site is "
            "bound to its registered key; the simulation engine sets it to 'none'"
        )
    return study_nodes(Path(setting), list(cfg.federation.sites))


def _duplicates(node_alias: dict[int, str], expected: set[str]) -> str | None:
    counts = Counter(a for a in node_alias.values() if a in expected)
    claimed = sorted(a for a, count in counts.items() if count > 1)
    if not claimed:
        return None
    parts = [
        f"nodes {', '.join(str(n) for n in sorted(k for k, v in node_alias.items() if v == a))} "
        f"all declare site-alias {a}"
        for a in claimed
    ]
    return (
        "; ".join(parts) + ": a site runs one node and without a node registry there is no key "
        "to tell which is the hospital (stop the extra node, or bind sites to keys with "
        "federation.node_registry)"
    )


def discover_sites(grid: Grid, cfg: ExperimentConfig) -> Discovery:
    """Wait for the expected sites, then ask each candidate node its alias (nothing else)."""
    expected = set(cfg.federation.sites)
    registry = registered_sites(cfg)
    deadline = time.monotonic() + cfg.federation.connect_timeout_s
    node_alias: dict[int, str] = {}
    ignored: set[int] = set()
    silent: set[int] = set()
    errors: dict[int, tuple[int, str]] = {}
    while True:
        connected = list(grid.get_node_ids())
        if registry is not None:
            ignored.update(n for n in connected if n not in registry)
            connected = [n for n in connected if n in registry]
        unknown = [n for n in connected if n not in node_alias]
        if unknown:
            answered = set()
            for reply in grid.send_and_receive(
                messages_to(unknown, None, {}, MessageType.QUERY), timeout=QUERY_TIMEOUT_S
            ):
                node = reply.metadata.src_node_id
                if not reply.has_error() and "detail" in reply.content:
                    answered.add(node)
                    alias = str(reply.content["detail"]["site-alias"])
                    if registry is not None and alias != registry[node]:
                        raise SiteDiscoveryError(
                            f"the node registered for site {registry[node]} (node ID {node}) "
                            f"declares site-alias {alias}: correct site-alias in that node's "
                            "node-config.toml and restart it, or check that its kit went to the "
                            "right hospital"
                        )
                    node_alias[node] = alias
                    errors.pop(node, None)
                elif reply.has_error():
                    count, _ = errors.get(node, (0, ""))
                    errors[node] = (count + 1, reply_error(reply))
            silent.update(n for n in unknown if n not in answered)
            silent.difference_update(answered)
            broken = sorted({name for count, name in errors.values() if count >= DISCOVERY_ERRORS})
            if broken:  # a ClientApp that cannot start answers every query with an error
                raise SiteDiscoveryError(
                    f"{len(errors)} connected node(s) answered the alias query with an error "
                    f"{DISCOVERY_ERRORS} times ({', '.join(broken)}): the ClientApp fails on the "
                    "node; its log (or flower.log in a simulation) has the traceback"
                )
        if registry is None and (duplicate := _duplicates(node_alias, expected)):
            raise SiteDiscoveryError(duplicate)
        seen = set(node_alias.values())
        if (expected and expected <= seen) or (not expected and node_alias):
            return _finish(node_alias, expected, ignored)
        if time.monotonic() > deadline:
            raise SiteDiscoveryError(discovery_failure(cfg, seen, len(silent)))
        time.sleep(1.0)


def _finish(node_alias: dict[int, str], expected: set[str], ignored: set[int]) -> Discovery:
    study = {n: a for n, a in node_alias.items() if not expected or a in expected}
    left_out = sorted(ignored | (set(node_alias) - set(study)))
    if left_out:
        log.warning(
            "%d connected node(s) not registered for a site of this study: sent no model "
            "(node IDs %s)",
            len(left_out),
            ", ".join(str(n) for n in left_out),
        )
    return Discovery(study, left_out)


def discovery_failure(cfg: ExperimentConfig, seen: set[str], silent: int) -> str:
    """Which sites never connected, which aliases are not in the study, how many nodes did
    not answer the alias query: three different things for hospital IT to look at."""
    expected = set(cfg.federation.sites)
    missing = ", ".join(sorted(expected - seen)) or "any site"
    parts = [
        f"federation.sites: {missing} did not connect within "
        f"{cfg.federation.connect_timeout_s:.0f} s (federation.connect_timeout_s)"
    ]
    strangers = sorted(seen - expected) if expected else []
    if strangers:
        parts.append(
            f"connected with an alias not in federation.sites: {', '.join(strangers)} "
            "(check site-alias in that node's config)"
        )
    if silent:
        parts.append(
            f"{silent} connected node(s) did not answer the alias query "
            "(see that node's log: its ClientApp may fail to start)"
        )
    return "; ".join(parts)
