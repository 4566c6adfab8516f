"""How fast, how heavy, how good: fedmsk measured side by side, in one command.

Five sections, each selectable with ``--sections`` and each with a ``--quick`` mode (tiny sizes,
one round, four centers, small images; section 4 times the run section 5 then reuses) that the
smoke test runs end to end:

1. client throughput: a federated round at one site (``SiteRuntime``: data from the cache,
   model load, ``fit``) against a bare PyTorch loop over the same model, cached tensors and
   batch size; plus ``bench_fit.py`` (``fit`` alone against a bare loop). Target >= 0.95.
2. DP-SGD against plain training per model and Opacus grad-sample mode (``bench_dp.py``):
   images/s and peak memory. Target: resnet18 at most 2x slower with DP.
3. data path: images/s decoding DICOM cold against reading the preprocessing cache, decode
   speed per transfer syntax (``bench_decode.py``), and the share of ``fit`` time spent waiting
   on the DataLoader iterator. Target < 5 %.
4. federation overhead: wall time of a simulated round against the clients' own compute
   (``train-seconds`` in ``metrics.jsonl``, lines time-stamped as they appear), bytes per client
   per round, peak memory of the simulation's process tree. Target overhead < 10 %.
5. quality: pooled and the recommended strategy (cyclic) on federations drawn with several
   seeds, local-only and FedAvg / FedAvgM / FedProx / FedAdam / FedBN / FedAvg with DP (eps 8)
   on the first, each at the recommended budget (the defaults) and at an equal budget (every
   image once per round or epoch); held-out AUC with DeLong CIs, mean and spread over seeds,
   paired DeLong tests, and a figure of held-out AUC against optimizer steps; with
   ``--quality-training-seeds`` also repeats of pooled and the recommended strategy on every
   draw (mean and spread over training seeds; the targets are then read over every run).
   Targets: pooled >= 0.85 on every seed; recommended minus pooled >= -0.02 (mean over seeds);
   best federated above every local-only model.

    .venv/bin/python simulations/benchmark.py --out runs/benchmark            # everything
    .venv/bin/python simulations/benchmark.py --sections 1,3 --quick --out /tmp/b

Writes ``benchmark.md`` and ``benchmark.json`` to ``--out``; a missed target reads MISSED with
the measured figure. The machine may be shared: throughput figures are medians of alternating
repetitions and each section says how many. Exit status 1 when a section failed to run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SIMULATIONS = REPO / "simulations"
sys.path.insert(0, str(REPO))

SECTIONS = {
    1: "client training throughput: federated round vs bare PyTorch",
    2: "DP-SGD vs plain training (bench_dp.py)",
    3: "data path: DICOM decode vs cache, DataLoader wait",
    4: "federation overhead, traffic and memory",
    5: "quality: pooled vs local-only vs federated",
}
OK, MISSED, FAILED = "OK", "MISSED", "FAILED"


# -- records -----------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table. ``status`` is OK / MISSED where a target applies, else empty."""

    section: int
    name: str
    value: float | None
    unit: str
    target: str = ""
    status: str = ""
    notes: str = ""


@dataclass
class Settings:
    """Every size the benchmark uses; ``--quick`` swaps in the tiny set (see :func:`settings`)."""

    out: Path
    quick: bool
    threads: int
    repeats: int
    devices: list[str]
    # sections 1 and 3: one synthetic site
    model: str = "resnet18"
    image_size: int = 128
    batch_size: int = 32
    site_scale: float = 4.0
    # section 2 (bench_dp.py): a generous per-configuration timeout for a loaded machine
    dp_args: list[str] = field(default_factory=lambda: ["--timeout", "1200"])
    # section 3
    decode_size: int = 2048
    decode_repeats: int = 3
    # sections 4 and 5: the default synthetic federation
    centers: int = 13
    fed_scale: float = 3.0  # configs/data/synthetic.yaml's default
    # None: section 5 trains at the configured data.image_size (the project's defaults: 128 px
    # for the stride-4 stem of the default model; 64 px would leave it 2x2 last maps) and
    # section 4 times its overhead run at SECTION4_IMAGE_SIZE, as its rows always have
    fed_image_size: int | None = None
    fed_rounds: int = 2
    quality_rounds: int | None = None  # None: the configured federation.num_rounds
    # 0 is the default federation; 5 and 6 were never used while choosing the defaults
    quality_seeds: list[int] = field(default_factory=lambda: [0, 5, 6])
    quality_recommended: str = "cyclic"  # configs/config.yaml's strategy
    quality_strategies: list[str] = field(
        default_factory=lambda: [
            "fedavg", "fedavgm", "fedprox", "fedadam", "fedbn", "fedavg+eps8"
        ]
    )  # fmt: skip
    quality_variants: list[str] = field(
        default_factory=lambda: [
            "pooled~fp32", "cyclic~avgstats", "cyclic~groupnorm", "cyclic~freshopt"
        ]
    )  # fmt: skip
    quality_budgets: list[str] = field(default_factory=lambda: ["recommended", "equal"])
    # more runs of pooled and the recommended strategy on every draw, each with another
    # ``seed=`` (initial weights, batch order, augmentation): the run-to-run spread on one draw,
    # which one run per cell cannot show (on the hard draws it is several hundredths)
    quality_training_seeds: list[int] = field(default_factory=list)
    quality_local: bool = True  # local-only baselines, one per training site
    quality_overrides: list[str] = field(default_factory=list)
    bench_fit_args: list[str] = field(default_factory=list)
    # finished federated runs by config hash (run_dir excluded): section 5 reuses section 4's
    finished_runs: dict[str, Path] = field(default_factory=dict)


def int_list(text: str) -> list[int]:
    """``"0,5, 6"`` -> [0, 5, 6] (a command-line list of seeds)."""
    return [int(x) for x in text.split(",") if x.strip()]


