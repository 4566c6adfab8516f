"""``fedmsk data synth OUT --task TASK --centers N [--seed S] [--scale F]``."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path


def register_data(data_subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = data_subparsers.add_parser(
        "synth",
        help="generate a synthetic multi-center federation (DICOM, manifests, reader studies)",
        description="Generate a synthetic multi-center federation: one folder per center with "
        "a manifest and images, federation.json naming the held-out center, and reader "
        "studies for tasks that have them. Deterministic from --seed.",
    )
    parser.add_argument("out", type=Path, nargs="?", help="output folder (empty or absent)")
    parser.add_argument("--task", default="xray_fracture", help="synthetic task name")
    parser.add_argument(
        "--centers", type=int, default=None, help="number of centers (task default)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every center's size")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a federation this command generated earlier in OUT",
    )
    parser.add_argument("--list-tasks", action="store_true", help="list the tasks and exit")
    parser.set_defaults(func=run_synth)


def run_synth(args: argparse.Namespace) -> int:
    from fedmsk.data.synthetic import FEDERATION_FILE, GENERATOR, READERS_DIR, generate_federation
    from fedmsk.data.synthetic_tasks import TASKS

    if args.list_tasks:
        for name, spec in TASKS.items():
            classes = ", ".join(spec.classes)
            print(f"{name:22s} {classes}  [{spec.modality}, {spec.default_centers} centers]")
        return 0
    if args.task not in TASKS:
        print(
            f"--task {args.task!r}: unknown; choose one of {', '.join(sorted(TASKS))}",
            file=sys.stderr,
        )
        return 2
    if args.out is None:
        print("fedmsk data synth: give the output folder OUT", file=sys.stderr)
        return 2
    out: Path = args.out
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            print(f"{out}: not empty; choose an empty folder or pass --overwrite", file=sys.stderr)
            return 2
        error = _clear_previous(out, FEDERATION_FILE, GENERATOR, READERS_DIR)
        if error:
            print(error, file=sys.stderr)
            return 2
    started = time.perf_counter()

    def report(alias: str, done: int, total: int) -> None:
        print(f"  [{done}/{total}] {alias}", file=sys.stderr, flush=True)

    try:
        info = generate_federation(
            out, args.task, centers=args.centers, seed=args.seed, scale=args.scale, progress=report
        )
    except ValueError as exc:
        print(f"fedmsk data synth: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - started
    images = sum(s.n_images or 0 for s in info.sites)
    heldout = ", ".join(s.alias for s in info.heldout_sites)
    print(
        f"{out}: task {info.task}, {len(info.sites)} centers ({images} images), "
        f"held out: {heldout}, seed {info.seed}, {seconds:.1f} s"
    )
    return 0


def _clear_previous(
    out: Path, federation_file: str, generator: str, readers_dir: str
) -> str | None:
    """Remove what an earlier ``data synth`` wrote in ``out``; refuse anything else."""
    path = out / federation_file
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return (
            f"{out}: --overwrite only replaces a federation written by `fedmsk data synth` "
            f"({path} missing or unreadable)"
        )
    if doc.get("generator") != generator:
        return f"{path}: not written by `fedmsk data synth`; refusing to overwrite"
    for site in doc.get("sites", []):
        target = (out / str(site.get("dir", ""))).resolve()
        if target.parent == out.resolve() and target.is_dir():
            shutil.rmtree(target)
    if (out / readers_dir).is_dir():
        shutil.rmtree(out / readers_dir)
    path.unlink()
    return None
