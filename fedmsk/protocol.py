"""Names both sides of a federated run use in their messages (the coordinator and the nodes).

Kept in the core library so that ``server/`` and ``client/`` import the same constants and
neither imports the other's code.
"""

from __future__ import annotations

ROUND_KEY = "fedmsk-round"
"""Config key: the absolute round number (resumed runs continue the count)."""

PLANNED_VISITS_KEY = "fedmsk-planned-visits"
"""Config key (rounds that sample sites, under DP-SGD): JSON of training-site alias -> how many
rounds of the run the seeded sample asks it, so that each site sizes its noise for those."""

THRESHOLD_KEY = "threshold"
"""Config key: the locked decision threshold an evaluation applies."""

NORM_STATS_ACTION = "norm_stats"
"""Query action: BatchNorm moments of the sent weights over a site's training images."""

NORM_STATS_RECORD = "stats"
"""Reply record holding the per-layer ``.count``/``.mean``/``.var`` arrays."""

# SecAgg+ (server/secagg.py sends, client/secagg.py reads): keys of the legacy fit config that
# travels with the global model. It holds scalars only, so the array names are one JSON string.
ARRAY_NAMES_KEY = "fedmsk-array-names"
CLIPPING_RANGE_KEY = "secagg-clipping-range"
MAX_WEIGHT_KEY = "secagg-max-weight"
QUANTIZATION_RANGE_KEY = "secagg-quantization-range"
COUNT_BOUND_ACTION = "train_count_bound"
"""Query action (SecAgg+ only): a power-of-two bound on the site's training-set size, from which
the coordinator chooses max_weight so that no site's weight factor exceeds 1."""
COUNT_BOUND_KEY = "train-count-bound"
CLIPPED_METRIC = "secagg-clipped"
"""Metric a node reports: how many of its scaled values fall outside +-clipping_range."""


def count_bound(count: int) -> int:
    """The smallest power of two >= ``count`` (1 for an empty site): the size to within a
    factor of two, all a coordinator needs to keep every SecAgg+ weight factor at most 1."""
    return 1 << max(0, int(count) - 1).bit_length()
