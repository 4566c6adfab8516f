"""``fedmsk data inspect FILE``: technical facts about one image, and its decoded pixels."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register_data(data_subparsers: argparse._SubParsersAction) -> None:
    parser = data_subparsers.add_parser(
        "inspect",
        help="show how an image file is encoded and decoded (no patient data is printed)",
        description=(
            "Print technical facts about a DICOM, PNG or JPEG file: transfer syntax, "
            "photometric interpretation, size, bit depth, pixel spacing and the decoder used. "
            "Patient and study identifiers are never printed."
        ),
    )
    parser.add_argument("file", type=Path, help="the image file")
    parser.add_argument("--json", action="store_true", help="print the facts as JSON")
    parser.add_argument(
        "--npy",
        type=Path,
        metavar="OUT",
        help="save decoded values after the Modality LUT, float32 (frames, rows, cols[, 3])",
    )
    parser.add_argument(
        "--display-npy",
        type=Path,
        metavar="OUT",
        help="save what the model sees before resizing: float32 in [0, 1] after windowing",
    )
    parser.set_defaults(func=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    import numpy as np

    from fedmsk.data.errors import ImageReadError
    from fedmsk.data.inspect import format_table, inspect_image

    want_arrays = args.npy is not None or args.display_npy is not None
    try:
        result = inspect_image(args.file, all_frames=want_arrays)
    except ImageReadError as exc:
        print(f"fedmsk data inspect: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"fedmsk data inspect: {args.file}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    try:
        if args.npy is not None:
            np.save(args.npy, np.asarray(result.values, dtype=np.float32))
        if args.display_npy is not None:
            np.save(args.display_npy, np.asarray(result.display, dtype=np.float32))
    except OSError as exc:
        print(f"fedmsk data inspect: cannot write output: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.facts, indent=2) if args.json else format_table(result.facts))
    return 0
