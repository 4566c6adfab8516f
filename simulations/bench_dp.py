"""DP-SGD versus plain training: images per second and peak memory per per-sample-gradient mode.

Each configuration (model x mode) runs in its own subprocess so that its peak resident memory
(``ru_maxrss``) is its own; torch's allocations are invisible to tracemalloc. Both sides train the
same DP-compatible (GroupNorm) model on synthetic images, so the ratio isolates the cost of
per-sample gradients, clipping and noise. Batches are fixed-size here (no Poisson sampling) so
every step processes the same number of images. Throughput is the batch size over the median
step time; in a DP row, plain steps of an identical model alternate with the DP steps in the
same process, so the DP / plain ratio holds up on a machine shared with other work.

``--device cuda`` puts model, data and Opacus on the GPU: each step is timed between two
``torch.cuda.synchronize`` calls (kernels run asynchronously) and the table adds peak GPU memory
(``torch.cuda.max_memory_allocated``), which ``ru_maxrss`` cannot see.

    .venv/bin/python simulations/bench_dp.py            # 128 px, batch 32, 2 threads (~5 min)
    .venv/bin/python simulations/bench_dp.py --quick    # smoke test, < 30 s
    .venv/bin/python simulations/bench_dp.py --modes all --json-out dp.json
    python3 simulations/bench_dp.py --device cuda --steps 20 --modes all  # on a GPU machine

Prints a Markdown table, then one JSON object with every measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODES = ("hooks", "functorch", "ew", "ghost", "auto")
# "auto" = what a site with privacy.grad_sample_mode=auto uses: the timed probe of
# fedmsk.privacy.modes picks the mode (its choice is the row's chosen_mode), then that mode is
# timed.
MODELS = ("resnet18", "efficientnet_b0", "mobilenetv3_small_100")
# Default modes per model: those the platform notes found usable. Hook modes on depthwise
# models run 10-20x slower than plain training and need GBs; `--modes all` measures them too.
DEFAULT_MODES = {
    "resnet18": ("hooks", "ew", "functorch", "ghost"),
    "efficientnet_b0": ("functorch",),
    "mobilenetv3_small_100": ("functorch", "hooks"),
}


@dataclass
class Measurement:
    """One subprocess. For a DP mode, plain steps of an identical model are interleaved with
    the DP steps in the same process, so both see the same machine load: ``ratio`` is robust on
    a shared machine even when absolute images/s are not. ``peak_rss_mib`` of a DP row includes
    the plain twin (a copy of the weights); the ``none`` row is plain training alone."""

    model: str
    mode: str  # "none" = plain training of the same DP-compatible model
    image_size: int
    batch_size: int
    threads: int
    steps: int
    images_per_second: float | None
    plain_images_per_second: float | None
    ratio: float | None  # DP images/s divided by plain images/s (median step times)
    peak_rss_mib: float | None
    rss_before_training_mib: float | None
    error: str | None = None
    device: str = "cpu"
    # cuda only: torch.cuda.max_memory_allocated over the whole process, and what was allocated
    # (weights, data, the plain twin) when the timed steps began
    peak_gpu_mib: float | None = None
    gpu_before_training_mib: float | None = None
    chosen_mode: str | None = None  # the mode the timed probe picked (mode "auto" only)


def _rss_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _trainer(model, mode: str, batch: int, n: int, device: str = "cpu"):
    """A closure that runs one training step on (x, y); DP-wrapped unless mode is none.

    On cuda the step is timed between two synchronizations so that the queued kernels of the
    step before cannot leak into this one, nor this step's into the next.
    """
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    if mode != "none":
        from opacus import PrivacyEngine

        data = TensorDataset(torch.zeros(n, 1), torch.zeros(n).long())  # sizes the DP optimizer
        wrapped = PrivacyEngine().make_private(
            module=model,
            optimizer=optimizer,
            data_loader=DataLoader(data, batch_size=batch),
            criterion=criterion,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=False,
            grad_sample_mode=mode,
        )
        if mode == "ghost":
            model, optimizer, criterion, _ = wrapped
        else:
            model, optimizer, _ = wrapped

    cuda = device == "cuda"

    def step(x, y) -> float:
        if cuda:
            torch.cuda.synchronize()
        begin = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        criterion(model(x), y).backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - begin

    return step


def run_worker(args: argparse.Namespace) -> Measurement:
    """One warm-up step, then ``args.steps`` timed steps (plain and DP alternating)."""
    import copy
    import statistics

    import torch

    sys.path.insert(0, str(REPO))
    import timm

    from fedmsk.privacy import make_dp_compatible

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU")
    model = timm.create_model(args.model, num_classes=2, in_chans=1, pretrained=False)
    model, _ = make_dp_compatible(model)
    model.to(args.device).train()
    n = args.batch * (args.steps + 1)
    # all images on the device up front: the steps time compute, not host-to-device copies
    images = torch.randn(n, 1, args.size, args.size).to(args.device)
    labels = torch.randint(0, 2, (n,)).to(args.device)
    twin = model if args.mode == "none" else copy.deepcopy(model)
    plain = _trainer(twin, "none", args.batch, n, args.device)
    chosen = None
    if args.mode == "auto":
        from torch.utils.data import DataLoader, TensorDataset

        from fedmsk.privacy.modes import fastest_grad_sample_mode

        probe_loader = DataLoader(TensorDataset(images.cpu(), labels.cpu()), batch_size=args.batch)
        chosen = fastest_grad_sample_mode(model, probe_loader)
        if chosen is None:
            raise SystemExit("auto: no per-sample gradient mode works for this model")
    private = None
    if args.mode != "none":
        private = _trainer(model, chosen or args.mode, args.batch, n, args.device)
    rss_before = _rss_mib()
    gpu_before = torch.cuda.memory_allocated() / 2**20 if cuda else None
    plain_times: list[float] = []
    dp_times: list[float] = []
    for step in range(args.steps + 1):
        x = images[step * args.batch : (step + 1) * args.batch]
        y = labels[step * args.batch : (step + 1) * args.batch]
        seconds = plain(x, y)
        if step:
            plain_times.append(seconds)
        if private is not None:
            seconds = private(x, y)
            if step:
                dp_times.append(seconds)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    plain_ips = args.batch / statistics.median(plain_times)
    dp_ips = args.batch / statistics.median(dp_times) if dp_times else None
    return Measurement(
        args.model, args.mode, args.size, args.batch, args.threads, args.steps,
        dp_ips if dp_ips is not None else plain_ips, plain_ips,
        dp_ips / plain_ips if dp_ips is not None else None, peak, rss_before,
        device=args.device, peak_gpu_mib=peak_gpu, gpu_before_training_mib=gpu_before,
        chosen_mode=chosen,
    )  # fmt: skip


def measure(model: str, mode: str, args: argparse.Namespace) -> Measurement:
    """One configuration in a fresh interpreter; a crash or timeout becomes an error row."""
    command = [
        sys.executable, __file__, "--worker", "--model", model, "--mode", mode,
        "--size", str(args.size), "--batch", str(args.batch), "--steps", str(args.steps),
        "--threads", str(args.threads), "--device", args.device,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    failed = Measurement(
        model, mode, args.size, args.batch, args.threads, args.steps, None, None, None, None, None,
        device=args.device,
    )  # fmt: skip
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=args.timeout, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        failed.error = f"timeout after {args.timeout}s"
        return failed
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        failed.error = f"exit {done.returncode}: {tail[:160]}"
        return failed
    return Measurement(**json.loads(lines[-1]))


def _mib(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}"


def markdown(rows: list[Measurement]) -> str:
    """The CPU table as before; rows measured on cuda add two GPU memory columns."""
    gpu = any(r.device == "cuda" for r in rows)
    head = (
        "| model | mode | images/s | plain images/s (same process) | DP / plain | slowdown "
        "| peak RSS MiB | RSS before training MiB |"
    )
    rule = "|---|---|---:|---:|---:|---:|---:|---:|"
    if gpu:
        head += " peak GPU MiB | GPU before training MiB |"
        rule += "---:|---:|"
    out = [head, rule]
    for r in rows:
        mode = r.mode if r.chosen_mode is None else f"auto ({r.chosen_mode})"
        if r.error:
            out.append(f"| {r.model} | {mode} | failed: {r.error} | | | | | |" + " |" * 2 * gpu)
            continue
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}"
        slowdown = "" if not r.ratio else f"{1 / r.ratio:.1f}x"
        line = (
            f"| {r.model} | {mode} | {r.images_per_second:.1f} | "
            f"{r.plain_images_per_second:.1f} | {ratio} | {slowdown} | "
            f"{r.peak_rss_mib:.0f} | {r.rss_before_training_mib:.0f} |"
        )
        if gpu:
            line += f" {_mib(r.peak_gpu_mib)} | {_mib(r.gpu_before_training_mib)} |"
        out.append(line)
    return "\n".join(out + auto_summary(rows))


def auto_summary(rows: list[Measurement]) -> list[str]:
    """Per model: the probe's choice against the best mode measured (DP / plain ratios, which
    hold up on a shared machine; target >= 0.95)."""
    lines = []
    for auto in (r for r in rows if r.mode == "auto" and r.ratio):
        fixed = [r for r in rows if r.model == auto.model and r.mode not in ("none", "auto")]
        measured = [r for r in fixed if r.ratio]
        if not measured:
            continue
        best = max(measured, key=lambda r: r.ratio or 0.0)
        share = auto.ratio / best.ratio  # type: ignore[operator]
        lines.append(
            f"\n{auto.model}: auto chose {auto.chosen_mode}, DP/plain {auto.ratio:.2f} against "
            f"the best mode measured ({best.mode}) {best.ratio:.2f}: {share:.2f} of the best"
        )
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke test (<30 s)")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument(
        "--modes", default="default", help="'default', 'all' or a comma list of " + ",".join(MODES)
    )
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="where model, data and Opacus run"
    )
    parser.add_argument("--timeout", type=int, default=240, help="seconds per configuration")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="resnet18", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="none", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.modes = "mobilenetv3_small_100", "functorch"
        args.size, args.batch, args.steps, args.threads = 32, 8, 2, 1
    return args


def modes_for(model: str, choice: str) -> tuple[str, ...]:
    if choice == "default":
        return DEFAULT_MODES.get(model, ("hooks", "functorch"))
    if choice == "all":
        return MODES
    if choice == "default+auto":
        return (*DEFAULT_MODES.get(model, ("hooks", "functorch")), "auto")
    modes = tuple(m.strip() for m in choice.split(",") if m.strip())
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"--modes: unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    return modes


def gpu_name(device: str) -> str | None:
    """The card's name for the report; None on cpu, so a CPU run never initializes CUDA."""
    if device != "cuda":
        return None
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(asdict(run_worker(args))))
        return 0
    started = time.perf_counter()
    rows: list[Measurement] = []
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        for mode in ("none", *modes_for(model, args.modes)):
            rows.append(measure(model, mode, args))
            print(f"# {model} {mode}: done", file=sys.stderr, flush=True)
    print(markdown(rows))
    report = {
        "config": {
            "image_size": args.size,
            "batch_size": args.batch,
            "threads": args.threads,
            "timed_steps": args.steps,
            "device": args.device,
            "gpu": gpu_name(args.device),
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(),
            "seconds": round(time.perf_counter() - started, 1),
        },
        "results": [asdict(r) for r in rows],
    }
    print(json.dumps(report, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2))
    return 0 if all(r.error is None for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
