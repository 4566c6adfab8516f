"""``fedmsk report RUN_DIR``: the study report of a finished (or interrupted) run."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="write report.html, report.md, metrics.json and figures/ for a run directory",
        description=(
            "Build the study report of a run: per-center tables with 95%% CIs (held-out centers "
            "apart), ROC, confusion, calibration and training curves, reader comparison, privacy "
            "budget and failures when present. Written into RUN_DIR."
        ),
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="the run directory")
    parser.set_defaults(func=run_report)


def _shown(path: Path) -> str:
    """Relative to the working directory when possible: consoles get shared in tickets."""
    try:
        return os.path.relpath(path)
    except ValueError:
        return path.name


def run_report(args: argparse.Namespace) -> int:
    from fedmsk.report import ReportError, build_report

    try:
        paths = build_report(args.run_dir)
    except ReportError as exc:
        print(f"fedmsk report: {exc}", file=sys.stderr)
        return 1
    print(f"report: {_shown(paths.html)}")
    print(f"markdown: {_shown(paths.markdown)}")
    print(f"metrics: {_shown(paths.metrics)} ({len(paths.figures)} figures)")
    return 0
