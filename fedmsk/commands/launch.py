"""``fedmsk launch RUN_TOML``: the coordinator's ``flwr run`` of a deployment, judged by its result.

``flwr run`` exits 0 even when the ServerApp failed (Flower 1.41), so a coordinator's script
cannot tell a finished study from one that stopped in its first minute. This command runs
``flwr run <app> [CONNECTION] --run-config RUN_TOML --stream`` (the ServerApp's log streams to
the terminal as before), then looks at the run directory the run config names: a fresh
results.json is success; otherwise the ServerApp's one-line cause (``run_failed.txt``) is
printed and the exit code is 1.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import tomllib
from pathlib import Path

PROG = "fedmsk launch"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "launch",
        help="run a deployment study with `flwr run`; exit 1 with its cause if it fails",
        description=(
            "Start the run config's study on the SuperLink that FLWR_HOME's Flower "
            "configuration names (the coordinator kit's flwr-home), stream its log, and exit "
            "0 only when it wrote its results; otherwise print the ServerApp's cause and exit 1."
        ),
    )
    parser.add_argument("run_config", metavar="RUN_TOML", type=Path, help="the run config")
    parser.add_argument(
        "--connection",
        default=None,
        help="the SuperLink connection in FLWR_HOME's config.toml (default: its default)",
    )
    parser.add_argument(
        "--app", type=Path, default=None, help="the fedmsk app folder (default: this install's)"
    )
    parser.set_defaults(func=run_launch)


def run_directory(run_config: Path) -> Path:
    """The absolute ``run_dir`` the run config's overrides give the study."""
    from fedmsk.config import RUN_CONFIG_KEY, compose, overrides_from_run_config

    try:
        document = tomllib.loads(run_config.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{run_config}: cannot be read as TOML ({exc})") from None
    if RUN_CONFIG_KEY not in document:
        raise ValueError(f"{run_config}: has no {RUN_CONFIG_KEY!r} key")
    run_dir = Path(compose(overrides_from_run_config(document)).run_dir)
    if not run_dir.is_absolute():
        raise ValueError(f"{run_config}: run_dir={run_dir} must be an absolute path")
    return run_dir


def run_launch(args: argparse.Namespace) -> int:
    from fedmsk.run_dir import failure_cause, results_written_since
    from fedmsk.simulation import APP_DIR, venv_program

    try:
        run_dir = run_directory(args.run_config)
    except (ValueError, json.JSONDecodeError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    app = args.app or APP_DIR
    command = [venv_program("flwr"), "run", str(app)]
    if args.connection:
        command.append(args.connection)
    command += ["--run-config", str(args.run_config.resolve()), "--stream"]
    started = time.time()
    returncode = subprocess.run(command, check=False).returncode
    results = run_dir / "results.json"
    if results_written_since(run_dir, started):
        print(f"{PROG}: finished; results in {results}", flush=True)
        return 0
    cause = failure_cause(run_dir, started)
    if cause is None:
        cause = (
            f"the run wrote no {results} (flwr run exit {returncode}); the streamed log above "
            "has the cause"
        )
    print(f"{PROG}: {cause}", file=sys.stderr)
    return 1
