"""How a node's DataLoaders fetch batches: worker processes, pinned memory and prefetch.

Why these rules. On an H100 with ``data.num_workers`` 0, 75 % of training time waited on
decoding and augmentation done in the training process (docs/benchmarks.md, section 3): a GPU
starves unless other cores prepare its batches. On the project's 2-core CPU nodes workers only
compete with training for the same cores (the training loop waited 5 % with augmentation in the
training process). So ``auto`` gives a CUDA node one worker per spare core (up to 8) with pinned
host memory, a deeper prefetch queue and workers that live for the whole loader (every local
epoch of one message), and a CPU or MPS node none. An explicit number is honoured anywhere.

Workers change which random augmentation each image gets (each worker draws its own stream,
seeded from the loader's generator, :func:`fedmsk.data.augment.worker_init_fn`), so runs are
repeatable for one worker count, not across counts: the reason a CPU node keeps 0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

AUTO = "auto"
MAX_AUTO_WORKERS = 8
# Batches each worker keeps ready; PyTorch's default is 2. Augmentation time varies from batch
# to batch (crop sizes, rotation), and a deeper queue absorbs that without more workers.
GPU_PREFETCH_FACTOR = 4


@dataclass(frozen=True)
class LoaderSettings:
    """What :class:`torch.utils.data.DataLoader` is given besides the dataset and sampler."""

    num_workers: int
    pin_memory: bool
    persistent_workers: bool
    prefetch_factor: int | None

    def loader_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.persistent_workers,
        }
        if self.num_workers > 0:
            kwargs["prefetch_factor"] = self.prefetch_factor
        return kwargs

    def describe(self) -> str:
        if self.num_workers == 0:
            return "batches prepared in the training process" + (
                ", pinned memory" if self.pin_memory else ""
            )
        pinned = ", pinned memory" if self.pin_memory else ""
        return f"{self.num_workers} loader worker(s), prefetch {self.prefetch_factor}{pinned}"


IN_PROCESS = LoaderSettings(0, False, False, None)


def usable_cores() -> int:
    """Cores this process may run on (a container's or taskset's limit, not the machine's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def parse_auto_count(value: object, setting: str, minimum: int) -> int | None:
    """A setting that is ``auto`` (None, also for an unset value) or a whole number of at least
    ``minimum``; anything else is refused with the setting named."""
    text = str(value).strip().lower() if value is not None else AUTO
    if text == AUTO:
        return None
    try:
        count = int(text)
    except ValueError:
        count = minimum - 1
    if count < minimum:
        raise ValueError(f"{setting}={value!r} must be auto or a whole number >= {minimum}")
    return count


def parse_num_workers(value: object) -> int | None:
    """``data.num_workers`` as a count, or None for ``auto``; anything else is refused."""
    return parse_auto_count(value, "data.num_workers", 0)


def resolve_loader_settings(
    num_workers: object, device_type: str, cores: int | None = None
) -> LoaderSettings:
    """Turn ``data.num_workers`` into loader settings for a node training on ``device_type``.

    ``cores``: the cores this node may use (default: :func:`usable_cores`); one stays with the
    training process, which feeds the GPU and runs the optimizer.
    """
    count = parse_num_workers(num_workers)
    on_cuda = device_type == "cuda"
    if count is None:
        spare = (cores if cores is not None else usable_cores()) - 1
        count = min(MAX_AUTO_WORKERS, max(0, spare)) if on_cuda else 0
    if count == 0:
        return LoaderSettings(0, on_cuda, False, None)
    return LoaderSettings(
        num_workers=count,
        pin_memory=on_cuda,
        persistent_workers=True,
        prefetch_factor=GPU_PREFETCH_FACTOR if on_cuda else 2,
    )
