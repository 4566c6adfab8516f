"""``fedmsk train --mode pooled|local``: the centralized baselines of a federated study."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train",
        help="train pooled (all training centers) or local-only (one center)",
        description="Centralized baselines on the federation's own splits. Extra arguments "
        "are Hydra overrides, e.g. model=efficientnet_b0 federation.num_rounds=5.",
    )
    train.add_argument("--mode", choices=("pooled", "local"), required=True)
    train.add_argument("--site", default=None, help="the center for --mode local (e.g. site03)")
    train.add_argument("--no-report", action="store_true")
    train.set_defaults(func=run_train, accepts_overrides=True)


def run_train(args: argparse.Namespace) -> int:
    from fedmsk.centralized import run_centralized
    from fedmsk.commands.simulate import (
        prepare,
        print_busy_machine_warning,
        print_final_results,
        print_recipe,
    )

    if args.mode == "local" and not args.site:
        print("fedmsk train: --mode local needs --site", file=sys.stderr)
        return 2
    try:
        cfg = prepare(args.overrides).cfg
        print_recipe(cfg)
        print_busy_machine_warning(cfg)
        run_dir = run_centralized(cfg, args.mode, args.site, progress=sys.stdout)
        print_final_results(run_dir)
        if not args.no_report:
            from fedmsk.report import build_report

            print(f"report: {build_report(run_dir).html}")
    except Exception as exc:  # noqa: BLE001 - one clear line for the user
        print(f"fedmsk train: {exc}", file=sys.stderr)
        return 1
    print(f"run directory: {run_dir}")
    return 0
