"""``fedmsk provision``: CA, SuperLink certificate and per-site start-up kits."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Plain constants, repeated here so that `fedmsk --help` does not import `cryptography`;
# tests check they equal fedmsk.provision's.
DEFAULT_DAYS = 365
DEFAULT_CA_DAYS = 3650
DEFAULT_PORT = 8000
DEFAULT_BIND_HOST = "0.0.0.0"
DEFAULT_NODE_PORT_BASE = 9094


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``provision`` sub-command."""
    parser = subparsers.add_parser(
        "provision",
        help="create the federation's CA, SuperLink certificate and per-site kits",
        description=(
            "Create (or complete) a federation under OUT: a CA in OUT/ca, the SuperLink's TLS "
            "certificate and scripts in OUT/coordinator, and one start-up kit per site in "
            "OUT/sites/<site>. Existing keys are kept unless --force is given, so re-running "
            "with a new site adds only that site."
        ),
    )
    parser.add_argument("out", type=Path, metavar="OUT", help="output folder")
    parser.add_argument(
        "--sites", required=True, help="comma-separated site names, e.g. siteA,siteB,siteC"
    )
    parser.add_argument(
        "--server-name",
        required=True,
        help="host name or IP address the SuperNodes dial to reach the SuperLink",
    )
    parser.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="DNS:NAME|IP:ADDR",
        help="extra names for the server certificate (comma-separated, repeatable); the "
        "server name, localhost and 127.0.0.1 are always included",
    )
    parser.add_argument(
        "--days",
        type=int,
        default=DEFAULT_DAYS,
        help=f"validity of the server certificate in days (default {DEFAULT_DAYS})",
    )
    parser.add_argument(
        "--ca-days",
        type=int,
        default=DEFAULT_CA_DAYS,
        help=f"validity of a new CA in days (default {DEFAULT_CA_DAYS})",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"the SuperLink's single port (default {DEFAULT_PORT}, Flower's own default)",
    )
    parser.add_argument(
        "--bind-host",
        default=DEFAULT_BIND_HOST,
        help=f"address the SuperLink listens on (default {DEFAULT_BIND_HOST}: all interfaces)",
    )
    parser.add_argument(
        "--node-port-base",
        type=int,
        default=DEFAULT_NODE_PORT_BASE,
        help="first local runtime port given to SuperNodes; each site gets its own so that "
        f"several nodes can share a host (default {DEFAULT_NODE_PORT_BASE})",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="re-create the CA, the server certificate and the named sites' keys",
    )
    parser.set_defaults(func=run_provision)


def run_provision(args: argparse.Namespace) -> int:
    """Provision, then print what was created, what was kept and what to do next."""
    from fedmsk.provision import ProvisionError, provision

    try:
        result = provision(
            args.out,
            [s for s in args.sites.split(",")],
            args.server_name,
            sans=list(args.san),
            days=args.days,
            force=args.force,
            port=args.port,
            bind_host=args.bind_host,
            ca_days=args.ca_days,
            node_port_base=args.node_port_base,
        )
    except ProvisionError as exc:
        print(f"fedmsk provision: error: {exc}", file=sys.stderr)
        return 2
    out = result.out
    for path in result.created:
        print(f"created  {path.relative_to(out)}")
    for path in result.kept:
        print(f"kept     {path.relative_to(out)}")
    for note in result.notes:
        print(f"note: {note}")
    coord = result.coordinator
    print(
        f"\nSuperLink address for the sites: {result.superlink_address}\n"
        f"Next steps:\n"
        f"  1. coordinator: {coord.start_script}\n"
        f"  2. coordinator: {coord.register_script}\n"
        f"  3. give each site its folder {out / 'sites'}/<site> over a secure channel;\n"
        f"     never hand out {result.ca_key.parent}\n"
        f"  4. check nodes: FLWR_HOME={coord.flwr_home} flwr supernode list\n"
        f"Manifest: {result.manifest}"
    )
    return 0
