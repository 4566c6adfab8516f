"""How fast, how heavy, how good: fedmsk measured side by side, in one command.

Five sections, each selectable with ``--sections`` and each with a ``--quick`` mode (tiny sizes,
one round, four centers, small images) that the smoke test runs end to end:

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
5. quality: pooled vs local-only vs FedAvg / FedAvgM / FedProx / FedBN / FedAvg with DP (eps 8) on
   the synthetic federation, per-center validation AUC and held-out AUC with DeLong CIs.
   Targets: best federated within 0.02 AUC of pooled on the held-out center, and above every
   local-only model there.

    .venv/bin/python simulations/benchmark.py --out runs/benchmark            # everything
    .venv/bin/python simulations/benchmark.py --sections 1,3 --quick --out /tmp/b

Writes ``benchmark.md`` and ``benchmark.json`` to ``--out``; a missed target reads MISSED with
the measured figure. The machine may be shared: throughput figures are medians of alternating
repetitions and each section says how many. Exit status 1 when a section failed to run.
"""

from __future__ import annotations

import argparse
import datetime as dt
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
    fed_image_size: int = 64
    fed_rounds: int = 2
    quality_rounds: int = 10
    quality_epochs: int = 1
    quality_strategies: list[str] = field(
        default_factory=lambda: ["fedavg", "fedavgm", "fedprox", "fedbn", "fedavg+eps8"]
    )
    quality_overrides: list[str] = field(default_factory=list)
    bench_fit_args: list[str] = field(default_factory=list)
    # finished federated runs by config hash (run_dir excluded): section 5 reuses section 4's
    finished_runs: dict[str, Path] = field(default_factory=dict)


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
        quality_epochs=args.quality_epochs,
        quality_overrides=list(args.quality_override or []),
    )
    if args.quality_strategies:
        s.quality_strategies = [x for x in args.quality_strategies.split(",") if x]
    if args.quick:
        s.threads, s.repeats = 1, 1
        s.image_size, s.batch_size, s.site_scale = 32, 8, 0.5
        s.dp_args = ["--quick"]
        s.decode_size, s.decode_repeats = 256, 1
        s.centers, s.fed_scale, s.fed_image_size = 4, 0.5, 32
        s.fed_rounds, s.quality_rounds, s.quality_epochs = 1, 1, 1
        if not args.quality_strategies:
            s.quality_strategies = ["fedavg"]
        s.bench_fit_args = ["--image-size", "32", "--batch-size", "8", "--steps", "2"]
        s.bench_fit_args += ["--reps", "2", "--warmup", "1"]
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


def synthetic_federation(root: Path, centers: int, scale: float) -> Path:
    """The synthetic X-ray fracture federation, generated once per benchmark output dir."""
    from fedmsk.data.federation import FEDERATION_FILE
    from fedmsk.data.synthetic import generate_federation

    if not (root / FEDERATION_FILE).is_file():
        print(f"# generating {centers} synthetic centers (scale {scale}) in {root}", flush=True)
        generate_federation(root, task="xray_fracture", centers=centers, seed=0, scale=scale)
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


def bare_epoch(model, loader, cfg, device) -> None:
    """What a PyTorch tutorial writes: the same optimizer settings, no framework."""
    import torch
    from torch import nn

    model.to(device)
    model.train()
    if cfg.optimizer == "adamw":  # the default of configs/train/default.yaml
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    criterion = nn.CrossEntropyLoss()
    for inputs, targets in loader:
        inputs, targets = inputs.to(device), targets.to(device)
        optimizer.zero_grad()
        criterion(model(inputs), targets).backward()
        optimizer.step()
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

    from fedmsk.models import create_model, get_arrays, set_arrays
    from fedmsk.site_runtime import ModelPool, SiteRuntime
    from fedmsk.training import resolve_device

    site_dir, alias = first_training_site(root)
    cfg = site_config(s, root, device_name, ["data.augment=false"])
    device = resolve_device(device_name)
    torch.set_num_threads(s.threads)
    torch.manual_seed(0)
    reference = create_model(s.model, num_classes=2, in_chans=cfg.data.in_chans)
    global_arrays = get_arrays(reference)
    warm = SiteRuntime(cfg, site_dir, alias, heldout=False, seed=0)  # fills the cache
    images, labels = cached_tensors(warm.loaders.dataset("train"))
    n = len(labels)
    generator = torch.Generator().manual_seed(0)
    bare_loader = DataLoader(
        TensorDataset(images, labels), batch_size=s.batch_size, shuffle=True, generator=generator
    )

    def run_bare() -> None:
        set_arrays(reference, global_arrays)
        bare_epoch(reference, bare_loader, cfg.train, device)

    fit_seconds: list[float] = []
    pool = ModelPool()  # what a node process keeps between messages (client/app.py)

    def run_round() -> None:
        runtime = SiteRuntime(cfg, site_dir, alias, heldout=False, seed=0, model_pool=pool)
        outcome = runtime.train(global_arrays, server_round=1)
        fit_seconds.append(outcome.metrics["train-seconds"])

    run_bare()
    run_round()
    fit_seconds.clear()
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
    where = f"{device_name}, {s.model}, {s.image_size} px, batch {s.batch_size}, {n} images"
    reps = f"median of {s.repeats} alternating reps, {s.threads} threads"
    return [
        Row(1, f"bare PyTorch loop on cached tensors ({where})", bare_ips, "images/s",
            notes=reps),
        Row(1, f"federated round: SiteRuntime build + train ({device_name})", round_ips,
            "images/s", notes=f"set-up (site loaders over the cache, weight load) {setup:.2f} "
            "s/round; the model is kept between rounds as the ClientApp keeps it"),
        Row(1, f"round / bare throughput ({device_name})", round_ips / bare_ips, "ratio",
            ">= 0.95", status_for(round_ips / bare_ips, at_least=0.95),
            f"median of paired ratios {pair:.3f}"),
        Row(1, f"fit() inside the round / bare ({device_name})", fit_only / bare_ips, "ratio",
            notes="fit's own timer (train-seconds); augmentation off on both sides"),
    ]  # fmt: skip


