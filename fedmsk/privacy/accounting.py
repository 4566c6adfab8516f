"""Privacy accounting arithmetic: epsilon of a DP-SGD history and the noise for a target.

Kept apart from the session (:mod:`fedmsk.privacy`) and the site's lifetime ledger
(:mod:`fedmsk.privacy.ledger`) because both compose the same histories with the same accountant,
and a history means one thing everywhere: a list of ``(noise_multiplier, sample_rate, steps)``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

History = list[tuple[float, float, int]]

# Delta of a site that sets none in its policy file (fedmsk.privacy.ledger): fixed rather than
# derived from the image count, so that adding or removing images never changes the guarantee
# a site's earlier runs were accounted under.
DEFAULT_DELTA = 1e-5
# A budget is met when epsilon is at most target x (1 + EPSILON_SLACK): room for the float
# rounding of the accountant, never for real spend.
EPSILON_SLACK = 1e-6


class BudgetExhaustedError(RuntimeError):
    """Training was asked of a site whose privacy budget is spent (message is PHI-free)."""


def check_delta(delta: float, num_examples: int, source: str) -> float:
    """``delta`` if it is a probability below ``1 / n``; a ValueError naming ``source`` if not.

    At ``delta >= 1/n`` a mechanism that publishes one random image outright satisfies the
    guarantee, so such a delta promises nothing."""
    delta = float(delta)
    if not 0 < delta < 1:
        raise ValueError(f"{source}: delta must be in (0, 1), got {delta:g}")
    if num_examples > 0 and delta * num_examples >= 1:
        raise ValueError(
            f"{source}: delta {delta:g} is not below 1/n for this site's {num_examples} "
            "training images; set a smaller delta in the site's privacy-policy.toml"
        )
    return delta


def default_delta(num_examples: int) -> float:
    """The site-policy default delta (:data:`DEFAULT_DELTA`), checked against ``1 / n``."""
    if num_examples <= 0:
        raise ValueError("a DP site needs at least one training image to set its privacy delta")
    return check_delta(DEFAULT_DELTA, num_examples, "the default privacy delta")


def planned_sample_rate(num_examples: int, batch_size: int) -> float:
    """The rate Opacus' Poisson loader uses: one over the number of batches of the plain loader."""
    if batch_size <= 0:
        raise ValueError(f"train.batch_size must be positive for DP-SGD, got {batch_size}")
    return 1.0 / max(1, math.ceil(num_examples / batch_size))


def accountant_with(mechanism: str, history: History) -> Any:
    """An Opacus accountant (``rdp`` or ``prv``) that has already seen ``history``."""
    from opacus.accountants import create_accountant

    accountant = create_accountant(mechanism=mechanism)
    accountant.history = [tuple(entry) for entry in history]
    return accountant


def epsilon_for(history: History, delta: float, mechanism: str = "rdp") -> float:
    """Epsilon spent by a sequence of ``(noise_multiplier, sample_rate, steps)`` at ``delta``.

    For ``rdp`` this is Opacus' RDPAccountant arithmetic (same orders, same sum, same conversion)
    with each mechanism's one-step RDP cached: a site's lifetime ledger is re-composed at every
    budget check, and most of its entries repeat a few (noise, rate) pairs."""
    entries = [entry for entry in history if entry[2] > 0]
    if not entries:
        return 0.0
    if mechanism != "rdp":
        return float(accountant_with(mechanism, entries).get_epsilon(delta=delta))
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rdp = sum(_rdp_per_step(float(s), float(q)) * int(n) for s, q, n in entries)
    epsilon, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(epsilon)


@functools.lru_cache(maxsize=1024)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> Any:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    return compute_rdp(
        q=sample_rate,
        noise_multiplier=noise_multiplier,
        steps=1,
        orders=RDPAccountant.DEFAULT_ALPHAS,
    )


def steps_in(history: History) -> int:
    return int(sum(entry[2] for entry in history))


def derive_noise_multiplier(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    total_steps: int,
    accountant: str = "rdp",
) -> float:
    """The smallest noise multiplier (to 0.01 in epsilon) whose epsilon after ``total_steps``
    is at most ``target_epsilon``."""
    if target_epsilon <= 0:
        raise ValueError(f"privacy.target_epsilon must be positive, got {target_epsilon}")
    if not 0 < target_delta < 1:
        raise ValueError(f"privacy.target_delta must be in (0, 1), got {target_delta}")
    try:
        return _cached_noise_multiplier(
            float(target_epsilon), float(target_delta), float(sample_rate),
            max(1, int(total_steps)), accountant,
        )  # fmt: skip
    except ValueError as err:
        raise ValueError(
            f"privacy.target_epsilon={target_epsilon} is too small for {total_steps} DP-SGD "
            f"steps at sample rate {sample_rate:.4g}: raise privacy.target_epsilon or lower "
            "federation.num_rounds / train.local_epochs"
        ) from err


@functools.lru_cache(maxsize=64)
def _cached_noise_multiplier(
    target_epsilon: float, target_delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """The binary search costs seconds; sessions of one process often ask the same question."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
    )


def noise_within(
    past: History,
    *,
    cap: float,
    delta: float,
    sample_rate: float,
    steps: int,
    at_least: float,
    at_most: float,
) -> float | None:
    """The smallest noise multiplier from ``at_least`` up (to 0.5 %) at which ``past`` plus
    ``steps`` more steps at ``sample_rate`` stay within epsilon ``cap`` (RDP, at ``delta``);
    None if ``at_least`` does not and no noise up to ``at_most`` does.

    Epsilon falls as the noise rises, so a bisection on the log of the noise finds it."""

    def spent(sigma: float) -> float:
        return epsilon_for([*past, (sigma, sample_rate, int(steps))], delta, "rdp")

    low, high = float(at_least), float(at_most)
    if spent(low) <= cap:
        return low
    if low >= high or spent(high) > cap:
        return None
    while high / low > 1.005:
        middle = math.sqrt(low * high)
        if spent(middle) <= cap:
            high = middle
        else:
            low = middle
    return high