def settings(args: argparse.Namespace) -> Settings:
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    s = Settings(
        out=Path(args.out).resolve(),
        quick=args.quick,
        threads=args.threads,
        repeats=args.repeats,
        devices=devices,
        fed_rounds=args.fed_rounds,
        fed_scale=args.fed_scale,
        fed_image_size=args.fed_image_size,
        quality_rounds=args.quality_rounds,
        quality_overrides=list(args.quality_override or []),
    )
    if args.quality_strategies:
        s.quality_strategies = [x for x in args.quality_strategies.split(",") if x]
    if args.quality_seeds:
        s.quality_seeds = int_list(args.quality_seeds)
    if args.quality_variants is not None:
        s.quality_variants = [x for x in args.quality_variants.split(",") if x]
    if args.quality_training_seeds:
        s.quality_training_seeds = int_list(args.quality_training_seeds)
    if args.quality_budgets:
        s.quality_budgets = [x for x in args.quality_budgets.split(",") if x]
        if not set(s.quality_budgets) <= {"recommended", "equal"}:
            raise SystemExit(f"--quality-budgets {args.quality_budgets!r}: recommended, equal")
    s.quality_local = not args.skip_local
    if args.quality_recommended:
        s.quality_recommended = args.quality_recommended
    if args.quick:
        s.threads, s.repeats = 1, 1
        s.image_size, s.batch_size, s.site_scale = 32, 8, 0.5
        s.dp_args = ["--quick"]
        s.decode_size, s.decode_repeats = 256, 1
        s.centers, s.fed_scale, s.fed_image_size = 4, 0.5, 32
        s.fed_rounds, s.quality_rounds = 1, 1
        if not args.quality_seeds:
            s.quality_seeds = [0]
        if not args.quality_strategies:
            # the other strategies run through the same code as the recommended one
            s.quality_strategies = []
        s.quality_variants = []
        s.bench_fit_args = ["--image-size", "32", "--batch-size", "8", "--steps", "2"]
        s.bench_fit_args += ["--reps", "2", "--warmup", "1"]
    for name in ("model", "image_size", "batch_size", "site_scale"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    s.bench_fit_args += ["--threads", str(s.threads), "--model", s.model]
    if not args.quick:
        s.bench_fit_args += ["--image-size", str(s.image_size), "--batch-size", str(s.batch_size)]
    return s


def status_for(value: float | None, *, at_least: float | None = None, below: float | None = None):
    """OK when the measured value meets the target, MISSED otherwise (also when not measured)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSED
    if at_least is not None and value < at_least:
        return MISSED
    if below is not None and value >= below:
        return MISSED
    return OK


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def run_script(script: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run another simulations/ script in a fresh interpreter (its own memory and threads)."""
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    return subprocess.run(
        [sys.executable, str(SIMULATIONS / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
        check=False,
    )


# -- synthetic data ----------------------------------------------------------------------------


def synthetic_federation(root: Path, centers: int, scale: float, seed: int = 0) -> Path:
    """The synthetic X-ray fracture federation (draw ``seed``), generated once per output dir."""
    from fedmsk.data.federation import FEDERATION_FILE
    from fedmsk.data.synthetic import generate_federation

    if not (root / FEDERATION_FILE).is_file():
        print(
            f"# generating {centers} synthetic centers (scale {scale}, seed {seed}) in {root}",
            flush=True,
        )
        generate_federation(root, task="xray_fracture", centers=centers, seed=seed, scale=scale)
    return root


def site_config(s: Settings, root: Path, device: str, extra: list[str] | None = None):
    from fedmsk.config import compose

    return compose(
        [
            f"model={s.model}",
            f"data.root={root}",
            f"data.image_size={s.image_size}",
            f"train.batch_size={s.batch_size}",
            f"train.num_threads={s.threads}",
            f"train.device={device}",
            f"run_dir={s.out / 'work' / 'site-run'}",
            *(extra or []),
        ]
    )


def first_training_site(root: Path) -> tuple[Path, str]:
    from fedmsk.data.federation import load_federation

    federation = load_federation(root)
    site = federation.training_sites[0]
    return root / site.dir, site.alias


# -- section 1 ---------------------------------------------------------------------------------


def bare_epoch(model, loader, cfg, device, precision=None) -> None:
    """What a PyTorch tutorial writes: the same optimizer settings, no framework.

    ``precision`` (a :class:`fedmsk.precision.Precision`): the autocast and memory layout the
    round trains in, so that on a bf16 machine the ratio measures the round's overhead, not
    bf16 against fp32 (that speed-up has its own row, from bench_fit.py).
    """
    import torch
    from torch import nn

    model.to(device)
    model.train()
    channels_last = precision is not None and precision.channels_last
    if channels_last:
        model.to(memory_format=torch.channels_last)
    autocast = precision.autocast(device) if precision is not None else contextlib.nullcontext()
    scaler = torch.amp.GradScaler("cuda") if precision and precision.needs_grad_scaler else None
    if cfg.optimizer == "adamw":  # the default of configs/train/default.yaml
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    criterion = nn.CrossEntropyLoss()
    for inputs, targets in loader:
        inputs, targets = inputs.to(device), targets.to(device)
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad()
        with autocast:
            loss = criterion(model(inputs), targets)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cached_tensors(dataset) -> tuple[Any, Any]:
    """Every training image of the site, read once from the cache into memory."""
    import torch

    images, labels = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(list(images)), torch.tensor(labels)


def section_client_throughput(s: Settings) -> list[Row]:
    root = synthetic_federation(s.out / "data" / "site-bench", centers=2, scale=s.site_scale)
    rows: list[Row] = []
    for device_name in s.devices:
        rows += client_rows(s, root, device_name)
        rows += bench_fit_rows(s, device_name)
    return rows


def client_rows(s: Settings, root: Path, device_name: str) -> list[Row]:
    """Alternating repetitions (A-B-B-A) of a bare epoch and a federated round at one site."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from fedmsk.data.dataset import DatasetPool, training_loader_settings
    from fedmsk.models import create_model, get_arrays, set_arrays
    from fedmsk.site_runtime import ModelPool, SiteRuntime
    from fedmsk.training import resolve_device, training_precision

    site_dir, alias = first_training_site(root)
    # one epoch on each side: train.local_steps (the default's fixed steps per round) would
    # make the round train several epochs of a small site against the bare loop's one
    extra = ["data.augment=false", "train.local_steps=null", "train.local_epochs=1"]
    cfg = site_config(s, root, device_name, extra)
    device = resolve_device(device_name)
    torch.set_num_threads(s.threads)
    torch.manual_seed(0)
    reference = create_model(s.model, num_classes=2, in_chans=cfg.data.in_chans)
    global_arrays = get_arrays(reference)
    precision = training_precision(reference, cfg.train, device)  # what the round trains in
    warm = SiteRuntime(cfg, site_dir, alias, heldout=False, seed=0)  # fills the cache
    images, labels = cached_tensors(warm.loaders.dataset("train"))
    # both sides drop a last partial batch, as the site's training loader does
    drop_last = len(labels) > s.batch_size
    n = len(labels) // s.batch_size * s.batch_size if drop_last else len(labels)
    generator = torch.Generator().manual_seed(0)
    bare_loader = DataLoader(
        TensorDataset(images, labels),
        batch_size=s.batch_size,
        shuffle=True,
        generator=generator,
        drop_last=drop_last,
    )

    def run_bare() -> None:
        set_arrays(reference, global_arrays)
        bare_epoch(reference, bare_loader, cfg.train, device, precision)

    fit_seconds: list[float] = []
    # what a node process keeps between messages (client/app.py): the model and the site's
    # validated datasets
    pool, datasets = ModelPool(), DatasetPool()

    # rounds follow each other so each one continues the optimizer state of the one before,
    # as a run's rounds do
    round_numbers = itertools.count(1)

    def run_round() -> None:
        runtime = SiteRuntime(
            cfg, site_dir, alias, heldout=False, seed=0, model_pool=pool, dataset_pool=datasets
        )
        outcome = runtime.train(global_arrays, server_round=next(round_numbers))
        fit_seconds.append(outcome.metrics["train-seconds"])

    run_bare()
    run_round()
    fit_seconds.clear()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times: dict[str, list[float]] = {"bare": [], "round": []}
    for rep in range(s.repeats):
        order = [("bare", run_bare), ("round", run_round)]
        for name, fn in order if rep % 2 == 0 else order[::-1]:
            begin = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - begin)
    bare_ips = n / median(times["bare"])
    round_ips = n / median(times["round"])
    pair = median([b / r for b, r in zip(times["bare"], times["round"], strict=True)])
    fit_only = n / median(fit_seconds)
    setup = median([r - f for r, f in zip(times["round"], fit_seconds, strict=True)])
    where = (
        f"{device_name}, {s.model}, {s.image_size} px, batch {s.batch_size}, {n} images/epoch, "
        f"{precision.name} on both sides"
    )
    reps = f"median of {s.repeats} alternating reps, {s.threads} threads"
    memory = []
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        memory = [Row(1, f"peak GPU memory, bare loop and round ({where})", peak, "MiB")]
    feeding = training_loader_settings(cfg.data, cfg.train).describe()
    return memory + [
        Row(1, f"bare PyTorch loop on cached tensors ({where})", bare_ips, "images/s",
            notes=reps),
        Row(1, f"federated round: SiteRuntime build + train ({device_name})", round_ips,
            "images/s", notes=f"set-up (site loaders over the cache, weight load) {setup:.2f} "
            "s/round; the model is kept between rounds as the ClientApp keeps it; "
            f"data.num_workers={cfg.data.num_workers}: {feeding}"),
        Row(1, f"round / bare throughput ({device_name})", round_ips / bare_ips, "ratio",
            ">= 0.95", status_for(round_ips / bare_ips, at_least=0.95),
            f"median of paired ratios {pair:.3f}"),
        Row(1, f"fit() inside the round / bare ({device_name})", fit_only / bare_ips, "ratio",
            notes="fit's own timer (train-seconds); augmentation off on both sides"),
    ]  # fmt: skip


def run_bench_fit(s: Settings, device: str, precision: str) -> dict[str, Any]:
    json_path = s.out / "work" / f"bench_fit-{device}-{precision}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    args = [*s.bench_fit_args, "--device", device, "--precision", precision]
    done = run_script("bench_fit.py", [*args, "--json", str(json_path)], 900)
    if done.returncode != 0 or not json_path.is_file():
        raise RuntimeError(f"bench_fit.py failed: {(done.stderr or done.stdout)[-300:]}")
    return json.loads(json_path.read_text())


def bench_fit_rows(s: Settings, device: str) -> list[Row]:
    import torch

    from fedmsk.precision import device_has_native_bf16

    result = run_bench_fit(s, device, "fp32")
    ratio = float(result["ratio"])
    rows = [
        Row(1, f"fit() vs bare loop, random tensors, bench_fit.py ({device})", ratio, "ratio",
            ">= 0.95", status_for(ratio, at_least=0.95),
            f"bare {result['bare_images_per_second']} / fit {result['fit_images_per_second']} "
            f"images/s; best-rep ratio {result['best_rep_ratio']}, median paired ratio "
            f"{result['median_pair_ratio']}; {result['reps']} reps")
    ]  # fmt: skip
    fast = run_bench_fit(s, device, "auto")
    native = device_has_native_bf16(torch.device(device))
    speedup = float(fast["ratio"])
    target, status = (">= 2.0", status_for(speedup, at_least=2.0)) if native else ("", "")
    rows.append(
        Row(1, f"train.precision=auto fit() / fp32 bare loop ({device}, {fast['model']} "
            f"{fast['image_size']} px)", speedup, "ratio", target, status,
            f"auto chose {fast['precision_chosen']} ({fast['precision_reason']}); "
            f"channels-last {fast['channels_last']}; native bf16 on this {device}: "
            f"{'yes' if native else 'no (bf16 would be emulated: auto keeps fp32)'}")
    )  # fmt: skip
    return rows


# -- section 2 ---------------------------------------------------------------------------------


def section_dp(s: Settings) -> list[Row]:
    json_path = s.out / "work" / "bench_dp.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    done = run_script("bench_dp.py", [*s.dp_args, "--json-out", str(json_path)], 3600)
    if not json_path.is_file():
        raise RuntimeError(f"bench_dp.py wrote no JSON: {(done.stderr or done.stdout)[-300:]}")
    report = json.loads(json_path.read_text())
    results = report["results"]
    config = report.get("config", {})
    rows: list[Row] = []
    plain_rss = {r["model"]: r["peak_rss_mib"] for r in results if r["mode"] == "none"}
    for r in results:
        label = f"{r['model']} {'plain' if r['mode'] == 'none' else 'DP ' + r['mode']}"
        label += f" ({r['image_size']} px, batch {r['batch_size']}, {r['threads']} threads)"
        if r.get("error"):
            rows.append(Row(2, label, None, "images/s", notes=f"failed: {r['error']}"))
            continue
        notes = f"peak RSS {r['peak_rss_mib']:.0f} MiB"
        if r["mode"] != "none" and r.get("ratio"):
            notes = (
                f"{1 / r['ratio']:.1f}x slower than plain in the same process "
                f"({r['plain_images_per_second']:.1f} images/s); {notes} "
                f"(plain alone {plain_rss.get(r['model']) or float('nan'):.0f} MiB)"
            )
        rows.append(Row(2, label, r["images_per_second"], "images/s", notes=notes))
    rows.append(dp_target_row(results, config))
    return rows


def dp_target_row(results: list[dict[str, Any]], config: dict[str, Any]) -> Row:
    """resnet18's best DP mode against plain; another model only where resnet18 was not run."""
    measured = [r for r in results if r["mode"] != "none" and r.get("ratio")]
    models = [r["model"] for r in measured]
    model = "resnet18" if "resnet18" in models else (models[0] if models else "resnet18")
    candidates = [r for r in measured if r["model"] == model]
    if not candidates:
        return Row(2, f"{model} DP slowdown, best mode", None, "x", "<= 2.0x", MISSED,
                   "no DP mode ran")  # fmt: skip
    best = max(candidates, key=lambda r: r["ratio"])
    slowdown = 1 / best["ratio"]
    return Row(
        2, f"{model} DP slowdown vs plain, best mode ({best['mode']})", slowdown, "x", "<= 2.0x",
        status_for(-slowdown, at_least=-2.0),
        f"median of {best['steps']} timed steps per side, alternating in one process; "
        f"bench_dp ran {config.get('seconds', '?')} s",
    )  # fmt: skip


# -- section 3 ---------------------------------------------------------------------------------


class TimedLoader:
    """Wraps a DataLoader and adds up the time spent inside its iterator's ``__next__``."""

    def __init__(self, loader) -> None:
        self.loader = loader
        self.dataset = loader.dataset
        self.waited = 0.0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        iterator = iter(self.loader)
        while True:
            begin = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                self.waited += time.perf_counter() - begin
                return
            self.waited += time.perf_counter() - begin
            yield batch


def decode_rates(site_dir: Path, cache_root: Path, params, repeats: int) -> tuple[float, float]:
    """(cold images/s: hash + decode + window + resize + store; warm images/s: cache read)."""
    import shutil

    from fedmsk.data.cache import PreprocessCache
    from fedmsk.data.manifest import read_manifest

    paths = [site_dir / row.image for row in read_manifest(site_dir)]
    cold, warm = [], []
    for rep in range(repeats):
        root = cache_root / f"rep{rep}"
        shutil.rmtree(root, ignore_errors=True)
        cache = PreprocessCache(root, params)
        begin = time.perf_counter()
        for path in paths:
            cache.get(path)
        cold.append(len(paths) / (time.perf_counter() - begin))
        cache = PreprocessCache(root, params)
        begin = time.perf_counter()
        for path in paths:
            cache.get(path)
        warm.append(len(paths) / (time.perf_counter() - begin))
        if cache.stats.decodes:
            raise RuntimeError("the warm pass decoded images: the cache missed")
    return median(cold), median(warm)


def section_data_path(s: Settings) -> list[Row]:
    from fedmsk.data.cache import PreprocessParams

    root = synthetic_federation(s.out / "data" / "site-bench", centers=2, scale=s.site_scale)
    site_dir, _ = first_training_site(root)
    params = PreprocessParams(s.image_size, 1, "0")
    cold, warm = decode_rates(site_dir, s.out / "work" / "cache-bench", params, s.repeats + 1)
    reps = f"median of {s.repeats + 1} passes over {site_dir.name}'s synthetic DICOMs"
    rows = [
        Row(3, f"DICOM cold: decode + window + resize to {s.image_size} px + store", cold,
            "images/s", notes=f"{reps} (96-256 px images; see bench_decode rows for 2048 px)"),
        Row(3, "preprocessing cache read (PreprocessCache.get, warm)", warm, "images/s",
            notes=f"{warm / cold:.0f}x the cold rate"),
    ]  # fmt: skip
    rows += bench_decode_rows(s)
    for device in s.devices:
        rows += loader_wait_rows(s, root, device)
    return rows


_DECODE_LINE = re.compile(r"^(?P<label>.+?)\s+(?P<mb>[\d.]+) MB\s+read_dicom:\s+(?P<rate>[\d.]+)/s")


def bench_decode_rows(s: Settings) -> list[Row]:
    done = run_script(
        "bench_decode.py", ["--size", str(s.decode_size), "--repeats", str(s.decode_repeats)], 1800
    )
    if done.returncode != 0:
        raise RuntimeError(f"bench_decode.py failed: {(done.stderr or done.stdout)[-300:]}")
    rows = []
    for line in done.stdout.splitlines():
        match = _DECODE_LINE.match(line.strip())
        if match:
            rows.append(
                Row(3, f"DICOM decode {s.decode_size}x{s.decode_size} 12-bit, "
                    f"{match['label'].strip()} (bench_decode.py)", float(match["rate"]),
                    "images/s per core", notes=f"{match['mb']} MB file; CPU time, "
                    f"{s.decode_repeats} repeats; read_dicom default plugin order")
            )  # fmt: skip
    if not rows:
        raise RuntimeError(f"bench_decode.py printed no rate: {done.stdout[-300:]}")
    return rows


def loader_wait_rows(s: Settings, root: Path, device_name: str) -> list[Row]:
    import torch

    from fedmsk.data.dataset import build_site_loaders
    from fedmsk.models import create_model
    from fedmsk.training import fit

    site_dir, _ = first_training_site(root)
    rows = []
    for augment in (True, False):
        cfg = site_config(s, root, device_name, [f"data.augment={str(augment).lower()}"])
        torch.set_num_threads(s.threads)
        fractions = []
        for rep in range(s.repeats + 1):
            loaders = build_site_loaders(site_dir, cfg.task, cfg.data, cfg.train, seed=rep)
            model = create_model(s.model, num_classes=2, in_chans=cfg.data.in_chans)
            timed = TimedLoader(loaders.train)
            counts = [loaders.counts["train"].get(c, 0) for c in cfg.task.classes]
            result = fit(model, timed, cfg.train, 2, class_counts=counts)  # type: ignore[arg-type]
            if rep:  # the first fit warms up allocators and kernels
                fractions.append(timed.waited / result.seconds)
        if not fractions:
            fractions.append(timed.waited / result.seconds)
        share = median(fractions)
        name = f"time waiting on the DataLoader / fit time ({device_name}, augment "
        name += f"{'on' if augment else 'off'}, num_workers {loaders.train.num_workers})"
        rows.append(
            Row(3, name, 100 * share, "%", "< 5 %" if augment else "",
                status_for(-share, at_least=-0.05) if augment else "",
                f"median of {len(fractions)} fits of {s.model} at {s.image_size} px, "
                f"batch {s.batch_size}")
        )  # fmt: skip
    return rows


# -- section 4 ---------------------------------------------------------------------------------


def _proc_children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def descendants(pid: int) -> list[int]:
    children = _proc_children()
    found, stack = [], list(children.get(pid, []))
    while stack:
        child = stack.pop()
        found.append(child)
        stack.extend(children.get(child, []))
    return found


def _kib(path: str, key: str) -> int:
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_memory_mib(pid: int) -> tuple[float, float, int]:
    """(sum of RSS, sum of PSS, process count) over the descendants of ``pid``.

    RSS counts shared libraries once per process, PSS splits them: the truth is PSS.
    """
    pids = descendants(pid)
    rss = sum(_kib(f"/proc/{p}/status", "VmRSS:") for p in pids)
    pss = sum(_kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids)
    return rss / 1024, pss / 1024, len(pids)


@dataclass
class RunWatcher:
    """Samples a run's process tree memory and time-stamps metrics.jsonl lines as they appear.

    The apps write no clock times; a line's arrival time (polled every ``interval`` s) is
    when the ServerApp finished that step, which is all a round's wall time needs.
    """

    metrics_path: Path
    interval: float = 0.25
    lines: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    peak_rss: float = 0.0
    peak_pss: float = 0.0
    peak_processes: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _seen: int = 0

    def _poll(self) -> None:
        now = time.monotonic()
        try:
            text = self.metrics_path.read_text(encoding="utf-8")
        except OSError:
            text = ""
        complete = [line for line in text.split("\n")[:-1] if line.strip()]
        if len(complete) < self._seen:
            self._seen, self.lines = 0, []
        for line in complete[self._seen :]:
            self.lines.append((now, json.loads(line)))
        self._seen = len(complete)

    def _loop(self) -> None:
        tick = 0
        while not self._stop.is_set():
            self._poll()
            if tick % 4 == 0:
                rss, pss, count = tree_memory_mib(os.getpid())
                self.peak_rss = max(self.peak_rss, rss)
                self.peak_pss = max(self.peak_pss, pss)
                self.peak_processes = max(self.peak_processes, count)
            tick += 1
            self._stop.wait(self.interval)
        self._poll()

    def __enter__(self) -> RunWatcher:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class RoundTiming:
    round: int
    wall: float
    train_seconds: list[float]
    includes_startup: bool


def round_timings(lines: list[tuple[float, dict[str, Any]]], started: float) -> list[RoundTiming]:
    """Train phase per round: from the previous round's last line (its aggregation, or its
    evaluation in a round that evaluates; the start of the run for round 1) to the line the
    ServerApp writes after aggregating. Rounds without evaluation (``evaluation.every_rounds``) end
    at their aggregation line."""
    timings = []
    rounds = sorted({int(r["round"]) for _, r in lines if r.get("phase") == "train"})
    for rnd in rounds:
        end = [t for t, r in lines if r.get("phase") == "train" and r.get("site") is None
               and r.get("round") == rnd]  # fmt: skip
        before = [t for t, r in lines if int(r.get("round", 0)) == rnd - 1]
        if not end:
            continue
        start = max(before) if before else started
        seconds = [float(r["train-seconds"]) for _, r in lines if r.get("phase") == "train"
                   and r.get("site") and r.get("round") == rnd
                   and "train-seconds" in r]  # fmt: skip
        timings.append(RoundTiming(rnd, end[0] - start, seconds, not before))
    return timings


SECTION4_IMAGE_SIZE = 64


def section4_image_size(s: Settings) -> int:
    return s.fed_image_size if s.fed_image_size is not None else SECTION4_IMAGE_SIZE


def federation_overrides(s: Settings, root: Path, run_dir: Path, rounds: int) -> list[str]:
    """Section 4's run: FedAvg, whose round sends every site its message at once.

    The overhead formula assumes the sites train concurrently (as many at once as there are
    cores). The default strategy, cyclic, visits the sites one after another within a round,
    so timed with it the same formula would count the other sites' training as overhead.
    Every site in every round, 10 steps each, as measured before FedAvg's rounds sampled sites
    (configs/recipe/sampled_rounds.yaml).
    """
    return [
        "strategy=fedavg",
        "strategy.fraction_train=1.0",
        "train.local_steps=10",
        f"data.root={root}",
        f"data.synthetic_centers={s.centers}",
        f"data.synthetic_scale={s.fed_scale}",
        f"data.image_size={section4_image_size(s)}",
        f"model={s.model}",
        f"federation.num_rounds={rounds}",
        "evaluation.gradcam=false",
        "evaluation.bootstrap=0",
        f"run_dir={run_dir}",
    ]


def model_bytes(overrides: list[str]) -> tuple[str, int, int]:
    """The label, bytes and values of the model a run with ``overrides`` exchanges."""
    from fedmsk.commands.simulate import prepare
    from fedmsk.models import get_arrays, model_from_config, model_label

    cfg = prepare(overrides).cfg
    arrays = get_arrays(model_from_config(cfg, initial_weights=False))
    nbytes, nvalues = sum(a.nbytes for a in arrays.values()), sum(a.size for a in arrays.values())
    return model_label(cfg.model), nbytes, nvalues


def section_federation(s: Settings) -> list[Row]:
    from fedmsk.commands.simulate import simulate_once

    run_dir = s.out / "work" / "overhead-run"
    if s.quick:
        # --quick only proves that the section runs: it times section 5's first federated run
        # (the recommended strategy), which section 5 then reuses instead of training it again
        recommended = QualityRun(s.quality_recommended, s.quality_seeds[0], "recommended")
        synthetic_federation(
            quality_root(s, recommended.seed), s.centers, s.fed_scale, recommended.seed
        )
        overrides = quality_overrides(s, recommended, run_dir)
    else:
        root = s.out / "data" / f"federation-{s.centers}c-{s.fed_scale}x"
        synthetic_federation(root, s.centers, s.fed_scale)
        overrides = federation_overrides(s, root, run_dir, s.fed_rounds)
    started = time.monotonic()
    with RunWatcher(run_dir / "metrics.jsonl") as watcher:
        simulate_once(overrides, report=False)
    total = time.monotonic() - started
    s.finished_runs[run_hash(overrides)] = run_dir
    results = json.loads((run_dir / "results.json").read_text())
    timings = round_timings(watcher.lines, started)
    steady = [t for t in timings if not t.includes_startup] or timings
    n_clients = len(results["run"]["training_sites"])
    concurrency = max(1, min(n_clients, os.cpu_count() or 1))  # client_num_cpus = 1
    walls = [t.wall for t in steady]
    sums = [sum(t.train_seconds) for t in steady]
    overheads = [1 - (c / concurrency) / w for c, w in zip(sums, walls, strict=True)]
    per_message = [(w * concurrency - c) / n_clients for c, w in zip(sums, walls, strict=True)]
    rounds_used = ", ".join(str(t.round) for t in steady)
    startup = (
        " (includes the engine's start-up: only 1 round)" if steady[0].includes_startup else ""
    )
    label, nbytes, nparams = model_bytes(overrides)
    where = f"{len(results['sites'])} sites, {results['run']['strategy']}, {label}"
    where += f" at {section4_image_size(s)} px"
    rows = [
        Row(4, f"round wall time, train phase ({where})", median(walls), "s",
            notes=f"median over round(s) {rounds_used}{startup}"),
        Row(4, "clients' own compute in that round (sum of train-seconds)", median(sums), "s",
            notes=f"{n_clients} clients, at most {concurrency} at once (1 CPU each)"),
        Row(4, "federation overhead: 1 - (compute / concurrency) / round wall time",
            100 * median(overheads), "%", "< 10 %", status_for(-median(overheads), at_least=-0.10),
            "counts as overhead: per-message ClientApp work outside fit (config compose, site "
            "data open, model build), Ray dispatch, array (de)serialisation, aggregation"),
        Row(4, "wall time per client message outside fit()", median(per_message), "s",
            notes="(round wall x concurrency - compute) / clients"),
        Row(4, f"bytes sent per client per round, each way ({label})", nbytes / 1e6, "MB",
            notes=f"{nparams:,} values, sum of get_arrays nbytes; server->client and back"),
        Row(4, "peak memory of the simulation's process tree (PSS)", watcher.peak_pss, "MiB",
            notes=f"RSS sum {watcher.peak_rss:.0f} MiB over up to {watcher.peak_processes} "
            "processes; sampled every 1 s"),
        Row(4, "whole simulation wall time", total, "s",
            notes=f"{results['run']['rounds']} round(s) + final evaluation; results.json says "
            f"{results['run']['seconds']} s inside the ServerApp"),
    ]  # fmt: skip
    return rows


# -- section 5 ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class QualityRun:
    """One training run of section 5.

    ``method``: ``pooled``, ``local:SITE`` or a strategy (``fedavg+eps8`` = FedAvg under DP at
    epsilon 8). ``budget``: ``recommended`` trains with the project's defaults; ``equal`` makes
    every image count the same in every method: one pass over each site's images per round
    (``train.local_epochs=1``, no fixed local steps) and as many pooled epochs as rounds.
    ``curve``: also score the held-out center after every round or epoch (for the figure).
    ``training_seed``: a repeat of the run on the same draw with ``seed=`` set to it (None: the
    configured seed, the run every other row uses).
    """

    method: str
    seed: int
    budget: str
    curve: bool = False
    training_seed: int | None = None

    @property
    def label(self) -> str:
        suffix = "" if self.budget == "recommended" else f" @{self.budget}"
        repeat = "" if self.training_seed is None else f", training seed {self.training_seed}"
        return f"{self.method}{suffix} (seed {self.seed}{repeat})"

    @property
    def directory(self) -> str:
        name = self.method.replace("+", "-").replace(":", "-")
        repeat = "" if self.training_seed is None else f"-train{self.training_seed}"
        return f"{name}-{self.budget}-seed{self.seed}{repeat}"


def quality_root(s: Settings, seed: int) -> Path:
    return s.out / "data" / f"federation-{s.centers}c-{s.fed_scale}x-seed{seed}"


def quality_overrides(s: Settings, run: QualityRun, run_dir: Path) -> list[str]:
    root = quality_root(s, run.seed)
    overrides = [
        f"data.root={root}",
        f"data.synthetic_centers={s.centers}",
        f"data.synthetic_scale={s.fed_scale}",
        f"data.synthetic_seed={run.seed}",
        "evaluation.gradcam=false",
        "evaluation.bootstrap=0",
        f"run_dir={run_dir}",
    ]
    if s.fed_image_size is not None:
        overrides.append(f"data.image_size={s.fed_image_size}")
    if s.quality_rounds is not None:
        overrides.append(f"federation.num_rounds={s.quality_rounds}")
    if run.budget == "equal":
        # every site in every round (no sampling), one pass over its images each time
        overrides += ["train.local_steps=null", "train.local_epochs=1"]
        if is_federated(run.method):
            overrides.append("strategy.fraction_train=1.0")
    if run.training_seed is not None:
        overrides.append(f"seed={run.training_seed}")
    if run.curve:
        overrides.append("evaluation.heldout_each_round=true")
    base, _, variant = run.method.partition("~")
    if is_federated(base):
        overrides += strategy_overrides(base)
    overrides += QUALITY_VARIANTS.get(variant, [])
    return [*overrides, *s.quality_overrides]


# ``METHOD~VARIANT`` runs METHOD with these overrides: the measurements behind the defaults.
QUALITY_VARIANTS = {
    "fp32": ["train.precision=fp32"],  # against train.precision=auto (bf16 where native)
    "avgstats": ["strategy.norm_statistics=average"],  # BatchNorm statistics not re-measured
    "groupnorm": ["model.dp_compatible=true"],  # GroupNorm instead of BatchNorm
    "freshopt": ["train.keep_optimizer_state=false"],  # a fresh optimizer every round
}


def run_hash(overrides: list[str]) -> str:
    from fedmsk.commands.simulate import prepare
    from fedmsk.config import config_hash

    return config_hash(prepare(overrides).cfg)


def strategy_overrides(name: str) -> list[str]:
    """``fedavg+eps8`` -> strategy=fedavg privacy=eps8."""
    strategy, _, privacy = name.partition("+")
    return [f"strategy={strategy}"] + ([f"privacy={privacy}"] if privacy else [])


def finished_run(run_dir: Path, cfg: Any) -> bool:
    """A run directory that already holds the results of exactly this configuration.

    Lets an interrupted section 5 start again without retraining what it finished (each
    method has its own directory, so pooled and local runs of equal configs never mix).
    """
    from fedmsk.config import config_hash

    stamp, results = run_dir / "config_hash.txt", run_dir / "results.json"
    return (
        results.is_file()
        and stamp.is_file()
        and stamp.read_text().strip() == config_hash(cfg)
        # a run writes its hash when it starts and its results when it ends: results older
        # than the hash belong to an earlier configuration whose rerun was interrupted
        and results.stat().st_mtime >= stamp.stat().st_mtime
    )


def quality_plan(s: Settings, training_sites: list[str]) -> list[QualityRun]:
    """Pooled and the recommended strategy on every seed (their first seed with learning
    curves); local-only and the other strategies on the first seed, at both budgets."""
    first = s.quality_seeds[0]
    plan: list[QualityRun] = []
    for seed in s.quality_seeds:
        curve = seed == first and not s.quick
        plan.append(QualityRun("pooled", seed, "recommended", curve))
        plan.append(QualityRun(s.quality_recommended, seed, "recommended", curve))
    budgets = ["recommended"] if s.quick else s.quality_budgets
    for budget in budgets:
        if budget == "equal":
            plan.append(QualityRun("pooled", first, budget))
            plan.append(QualityRun(s.quality_recommended, first, budget))
        if s.quality_local:
            plan += [QualityRun(f"local:{a}", first, budget) for a in training_sites]
        plan += [QualityRun(m, first, budget) for m in s.quality_strategies]
    plan += [QualityRun(m, first, "recommended") for m in s.quality_variants]
    for training_seed in s.quality_training_seeds:
        for seed in s.quality_seeds:
            for method in ("pooled", s.quality_recommended):
                plan.append(QualityRun(method, seed, "recommended", training_seed=training_seed))
    return plan


def train_quality_run(s: Settings, run: QualityRun) -> tuple[Path, bool]:
    """Train ``run`` (or reuse its finished directory); returns the directory and whether it
    was reused."""
    from fedmsk.centralized import run_centralized
    from fedmsk.commands.simulate import prepare, simulate_once

    run_dir = s.out / "quality" / run.directory
    overrides = quality_overrides(s, run, run_dir)
    synthetic_federation(quality_root(s, run.seed), s.centers, s.fed_scale, run.seed)
    cfg = prepare(overrides).cfg
    if finished_run(run_dir, cfg):
        return run_dir, True
    if run.method.partition("~")[0] == "pooled":
        return run_centralized(cfg, "pooled"), False
    if run.method.startswith("local:"):
        return run_centralized(cfg, "local", run.method.split(":", 1)[1]), False
    same = s.finished_runs.get(run_hash(overrides))
    if same is not None:
        return same, True
    return simulate_once(overrides, report=False), False


def heldout_auc(run_dir: Path) -> tuple[float | None, list[float] | None, str]:
    results = json.loads((run_dir / "results.json").read_text())
    for site in results["sites"].values():
        if site["role"] == "heldout":
            summary = site["summary"]
            ci = summary.get("auc_ci95")
            auc = summary.get("auc")
            text = "n/a" if auc is None else f"{auc:.3f}"
            if auc is not None and ci and None not in ci:
                text += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
            return auc, ci, text
    return None, None, "n/a"


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def learning_curves(dirs: dict[str, Path], out: Path) -> Path | None:
    """Held-out AUC against total optimizer steps (all sites' steps summed) per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, tuple[list[int], list[float]]] = {}
    for name, run_dir in dirs.items():
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
        steps_by_round: dict[int, float] = {}
        for line in lines:
            if line.get("phase") == "train" and line.get("site") is not None:
                r = int(line["round"])
                steps_by_round[r] = steps_by_round.get(r, 0.0) + float(line.get("train-steps", 0))
            if line.get("phase") == "train" and line.get("site") is None and "steps" in line:
                steps_by_round[int(line["round"])] = float(line["steps"])
        cumulative, total = {}, 0.0
        for r in sorted(steps_by_round):
            total = steps_by_round[r] if name.startswith("pooled") else total + steps_by_round[r]
            cumulative[r] = total
        points = [
            (cumulative.get(int(x["round"])), x["auc"])
            for x in lines
            if x.get("phase") in ("heldout", "final-heldout") and x.get("auc") is not None
        ]
        points = sorted((int(a), float(b)) for a, b in points if a is not None)
        if points:
            curves[name] = ([p[0] for p in points], [p[1] for p in points])
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, (x, y) in curves.items():
        ax.plot(x, y, marker="o", markersize=3, label=name)
    ax.axhline(0.85, color="grey", linestyle=":", linewidth=1, label="target pooled AUC 0.85")
    ax.set_xlabel("optimizer steps, all sites together")
    ax.set_ylabel("held-out AUC")
    ax.set_ylim(0.3, 1.0)
    ax.set_title("Held-out center during training (for this figure only; not for selection)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = out / "learning_curves.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def section_quality(s: Settings) -> list[Row]:
    from fedmsk.comparison import paired_heldout_test, write_comparison
    from fedmsk.data.federation import load_federation

    first = s.quality_seeds[0]
    federation = load_federation(
        synthetic_federation(quality_root(s, first), s.centers, s.fed_scale, first)
    )
    training_sites = [a.alias for a in federation.sites if a.role != "heldout"]
    dirs: dict[QualityRun, Path] = {}
    seconds: dict[QualityRun, float] = {}
    for run in quality_plan(s, training_sites):
        began = time.monotonic()
        print(f"# quality: {run.label} ...", flush=True)
        dirs[run], reused = train_quality_run(s, run)
        result = json.loads((dirs[run] / "results.json").read_text())
        seconds[run] = float(result["run"].get("seconds") or time.monotonic() - began)
        if reused:
            print(f"#   (finished earlier, reused: {dirs[run]})", flush=True)
    rows: list[Row] = []
    aucs: dict[QualityRun, float | None] = {}
    for run, run_dir in dirs.items():
        aucs[run], _, text = heldout_auc(run_dir)
        rows.append(
            Row(5, f"{run.label}: held-out AUC", aucs[run], "AUC",
                notes=f"{text}; {seconds[run]:.0f} s of training and evaluation")
        )  # fmt: skip
    rows += training_seed_rows(s, aucs)
    # every other row compares the runs made with the configured seed
    dirs = {r: d for r, d in dirs.items() if r.training_seed is None}
    seconds = {r: v for r, v in seconds.items() if r.training_seed is None}
    rows += quality_summary_rows(s, dirs, seconds, paired_heldout_test)
    rows += variant_rows(s, dirs)
    for budget in ("recommended", "equal"):
        runs = {r.label: d for r, d in dirs.items() if r.budget == budget and r.seed == first}
        if runs:
            write_comparison(s.out / "quality" / budget, runs)
    curve_dirs = {f"{r.method} (seed {r.seed})": d for r, d in dirs.items() if r.curve}
    figure = learning_curves(curve_dirs, s.out) if curve_dirs else None
    if figure is not None:
        rows.append(Row(5, "figure: held-out AUC against optimizer steps", None, "",
                        notes=str(figure)))  # fmt: skip
    return rows


def is_federated(method: str) -> bool:
    base = method.partition("~")[0]
    return base != "pooled" and not base.startswith("local:")


def variant_rows(s: Settings, dirs: dict[QualityRun, Path]) -> list[Row]:
    """Each ``METHOD~VARIANT`` against METHOD with the defaults, same seed and budget."""
    from fedmsk.precision import cpu_has_native_bf16

    rows = []
    for run, run_dir in dirs.items():
        base, _, variant = run.method.partition("~")
        reference = next(
            (d for r, d in dirs.items()
             if r.method == base and r.seed == run.seed and r.budget == run.budget), None
        )  # fmt: skip
        if not variant or reference is None:
            continue
        ours, theirs = heldout_auc(reference)[0], heldout_auc(run_dir)[0]
        if ours is None or theirs is None:
            continue
        diff = ours - theirs
        target, status = "", ""
        if variant == "fp32" and cpu_has_native_bf16():
            target, status = "|diff| <= 0.01", status_for(-abs(diff), at_least=-0.01)
        setting = " ".join(QUALITY_VARIANTS[variant])
        rows.append(
            Row(5, f"{base} defaults minus {base} with {variant} (seed {run.seed})", diff, "AUC",
                target, status, f"{ours:.3f} vs {theirs:.3f}; {setting}")
        )  # fmt: skip
    return rows


def training_seed_rows(s: Settings, aucs: dict[QualityRun, float | None]) -> list[Row]:
    """Per draw: pooled and the recommended strategy over their training seeds (the configured
    seed's run and its repeats), mean and spread, and the gap between the two means. With every
    draw covered, the section's two targets are read here, on every run: the gap averaged over
    draws (one run per cell is within the run-to-run spread of the target) and the lowest
    pooled run."""
    rows: list[Row] = []
    if not s.quality_training_seeds:
        return rows
    recommended = s.quality_recommended
    gaps: dict[int, float] = {}
    pooled_runs: dict[tuple[int, int | None], float] = {}  # (draw, training seed) -> AUC
    for seed in s.quality_seeds:
        means: dict[str, float] = {}
        for method in ("pooled", recommended):
            values = {
                run.training_seed: auc
                for run, auc in aucs.items()
                if run.method == method
                and run.seed == seed
                and run.budget == "recommended"
                and auc is not None
            }
            if method == "pooled":
                pooled_runs.update({(seed, k): v for k, v in values.items()})
            if len(values) < 2:
                continue
            mean, sd = mean_and_spread(list(values.values()))
            means[method] = mean
            each = ", ".join(
                f"{'configured' if k is None else k}: {v:.3f}"
                for k, v in sorted(values.items(), key=lambda kv: -1 if kv[0] is None else kv[0])
            )
            rows.append(
                Row(5, f"{method}: held-out AUC over {len(values)} training seeds (seed {seed})",
                    mean, "AUC", notes=f"sd {sd:.3f}, range {min(values.values()):.3f}-"
                    f"{max(values.values()):.3f}; per training seed {each}")
            )  # fmt: skip
        if len(means) == 2:
            gap = means[recommended] - means["pooled"]
            gaps[seed] = gap
            rows.append(
                Row(5, f"{recommended} minus pooled, means over training seeds (seed {seed})",
                    gap, "AUC", notes="recommended budget; same held-out images")
            )  # fmt: skip
    lacking = [seed for seed in s.quality_seeds if seed not in gaps]
    gap = None if lacking or not gaps else statistics.fmean(gaps.values())
    per_seed = ", ".join(f"{k}: {v:+.3f}" for k, v in gaps.items())
    rows.append(
        Row(5, f"{recommended} minus pooled, held-out AUC (mean over seeds of the means over "
            "training seeds)", gap, "AUC", ">= -0.02", status_for(gap, at_least=-0.02),
            f"recommended budget; per seed {per_seed or 'none'}"
            + (f"; no mean over training seeds on seed {', '.join(map(str, lacking))}"
               if lacking else ""))
    )  # fmt: skip
    if pooled_runs:
        where = min(pooled_runs, key=pooled_runs.__getitem__)
        worst = pooled_runs[where]
        rows.append(
            Row(5, "pooled held-out AUC on every seed and training seed (lowest)", worst, "AUC",
                ">= 0.85", status_for(worst, at_least=0.85),
                f"{len(pooled_runs)} runs; lowest: seed {where[0]}, training seed "
                f"{'configured' if where[1] is None else where[1]}")
        )  # fmt: skip
    return rows


def quality_summary_rows(
    s: Settings,
    dirs: dict[QualityRun, Path],
    seconds: dict[QualityRun, float],
    paired_test: Callable[[Path, Path], Any],
) -> list[Row]:
    """Mean and spread over seeds, the targets, and the paired DeLong tests."""
    rows: list[Row] = []
    recommended = s.quality_recommended

    def over_seeds(method: str) -> dict[int, float]:
        found = {}
        for run, run_dir in dirs.items():
            if run.method == method and run.budget == "recommended":
                auc = heldout_auc(run_dir)[0]
                if auc is not None:
                    found[run.seed] = auc
        return found

    pooled, federated = over_seeds("pooled"), over_seeds(recommended)
    seeds = ", ".join(str(x) for x in s.quality_seeds)
    for name, values in (("pooled", pooled), (recommended, federated)):
        if values:
            mean, sd = mean_and_spread(list(values.values()))
            cost = statistics.fmean(
                seconds[r] for r in dirs if r.method == name and r.budget == "recommended"
            )
            rows.append(
                Row(5, f"{name}: held-out AUC, mean over seeds {seeds}", mean, "AUC",
                    notes=f"sd {sd:.3f}; per seed "
                    + ", ".join(f"{k}: {v:.3f}" for k, v in sorted(values.items()))
                    + f"; mean wall time {cost:.0f} s per run")
            )  # fmt: skip
    # with training seeds the targets are read over every run (training_seed_rows)
    here = not s.quality_training_seeds
    elsewhere = "" if here else "; the target is read over the training seeds"

    def target(text: str, status: str) -> tuple[str, str]:
        return (text, status) if here else ("", "")

    if pooled:
        worst = min(pooled.values())
        rows.append(Row(5, "pooled held-out AUC on every seed (lowest)", worst, "AUC",
                        *target(">= 0.85", status_for(worst, at_least=0.85)),
                        f"seeds {seeds}{elsewhere}"))  # fmt: skip
    common = sorted(set(pooled) & set(federated))
    if common:
        gap = statistics.fmean(federated[k] - pooled[k] for k in common)
        rows.append(
            Row(5, f"{recommended} minus pooled, held-out AUC (mean over seeds)", gap, "AUC",
                *target(">= -0.02", status_for(gap, at_least=-0.02)),
                f"recommended budget; seeds {', '.join(map(str, common))}{elsewhere}")
        )  # fmt: skip

        def run_dir(method: str, seed: int) -> Path:
            return next(
                d for r, d in dirs.items()
                if r.method == method and r.seed == seed and r.budget == "recommended"
            )  # fmt: skip

        for seed in common:
            test = paired_test(run_dir(recommended, seed), run_dir("pooled", seed))
            rows.append(
                Row(5, f"paired DeLong test {recommended} vs pooled (seed {seed})",
                    test.auc1 - test.auc2, "AUC",
                    notes=f"AUC {test.auc1:.3f} vs {test.auc2:.3f}, z {test.z:.2f}, "
                    f"p {test.p:.3g}, same held-out images")
            )  # fmt: skip
    first = s.quality_seeds[0]
    for budget in ("recommended", "equal"):
        same = {r: d for r, d in dirs.items() if r.seed == first and r.budget == budget}
        fed = {r.method: heldout_auc(d)[0] for r, d in same.items()
               if is_federated(r.method)}  # fmt: skip
        local = {r.method: heldout_auc(d)[0] for r, d in same.items()
                 if r.method.startswith("local:")}  # fmt: skip
        fed = {k: v for k, v in fed.items() if v is not None}
        local = {k: v for k, v in local.items() if v is not None}
        if fed and local:
            best = max(fed, key=fed.__getitem__)
            best_local = max(local, key=local.__getitem__)
            margin = fed[best] - local[best_local]
            rows.append(
                Row(5, f"best federated ({best}) minus best local-only ({best_local}), {budget} "
                    "budget", margin, "AUC", "> 0", status_for(margin, at_least=1e-12),
                    f"seed {first}")
            )  # fmt: skip
    return rows


# -- output ------------------------------------------------------------------------------------

RUNNERS: dict[int, Callable[[Settings], list[Row]]] = {
    1: section_client_throughput,
    2: section_dp,
    3: section_data_path,
    4: section_federation,
    5: section_quality,
}


def format_value(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}"


def markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    lines = [
        "# fedmsk benchmark",
        "",
        f"- date: {meta['date']}",
        f"- machine: {meta['machine']['cpu_count']} CPU cores, "
        f"{meta['machine']['gpu'] or 'no GPU'}, torch {meta['machine']['torch']}, "
        f"load average at start {meta['machine']['load_average_start']}",
        f"- command: `{meta['command']}`",
        f"- quick mode: {meta['quick']}",
        "",
        "| # | measurement | value | unit | target | status | notes |",
        "|---|---|---:|---|---|---|---|",
    ]
    for row in rows:
        status = f"**{row.status}**" if row.status in (MISSED, FAILED) else row.status
        if row.status == MISSED:
            status += f" ({format_value(row.value)})"
        lines.append(
            f"| {row.section} | {row.name} | {format_value(row.value)} | {row.unit} | "
            f"{row.target} | {status} | {row.notes.replace('|', '/')} |"
        )
    lines.append("")
    for number, seconds in sorted(meta["section_seconds"].items()):
        date = meta["section_dates"].get(number, "")
        lines.append(f"- section {number} ({SECTIONS[int(number)]}): {seconds:.0f} s, run {date}")
    return "\n".join(lines) + "\n"


def machine() -> dict[str, Any]:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": gpu,
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="1,2,3,4,5", help="comma list of 1-5")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 round, 4 centers")
    parser.add_argument("--out", default="runs/benchmark", help="output directory")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (sections 1, 3)")
    parser.add_argument("--repeats", type=int, default=5, help="repetitions per timed side")
    parser.add_argument("--fed-rounds", type=int, default=2, help="section 4 rounds")
    # sections 1 and 3: the site and model. A realistic GPU site: --model resnet50 (or
    # efficientnet_b0) --image-size 224 --site-scale 90 (the first training site then has
    # about 2,000 training images; the site is generated once per --out, so use a fresh one)
    parser.add_argument("--model", default=None, help="sections 1, 3 model (default resnet18)")
    parser.add_argument("--image-size", type=int, default=None, help="sections 1, 3 image size")
    parser.add_argument("--batch-size", type=int, default=None, help="sections 1, 3 batch size")
    parser.add_argument(
        "--site-scale", type=float, default=None, help="sections 1, 3 synthetic site size"
    )
    parser.add_argument(
        "--fed-scale", type=float, default=3.0, help="synthetic federation size (sections 4, 5)"
    )
    parser.add_argument(
        "--fed-image-size",
        type=int,
        default=None,
        help="image size in sections 4 and 5 (default: 64 px in section 4, the config's in 5)",
    )
    parser.add_argument(
        "--quality-rounds", type=int, default=None, help="section 5 rounds (default: config's)"
    )
    parser.add_argument(
        "--quality-seeds", default="", help="section 5 federation draws (default 0,5,6)"
    )
    parser.add_argument(
        "--quality-strategies", default="", help="e.g. fedavg,fedprox,fedbn,fedavg+eps8"
    )
    parser.add_argument(
        "--quality-variants", default=None, help="section 5 METHOD~VARIANT runs ('' for none)"
    )
    parser.add_argument(
        "--quality-training-seeds",
        default="",
        help="section 5: repeat pooled and the recommended strategy on every draw with these "
        "seed= values (the run-to-run spread), e.g. 43,44",
    )
    parser.add_argument(
        "--quality-budgets", default="", help="section 5 budgets: recommended,equal (default both)"
    )
    parser.add_argument(
        "--skip-local", action="store_true", help="section 5 without the local-only baselines"
    )
    parser.add_argument(
        "--quality-recommended",
        default="",
        help="section 5 strategy run on every seed and tested against pooled (default cyclic)",
    )
    parser.add_argument(
        "--quality-override", action="append", help="extra Hydra override for section 5"
    )
    parser.add_argument(
        "--fresh", action="store_true", help="drop rows of other sections left in --out"
    )
    args = parser.parse_args(argv)
    try:
        args.section_list = sorted(set(int_list(args.sections)))
    except ValueError:
        parser.error(f"--sections {args.sections!r}: use a comma list of numbers 1-5")
    if not args.section_list or not set(args.section_list) <= set(SECTIONS):
        parser.error(f"--sections {args.sections!r}: choose from 1-5")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = settings(args)
    s.out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "command": " ".join(
            ["simulations/benchmark.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "quick": s.quick,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(s).items()},
        "section_seconds": {},
        "section_dates": {},
    }
    if args.fresh:
        for stale in (s.out / "benchmark.json", s.out / "benchmark.md"):
            stale.unlink(missing_ok=True)
    rows: list[Row] = []
    failed = False
    for number in args.section_list:
        print(f"# section {number}: {SECTIONS[number]}", flush=True)
        begin = time.monotonic()
        try:
            rows += RUNNERS[number](s)
        except Exception as exc:  # noqa: BLE001 - one failed section must not lose the others
            failed = True
            traceback.print_exc()
            rows.append(Row(number, f"section {number} failed", None, "", status=FAILED,
                            notes=f"{type(exc).__name__}: {exc}"[:300]))  # fmt: skip
        meta["section_seconds"][str(number)] = round(time.monotonic() - begin, 1)
        meta["section_dates"][str(number)] = meta["date"]
        write_outputs(s.out, rows, meta, args.section_list)
    meta["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    paths = write_outputs(s.out, rows, meta, args.section_list)
    print(paths["markdown"].read_text())
    return 1 if failed else 0


def earlier_rows(out: Path, running: list[int], meta: dict[str, Any]) -> list[Row]:
    """Rows of the sections not run now, kept from the table already in ``--out``.

    Read at every write, so a long section (quality) can run on its own, even at the same time
    as another invocation with other sections into the same directory, and the table holds
    both; each section keeps its own date and duration.
    """
    path = out / "benchmark.json"
    if not path.is_file():
        return []
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
        rows = [Row(**r) for r in previous.get("rows", []) if r["section"] not in running]
    except (ValueError, TypeError, KeyError):
        return []
    kept = {str(r.section) for r in rows}
    for key in ("section_seconds", "section_dates"):
        old = previous.get(key, {})
        meta[key].update({k: v for k, v in old.items() if k in kept})
    return rows


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_outputs(
    out: Path, rows: list[Row], meta: dict[str, Any], running: list[int]
) -> dict[str, Path]:
    """Both files are rewritten after every section, so a long run leaves partial results."""
    merged = sorted([*earlier_rows(out, running, meta), *rows], key=lambda r: r.section)
    paths = {"markdown": out / "benchmark.md", "json": out / "benchmark.json"}
    _atomic_write(paths["markdown"], markdown(merged, meta))
    payload = {**meta, "rows": [asdict(r) for r in merged]}
    _atomic_write(paths["json"], json.dumps(payload, indent=2, default=str) + "\n")
    return paths


if __name__ == "__main__":
    raise SystemExit(main())