def bench_fit_rows(s: Settings, device: str) -> list[Row]:
    json_path = s.out / "work" / f"bench_fit-{device}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    done = run_script(
        "bench_fit.py", [*s.bench_fit_args, "--device", device, "--json", str(json_path)], 900
    )
    if done.returncode != 0 or not json_path.is_file():
        raise RuntimeError(f"bench_fit.py failed: {(done.stderr or done.stdout)[-300:]}")
    result = json.loads(json_path.read_text())
    ratio = float(result["ratio"])
    return [
        Row(1, f"fit() vs bare loop, random tensors, bench_fit.py ({device})", ratio, "ratio",
            ">= 0.95", status_for(ratio, at_least=0.95),
            f"bare {result['bare_images_per_second']} / fit {result['fit_images_per_second']} "
            f"images/s; best-rep ratio {result['best_rep_ratio']}, median paired ratio "
            f"{result['median_pair_ratio']}; {result['reps']} reps")
    ]  # fmt: skip


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
        name += f"{'on' if augment else 'off'}, num_workers {cfg.data.num_workers})"
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
    """Train phase per round: from the end of the previous round's evaluation (or the start of
    the run for round 1) to the line the ServerApp writes after aggregating."""
    timings = []
    rounds = sorted({int(r["round"]) for _, r in lines if r.get("phase") == "train"})
    for rnd in rounds:
        end = [t for t, r in lines if r.get("phase") == "train" and r.get("site") is None
               and r.get("round") == rnd]  # fmt: skip
        before = [t for t, r in lines if int(r.get("round", 0)) == rnd - 1
                  and r.get("phase") in ("val", "heldout")]  # fmt: skip
        if not end:
            continue
        start = max(before) if before else started
        seconds = [float(r["train-seconds"]) for _, r in lines if r.get("phase") == "train"
                   and r.get("site") and r.get("round") == rnd
                   and "train-seconds" in r]  # fmt: skip
        timings.append(RoundTiming(rnd, end[0] - start, seconds, not before))
    return timings


def federation_overrides(s: Settings, root: Path, run_dir: Path, rounds: int) -> list[str]:
    return [
        f"data.root={root}",
        f"data.synthetic_centers={s.centers}",
        f"data.synthetic_scale={s.fed_scale}",
        f"data.image_size={s.fed_image_size}",
        f"model={s.model}",
        f"federation.num_rounds={rounds}",
        "evaluation.gradcam=false",
        "evaluation.bootstrap=0",
        f"run_dir={run_dir}",
    ]


def model_bytes(s: Settings) -> tuple[int, int]:
    from fedmsk.models import create_model, get_arrays

    arrays = get_arrays(create_model(s.model, num_classes=2, in_chans=1))
    return sum(a.nbytes for a in arrays.values()), sum(a.size for a in arrays.values())


def section_federation(s: Settings) -> list[Row]:
    from fedmsk.commands.simulate import simulate_once

    root = s.out / "data" / f"federation-{s.centers}c-{s.fed_scale}x"
    synthetic_federation(root, s.centers, s.fed_scale)
    run_dir = s.out / "work" / "overhead-run"
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
    nbytes, nparams = model_bytes(s)
    where = f"{len(results['sites'])} sites, {s.model} at {s.fed_image_size} px"
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
        Row(4, f"bytes sent per client per round, each way ({s.model})", nbytes / 1e6, "MB",
            notes=f"{nparams:,} values, sum of get_arrays nbytes; server->client and back"),
        Row(4, "peak memory of the simulation's process tree (PSS)", watcher.peak_pss, "MiB",
            notes=f"RSS sum {watcher.peak_rss:.0f} MiB over up to {watcher.peak_processes} "
            "processes; sampled every 1 s"),
        Row(4, "whole simulation wall time", total, "s",
            notes=f"{s.fed_rounds} round(s) + final evaluation; results.json says "
            f"{results['run']['seconds']} s inside the ServerApp"),
    ]  # fmt: skip
    return rows


