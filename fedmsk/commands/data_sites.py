"""``fedmsk data check | import-folder | import-mura``: prepare and validate one site's data."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register_data(data_subparsers: argparse._SubParsersAction) -> None:
    check = data_subparsers.add_parser(
        "check",
        help="validate a site's manifest and images (prints counts and problems, no patient ids)",
        description=(
            "Check every row of SITE_DIR/manifest.csv: missing or unreadable files, unknown "
            "labels, duplicate files, patients in two splits, too few images per class. Exits "
            "non-zero only when nothing usable remains. Classes come from --classes, else "
            "--task, else the federation.json beside SITE_DIR, else the manifest's labels."
        ),
    )
    check.add_argument("site_dir", type=Path, metavar="SITE_DIR")
    group = check.add_mutually_exclusive_group()
    group.add_argument("--task", metavar="NAME", help="task config name, e.g. xray_fracture")
    group.add_argument("--classes", metavar="A,B", help="comma-separated class names")
    check.add_argument(
        "--min-examples",
        type=int,
        default=None,
        metavar="N",
        help="usable images needed per class (default: data.min_examples_per_class)",
    )
    check.add_argument("--frame", default="0", help="frame of multi-frame images (default 0)")
    check.set_defaults(func=run_check)

    folder = data_subparsers.add_parser(
        "import-folder",
        help="write SITE_DIR/manifest.csv from SRC/<label>/<image files>",
        description=(
            "Each sub-folder of SRC is a label. Patient id = file stem unless --patient-pattern "
            "or --patient-csv says otherwise. Images outside SITE_DIR are copied to "
            "SITE_DIR/images/ (or referenced by relative path with --reference)."
        ),
    )
    _common_import_args(folder)
    folder.add_argument(
        "--patient-pattern",
        metavar="REGEX",
        help="regex on the path below the label folder; group 'patient' (or group 1) is the id",
    )
    folder.add_argument(
        "--patient-csv", type=Path, metavar="FILE", help="CSV with columns file,patient_id"
    )
    folder.set_defaults(func=run_import_folder)

    mura = data_subparsers.add_parser(
        "import-mura",
        help="write SITE_DIR/manifest.csv from a MURA-style tree",
        description=(
            "Finds XR_<BODYPART>/patient<id>/study<n>_<positive|negative>/image<k>.png below "
            "SRC. View = body part, label = positive/negative. Images outside SITE_DIR are "
            "copied to SITE_DIR/images/ (or referenced by relative path with --reference)."
        ),
    )
    _common_import_args(mura)
    mura.set_defaults(func=run_import_mura)


def _common_import_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", type=Path, metavar="SRC")
    parser.add_argument("site_dir", type=Path, metavar="SITE_DIR")
    parser.add_argument(
        "--reference",
        action="store_true",
        help="do not copy: reference images outside SITE_DIR by relative paths",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing manifest")


def _federation_classes(site_dir: Path) -> list[str] | None:
    path = site_dir.resolve().parent / "federation.json"
    try:
        classes = json.loads(path.read_text()).get("classes")
    except (OSError, ValueError, AttributeError):
        return None
    return [str(c) for c in classes] if isinstance(classes, list) and classes else None


def _resolve_task(args: argparse.Namespace) -> tuple[list[str] | None, list[str], int]:
    """(classes, views, min examples) from the command line, task config or federation."""
    from fedmsk.config import DataConfig, compose

    min_examples = DataConfig().min_examples_per_class
    if args.classes:
        classes = [c.strip() for c in args.classes.split(",") if c.strip()]
        return classes, [], min_examples
    if args.task:
        task = compose([f"task={args.task}"]).task
        return list(task.classes), list(task.views), min_examples
    return _federation_classes(args.site_dir), [], min_examples


def run_check(args: argparse.Namespace) -> int:
    from fedmsk.data.check import check_site
    from fedmsk.data.manifest import ManifestError

    try:
        classes, views, min_examples = _resolve_task(args)
    except Exception as exc:  # Hydra reports a missing task as several exception types
        print(f"fedmsk data check: --task {args.task}: {exc}", file=sys.stderr)
        return 2
    if args.min_examples is not None:
        min_examples = args.min_examples
    try:
        report = check_site(args.site_dir, classes, min_examples, views=views, frame=args.frame)
    except ManifestError as exc:
        print(f"fedmsk data check: {exc}", file=sys.stderr)
        return 2
    print(report.render())
    return 0 if report.ok else 1


def _run_import(args: argparse.Namespace, importer, **kwargs) -> int:  # type: ignore[no-untyped-def]
    from fedmsk.data.importers import ImporterError

    mode = "reference" if args.reference else "copy"
    try:
        result = importer(args.src, args.site_dir, mode=mode, overwrite=args.force, **kwargs)
    except (ImporterError, OSError) as exc:
        print(f"fedmsk data {args.data_command}: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {result.manifest}: {len(result.rows)} images", end="")
    print(f", {result.copied} copied" if result.copied else "")
    if result.skipped:
        print(f"{len(result.skipped)} file(s) not imported:")
        for name, why in result.skipped[:50]:
            print(f"  {name}: {why}")
        if len(result.skipped) > 50:
            print(f"  ... and {len(result.skipped) - 50} more")
    print(f"next: fedmsk data check {args.site_dir}")
    return 0


def run_import_folder(args: argparse.Namespace) -> int:
    import re

    from fedmsk.data.importers import import_folder

    if args.patient_pattern:
        try:
            re.compile(args.patient_pattern)
        except re.error as exc:
            print(f"fedmsk data import-folder: --patient-pattern: {exc}", file=sys.stderr)
            return 2
    return _run_import(
        args, import_folder, patient_pattern=args.patient_pattern, patient_csv=args.patient_csv
    )


def run_import_mura(args: argparse.Namespace) -> int:
    from fedmsk.data.importers import import_mura

    return _run_import(args, import_mura)
