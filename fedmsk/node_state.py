"""State a site keeps from one round to the next, one file per round, under its own directory.

A site's optimizer moments and FedBN's local normalisation layers must survive the node process
(a SuperNode starts a fresh ClientApp process per message) and a resumed run must read exactly
what the site had after the round the coordinator resumes from, even when the site had already
trained a later round before the crash. So each round writes its own file and a round ``r``
reads the newest file of a round before ``r``; round 1 of a run reads nothing, which is how a
fresh run clears what an earlier run with the same name left. The files never leave the node.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def save_tensors(state: Any, target: Path | BinaryIO) -> None:
    """``torch.save`` without the CRC32 of every record in the zip container.

    ``torch.load`` never checks those checksums (a flipped byte loads silently either way,
    tested in tests/test_node_state.py), yet computing them was most of a node's fixed cost
    per round: 145 of 179 ms for ResNet-18's AdamW moments (85 MiB) on a 2-core CPU, against
    a federated round of about one second at a small site (docs/benchmarks.md, section 1).
    Crash safety comes from :meth:`RoundFiles.write` (a temporary file replaced atomically),
    not from the checksum.
    """
    import torch
    from torch.utils.serialization import config

    with config.patch({"save.compute_crc32": False}):
        torch.save(state, target)


class RoundFiles:
    """Files ``STEM-rNNNN.SUFFIX`` in ``directory``, the newest ``keep`` of them kept."""

    def __init__(self, directory: Path, stem: str, suffix: str, keep: int = 3) -> None:
        self.directory = Path(directory)
        self.stem = stem
        self.suffix = suffix
        self.keep = max(2, keep)
        self._pattern = re.compile(rf"^{re.escape(stem)}-r(\d+){re.escape(suffix)}$")

    def path(self, round_no: int) -> Path:
        return self.directory / f"{self.stem}-r{round_no:04d}{self.suffix}"

    def rounds(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        found = (self._pattern.match(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def latest_round_before(self, round_no: int) -> int | None:
        """The newest round before ``round_no`` that has a file; None in a run's first round."""
        if round_no <= 1:
            return None
        earlier = [r for r in self.rounds() if r < round_no]
        return earlier[-1] if earlier else None

    def latest_before(self, round_no: int) -> Path | None:
        """The file of :meth:`latest_round_before`."""
        previous = self.latest_round_before(round_no)
        return None if previous is None else self.path(previous)

    def write(self, round_no: int, write: Callable[[BinaryIO], None]) -> Path:
        """``write(handle)`` fills a temporary file that then replaces round ``round_no``'s
        atomically; files of later rounds (left by an earlier run or beyond a resume point)
        and all but the newest ``keep`` are removed.

        The temporary file is, where there is one, a file this write removes anyway (the
        oldest beyond ``keep``, or a later round's), renamed and overwritten in place: on a
        2-core node that wrote ResNet-18's 85 MiB of AdamW moments in a median of 21 ms a
        round instead of 53-69 ms for a new file and the removal of the old one, with fewer
        slow outliers (docs/benchmarks.md, section 1). A crash mid-write leaves only the
        temporary file; the newest complete round stays readable.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        existing = self.rounds()
        kept = sorted({r for r in existing if r < round_no} | {round_no})[-self.keep :]
        doomed = [r for r in existing if r not in kept]
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=self.suffix)
        os.close(fd)
        try:
            if doomed:
                os.replace(self.path(doomed[0]), tmp)
            with open(tmp, "r+b") as handle:
                write(handle)
                handle.truncate()
            os.replace(tmp, self.path(round_no))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        for r in doomed[1:]:
            self.path(r).unlink(missing_ok=True)
        return self.path(round_no)


def prune_other_runs(runs_dir: Path, current: Path, files: RoundFiles, keep_runs: int) -> int:
    """Remove the round files named like ``files`` from all but the ``keep_runs`` runs under
    ``runs_dir`` that wrote them last (``current`` always among those kept); returns the bytes
    freed.

    Why: a run's node-local files outlive it, since a node is never told that a run ended (a
    crashed run may be resumed any time later). For most of them that costs little, but the
    optimizer's moments are two float32 copies of the model per kept round: 22.5 MB a round
    for the 128 px slim ResNet, 67 MB per run and site with the newest three rounds kept. A
    machine that simulated a few dozen runs on one 13-center federation held 17 GB of them and
    ran out of disk mid-run. A run resumed after its files were pruned starts its sites'
    optimizers afresh, as a site's first visit does; other files (privacy spends, FedBN's
    layers) are never touched here.
    """
    runs_dir, current = Path(runs_dir), Path(current)
    others = [r for r in runs_dir.iterdir() if r.is_dir() and r != current]
    written = {run: _stat_rounds(RoundFiles(run, files.stem, files.suffix)) for run in others}
    by_recency = sorted(
        (run for run in others if written[run]),
        key=lambda run: max(mtime for _, mtime, _ in written[run]),
        reverse=True,
    )
    freed = 0
    for run in by_recency[max(0, keep_runs - 1) :]:
        for path, _, size in written[run]:
            try:
                path.unlink()
            except FileNotFoundError:  # that run's own process replaced or removed it meanwhile
                continue
            freed += size
    return freed


def _stat_rounds(files: RoundFiles) -> list[tuple[Path, float, int]]:
    """(path, modification time, size) of each round file that still exists."""
    found = []
    for r in files.rounds():
        path = files.path(r)
        try:
            info = path.stat()
        except FileNotFoundError:
            continue
        found.append((path, info.st_mtime, info.st_size))
    return found