# -- section 5 ---------------------------------------------------------------------------------


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

    stamp = run_dir / "config_hash.txt"
    return (
        (run_dir / "results.json").is_file()
        and stamp.is_file()
        and stamp.read_text().strip() == config_hash(cfg)
    )


def quality_runs(s: Settings) -> dict[str, Path]:
    from fedmsk.centralized import run_centralized
    from fedmsk.commands.simulate import prepare, simulate_once

    root = s.out / "data" / f"federation-{s.centers}c-{s.fed_scale}x"
    synthetic_federation(root, s.centers, s.fed_scale)
    out = s.out / "quality"
    base = federation_overrides(s, root, out / "base", s.quality_rounds)
    base += [f"train.local_epochs={s.quality_epochs}", *s.quality_overrides]
    prepared = prepare(base)
    runs: dict[str, Path] = {}

    def centralized(name: str, run_dir: Path, mode: str, site: str | None = None) -> None:
        cfg = prepare([*base, f"run_dir={run_dir}"]).cfg
        reuse = finished_run(run_dir, cfg)
        print(f"# quality: {name}{' (finished earlier, reused)' if reuse else ''}", flush=True)
        runs[name] = run_dir if reuse else run_centralized(cfg, mode, site)

    centralized("pooled", out / "pooled", "pooled")
    heldout = set(prepared.cfg.federation.heldout_sites)
    for alias in [a for a in prepared.cfg.federation.sites if a not in heldout]:
        centralized(f"local:{alias}", out / f"local-{alias}", "local", alias)
    for name in s.quality_strategies:
        run_dir = out / name.replace("+", "-")
        job = [*base, *strategy_overrides(name), f"run_dir={run_dir}"]
        same = s.finished_runs.get(run_hash(job))
        if same is None and finished_run(run_dir, prepare(job).cfg):
            same = run_dir
        print(f"# quality: {name}{' (finished earlier, reused)' if same else ''}", flush=True)
        runs[name] = same if same is not None else simulate_once(job, report=False)
    return runs


def section_quality(s: Settings) -> list[Row]:
    from fedmsk.comparison import comparison_rows, write_comparison

    runs = quality_runs(s)
    paths = write_comparison(s.out / "quality", runs)
    columns, table = comparison_rows(runs)
    results = {n: json.loads((p / "results.json").read_text()) for n, p in runs.items()}
    heldout = [c for c in columns if any(r["sites"].get(c, {}).get("role") == "heldout"
                                         for r in results.values())]  # fmt: skip
    target = heldout[0]
    setting = (f"{s.centers} centers, {s.model} {s.fed_image_size} px, {s.quality_rounds} rounds "
               f"x {s.quality_epochs} local epoch(s)")  # fmt: skip
    rows = []
    for row in table:
        cell = row[target]
        mean = row["mean_val_auc"]
        rows.append(
            Row(5, f"{row['method']}: held-out AUC ({target})", cell["auc"], "AUC",
                notes=f"{cell['text']}; mean per-center validation AUC "
                f"{'n/a' if mean is None else f'{mean:.3f}'}")
        )  # fmt: skip
    by_method = {row["method"]: row[target]["auc"] for row in table}
    pooled = by_method.get("pooled")
    federated = {m: a for m, a in by_method.items() if m != "pooled" and not m.startswith("local:")}
    local = {m: a for m, a in by_method.items() if m.startswith("local:") and a is not None}
    best_name = max(federated, key=lambda m: federated[m] or -1.0) if federated else None
    best = federated.get(best_name) if best_name else None
    gap = None if best is None or pooled is None else best - pooled
    rows.append(
        Row(5, f"best federated ({best_name}) minus pooled, held-out AUC", gap, "AUC",
            ">= -0.02", status_for(gap, at_least=-0.02), setting)
    )  # fmt: skip
    best_local = max(local.values()) if local else None
    margin = None if best is None or best_local is None else best - best_local
    best_local_name = max(local, key=lambda m: local[m]) if local else "none"
    rows.append(
        Row(5, f"best federated minus best local-only ({best_local_name}), held-out AUC", margin,
            "AUC", "> 0", status_for(margin, at_least=1e-12),
            f"table of every center: {paths['markdown']}")
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
    parser.add_argument(
        "--fed-scale", type=float, default=3.0, help="synthetic federation size (sections 4, 5)"
    )
    parser.add_argument(
        "--fed-image-size", type=int, default=64, help="image size in sections 4 and 5"
    )
    parser.add_argument("--quality-rounds", type=int, default=10, help="section 5 rounds")
    parser.add_argument("--quality-epochs", type=int, default=1, help="section 5 local epochs")
    parser.add_argument(
        "--quality-strategies", default="", help="e.g. fedavg,fedprox,fedbn,fedavg+eps8"
    )
    parser.add_argument(
        "--quality-override", action="append", help="extra Hydra override for section 5"
    )
    parser.add_argument(
        "--fresh", action="store_true", help="drop rows of other sections left in --out"
    )
    args = parser.parse_args(argv)
    try:
        args.section_list = sorted({int(x) for x in args.sections.split(",") if x.strip()})
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
