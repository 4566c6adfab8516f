"""A hospital node's cost per message outside training, against the size of its data set.

Issue 16 asks that a site's per-message overhead stay constant as its data set grows. For
sites of 100, 1,000 and 10,000 synthetic DICOM images this measures one train message the way
``client/app.py`` handles it (``SiteRuntime`` with the node's pools, then ``train`` with one
local step, so that training itself is a small, known part):

* **cold**: a fresh Python process per message, as every message costs in a Flower
  deployment with subprocess isolation (imports are timed apart);
* **warm**: a second message in the same process, as in the simulation engine (and in a
  deployment with a node process that outlives its messages).

The image cache is built once per site before anything is timed (a one-off cost of a site's
first run, not of a message), and so is the validated-rows index
(``fedmsk/data/validated_index.py``) when the site's files are older than two seconds. The
10,000-image site repeats the generated images as
DICOM files of their own (a new SOP Instance UID each, so that the node's duplicate check keeps
them) under new patient IDs, as the 1,000-image site does with the generated site's ~900.

    .venv/bin/python simulations/bench_message.py --out runs/bench_message
    .venv/bin/python simulations/bench_message.py --sizes 100,1000 --out runs/bench_message

Prints a Markdown table and one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SOURCE_IMAGES = 500


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_message")
    parser.add_argument("--cold-reps", type=int, default=3)
    parser.add_argument("--warm-reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one-message", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--messages", type=int, default=1, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _overrides(site_dir: Path, run_dir: Path) -> list[str]:
    return [
        f"data.root={site_dir.parent}",
        "data.synthetic=false",
        f"run_dir={run_dir}",
        "train.local_steps=1",
        "evaluation.gradcam=false",
    ]


def source_site(out: Path) -> Path:
    """A generated site with at least SOURCE_IMAGES images (generated once, then reused)."""
    from fedmsk.data.manifest import read_manifest
    from fedmsk.data.synthetic import generate_federation

    root = out / "source"
    if not (root / "federation.json").is_file():
        generate_federation(root, task="xray_fracture", centers=2, seed=0, scale=30.0)
    site = root / "site00"
    count = len(read_manifest(site))
    if count < SOURCE_IMAGES:
        raise SystemExit(f"{site}: {count} images, fewer than {SOURCE_IMAGES}; raise the scale")
    return site


def make_site(source: Path, dest: Path, size: int) -> Path:
    """``size`` distinct image files taken round-robin from ``source``, new patient IDs per
    repetition (so that splits stay patient-disjoint)."""
    import pydicom
    from pydicom.uid import generate_uid

    from fedmsk.data.manifest import ManifestRow, read_manifest, write_manifest

    if (dest / "manifest.csv").is_file() and len(read_manifest(dest)) == size:
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "images").mkdir(parents=True)
    rows = read_manifest(source)
    out = []
    for i in range(size):
        row = rows[i % len(rows)]
        repeat = i // len(rows)
        src = source / row.image
        name = f"images/r{repeat:02d}-{Path(row.image).name}"
        if repeat == 0 or src.suffix.lower() != ".dcm":
            try:
                os.link(src, dest / name)
            except OSError:
                shutil.copy2(src, dest / name)
        else:  # another instance of the image: a file of its own, not a duplicate to drop
            dataset = pydicom.dcmread(src)
            dataset.SOPInstanceUID = generate_uid()
            dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
            dataset.save_as(dest / name)
        out.append(ManifestRow(name, row.label, f"{row.patient_id}-r{repeat}", row.view))
    write_manifest(dest, out)
    return dest


def one_message_process(site_dir: Path, messages: int, threads: int) -> dict[str, object]:
    """Handle ``messages`` train messages in this process the way ``client/app.py`` does."""
    started = time.perf_counter()
    import torch

    from fedmsk.config import compose
    from fedmsk.data.dataset import DatasetPool
    from fedmsk.models import get_arrays, model_from_config
    from fedmsk.site_runtime import ModelPool, SiteRuntime, derive_seed

    imports = time.perf_counter() - started
    torch.set_num_threads(threads)
    cfg = compose(_overrides(site_dir, site_dir.parent / "run"))
    arrays = get_arrays(model_from_config(cfg))
    model_pool, dataset_pool = ModelPool(), DatasetPool()
    rows = []
    for message in range(1, messages + 1):
        t0 = time.perf_counter()
        runtime = SiteRuntime(
            cfg,
            site_dir,
            site_dir.name,
            heldout=False,
            seed=derive_seed(cfg.seed, "loader", message, site_dir.name),
            model_pool=model_pool,
            dataset_pool=dataset_pool,
        )
        setup = time.perf_counter() - t0
        outcome = runtime.train(arrays, message)
        total = time.perf_counter() - t0
        fit = float(outcome.metrics.get("train-seconds", 0.0))
        rows.append({"setup_s": setup, "fit_s": fit, "other_s": total - setup - fit})
    return {"imports_s": imports, "messages": rows, "images": runtime.train_count()}


def _run_child(site_dir: Path, messages: int, threads: int) -> dict[str, object]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONHASHSEED="0")
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--one-message",
        str(site_dir),
        "--messages",
        str(messages),
        "--threads",
        str(threads),
    ]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child failed on {site_dir}:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - started
    return result


def measure(site_dir: Path, cold_reps: int, warm_reps: int, threads: int) -> dict[str, object]:
    time.sleep(2.5)  # files younger than 2 s are not indexed (their stat may not show a change)
    _run_child(site_dir, 1, threads)  # builds the image cache: a site's first run, untimed
    cold = [_run_child(site_dir, 1, threads) for _ in range(cold_reps)]
    warm = _run_child(site_dir, 1 + warm_reps, threads)
    cold_msgs = [c["messages"][0] for c in cold]  # type: ignore[index]
    warm_msgs = warm["messages"][1:]  # type: ignore[index]

    def med(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    return {
        "site_images": warm["images"],
        "cold_process_s": statistics.median(float(c["process_s"]) for c in cold),  # type: ignore[arg-type]
        "cold_imports_s": statistics.median(float(c["imports_s"]) for c in cold),  # type: ignore[arg-type]
        "cold_setup_s": med(cold_msgs, "setup_s"),
        "cold_other_s": med(cold_msgs, "other_s"),
        "warm_setup_s": med(warm_msgs, "setup_s"),
        "warm_other_s": med(warm_msgs, "other_s"),
        "fit_s": med(warm_msgs, "fit_s"),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one_message is not None:
        print(json.dumps(one_message_process(args.one_message, args.messages, args.threads)))
        return 0
    sizes = [int(s) for s in args.sizes.split(",") if s]
    args.out.mkdir(parents=True, exist_ok=True)
    source = source_site(args.out)
    results = {}
    for size in sizes:
        site = make_site(source, args.out / "sites" / f"n{size}" / f"n{size}", size)
        results[size] = measure(site, args.cold_reps, args.warm_reps, args.threads)
        print(f"n={size}: {json.dumps(results[size])}", file=sys.stderr, flush=True)
    print(
        "| images in site (train split) | cold: process | cold: imports | cold: setup "
        "| cold: other | warm: setup | warm: other | fit (1 step) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size, r in results.items():
        print(
            f"| {size} ({r['site_images']}) | {r['cold_process_s']:.2f} s | "
            f"{r['cold_imports_s']:.2f} s | {r['cold_setup_s']:.3f} s | "
            f"{r['cold_other_s']:.3f} s | {r['warm_setup_s']:.3f} s | "
            f"{r['warm_other_s']:.3f} s | {r['fit_s']:.3f} s |"
        )
    print(json.dumps({"threads": args.threads, "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
