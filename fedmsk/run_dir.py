"""The run directory: the one place a run's durable results live.

Everything written here is aggregate and non-identifying (see docs/interfaces.md). Writes are
atomic (temp file + rename) so that a run killed at any instant leaves either the previous or
the new version of a file, never half of one: that is what makes ``resume`` safe.
"""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmsk.config import ExperimentConfig, config_hash, to_yaml

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PATTERN = "round_{:04d}.ckpt"
CHECKPOINTS_KEPT = 3


class ResumeError(RuntimeError):
    """A run directory that cannot be resumed; the message says why and what to do."""


@dataclass
class Checkpoint:
    round: int
    arrays: dict[str, np.ndarray]
    strategy_state: dict[str, Any]
    config_hash: str
    threshold: float


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


WRITER_LOCK = ".writer.lock"


class RunDirectoryBusy(RuntimeError):
    """Another live process is writing this run directory (a run not yet stopped)."""


class WriterLock:
    """An exclusive ``flock`` on ``RUN_DIR/.writer.lock`` held while a run writes the directory.

    Why: a federated run killed from its terminal can leave Flower's detached simulation
    process alive, still appending rounds; a resume started beside it would interleave two runs
    in one metrics file. The kernel drops the lock when its holder dies, however it dies, so a
    held lock always means a live writer.
    """

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / WRITER_LOCK
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            self._fd = None
            raise RunDirectoryBusy(
                f"{directory}: another process (pid {holder}) is still writing this run "
                "directory; wait for it to finish or stop it (kill that pid) before resuming"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def ensure_not_in_use(directory: Path | str) -> None:
    """Raise ``RunDirectoryBusy`` if a live process holds the directory's writer lock."""
    path = Path(directory)
    if (path / WRITER_LOCK).is_file():
        WriterLock(path).release()


FAILURE_FILE = "run_failed.txt"


def one_line_cause(exc: BaseException) -> str:
    """``ValueError: what went wrong``, on one line, for the launcher to print."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def record_failure_cause(directory: Path | str, exc: BaseException) -> None:
    """The ServerApp's error, where the launcher (another process) can read it back."""
    path = Path(directory)
    if not path.is_absolute():
        return
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path / FAILURE_FILE, (one_line_cause(exc) + "\n").encode("utf-8"))


def results_written_since(directory: Path | str, since: float) -> bool:
    """Whether a run wrote its results.json after ``since`` (a ``time.time()``): how a launcher
    tells a finished run from a failed one, since ``flwr run`` exits 0 either way."""
    path = Path(directory) / "results.json"
    return path.is_file() and path.stat().st_mtime >= since


def failure_cause(directory: Path | str, since: float) -> str | None:
    """The cause a ServerApp recorded after ``since`` (a ``time.time()``), if any."""
    path = Path(directory) / FAILURE_FILE
    if not path.is_file() or path.stat().st_mtime < since:
        return None
    return path.read_text(encoding="utf-8").strip() or None


class RunDirectory:
    """Reads and writes one run's files; with ``tensorboard`` it mirrors metrics as scalars."""

    def __init__(self, path: Path | str, tensorboard: bool = False) -> None:
        self.path = Path(path).resolve()
        self.tensorboard = tensorboard
        self._writer: Any = None
        # called with every metrics line after it is written (progress display)
        self.observers: list[Callable[[dict[str, Any]], None]] = []

    def lock_for_writing(self) -> WriterLock:
        """Hold the directory's writer lock until ``release`` (or this process ends)."""
        return WriterLock(self.path)

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def results_path(self) -> Path:
        return self.path / "results.json"

    def initialise(self, cfg: ExperimentConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path / "config.yaml", to_yaml(cfg).encode())
        atomic_write_bytes(self.path / "config_hash.txt", (config_hash(cfg) + "\n").encode())

    def append_metrics(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, default=_json_default, sort_keys=True)
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
        if self.tensorboard:
            self._write_scalars(record)
        for observer in self.observers:
            observer(record)

    def _write_scalars(self, record: dict[str, Any]) -> None:
        """Metric lines as TensorBoard scalars tagged phase/site/name, stepped by round."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.path / "tensorboard"))
        step = int(record.get("round", 0))
        prefix = f"{record.get('phase', 'metric')}/{record.get('site') or 'all'}"
        for key, value in record.items():
            if key in ("round", "phase", "site") or isinstance(value, bool):
                continue
            if isinstance(value, int | float):
                self._writer.add_scalar(f"{prefix}/{key}", float(value), step)
        self._writer.flush()

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def truncate_metrics_after(self, last_round: int) -> None:
        """Drop metric lines of rounds after ``last_round`` (a resumed run rewrites them)."""
        kept = [m for m in self.read_metrics() if int(m.get("round", 0)) <= last_round]
        body = "".join(json.dumps(m, sort_keys=True) + "\n" for m in kept)
        atomic_write_bytes(self.metrics_path, body.encode())

    def write_json(self, name: str, content: dict[str, Any]) -> Path:
        path = self.path / name
        blob = json.dumps(content, default=_json_default, indent=2, sort_keys=True)
        atomic_write_bytes(path, blob.encode())
        return path

    def save_checkpoint(self, checkpoint: Checkpoint, keep: int = CHECKPOINTS_KEPT) -> Path:
        """Write a round's checkpoint and remove all but the newest ``keep`` rounds (a long
        study would otherwise fill a disk with model copies; final_model.npz is separate)."""
        path = self.path / CHECKPOINT_DIR / CHECKPOINT_PATTERN.format(checkpoint.round)
        atomic_write_bytes(path, pickle.dumps(checkpoint, protocol=pickle.HIGHEST_PROTOCOL))
        older = sorted(path.parent.glob("round_*.ckpt"))
        for stale in older[: max(0, len(older) - max(1, keep))]:
            stale.unlink(missing_ok=True)
        return path

    def latest_checkpoint(self) -> Checkpoint | None:
        folder = self.path / CHECKPOINT_DIR
        candidates = sorted(folder.glob("round_*.ckpt")) if folder.is_dir() else []
        for path in reversed(candidates):
            try:
                with path.open("rb") as handle:
                    loaded = pickle.load(handle)
            except (OSError, pickle.UnpicklingError, EOFError) as exc:
                raise ResumeError(
                    f"{path}: unreadable checkpoint ({type(exc).__name__}); "
                    "delete it to resume from the round before"
                ) from exc
            if isinstance(loaded, Checkpoint):
                return loaded
        return None

    def checkpoint_for_resume(self, cfg: ExperimentConfig) -> Checkpoint | None:
        """The last complete round, checked against the configuration it was made with."""
        checkpoint = self.latest_checkpoint()
        if checkpoint is None:
            return None
        expected = config_hash(cfg)
        if checkpoint.config_hash != expected:
            raise ResumeError(
                f"{self.path}: checkpoint was made with config {checkpoint.config_hash}, "
                f"this run has {expected}; resume with the same overrides"
            )
        return checkpoint
