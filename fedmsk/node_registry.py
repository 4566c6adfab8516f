"""Which Flower node ID belongs to which site: a site is who its registered key says it is.

With node authentication the SuperLink gives every registered public key one node ID, and a
SuperNode that connects with that key always gets that ID. ``register-supernodes.sh`` (written
by ``fedmsk provision``) records the ID of each site's key in ``supernodes/node-ids.txt``, one
``<site> <node id>`` line per registration. The coordinator's ServerApp reads that file
(``federation.node_registry``) so that the site alias a node declares in its own config is
checked against its key instead of being believed: a node registered for another site, or for
no site of the study, is never sent anything.

A simulation has no keys; its run config says ``federation.node_registry=none`` and the aliases
are then taken as declared (tests that fake a site's identity need nothing more).
"""

from __future__ import annotations

import re
from pathlib import Path

SELF_DECLARED = "none"
"""``federation.node_registry`` value for nodes without keys (the simulation engine)."""

_LINE = re.compile(r"^(\S+)\s+(\d+)$")


class NodeRegistryError(ValueError):
    """The registry file is missing, malformed, or does not cover the study's sites."""


def read_node_registry(path: Path) -> dict[str, int]:
    """Site -> node ID from a ``node-ids.txt``.

    A site registered again (a rotated key) is listed again further down: the last line wins,
    as the docs tell the coordinator to unregister the old key. One node ID under two sites
    cannot come from Flower and is refused rather than guessed between.
    """
    if not path.is_absolute():
        raise NodeRegistryError(
            f"federation.node_registry={str(path)!r} must be an absolute path (the ServerApp "
            "runs in the SuperLink's working directory)"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NodeRegistryError(
            f"{path} does not exist: run coordinator/register-supernodes.sh, which writes it"
        ) from None
    except OSError as exc:
        raise NodeRegistryError(f"{path}: cannot be read ({exc.strerror})") from None
    site_to_node: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if match is None:
            raise NodeRegistryError(
                f"{path} line {number}: expected '<site> <node id>', found {line[:80]!r}"
            )
        site_to_node[match.group(1)] = int(match.group(2))
    owners: dict[int, str] = {}
    for site, node in site_to_node.items():
        if node in owners:
            raise NodeRegistryError(
                f"{path}: node ID {node} is listed for both {owners[node]} and {site}"
            )
        owners[node] = site
    return site_to_node


def study_nodes(path: Path, sites: list[str]) -> dict[int, str]:
    """Node ID -> site for the study's sites only; every listed site must be registered."""
    if not sites:
        raise NodeRegistryError(
            "federation.sites is empty: with a node registry the study must list its sites"
        )
    registered = read_node_registry(path)
    missing = [s for s in sites if s not in registered]
    if missing:
        raise NodeRegistryError(
            f"{path} has no node ID for {', '.join(missing)}: register that site's key with "
            "coordinator/register-supernodes.sh (a key registered before but not listed: "
            "unregister its node with `flwr supernode unregister ID` and run it again), or "
            "correct federation.sites"
        )
    return {registered[s]: s for s in sites}
