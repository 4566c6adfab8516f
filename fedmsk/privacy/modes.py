"""Which Opacus per-sample gradient implementation a DP-SGD site uses, chosen by measurement.

Why measure: the fastest mode depends on the backbone and the device, and a rule that holds on
one machine does not hold on another (the project's benchmarks found ``ew`` fastest for
ResNet-18 on these CPUs, ``hooks`` slowest and hungriest for depthwise networks on CPUs, and
``functorch`` slowest for EfficientNet-B0 on a GPU). With ``privacy.grad_sample_mode=auto`` a
site times a few forward/backward passes of random images (never its own) in each candidate
mode, keeps the fastest that produces every per-sample gradient, and remembers the choice in
``SITE_DIR/.fedmsk/dp-modes.json`` for that model, input, batch, device and library versions, so
the probe runs once per node and configuration. A mode that fails or is far slower than the
best so far is dropped after its first pass.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from fedmsk.privacy.compat import has_depthwise_conv, model_name
from fedmsk.run_dir import atomic_write_bytes

log = logging.getLogger(__name__)

GRAD_SAMPLE_MODES = ("auto", "hooks", "functorch", "ew", "ghost")
# ghost clipping needs Opacus' two-pass criterion, which fedmsk.training.fit does not use.
PROBED_MODES = ("hooks", "functorch", "ew")
CACHE_FILE = "dp-modes.json"
PROBE_STEPS = 2  # timed passes after one warm-up pass
_GIVE_UP_FACTOR = 3.0  # a warm-up this many times the best mode's time ends that mode's probe
_PROBE_BATCH_LIMIT = 64
_REMEMBERED: dict[str, dict[str, Any]] = {}  # this process's choices, for sites without a file


def choose_grad_sample_mode(model: nn.Module, requested: str = "auto") -> str:
    """The mode a site tries first when no timed probe decides (or a mode is named).

    ``auto`` without a probe: functorch for models with depthwise/grouped convolutions
    (EfficientNet, MobileNet, MnasNet), where the hook modes are 3-5x slower and use GBs more
    memory on CPUs; hooks otherwise (ResNets), the most widely supported mode there.
    """
    mode = (requested or "auto").strip().lower()
    if mode not in GRAD_SAMPLE_MODES:
        raise ValueError(
            f"privacy.grad_sample_mode={requested!r} is not one of {', '.join(GRAD_SAMPLE_MODES)}"
        )
    if mode != "auto":
        return mode
    return "functorch" if has_depthwise_conv(model) else "hooks"


def probe_input(loader: DataLoader, batch: int = 2) -> torch.Tensor:
    """Random images of the dataset's shape: a probe must not touch any real image's values."""
    sample = loader.dataset[0]  # type: ignore[index]
    image = sample[0] if isinstance(sample, tuple | list) else sample
    shape = tuple(torch.as_tensor(image).shape)
    return torch.randn((batch, *shape))


def mode_works(model: nn.Module, mode: str, loader: DataLoader) -> str | None:
    """One forward/backward of random data through Opacus' wrapper; the failure, if any."""
    device = next(model.parameters()).device
    try:
        _pass_seconds(model, mode, probe_input(loader).to(device), passes=1)
        return None
    except Exception as err:  # noqa: BLE001 - any failure means "try the next mode"
        return _failure(err)


def fastest_grad_sample_mode(
    model: nn.Module, loader: DataLoader, cache_file: Path | None = None
) -> str | None:
    """The fastest working mode of :data:`PROBED_MODES` for ``model`` on ``loader``'s batches,
    from the cache when this configuration was probed before; None if none works."""
    batch = min(int(getattr(loader, "batch_size", None) or 16), _PROBE_BATCH_LIMIT)
    device = next(model.parameters()).device
    inputs = probe_input(loader, batch).to(device)
    key = _probe_key(model, inputs)
    remembered = _REMEMBERED.get(key) or _read_cache(cache_file).get(key)
    if remembered is not None and remembered.get("mode") in PROBED_MODES:
        return str(remembered["mode"])
    seconds: dict[str, float] = {}
    problems: dict[str, str] = {}
    for mode in PROBED_MODES:
        limit = _GIVE_UP_FACTOR * min(seconds.values()) if seconds else None
        try:
            measured = _pass_seconds(model, mode, inputs, passes=1 + PROBE_STEPS, limit=limit)
        except Exception as err:  # noqa: BLE001 - a failing mode is simply not chosen
            problems[mode] = _failure(err)
            continue
        if measured is None:
            problems[mode] = f"warm-up over {_GIVE_UP_FACTOR:g}x the fastest mode's pass"
        else:
            seconds[mode] = measured
    if not seconds:
        return None
    chosen = min(seconds, key=seconds.__getitem__)
    entry = {"mode": chosen, "seconds": seconds, "dropped": problems}
    _REMEMBERED[key] = entry
    _write_cache(cache_file, key, entry)
    log.info("DP-SGD per-sample gradient mode %s chosen by timing: %s", chosen, entry)
    return chosen


def _pass_seconds(
    model: nn.Module, mode: str, inputs: torch.Tensor, passes: int, limit: float | None = None
) -> float | None:
    """Median seconds of a forward/backward pass with per-sample gradients after a warm-up
    (``passes`` - 1 timed); None when the warm-up alone took longer than ``limit``. Raises
    when the mode fails or leaves a trainable parameter without a per-sample gradient."""
    from opacus.grad_sample.utils import wrap_model

    wrapped = None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            wrapped = wrap_model(
                model, grad_sample_mode=mode, batch_first=True, loss_reduction="mean"
            )
            times = []
            for index in range(passes):
                started = time.perf_counter()
                wrapped(inputs).float().sum().backward()
                if inputs.is_cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - started)
                if index == 0:
                    _check_per_sample_gradients(model)
                    if limit is not None and times[0] > limit:
                        return None
                _clear(model)
        return statistics.median(times[1:]) if len(times) > 1 else times[0]
    finally:
        if wrapped is not None:
            wrapped.cleanup()
        _clear(model)


def _check_per_sample_gradients(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if p.requires_grad and getattr(p, "grad_sample", None) is None:
            raise RuntimeError(f"no per-sample gradient for {name}")


def _clear(model: nn.Module) -> None:
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        if hasattr(p, "grad_sample"):
            p.grad_sample = None


def _failure(err: BaseException) -> str:
    first_line = str(err).splitlines()[0][:200] if str(err) else ""
    return f"{type(err).__name__}: {first_line}"


def _probe_key(model: nn.Module, inputs: torch.Tensor) -> str:
    import opacus

    parameters = sum(p.numel() for p in model.parameters())
    device = inputs.device.type
    if device == "cuda":
        device = f"cuda:{torch.cuda.get_device_name(inputs.device)}"
    return (
        f"{model_name(model)}|params={parameters}|input={tuple(inputs.shape)}|{device}|"
        f"threads={torch.get_num_threads()}|torch={torch.__version__}|opacus={opacus.__version__}"
    )


def _read_cache(cache_file: Path | None) -> dict[str, Any]:
    if cache_file is None or not cache_file.is_file():
        return {}
    try:
        data = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # a damaged cache only costs a new probe
    return data if isinstance(data, dict) else {}


def _write_cache(cache_file: Path | None, key: str, entry: dict[str, Any]) -> None:
    if cache_file is None:
        return
    data = _read_cache(cache_file)
    data[key] = entry
    try:
        atomic_write_bytes(cache_file, json.dumps(data, indent=1, sort_keys=True).encode())
    except OSError as err:
        log.warning("DP-SGD mode choice not cached (%s)", type(err).__name__)
