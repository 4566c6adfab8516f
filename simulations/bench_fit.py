"""Throughput of ``fedmsk.training.fit`` against a bare PyTorch training loop.

Both loops train the same model object on the same in-memory random batches in one process,
alternating repetitions in A-B-B-A order after a warm-up so that drifts in machine load hit both
alike; the median of each side is compared. Each repetition is timed from outside the call, so
fit's set-up (optimizer, scheduler, device checks) counts against it. Besides wall-clock time the
process CPU time is reported, and two statistics that resist load from other jobs: the best
repetition of each side (load only ever adds time) and the median of the per-pair ratios (the two
halves of a pair run back to back, under about the same load).

    .venv/bin/python simulations/bench_fit.py          # resnet18, 32 x 128 px, 2 threads
    .venv/bin/python simulations/bench_fit.py --steps 4 --reps 3 --json bench.json

Prints a Markdown table and one JSON object. The project target is ratio >= 0.95.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedmsk.config import TrainConfig  # noqa: E402
from fedmsk.models import create_model  # noqa: E402
from fedmsk.training import fit, resolve_device, training_precision  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--in-chans", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per repetition")
    parser.add_argument("--reps", type=int, default=10, help="repetitions of each loop")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up steps of each loop")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--precision",
        default="fp32",
        help="fit's train.precision (fp32, bf16, fp16, auto); the bare loop stays fp32",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    return parser.parse_args(argv)


def bare_loop(model: nn.Module, loader: DataLoader, cfg: TrainConfig, device: torch.device):
    """The reference: what a PyTorch tutorial writes, with the same optimizer settings."""
    model.to(device)
    model.train()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    criterion = nn.CrossEntropyLoss()
    for inputs, targets in loader:
        inputs, targets = inputs.to(device), targets.to(device)
        optimizer.zero_grad()
        loss = criterion(model(inputs), targets)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=2, in_chans=args.in_chans)
    n = args.batch_size * args.steps
    images = torch.randn(n, args.in_chans, args.image_size, args.image_size)
    labels = torch.randint(0, 2, (n,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=args.batch_size)
    warm = args.batch_size * args.warmup
    warm_data = TensorDataset(images[:warm], labels[:warm])
    warm_loader = DataLoader(warm_data, batch_size=args.batch_size)
    cfg = TrainConfig(
        batch_size=args.batch_size,
        optimizer="sgd",
        scheduler="none",
        class_weighting="none",
        proximal_mu=0.0,
        precision=args.precision,
        device=str(device),
        num_threads=args.threads,
        progress=False,
    )

    # Another number format trains its own copy: fit() may switch the model to channels-last,
    # which must not change what the fp32 reference loop runs.
    fit_model = model if args.precision == "fp32" else copy.deepcopy(model)
    chosen = training_precision(fit_model, cfg, device)
    if args.warmup:
        bare_loop(model, warm_loader, cfg, device)
        fit(fit_model, warm_loader, cfg, num_classes=2)
    times: dict[str, list[tuple[float, float]]] = {"bare": [], "fit": []}
    fit_inner: list[float] = []

    def run_bare() -> None:
        bare_loop(model, loader, cfg, device)

    def run_fit() -> None:
        result = fit(fit_model, loader, cfg, num_classes=2)
        assert result.steps == args.steps
        fit_inner.append(result.images_per_second)

    for rep in range(args.reps):
        order = [("bare", run_bare), ("fit", run_fit)]
        for name, run in order if rep % 2 == 0 else order[::-1]:
            times[name].append(timed(run))

    def median_ips(name: str, index: int) -> float:
        return n / statistics.median(t[index] for t in times[name])

    bare_ips, fit_ips = median_ips("bare", 0), median_ips("fit", 0)
    best_ratio = min(t[0] for t in times["bare"]) / min(t[0] for t in times["fit"])
    pair_ratio = statistics.median(
        b[0] / f[0] for b, f in zip(times["bare"], times["fit"], strict=True)
    )
    bare_cpu, fit_cpu = median_ips("bare", 1), median_ips("fit", 1)
    summary = {
        "model": args.model,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "in_chans": args.in_chans,
        "threads": args.threads,
        "device": str(device),
        "torch": torch.__version__,
        "precision_requested": args.precision,
        "precision_chosen": chosen.name,
        "precision_reason": chosen.reason,
        "channels_last": chosen.channels_last,
        "steps_per_rep": args.steps,
        "reps": args.reps,
        "bare_images_per_second": round(bare_ips, 2),
        "fit_images_per_second": round(fit_ips, 2),
        "fit_reported_images_per_second": round(statistics.median(fit_inner), 2),
        "ratio": round(fit_ips / bare_ips, 4),
        "bare_images_per_cpu_second": round(bare_cpu, 2),
        "fit_images_per_cpu_second": round(fit_cpu, 2),
        "cpu_time_ratio": round(fit_cpu / bare_cpu, 4),
        "best_rep_ratio": round(best_ratio, 4),
        "median_pair_ratio": round(pair_ratio, 4),
        "bare_rep_seconds": [round(t[0], 3) for t in times["bare"]],
        "fit_rep_seconds": [round(t[0], 3) for t in times["fit"]],
    }
    print(f"\n{args.model}, batch {args.batch_size}, {args.image_size} px, {args.threads} threads,")
    print(f"{args.reps} alternating repetitions of {args.steps} steps, median, on {device}\n")
    print("| loop | images/s (wall) | images per CPU-second |")
    print("|---|---|---|")
    print(f"| bare PyTorch | {bare_ips:.1f} | {bare_cpu:.1f} |")
    print(f"| fedmsk fit() | {fit_ips:.1f} | {fit_cpu:.1f} |")
    print(f"| ratio fit/bare | {fit_ips / bare_ips:.3f} | {fit_cpu / bare_cpu:.3f} |\n")
    print(f"ratio of best repetitions {best_ratio:.3f}, median of paired ratios {pair_ratio:.3f}\n")
    text = json.dumps(summary)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
