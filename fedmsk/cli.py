"""The ``fedmsk`` command: one parser, sub-commands registered by ``fedmsk.commands`` modules."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = ("simulate", "train", "report", "stats", "provision", "launch")
DATA_COMMAND_MODULES = ("data_inspect", "data_sites", "data_synth")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedmsk",
        description="Federated training and validation of musculoskeletal image classifiers.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    data = subparsers.add_parser("data", help="check, import, inspect and synthesise site data")
    data_subparsers = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    for name in DATA_COMMAND_MODULES:
        module = _load(name)
        if module is not None:
            module.register_data(data_subparsers)
    for name in COMMAND_MODULES:
        module = _load(name)
        if module is not None:
            module.register(subparsers)
    return parser


def _load(name: str):  # type: ignore[no-untyped-def]
    try:
        return importlib.import_module(f"fedmsk.commands.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"fedmsk.commands.{name}":
            return None
        raise


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    return int(func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
