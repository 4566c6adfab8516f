"""How many CPU threads a node's training uses (``train.num_threads``).

Why ``auto`` is resolved on the node and not in the coordinator's config: the same config
reaches every hospital, and their machines differ. A fixed count fits one of them at best; the
former default (1) had a deployed node train on one core of however many it has. ``auto``
takes the node's own limit: ``OMP_NUM_THREADS`` where its environment sets one (the usual way
an administrator caps a process, and what a launcher that runs several trainings on one machine
sets), otherwise every core the process may run on (a container's or ``taskset``'s limit).

Thread counts change the order of floating-point sums, so runs repeat exactly for one count,
not across counts. Flower's simulation engine runs every site on one machine, so
``fedmsk simulate`` sets a count itself (each site's CPU share, ``fedmsk.commands.simulate``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from fedmsk.data.loader_settings import parse_auto_count, usable_cores


def parse_num_threads(value: object) -> int | None:
    """``train.num_threads`` as a count, or None for ``auto``; anything else is refused."""
    return parse_auto_count(value, "train.num_threads", 1)


def environment_limit(environ: Mapping[str, str]) -> int | None:
    """The thread count ``OMP_NUM_THREADS`` sets (its first level where it lists several)."""
    first = environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(first) if first.isdigit() and int(first) > 0 else None


def training_threads(value: object, environ: Mapping[str, str] | None = None) -> int:
    """The threads training uses on this node for ``train.num_threads`` = ``value``."""
    count = parse_num_threads(value)
    if count is not None:
        return count
    limit = environment_limit(os.environ if environ is None else environ)
    return limit if limit is not None else usable_cores()


# fedmsk commands that train in the process they start (and its Flower processes)
TRAINING_COMMANDS = frozenset({"simulate", "train", "compare", "demo"})


def other_fedmsk_trainings(proc: Path = Path("/proc")) -> list[int]:
    """Process IDs of other ``fedmsk`` training commands on this machine (Linux; elsewhere
    none are found). This process and its ancestors (a shell or script that started it) are
    not counted."""
    if not proc.is_dir():
        return []
    own = _lineage(proc, os.getpid())
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) in own:
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if _is_training_command([a.decode(errors="replace") for a in argv]):
            found.append(int(entry.name))
    return sorted(found)


def _is_training_command(argv: list[str]) -> bool:
    """A Python process running ``.../fedmsk simulate ...`` (how the console script shows in
    /proc); wrappers that name the command in their own arguments (``time fedmsk ...``, a
    shell script) are not counted, so each run counts once."""
    if not argv or not Path(argv[0]).name.startswith("python"):
        return False
    for i, arg in enumerate(argv[1:-1], start=1):
        if Path(arg).name == "fedmsk":
            return argv[i + 1] in TRAINING_COMMANDS
    return False


def _lineage(proc: Path, pid: int) -> set[int]:
    """``pid`` and its ancestors, read from ``/proc/PID/stat`` (the parent's field)."""
    from fedmsk.simulation import proc_stat_fields

    seen = set()
    while pid > 0 and pid not in seen:
        seen.add(pid)
        fields = proc_stat_fields(proc / str(pid) / "stat")
        if not fields or len(fields) < 2 or not fields[1].isdigit():
            break
        pid = int(fields[1])
    return seen


def busy_machine_warning(
    threads: int, others: list[int], environ: Mapping[str, str] | None = None
) -> str | None:
    """What to tell a user who starts a run that takes several threads beside another fedmsk
    training, or None. Why: torch's idle OpenMP threads spin; two runs that each take every
    core of a 2-core machine ran 5-10x slower each (docs/benchmarks.md, "Two torch processes
    on one machine"), with nothing on the terminal to say why. Under
    ``OMP_WAIT_POLICY=PASSIVE`` they do not spin, and nothing is said."""
    environ = os.environ if environ is None else environ
    passive = environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"
    if threads <= 1 or not others or passive:
        return None
    which = ("process " if len(others) == 1 else "processes ") + ", ".join(map(str, others))
    return (
        f"another fedmsk run is training on this machine ({which}) and this one takes "
        f"{threads} threads: runs that each take every core can each be several times slower. "
        "Give each train.num_threads=1, start both with OMP_WAIT_POLICY=PASSIVE, or run them "
        "one after another"
    )
