"""Progress lines in the terminal while a run trains, read from its ``metrics.jsonl``.

A federated run happens in Flower's processes (the ServerApp writes ``metrics.jsonl`` as rounds
end) and pooled or local-only training happens in this process (it writes the same file per
epoch), so following that one file gives the same view of both without touching Flower. The file
holds aggregate numbers and site aliases only, so nothing printed here can carry a patient
identifier or a path of a hospital.

One line per event rather than a redrawn bar: it reads the same in a terminal, in a CI log and in
``nohup`` output. Long runs print about 25 training lines; validation and failures always print.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

TRAINING_LINES = 25


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``: short enough for a progress line."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_auc(summary: dict[str, Any], digits: int = 3) -> str:
    """``AUC 0.752 [0.680, 0.825]``, as a reader wants it (the CI is DeLong's)."""
    auc = summary.get("auc")
    if auc is None:
        return "AUC n/a"
    ci = summary.get("auc_ci95")
    if ci and None not in ci:
        return f"AUC {auc:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return f"AUC {auc:.{digits}f}"


class MetricsFollower:
    """New complete lines of a growing JSON-lines file, each read once.

    Rows present when following starts are history and are not returned. A run rewrites the
    file when it starts (a resumed run keeps the rounds up to its checkpoint, ``resumed_after``):
    the rewritten file is read from its start, and rows of rounds up to ``resumed_after`` are
    history.
    """

    def __init__(self, path: Path, resumed_after: int = 0) -> None:
        self.path = path
        self.resumed_after = resumed_after
        self.identity = self._identity()
        self.offset = path.stat().st_size if path.is_file() else 0

    def _identity(self) -> tuple[int, int] | None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None
        return (stat.st_dev, stat.st_ino)

    def read_new(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        identity, size = self._identity(), self.path.stat().st_size
        if identity != self.identity or size < self.offset:
            self.identity, self.offset = identity, 0
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read(size - self.offset)
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        rows = []
        for line in complete.decode("utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and int(row.get("round") or 0) > self.resumed_after:
                rows.append(row)
        return rows


@dataclass
class ProgressPrinter:
    """Turns metrics rows into progress lines: training, validation, failures, time left.

    ``unit`` is ``round`` for a federation and ``epoch`` for pooled or local-only training;
    ``expected_sites`` is how many sites train in each round (0 for centralized training).
    """

    total: int
    unit: str = "round"
    expected_sites: int = 0
    stream: TextIO = field(default_factory=lambda: sys.stdout)
    clock: Callable[[], float] = time.monotonic
    started: float = field(init=False)
    first_done: tuple[int, float] | None = field(init=False, default=None)
    done: int = field(init=False, default=0)
    trained: dict[int, int] = field(init=False, default_factory=dict)
    failed: dict[int, list[str]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.started = self.clock()

    def feed(self, rows: Sequence[dict[str, Any]]) -> None:
        for row in rows:
            self._one(row)

    def feed_one(self, row: dict[str, Any]) -> None:
        self._one(row)

    def _one(self, row: dict[str, Any]) -> None:
        phase = str(row.get("phase", ""))
        site = row.get("site")
        number = int(row.get("round") or 0)
        if phase == "train" and site is not None:
            self.trained[number] = self.trained.get(number, 0) + 1
        elif phase == "train" and site is None:
            self._round_trained(number, row)
        elif phase.endswith("-failure"):
            self.failed.setdefault(number, []).append(str(site))
            error = row.get("error") or "error"
            self._print(number, f"{site} failed to {phase.removesuffix('-failure')} ({error})")
        elif phase == "train-skipped":
            self._print(
                number,
                f"not aggregated: only {row.get('accepted', 0)} site(s) replied "
                "(federation.min_reply_fraction)",
            )
        elif phase == "val" and site is None:
            self._print(number, _validation_text(row))

    def _round_trained(self, number: int, row: dict[str, Any]) -> None:
        now = self.clock()
        self.done += 1
        if self.first_done is None:
            self.first_done = (number, now)
        if not self._shows(number):
            return
        parts = []
        if self.expected_sites:
            parts.append(f"{self.trained.get(number, 0)}/{self.expected_sites} sites trained")
        loss = row.get("train-loss")
        if isinstance(loss, int | float) and math.isfinite(loss):
            parts.append(f"train loss {loss:.3f}")
        parts.append(f"{format_duration(now - self.started)} elapsed")
        left = self._time_left(number, now)
        if left is not None:
            parts.append(f"~{format_duration(left)} left")
        self._print(number, ", ".join(parts))

    def _shows(self, number: int) -> bool:
        every = max(1, math.ceil(self.total / TRAINING_LINES))
        return number <= 1 or number >= self.total or number % every == 0

    def _time_left(self, number: int, now: float) -> float | None:
        """From the pace since the first finished round (start-up excluded), from round 2 on."""
        remaining = self.total - number
        if remaining <= 0:
            return None
        assert self.first_done is not None
        first_number, first_time = self.first_done
        if number <= first_number:
            return None  # the first round carries the start-up: no pace to judge by yet
        return (now - first_time) / (number - first_number) * remaining

    def _print(self, number: int, text: str) -> None:
        width = len(str(self.total))
        print(f"{self.unit} {number:>{width}}/{self.total}  {text}", file=self.stream, flush=True)


def _validation_text(row: dict[str, Any]) -> str:
    n = row.get("n")
    images = f" ({n} images)" if n else ""
    if row.get("auc") is not None:
        return f"validation AUC {float(row['auc']):.3f}{images}"
    if row.get("top1_accuracy") is not None:
        return f"validation top-1 {float(row['top1_accuracy']):.3f}{images}"
    return f"validation{images}"


class LogLines:
    """A text stream that hands each complete line to a logger: the ServerApp's progress lines
    reach the coordinator's terminal through ``flwr run --stream`` in a deployment."""

    def __init__(self, logger: logging.Logger, level: int = logging.INFO) -> None:
        self.logger, self.level, self.pending = logger, level, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if line:
                self.logger.log(self.level, "%s", line)
        return len(text)

    def flush(self) -> None:
        return None
