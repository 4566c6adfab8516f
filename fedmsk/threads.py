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
